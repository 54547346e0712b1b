"""What the plain-script tests of models/ share: a named check, a copy of the tiny bundle, a
run of its backbone graph, and the prefix that makes a read-only folder read-only even to root."""

import os
import shutil
import subprocess

import numpy as np

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "tiny")


def without_write_override():
    """The command prefix under which a folder of mode 555 cannot be written: nothing when this
    is not root; when it is, `setpriv` dropping the capabilities by which root writes anyway, from
    the bounding and the inheritable sets (the process stays root and reads what root owns). None
    where that does not make such a folder unwritable (no setpriv, or a drop refused or without
    effect): the caller skips and says so."""
    import tempfile

    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        return None
    caps = "-dac_override,-dac_read_search,-fowner"
    prefix = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--"]
    with tempfile.TemporaryDirectory() as probe:
        locked = os.path.join(probe, "locked")
        os.makedirs(locked)
        os.chmod(locked, 0o555)
        try:
            r = subprocess.run(prefix + ["touch", os.path.join(locked, "x")], capture_output=True)
            written = os.path.exists(os.path.join(locked, "x"))
        finally:
            os.chmod(locked, 0o755)
    return prefix if r.returncode != 0 and not written and b"Permission denied" in r.stderr else None


def check(cond, what):
    """Prints `ok: what`, or exits with `FAIL: what`."""
    if not cond:
        raise SystemExit(f"FAIL: {what}")
    print(f"ok: {what}")


def copy_tiny(tmp, name):
    """A copy of models/fixtures/tiny (without its golden cases) as tmp/name."""
    dst = os.path.join(tmp, name)
    shutil.copytree(TINY, dst, ignore=shutil.ignore_patterns("golden"))
    return dst


def run_tiny_backbone(path):
    """The z rows of a backbone graph of the tiny bundle at `path`, run by ONNX Runtime (CPU) on
    fixed inputs: 2 images, 3 known tokens, 2 predicted."""
    import onnxruntime as ort

    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    return s.run(None, {"tokens": rng.standard_normal((2, 256, 4)).astype(np.float32),
                        "known": np.array([[1, 5, 9]] * 2, np.int64), "label": np.array([3, 10], np.int64),
                        "predict": np.array([[0, 2]] * 2, np.int64)})[0]

"""What the plain-script tests of models/ share: a named check, a copy of the tiny bundle, and a
run of its backbone graph."""

import os
import shutil

import numpy as np

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "tiny")


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

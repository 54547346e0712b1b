#!/usr/bin/env python3
"""Tests of onnx_save.py, and of the model tools on graphs with external data (plain script:
run it, it exits non-zero on the first failure).

  .venv/bin/python models/tests/test_onnx_save.py        # ~5 s, needs models/fixtures/requirements.txt

1. Below the limit a graph is one file; above it, the graph and a data file named after it,
   which onnx and ONNX Runtime read; rewriting it removes the old data file; a hard link to the
   old graph keeps it; a `verify` that raises leaves the old graph and no temporary file.
2. With the limit lowered so that every graph goes external (as MAR-H's do at the real limit):
   fuse_attention.py, add_backbone.py and convert_precision.py (fp16) work on a bundle whose
   encoder and decoder keep their weights in data files, write their graphs the same way, and
   ONNX Runtime runs the results.
3. A Staging left without commit changes nothing; a commit killed after its plan was written is
   finished by the next run, which also removes the leftovers of killed runs (and of earlier
   versions: `.fuse_attention.XXXX/`, `.<graph>.onnx.XXXX/`); the manifest keeps its mode.
"""

import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

MODELS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(MODELS))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_copies import TINY, check, copy_tiny, run_tiny_backbone  # noqa: E402

from models import onnx_save  # noqa: E402


def data_files(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".data"))


def leftovers(folder):
    return [n for n in os.listdir(folder) if n.startswith(".")]


def run_encoder(path):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"tokens": rng.standard_normal((2, 256, 4)).astype(np.float32),
             "known_index": np.array([[1, 7, 9]] * 2, np.int64), "class_label": np.array([3, 10], np.int64)}
    return s.run(None, feeds)[0]


def test_save_model(tmp):
    folder = os.path.join(tmp, "save")
    os.makedirs(folder)
    path = os.path.join(folder, "encoder.onnx")
    want = run_encoder(os.path.join(TINY, "encoder.onnx"))
    onnx_save.save_model(onnx.load(os.path.join(TINY, "encoder.onnx")), path)
    check(data_files(folder) == [] and np.array_equal(run_encoder(path), want), "below the limit: one file")
    link = os.path.join(tmp, "encoder-link.onnx")
    os.link(path, link)
    written = onnx_save.save_model(onnx.load(os.path.join(TINY, "encoder.onnx")), path, limit=1000)
    first = data_files(folder)
    check(len(written) == 2 and len(first) == 1 and first[0].startswith("encoder.onnx."),
          f"above the limit: the graph and a data file named after it ({first})")
    check(np.array_equal(run_encoder(path), want), "… which ONNX Runtime reads")
    check(onnx.load(link).graph.initializer[0].data_location != onnx.TensorProto.EXTERNAL,
          "a hard link to the old graph keeps the old graph")
    onnx_save.save_model(onnx.load(path), path, limit=1000)
    second = data_files(folder)
    check(len(second) == 1 and second != first, "rewriting it replaces the data file, the old one removed")
    onnx_save.save_model(onnx.load(path), path)
    check(data_files(folder) == [] and np.array_equal(run_encoder(path), want),
          "written inline again, no data file is left")

    def refuse(_):
        raise RuntimeError("no")

    before = open(path, "rb").read()
    try:
        onnx_save.save_model(onnx.load(os.path.join(TINY, "decoder.onnx")), path, limit=1000, verify=refuse)
        check(False, "a verify that raises is passed on")
    except RuntimeError:
        pass
    check(open(path, "rb").read() == before and data_files(folder) == [] and leftovers(folder) == [],
          "a verify that raises leaves the old graph and no temporary file")


def test_tools_on_external_data(tmp):
    from models.add_backbone import add_backbone
    from models.convert_precision import convert
    from models.fuse_attention import fuse_bundle

    bundle = copy_tiny(tmp, "external")
    real = onnx_save.EXTERNAL_DATA_BYTES
    onnx_save.EXTERNAL_DATA_BYTES = 10_000
    try:
        for name in ("encoder.onnx", "decoder.onnx"):
            onnx_save.save_model(onnx.load(os.path.join(bundle, name)), os.path.join(bundle, name))
        check(len(data_files(bundle)) == 2, "the bundle's encoder and decoder keep their weights in data files")
        counts = fuse_bundle(bundle, log=lambda *_: None)
        check(counts == {"encoder": 1, "decoder": 1}, "fuse_attention.py fuses them (and checks them)")
        add_backbone(bundle, log=lambda *_: None)
        report = convert(bundle, "fp16", log=lambda *_: None)
    finally:
        onnx_save.EXTERNAL_DATA_BYTES = real
    names = data_files(bundle)
    for graph in ("encoder.onnx", "decoder.onnx", "backbone.onnx", "encoder.fp16.onnx", "backbone.fp16.onnx"):
        check(sum(n.startswith(graph + ".") for n in names) == 1, f"{graph} has its own data file")
    check(len(names) == len({n.split('.onnx.')[0] for n in names}), f"no stale data file is left ({names})")
    check(leftovers(bundle) == [], "no temporary file is left")
    check(report["graphs"]["encoder"]["error_vs_fp32"]["max_abs"] < 0.05, "the fp16 variant was checked")
    z = run_tiny_backbone(os.path.join(bundle, "backbone.onnx"))
    check(z.shape == (2, 2, 32) and np.isfinite(z).all(), "ONNX Runtime runs the backbone from its data file")


def test_write_manifest(tmp):
    folder = os.path.join(tmp, "manifest")
    os.makedirs(folder)
    shared = os.path.join(tmp, "shared-manifest.yaml")
    with open(shared, "w") as f:
        f.write("name: before\n")
    os.link(shared, os.path.join(folder, "manifest.yaml"))
    path = onnx_save.write_manifest(folder, "name: after\n")
    check(open(path).read() == "name: after\n", "write_manifest: the new text is in place")
    check(open(shared).read() == "name: before\n", "write_manifest: a hard-linked manifest is not written through")
    check(sorted(os.listdir(folder)) == ["manifest.yaml"], "write_manifest: no temporary file is left")


def test_interrupted_commit_and_leftovers(tmp):
    """A commit interrupted after its plan was written is finished by the next run; staging
    folders of runs killed earlier (and those of earlier versions) are removed; the manifest keeps
    its mode."""
    bundle = copy_tiny(tmp, "interrupted")
    manifest = os.path.join(bundle, "manifest.yaml")
    os.chmod(manifest, 0o600)
    onnx_save.write_manifest(bundle, open(manifest).read() + "# edited\n")
    check(oct(os.stat(manifest).st_mode & 0o777) == oct(0o600), "write_manifest keeps the manifest's mode (600)")
    before = {n: open(os.path.join(bundle, n), "rb").read() for n in os.listdir(bundle)}
    with onnx_save.Staging(bundle) as s:
        s.save(onnx.load(os.path.join(TINY, "decoder.onnx")), os.path.join(bundle, "a.onnx"))
        s.save(onnx.load(os.path.join(TINY, "decoder.onnx")), os.path.join(bundle, "b.onnx"))
        s.write_manifest("name: new\n")
    check({n: open(os.path.join(bundle, n), "rb").read() for n in os.listdir(bundle)} == before,
          "a Staging left without commit changes nothing and leaves nothing")
    real = onnx_save._apply

    def killed(folder, plan):  # the first file renamed, then the process dies
        src, dst = plan["moves"][0]
        os.replace(os.path.join(folder, src), os.path.join(folder, dst))
        raise KeyboardInterrupt

    onnx_save._apply = killed
    try:
        with onnx_save.Staging(bundle) as s:
            s.save(onnx.load(os.path.join(TINY, "decoder.onnx")), os.path.join(bundle, "a.onnx"))
            s.save(onnx.load(os.path.join(TINY, "decoder.onnx")), os.path.join(bundle, "b.onnx"))
            s.write_manifest("name: new\n")
            s.commit()
    except KeyboardInterrupt:
        pass
    finally:
        onnx_save._apply = real
    check(os.path.exists(os.path.join(bundle, "a.onnx")) and not os.path.exists(os.path.join(bundle, "b.onnx"))
          and len(leftovers(bundle)) == 1, "a commit killed halfway leaves its plan")
    os.makedirs(os.path.join(bundle, ".gtr-tmp.999999999.abc"))       # a staging folder of a dead run
    os.makedirs(os.path.join(bundle, ".fuse_attention.ab12cd_3"))      # earlier versions' leftovers
    os.makedirs(os.path.join(bundle, ".decoder.int8.onnx.x1y2z3w4"))
    onnx_save.write_manifest(bundle, "name: newer\n")
    check(os.path.exists(os.path.join(bundle, "b.onnx")), "the next run finishes the interrupted commit")
    check(open(manifest).read() == "name: newer\n" and leftovers(bundle) == [],
          f"… and removes every leftover ({leftovers(bundle)})")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        test_save_model(tmp)
        test_write_manifest(tmp)
        test_interrupted_commit_and_leftovers(tmp)
        test_tools_on_external_data(tmp)
    print("all onnx_save tests passed")


if __name__ == "__main__":
    main()

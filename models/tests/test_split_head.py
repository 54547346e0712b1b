#!/usr/bin/env python3
"""Tests of split_head.py (plain script: run it, it exits non-zero on the first failure).

  .venv/bin/python models/tests/test_split_head.py        # ~5 s, needs models/fixtures/requirements.txt

1. On a copy of the tiny bundle it writes diffusion_condition.onnx and diffusion_state.onnx with
   their manifest entries (once each, also when run twice), and the two parts give the whole
   head's output exactly, the condition part run on the rows alone or stacked with others.
2. convert_precision.py on a split bundle writes both parts of the int8 head and lists them in
   precisions.int8; the int8 parts give the int8 head's output.
3. A head whose x part reads an integer tensor of the timestep, or a tensor of z that is not per
   row, is refused with a message naming the graph and tensor, and nothing is written.
4. The command line with --check exits 0 (run from the repository root, as documented).
"""

import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import yaml
from onnx import TensorProto, helper

MODELS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(MODELS))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_copies import check, copy_tiny  # noqa: E402

from models import convert_precision, split_head  # noqa: E402

QUIET = {"log": lambda *_: None}


def parts_against_head(bundle, head_file, condition_file, state_file):
    """Max |state(x, condition(t, z)) - head(x, t, z)| on 6 rows, the condition part run on them
    stacked after 10 other rows."""
    session = lambda f: ort.InferenceSession(os.path.join(bundle, f), providers=["CPUExecutionProvider"])
    head, condition, state = session(head_file), session(condition_file), session(state_file)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    t = rng.integers(0, 1000, 16).astype(np.int64)
    z = rng.standard_normal((16, 32)).astype(np.float32)
    want = head.run(["out"], {"x": x, "t": t[10:], "z": z[10:]})[0]
    cond = condition.run(["cond"], {"t": t, "z": z})[0]
    check(cond.shape[0] == 16 and cond.ndim == 2, f"cond is [rows, S]: {cond.shape}")
    got = state.run(["out"], {"x": x, "cond": cond[10:]})[0]
    return float(np.abs(got - want).max())


def test_writes_both_parts(tmp):
    bundle = copy_tiny(tmp, "both")
    split_head.add_split(bundle, **QUIET)
    split_head.add_split(bundle, **QUIET)
    text = open(os.path.join(bundle, "manifest.yaml")).read()
    graphs = yaml.safe_load(text)["graphs"]
    check(graphs["diffusion_condition"] == {"file": "diffusion_condition.onnx", "inputs": {"t": "t", "z": "z"},
                                            "outputs": {"cond": "cond"}}, "the condition part's manifest entry")
    check(graphs["diffusion_state"] == {"file": "diffusion_state.onnx", "inputs": {"x": "x", "cond": "cond"},
                                        "outputs": {"out": "out"}}, "the state part's manifest entry")
    check(text.count("  diffusion_condition:") == 1 and text.count("  diffusion_state:") == 1,
          "once each after a second run")
    err = parts_against_head(bundle, "diffusion.onnx", "diffusion_condition.onnx", "diffusion_state.onnx")
    check(err == 0.0, f"the parts give the head's output exactly (max |diff| {err:.3g})")
    check(split_head.check(bundle, **QUIET) == 0.0, "split_head.check agrees")
    return bundle


def test_precision_variants(tmp):
    bundle = copy_tiny(tmp, "int8")
    split_head.add_split(bundle, **QUIET)
    convert_precision.convert(bundle, "int8", **QUIET)
    variant = yaml.safe_load(open(os.path.join(bundle, "manifest.yaml")))["precisions"]["int8"]
    check(variant.get("diffusion_condition") == "diffusion_condition.int8.onnx"
          and variant.get("diffusion_state") == "diffusion_state.int8.onnx", f"precisions.int8 lists both parts: {variant}")
    # Stacked rows change a per-tensor activation scale: close, not exact.
    err = parts_against_head(bundle, variant["diffusion"], variant["diffusion_condition"], variant["diffusion_state"])
    check(err < 0.05, f"the int8 parts give the int8 head's output (max |diff| {err:.3g})")


def refused(bundle, edit, want):
    """Edits the tiny head with `edit(graph)`, then checks that splitting it fails with `want` in
    the message and writes nothing."""
    path = os.path.join(bundle, "diffusion.onnx")
    model = onnx.load(path)
    edit(model.graph)
    onnx.save(model, path)
    before = sorted(os.listdir(bundle)), open(os.path.join(bundle, "manifest.yaml")).read()
    try:
        split_head.add_split(bundle, **QUIET)
    except split_head.SplitError as e:
        check(want in str(e) and "diffusion.onnx" in str(e), f"refused, naming the graph: {e}")
    else:
        check(False, f"a head that does not split is refused ({want})")
    after = sorted(os.listdir(bundle)), open(os.path.join(bundle, "manifest.yaml")).read()
    check(before == after, "nothing written")


def test_heads_that_do_not_split(tmp):
    def reads_t(g):
        # out = float(int(out') + t): a node reading x's descendants reads t itself.
        old = g.output[0].name
        for n in g.node:
            n.output[:] = [v if v != old else "out_inner" for v in n.output]
        g.node.extend([helper.make_node("Cast", ["out_inner"], ["out_int"], to=TensorProto.INT64),
                       helper.make_node("Unsqueeze", ["t", "axis1"], ["t_col"]),
                       helper.make_node("Add", ["out_int", "t_col"], ["out_shifted"]),
                       helper.make_node("Cast", ["out_shifted"], [old], to=TensorProto.FLOAT)])
        g.initializer.append(helper.make_tensor("axis1", TensorProto.INT64, [1], [1]))

    refused(copy_tiny(tmp, "reads-t"), reads_t, "crosses the cut as int64, not float32")

    def whole_batch(g):
        # a (t, z)-only tensor reduced over the rows, then read with x: not per row.
        x = g.input[0].name
        for n in g.node:
            n.input[:] = [v if v != x else "x_shifted" for v in n.input]
        g.node.insert(0, helper.make_node("ReduceMean", ["z"], ["z_mean"], axes=[0, 1], keepdims=0))
        g.node.insert(1, helper.make_node("Add", [x, "z_mean"], ["x_shifted"]))

    refused(copy_tiny(tmp, "whole-batch"), whole_batch, "does not split by rows")


def test_command_line(tmp):
    bundle = copy_tiny(tmp, "cli")
    root = os.path.dirname(MODELS)
    r = subprocess.run([sys.executable, "models/split_head.py", bundle, "--check"], cwd=root,
                       capture_output=True, text=True)
    check(r.returncode == 0 and "cut in two" in r.stdout, f"the command line with --check: {r.stderr[-300:]}")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        test_writes_both_parts(tmp)
        test_precision_variants(tmp)
        test_heads_that_do_not_split(tmp)
        test_command_line(tmp)
    print("all split_head tests passed")


if __name__ == "__main__":
    main()

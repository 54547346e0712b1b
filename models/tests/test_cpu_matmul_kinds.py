#!/usr/bin/env python3
"""Tests of benches/cpu_matmul_kinds.py (plain script: run it, it exits non-zero on the first
failure).

  .venv/bin/python models/tests/test_cpu_matmul_kinds.py     # ~5 s, needs models/fixtures/requirements.txt

1. Each kind's graph of the tiny head is what it says: the weight-only kinds hold MatMulNBits
   nodes of their bits and accuracy level and keep the token projections as float MatMuls; int8
   has no float MatMul with a constant weight but the token projections; fp32 is the graph itself.
2. The command line on the tiny bundle (head, then decoder) prints a table row for every kind
   with a time, fp32's error 0 and every other kind's error above 0 and finite.
3. A bundle without the asked-for graph is refused naming its manifest and the graph.
"""

import os
import re
import subprocess
import sys

import onnx
from onnx import helper, numpy_helper

MODELS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(MODELS)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_copies import TINY, check  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "benches"))
import cpu_matmul_kinds as kinds  # noqa: E402

TOKEN_DIM = 4  # the tiny bundle's token_dim


def float_matmul_weights(model):
    """Shapes of the constant weights of the float MatMuls of `model`."""
    inits = {i.name: i for i in model.graph.initializer}
    return [list(inits[n.input[1]].dims) for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def test_variants():
    head = onnx.load(os.path.join(TINY, "diffusion.onnx"))
    check(kinds.variant(head, "fp32", TOKEN_DIM) is head, "fp32 is the bundle's graph")
    for kind, bits, level in (("nbits8", 8, 0), ("nbits8-int8", 8, 4), ("nbits4", 4, 0), ("nbits4-int8", 4, 4)):
        model = kinds.variant(onnx.load(os.path.join(TINY, "diffusion.onnx")), kind, TOKEN_DIM)
        nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
        check(len(nodes) > 0 and all(a["bits"] == bits and a.get("accuracy_level", 0) == level for a in attrs),
              f"{kind}: {len(nodes)} MatMulNBits nodes of {bits} bits, accuracy level {level}")
        kept = float_matmul_weights(model)
        check(kept and all(min(shape) <= 2 * TOKEN_DIM for shape in kept),
              f"{kind}: only the token projections stay float MatMuls ({kept})")
    int8 = kinds.variant(onnx.load(os.path.join(TINY, "diffusion.onnx")), "int8", TOKEN_DIM)
    kept = float_matmul_weights(int8)
    check(kept and all(min(shape) <= 2 * TOKEN_DIM for shape in kept), f"int8: token projections stay float ({kept})")
    check(any(n.op_type in ("DynamicQuantizeMatMul", "MatMulInteger") for n in int8.graph.node),
          "int8 holds dynamically quantized MatMuls")
    fp16 = kinds.variant(onnx.load(os.path.join(TINY, "diffusion.onnx")), "fp16", TOKEN_DIM)
    halves = [i for i in fp16.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    check(halves and numpy_helper.to_array(halves[0]).dtype.name == "float16", "fp16 stores weights in half")


def run(*args):
    return subprocess.run([sys.executable, "benches/cpu_matmul_kinds.py", *args], cwd=ROOT,
                          capture_output=True, text=True)


def test_command_line():
    for graph in (["--graph", "diffusion", "--rows", "6"], ["--graph", "decoder", "--rows", "2", "--known", "5"]):
        r = run(TINY, "--reps", "1", *graph)
        check(r.returncode == 0, f"{graph[1]}: exit 0 ({r.stderr[-400:]})")
        rows = {m.group(1): m.groups()[1:] for m in
                re.finditer(r"^\| (\S+) \| ([0-9.]+) \| ([0-9.]+)× \| ([0-9.e+-]+) \|$", r.stdout, re.M)}
        check(set(rows) == set(kinds.KINDS), f"{graph[1]}: a timed row for every kind ({sorted(rows)})")
        check(float(rows["fp32"][2]) == 0.0, f"{graph[1]}: fp32's error is 0")
        errors = {k: float(v[2]) for k, v in rows.items() if k != "fp32"}
        check(all(0 < e < 1 for e in errors.values()), f"{graph[1]}: every other kind differs a little ({errors})")


def test_missing_graph():
    r = run(os.path.join(TINY, "golden"), "--reps", "1")
    check(r.returncode != 0 and "manifest.yaml" in r.stderr and "graphs.diffusion" in r.stderr,
          f"a folder without the graph is refused naming the manifest and graph ({r.stderr.strip()[-200:]})")


def main():
    test_variants()
    test_command_line()
    test_missing_graph()
    print("all passed")


if __name__ == "__main__":
    main()

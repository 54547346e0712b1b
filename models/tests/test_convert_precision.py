#!/usr/bin/env python3
"""Tests of convert_precision.py (plain script: run it, it exits non-zero on the first failure).

  .venv/bin/python models/tests/test_convert_precision.py        # ~15 s, needs models/fixtures/requirements.txt

On temporary copies of models/fixtures/tiny:
1. fp16 through the command line: four variants, inputs/outputs unchanged (names, float32),
   half precision only in MatMul/Gemm/Conv and the elementwise ops autocast keeps in fp16 after
   them (a bias Add in fp16, the residual Add in float32, no op with a float32 tensor constant in
   fp16), values only moved between half ops kept half, norms and Softmax fed float32, errors
   against fp32 small; the manifest keeps every byte before the appended `precisions` section;
   converting again replaces the entry instead of adding a second.
2. int8: MatMulInteger nodes, the VAE (no weight MatMul) is not written nor listed; activations
   per tensor by default, per row when asked (then a row's result does not depend on the others).
3. bf16: ONNX Runtime's CPU provider refuses the real graph; the emulation runs and errs more
   than fp16.
4. The manifest rewrite keeps comments and keys after the section; Gemm → MatMul + Add is exact
   for alpha, beta and transB.
5. A bundle whose graphs lie outside its folder (fixtures/tiny-sampler) gets its variants inside
   it, and its sampler and tick graphs rebuilt around the variant head (nothing in the fp16 tick
   graph stops a CUDA graph capture).
6. A variant far from float32 on the check's inputs is refused before it replaces anything; a
   graph failing its check after another passed leaves every variant (the backbone's too) as it
   was, and no temporary folder.
7. Graphs through a subfolder that is a link leading out are outside the bundle: nothing is written
   there (convert_precision, fuse_attention); graphs from different folders with one name get
   distinct variants.
8. fp16 and bf16 on a split head: both parts converted and listed.
9. Errors (a missing folder, malformed YAML, a graph without `file`, a truncated, non-ONNX or
   missing graph file, a --report path that cannot be written or that lies in the bundle or on a
   graph it lists) exit 2 with one line naming the input, in every tool, and change nothing.
10. bench_precision.py copies what the manifest names (graphs outside by absolute path) and never
    touches what --work held; it refuses a --json in the bundle and external data leading out.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import yaml
from onnx import TensorProto, helper, numpy_helper

MODELS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, MODELS)
import add_sampler  # noqa: E402
import convert_precision as cp  # noqa: E402
import cuda_capture  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_copies import TINY, check, copy_tiny  # noqa: E402


# What autocast runs in fp16: its fp16 ops, the elementwise ops its type promotion keeps in half
# after them, and the ops that only move values (written out here rather than taken from the
# module under test).
MOVES = {"Reshape", "Transpose", "Split", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Gather",
         "Expand", "Concat"}
AUTOCAST_HALF = {"MatMul", "Gemm", "Conv", "Cast", "MultiHeadAttention", "Add", "Sub", "Mul", "Div", "Erf",
                 "Tanh", "Sigmoid", "Relu"} | MOVES


def io_signature(model):
    g = model.graph
    sig = lambda vs: [(v.name, v.type.tensor_type.elem_type) for v in vs]  # noqa: E731
    return sig(g.input), sig(g.output)


def elem_types(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def test_fp16(tmp):
    bundle = copy_tiny(tmp, "fp16")
    before = open(os.path.join(bundle, "manifest.yaml")).read()
    p = subprocess.run([sys.executable, os.path.join(MODELS, "convert_precision.py"), bundle, "--precision", "fp16",
                        "--report", os.path.join(tmp, "fp16.json")], capture_output=True, text=True)
    check(p.returncode == 0, f"fp16 conversion runs ({p.stderr.strip()[-300:]})")
    after = open(os.path.join(bundle, "manifest.yaml")).read()
    check(after.startswith(before), "the manifest is kept as written, the section appended")
    m = yaml.safe_load(after)
    check(sorted(m["precisions"]["fp16"]) == ["decoder", "diffusion", "encoder", "vae_decoder"], "all four roles listed")
    for role, entry in m["graphs"].items():
        base = onnx.load(os.path.join(bundle, entry["file"]))
        var = onnx.load(os.path.join(bundle, m["precisions"]["fp16"][role]))
        check(io_signature(base) == io_signature(var), f"{role}: inputs and outputs unchanged")
        types = elem_types(var)
        inits = {i.name: i for i in var.graph.initializer}
        made_by = {y: n for n in var.graph.node for y in n.output}
        for node in var.graph.node:
            half_in = [x for x in node.input if types.get(x) == TensorProto.FLOAT16]
            if node.op_type in ("LayerNormalization", "Softmax", "InstanceNormalization", "ReduceMean", "Pow"):
                if half_in:
                    raise SystemExit(f"FAIL: {role}: {node.op_type} reads fp16 {half_in}")
            elif half_in and node.op_type not in AUTOCAST_HALF:
                raise SystemExit(f"FAIL: {role}: {node.op_type} computes in fp16")
            # An op with a float32 tensor constant that is neither a 0-d number nor a 1-D bias
            # (a position embedding, a [1] tensor) computes in float32, as autocast promotes it.
            for x in node.input:
                t = inits.get(x)
                if t is not None and t.data_type == TensorProto.FLOAT and len(t.dims) >= 2 and half_in:
                    raise SystemExit(f"FAIL: {role}: {node.op_type} reads fp16 with the float32 tensor {x}")
            # Values only moved (split, reshaped, transposed) after half ops stay half: no such op
            # reads only half values cast to float32 (its data input; all inputs of a Concat).
            if node.op_type in MOVES:
                data = [x for x in (node.input if node.op_type == "Concat" else node.input[:1]) if x]

                def cast_from_half(x):
                    src = made_by.get(x)
                    return src is not None and src.op_type == "Cast" and types.get(src.input[0]) == TensorProto.FLOAT16

                if data and all(cast_from_half(x) for x in data):
                    raise SystemExit(f"FAIL: {role}: {node.op_type} reads only half values cast to float32 {data}")
        check(any(types.get(x) == TensorProto.FLOAT16 for n in var.graph.node if n.op_type in ("MatMul", "Conv") for x in n.input),
              f"{role}: MatMul/Conv run in fp16")
        if role in ("encoder", "decoder"):
            adds = [n for n in var.graph.node if n.op_type == "Add"]
            inits = {i.name for i in var.graph.initializer}
            check(any(all(types.get(x) == TensorProto.FLOAT16 for x in n.input) for n in adds)
                  and any(all(types.get(x) == TensorProto.FLOAT and x not in inits for x in n.input) for n in adds),
                  f"{role}: a Linear's bias Add runs in fp16, the residual Add in float32")
    import json
    report = json.load(open(os.path.join(tmp, "fp16.json")))
    for role, g in report["graphs"].items():
        e = g["error_vs_fp32"]
        check(0 < e["max_abs"] < 5e-3 and e["mean_abs"] < 5e-4, f"{role}: fp16 error {e['max_abs']:.2g} / {e['mean_abs']:.2g}")
    cp.convert(bundle, "fp16", check=False, log=lambda *_: None)
    again = open(os.path.join(bundle, "manifest.yaml")).read()
    check(again == after, "converting again replaces the entry (same manifest)")


def test_int8(tmp):
    bundle = copy_tiny(tmp, "int8")
    report = cp.convert(bundle, "int8", log=lambda *_: None)
    check("vae_decoder" not in report["files"], "int8: the VAE (Conv only) is not written")
    check(not os.path.exists(os.path.join(bundle, "vae_decoder.int8.onnx")), "int8: no VAE file")
    m = yaml.safe_load(open(os.path.join(bundle, "manifest.yaml")))
    check(sorted(m["precisions"]["int8"]) == ["decoder", "diffusion", "encoder"], "int8: three roles listed")
    # The token projections (a weight dimension of at most 2 * token_dim: the encoder's 4 -> 32,
    # the head's 4 -> 64 and 64 -> 8) stay float32; every other weight MatMul is quantized, and
    # --quantize-token-projections quantizes those too.
    def weight_matmuls(path):
        g = onnx.load(path).graph
        inits = {i.name: list(i.dims) for i in g.initializer}
        return (sum(n.op_type == "MatMulInteger" for n in g.node),
                sorted(inits[n.input[1]] for n in g.node if n.op_type == "MatMul" and n.input[1] in inits))
    check(weight_matmuls(os.path.join(bundle, "encoder.int8.onnx")) == (4, [[4, 32]]),
          "int8: 4 of the encoder's 5 weight MatMuls are quantized, its token projection is not")
    check(weight_matmuls(os.path.join(bundle, "diffusion.int8.onnx")) == (10, [[4, 64], [64, 8]]),
          "int8: 10 of the head's 12 weight MatMuls are quantized, its two token projections are not")
    check(report["graphs"]["diffusion"]["stats"]["kept_float32"] and report["graphs"]["decoder"]["stats"]["kept_float32"] == [],
          "int8: the report names the MatMuls kept in float32")
    every = copy_tiny(tmp, "int8-every")
    cp.convert(every, "int8", quantize_token_projections=True, check=False, log=lambda *_: None)
    check(weight_matmuls(os.path.join(every, "encoder.int8.onnx")) == (5, [])
          and weight_matmuls(os.path.join(every, "diffusion.int8.onnx")) == (12, []),
          "int8 with quantize_token_projections: every weight MatMul is quantized")
    for role, g in report["graphs"].items():
        if g["file"]:
            check(g["error_vs_fp32"]["max_abs"] < 0.2, f"{role}: int8 error {g['error_vs_fp32']['max_abs']:.2g}")
    check(report["graphs"]["diffusion"]["stats"]["activations"] == "per tensor", "int8: activations per tensor by default")

    # With per-row activations (--per-row-activations) a row's result does not depend on the other
    # rows of the call (an image on its batch): the head gives each row alone what it gives it
    # among others; with quantize_dynamic's one scale per tensor (the default) it does not.
    per_row = copy_tiny(tmp, "int8-per-row")
    cp.convert(per_row, "int8", per_row=True, log=lambda *_: None)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    x[5] *= 50  # one row of large values: with one scale per tensor, it coarsens the others' steps
    width = yaml.safe_load(open(os.path.join(bundle, "manifest.yaml")))["width"]
    feeds = {"x": x, "t": rng.integers(0, 1000, 8).astype(np.int64),
             "z": rng.standard_normal((8, width)).astype(np.float32)}
    for folder, rows in ((per_row, True), (bundle, False)):
        session = ort.InferenceSession(os.path.join(folder, "diffusion.int8.onnx"), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        together = session.run(None, {n: feeds[n] for n in names})[0]
        alone = np.concatenate([session.run(None, {n: feeds[n][k:k + 1] for n in names})[0] for k in range(8)])
        same = np.array_equal(together, alone)
        check(same == rows, f"int8, activations per {'row' if rows else 'tensor'}: rows alone "
              f"{'equal' if same else 'differ from'} rows together (max {np.abs(together - alone).max():.2g})")
    ops = {n.op_type for n in onnx.load(os.path.join(per_row, "diffusion.int8.onnx")).graph.node}
    check("DynamicQuantizeLinear" not in ops and "QuantizeLinear" in ops,
          "--per-row-activations replaces quantize_dynamic's DynamicQuantizeLinear")


def test_bf16(tmp):
    bundle = copy_tiny(tmp, "bf16")
    report = cp.convert(bundle, "bf16", log=lambda *_: None)
    try:
        ort.InferenceSession(os.path.join(bundle, "encoder.bf16.onnx"), providers=["CPUExecutionProvider"])
        refused = False
    except Exception as e:  # noqa: BLE001
        refused = "NOT_IMPLEMENTED" in str(e) or "implementation" in str(e)
    check(refused, "bf16: the CPU provider has no bf16 MatMul (session creation fails)")
    e = report["graphs"]["encoder"]["error_vs_fp32"]
    check(e["emulated"] and 1e-3 < e["max_abs"] < 0.1, f"bf16: emulated check runs, error {e['max_abs']:.2g}")
    check(report["graphs"]["vae_decoder"]["file"] is None, "bf16: opset-17 Conv stays fp32, so the VAE is not written")
    var = onnx.load(os.path.join(bundle, "encoder.bf16.onnx"))
    types = elem_types(var)
    moved = [n.op_type for n in var.graph.node if n.op_type in MOVES and types.get(n.input[0]) == TensorProto.BFLOAT16]
    check("Reshape" in moved and "Transpose" in moved, f"bf16: values only moved stay bf16 ({sorted(set(moved))})")
    follow = [n.op_type for n in var.graph.node if n.op_type not in MOVES | {"MatMul", "Gemm", "Cast"}
              and any(types.get(x) == TensorProto.BFLOAT16 for x in n.input)]
    check(not follow, f"bf16: no elementwise op computes in bf16 ({follow})")
    emu = copy_tiny(tmp, "bf16-emulated")
    cp.convert(emu, "bf16", emulate=True, check=False, log=lambda *_: None)
    s = ort.InferenceSession(os.path.join(emu, "encoder.bf16.onnx"), providers=["CPUExecutionProvider"])
    check(len(s.get_inputs()) == 3, "bf16 --emulate: runs on the CPU provider")


def test_manifest_rewrite():
    text = "format: x  # comment\ngraphs: {}\nprecisions:   # old\n  int8: { encoder: e.int8.onnx }\n\n# a comment\nevaluator:\n  name: n\n"
    out = cp.manifest_with_precisions(text, "fp16", {"encoder": "e.fp16.onnx"})
    m = yaml.safe_load(out)
    check(m["precisions"] == {"fp16": {"encoder": "e.fp16.onnx"}, "int8": {"encoder": "e.int8.onnx"}}, "rewrite merges entries")
    check(out.startswith("format: x  # comment\ngraphs: {}\n") and out.endswith("\n\n# a comment\nevaluator:\n  name: n\n"),
          "rewrite keeps the rest, the comment and blank line after the section too")
    out = cp.manifest_with_precisions(out, "fp16", {})
    check(yaml.safe_load(out)["precisions"] == {"int8": {"encoder": "e.int8.onnx"}}, "an empty variant removes its entry")
    out = cp.manifest_with_precisions(out, "int8", {})
    check("precisions" not in yaml.safe_load(out), "the last entry removes the section")


def test_gemm_rewrite():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    c = rng.standard_normal(5).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "c"], ["y"], alpha=0.5, beta=2.0, transB=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    x = rng.standard_normal((4, 3)).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    r, n = cp.gemm_to_matmul(m)
    check(n == 1 and [k.op_type for k in r.graph.node] == ["MatMul", "Add"], "Gemm becomes MatMul + Add")
    got = ort.InferenceSession(r.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    check(np.abs(got - want).max() < 1e-5, "Gemm rewrite is exact")


def test_sampler_and_outside_files(tmp):
    # The tiny-sampler fixture: tiny's graphs by relative paths outside the folder, plus a
    # sampler and a tick graph. Variants go into the bundle (never beside the shared fp32 files),
    # and the sampler and tick graphs are rebuilt around the variant head (models/add_sampler.py).
    bundle = os.path.join(tmp, "with-sampler")
    os.makedirs(bundle)
    src = os.path.join(MODELS, "fixtures", "tiny-sampler")
    for name in ("manifest.yaml", "sampler.onnx", "tick.onnx"):
        shutil.copyfile(os.path.join(src, name), os.path.join(bundle, name))
    path = os.path.join(bundle, "manifest.yaml")
    text = open(path).read().replace("../tiny/", os.path.relpath(TINY, bundle) + "/")
    open(path, "w").write(text)
    before = set(os.listdir(TINY))
    lines = []
    report = cp.convert(bundle, "fp16", check=False, log=lines.append)
    check(set(os.listdir(TINY)) == before, "nothing is written beside graphs outside the bundle")
    check(report["files"]["encoder"] == "encoder.fp16.onnx"
          and os.path.isfile(os.path.join(bundle, "encoder.fp16.onnx")), "variants of outside graphs go into the bundle")
    check(report["files"].get("sampler") == "sampler.fp16.onnx", "the sampler is rebuilt around the fp16 head")
    s = ort.InferenceSession(os.path.join(bundle, "sampler.fp16.onnx"), providers=["CPUExecutionProvider"])
    check([i.name for i in s.get_inputs()][:2] == ["x", "z"], "the fp16 sampler loads")
    check(report["files"].get("tick") == "tick.fp16.onnx", "the tick graph is rebuilt around the fp16 head")
    s = ort.InferenceSession(os.path.join(bundle, "tick.fp16.onnx"), providers=["CPUExecutionProvider"])
    check([i.name for i in s.get_inputs()][:2] == ["x", "k"], "the fp16 tick graph loads")
    check(cuda_capture.capture_blockers(onnx.load(os.path.join(bundle, "tick.fp16.onnx"))) == []
          and not any(line.startswith("note:") for line in lines),
          "nothing in the fp16 tick graph stops a CUDA graph capture")
    # Around the fp16 head, not the fp32 one: they hold its fp16 weights, and they tick as the
    # fp16 head ticked in NumPy does (add_sampler.check on a view of the bundle whose head,
    # sampler and tick graphs are the fp16 ones).
    for name in ("sampler.fp16.onnx", "tick.fp16.onnx"):
        g = onnx.load(os.path.join(bundle, name))
        halves = [i for i in g.graph.initializer if i.data_type == TensorProto.FLOAT16]
        halves += [i for n in g.graph.node if n.op_type == "Loop" for a in n.attribute
                   for i in a.g.initializer if i.data_type == TensorProto.FLOAT16]
        check(len(halves) > 0, f"{name} holds the fp16 head's weights")
    view = os.path.join(tmp, "with-sampler-fp16-view")
    os.makedirs(view)
    manifest = yaml.safe_load(open(path))
    manifest["graphs"]["diffusion"]["file"] = os.path.join(bundle, "diffusion.fp16.onnx")
    yaml.safe_dump(manifest, open(os.path.join(view, "manifest.yaml"), "w"))
    for name in ("sampler", "tick"):
        shutil.copyfile(os.path.join(bundle, f"{name}.fp16.onnx"), os.path.join(view, f"{name}.onnx"))
    err = add_sampler.check(view, log=lambda *_: None)
    # (The fp32 graphs against the fp16 head are 8e-4 off; these are float rounding off.)
    check(err < 1e-5, f"the fp16 sampler and tick graphs tick as the fp16 head does ({err:.2g})")


def test_a_variant_off_by_too_much_is_refused(tmp):
    """A conversion whose graph is far from float32 on the check's inputs (here: weights too
    large for fp16, clipped) is refused before it replaces anything; the manifest is kept."""
    bundle = copy_tiny(tmp, "off")
    path = os.path.join(bundle, "encoder.onnx")
    m = onnx.load(path)
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        if init.data_type == TensorProto.FLOAT and a.ndim == 2:
            init.CopyFrom(numpy_helper.from_array((a * 1e6).astype(np.float32), init.name))
    onnx.save(m, path)
    before = open(os.path.join(bundle, "manifest.yaml")).read()
    try:
        cp.convert(bundle, "fp16", log=lambda *_: None)
        raise SystemExit("FAIL: a variant far from float32 was accepted")
    except cp.ConversionError as e:
        check("encoder" in str(e) and "--tolerance" in str(e), f"refused, naming the graph: {str(e)[:120]}")
    check(not os.path.exists(os.path.join(bundle, "encoder.fp16.onnx")), "the refused graph is not written")
    check(open(os.path.join(bundle, "manifest.yaml")).read() == before, "the manifest is unchanged")


def snapshot(folder):
    """Every file under `folder` (hidden ones included) with its bytes."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(root, n)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def run_tool(*argv):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True)


def test_failed_check_replaces_no_variant(tmp):
    """A bundle with fp16 variants and a backbone: a conversion whose decoder fails the check
    (the encoder, checked first, passes) leaves every file as it was, the encoder's variant and
    the backbone's included, and no temporary folder."""
    from models.add_backbone import add_backbone

    bundle = copy_tiny(tmp, "failed-later")
    add_backbone(bundle, log=lambda *_: None)
    cp.convert(bundle, "fp16", check=False, log=lambda *_: None)
    # The encoder changed a little since (its variant would change), the decoder far beyond fp16.
    for role, scale in (("encoder", 1.01), ("decoder", 1e6)):
        path = os.path.join(bundle, f"{role}.onnx")
        m = onnx.load(path)
        for init in m.graph.initializer:
            a = numpy_helper.to_array(init)
            if init.data_type == TensorProto.FLOAT and a.ndim == 2:
                init.CopyFrom(numpy_helper.from_array((a * scale).astype(np.float32), init.name))
        onnx.save(m, path)
    before = snapshot(bundle)
    p = run_tool(os.path.join(MODELS, "convert_precision.py"), bundle, "--precision", "fp16")
    check(p.returncode == 2 and "decoder" in p.stderr and "Traceback" not in p.stderr,
          f"the decoder's failed check: exit 2 naming it ({p.stderr.strip()[-160:]})")
    check(snapshot(bundle) == before, "… and no file changed, encoder.fp16.onnx and backbone.fp16.onnx included, "
          "no temporary folder left")


def test_symlinked_folder_and_shared_names(tmp):
    """Graphs reached through a subfolder that is a link leading out of the bundle are outside it:
    nothing is written there (convert_precision, fuse_attention). Graphs from different folders
    with one name get distinct variants."""
    from models import fuse_attention

    outside = copy_tiny(tmp, "outside")
    bundle = os.path.join(tmp, "linked")
    os.makedirs(bundle)
    os.symlink(outside, os.path.join(bundle, "shared"))
    text = open(os.path.join(TINY, "manifest.yaml")).read()
    for role in ("encoder", "decoder", "diffusion", "vae_decoder"):
        text = text.replace(f"file: {role}.onnx", f"file: shared/{role}.onnx")
    open(os.path.join(bundle, "manifest.yaml"), "w").write(text)
    before = snapshot(outside)
    report = cp.convert(bundle, "int8", log=lambda *_: None)
    check(snapshot(outside) == before, "int8: nothing is written into the folder the link leads to")
    check(report["files"]["encoder"] == "encoder.int8.onnx" and os.path.isfile(os.path.join(bundle, "encoder.int8.onnx")),
          f"… the variants go into the bundle folder ({report['files']})")
    fuse_attention.fuse_bundle(bundle, log=lambda *_: None)
    check(snapshot(outside) == before, "fuse_attention: the graphs the link leads to are not replaced")
    m = yaml.safe_load(open(os.path.join(bundle, "manifest.yaml")))
    check(m["graphs"]["encoder"]["file"] == "encoder.onnx" and os.path.isfile(os.path.join(bundle, "encoder.onnx")),
          "… the fused graphs go into the bundle, the manifest points to them")

    # ../enc/model.onnx, ../dec/model.onnx, ../dif/model.onnx: three variants, not one file.
    bundle = os.path.join(tmp, "same-names", "b")
    os.makedirs(bundle)
    text = open(os.path.join(TINY, "manifest.yaml")).read()
    for role, folder in (("encoder", "enc"), ("decoder", "dec"), ("diffusion", "dif")):
        os.makedirs(os.path.join(tmp, "same-names", folder))
        shutil.copyfile(os.path.join(TINY, f"{role}.onnx"), os.path.join(tmp, "same-names", folder, "model.onnx"))
        text = text.replace(f"file: {role}.onnx", f"file: ../{folder}/model.onnx")
    text = text.replace("file: vae_decoder.onnx", f"file: {os.path.join(TINY, 'vae_decoder.onnx')}")
    open(os.path.join(bundle, "manifest.yaml"), "w").write(text)
    files = cp.convert(bundle, "int8", log=lambda *_: None)["files"]
    check(len(set(files.values())) == 3 and all(os.path.isfile(os.path.join(bundle, f)) for f in files.values()),
          f"three graphs named model.onnx get three distinct variants ({files})")
    for role, file in files.items():
        inputs = {i.name for i in onnx.load(os.path.join(bundle, file)).graph.input}
        want = {i.name for i in onnx.load(os.path.join(TINY, f"{role}.onnx")).graph.input}
        check(inputs == want, f"{role}: {file} is the {role}'s variant")


def test_split_head_in_half(tmp):
    """fp16 and bf16 on a bundle with a split head: both parts converted and listed, and the fp16
    parts give the fp32 head's output closely."""
    from models import split_head

    bundle = copy_tiny(tmp, "split-half")
    split_head.add_split(bundle, log=lambda *_: None)
    for precision in ("fp16", "bf16"):
        p = run_tool(os.path.join(MODELS, "convert_precision.py"), bundle, "--precision", precision)
        check(p.returncode == 0, f"{precision} on a split head: exit 0 ({p.stderr.strip()[-200:]})")
        files = yaml.safe_load(open(os.path.join(bundle, "manifest.yaml")))["precisions"][precision]
        check(files.get("diffusion_condition") == f"diffusion_condition.{precision}.onnx"
              and files.get("diffusion_state") == f"diffusion_state.{precision}.onnx",
              f"{precision}: both parts listed ({files})")
    run = lambda f: ort.InferenceSession(os.path.join(bundle, f), providers=["CPUExecutionProvider"])  # noqa: E731
    rng = np.random.default_rng(0)
    x, t, z = (rng.standard_normal((9, 4)).astype(np.float32), rng.integers(0, 1000, 9).astype(np.int64),
               rng.standard_normal((9, 32)).astype(np.float32))
    want = run("diffusion.onnx").run(None, {"x": x, "t": t, "z": z})[0]
    cond = run("diffusion_condition.fp16.onnx").run(None, {"t": t, "z": z})[0]
    got = run("diffusion_state.fp16.onnx").run(None, {"x": x, "cond": cond})[0]
    check(np.abs(got - want).max() < 5e-3, f"the fp16 parts give the head's output ({np.abs(got - want).max():.2g})")


def test_errors_name_the_input(tmp):
    """Exit 2 and one line naming the input, no traceback, nothing changed."""
    script = os.path.join(MODELS, "convert_precision.py")
    tools = [(script, "--precision", "int8")] + [(os.path.join(MODELS, f),) for f in
                                                 ("fuse_attention.py", "add_sampler.py", "add_backbone.py",
                                                  "split_head.py")]

    def refused(bundle, want, what):
        before = snapshot(bundle) if os.path.isdir(bundle) else None
        for tool in tools:
            p = run_tool(tool[0], bundle, *tool[1:])
            lines = p.stderr.strip().splitlines()
            check(p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and want in lines[0],
                  f"{os.path.basename(tool[0])}, {what}: exit 2, one line ({p.returncode}: {p.stderr.strip()[-200:]})")
            check(before is None or snapshot(bundle) == before, "… nothing changed")

    refused(os.path.join(tmp, "no-such-bundle"), "no such folder", "a missing folder")
    bundle = copy_tiny(tmp, "bad-yaml")
    with open(os.path.join(bundle, "manifest.yaml"), "a") as f:
        f.write("graphs: [unclosed\n")
    refused(bundle, "not valid YAML", "malformed YAML")
    bundle = copy_tiny(tmp, "no-file")
    path = os.path.join(bundle, "manifest.yaml")
    text = re.sub(r"file: encoder\.onnx,\s*", "", open(path).read())
    open(path, "w").write(text)
    refused(bundle, "graphs.encoder has no `file`", "a graph entry without `file`")
    # Content the tools read, valid YAML but not a bundle's (every tool used to fail with a
    # traceback, add_sampler.py with `precisions: [1, 2]` after its commit).
    for name, edit, want in (
            ("precisions-list", lambda m: m.update(precisions=[1, 2]), "`precisions` is [1, 2]"),
            ("precision-files", lambda m: m.update(precisions={"int8": {"encoder": 5}}), "`precisions.int8`"),
            ("no-token-dim", lambda m: m.pop("token_dim"), "`token_dim` is missing"),
            ("no-variance", lambda m: m["diffusion"].pop("variance"), "`diffusion.variance` is missing"),
            ("no-grid", lambda m: m.pop("grid"), "`grid` is missing"),
            ("classes", lambda m: m.update(classes="ten"), "`classes` is 'ten'"),
            ("no-buffer", lambda m: m.pop("buffer"), "`buffer` is missing"),
            ("latent-scale", lambda m: m.update(latent_scale=0), "`latent_scale` is 0"),
            ("no-encoder", lambda m: m["graphs"].pop("encoder"), "no `graphs.encoder` entry"),
            ("no-x", lambda m: m["graphs"]["diffusion"]["inputs"].pop("x"), "`graphs.diffusion.inputs`")):
        bundle = copy_tiny(tmp, name)
        path = os.path.join(bundle, "manifest.yaml")
        m = yaml.safe_load(open(path))
        edit(m)
        open(path, "w").write(yaml.safe_dump(m))
        refused(bundle, want, name)
    bundle = copy_tiny(tmp, "key-twice")
    path = os.path.join(bundle, "manifest.yaml")
    text = open(path).read()
    open(path, "w").write(text.replace("  vae_decoder:", "  diffusion: { file: decoder.onnx }\n  vae_decoder:", 1))
    refused(bundle, "`diffusion` is given twice in one mapping", "a graph given twice")
    # A tensor the manifest names that the graph does not have.
    for role, side, tensor_role, written, renamed in (
            ("decoder", "outputs", "z", "outputs: { z: z }", "outputs: { z: renamed }"),
            ("encoder", "outputs", "encoded", "outputs: { encoded: encoded }", "outputs: { encoded: renamed }"),
            ("diffusion", "inputs", "x", "inputs: { x: x,", "inputs: { x: renamed,")):
        bundle = copy_tiny(tmp, f"renamed-{role}")
        path = os.path.join(bundle, "manifest.yaml")
        lines = open(path).read().splitlines(keepends=True)
        at = next(i for i, ln in enumerate(lines) if ln.startswith(f"  {role}:"))
        check(written in lines[at], f"(the tiny manifest's {role} entry has `{written}`)")
        lines[at] = lines[at].replace(written, renamed)
        open(path, "w").write("".join(lines))
        want = f"graphs.{role}.{side}.{tensor_role} names `renamed`"
        p = run_tool(*(tools[0] if role != "diffusion" else tools[2][:1]), bundle)
        lines = p.stderr.strip().splitlines()
        check(p.returncode == 2 and len(lines) == 1 and want in lines[0],
              f"{role} {side}: exit 2, one line naming the tensor ({p.returncode}: {p.stderr.strip()[-200:]})")
    for name, content in (("truncated", open(os.path.join(TINY, "encoder.onnx"), "rb").read()[:200]),
                          ("not-onnx", b"hello")):
        bundle = copy_tiny(tmp, name)
        for role in ("encoder", "diffusion"):
            open(os.path.join(bundle, f"{role}.onnx"), "wb").write(content)
        refused(bundle, "is not an ONNX graph", f"a {name} graph file")
    bundle = copy_tiny(tmp, "missing-graph")
    for role in ("encoder", "diffusion"):
        os.remove(os.path.join(bundle, f"{role}.onnx"))
    refused(bundle, "no such file", "a missing graph file")
    bundle = copy_tiny(tmp, "folder-graph")
    for role in ("encoder", "diffusion"):
        os.remove(os.path.join(bundle, f"{role}.onnx"))
        os.makedirs(os.path.join(bundle, f"{role}.onnx"))
    refused(bundle, "a folder, not a graph file", "a graph path that is a folder")
    bundle = copy_tiny(tmp, "fp32-variant")
    with open(os.path.join(bundle, "manifest.yaml"), "a") as f:
        f.write("precisions:\n  fp32: { encoder: encoder.onnx }\n")
    before = snapshot(bundle)
    p = run_tool(os.path.join(MODELS, "fuse_attention.py"), bundle)
    check(p.returncode == 2 and p.stderr.count("\n") == 1 and "precisions.fp32" in p.stderr
          and "ValueError" not in p.stderr and "--precision fp32" not in p.stderr and snapshot(bundle) == before,
          f"fuse_attention.py, precisions.fp32: one line, no invalid command suggested ({p.stderr.strip()[-200:]})")
    bundle = copy_tiny(tmp, "report")
    before = snapshot(bundle)
    p = run_tool(script, bundle, "--precision", "int8", "--report", os.path.join(tmp, "nonexistent", "r.json"))
    check(p.returncode == 2 and "--report" in p.stderr and "Traceback" not in p.stderr,
          f"--report into a missing folder: exit 2 ({p.stderr.strip()[-160:]})")
    check(snapshot(bundle) == before, "… checked before the bundle is changed")
    for what, target in (("a link into a missing folder", os.path.join(tmp, "nonexistent", "r.json")),
                         ("a link to a folder", tmp)):
        link = os.path.join(tmp, "report-link.json")
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(target, link)
        p = run_tool(script, bundle, "--precision", "int8", "--report", link)
        check(p.returncode == 2 and "--report" in p.stderr and snapshot(bundle) == before,
              f"--report through {what}: exit 2, nothing changed ({p.stderr.strip()[-160:]})")
    # --report onto the bundle's own files, or onto a graph it lists from outside: refused before
    # converting, naming the flag (it once overwrote manifest.yaml with JSON, exit 0).
    outside = os.path.join(tmp, "report-outside.onnx")
    shutil.copyfile(os.path.join(bundle, "encoder.onnx"), outside)
    # An evaluator reference kept outside the bundle is read by gtr-run eval: never a report.
    reference = os.path.join(tmp, "report-reference.npz")
    open(reference, "wb").write(b"PK\x05\x06" + bytes(18))
    text = open(os.path.join(bundle, "manifest.yaml")).read()
    evaluator = ("evaluator:\n  name: none\n  file: encoder.onnx\n  inputs: { pixels: pixels }\n"
                 "  outputs: { logits: logits, features: features }\n  reference: ../report-reference.npz\n")
    open(os.path.join(bundle, "manifest.yaml"), "w").write(
        text.replace("file: encoder.onnx", "file: ../report-outside.onnx") + evaluator)
    before, kept, kept_reference = snapshot(bundle), open(outside, "rb").read(), open(reference, "rb").read()
    for what, target in (("the manifest", os.path.join(bundle, "manifest.yaml")),
                         ("a new file in the bundle", os.path.join(bundle, "report.json")),
                         ("a listed graph outside the bundle", outside),
                         ("the evaluator's reference outside the bundle", reference)):
        p = run_tool(script, bundle, "--precision", "int8", "--report", target)
        lines = p.stderr.strip().splitlines()
        check(p.returncode == 2 and len(lines) == 1 and "--report" in lines[0] and snapshot(bundle) == before
              and open(outside, "rb").read() == kept and open(reference, "rb").read() == kept_reference,
              f"--report onto {what}: exit 2, one line naming the flag, nothing changed ({p.stderr.strip()[-160:]})")
    report = os.path.join(tmp, "report-ok.json")
    p = run_tool(script, bundle, "--precision", "int8", "--no-check", "--report", report)
    check(p.returncode == 0 and "int8" in json.load(open(report))["precision"]
          and not [n for n in os.listdir(tmp) if n.startswith(".report-ok.json.")],
          f"--report elsewhere is written whole, no temporary file left ({p.stderr.strip()[-160:]})")
    open(os.path.join(bundle, "manifest.yaml"), "w").write(text)
    before = snapshot(bundle)
    for flags in (["--per-tensor"], ["--per-row-activations"], ["--quantize-token-projections"]):
        p = run_tool(script, bundle, "--precision", "fp16", *flags)
        check(p.returncode == 2 and "apply to int8" in p.stderr and snapshot(bundle) == before,
              f"fp16 with {flags[0]}: refused, nothing changed ({p.stderr.strip()[-160:]})")
    for value in ("nan", "-1", "inf"):
        p = run_tool(script, bundle, "--precision", "int8", "--tolerance", value)
        check(p.returncode == 2 and "argument --tolerance" in p.stderr and snapshot(bundle) == before,
              f"--tolerance {value}: refused, naming the flag ({p.stderr.strip()[-120:]})")
    p = run_tool(script, bundle, "--precision", "int8", "--seed", "-5")
    check(p.returncode == 2 and "--seed" in p.stderr and snapshot(bundle) == before,
          f"a negative --seed: refused ({p.stderr.strip()[-120:]})")


def test_bench_copies_what_the_manifest_names(tmp):
    """bench_precision.py's copy of a bundle whose graphs lie outside its folder runs; its
    --work folder keeps what was there."""
    import bench_precision

    copy = os.path.join(tmp, "bench-copy")
    bench_precision.copy_bundle(os.path.join(MODELS, "fixtures", "tiny-sampler"), copy)
    m = yaml.safe_load(open(os.path.join(copy, "manifest.yaml")))
    check(os.path.isabs(m["graphs"]["encoder"]["file"]) and os.path.isfile(m["graphs"]["encoder"]["file"])
          and os.path.isfile(os.path.join(copy, "sampler.onnx")) and os.path.isfile(os.path.join(copy, "tick.fp16.onnx")),
          "the copy has the bundle's own files and names the outside graphs by absolute path")
    files = cp.convert(copy, "int8", log=lambda *_: None)["files"]
    check(files.get("sampler") == "sampler.int8.onnx" and os.path.isfile(os.path.join(copy, "encoder.int8.onnx")),
          "… and converts")
    work = os.path.join(tmp, "wk")
    os.makedirs(os.path.join(work, "bundle"))
    open(os.path.join(work, "bundle", "notes.txt"), "w").write("x")
    p = run_tool(os.path.join(MODELS, "bench_precision.py"), "--bundle", os.path.join(tmp, "nonexist"), "--work", work)
    check(p.returncode == 2 and "no such folder" in p.stderr and "Traceback" not in p.stderr,
          f"bench_precision.py on a missing bundle: exit 2 ({p.stderr.strip()[-160:]})")
    check(sorted(snapshot(work)) == ["bundle/notes.txt"], "… and --work keeps what was in it")
    source = copy_tiny(tmp, "bench-json")
    before = snapshot(source)
    p = run_tool(os.path.join(MODELS, "bench_precision.py"), "--bundle", source, "--work", work,
                 "--json", os.path.join(source, "manifest.yaml"))
    lines = p.stderr.strip().splitlines()
    check(p.returncode == 2 and len(lines) == 1 and "--json" in lines[0] and snapshot(source) == before
          and sorted(snapshot(work)) == ["bundle/notes.txt"],
          f"bench_precision.py --json into the bundle: exit 2 naming the flag, nothing made ({p.stderr.strip()[-160:]})")
    # A graph whose external data location leads out of the bundle is refused before anything is
    # copied (it was copied to a path outside the copy).
    source = copy_tiny(tmp, "bench-escape")
    victim = os.path.join(tmp, "bench-victim")
    os.makedirs(victim)
    encoder = onnx.load(os.path.join(source, "encoder.onnx"))
    onnx.save(encoder, os.path.join(victim, "encoder.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="enc.data", size_threshold=0)
    escaped = onnx.load(os.path.join(victim, "encoder.onnx"), load_external_data=False)
    for init in escaped.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../bench-victim/enc.data"
    onnx.save(escaped, os.path.join(source, "encoder.onnx"))
    deeper = os.path.join(tmp, "bench-escape-work")
    copy = os.path.join(deeper, "copy")   # the old copy wrote bench-escape-work/bench-victim/enc.data
    try:
        bench_precision.copy_bundle(source, copy)
        error = ""
    except Exception as e:  # noqa: BLE001 - any other outcome fails below
        error = f"{type(e).__name__}: {e}"
    check(error.startswith("BundleError") and "encoder.onnx" in error and "bench-victim/enc.data" in error
          and not os.path.exists(copy) and not os.path.exists(os.path.join(deeper, "bench-victim")),
          f"bench_precision.py: external data outside the bundle is refused, naming the graph and the location, "
          f"nothing copied ({error})")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        test_failed_check_replaces_no_variant(tmp)
        test_symlinked_folder_and_shared_names(tmp)
        test_split_head_in_half(tmp)
        test_errors_name_the_input(tmp)
        test_bench_copies_what_the_manifest_names(tmp)
        test_manifest_rewrite()
        test_gemm_rewrite()
        test_fp16(tmp)
        test_int8(tmp)
        test_bf16(tmp)
        test_sampler_and_outside_files(tmp)
        test_a_variant_off_by_too_much_is_refused(tmp)
    print("all convert_precision tests passed")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Tests of fuse_attention.py (plain script: run it, it exits non-zero on the first failure).

  .venv/bin/python models/tests/test_fuse_attention.py        # ~10 s, needs models/fixtures/requirements.txt

On temporary copies of models/fixtures/tiny:
1. Through the command line: one MultiHeadAttention per graph (4 heads, MAR's scale), no
   Softmax left, the graphs' inputs and outputs unchanged, outputs within 1e-5 of the plain
   graphs'; a second run finds the bundle fused already and exits 0, changing nothing; a graph
   without any attention chain exits 1.
2. An unreadable decoder: exit status 2 and a message naming it, the encoder untouched.
   A chain of another shape (Softmax over another axis) is left as it is, with the reason;
   the scaling written as c · x or x / c fuses with the same scale; mar-tiny's exported graphs
   (q scaled, as export_mar.py writes them) fuse both blocks.
3. fp16 after fusion: the fused node runs in half precision, the projection after it too, and
   ONNX Runtime's CPU provider runs the graph close to fp32; int8 quantizes the weights around it.
4. A bundle with a backbone graph and an fp16 variant: both are rebuilt from the fused graphs.
5. Files are replaced by renaming: a hard link to the old encoder keeps the plain graph.
6. A bundle whose manifest takes its encoder and decoder from another folder (as
   fixtures/tiny-sampler does): the fused graphs are written into the bundle and its manifest
   points to them; the other folder's graphs are left as they were.
7. A decoder whose check fails (onnxruntime cannot run it with the manifest's inputs): exit 2
   with a FuseError, no traceback, and neither graph nor the manifest changed.
8. A qkv projection of rank 2 (a Flatten before its Reshape): the chain is left, with the reason.
9. Variants made with --emulate (fp16), --per-tensor --per-row-activations and
   --quantize-token-projections (int8) are rebuilt the same way; the head's variant is not rebuilt.
10. A fused bundle whose backbone and variants were made from the plain graphs: a rerun rebuilds
    them (exit 0); a rerun on an up-to-date fused bundle changes nothing (exit 0).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import onnx

MODELS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(MODELS))
from models import convert_precision as cp  # noqa: E402
from models import fuse_attention as fa  # noqa: E402
from models import variants  # noqa: E402
from models.add_backbone import add_backbone, check as backbone_check  # noqa: E402
from models.onnx_save import read_manifest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_copies import TINY, check, copy_tiny, run_tiny_backbone  # noqa: E402


def ops(path):
    return [n.op_type for n in onnx.load(path).graph.node]


def signature(path):
    g = onnx.load(path).graph
    return [(v.name, v.type.tensor_type.elem_type) for v in list(g.input) + list(g.output)]


def largest_error(bundle, role, fused_path, plain_path):
    _, manifest = read_manifest(bundle)
    return cp.compare(role, manifest, manifest["graphs"][role], plain_path, onnx.load(fused_path), seed=1)["max_abs"]


def test_command_line(tmp):
    bundle = copy_tiny(tmp, "cli")
    script = os.path.join(MODELS, "fuse_attention.py")
    r = subprocess.run([sys.executable, script, bundle], capture_output=True, text=True)
    check(r.returncode == 0, f"fuse_attention.py exits 0 ({r.stderr.strip()[-300:]})")
    for role in ("encoder", "decoder"):
        path = os.path.join(bundle, f"{role}.onnx")
        found = ops(path)
        check(found.count("MultiHeadAttention") == 1 and "Softmax" not in found, f"{role}: one fused node, no Softmax")
        node = next(n for n in onnx.load(path).graph.node if n.op_type == "MultiHeadAttention")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        check(node.domain == "com.microsoft", f"{role}: the node is ONNX Runtime's (com.microsoft)")
        _, manifest = read_manifest(bundle)
        head_dim = manifest["width"] // attrs["num_heads"]
        check(abs(attrs["scale"] - head_dim ** -0.5) < 1e-6, f"{role}: scale 1/sqrt({head_dim}) read from the chain")
        check(signature(path) == signature(os.path.join(TINY, f"{role}.onnx")), f"{role}: inputs and outputs unchanged")
        err = largest_error(bundle, role, path, os.path.join(TINY, f"{role}.onnx"))
        check(err < 1e-5, f"{role}: fused within 1e-5 of plain ({err:.2g})")
    before = open(os.path.join(bundle, "encoder.onnx"), "rb").read()
    r = subprocess.run([sys.executable, script, bundle], capture_output=True, text=True)
    check(r.returncode == 0 and "fused already" in r.stdout, "a second run finds the bundle fused already and exits 0")
    check(open(os.path.join(bundle, "encoder.onnx"), "rb").read() == before, "… and leaves the graph as it was")
    # No attention chain anywhere (each Softmax made a Sigmoid): nothing to fuse is a failure.
    plain = copy_tiny(tmp, "no-attention")
    for role in ("encoder", "decoder"):
        path = os.path.join(plain, f"{role}.onnx")
        m = onnx.load(path)
        for node in m.graph.node:
            if node.op_type == "Softmax":
                node.op_type = "Sigmoid"
                del node.attribute[:]
        onnx.save(m, path)
    files = {n: open(os.path.join(plain, n), "rb").read() for n in os.listdir(plain)}
    r = subprocess.run([sys.executable, script, plain], capture_output=True, text=True)
    check(r.returncode == 1 and "no attention chain to fuse" in r.stdout and "Traceback" not in r.stderr,
          f"a bundle without an attention chain exits 1, saying so ({r.returncode}: "
          f"{(r.stdout + r.stderr).strip()[-200:]})")
    check({n: open(os.path.join(plain, n), "rb").read() for n in os.listdir(plain)} == files,
          "… and changes nothing")


def test_unreadable_graph(tmp):
    bundle = copy_tiny(tmp, "broken")
    with open(os.path.join(bundle, "decoder.onnx"), "wb") as f:
        f.write(b"not a graph")
    before = open(os.path.join(bundle, "encoder.onnx"), "rb").read()
    r = subprocess.run([sys.executable, os.path.join(MODELS, "fuse_attention.py"), bundle],
                       capture_output=True, text=True)
    check(r.returncode == 2 and "decoder.onnx (decoder) is not an ONNX graph" in r.stderr
          and "Traceback" not in r.stderr, f"an unreadable decoder: exit 2 naming it ({r.stderr.strip()[-160:]})")
    check(open(os.path.join(bundle, "encoder.onnx"), "rb").read() == before, "… and the encoder is left as it was")


def test_other_shape_is_left():
    model = onnx.load(os.path.join(TINY, "encoder.onnx"))
    for n in model.graph.node:
        if n.op_type == "Softmax":
            for a in n.attribute:
                if a.name == "axis":
                    a.i = 2
    out, count, skipped = fa.fuse(model)
    check(count == 0 and "Softmax" in [n.op_type for n in out.graph.node], "a Softmax over another axis stays")
    check(len(skipped) == 1 and "not over the last axis" in skipped[0], f"… with its reason ({skipped})")


def scale_node(model):
    """The Mul that scales q or the scores in the tiny encoder (it scales the scores;
    mar-tiny's q), and its constant's name."""
    inits = {i.name for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Mul" and any(i in inits for i in n.input):
            producer = {o: m for m in model.graph.node for o in m.output}.get(n.input[0])
            if producer is not None and producer.op_type in ("Gather", "MatMul"):
                return n, next(i for i in n.input if i in inits)
    raise SystemExit("FAIL: the tiny encoder has no attention scaling")


def test_scale_forms(tmp):
    bundle = copy_tiny(tmp, "scales")
    path = os.path.join(bundle, "encoder.onnx")
    plain = onnx.load(path)
    want, _, _ = fa.fuse(onnx.load(path))
    scale = next(a.f for n in want.graph.node if n.op_type == "MultiHeadAttention" for a in n.attribute if a.name == "scale")
    swapped = onnx.load(path)
    node, _ = scale_node(swapped)
    node.input[0], node.input[1] = node.input[1], node.input[0]
    divided = onnx.load(path)
    node, const = scale_node(divided)
    node.op_type = "Div"
    init = next(i for i in divided.graph.initializer if i.name == const)
    init.CopyFrom(onnx.numpy_helper.from_array(1.0 / onnx.numpy_helper.to_array(init), const))
    for name, model in (("c · x", swapped), ("x / c", divided)):
        fused, count, _ = fa.fuse(model)
        got = next(a.f for n in fused.graph.node if n.op_type == "MultiHeadAttention" for a in n.attribute if a.name == "scale")
        check(count == 1 and abs(got - scale) < 1e-6, f"scaling written as {name}: fused with the same scale")
        fused_path = os.path.join(tmp, "scaled.onnx")
        onnx.save(fused, fused_path)
        onnx.save(plain, os.path.join(tmp, "plain.onnx"))
        err = largest_error(bundle, "encoder", fused_path, os.path.join(tmp, "plain.onnx"))
        check(err < 1e-5, f"… and within 1e-5 of the plain graph ({err:.2g})")


def test_exported_graphs():
    """models/mar-tiny, as export_mar.py writes graphs: q scaled before q·kᵀ, two blocks."""
    for role in ("encoder", "decoder"):
        fused, count, skipped = fa.fuse(onnx.load(os.path.join(MODELS, "mar-tiny", f"{role}.onnx")))
        scales = [a.f for n in fused.graph.node if n.op_type == "MultiHeadAttention" for a in n.attribute
                  if a.name == "scale"]
        check(count == 2 and not skipped and all(abs(x - 24 ** -0.5) < 1e-6 for x in scales),
              f"mar-tiny {role}: both blocks fused, scale 1/sqrt(24) taken from q's Mul")


def test_precisions_after_fusion(tmp):
    bundle = copy_tiny(tmp, "fp16")
    fa.fuse_bundle(bundle, log=lambda *_: None)
    report = cp.convert(bundle, "fp16", log=lambda *_: None)
    for role in ("encoder", "decoder"):
        stats = report["graphs"][role]["stats"]
        check(stats["half_ops"].get("MultiHeadAttention") == 1, f"{role}: the fused node runs in fp16")
        plain_matmuls = ops(os.path.join(TINY, f"{role}.onnx")).count("MatMul")
        check(stats["half_ops"].get("MatMul") == plain_matmuls - 2 and not stats["kept_float32"],
              f"{role}: every weight MatMul in fp16, the one after the fused node too ({stats['half_ops']})")
        err = report["graphs"][role]["error_vs_fp32"]["max_abs"]
        check(err < 0.05, f"{role}: ONNX Runtime (CPU) runs it, {err:.2g} from fp32")
    report = cp.convert(bundle, "int8", log=lambda *_: None)
    for role in ("encoder", "decoder"):
        path = os.path.join(bundle, report["files"][role])
        check(ops(path).count("MultiHeadAttention") == 1 and report["graphs"][role]["stats"]["quantized_matmuls"] > 0,
              f"{role}: int8 quantizes the weight MatMuls around the fused node")
        err = report["graphs"][role]["error_vs_fp32"]["max_abs"]
        check(err < 0.5, f"{role}: … and ONNX Runtime (CPU) runs it, {err:.2g} from fp32")


def test_derived_graphs_rebuilt(tmp):
    bundle = copy_tiny(tmp, "derived")
    add_backbone(bundle, log=lambda *_: None)
    cp.convert(bundle, "fp16", check=False, log=lambda *_: None)
    fa.fuse_bundle(bundle, log=lambda *_: None)
    check(ops(os.path.join(bundle, "backbone.onnx")).count("MultiHeadAttention") == 2,
          "the backbone graph is rebuilt from the fused encoder and decoder")
    check(ops(os.path.join(bundle, "encoder.fp16.onnx")).count("MultiHeadAttention") == 1,
          "the fp16 variant is rebuilt from the fused encoder")
    check(ops(os.path.join(bundle, "backbone.fp16.onnx")).count("MultiHeadAttention") == 2,
          "… and its backbone too")
    z = run_tiny_backbone(os.path.join(bundle, "backbone.onnx"))
    check(z.shape == (2, 2, 32) and np.isfinite(z).all(), "the fused backbone runs")
    err = backbone_check(bundle, log=lambda *_: None)
    check(err < 1e-5, f"… and gives the fused encoder and decoder's rows ({err:.2g})")


def test_replaced_by_rename(tmp):
    bundle = copy_tiny(tmp, "links")
    link = os.path.join(tmp, "encoder-link.onnx")
    os.link(os.path.join(bundle, "encoder.onnx"), link)
    fa.fuse_bundle(bundle, check=False, log=lambda *_: None)
    check("MultiHeadAttention" not in ops(link), "a hard link to the old encoder still holds the plain graph")
    check(oct(os.stat(os.path.join(bundle, "encoder.onnx")).st_mode & 0o777) == oct(os.stat(link).st_mode & 0o777),
          "the new file keeps the old one's permissions")


def test_graphs_outside_bundle(tmp):
    shared = copy_tiny(tmp, "tiny")  # what ../tiny/ in tiny-sampler's manifest names
    bundle = os.path.join(tmp, "sampler")
    shutil.copytree(os.path.join(MODELS, "fixtures", "tiny-sampler"), bundle)
    _, manifest = read_manifest(bundle)
    check(manifest["graphs"]["encoder"]["file"] == "../tiny/encoder.onnx", "tiny-sampler takes its encoder from ../tiny")
    before = {n: open(os.path.join(shared, n), "rb").read() for n in os.listdir(shared)}
    counts = fa.fuse_bundle(bundle, log=lambda *_: None)
    check(counts == {"encoder": 1, "decoder": 1}, f"a bundle with graphs outside its folder is fused ({counts})")
    check(all(open(os.path.join(shared, n), "rb").read() == b for n, b in before.items())
          and sorted(os.listdir(shared)) == sorted(before), "… and the graphs outside it are left as they were")
    _, manifest = read_manifest(bundle)
    files = {role: e["file"] for role, e in manifest["graphs"].items()}
    check(files["encoder"] == "encoder.onnx" and files["decoder"] == "decoder.onnx"
          and files["diffusion"] == "../tiny/diffusion.onnx",
          f"… the fused graphs are written into the bundle and the manifest points to them ({files})")
    for role in ("encoder", "decoder"):
        check(ops(os.path.join(bundle, f"{role}.onnx")).count("MultiHeadAttention") == 1, f"{role}: fused in the bundle")
    check(ops(os.path.join(bundle, "backbone.onnx")).count("MultiHeadAttention") == 2,
          "… and the backbone graph is rebuilt from them")


def test_failed_check_changes_nothing(tmp):
    bundle = copy_tiny(tmp, "failed-check")
    manifest_path = os.path.join(bundle, "manifest.yaml")
    text = open(manifest_path).read()
    # A wrong `buffer`, which only the decoder's check reads (the shape of its `encoded` input):
    # onnxruntime refuses the decoder's check inputs, after the encoder's check passed.
    check(re.search(r"(?m)^buffer: *64\b", text) is not None, "(the tiny bundle's buffer is 64)")
    text = re.sub(r"(?m)^buffer: *64\b", "buffer: 65", text)
    with open(manifest_path, "w") as f:
        f.write(text)
    before = {n: open(os.path.join(bundle, n), "rb").read() for n in os.listdir(bundle)}
    r = subprocess.run([sys.executable, os.path.join(MODELS, "fuse_attention.py"), bundle],
                       capture_output=True, text=True)
    check(r.returncode == 2 and "FuseError" in r.stderr and "decoder" in r.stderr and "Traceback" not in r.stderr,
          f"a decoder whose check fails: exit 2 with a FuseError naming it ({r.stderr.strip()[-200:]})")
    after = {n: open(os.path.join(bundle, n), "rb").read() for n in os.listdir(bundle)}
    check(after == before, "… and no file of the bundle changed, the encoder (checked first) included")


def test_rank2_projection_is_left():
    """The qkv projection flattened to [B·L, 3D] and reshaped to [B, L, 3, H, d] with B and L taken
    from the unflattened one: onnxruntime runs the plain graph, but not MultiHeadAttention on it."""
    from onnx import helper, numpy_helper

    model = onnx.load(os.path.join(TINY, "encoder.onnx"))
    g = model.graph
    reshape = next(n for n in g.node if n.op_type == "Reshape" and
                   any(m.op_type == "Transpose" and m.input[0] == n.output[0] for m in g.node))
    projection, at = reshape.input[0], list(g.node).index(reshape)
    g.initializer.extend([numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
                          (("t_start", [0]), ("t_end", [2]), ("t_heads", [3, 2, 16]))])
    for k, n in enumerate([
            helper.make_node("Flatten", [projection], ["t_flat"], axis=2),
            helper.make_node("Shape", [projection], ["t_shape"]),
            helper.make_node("Slice", ["t_shape", "t_start", "t_end"], ["t_bl"]),
            helper.make_node("Concat", ["t_bl", "t_heads"], ["t_target"], axis=0)]):
        g.node.insert(at + k, n)
    reshape.input[0], reshape.input[1] = "t_flat", "t_target"
    onnx.checker.check_model(model)
    out, count, skipped = fa.fuse(model)
    check(count == 0 and "Softmax" in [n.op_type for n in out.graph.node], "a rank-2 qkv projection is not fused")
    check(len(skipped) == 1 and "rank 2" in skipped[0], f"… with its reason ({skipped})")


def test_variant_options_kept(tmp):
    bundle = copy_tiny(tmp, "options")
    cp.convert(bundle, "fp16", check=False, emulate=True, log=lambda *_: None)
    cp.convert(bundle, "int8", check=False, per_channel=False, per_row=True, log=lambda *_: None)
    fa.fuse_bundle(bundle, check=False, log=lambda *_: None)
    for role in ("encoder", "decoder"):
        model = onnx.load(os.path.join(bundle, f"{role}.fp16.onnx"))
        half = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16} | {
            n.output[0] for n in model.graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16}
        readers = {n.op_type for n in model.graph.node if set(n.input) & half}
        check("MultiHeadAttention" in ops(os.path.join(bundle, f"{role}.fp16.onnx")) and readers == {"Cast"},
              f"{role}: the emulated fp16 variant is rebuilt fused and still emulated (half tensors read by {readers})")
        model = onnx.load(os.path.join(bundle, f"{role}.int8.onnx"))
        inits = {i.name: i for i in model.graph.initializer}
        points = [inits[n.input[3]] for n in model.graph.node if n.op_type == "MatMulInteger"]
        check("MultiHeadAttention" in ops(os.path.join(bundle, f"{role}.int8.onnx"))
              and points and all(not p.dims for p in points)
              and "DynamicQuantizeLinear" not in ops(os.path.join(bundle, f"{role}.int8.onnx")),
              f"{role}: the int8 variant is rebuilt fused, its weights still per tensor, its activations per row")
    check(variants.variant_options(bundle, read_manifest(bundle)[1])
          == {"fp16": {"emulate": True}, "int8": {"per_channel": False, "per_row": True}},
          "… and both are recognized as such from their graphs")
    default = copy_tiny(tmp, "options-default")
    cp.convert(default, "int8", check=False, log=lambda *_: None)
    check(variants.variant_options(default, read_manifest(default)[1]) == {"int8": {}}
          and "DynamicQuantizeLinear" in ops(os.path.join(default, "encoder.int8.onnx")),
          "an int8 variant with per-tensor activations (the default) is recognized as such")


def test_token_projections_kept_and_head_untouched(tmp):
    """An int8 variant made with --quantize-token-projections is rebuilt so; the graphs fusing does
    not change (the head's variant) are not rebuilt."""
    bundle = copy_tiny(tmp, "token-projections")
    cp.convert(bundle, "int8", check=False, quantize_token_projections=True, log=lambda *_: None)
    head = open(os.path.join(bundle, "diffusion.int8.onnx"), "rb").read()
    check(variants.variant_options(bundle, read_manifest(bundle)[1]) == {"int8": {"quantize_token_projections": True}},
          "--quantize-token-projections is recognized from the graphs")
    fa.fuse_bundle(bundle, check=False, log=lambda *_: None)
    model = onnx.load(os.path.join(bundle, "encoder.int8.onnx"))
    inits = {i.name for i in model.graph.initializer}
    plain = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    check("MultiHeadAttention" in ops(os.path.join(bundle, "encoder.int8.onnx")) and not plain,
          "the rebuilt int8 encoder still has its token projection quantized")
    check(open(os.path.join(bundle, "diffusion.int8.onnx"), "rb").read() == head,
          "diffusion.int8.onnx (which fusing does not change) is not rebuilt")


def test_stale_derived_rebuilt(tmp):
    """A bundle whose encoder and decoder are fused but whose backbone and int8 variants were made
    from the plain graphs (as a run killed by an earlier version left it): a rerun rebuilds them
    and exits 0; once they are fused, a rerun changes nothing."""
    bundle = copy_tiny(tmp, "stale")
    add_backbone(bundle, log=lambda *_: None)
    cp.convert(bundle, "int8", check=False, log=lambda *_: None)
    for role in ("encoder", "decoder"):
        path = os.path.join(bundle, f"{role}.onnx")
        onnx.save(fa.fuse(onnx.load(path))[0], path)
    script = os.path.join(MODELS, "fuse_attention.py")
    r = subprocess.run([sys.executable, script, bundle], capture_output=True, text=True)
    check(r.returncode == 0 and "fused already" in r.stdout, f"a rerun on a fused bundle exits 0 ({r.stderr[-200:]})")
    check(ops(os.path.join(bundle, "backbone.onnx")).count("MultiHeadAttention") == 2
          and ops(os.path.join(bundle, "encoder.int8.onnx")).count("MultiHeadAttention") == 1
          and ops(os.path.join(bundle, "backbone.int8.onnx")).count("MultiHeadAttention") == 2,
          "… and rebuilds the backbone and int8 variants made from the plain graphs")
    before = {n: open(os.path.join(bundle, n), "rb").read() for n in os.listdir(bundle)}
    r = subprocess.run([sys.executable, script, bundle], capture_output=True, text=True)
    check(r.returncode == 0 and {n: open(os.path.join(bundle, n), "rb").read() for n in os.listdir(bundle)} == before,
          "a rerun with everything fused exits 0 and changes nothing")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        test_token_projections_kept_and_head_untouched(tmp)
        test_stale_derived_rebuilt(tmp)
        test_command_line(tmp)
        test_unreadable_graph(tmp)
        test_other_shape_is_left()
        test_scale_forms(tmp)
        test_exported_graphs()
        test_precisions_after_fusion(tmp)
        test_derived_graphs_rebuilt(tmp)
        test_replaced_by_rename(tmp)
        test_graphs_outside_bundle(tmp)
        test_failed_check_changes_nothing(tmp)
        test_rank2_projection_is_left()
        test_variant_options_kept(tmp)
    print("all fuse_attention tests passed")


if __name__ == "__main__":
    main()

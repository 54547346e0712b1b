#!/usr/bin/env python3
"""Write lower-precision variants of a bundle's graphs and record them in its manifest.

    python models/convert_precision.py BUNDLE --precision fp16|bf16|int8 [--no-check] [--emulate]
        [--per-tensor] [--per-row-activations] [--quantize-token-projections] [--tolerance T]
        [--report FILE]

For each model graph of the bundle (encoder, decoder, diffusion, vae_decoder; an optional
`sampler` graph is rebuilt around the variant head by models/add_sampler.py, an optional `backbone`
from the variant encoder and decoder by models/add_backbone.py, an optional split head
(`diffusion_condition`, `diffusion_state`): the float32 parts converted as the head is, checked together against the
float32 head; the evaluator is left alone) this writes `<name>.<precision>.onnx` beside
`<name>.onnx` and adds, or replaces, `precisions.<precision>` in `manifest.yaml` (role -> file;
the rest of the manifest, comments included, is kept as written). `gtr-run --precision X` then
opens those files. A graph the conversion would leave unchanged is not written and not listed:
gtr-run runs the fp32 graph for a role a variant does not list.

fp16 / bf16 follow autocast: only MatMul, Gemm and Conv run in half precision, and for fp16 the
fused attention of models/fuse_attention.py (MultiHeadAttention) and the elementwise ops that
autocast's type promotion keeps in fp16 after them (a Linear's bias Add, GELU's Div/Erf/Add/Mul by
0-d constants; FOLLOW_OPS below), and (fp16 and bf16) the ops that only move half values
(Reshape, Transpose, Split, Concat, ...; MOVE_OPS below). Their float
inputs are cast to half (weights are stored in half), their outputs are cast back to float32,
so everything else (LayerNormalization, InstanceNormalization, ReduceMean/Pow/Sqrt norms,
Softmax, Exp/Log, Sin/Cos, the elementwise ops, every graph input and output) stays float32.
Where one half op feeds another directly, the cast pair between them is dropped. bf16 Conv
needs opset 22; in an older graph Conv stays float32 (reported).

int8 is ONNX Runtime's dynamic quantization (onnxruntime.quantization.quantize_dynamic) of
the MatMul weights: int8 weights (per output channel by default), activations quantized to
uint8 on the fly, int32 accumulation. Gemm nodes with constant weights are first rewritten as
MatMul (+ Add of the bias) so that their weights are quantized too; MatMuls of two activations
(attention) stay float32, and so do the token projections (token_projections: a weight with a
dimension of at most 2 * token_dim, the projections from the token space into a graph's width and
back out to the head's channels; under 1% of the weights, but on a MAR-B-size export the head's
output projection alone carried 96% of its largest int8 error; --quantize-token-projections
quantizes them too). quantize_dynamic gives the activations one scale per tensor, which
ONNX Runtime runs in one fused kernel, but which makes an image depend on the other images of
its batch; --per-row-activations gives them one scale per row instead (activations_per_row).

--check (on by default) runs every written graph and its fp32 original in onnxruntime (CPU)
on the same random inputs, made from the manifest's shapes, and prints the max and mean
absolute difference of each output; a graph off by more than --tolerance (default 0.1) times
the largest fp32 output, or not finite, is refused before anything is replaced.

All or nothing (models/onnx_save.py): every graph of the conversion, derived ones included, is
written aside and checked first; only then are they renamed into place, the manifest last. A
failed check or an error (exit status 2, one line naming the graph or input) or an interruption
before that leaves the bundle as it was; a run killed during the renaming is finished by the next
tool run on the bundle. A graph whose real path (symbolic links resolved) is outside the bundle
is never written beside: its variant goes into the bundle under a name no other graph has. ONNX Runtime's CPU provider has no bfloat16 MatMul/Gemm
kernels, so for bf16 the check runs an emulation instead: the same graph with every bf16 cast
replaced by a round trip float32 -> bfloat16 -> float32 and the op itself in float32 (what a
GPU's bf16 tensor cores do: bf16 operands, fp32 accumulation). --emulate writes that emulation
as the variant, so that its quality can be measured on a CPU; such a variant is marked
`emulated` in the report and must not be shipped as bf16.
"""

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time

import numpy as np
import onnx
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from models.add_backbone import write_backbone  # noqa: E402
from models.add_sampler import write_sampler  # noqa: E402
from models.onnx_save import (BundleError, Staging, load_graph, output_file, placed_names, run_tool,  # noqa: E402
                              write_atomic)
from models.variants import (  # noqa: E402
    DERIVED_FROM, DERIVED_ROLES, HALF_TYPE, PRECISIONS, ROLES, SPLIT_ROLES,
)

HALF_OPS = {"MatMul", "Gemm", "Conv"}
# Fused attention (models/fuse_attention.py) runs in half precision too, as autocast runs
# scaled_dot_product_attention; ONNX Runtime's CUDA MultiHeadAttention takes fp16, not bf16.
HALF_OPS_BY_PRECISION = {"fp16": HALF_OPS | {"MultiHeadAttention"}, "bf16": HALF_OPS}
# Elementwise ops that stay in fp16 after a half op, as autocast's type promotion keeps them: when
# every other input is a scalar constant (a Python number in PyTorch) or, for Add, the 1-D bias of
# a half MatMul (nn.Linear's bias, which autocast casts with the weight). A float32 tensor input
# (the residual stream, a position embedding) keeps the op in float32. fp16 only: ONNX Runtime's
# CUDA provider has these kernels in fp16, not all of them in bf16.
FOLLOW_OPS = {"Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid", "Relu"}
# Ops that only move or select values, by the indices of their data inputs (the rest are shapes,
# axes or indices): fed half values they run in half too, as autocast leaves them, instead of a
# Cast to float32 and back around them (between a half projection and the attention reading its
# split q, k and v, for one). They change no value themselves (a half value is exact in float32);
# in fp16 the elementwise ops after them then follow in half by the FOLLOW_OPS rule, as in
# autocast (the attention's scaling of q, for one). fp16 and bf16 (ONNX Runtime's CUDA provider
# has all of them in both); in bf16, where nothing follows, the numbers do not change at all.
MOVE_OPS = {"Reshape": (0,), "Transpose": (0,), "Split": (0,), "Squeeze": (0,), "Unsqueeze": (0,),
            "Flatten": (0,), "Identity": (0,), "Slice": (0,), "Gather": (0,), "Expand": (0,),
            "Concat": None}  # None: every input is data
FP16_MAX = 65504.0
# The check refuses a variant whose largest error exceeds this share of the largest float32
# output on the check's inputs (measured on mar-tiny and a MAR-B-size export: fp16 and bf16
# under 1%, int8 2 to 2.5%; a broken conversion is off by tens of percent or more).
DEFAULT_TOLERANCE = 0.1


class ConversionError(BundleError):
    """A graph that cannot be converted or fails the check (nothing of the bundle was replaced)."""


# ----------------------------------------------------------------------------- helpers


def float_tensors(model):
    """Names of the float32 tensors of the main graph (after shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    names = set()
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            names.add(vi.name)
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT:
            names.add(init.name)
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    names.add(node.output[0])
    return names


def opset(model):
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def unique(name, taken):
    out, k = name, 1
    while out in taken:
        out = f"{name}_{k}"
        k += 1
    taken.add(out)
    return out


def bf16_bits(a):
    """float32 array -> bfloat16 bit patterns (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(a)
    out = rounded.astype(np.uint16)
    out[nan] = 0x7FC0
    return out


def half_initializer(init, precision, name, stats):
    a = numpy_helper.to_array(init).astype(np.float32)
    if precision == "fp16":
        big = np.abs(a) > FP16_MAX
        stats["weights_clipped"] += int(big.sum())
        h = np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16)
        stats["weights_flushed_to_zero"] += int(((h == 0) & (a != 0)).sum())
        return numpy_helper.from_array(h, name)
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.BFLOAT16
    t.dims.extend(a.shape)
    t.raw_data = bf16_bits(a).tobytes()
    return t


# ----------------------------------------------------------------------------- fp16 / bf16


def to_half(model, precision, emulate=False):
    """Autocast-style conversion of `model` (see the module docstring). With `emulate`,
    half tensors are float32 tensors rounded through a cast to `precision` and back.
    Returns (model, stats)."""
    half = HALF_TYPE[precision]
    half_ops = HALF_OPS_BY_PRECISION[precision]
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        raise ConversionError("graphs with subgraphs (If/Loop/Scan) are not supported")
    floats = float_tensors(model)
    version = opset(model)
    inits = {i.name: i for i in g.initializer}
    taken = {n for node in g.node for n in list(node.input) + list(node.output)} | set(inits) | {
        i.name for i in g.input
    }
    stats = {
        "half_ops": {},
        "kept_float32": {},
        "casts_inserted": 0,
        "weights_clipped": 0,
        "weights_flushed_to_zero": 0,
    }
    to_half_of = {}  # float32 tensor -> its half copy
    produced_half = {}  # float32 output of a half op -> the half tensor it was cast from
    new_inits = {}
    new_nodes = []
    consumers = {}
    for node in g.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)

    def round_trip(src, dst_name):
        """Nodes turning float32 `src` into a rounded copy `dst_name`."""
        mid = unique(dst_name + "_h", taken)
        return [
            helper.make_node("Cast", [src], [mid], to=half, name=unique("cast_" + mid, taken)),
            helper.make_node("Cast", [mid], [dst_name], to=TensorProto.FLOAT, name=unique("cast_" + dst_name, taken)),
        ]

    half_matmuls = set()  # float32 outputs of MatMuls converted to half

    def data_inputs(node):
        """The inputs of `node` that carry values (for a MOVE_OPS op, its data inputs)."""
        keep = MOVE_OPS.get(node.op_type)
        return [x for k, x in enumerate(node.input) if x and (keep is None or k in keep)]

    def moves_in_half(node):
        """Whether data-movement `node` is fed only half values (see MOVE_OPS)."""
        if node.op_type not in MOVE_OPS:
            return False
        ins = data_inputs(node)
        return bool(ins) and all(x in produced_half for x in ins) and all(y in floats for y in node.output)

    def follows_in_half(node):
        """Whether elementwise `node` stays in fp16 after a half op (see FOLLOW_OPS)."""
        if precision != "fp16" or node.op_type not in FOLLOW_OPS:
            return False
        ins = [x for x in node.input if x]
        if not any(x in produced_half for x in ins) or not all(y in floats for y in node.output):
            return False
        for x in ins:
            if x in produced_half:
                continue
            init = inits.get(x)
            if init is None or init.data_type != TensorProto.FLOAT:
                return False
            if len(init.dims) == 0:
                # a 0-d constant (a Python number in PyTorch) keeps the op in half; a [1]
                # tensor would promote it to float32, as in autocast
                continue
            bias = node.op_type == "Add" and len(init.dims) == 1 and any(y in half_matmuls for y in ins)
            if not bias:
                return False
        return True

    for node in g.node:
        moving = moves_in_half(node)
        convertible = (node.op_type in half_ops and not (
            node.op_type == "Conv" and precision == "bf16" and version < 22
        )) or follows_in_half(node) or moving
        if not convertible:
            if node.op_type in half_ops:
                stats["kept_float32"][node.op_type] = stats["kept_float32"].get(node.op_type, 0) + 1
            new_nodes.append(node)
            continue
        if not moving and (not all(x == "" or x in floats for x in node.input)
                           or not all(y in floats for y in node.output)):
            stats["kept_float32"][node.op_type] = stats["kept_float32"].get(node.op_type, 0) + 1
            new_nodes.append(node)
            continue
        stats["half_ops"][node.op_type] = stats["half_ops"].get(node.op_type, 0) + 1
        values = set(data_inputs(node)) if moving else None
        inputs = []
        for x in node.input:
            if x == "" or (values is not None and x not in values):
                inputs.append(x)  # a shape, axes or indices input of a data-movement op
            elif x in produced_half:
                inputs.append(produced_half[x])
            elif x in to_half_of:
                inputs.append(to_half_of[x])
            elif x in inits:
                name = unique(x + "_" + precision, taken)
                if emulate:
                    init = half_initializer(inits[x], precision, "tmp", stats)
                    if precision == "fp16":
                        a = numpy_helper.to_array(init).astype(np.float32)
                    else:
                        bits = np.frombuffer(init.raw_data, dtype=np.uint16).astype(np.uint32) << 16
                        a = bits.view(np.float32).reshape(tuple(init.dims))
                    new_inits[name] = numpy_helper.from_array(a, name)
                else:
                    new_inits[name] = half_initializer(inits[x], precision, name, stats)
                to_half_of[x] = name
                inputs.append(name)
            else:
                name = unique(x + "_" + precision, taken)
                if emulate:
                    new_nodes.extend(round_trip(x, name))
                    stats["casts_inserted"] += 2
                else:
                    new_nodes.append(helper.make_node("Cast", [x], [name], to=half, name=unique("cast_" + name, taken)))
                    stats["casts_inserted"] += 1
                to_half_of[x] = name
                inputs.append(name)
        outputs = []
        after = []
        for y in node.output:
            inner = unique(y + "_" + precision, taken)
            outputs.append(inner)
            if emulate:
                raw = unique(y + "_f32", taken)
                outputs[-1] = raw
                after.extend(round_trip(raw, inner))
                after.append(helper.make_node("Identity", [inner], [y], name=unique("id_" + y, taken)))
                stats["casts_inserted"] += 2
            else:
                after.append(helper.make_node("Cast", [inner], [y], to=TensorProto.FLOAT, name=unique("cast_" + y, taken)))
                stats["casts_inserted"] += 1
            produced_half[y] = inner
            if node.op_type == "MatMul":
                half_matmuls.add(y)
        converted = helper.make_node(node.op_type, inputs, outputs, name=node.name or None, domain=node.domain or None)
        converted.attribute.extend(node.attribute)
        new_nodes.append(converted)
        new_nodes.extend(after)
    # Drop output casts nobody reads any more (a half op fed the next one directly).
    used = {x for n in new_nodes for x in n.input} | {o.name for o in g.output}
    original = {id(n) for n in g.node}
    final = []
    for n in new_nodes:
        if id(n) not in original and n.op_type in ("Cast", "Identity") and all(y not in used for y in n.output):
            stats["casts_inserted"] -= 1
            continue
        final.append(n)
    # Float32 weights that only half ops read are no longer needed.
    used = {x for n in final for x in n.input} | {o.name for o in g.output}
    kept = [i for i in g.initializer if i.name in used]
    del g.node[:]
    g.node.extend(final)
    del g.initializer[:]
    g.initializer.extend(kept + list(new_inits.values()))
    return model, stats


# ----------------------------------------------------------------------------- int8


def gemm_to_matmul(model):
    """Rewrites Gemm(A, B const, C const) as MatMul(A, B') + C' (alpha, beta and transB folded
    into the constants) so that quantize_dynamic, which quantizes MatMul, sees the weights."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    taken = {n for node in g.node for n in list(node.input) + list(node.output)} | set(inits)
    nodes, added, rewritten = [], [], 0
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ok = (
            node.op_type == "Gemm"
            and node.input[1] in inits
            and (len(node.input) < 3 or node.input[2] == "" or node.input[2] in inits)
            and attrs.get("transA", 0) == 0
        )
        if not ok:
            nodes.append(node)
            continue
        b = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if attrs.get("transB", 0):
            b = b.T
        b = np.ascontiguousarray(b * np.float32(attrs.get("alpha", 1.0)))
        bname = unique(node.input[1] + "_matmul", taken)
        added.append(numpy_helper.from_array(b, bname))
        y = node.output[0]
        if len(node.input) >= 3 and node.input[2]:
            c = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32) * np.float32(attrs.get("beta", 1.0))
            cname = unique(node.input[2] + "_bias", taken)
            added.append(numpy_helper.from_array(c, cname))
            mid = unique(y + "_matmul", taken)
            nodes.append(helper.make_node("MatMul", [node.input[0], bname], [mid], name=unique((node.name or "gemm") + "_matmul", taken)))
            nodes.append(helper.make_node("Add", [mid, cname], [y], name=unique((node.name or "gemm") + "_bias", taken)))
        else:
            nodes.append(helper.make_node("MatMul", [node.input[0], bname], [y], name=unique((node.name or "gemm") + "_matmul", taken)))
        rewritten += 1
    used = {x for n in nodes for x in n.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(kept + added)
    return model, rewritten


def token_projections(model, token_dim):
    """Names of the MatMuls whose constant weight has a dimension of at most 2 * `token_dim`: the
    projections from the token space into a graph's width and back out to the head's channels
    (naming unnamed MatMuls, so that they can be excluded by name)."""
    g = model.graph
    shapes = {i.name: list(i.dims) for i in g.initializer}
    taken = {n.name for n in g.node}
    names = []
    for node in g.node:
        if node.op_type != "MatMul" or len(shapes.get(node.input[1], [])) != 2:
            continue
        if min(shapes[node.input[1]]) <= 2 * token_dim:
            if not node.name:
                node.name = unique("token_projection", taken)
            names.append(node.name)
    return names


def to_int8(model, per_channel, per_row=False, token_dim=None):
    """int8 MatMuls (see the module doc). With `token_dim`, the token projections
    (token_projections) stay float32."""
    model, rewritten = gemm_to_matmul(model)
    keep = token_projections(model, token_dim) if token_dim else []
    # quantize_dynamic advises pre-processing on every call through the root logger; the
    # graphs are already shape-inferred exports, so keep its warnings out of the report.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        model, stats = _quantize(model, rewritten, per_channel, keep)
    finally:
        root.setLevel(level)
    stats["kept_float32"] = keep
    stats["activations"] = "per row" if per_row else "per tensor"
    if per_row:
        model = activations_per_row(model)
    return model, stats


def activations_per_row(model):
    """Gives every quantized MatMul's activations one scale per row (per vector along the last
    axis) instead of quantize_dynamic's one per tensor, so that a row's result does not depend on
    the other rows of the call: an image on the images of its batch.

    quantize_dynamic writes, per activation x: DynamicQuantizeLinear(x) -> (q, s, zp), and per
    MatMul reading it: Mul(s, w_scale) -> m; MatMulInteger(q, w, zp, w_zp) -> Cast -> Mul(., m).
    Here x is quantized symmetrically per row (r = max |x| / 127 over the last axis, q = round(x /
    r) + 128 as uint8 by QuantizeLinear with scale 1, zp = 128), m becomes w_scale alone and the
    row scale r multiplies the dequantized output after it. (Folding r into m instead gives wrong
    results once ONNX Runtime 1.32 fuses Cast and Mul into MatMulIntegerToFloat, whose scale must
    be a scalar or per column.)
    Raises ConversionError on a graph of another shape."""
    g = model.graph
    fused = [n.name for n in g.node if n.op_type == "DynamicQuantizeMatMul"]
    if fused:
        raise ConversionError(f"int8 per-row activations: quantize_dynamic wrote fused DynamicQuantizeMatMul "
                              f"nodes ({', '.join(fused[:3])}), whose activation scale cannot be changed")
    inits = {i.name for i in g.initializer}
    taken = {n for node in g.node for n in list(node.input) + list(node.output)} | inits
    values = {"q_max": np.float32(127), "one": np.float32(1), "tiny": np.float32(1e-30),
              "zero_point": np.uint8(128), "axes": np.array([-1], np.int64)}
    consts = {key: unique(f"per_row_{key}", taken) for key in values}

    def reduce_max_last(x, out):
        # ReduceMax takes its axes as an input from opset 18, as an attribute before.
        if opset(model) >= 18:
            return helper.make_node("ReduceMax", [x, consts["axes"]], [out], keepdims=1)
        return helper.make_node("ReduceMax", [x], [out], axes=[-1], keepdims=1)

    row_scale_of = {}  # DynamicQuantizeLinear's scale output -> the row scale replacing it
    rescaled = {}  # Mul(s, w_scale)'s output -> the row scale its dequantization takes
    for node in g.node:
        if node.op_type == "DynamicQuantizeLinear":
            row_scale_of[node.output[1]] = unique(node.output[1] + "_per_row", taken)
    for node in g.node:
        scales = [i for i in node.input if i in row_scale_of]
        if not scales:
            continue
        other = [i for i in node.input if i not in row_scale_of]
        if node.op_type != "Mul" or len(scales) != 1 or len(other) != 1 or other[0] not in inits:
            raise ConversionError(f"int8 per-row activations: {node.op_type} node {node.name!r} reads the "
                                  f"activation scale {scales[0]!r} in a way this rewrite does not know")
        rescaled[node.output[0]] = row_scale_of[scales[0]]
    nodes = []
    for node in g.node:
        if node.op_type == "DynamicQuantizeLinear":
            x, (q, s, zp) = node.input[0], node.output
            t = lambda suffix: unique(f"{s}_per_row_{suffix}", taken)  # noqa: E731
            absolute, peak, scale0, divided = (t(k) for k in ("abs", "max", "raw", "div"))
            row = row_scale_of[s]
            nodes += [
                helper.make_node("Abs", [x], [absolute]),
                reduce_max_last(absolute, peak),
                helper.make_node("Div", [peak, consts["q_max"]], [scale0]),
                helper.make_node("Max", [scale0, consts["tiny"]], [row]),
                helper.make_node("Div", [x, row], [divided]),
                # Rounds half to even, adds 128 and saturates to uint8, in one op.
                helper.make_node("QuantizeLinear", [divided, consts["one"], consts["zero_point"]], [q]),
                helper.make_node("Identity", [consts["zero_point"]], [zp]),
            ]
        elif node.output and node.output[0] in rescaled:  # Mul(s, w_scale): w_scale alone
            w_scale = next(i for i in node.input if i not in row_scale_of)
            nodes.append(helper.make_node("Identity", [w_scale], [node.output[0]], name=node.name))
        elif node.op_type == "Mul" and any(i in rescaled for i in node.input):
            m = next(i for i in node.input if i in rescaled)
            by_column = unique(node.output[0] + "_by_column", taken)
            nodes.append(helper.make_node("Mul", list(node.input), [by_column], name=node.name))
            nodes.append(helper.make_node("Mul", [by_column, rescaled[m]], [node.output[0]],
                                          name=unique(node.name + "_by_row", taken)))
        else:
            if any(i in rescaled for i in node.input):
                raise ConversionError(f"int8 per-row activations: {node.op_type} node {node.name!r} reads "
                                      "a quantization scale where a Mul was expected")
            nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    g.initializer.extend(numpy_helper.from_array(np.asarray(values[k]), name) for k, name in consts.items()
                         if name in used)
    return model


def _quantize(model, rewritten, per_channel, keep):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
        onnx.save(model, src)
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=keep,
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
        out = onnx.load(dst)
    count = sum(1 for n in out.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"))
    return out, {"gemm_rewritten_as_matmul": rewritten, "quantized_matmuls": count, "per_channel": per_channel}


# ----------------------------------------------------------------------------- manifest


def manifest_with_precisions(text, precision, files):
    """`text` with `precisions.<precision>` set to `files` (role -> file), or removed when
    `files` is empty; everything else is kept as written."""
    lines = text.splitlines(keepends=True)
    start = next((k for k, l in enumerate(lines) if re.match(r"precisions\s*:", l)), None)
    table = {}
    end = start
    if start is not None:
        # The block is its indented lines (blank lines between them included); a column-0
        # comment or blank line after it belongs to what follows and is kept.
        end = start + 1
        k = start + 1
        while k < len(lines) and (lines[k].strip() == "" or lines[k][0] in " \t"):
            k += 1
            if lines[k - 1].strip():
                end = k
        block = yaml.safe_load("".join(lines[start:end])) or {}
        table = block.get("precisions") or {}
        if not isinstance(table, dict):
            raise ConversionError("manifest.yaml: `precisions` is not a mapping")
    if files:
        table[precision] = files
    else:
        table.pop(precision, None)
    new = []
    if table:
        new.append("precisions:                    # variant graphs by precision (models/convert_precision.py)\n")
        for p in [p for p in PRECISIONS if p in table] + sorted(p for p in table if p not in PRECISIONS):
            roles = ", ".join(f"{r}: {f}" for r, f in table[p].items())
            new.append(f"  {p}: {{ {roles} }}\n")
    if start is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        return "".join(lines + new)
    return "".join(lines[:start] + new + lines[end:])


# ----------------------------------------------------------------------------- checks


def random_feeds(role, manifest, entry, session, rng, case):
    """Random inputs for one graph, shaped by the manifest (case picks B, K or N)."""
    h, w = manifest["grid"]
    l, c, d = h * w, manifest["token_dim"], manifest["width"]
    names = entry["inputs"]
    if role in ("encoder", "decoder"):
        b, k = case
        known = np.stack([np.sort(rng.choice(l, size=k, replace=False)) for _ in range(b)]).astype(np.int64)
        known = known.reshape(b, k)
        feeds = {names["known"]: known}
        if role == "encoder":
            canvas = np.zeros((b, l, c), np.float32)
            for i in range(b):
                canvas[i, known[i]] = rng.standard_normal((k, c)).astype(np.float32)
            labels = rng.integers(0, manifest["classes"] + 1, size=b).astype(np.int64)
            labels[-1] = manifest["null_class"]
            feeds.update({names["tokens"]: canvas, names["label"]: labels})
        else:
            p = manifest["buffer"]
            feeds[names["encoded"]] = rng.standard_normal((b, p + k, d)).astype(np.float32)
        return feeds
    if role == "diffusion":
        (n,) = case
        t = rng.integers(0, manifest["diffusion"]["train_steps"], size=n).astype(np.int64)
        t[0], t[-1] = 0, manifest["diffusion"]["train_steps"] - 1
        return {
            names["x"]: rng.standard_normal((n, c)).astype(np.float32),
            names["t"]: t,
            names["z"]: rng.standard_normal((n, d)).astype(np.float32),
        }
    (b,) = case
    latent = rng.standard_normal((b, c, h, w)).astype(np.float32) / np.float32(manifest["latent_scale"])
    return {names["latent"]: latent}


CASES = {
    "encoder": [(1, 0), (3, 17), (2, 128)],
    "decoder": [(1, 0), (3, 17), (2, 128)],
    "diffusion": [(1,), (64,), (512,)],
    "vae_decoder": [(1,), (4,)],
}


def _sessions(*graphs):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return [ort.InferenceSession(g if isinstance(g, str) else g.SerializeToString(), opts,
                                 providers=["CPUExecutionProvider"]) for g in graphs]


def _errors(pairs):
    """Max / mean |variant - fp32| over (fp32 outputs, variant outputs) pairs, and the scale."""
    worst, total, count, scale = 0.0, 0.0, 0, 0.0
    for a, b in pairs:
        for x, y in zip(a, b):
            diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
            if not np.all(np.isfinite(y)):
                worst = float("inf")
            worst = max(worst, float(diff.max()) if diff.size else 0.0)
            total += float(diff.sum())
            count += diff.size
            scale = max(scale, float(np.abs(x).max()) if x.size else 0.0)
    return {"max_abs": worst, "mean_abs": total / max(count, 1), "output_max_abs": scale}


def compare(role, manifest, entry, base_path, variant, seed):
    """Max / mean |variant - fp32| per output over the check cases, and the output scale."""
    base, other = _sessions(base_path, variant)
    rng = np.random.default_rng(seed)
    pairs = []
    for case in CASES[role]:
        if role in ("encoder", "decoder") and case[1] > manifest["grid"][0] * manifest["grid"][1]:
            continue
        feeds = random_feeds(role, manifest, entry, base, rng, case)
        pairs.append((base.run(None, feeds), other.run(None, feeds)))
    return _errors(pairs)


def compare_split(manifest, head_path, condition, state, seed):
    """compare()'s numbers for a split head (models/split_head.py): its state part run on its
    condition part's output, against the float32 whole head at `head_path`, on the head's cases."""
    g = manifest["graphs"]
    hi, ho = g["diffusion"]["inputs"], g["diffusion"]["outputs"]["out"]
    ci, co = g["diffusion_condition"]["inputs"], g["diffusion_condition"]["outputs"]["cond"]
    si, so = g["diffusion_state"]["inputs"], g["diffusion_state"]["outputs"]["out"]
    head, cond, st = _sessions(head_path, condition, state)
    rng = np.random.default_rng(seed)
    pairs = []
    for case in CASES["diffusion"]:
        feeds = random_feeds("diffusion", manifest, g["diffusion"], head, rng, case)
        c = cond.run([co], {ci["t"]: feeds[hi["t"]], ci["z"]: feeds[hi["z"]]})[0]
        pairs.append((head.run([ho], feeds), st.run([so], {si["x"]: feeds[hi["x"]], si["cond"]: c})))
    return _errors(pairs)


# ----------------------------------------------------------------------------- main


def variant_names(bundle, manifest, roles, precision):
    """{role: file} of the variants of `roles`' graphs: `<name>.<precision>.onnx` beside a graph in
    the bundle; for a graph outside it (`../`, a folder that is a link leading out) a name in the
    bundle, distinct from every other graph's and variant's (`<name>.<precision>.onnx`, else
    `<role>.<precision>.onnx`, else `<role>.<name>.<precision>.onnx`)."""
    def stem(file):
        file = os.path.normpath(file)
        return file[: -len(".onnx")] if file.endswith(".onnx") else file

    def outside(file, role):
        base = os.path.basename(stem(file))
        return [f"{base}.{precision}.onnx", f"{role}.{precision}.onnx", f"{role}.{base}.{precision}.onnx"]

    derived = [f"{r}.{precision}.onnx" for r in ("sampler", "tick", "backbone")]
    return placed_names(bundle, manifest, roles, lambda r: f"precisions.{precision}.{r}",
                        lambda f, r: f"{stem(f)}.{precision}.onnx", outside, reserved=derived)


def convert_graph(model, precision, emulate=False, per_channel=True, per_row=False, token_dim=None):
    """One graph in `precision` (the module docstring): (model, stats, whether anything changed)."""
    if precision == "int8":
        model, stats = to_int8(model, per_channel, per_row, token_dim=token_dim)
        changed = stats["quantized_matmuls"] > 0
    else:
        model, stats = to_half(model, precision, emulate=emulate)
        changed = bool(stats["half_ops"])
    model.producer_name = "gtr-run convert_precision.py"
    return model, stats, changed


def convert(bundle, precision, check=True, emulate=False, per_channel=True, seed=0, log=print,
            tolerance=DEFAULT_TOLERANCE, per_row=False, quantize_token_projections=False,
            roles=None, staging=None):
    """Converts the model graphs of `bundle` (those of `roles`, default all; the variant's other
    entries are then kept) and rebuilds the derived graphs made from them; returns the report (a
    dict). Everything is written aside and checked before anything of the bundle is replaced,
    then committed at once (models/onnx_save.py), so a failure changes nothing: with `check`, a
    graph whose outputs differ from float32's by more than `tolerance` times their largest
    magnitude (or are not finite) raises ConversionError. With `staging` the writes join that
    models.onnx_save.Staging, which the caller commits (fuse_attention.py)."""
    if emulate and precision not in ("fp16", "bf16"):
        raise ConversionError("--emulate applies to fp16 and bf16")
    if precision != "int8" and (not per_channel or per_row or quantize_token_projections):
        raise ConversionError("--per-tensor, --per-row-activations and --quantize-token-projections apply to int8")
    if staging is None:
        # The bundle locked, a killed run's commit finished, then the manifest read through the
        # Staging; the folder read is the folder written (symbolic links, `..` resolved).
        bundle = os.path.realpath(bundle)
        with Staging(bundle, log=log) as own:
            report = convert(bundle, precision, check, emulate, per_channel, seed, log, tolerance, per_row,
                             quantize_token_projections, roles, own)
            own.commit()
        files = report["files"]
        log(f"manifest.yaml: precisions.{precision} = {files if files else '(removed: nothing converted)'}")
        return report

    manifest_path = os.path.join(bundle, "manifest.yaml")
    text, manifest = staging.manifest()
    graphs = manifest["graphs"]
    token_dim = None
    if precision == "int8" and not quantize_token_projections:
        token_dim = manifest.get("token_dim")
        if not (isinstance(token_dim, int) and token_dim > 0):
            raise ConversionError(f"{manifest_path}: `token_dim` is {token_dim!r}, not a positive integer; "
                                  "int8 keeps the projections of that size in float32")
    options = dict(emulate=emulate, per_channel=per_channel, per_row=per_row, token_dim=token_dim)
    for role in graphs:
        if role not in ROLES and role not in DERIVED_ROLES:
            log(f"{role}: not a graph this script converts (kept in float32)")
    todo = [r for r in ROLES if r in graphs and (roles is None or r in roles)]
    split = all(r in graphs for r in SPLIT_ROLES)
    names = variant_names(bundle, manifest, todo + (list(SPLIT_ROLES) if split and "diffusion" in todo else []),
                          precision)
    rebuilt = set(todo) | {r for r, sources in DERIVED_FROM.items() if set(sources) & set(todo)}
    old = (manifest.get("precisions") or {}).get(precision) or {}
    files = {} if roles is None else {r: f for r, f in old.items() if r not in rebuilt}
    report = {"bundle": bundle, "precision": precision, "emulated": emulate, "graphs": {}}
    path = lambda file: staging.read_path(os.path.join(bundle, file))  # noqa: E731

    for role in todo:
        entry = graphs[role]
        src = path(entry["file"])
        out_name = names[role]
        started = time.perf_counter()
        try:
            model, stats, changed = convert_graph(load_graph(src, role, entry=entry), precision, **options)
        except ConversionError as e:
            raise ConversionError(f"{role} ({entry['file']}): {e}") from None
        info = {"file": None, "stats": stats, "seconds": round(time.perf_counter() - started, 3)}
        out_path = os.path.join(bundle, out_name)
        if not changed:
            log(f"{role}: nothing to convert ({entry['file']} has no op this precision changes); the fp32 graph is used")
            if os.path.isfile(out_path):
                staging.remove(out_path)
        else:
            def verify(written_path, role=role, entry=entry, src=src, info=info, out_name=out_name):
                """The check, on the written graph before it replaces anything (see --tolerance)."""
                probe = written_path
                if precision == "bf16" and not emulate:
                    probe, _ = to_half(onnx.load(src), precision, emulate=True)
                try:
                    err = compare(role, manifest, entry, src, probe, seed)
                except Exception as e:  # noqa: BLE001 - ONNX Runtime's errors are many
                    raise ConversionError(f"{role}: the {precision} graph does not run in ONNX Runtime: {e}") from e
                _judge(role, err, precision, emulate, tolerance, out_name, info, log)

            staging.save(model, out_path, verify=verify if check else None)
            files[role] = info["file"] = out_name
            info["bytes"] = staging.staged_bytes(out_path)
            log(f"{role}: wrote {out_name} ({info['bytes'] / 1e6:.2f} MB; {json.dumps(stats)})")
        report["graphs"][role] = info
    chain_roles = [r for r in ("sampler", "tick") if r in graphs]
    if chain_roles and "diffusion" in todo and "diffusion" in files:
        # The whole-chain sampler and the tick graph around this precision's head
        # (models/add_sampler.py).
        for role, name in write_sampler(bundle, manifest, files["diffusion"], precision, log=log,
                                        roles=chain_roles, staging=staging).items():
            files[role] = name
            report["graphs"][role] = {"file": name}
    if split and "diffusion" in todo and "diffusion" in files:
        # The two parts of the head (models/split_head.py), each converted as the head is: the
        # float32 parts' cut, so that a value crossing it crosses in float32.
        parts = {}
        for role in SPLIT_ROLES:
            model, stats, _ = convert_graph(load_graph(path(graphs[role]["file"]), role), precision, **options)
            staging.save(model, os.path.join(bundle, names[role]))
            files[role] = parts[role] = names[role]
            report["graphs"][role] = {"file": names[role], "stats": stats}
        if check:
            probes = [path(parts[r]) for r in SPLIT_ROLES]
            if precision == "bf16" and not emulate:
                probes = [to_half(load_graph(path(graphs[r]["file"]), r), precision, emulate=True)[0]
                          for r in SPLIT_ROLES]
            try:
                err = compare_split(manifest, path(graphs["diffusion"]["file"]), *probes, seed)
            except Exception as e:  # noqa: BLE001
                raise ConversionError(f"diffusion_condition, diffusion_state: the {precision} parts do not run in "
                                      f"ONNX Runtime: {e}") from e
            _judge("diffusion_condition + diffusion_state", err, precision, emulate, tolerance,
                   f"{parts['diffusion_condition']}, {parts['diffusion_state']}", report["graphs"]["diffusion_state"], log)
        log(f"{parts['diffusion_condition']}, {parts['diffusion_state']}: the split head's parts in {precision}")
    if "backbone" in graphs and rebuilt & {"encoder", "decoder"} and "encoder" in files and "decoder" in files:
        # The fused backbone of this precision's encoder and decoder (models/add_backbone.py).
        files["backbone"] = write_backbone(bundle, manifest, files["encoder"], files["decoder"], precision, log=log,
                                           staging=staging)
        report["graphs"]["backbone"] = {"file": files["backbone"]}
    order = ROLES + ["sampler", "tick", *SPLIT_ROLES, "backbone"]
    files = dict(sorted(files.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    new_text = manifest_with_precisions(text, precision, files)
    parsed = yaml.safe_load(new_text)
    if (parsed.get("precisions") or {}).get(precision, {}) != files:
        raise ConversionError("internal error: the rewritten manifest does not read back")
    staging.write_manifest(new_text)
    report["files"] = files
    return report


def _judge(what, err, precision, emulate, tolerance, out_name, info, log):
    """Records and prints a check's numbers; ConversionError over the tolerance."""
    err["emulated"] = precision == "bf16" or emulate
    info["error_vs_fp32"] = err
    log(f"{what}: |{precision}{' (emulated)' if err['emulated'] else ''} - fp32| max {err['max_abs']:.3g}, "
        f"mean {err['mean_abs']:.3g} (outputs up to {err['output_max_abs']:.3g})")
    if not err["max_abs"] <= tolerance * err["output_max_abs"]:
        raise ConversionError(
            f"{what}: the {precision} graph is off by up to {err['max_abs']:.3g} against the float32 "
            f"graph's outputs of up to {err['output_max_abs']:.3g}, over --tolerance {tolerance:g} of "
            f"them; nothing is written ({out_name}, the other variants and manifest.yaml are left as they were)")


def seed(text: str) -> int:
    """--seed: an integer of at least 0 (NumPy's generators take no negative seed)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def tolerance(text: str) -> float:
    """--tolerance: a finite number of at least 0 (a share of the largest fp32 output)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number of at least 0")
    return value


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", help="bundle folder (holding manifest.yaml)")
    ap.add_argument("--precision", required=True, choices=PRECISIONS)
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the comparison with fp32")
    ap.add_argument("--emulate", action="store_true",
                    help="write, as the fp16/bf16 variant, a float32 graph that rounds through the half "
                         "type where the variant would compute in it: to measure half precision's quality "
                         "on a CPU that cannot run it (slow; never a real variant)")
    ap.add_argument("--per-tensor", dest="per_channel", action="store_false", help="int8: one scale per weight tensor")
    ap.add_argument("--per-row-activations", dest="per_row", action="store_true",
                    help="int8: one activation scale per row, so that an image does not depend on the other "
                         "images of its batch (slower: the quantization runs as separate ops)")
    ap.add_argument("--quantize-token-projections", action="store_true",
                    help="int8: quantize the projections from and to the token space too (kept float32 by default)")
    ap.add_argument("--seed", type=seed, default=0, help="seed of the check's random inputs (0 or more)")
    ap.add_argument("--tolerance", type=tolerance, default=DEFAULT_TOLERANCE,
                    help="the check refuses a graph whose max |variant - fp32| exceeds this share of the "
                         "largest fp32 output (default %(default)s)")
    ap.add_argument("--report", help="also write the report as JSON here")
    args = ap.parse_args()
    bundle = args.bundle
    if os.path.isfile(bundle):
        bundle = os.path.dirname(bundle) or "."

    def body():
        # Checked first: the report is written after the bundle has changed.
        report_path = args.report and output_file("--report", args.report, bundle)
        report = convert(bundle, args.precision, args.check, args.emulate, args.per_channel, args.seed,
                         tolerance=args.tolerance, per_row=args.per_row,
                         quantize_token_projections=args.quantize_token_projections)
        if report_path:
            try:
                write_atomic(report_path, json.dumps(report, indent=2) + "\n")
            except OSError as e:
                print(f"error: --report {args.report}: cannot be written ({type(e).__name__}: {e}); the "
                      f"{args.precision} variants were written and manifest.yaml lists them", file=sys.stderr)
                return 2
        return 0

    return run_tool(body, bundle)


if __name__ == "__main__":
    sys.exit(main())

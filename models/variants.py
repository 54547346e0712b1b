"""Precision variants of a bundle's graphs: the precisions and roles models/convert_precision.py
converts, the graphs derived from them, and how a variant on disk was made, read back from its
graphs so that a tool rebuilding it (fuse_attention.py, the notes of add_sampler.py and the other
tools that add derived graphs) makes it the same way.
"""
from __future__ import annotations

import os
import shlex

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper

from models.onnx_save import BundleError, one_line

PRECISIONS = ["fp16", "bf16", "int8"]
# The graphs convert_precision.py converts.
ROLES = ["encoder", "decoder", "diffusion", "vae_decoder"]
# The two parts of the head (models/split_head.py), converted as the head is.
SPLIT_ROLES = ("diffusion_condition", "diffusion_state")
# Graphs made from the converted ones, not converted themselves.
DERIVED_ROLES = ["sampler", "tick", "backbone", *SPLIT_ROLES]
# The graphs each derived graph is made from: rebuilt when one of them is converted.
DERIVED_FROM = {"sampler": ("diffusion",), "tick": ("diffusion",), "backbone": ("encoder", "decoder"),
                "diffusion_condition": ("diffusion",), "diffusion_state": ("diffusion",)}
HALF_TYPE = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


def _attribute(node, name: str, default=None):
    """The value of a node's attribute `name`, or `default`."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def half_compute(model: onnx.ModelProto) -> bool:
    """Whether an op other than a Cast reads a half tensor (a half weight or a Cast to half): a real
    fp16/bf16 variant; convert_precision.py's --emulate only rounds through half casts."""
    half_types = set(HALF_TYPE.values())
    half = {i.name for i in model.graph.initializer if i.data_type in half_types}
    half |= {n.output[0] for n in model.graph.node if n.op_type == "Cast" and _attribute(n, "to") in half_types}
    return any(n.op_type != "Cast" and set(n.input) & half for n in model.graph.node)


def per_channel(model: onnx.ModelProto):
    """Whether an int8 variant's weights have a scale per output channel (convert_precision.py's
    default) rather than one each (--per-tensor); None when it has no quantized MatMul."""
    inits = {i.name: i for i in model.graph.initializer}
    # The weight's zero point (MatMulInteger) or scale (DynamicQuantizeMatMul): one value per tensor.
    weight_params = [n.input[3] if n.op_type == "MatMulInteger" else n.input[2] for n in model.graph.node
                     if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    sizes = [int(np.prod(inits[p].dims)) for p in weight_params if p in inits]
    return any(size > 1 for size in sizes) if sizes else None


def per_row_activations(model: onnx.ModelProto):
    """Whether an int8 variant quantizes its activations per row (--per-row-activations) rather than
    per tensor (convert_precision.py's default: DynamicQuantizeLinear, or ONNX Runtime's fused
    DynamicQuantizeMatMul); None when it has no quantized MatMul."""
    ops = {n.op_type for n in model.graph.node}
    if not ops & {"MatMulInteger", "DynamicQuantizeMatMul"}:
        return None
    return not ops & {"DynamicQuantizeLinear", "DynamicQuantizeMatMul"}


def token_projections_quantized(model: onnx.ModelProto, token_dim) -> bool | None:
    """Whether an int8 variant quantized its token projections (--quantize-token-projections: a
    quantized weight with a dimension of at most 2 * token_dim) or kept them float32 (a float
    MatMul weight of that size); None when it has none."""
    if not isinstance(token_dim, int) or token_dim <= 0:
        return None
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    small = lambda w: len(shapes.get(w, [])) == 2 and min(shapes[w]) <= 2 * token_dim  # noqa: E731
    nodes = model.graph.node
    if any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") and small(n.input[1]) for n in nodes):
        return True
    if any(n.op_type == "MatMul" and small(n.input[1]) for n in nodes):
        return False
    return None


def variant_options(bundle: str, manifest: dict) -> dict[str, dict]:
    """{precision: convert_precision.convert's options} that rebuild each variant the manifest lists
    as it was made: emulate for an fp16/bf16 variant that only rounds through half (--emulate),
    per_channel False for a per-tensor int8 one (--per-tensor), per_row True for one with
    per-row activations (--per-row-activations), quantize_token_projections True for one with its
    token projections quantized (--quantize-token-projections). BundleError where a variant cannot
    be read or is not one convert_precision.py makes."""
    options = {}
    where = os.path.join(bundle, "manifest.yaml")
    for precision, files in (manifest.get("precisions") or {}).items():
        rebuild = f"remove precisions.{precision} from manifest.yaml and rebuild it after fusing " \
                  f"(python3 models/convert_precision.py {shlex.quote(bundle)} --precision {precision} ...)"
        if precision not in PRECISIONS:
            raise BundleError(f"{where}: precisions.{precision}: not a variant convert_precision.py makes (it makes "
                              f"{', '.join(PRECISIONS)}); remove precisions.{precision} from manifest.yaml")
        if not isinstance(files, dict):
            raise BundleError(f"{where}: precisions.{precision}: not a mapping of roles to files; {rebuild}")
        models = []
        for role, file in files.items():
            if role not in ROLES:  # sampler, backbone: rebuilt from the others
                continue
            path = os.path.join(bundle, file)
            try:
                models.append(onnx.load(path, load_external_data=False))
            except (OSError, DecodeError) as e:
                raise BundleError(f"precisions.{precision}: {path} cannot be read ({one_line(e)}), so how it was made "
                                 f"cannot be told; {rebuild}") from e
        if precision == "int8":
            found = {per_channel(m) for m in models} - {None}
            options[precision] = {"per_channel": False} if found == {False} else {}
            if {per_row_activations(m) for m in models} - {None} == {True}:
                options[precision]["per_row"] = True
            if {token_projections_quantized(m, manifest.get("token_dim")) for m in models} - {None} == {True}:
                options[precision]["quantize_token_projections"] = True
        else:
            options[precision] = {"emulate": True} if models and not any(map(half_compute, models)) else {}
    return options


# The convert_precision.py flags of variant_options' options.
FLAGS = {"emulate": "--emulate", "per_channel": "--per-tensor", "per_row": "--per-row-activations",
         "quantize_token_projections": "--quantize-token-projections"}


def variant_flags(bundle: str, manifest: dict, precision: str) -> str:
    """The convert_precision.py options the bundle's `precision` variant was made with, as flags
    (each with a leading space); empty where they cannot be told."""
    try:
        files = manifest["precisions"][precision]
        options = variant_options(bundle, {"precisions": {precision: files}, "token_dim": manifest.get("token_dim")})
    except (BundleError, KeyError, TypeError):
        return ""
    return "".join(f" {FLAGS[k]}" for k in options[precision])

#!/usr/bin/env python3
"""Fuses the attention of a bundle's encoder and decoder into ONNX Runtime's MultiHeadAttention.

    python3 models/fuse_attention.py BUNDLE [--no-check]

MAR's attention, as export_mar.py exports it, is a chain of plain ops per block: the qkv
projection reshaped to [B, L, 3, H, d] and permuted, q scaled, q·kᵀ, Softmax, ·v, permuted and
reshaped back. Run that way, every block writes the scores [B, H, L, L] to memory and reads them
back several times. PyTorch's MAR runs F.scaled_dot_product_attention instead (a fused kernel).
This script gives ONNX Runtime the same chance: each such chain becomes one
`com.microsoft.MultiHeadAttention` node (q, k and v split from the projection along its last
axis, `num_heads` and `scale` read from the chain), which the CUDA provider runs with its fused
attention kernels and the CPU provider with its own.

The graphs keep their tensors (the contract in models/README.md), so gtr-run needs nothing new;
the numbers change at float rounding. A chain that does not have this shape is left as it is
and reported; a graph without any is left alone. Derived graphs are rebuilt: the `backbone`
graph from the fused encoder and decoder (models/add_backbone.py) and every precision variant the
manifest lists (models/convert_precision.py; for fp16 the fused node runs in half precision, as
autocast runs scaled_dot_product_attention).

Files are replaced by writing a temporary file and renaming it (models/onnx_save.py), so a bundle
copied with hard links is not changed through its links; a graph over 2 GB keeps its weights in
a data file beside it. Unless --no-check, each fused graph is compared with the plain one in
onnxruntime (CPU) on random inputs shaped by the manifest before it replaces it; the run fails
when they differ by more than 1e-4.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.onnx_save import save_model  # noqa: E402

MSFT = "com.microsoft"
ROLES = ("encoder", "decoder")
TOLERANCE = 1e-4


class FuseError(Exception):
    """A fused graph that does not match the plain one (nothing of it was written)."""


class Graph:
    """Producer, consumer and constant lookups over one ONNX graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {i.name: i for i in graph.initializer}

    def const(self, name: str):
        """The value of an initializer or a Constant node's output, else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant" and n.attribute:
            a = n.attribute[0]
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name in ("value_float", "value_int"):
                return np.array(helper.get_attribute_value(a))
        return None

    def op(self, name: str, op_type: str):
        """The node that produces `name` if it is an `op_type`, else None."""
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op_type else None

    def shape_tail(self, name: str, k: int):
        """The last k entries of a shape tensor that is constant there (an initializer, or a
        Concat whose last pieces are constants), else None."""
        value = self.const(name)
        if value is not None:
            return [int(v) for v in value.reshape(-1)[-k:]] if value.size >= k else None
        concat = self.op(name, "Concat")
        if concat is None:
            return None
        tail: list[int] = []
        for piece in reversed(concat.input):
            value = self.const(piece)
            if value is None:
                return None
            tail = [int(v) for v in value.reshape(-1)] + tail
            if len(tail) >= k:
                return tail[-k:]
        return None


def attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def scaling(g: Graph, name: str):
    """(x, factor) when `name` is x · c or x / c with c a scalar constant, else None."""
    for op_type in ("Mul", "Div"):
        node = g.op(name, op_type)
        if node is None or len(node.input) != 2:
            continue
        values = [g.const(i) for i in node.input]
        sides = [v for v in (0, 1) if values[v] is not None and values[v].size == 1]
        if op_type == "Div":
            sides = [1] if 1 in sides else []
        if len(sides) != 1:
            return None
        c = float(values[sides[0]].reshape(-1)[0])
        return node.input[1 - sides[0]], (c if op_type == "Mul" else 1.0 / c)
    return None


def unscaled(g: Graph, name: str):
    """(x, c) when `name` is x scaled by a scalar constant c, (name, 1.0) when it is not scaled
    at all, (None, None) when it is multiplied or divided by anything else."""
    scaled = scaling(g, name)
    if scaled is not None:
        return scaled
    if g.op(name, "Mul") is not None or g.op(name, "Div") is not None:
        return None, None
    return name, 1.0


def selected(g: Graph, name: str):
    """(permute node, index) when `name` is q, k or v taken from the permuted projection
    ([B, L, 3, H, d] permuted to [3, B, H, L, d]): Gather on axis 0 with a scalar index, or a
    Split on axis 0 followed by Squeeze. Else None."""
    gather = g.op(name, "Gather")
    if gather is not None and attr(gather, "axis", 0) == 0:
        index = g.const(gather.input[1])
        permute = g.op(gather.input[0], "Transpose")
        if index is not None and index.size == 1 and permute is not None:
            return permute, int(index.reshape(-1)[0])
    squeeze = g.op(name, "Squeeze")
    if squeeze is not None:
        split = g.op(squeeze.input[0], "Split")
        permute = split and g.op(split.input[0], "Transpose")
        if split is not None and attr(split, "axis", 0) == 0 and permute is not None:
            return permute, list(split.output).index(squeeze.input[0])
    return None


def match(g: Graph, softmax):
    """The fusion of the attention chain around one Softmax, or the reason it does not match:
    (dict, None) or (None, str)."""
    if attr(softmax, "axis", -1) not in (-1, 3):
        return None, "Softmax not over the last axis"
    scores, score_scale = unscaled(g, softmax.input[0])  # scores · c
    if scores is None:
        return None, "the scores are scaled by something other than a constant"
    qk = g.op(scores, "MatMul")
    if qk is None:
        return None, "no MatMul before Softmax"
    q, q_scale = unscaled(g, qk.input[0])  # q · c, as MAR's Attention does it
    if q is None:
        return None, "q is scaled by something other than a constant"
    kt, scale = qk.input[1], score_scale * q_scale
    transpose_k = g.op(kt, "Transpose")
    if transpose_k is None or list(attr(transpose_k, "perm", [])) != [0, 1, 3, 2]:
        return None, "the MatMul's second input is not kᵀ"
    users = g.consumers.get(softmax.output[0], [])
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != softmax.output[0]:
        return None, "Softmax does not feed one MatMul with v"
    av = users[0]
    picks = [selected(g, q), selected(g, transpose_k.input[0]), selected(g, av.input[1])]
    if any(p is None for p in picks) or len({id(p[0]) for p in picks}) != 1:
        return None, "q, k and v are not taken from one permuted projection"
    if [p[1] for p in picks] != [0, 1, 2]:
        return None, "q, k and v are not taken in that order"
    permute = picks[0][0]
    if list(attr(permute, "perm", [])) != [2, 0, 3, 1, 4]:
        return None, "the projection is not permuted to [3, B, H, L, d]"
    reshape = g.op(permute.input[0], "Reshape")
    tail = reshape and g.shape_tail(reshape.input[1], 3)
    if reshape is None or tail is None or tail[0] != 3 or min(tail[1:]) <= 0:
        return None, "the projection is not reshaped to [B, L, 3, H, d] with constant H and d"
    heads, head_dim = tail[1], tail[2]
    back = g.consumers.get(av.output[0], [])
    if len(back) != 1 or back[0].op_type != "Transpose" or list(attr(back[0], "perm", [])) != [0, 2, 1, 3]:
        return None, "the attention output is not permuted back to [B, L, H, d]"
    merged = g.consumers.get(back[0].output[0], [])
    if len(merged) != 1 or merged[0].op_type != "Reshape":
        return None, "the attention output is not reshaped to [B, L, D]"
    width = g.shape_tail(merged[0].input[1], 1)
    if width != [heads * head_dim]:
        return None, "the attention output is not reshaped to [B, L, H·d]"
    return {"projection": reshape.input[0], "output": merged[0].output[0], "heads": heads,
            "width": heads * head_dim, "scale": scale, "name": softmax.name or softmax.output[0]}, None


def fuse(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, list[str]]:
    """The model with every matching attention chain fused; the count fused and why the others
    were not."""
    version = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if version < 13:  # Split with its sizes as an input
        return model, 0, [f"opset {version}: fusing needs opset 13 or later"]
    g = Graph(model.graph)
    fusions, skipped = [], []
    for n in list(model.graph.node):
        if n.op_type == "Softmax":
            found, why = match(g, n)
            if found:
                fusions.append(found)
            else:
                skipped.append(f"{n.name or n.output[0]}: {why}")
    if not fusions:
        return model, 0, skipped
    taken = {o for n in model.graph.node for o in n.output} | set(g.inits)
    new_nodes = []
    for i, f in enumerate(fusions):
        q, k, v = (f"attention{i}_{x}" for x in "qkv")
        assert not {q, k, v} & taken, "fused tensor names collide"
        sizes = f"attention{i}_split"
        model.graph.initializer.append(numpy_helper.from_array(np.array([f["width"]] * 3, np.int64), sizes))
        new_nodes.append(helper.make_node("Split", [f["projection"], sizes], [q, k, v], axis=-1,
                                          name=f"attention{i}_split"))
        new_nodes.append(helper.make_node("MultiHeadAttention", [q, k, v], [f["output"]], domain=MSFT,
                                          num_heads=f["heads"], scale=f["scale"], name=f"attention{i}"))
    # Each fused pair goes where the Reshape it replaces stood; then what nothing reads is dropped.
    at = {f["output"]: new_nodes[2 * i: 2 * i + 2] for i, f in enumerate(fusions)}
    nodes = []
    for n in model.graph.node:
        replaced = [o for o in n.output if o in at]
        nodes.extend(at[replaced[0]] if replaced else [n])
    del model.graph.node[:]
    model.graph.node.extend(prune(nodes, {o.name for o in model.graph.output}))
    used = {i for n in model.graph.node for i in n.input}
    keep_inits = [x for x in model.graph.initializer if x.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep_inits)
    # ONNX's shape inference does not know MultiHeadAttention: its outputs are declared float32
    # [B, L, D] so that types still flow past it (convert_precision.py relies on them).
    declared = {v.name for v in list(model.graph.value_info) + list(model.graph.output)}
    for f in fusions:
        if f["output"] not in declared:
            model.graph.value_info.append(
                helper.make_tensor_value_info(f["output"], onnx.TensorProto.FLOAT, [None, None, f["width"]]))
    if not any(o.domain == MSFT for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MSFT, 1))
    return model, len(fusions), skipped


def prune(nodes: list, outputs: set[str]) -> list:
    """`nodes` less those whose outputs nothing reads (repeated until none is left)."""
    while True:
        read = outputs | {i for n in nodes for i in n.input}
        alive = [n for n in nodes if set(n.output) & read]
        if len(alive) == len(nodes):
            return nodes
        nodes = alive


def fuse_bundle(bundle: str, check: bool = True, log=print) -> dict:
    """Fuses the encoder's and decoder's attention in place and rebuilds derived graphs; returns
    {role: chains fused}."""
    from models.add_sampler import read_manifest

    _, manifest = read_manifest(bundle)
    graphs = manifest["graphs"]
    # Every graph is read and fused before any is written, so an unreadable one changes nothing.
    fused = {}
    for role in ROLES:
        path = os.path.join(bundle, graphs[role]["file"])
        try:
            model = onnx.load(path)
        except DecodeError as e:
            raise ValueError(f"{path} ({role}) is not an ONNX graph: {e}") from e
        model, count, skipped = fuse(model)
        for line in skipped:
            log(f"{role}: left as it is: {line}")
        fused[role] = (model, count)
    fused_counts = {role: count for role, (_, count) in fused.items()}
    for role, (model, count) in fused.items():
        entry = graphs[role]
        path = os.path.join(bundle, entry["file"])
        if not count:
            log(f"{role}: no attention chain to fuse")
            continue
        model.producer_name = "gtr-run fuse_attention.py"

        def verify(fused_path, role=role, entry=entry, path=path):
            if not check:
                return
            from models.convert_precision import compare

            err = compare(role, manifest, entry, path, fused_path, seed=0)
            log(f"{role}: |fused - plain| max {err['max_abs']:.3g} (outputs up to {err['output_max_abs']:.3g})")
            if not err["max_abs"] <= TOLERANCE:
                raise FuseError(f"{path}: the fused graph differs from the plain one by "
                                f"{err['max_abs']:.3g} (more than {TOLERANCE}); this graph is left as it was")

        save_model(model, path, verify=verify)
        log(f"{role}: {count} attention chains fused into MultiHeadAttention ({entry['file']})")
    if not any(fused_counts.values()):
        return fused_counts
    if "backbone" in graphs:
        from models.add_backbone import write_backbone

        write_backbone(bundle, manifest, graphs["encoder"]["file"], graphs["decoder"]["file"], log=log)
    for precision in manifest.get("precisions") or {}:
        from models.convert_precision import convert

        log(f"precision {precision}: rebuilt from the fused graphs")
        convert(bundle, precision, check=check, log=log)
    return fused_counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", help="bundle folder (manifest.yaml, encoder and decoder graphs)")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the comparison with the plain graphs")
    args = ap.parse_args(argv)
    if not os.path.isfile(os.path.join(args.bundle, "manifest.yaml")):
        print(f"error: {args.bundle}: no manifest.yaml there; give a bundle folder", file=sys.stderr)
        return 2
    try:
        counts = fuse_bundle(args.bundle, check=args.check)
    except (FuseError, OSError, KeyError, ValueError, onnx.checker.ValidationError) as e:
        # A graph file missing or unreadable, a manifest without a role: read before anything
        # is written, so nothing was replaced.
        print(f"error: {args.bundle}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0 if any(counts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

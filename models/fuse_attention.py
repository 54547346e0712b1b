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
the numbers change at float rounding. A chain that does not have this shape (a projection that is
not [B, L, 3D], among others) is left as it is and reported; a graph without any is left alone.
Derived graphs are rebuilt: the `backbone` graph from the fused encoder and decoder
(models/add_backbone.py) and each precision variant's encoder and decoder, and its backbone
(models/convert_precision.py; for fp16 the fused node runs in half precision, as autocast runs
scaled_dot_product_attention), with the options the variant was made with, read from its graphs
(--emulate, --per-tensor, --per-row-activations, --quantize-token-projections). Graphs fusing
does not change (the head's variants, the sampler) are left as they are.

Everything is written aside and, unless --no-check, each fused graph compared with the plain one
in onnxruntime (CPU) on random inputs shaped by the manifest; only then is everything renamed into
place together, the manifest last (models/onnx_save.py), so a bundle copied with hard links is not
changed through its links, and a failure or an interruption before that changes nothing (a run
killed while renaming is finished by the next tool run on the bundle). A graph over 2 GB keeps its
weights in a data file beside it. A graph the manifest takes from outside the bundle folder
(`../tiny/...`, or a subfolder that is a link leading out) is never replaced: its fused graph is
written into the bundle under its own name and the manifest's `file` entry points there.

Exit status: 0 when chains were fused, or when the bundle is fused already (then derived graphs
still made from the plain graphs, if any, are rebuilt; nothing else changes); 1 when neither graph
has an attention chain to fuse nor a fused node; 2 when the graphs differ by more than 1e-4, the
comparison cannot run, or an input is missing or malformed (one line naming it; nothing changed).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.add_backbone import write_backbone  # noqa: E402
from models.convert_precision import compare, convert  # noqa: E402
from models.onnx_save import BundleError, Staging, load_graph, placed_names, run_tool  # noqa: E402
from models.variants import variant_options  # noqa: E402

MSFT = "com.microsoft"
ROLES = ("encoder", "decoder")
TOLERANCE = 1e-4


class FuseError(BundleError):
    """A fused graph that does not match the plain one, or that could not be compared with it
    (no file of the bundle was replaced)."""


class Graph:
    """Producer, consumer, constant and inferred-shape lookups over one ONNX graph."""

    def __init__(self, graph: onnx.GraphProto, shapes: dict | None = None):
        self.graph = graph
        self.shapes = shapes or {}
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

    def rank(self, name: str):
        """The rank of a tensor as shape inference gave it, else None."""
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

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


def inferred_shapes(model: onnx.ModelProto) -> dict:
    """{tensor: dims (int, or None where not known)} from ONNX shape inference, run on a copy whose
    large weights are left out (their dims are all it reads), so a graph over 2 GB is inferred
    too; {} where inference fails."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = light.graph
    for field in ("node", "input", "output", "value_info"):
        getattr(g, field).extend(getattr(model.graph, field))
    for init in model.graph.initializer:
        if init.ByteSize() <= 1 << 20:
            g.initializer.append(init)
            continue
        stub = g.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims,
                                 data_location=onnx.TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value="left-out")
    try:
        inferred = onnx.shape_inference.infer_shapes(light).graph
    except Exception:  # noqa: BLE001 - no shapes: every chain is then left, with its reason
        return {}
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in list(inferred.input) + list(inferred.value_info) + list(inferred.output)
            if v.type.tensor_type.HasField("shape")}


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
    # MultiHeadAttention takes q, k and v as [B, L, D]: split from a [B, L, 3D] projection only.
    rank = g.rank(reshape.input[0])
    if rank != 3:
        return None, f"the projection is not [B, L, 3D] (rank {rank if rank is not None else 'unknown'})"
    if g.shapes[reshape.input[0]][-1] not in (None, 3 * heads * head_dim):
        return None, "the projection's last axis is not 3·H·d"
    back = g.consumers.get(av.output[0], [])
    if len(back) != 1 or back[0].op_type != "Transpose" or list(attr(back[0], "perm", [])) != [0, 2, 1, 3]:
        return None, "the attention output is not permuted back to [B, L, H, d]"
    merged = g.consumers.get(back[0].output[0], [])
    if len(merged) != 1 or merged[0].op_type != "Reshape":
        return None, "the attention output is not reshaped to [B, L, D]"
    width = g.shape_tail(merged[0].input[1], 1)
    if width != [heads * head_dim]:
        return None, "the attention output is not reshaped to [B, L, H·d]"
    target = g.const(merged[0].input[1])
    rank = g.rank(merged[0].output[0]) or (target.size if target is not None else None)
    if rank != 3:
        return None, f"the attention output is not reshaped to [B, L, D] (rank {rank if rank is not None else 'unknown'})"
    return {"projection": reshape.input[0], "output": merged[0].output[0], "heads": heads,
            "width": heads * head_dim, "scale": scale, "name": softmax.name or softmax.output[0]}, None


def fuse(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, list[str]]:
    """The model with every matching attention chain fused; the count fused and why the others
    were not."""
    version = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if version < 13:  # Split with its sizes as an input
        return model, 0, [f"opset {version}: fusing needs opset 13 or later"]
    g = Graph(model.graph, inferred_shapes(model))
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


def fused_names(bundle: str, manifest: dict, roles: list[str]) -> dict[str, str]:
    """{role: file} where each role's fused graph goes: its own file when that is in the bundle
    (symbolic links resolved), else a free name in the bundle (the file's name, else ROLE.onnx,
    else ROLE.fused.onnx; models.onnx_save.placed_names)."""
    return placed_names(bundle, manifest, roles, lambda role: f"graphs.{role}", lambda file, role: file,
                        lambda file, role: [os.path.basename(file), f"{role}.onnx", f"{role}.fused.onnx"],
                        free_on_disk=True)


def manifest_with_files(text: str, files: dict[str, str]) -> str:
    """The manifest text with `graphs.<role>.file` set to files[role]; everything else as written.
    ValueError where an entry is not written in a way this can rewrite."""
    import yaml

    manifest = yaml.safe_load(text)
    lines = text.splitlines(keepends=True)
    top = next((i for i, ln in enumerate(lines) if re.match(r"graphs\s*:", ln)), None)
    for role, file in files.items():
        old = manifest["graphs"][role]["file"]
        at = top is not None and next((i for i in range(top + 1, len(lines)) if re.match(rf"\s+{role}\s*:", lines[i])
                                       or (lines[i].strip() and lines[i][0] not in " \t#")), None)
        if at and re.match(rf"\s+{role}\s*:", lines[at]):
            indent = len(lines[at]) - len(lines[at].lstrip())
            block = range(at, len(lines))
            for i in block:
                if i > at and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) <= indent:
                    break
                new, n = re.subn(rf"(\bfile\s*:\s*)([\"']?){re.escape(old)}\2(?=\s*[,}}#\n]|\s*$)",
                                 lambda m: m.group(1) + m.group(2) + file + m.group(2), lines[i], count=1)
                if n:
                    lines[i] = new
                    break
    new_text = "".join(lines)
    want = yaml.safe_load(text)
    for role, file in files.items():
        want["graphs"][role]["file"] = file
    if yaml.safe_load(new_text) != want:
        raise ValueError("manifest.yaml: could not point " + ", ".join(f"graphs.{r}.file to {f}" for r, f in files.items())
                         + " (write those entries as `role: { file: NAME, ... }`)")
    return new_text


def checked(role: str, manifest: dict, entry: dict, plain: str, log):
    """A save_model verify hook: FuseError unless the graph it sees is within TOLERANCE of the
    plain graph at `plain` in onnxruntime; any error running either is a FuseError too."""
    def verify(fused_path):
        try:
            err = compare(role, manifest, entry, plain, fused_path, seed=0)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            raise FuseError(f"{plain} ({role}): the fused graph could not be compared with the plain one "
                            f"({type(e).__name__}: {e}); no graph was replaced") from e
        log(f"{role}: |fused - plain| max {err['max_abs']:.3g} (outputs up to {err['output_max_abs']:.3g})")
        if not err["max_abs"] <= TOLERANCE:
            raise FuseError(f"{plain} ({role}): the fused graph differs from the plain one by "
                            f"{err['max_abs']:.3g} (more than {TOLERANCE}); no graph was replaced")
    return verify


def attention_nodes(model: onnx.ModelProto) -> int:
    """The fused attention nodes (MultiHeadAttention) of a graph."""
    return sum(1 for n in model.graph.node if n.op_type == "MultiHeadAttention" and n.domain == MSFT)


def stale_derived(bundle: str, manifest: dict, fused: dict[str, int]) -> tuple[bool, list[str]]:
    """On a bundle whose encoder and decoder hold `fused` MultiHeadAttention nodes: whether its
    backbone graph, and which precision variants, have fewer (made from the plain graphs before
    they were fused, as a run interrupted by an earlier version of this script left them)."""
    graphs = manifest["graphs"]

    def count(file, role):
        return attention_nodes(load_graph(os.path.join(bundle, file), role, load_external_data=False))

    backbone = "backbone" in graphs and count(graphs["backbone"]["file"], "backbone") < sum(fused.values())
    precisions = []
    for precision, files in (manifest.get("precisions") or {}).items():
        if not isinstance(files, dict):
            continue
        if any(role in files and count(files[role], f"precisions.{precision}.{role}") < fused[role] for role in ROLES) \
                or ("backbone" in files and count(files["backbone"], f"precisions.{precision}.backbone")
                    < sum(fused.values())):
            precisions.append(precision)
    return backbone, precisions


def fuse_bundle(bundle: str, check: bool = True, log=print) -> dict:
    """Fuses the encoder's and decoder's attention and rebuilds derived graphs; returns
    {role: chains fused} (see _fuse)."""
    return _fuse(bundle, check, log)[0]


def _fuse(bundle: str, check: bool, log) -> tuple[dict, bool]:
    """({role: chains fused}, whether the bundle was fused already). Every graph is read, fused,
    written aside and checked, and the derived graphs are rebuilt aside, before any file of the
    bundle is replaced; then all are committed together, the manifest last (models/onnx_save.py),
    so an error or interruption changes nothing. A graph outside the bundle folder is left and its
    fused graph written into the bundle, the manifest pointing to it. On a bundle fused already,
    only derived graphs still made from the plain graphs are rebuilt."""
    bundle = os.path.realpath(bundle)  # the folder read is the folder written (symbolic links, `..`)
    with Staging(bundle, log=log) as staging:
        # Read under the bundle's lock, after an interrupted commit is finished (onnx_save.py).
        text, manifest = staging.manifest()
        graphs = manifest["graphs"]
        for role in ROLES:
            if role not in graphs:
                raise BundleError(f"{os.path.join(bundle, 'manifest.yaml')}: no graphs.{role}")
        # Every graph is read and fused before any is written, so an unreadable one changes nothing.
        fused, present = {}, {}
        for role in ROLES:
            model = load_graph(os.path.join(bundle, graphs[role]["file"]), role, entry=graphs[role])
            present[role] = attention_nodes(model)
            model, count, skipped = fuse(model)
            for line in skipped:
                log(f"{role}: left as it is: {line}")
            if not count:
                log(f"{role}: no attention chain to fuse"
                    + (f" ({present[role]} fused already)" if present[role] else ""))
            fused[role] = (model, count)
        fused_counts = {role: count for role, (_, count) in fused.items()}
        roles = [role for role in ROLES if fused_counts[role]]
        # What would stop the run later is found now, before anything is written.
        options = variant_options(bundle, manifest)
        if roles:
            names = fused_names(bundle, manifest, roles)
            moved = {role: name for role, name in names.items() if name != graphs[role]["file"]}
            new_text = manifest_with_files(text, moved) if moved else text
            rebuild_backbone, rebuild = "backbone" in graphs, list(options)
        elif any(present.values()):
            rebuild_backbone, rebuild = stale_derived(bundle, manifest, present)
            stale = (["backbone"] if rebuild_backbone else []) + [f"precisions.{p}" for p in rebuild]
            log(f"the attention is fused already ({sum(present.values())} MultiHeadAttention nodes); "
                + (f"rebuilding what was made from the plain graphs: {', '.join(stale)}" if stale
                   else "the derived graphs are made from the fused ones"))
            if not stale:
                return fused_counts, True
            moved = {}
        else:
            return fused_counts, False
        for role in roles:
            model, entry = fused.pop(role)[0], graphs[role]
            model.producer_name = "gtr-run fuse_attention.py"
            plain = os.path.join(bundle, entry["file"])
            staging.save(model, os.path.join(bundle, names[role]),
                         verify=checked(role, manifest, entry, plain, log) if check else None)
            del model  # one fused graph in memory at a time
            where = f"{names[role]}, in place of {entry['file']}" if role in moved else names[role]
            log(f"{role}: {fused_counts[role]} attention chains fused into MultiHeadAttention ({where})")
        if moved:
            staging.write_manifest(new_text)
            for role, name in moved.items():
                graphs[role]["file"] = name
            log("manifest.yaml: " + ", ".join(f"graphs.{r}.file = {n}" for r, n in moved.items()))
        if rebuild_backbone:
            write_backbone(bundle, manifest, graphs["encoder"]["file"], graphs["decoder"]["file"], log=log,
                           staging=staging)
        for precision in rebuild:
            kwargs = options[precision]
            made = {"emulate": " (emulated, as before)", "per_channel": " (per tensor, as before)",
                    "per_row": " (activations per row, as before)",
                    "quantize_token_projections": " (token projections quantized, as before)"}
            log(f"precision {precision}: encoder and decoder rebuilt from the fused graphs"
                f"{''.join(made[k] for k in kwargs)}")
            convert(bundle, precision, check=check, log=log, roles=ROLES, staging=staging, **kwargs)
        # All written and checked: now everything replaces what it rebuilds, the manifest last.
        staging.commit()
    return fused_counts, not roles


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", help="bundle folder (manifest.yaml, encoder and decoder graphs)")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the comparison with the plain graphs")
    args = ap.parse_args(argv)

    def body():
        try:
            counts, already = _fuse(args.bundle, args.check, print)
        except (FuseError, ValueError, KeyError, onnx.checker.ValidationError) as e:
            # Found before anything was committed: nothing was replaced.
            print(f"error: {args.bundle}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        return 0 if any(counts.values()) or already else 1

    return run_tool(body, args.bundle)


if __name__ == "__main__":
    sys.exit(main())

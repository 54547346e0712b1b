#!/usr/bin/env python3
"""Adds a `backbone` graph to a model bundle: encoder and decoder fused, returning only the
conditioning vectors of the tokens a step predicts.

    python3 models/add_backbone.py BUNDLE_DIR [--check]

With separate graphs, every MAR step hands the encoder's output back to the host and down again
to the decoder, and the decoder's whole z [B, L, D] comes back although the step uses only the
rows of the tokens it predicts (on MAR-B at batch 64, 100 MB a step). The backbone graph runs
both in one call and gathers those rows on the device. The contract (models/README.md,
"backbone graph"):

  inputs   tokens   f32 [B, L, C]   the canvas (zeros where unknown), as the encoder's
           known    i64 [B, K]      known token indices, ascending, as both graphs'
           label    i64 [B]         class labels, as the encoder's
           predict  i64 [B, N]      the tokens each row predicts this step
  output   z        f32 [B, N, D]   z[b, n] = decoder's z[b, predict[b, n]]

The graph is built from the bundle's own encoder and decoder (any bundle), their weights copied;
the manifest gets a `backbone` entry after the decoder's. gtr-run's `--backbone auto` (default)
uses it on a GPU provider and keeps the encoder and decoder apart on the CPU provider (where the
fused graph has not been shown faster); `--backbone fused` requires it, `split` never uses it.
The numbers are the same. `--check` compares it with the two graphs run one after the other
through onnxruntime and the rows gathered in NumPy, before anything is written into the bundle
(exit status 1 when they differ, 2 on an error naming the input; either way nothing changes).
A bundle whose `precisions` variants list the encoder and decoder gets a note naming the
convert_precision.py command that adds the backbone to them (gtr-run uses a backbone graph only
in the run's precision).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper

# `models.*` from the repository root, also when run as a script
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.derived import add_graphs, bundle_view, graph_tool, manifest_with_graph, save_graph, staged  # noqa: E402
from models.onnx_save import BundleError, load_graph  # noqa: E402

BACKBONE_FILE = "backbone.onnx"
INPUTS = ["tokens", "known", "label", "predict"]
OUTPUT = "z"


def _copy_renamed(graph: onnx.GraphProto, prefix: str, keep: dict[str, str]):
    """`graph`'s nodes, initializers and value infos with every name under `prefix`, except
    those in `keep` (old → new)."""
    for n in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            raise BundleError(f"the {prefix.rstrip('/')} graph's node `{n.name}` ({n.op_type}) holds a "
                              "subgraph; fusing such graphs is not supported")

    def name(v: str) -> str:
        if v == "":
            return v
        return keep.get(v, prefix + v)

    def renamed(protos, kind):
        out = []
        for p in protos:
            c = kind()
            c.CopyFrom(p)
            c.name = name(p.name)
            out.append(c)
        return out

    nodes = []
    for n in graph.node:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.name = prefix + n.name if n.name else ""
        m.input[:] = [name(v) for v in n.input]
        m.output[:] = [name(v) for v in n.output]
        nodes.append(m)
    return nodes, renamed(graph.initializer, onnx.TensorProto), renamed(graph.value_info, onnx.ValueInfoProto)


def build_backbone(encoder: onnx.ModelProto, decoder: onnx.ModelProto, enc_io: dict, dec_io: dict) -> onnx.ModelProto:
    """The fused graph (tensor names of both graphs as the manifest gives them in `*_io`)."""
    ei, eo = enc_io["inputs"], enc_io["outputs"]
    di, do = dec_io["inputs"], dec_io["outputs"]
    enc_keep = {ei["tokens"]: "tokens", ei["known"]: "known", ei["label"]: "label",
                eo["encoded"]: "encoded"}
    dec_keep = {di["encoded"]: "encoded", di["known"]: "known", do["z"]: "z_all"}
    enc_nodes, enc_inits, enc_infos = _copy_renamed(encoder.graph, "encoder/", enc_keep)
    dec_nodes, dec_inits, dec_infos = _copy_renamed(decoder.graph, "decoder/", dec_keep)

    gather = [
        helper.make_node("Constant", [], ["gather/axes"],
                         value=helper.make_tensor("gather/axes_value", TensorProto.INT64, [1], [2])),
        helper.make_node("Unsqueeze", ["predict", "gather/axes"], ["gather/index"]),
        # z_all [B, L, D], index [B, N, 1] → z [B, N, D]
        helper.make_node("GatherND", ["z_all", "gather/index"], [OUTPUT], batch_dims=1),
    ]

    def graph_input(graph: onnx.GraphProto, name: str, new: str) -> onnx.ValueInfoProto:
        v = next(i for i in graph.input if i.name == name)
        c = onnx.ValueInfoProto()
        c.CopyFrom(v)
        c.name = new
        return c

    inputs = [graph_input(encoder.graph, ei["tokens"], "tokens"),
              graph_input(encoder.graph, ei["known"], "known"),
              graph_input(encoder.graph, ei["label"], "label"),
              helper.make_tensor_value_info("predict", TensorProto.INT64, ["batch", "predicted"])]
    z_type = next(o for o in decoder.graph.output if o.name == do["z"]).type.tensor_type
    output = helper.make_tensor_value_info(OUTPUT, z_type.elem_type, ["batch", "predicted", "width"])
    graph = helper.make_graph(enc_nodes + dec_nodes + gather, "backbone", inputs, [output],
                              enc_inits + dec_inits, value_info=enc_infos + dec_infos)
    opsets: dict[str, int] = {}
    for o in list(encoder.opset_import) + list(decoder.opset_import):
        opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    # GatherND's batch_dims needs opset 12, Unsqueeze with an axes input 13.
    opsets[""] = max(opsets.get("", 0), 13)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="gtr-run add_backbone.py")
    model.ir_version = max(encoder.ir_version, decoder.ir_version)
    functions = {(f.domain, f.name): f for f in list(encoder.functions) + list(decoder.functions)}
    model.functions.extend(functions.values())
    return model


def manifest_with_backbone(text: str) -> str:
    """The manifest text with a `backbone` graph entry after the decoder's."""
    return manifest_with_graph(text, "backbone", BACKBONE_FILE, INPUTS, {"z": OUTPUT}, "decoder")


def write_backbone(bundle: str, m: dict, encoder_file: str, decoder_file: str,
                   precision: str | None = None, log=print, staging=None) -> str:
    """Writes the fused graph of `encoder_file` and `decoder_file` as backbone.onnx, or
    backbone.PRECISION.onnx for a precision variant, into `staging` (models.onnx_save.Staging;
    without one, committed at once); returns its name."""
    g = m["graphs"]
    with staged(bundle, staging) as s:
        encoder = load_graph(s.read_path(os.path.join(bundle, encoder_file)), "encoder", entry=g["encoder"])
        decoder = load_graph(s.read_path(os.path.join(bundle, decoder_file)), "decoder", entry=g["decoder"])
        try:
            backbone = build_backbone(encoder, decoder, g["encoder"], g["decoder"])
        except BundleError as e:
            raise BundleError(f"{encoder_file}, {decoder_file}: {e}") from None
        name = save_graph(bundle, backbone, BACKBONE_FILE, precision, s, m, "backbone")
    log(f"{name}: {encoder_file} and {decoder_file} fused, z gathered at the predicted tokens")
    return name


def add_backbone(bundle: str, log=print, checked: bool = False) -> str:
    """Adds the backbone graph (with `checked`, compared by `check` before anything is replaced)."""
    bundle = os.path.realpath(bundle)  # the folder read is the folder written (symbolic links, `..`)

    def write(m, staging):
        g = m["graphs"]
        return {"backbone": write_backbone(bundle, m, g["encoder"]["file"], g["decoder"]["file"], log=log,
                                           staging=staging)}

    add_graphs(bundle, manifest_with_backbone, write,
               (check, 1e-5, "the encoder and decoder run apart") if checked else None,
               ("backbone",), ("encoder", "decoder"), log)
    return os.path.join(bundle, BACKBONE_FILE)


def check(bundle: str, log=print, staging=None) -> float:
    """Max |fused − separate graphs gathered in NumPy| on random inputs, with and without
    known tokens (the graphs staged in `staging`, if given)."""
    import onnxruntime as ort

    m, path = bundle_view(bundle, staging)
    g = m["graphs"]
    (H, W), C = m["grid"], int(m["token_dim"])
    L = H * W
    rng = np.random.default_rng(0)
    session = lambda f: ort.InferenceSession(path(f), providers=["CPUExecutionProvider"])  # noqa: E731
    enc, dec, fused = session(g["encoder"]["file"]), session(g["decoder"]["file"]), session(BACKBONE_FILE)
    worst = 0.0
    for B, K, N in ((3, 0, 5), (4, L // 3, 7)):
        tokens = rng.standard_normal((B, L, C)).astype(np.float32)
        known = np.stack([np.sort(rng.permutation(L)[:K]) for _ in range(B)]).astype(np.int64).reshape(B, K)
        label = rng.integers(0, max(int(m["classes"]), 1), B).astype(np.int64)
        predict = np.stack([np.sort(rng.permutation(L)[:N]) for _ in range(B)]).astype(np.int64)
        ei, di = g["encoder"]["inputs"], g["decoder"]["inputs"]
        encoded = enc.run([g["encoder"]["outputs"]["encoded"]],
                          {ei["tokens"]: tokens, ei["known"]: known, ei["label"]: label})[0]
        z_all = dec.run([g["decoder"]["outputs"]["z"]], {di["encoded"]: encoded, di["known"]: known})[0]
        want = np.take_along_axis(z_all, predict[:, :, None], axis=1)
        got = fused.run([OUTPUT], {"tokens": tokens, "known": known, "label": label, "predict": predict})[0]
        err = float(np.abs(got - want).max())
        worst = max(worst, err)
        log(f"check (B = {B}, K = {K}, N = {N}): max |backbone - encoder, decoder, gather| = {err:.3g}")
    return worst


def main(argv=None) -> int:
    return graph_tool(argv, __doc__, "the encoder and decoder graphs", add_backbone)


if __name__ == "__main__":
    sys.exit(main())

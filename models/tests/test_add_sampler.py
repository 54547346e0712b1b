#!/usr/bin/env python3
"""Tests of add_sampler.py (plain script: run it, it exits non-zero on the first failure).

  .venv/bin/python models/tests/test_add_sampler.py        # ~5 s, needs models/fixtures/requirements.txt

1. On a copy of the tiny bundle it writes sampler.onnx and tick.onnx with their manifest entries
   (once each, also when run twice), both graphs match the per-tick NumPy reference, and they are
   byte for byte the tiny-sampler fixture's (which cargo's golden tests check independently).
2. The tick graph: rows that do not run keep their value exactly, k comes back as k + 1, and rows
   padded with zeros that never run leave the real rows' results as they were.
3. Nothing in the tick graph stops ONNX Runtime's CUDA provider from capturing it in a CUDA graph
   (models/cuda_capture.py's reading of the provider's rule, itself tested on small graphs).
4. The command line with --check exits 0 (run from the repository root, as documented), for
   add_sampler.py and add_backbone.py (whose check compares the backbone graph with the encoder
   and decoder run apart).
5. A valid block-style manifest and a failing --check are refused before any graph is written
   (add_sampler, add_backbone, split_head); a bundle with precision variants gets a note naming
   the convert_precision.py command, which then lists the new graph in the variant.
"""

import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import yaml
from onnx import TensorProto, helper, numpy_helper

MODELS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(MODELS))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_copies import check, copy_tiny  # noqa: E402

from models import add_sampler, cuda_capture  # noqa: E402


def test_writes_both_graphs(tmp):
    bundle = copy_tiny(tmp, "both")
    add_sampler.add_sampler(bundle, log=lambda *_: None)
    add_sampler.add_sampler(bundle, log=lambda *_: None)
    text = open(os.path.join(bundle, "manifest.yaml")).read()
    graphs = yaml.safe_load(text)["graphs"]
    check(graphs["sampler"]["file"] == "sampler.onnx" and graphs["tick"]["file"] == "tick.onnx",
          "the manifest lists the sampler and tick graphs")
    check(text.count("  sampler:") == 1 and text.count("  tick:") == 1, "once each after a second run")
    check(sorted(graphs["tick"]["inputs"]) == sorted(add_sampler.TICK_INPUTS)
          and sorted(graphs["tick"]["outputs"]) == sorted(add_sampler.TICK_OUTPUTS), "the tick graph's roles")
    worst = add_sampler.check(bundle, log=lambda *_: None)
    check(worst < 1e-4, f"both graphs match the per-tick reference (max |diff| {worst:.2g})")
    # That reference is this module's own; the committed tiny-sampler fixture's graphs are also
    # checked against the independent NumPy sampler (cargo's golden tests): the tool must still
    # write them, byte for byte (with the pinned onnx of models/fixtures/requirements.txt).
    for name in ("sampler.onnx", "tick.onnx"):
        fixture = os.path.join(MODELS, "fixtures", "tiny-sampler", name)
        check(open(os.path.join(bundle, name), "rb").read() == open(fixture, "rb").read(),
              f"{name} is the tiny-sampler fixture's, which the golden tests check")


def test_head_weights_named_like_the_chains_values(tmp):
    """A third party's head may name a weight as the chain names one of its own values (`sigma`,
    `xt`) or inputs (`guidance`): those weights are renamed apart, and both graphs still match."""
    bundle = copy_tiny(tmp, "clash")
    path = os.path.join(bundle, "diffusion.onnx")
    head = onnx.load(path)
    taken = {i for node in head.graph.node for i in list(node.input) + list(node.output)}
    weights = [i for i in head.graph.initializer if i.dims][:4]
    for init, new in zip(weights, ["sigma", "xt", "guidance", "k_one"]):
        check(new not in taken, f"`{new}` is free in the head")
        for node in head.graph.node:
            node.input[:] = [new if v == init.name else v for v in node.input]
        init.name = new
    onnx.save(head, path)
    add_sampler.add_sampler(bundle, log=lambda *_: None)
    worst = add_sampler.check(bundle, log=lambda *_: None)
    check(worst < 1e-4, f"with weights named sigma, xt, guidance, k_one both graphs match the reference ({worst:.2g})")
    names = {i.name for i in onnx.load(os.path.join(bundle, "tick.onnx")).graph.initializer}
    check({"head/sigma", "head/xt", "head/guidance", "head/k_one"} <= names, f"… renamed apart ({sorted(names)[:8]})")


def tick_inputs(rng, n, ticks, c, d):
    return {
        "x": rng.standard_normal((n, c)).astype(np.float32),
        "k": np.array(0, np.int64),
        "z": rng.standard_normal((2, n, d)).astype(np.float32),
        "t": rng.integers(0, 1000, (ticks, n)).astype(np.int64),
        "coef": np.stack([rng.uniform(0.5, 1.0, (ticks, n)), rng.uniform(0.0, 0.2, (ticks, n)),
                          rng.uniform(-6, -1, (ticks, n)), rng.uniform(-8, -2, (ticks, n)),
                          rng.uniform(0, 1, (ticks, n))], -1).astype(np.float32),
        "noise": rng.standard_normal((ticks, n, c)).astype(np.float32),
        "running": np.ones((ticks, n), bool),
        "guidance": np.array([3.0], np.float32),
    }


def pad_rows(feeds, extra):
    """`feeds` with `extra` rows of zeros that never run after its own."""
    out = dict(feeds)
    for name, axis in [("x", 0), ("z", 1), ("t", 1), ("coef", 1), ("noise", 1), ("running", 1)]:
        a = feeds[name]
        shape = list(a.shape)
        shape[axis] = extra
        out[name] = np.concatenate([a, np.zeros(shape, a.dtype)], axis=axis)
    return out


def test_tick_semantics(tmp):
    bundle = copy_tiny(tmp, "semantics")
    add_sampler.add_sampler(bundle, log=lambda *_: None)
    m = yaml.safe_load(open(os.path.join(bundle, "manifest.yaml")))
    c, d = int(m["token_dim"]), int(m["width"])
    s = ort.InferenceSession(os.path.join(bundle, "tick.onnx"), providers=["CPUExecutionProvider"])
    feeds = tick_inputs(np.random.default_rng(1), 6, 3, c, d)
    feeds["running"][1, 4:] = False
    feeds["k"] = np.array(1, np.int64)
    x_next, k_next = s.run(add_sampler.TICK_OUTPUTS, feeds)
    check(int(k_next) == 2 and k_next.shape == (), "k_next is k + 1, a scalar")
    check(np.array_equal(x_next[4:], feeds["x"][4:]), "rows that do not run keep their value exactly")
    check(not np.array_equal(x_next[:4], feeds["x"][:4]), "rows that run move")
    padded = s.run(add_sampler.TICK_OUTPUTS, pad_rows(feeds, 5))[0]
    check(np.abs(padded[:6] - x_next).max() < 1e-6 and not padded[6:].any(),
          "padding rows stay zero and leave the real rows' results")


def test_tick_graph_can_be_captured(tmp):
    bundle = copy_tiny(tmp, "capture")
    add_sampler.add_sampler(bundle, log=lambda *_: None)
    tick = onnx.load(os.path.join(bundle, "tick.onnx"))
    check(cuda_capture.capture_blockers(tick) == [], "nothing in the tick graph stops a CUDA graph capture")
    moved, _ = cuda_capture.host_nodes(tick.graph)
    check(sorted(tick.graph.node[i].op_type for i in moved) == ["Concat", "Concat", "Neg", "Slice", "Slice", "Slice"],
          "only the tick graph's shape arithmetic runs on the host")
    sampler = onnx.load(os.path.join(bundle, "sampler.onnx"))
    check([b.split(": ")[-1] for b in cuda_capture.capture_blockers(sampler)] == ["control flow"],
          "the sampler graph's Loop is what stops its capture")


def test_note_on_a_head_that_blocks_capture(tmp):
    bundle = copy_tiny(tmp, "blocking-head")
    path = os.path.join(bundle, "diffusion.onnx")
    head = onnx.load(path)
    out = head.graph.output[0].name
    for n in head.graph.node:
        n.output[:] = [o + "_raw" if o == out else o for o in n.output]
    # the head's output scaled by a number taken from its shape: a host value read on the device
    head.graph.node.extend([helper.make_node("Shape", [out + "_raw"], ["raw_shape"]),
                            helper.make_node("Cast", ["raw_shape"], ["raw_dims"], to=TensorProto.FLOAT),
                            helper.make_node("ReduceMin", ["raw_dims"], ["raw_rows"], keepdims=1),
                            helper.make_node("Div", ["raw_rows", "raw_rows"], ["one"]),
                            helper.make_node("Mul", [out + "_raw", "one"], [out])])
    onnx.save(head, path)
    lines = []
    add_sampler.add_sampler(bundle, log=lines.append)
    notes = [line for line in lines if line.startswith("note:")]
    check(len(notes) == 1 and "tick.onnx" in notes[0] and "reads 'head/one' from the host" in notes[0]
          and "use --sampler graph" in notes[0], f"a tick graph that cannot be captured is said so: {notes}")


def tiny_graph(nodes, inputs, initializers=()):
    """A model of `nodes` with float inputs `inputs` (name: shape) and output `y`."""
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_capture_rule():
    shape_to_math = tiny_graph([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["f"], to=1),
                                helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Mul", ["n", "f"], ["y"])],
                               {"x": [4]})
    check(cuda_capture.capture_blockers(shape_to_math) == ["Mul node 'y' runs on the device but reads 'f' from the host"],
          "a shape used as a number is copied to the device")
    shape_with_input = tiny_graph([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["f"], to=1),
                                   helper.make_node("Mul", ["f", "w"], ["y"])], {"x": [4], "w": [1]})
    check(cuda_capture.capture_blockers(shape_with_input)
          == ["Mul node 'y' runs on the host but reads 'w' from the device", "output 'y' is computed on the host"],
          "a graph input joins the host arithmetic, read from where it is bound, and its output stays there")
    big = numpy_helper.from_array(np.ones(101, np.float32), "big")
    shape_with_weights = tiny_graph([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["f"], to=1),
                                     helper.make_node("Mul", ["f", "big"], ["y"])], {"x": [4]}, [big])
    check(cuda_capture.capture_blockers(shape_with_weights) == ["Mul node 'y' runs on the device but reads 'f' from the host"],
          "a large initializer keeps the node on the device")
    reshape = tiny_graph([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])],
                         {"x": [4]})
    check(cuda_capture.capture_blockers(reshape) == [], "a shape read where the kernel wants it on the host is no copy")
    wide = tiny_graph([helper.make_node("Concat", ["x"] * 33, ["y"], axis=0)], {"x": [4]})
    check(cuda_capture.capture_blockers(wide) == ["Concat node 'y': 33 inputs, the CUDA kernel takes at most 32 while "
                                                  "capturing"], "a Concat of more than 32 inputs")


def test_command_line(tmp):
    bundle = copy_tiny(tmp, "cli")
    root = os.path.dirname(MODELS)
    r = subprocess.run([sys.executable, "models/add_sampler.py", bundle, "--check"], cwd=root,
                       capture_output=True, text=True)
    check(r.returncode == 0 and "tick graph" in r.stdout, f"the command line with --check: {r.stderr[-300:]}")
    r = subprocess.run([sys.executable, "models/add_backbone.py", bundle, "--check"], cwd=root,
                       capture_output=True, text=True)
    compared = re.findall(r"max \|backbone - encoder, decoder, gather\| = (\S+)", r.stdout)
    check(r.returncode == 0 and len(compared) == 2 and all(float(e) < 1e-5 for e in compared),
          f"add_backbone.py --check compares the backbone with the two graphs: {r.stdout[-300:]}{r.stderr[-300:]}")
    with open(os.path.join(bundle, "manifest.yaml")) as f:
        check("backbone" in yaml.safe_load(f)["graphs"], "… and lists it in the manifest")


def test_graphs_the_tools_cannot_build_on(tmp):
    """A head below opset 13 (add_sampler.py) and an encoder holding a subgraph (add_backbone.py,
    convert_precision.py): one line naming the graph's file, exit status 2, nothing changed."""
    root = os.path.dirname(MODELS)
    old = copy_tiny(tmp, "old-opset")
    head = onnx.load(os.path.join(old, "diffusion.onnx"))
    for o in head.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 12
    onnx.save(head, os.path.join(old, "diffusion.onnx"))
    nested = copy_tiny(tmp, "subgraph")
    enc = onnx.load(os.path.join(nested, "encoder.onnx"))
    branch = lambda name, v: helper.make_graph(  # noqa: E731
        [helper.make_node("Constant", [], [name], value=helper.make_tensor(name + "v", TensorProto.FLOAT, [1], [v]))],
        name, [], [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1])])
    enc.graph.node.extend([
        helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("cv", TensorProto.BOOL, [], [True])),
        helper.make_node("If", ["cond"], ["if_out"], then_branch=branch("a", 1.0), else_branch=branch("b", 2.0),
                         name="my_if")])
    onnx.save(enc, os.path.join(nested, "encoder.onnx"))
    for bundle, tool, want in [
        (old, ["add_sampler.py"], "diffusion.onnx: the diffusion graph uses opset 12; the sampler needs 13"),
        (nested, ["add_backbone.py"], "encoder.onnx, decoder.onnx: the encoder graph's node `my_if` (If) holds"),
        (nested, ["convert_precision.py", "--precision", "fp16"], "encoder (encoder.onnx): graphs with subgraphs"),
    ]:
        before = sorted(os.listdir(bundle))
        r = subprocess.run([sys.executable, os.path.join("models", tool[0]), bundle] + tool[1:], cwd=root,
                           capture_output=True, text=True)
        check(r.returncode == 2 and r.stderr.count("\n") == 1 and want in r.stderr
              and sorted(os.listdir(bundle)) == before, f"{tool[0]}: exit 2, one line ({r.stderr.strip()})")


def test_nothing_written_before_the_manifest_and_check(tmp):
    """A block-style manifest (valid, but not editable on one line) and a failing --check are
    refused before any graph is written; a bundle with variants gets a note naming the command
    that remakes the variant as it was made, and convert_precision then adds the new graphs to it."""
    from models import add_backbone, add_sampler, convert_precision, onnx_save, split_head

    bundle = copy_tiny(tmp, "block")
    path = os.path.join(bundle, "manifest.yaml")
    m = yaml.safe_load(open(path))
    text = open(path).read().split("graphs:")[0] + yaml.safe_dump({"graphs": m["graphs"]}, default_flow_style=False)
    open(path, "w").write(text)
    before = sorted(os.listdir(bundle))
    for add in (add_sampler.add_sampler, add_backbone.add_backbone, split_head.add_split):
        try:
            add(bundle, log=lambda *_: None)
            check(False, f"{add.__name__}: a block-style manifest is refused")
        except onnx_save.BundleError as e:
            check("on one line" in str(e) and sorted(os.listdir(bundle)) == before,
                  f"{add.__name__}: refused before anything is written ({e})")
    # Entries indented otherwise get the new entry indented as theirs; an earlier entry of the
    # role written over several lines (which would stay, and win) is refused.
    bundle = copy_tiny(tmp, "indented")
    text = open(path := os.path.join(bundle, "manifest.yaml")).read()
    open(path, "w").write(re.sub(r"(?m)^  (encoder|decoder|diffusion|vae_decoder):", r"    \1:", text))
    add_sampler.add_sampler(bundle, log=lambda *_: None)
    graphs = yaml.safe_load(open(path))["graphs"]
    check(graphs["sampler"]["file"] == "sampler.onnx" and graphs["tick"]["file"] == "tick.onnx",
          "entries indented by four spaces: the new ones are too, and the manifest reads back")
    m = yaml.safe_load(open(path))
    old_entry = dict(m["graphs"]["sampler"], file="old_sampler.onnx")
    blocky = copy_tiny(tmp, "block-sampler")
    # the old entry written as a block among the graph entries, the manifest otherwise as before
    lines = open(path).read().splitlines()
    at = max(i for i, ln in enumerate(lines) if re.match(r"^ +(encoder|decoder|diffusion|vae_decoder|tick):", ln))
    lines = [ln for ln in lines if not re.match(r"^ +sampler:", ln)]
    block = ["    sampler:"] + [f"      {line}" for line in yaml.safe_dump(old_entry).splitlines()]
    lines[at:at] = block
    open(os.path.join(blocky, "manifest.yaml"), "w").write("\n".join(lines) + "\n")
    check(yaml.safe_load(open(os.path.join(blocky, "manifest.yaml")))["graphs"]["sampler"]["file"]
          == "old_sampler.onnx", "(the manifest reads with the block entry)")
    before = {f: open(os.path.join(blocky, f), "rb").read() for f in sorted(os.listdir(blocky))}
    try:
        add_sampler.add_sampler(blocky, log=lambda *_: None)
        check(False, "an earlier sampler entry over several lines is refused")
    except onnx_save.BundleError as e:
        after = {f: open(os.path.join(blocky, f), "rb").read() for f in sorted(os.listdir(blocky))}
        check("could not be written on one line" in str(e) and after == before,
              f"an earlier sampler entry over several lines: refused, nothing changed ({e})")
    bundle = copy_tiny(tmp, "failed-check")
    before = sorted(os.listdir(bundle))
    real = add_sampler.check
    add_sampler.check = lambda *a, **k: 1.0
    try:
        add_sampler.add_sampler(bundle, log=lambda *_: None, checked=True)
        check(False, "a failing --check is reported")
    except onnx_save.CheckFailed:
        check(sorted(os.listdir(bundle)) == before, "a failing --check leaves the bundle as it was")
    finally:
        add_sampler.check = real
    bundle = copy_tiny(tmp, "variants")
    convert_precision.convert(bundle, "int8", check=False, log=lambda *_: None)
    lines = []
    add_backbone.add_backbone(bundle, log=lines.append)
    note = [ln for ln in lines if ln.startswith("note:")]
    check(len(note) == 1 and "precisions.int8" in note[0] and "convert_precision.py" in note[0]
          and "--precision int8" in note[0], f"a note names the command that adds the backbone to int8 ({note})")
    convert_precision.convert(bundle, "int8", check=False, log=lambda *_: None)
    files = yaml.safe_load(open(os.path.join(bundle, "manifest.yaml")))["precisions"]["int8"]
    check(files.get("backbone") == "backbone.int8.onnx", f"… which lists backbone.int8.onnx ({files})")
    # The note's command makes the variant as it was made (read back from its graphs).
    bundle = copy_tiny(tmp, "variant-flags")
    convert_precision.convert(bundle, "int8", check=False, per_channel=False, per_row=True,
                              quantize_token_projections=True, log=lambda *_: None)
    lines = []
    split_head.add_split(bundle, log=lines.append)
    note = [ln for ln in lines if ln.startswith("note:")]
    check(len(note) == 1 and note[0].endswith("--precision int8 --per-tensor --per-row-activations "
                                              "--quantize-token-projections"),
          f"the note names the variant's flags ({note})")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        test_nothing_written_before_the_manifest_and_check(tmp)
        test_writes_both_graphs(tmp)
        test_head_weights_named_like_the_chains_values(tmp)
        test_tick_semantics(tmp)
        test_tick_graph_can_be_captured(tmp)
        test_capture_rule()
        test_note_on_a_head_that_blocks_capture(tmp)
        test_command_line(tmp)
        test_graphs_the_tools_cannot_build_on(tmp)
    print("all add_sampler tests passed")


if __name__ == "__main__":
    main()

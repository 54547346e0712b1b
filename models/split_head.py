#!/usr/bin/env python3
"""Adds the diffusion head cut in two to a model bundle: the part that reads only the timestep and
the conditioning vector, and the part that reads the chain's state.

    python3 models/split_head.py BUNDLE_DIR [--check]

A head's output for a row is f(x, g(t, z)): MAR's time and condition embeddings and every block's
adaLN modulation read only t and z, never the chain's state x (on MAR-B, 65% of the head's
weights). Within a MAR step every row's z is fixed and every tick's t is known before the first
tick, so gtr-run's host chains can run g once for the rows of many ticks together (larger, cheaper
matrix products) and then only f per tick. The contract (models/README.md, "The split head"):

  diffusion_condition   inputs  t     i64 [N]       timesteps, as the head's
                                z     f32 [N, D]    conditioning, as the head's
                        output  cond  f32 [N, S]    every tensor crossing the cut, flattened per
                                                    row and side by side (S is the bundle's)
  diffusion_state       inputs  x     f32 [N, C]    the chain's state, as the head's
                                cond  f32 [N, S]    rows of diffusion_condition's output
                        output  out   f32 [N, 2C]   (C without a learned variance) = the head's

The cut is found in the head's graph itself (any bundle whose head splits by rows): the tensors
computed from t and z alone that a node reading x consumes. The manifest gets both entries after
the diffusion graph's. models/convert_precision.py then gives each precision both parts: the
float32 parts converted as the head is (so a value crossing the cut crosses in float32; a cut
found in a converted head would run through its half or quantized tensors), checked together
against the float32 head; on a bundle whose variants list the head but not the parts, this
script notes the convert_precision.py command that adds them (gtr-run uses split-head graphs
only in the run's precision). `--check` compares the two parts run one after the other with the
whole head before anything is written into the bundle (exit status 1 when they differ, 2 on an
error naming the input, such as a head that does not split; either way nothing changes).
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

CONDITION_FILE = "diffusion_condition.onnx"
STATE_FILE = "diffusion_state.onnx"
CONDITION_INPUTS = ["t", "z"]
STATE_INPUTS = ["x", "cond"]
ROLES = ("diffusion_condition", "diffusion_state")


class SplitError(BundleError):
    """A head that cannot be cut by rows (the message names the graph and tensor)."""


def cut(model: onnx.ModelProto, x: str, conditioning: list[str]) -> list[str]:
    """The tensors computed from the conditioning inputs and not from x that a node reading x
    (directly or not) consumes, in graph order: the split's interface."""
    from_x, from_cond = {x}, set(conditioning)
    frontier: list[str] = []
    for node in model.graph.node:
        inputs = [i for i in node.input if i]
        if any(i in from_x for i in inputs):
            for i in inputs:
                if i in from_cond and i not in from_x and i not in frontier:
                    frontier.append(i)
            from_x.update(node.output)
        elif any(i in from_cond for i in inputs):
            from_cond.update(node.output)
    return frontier


def _renamed(model: onnx.ModelProto, names: dict[str, str]) -> onnx.ModelProto:
    """`model` with the values `names` (old → new) renamed in nodes, graph inputs and outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for node in g.node:
        node.input[:] = [names.get(v, v) for v in node.input]
        node.output[:] = [names.get(v, v) for v in node.output]
    for value in list(g.input) + list(g.output) + list(g.value_info):
        value.name = names.get(value.name, value.name)
    return out


def _row_shapes(part: onnx.ModelProto, t: str, z: str, width: int, names: list[str],
                train_steps: int, head_file: str) -> dict[str, tuple[int, ...]]:
    """Each cut tensor's shape after its row axis, found by running the (t, z) part on 2 and on 3
    rows; a tensor whose first axis is not the rows (or whose rest changes) is a SplitError."""
    import onnxruntime as ort

    session = ort.InferenceSession(part.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    seen: dict[str, tuple[int, ...]] = {}
    for rows in (2, 3):
        feeds = {t: rng.integers(0, train_steps, rows).astype(np.int64),
                 z: rng.standard_normal((rows, width)).astype(np.float32)}
        for name, value in zip(names, session.run(names, feeds)):
            if value.dtype != np.float32:
                raise SplitError(f"{head_file}: tensor `{name}` crosses the cut as {value.dtype}, not float32; "
                                 "this head does not split")
            if value.ndim < 1 or value.shape[0] != rows or seen.get(name, value.shape[1:]) != value.shape[1:]:
                raise SplitError(f"{head_file}: tensor `{name}` crossing the cut has shape {list(value.shape)} "
                                 f"on {rows} rows, not [{rows}, ...]; this head does not split by rows")
            seen[name] = value.shape[1:]
    return seen


def split_head(head: onnx.ModelProto, io: dict, width: int, train_steps: int,
               head_file: str = "diffusion.onnx") -> tuple[onnx.ModelProto, onnx.ModelProto, int]:
    """The head graph `head` (its manifest entry `io`) cut into the condition and state graphs of
    the contract above, and S, the width of `cond`."""
    from onnx.utils import Extractor

    x, t, z = (io["inputs"][r] for r in ("x", "t", "z"))
    out = io["outputs"]["out"]
    frontier = cut(head, x, [t, z])
    if not frontier:
        raise SplitError(f"{head_file}: nothing is computed from `{t}` and `{z}` alone before `{x}` is read; "
                         "there is nothing to split")
    extractor = Extractor(onnx.shape_inference.infer_shapes(head))
    for name in frontier:  # where shape inference gave no type (checked by running below)
        extractor.value_infos.setdefault(name, helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    condition = extractor.extract_model([t, z], frontier)
    state = extractor.extract_model([x] + frontier, [out])
    shapes = _row_shapes(condition, t, z, width, frontier, train_steps, head_file)
    sizes = [int(np.prod(shapes[n], dtype=np.int64)) for n in frontier]
    total = sum(sizes)

    # condition: each cut tensor flattened per row, then side by side as `cond`.
    flat = []
    for i, name in enumerate(frontier):
        flat.append(f"split/flat{i}")
        condition.graph.node.append(helper.make_node("Flatten", [name], [flat[-1]], axis=1, name=f"split/Flatten{i}"))
    condition.graph.node.append(helper.make_node("Concat", flat, ["cond"], axis=1, name="split/Concat"))
    del condition.graph.output[:]
    condition.graph.output.append(helper.make_tensor_value_info("cond", TensorProto.FLOAT, ["N", total]))
    condition = _renamed(condition, {t: "t", z: "z"})

    # state: `cond` sliced back into the cut tensors (reshaped where they had more axes).
    nodes, start = [], 0
    for i, (name, size) in enumerate(zip(frontier, sizes)):
        consts = {"starts": [start], "ends": [start + size], "axes": [1]}
        args = []
        for key, value in consts.items():
            const = f"split/{key}{i}"
            state.graph.initializer.append(helper.make_tensor(const, TensorProto.INT64, [1], value))
            args.append(const)
        sliced = name if len(shapes[name]) == 1 else f"split/slice{i}"
        nodes.append(helper.make_node("Slice", ["cond", *args], [sliced], name=f"split/Slice{i}"))
        if sliced != name:
            shape = f"split/shape{i}"
            state.graph.initializer.append(helper.make_tensor(shape, TensorProto.INT64, [1 + len(shapes[name])],
                                                              [-1, *shapes[name]]))
            nodes.append(helper.make_node("Reshape", [sliced, shape], [name], name=f"split/Reshape{i}"))
        start += size
    body = list(state.graph.node)
    del state.graph.node[:]
    state.graph.node.extend(nodes + body)
    x_input = next(v for v in state.graph.input if v.name == x)
    del state.graph.input[:]
    state.graph.input.extend([x_input, helper.make_tensor_value_info("cond", TensorProto.FLOAT, ["N", total])])
    state = _renamed(state, {x: "x", out: "out"})
    for part in (condition, state):
        part.producer_name = "gtr-run split_head.py"
        onnx.checker.check_model(part)
    return condition, state, total


def manifest_with_split(text: str) -> str:
    """The manifest text with `diffusion_condition` and `diffusion_state` entries after the
    diffusion graph's."""
    text = manifest_with_graph(text, "diffusion_condition", CONDITION_FILE, CONDITION_INPUTS, {"cond": "cond"},
                               "diffusion")
    return manifest_with_graph(text, "diffusion_state", STATE_FILE, STATE_INPUTS, {"out": "out"},
                               "diffusion_condition")


def write_split(bundle: str, m: dict, head_file: str, precision: str | None = None, log=print,
                staging=None) -> dict[str, str]:
    """Writes the two parts of the head graph `head_file` (the manifest's diffusion tensor names)
    as diffusion_condition.onnx and diffusion_state.onnx, or *.PRECISION.onnx, into `staging`
    (models.onnx_save.Staging; without one, committed at once); returns the names by role.
    (convert_precision.py converts the float32 parts instead of cutting a variant head.)"""
    with staged(bundle, staging) as s:
        head = load_graph(s.read_path(os.path.join(bundle, head_file)), "diffusion", entry=m["graphs"]["diffusion"])
        condition, state, total = split_head(head, m["graphs"]["diffusion"], int(m["width"]),
                                             int(m["diffusion"]["train_steps"]), head_file)
        names = {role: save_graph(bundle, part, file, precision, s, m, role)
                 for role, part, file in zip(ROLES, (condition, state), (CONDITION_FILE, STATE_FILE))}
    log(f"{names['diffusion_condition']}, {names['diffusion_state']}: {head_file} cut in two, "
        f"{total} values per row between them")
    return names


def add_split(bundle: str, log=print, checked: bool = False) -> str:
    """Adds both parts (with `checked`, compared by `check` before anything is replaced)."""
    bundle = os.path.realpath(bundle)  # the folder read is the folder written (symbolic links, `..`)

    names = add_graphs(bundle, manifest_with_split,
                       lambda m, s: write_split(bundle, m, m["graphs"]["diffusion"]["file"], log=log, staging=s),
                       (check, 1e-5, "the whole head") if checked else None,
                       ROLES, ("diffusion",), log)
    return os.path.join(bundle, names["diffusion_condition"])


def check(bundle: str, log=print, staging=None) -> float:
    """Max |state(x, condition(t, z)) − head(x, t, z)| on random rows, the condition part run on
    the rows alone and on them stacked with others (as gtr-run groups the ticks' rows); the parts
    staged in `staging`, if given."""
    import onnxruntime as ort

    m, path = bundle_view(bundle, staging)
    io = m["graphs"]["diffusion"]
    session = lambda f: ort.InferenceSession(path(f), providers=["CPUExecutionProvider"])  # noqa: E731
    head, condition, state = session(io["file"]), session(CONDITION_FILE), session(STATE_FILE)
    rng = np.random.default_rng(0)
    C, D, steps = int(m["token_dim"]), int(m["width"]), int(m["diffusion"]["train_steps"])
    worst = 0.0
    for rows, others in ((5, 0), (7, 20)):
        x = rng.standard_normal((rows, C)).astype(np.float32)
        t = rng.integers(0, steps, rows + others).astype(np.int64)
        z = rng.standard_normal((rows + others, D)).astype(np.float32)
        want = head.run([io["outputs"]["out"]], {io["inputs"]["x"]: x, io["inputs"]["t"]: t[:rows],
                                                  io["inputs"]["z"]: z[:rows]})[0]
        cond = condition.run(["cond"], {"t": t, "z": z})[0][:rows]
        got = state.run(["out"], {"x": x, "cond": cond})[0]
        err = float(np.abs(got - want).max())
        worst = max(worst, err)
        log(f"check ({rows} rows, condition part on {rows + others}): max |split - whole head| = {err:.3g}")
    return worst


def main(argv=None) -> int:
    return graph_tool(argv, __doc__, "the diffusion graph", add_split)


if __name__ == "__main__":
    sys.exit(main())

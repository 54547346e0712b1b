#!/usr/bin/env python3
"""Adds a `sampler` graph to a model bundle: a whole respaced diffusion chain in one call.

    python3 models/add_sampler.py BUNDLE_DIR [--check]

The sampler wraps the bundle's own diffusion head (any bundle: exported by export_mar.py,
mar-tiny with its v-prediction head inside, or a third party's) in an ONNX `Loop` over the
chain's ticks. Per tick it runs the head once on the rows still running (both CFG halves),
mixes ε with the guidance scale, applies the respaced DDPM posterior with the learned-range
(or fixed) variance and adds the tick's noise scaled by the temperature. Everything the host
decides (timesteps, the chain's coefficients, the noise from gtr-run's ChaCha streams) is an
input, so one call per MAR step replaces one head call per tick, and the chain's state never
leaves the device between ticks. The contract (models/README.md, "sampler graph"):

  inputs   x       f32 [N, C]      initial noise of each row (rows running longest first)
           z       f32 [G, N, D]   conditioning; G = 2 with guidance (conditional, then
                                   unconditional), 1 without
           t       i64 [T, N]      training-chain timestep of row r at tick k
           coef    f32 [T, N, 5]   A, B, log β', log σ²_post, noise scale of row r at tick k:
                                   x ← A·x − B·ε + scale·exp(½·log σ²)·noise
           noise   f32 [T, N, C]   standard normal draws of row r at tick k
           active  i64 [T]         rows still running at tick k (a prefix of the rows)
           guidance f32 [1]        CFG scale s: ε = ε_u + s·(ε_c − ε_u) (unused when G = 1)
  output   x_out   f32 [N, C]      the sampled tokens

log σ² is frac·log β' + (1 − frac)·log σ²_post with frac = (v + 1)/2 from the head's second C
outputs (learned range), else the fourth coefficient alone. Rows past `active` are untouched.

The head's weights are copied into the loop body (sampler.onnx holds them: MAR-B's head is
~140 MB); see `build_sampler` for why they cannot stay outside the loop.

It also writes `tick.onnx`, the same tick without control flow (ONNX Runtime cannot capture a
Loop in a CUDA graph): gtr-run calls it once per tick (`--sampler ticks`) on buffers it binds once
per shape, so that on CUDA each call replays a captured graph. Its contract:

  inputs   x, z, t, coef, noise, guidance   as above (x: the state before tick k)
           k       i64 []          the tick
           running bool [T, N]     whether row r's chain runs at tick k (a row that does not
                                   keeps its value; rows padded to a fixed count never run)
  outputs  x_next  f32 [N, C]      the state after tick k
           k_next  i64 []          k + 1

Every row goes through the head at every tick, so its shapes never change between calls.

The manifest gets `sampler` and `tick` entries after the diffusion graph's. `--check` compares
both graphs with a NumPy run of the same chain through the bundle's diffusion graph
(onnxruntime).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# `models.onnx_save` from the repository root, also when run as a script
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.cuda_capture import capture_blockers  # noqa: E402
from models.derived import add_graphs, bundle_view, graph_tool, manifest_with_graph, save_graph, staged  # noqa: E402
from models.onnx_save import BundleError, CheckFailed, load_graph  # noqa: E402

SAMPLER_FILE = "sampler.onnx"
INPUTS = ["x", "z", "t", "coef", "noise", "active", "guidance"]
OUTPUT = "x_out"
TICK_FILE = "tick.onnx"
TICK_INPUTS = ["x", "k", "z", "t", "coef", "noise", "running", "guidance"]
TICK_OUTPUTS = ["x_next", "k_next"]
COEFFICIENTS = 5


def head_nodes(hg: onnx.GraphProto, io: dict, apart=frozenset()) -> tuple[list, str, list]:
    """The head's nodes, their values renamed under `head/` except its initializers and its
    inputs x, t and z, which become `xt`, `tt` and `zf`; the name of its output; and its
    initializers, those named in `apart` renamed under `head/` too."""
    ins, out_name = io["inputs"], io["outputs"]["out"]
    prefix = "head/"
    inits = {i.name for i in hg.initializer}
    rename = {ins["x"]: "xt", ins["t"]: "tt", ins["z"]: "zf"}

    def name(v: str) -> str:
        if v == "" or (v in inits and v not in apart):
            return v
        return rename.get(v) or prefix + v

    initializers = []
    for init in hg.initializer:
        if init.name in apart:
            init = onnx.TensorProto.FromString(init.SerializeToString())
            init.name = prefix + init.name
        initializers.append(init)

    nodes = []
    for n in hg.node:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        del m.input[:]
        m.input.extend(name(v) for v in n.input)
        del m.output[:]
        m.output.extend(name(v) for v in n.output)
        if m.name:
            m.name = prefix + m.name
        nodes.append(m)
    return nodes, name(out_name), initializers


def defined_twice(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    """Those of `names` that `graph` (its Loop bodies included) defines more than once, as an
    input, an initializer or a node's output."""
    seen: dict[str, int] = {}

    def count(g: onnx.GraphProto) -> None:
        for v in [*(i.name for i in g.input), *(i.name for i in g.initializer),
                  *(o for node in g.node for o in node.output)]:
            seen[v] = seen.get(v, 0) + 1
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    count(a.g)

    count(graph)
    return {v for v in names if seen.get(v, 0) > 1}


def apart_from_the_chain(build, head: onnx.ModelProto) -> onnx.ModelProto:
    """`build(apart)`, a chain graph around `head`, with the head's initializers that share a
    name with one of the chain's own values (a third party's head may call a weight `sigma` or
    `x`) renamed apart: built once, and again with those names in `apart`."""
    model = build(frozenset())
    clash = defined_twice(model.graph, {i.name for i in head.graph.initializer})
    return build(frozenset(clash)) if clash else model


def chain_constants(C: int) -> list:
    """The constants the tick nodes of both graphs read."""
    values = [
        ("k_columns", np.ones(COEFFICIENTS, np.int64)),
        ("k_zero", np.array([0], np.int64)),
        ("k_one", np.array([1], np.int64)),
        ("k_last", np.array([-1], np.int64)),
        ("k_end", np.array([np.iinfo(np.int64).max], np.int64)),
        ("k_axis0", np.array([0], np.int64)),
        ("k_axis1", np.array([1], np.int64)),
        ("k_C", np.array([C], np.int64)),
        ("k_2C", np.array([2 * C], np.int64)),
        ("k_half", np.array(0.5, np.float32)),
        ("k_onef", np.array(1.0, np.float32)),
    ]
    return [numpy_helper.from_array(v, nm) for nm, v in values]


def shape_nodes() -> list:
    """What a tick reads of z's shape: G (2 with guidance, else 1), the [G·n, D] target of its
    rows (`zf_shape`) and the repeats that stack x once per half (`x_reps`)."""
    n = helper.make_node
    return [
        n("Shape", ["z"], ["z_shape"]),
        n("Slice", ["z_shape", "k_zero", "k_one", "k_axis0"], ["G"]),
        n("Slice", ["z_shape", "k_last", "k_end", "k_axis0"], ["D"]),
        n("Concat", ["k_last", "D"], ["zf_shape"], axis=0),
        n("Concat", ["G", "k_one"], ["x_reps"], axis=0),
    ]


def update_nodes(head_out: str, learned: bool) -> list:
    """One tick's update of the rows `xa` (n = `n` [1] rows): ε mixed from the head's two halves
    in `head_out` with `guidance`, then the respaced DDPM step with the tick's coefficients `ca`
    [n, 5] and noise `noise_a` [n, C] → `x_new`."""
    n = helper.make_node
    nodes = [
        # ε of the conditional half (first n rows) and of the unconditional one (last n)
        n("Neg", ["n"], ["minus_n"]),
        n("Slice", [head_out, "k_zero", "n", "k_axis0"], ["out_c"]),
        n("Slice", [head_out, "minus_n", "k_end", "k_axis0"], ["out_u"]),
        n("Slice", ["out_c", "k_zero", "k_C", "k_axis1"], ["eps_c"]),
        n("Slice", ["out_u", "k_zero", "k_C", "k_axis1"], ["eps_u"]),
        n("Sub", ["eps_c", "eps_u"], ["eps_d"]),
        n("Mul", ["eps_d", "guidance"], ["eps_ds"]),
        n("Add", ["eps_u", "eps_ds"], ["eps"]),
        n("Split", ["ca", "k_columns"], ["cA", "cB", "c_log_beta", "c_log_post", "c_scale"], axis=1),
    ]
    if learned:
        nodes += [
            n("Slice", ["out_c", "k_C", "k_2C", "k_axis1"], ["v"]),
            n("Add", ["v", "k_onef"], ["v1"]),
            n("Mul", ["v1", "k_half"], ["frac"]),
            n("Sub", ["c_log_beta", "c_log_post"], ["log_gap"]),
            n("Mul", ["frac", "log_gap"], ["frac_gap"]),
            n("Add", ["c_log_post", "frac_gap"], ["log_var"]),
        ]
    else:
        nodes += [n("Identity", ["c_log_post"], ["log_var"])]
    return nodes + [
        n("Mul", ["log_var", "k_half"], ["half_log_var"]),
        n("Exp", ["half_log_var"], ["sigma"]),
        n("Mul", ["sigma", "c_scale"], ["sigma_s"]),
        n("Mul", ["sigma_s", "noise_a"], ["step_noise"]),
        n("Mul", ["cA", "xa"], ["ax"]),
        n("Mul", ["cB", "eps"], ["be"]),
        n("Sub", ["ax", "be"], ["mean"]),
        n("Add", ["mean", "step_noise"], ["x_new"]),
    ]


def value_infos(names: list[str], C: int, D) -> list:
    """The chain graphs' tensors `names`, typed and shaped as the contract says (N rows, T ticks,
    G halves, C token channels, D the width of z)."""
    f32, i64, boolean = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
    spec = {
        "x": (f32, ["N", C]), "x_out": (f32, ["N", C]), "x_next": (f32, ["N", C]),
        "z": (f32, ["G", "N", D]), "t": (i64, ["T", "N"]), "coef": (f32, ["T", "N", COEFFICIENTS]),
        "noise": (f32, ["T", "N", C]), "active": (i64, ["T"]), "running": (boolean, ["T", "N"]),
        "guidance": (f32, [1]), "k": (i64, []), "k_next": (i64, []),
    }
    return [helper.make_tensor_value_info(name, *spec[name]) for name in names]


def z_width(hg: onnx.GraphProto, io: dict):
    """D of the head's z input, or the symbol "D" where the graph leaves it open."""
    for vi in hg.input:
        if vi.name == io["inputs"]["z"]:
            dims = vi.type.tensor_type.shape.dim
            return dims[-1].dim_value if dims and dims[-1].dim_value > 0 else "D"
    return "D"


def model_like(head: onnx.ModelProto, graph: onnx.GraphProto, what: str) -> onnx.ModelProto:
    """`graph` as a model with the head's own opset (so that its nodes mean what they meant)."""
    opset = max(o.version for o in head.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:
        raise BundleError(f"the diffusion graph uses opset {opset}; the {what} needs 13 or newer")
    model = helper.make_model(graph, opset_imports=list(head.opset_import),
                              producer_name="gtr-run add_sampler.py")
    model.ir_version = head.ir_version
    return model


def build_sampler(head: onnx.ModelProto, io: dict, token_dim: int, learned: bool) -> onnx.ModelProto:
    """The Loop graph around `head` (its tensor names for x, t, z and out in `io`)."""
    return apart_from_the_chain(lambda apart: _sampler(head, io, token_dim, learned, apart), head)


def _sampler(head: onnx.ModelProto, io: dict, token_dim: int, learned: bool, apart) -> onnx.ModelProto:
    """build_sampler, the head's initializers named in `apart` renamed (head_nodes)."""
    hg = head.graph
    C = token_dim
    body_nodes, head_out, head_weights = head_nodes(hg, io, apart)
    n = helper.make_node
    body = [
        # rows running at this tick: x_in[:n]
        n("Gather", ["active", "iter"], ["n0"], axis=0),
        n("Unsqueeze", ["n0", "k_axis0"], ["n"]),
        n("Slice", ["x_in", "k_zero", "n", "k_axis0"], ["xa"]),
        n("Slice", ["x_in", "n", "k_end", "k_axis0"], ["x_rest"]),
        # conditioning of both halves: z[:, :n] as [G·n, D] (G, zf_shape and x_reps are the
        # same at every tick: made once, before the loop)
        n("Slice", ["z", "k_zero", "n", "k_axis1"], ["za"]),
        n("Reshape", ["za", "zf_shape"], ["zf"]),
        n("Tile", ["xa", "x_reps"], ["xt"]),
        n("Gather", ["t", "iter"], ["t_k"], axis=0),
        n("Slice", ["t_k", "k_zero", "n", "k_axis0"], ["ta"]),
        n("Tile", ["ta", "G"], ["tt"]),
        *body_nodes,
        # this tick's coefficients and noise for the running rows
        n("Gather", ["coef", "iter"], ["coef_k"], axis=0),
        n("Slice", ["coef_k", "k_zero", "n", "k_axis0"], ["ca"]),
        n("Gather", ["noise", "iter"], ["noise_k"], axis=0),
        n("Slice", ["noise_k", "k_zero", "n", "k_axis0"], ["noise_a"]),
        *update_nodes(head_out, learned),
        n("Concat", ["x_new", "x_rest"], ["x_next"], axis=0),
        n("Identity", ["cond_in"], ["cond_out"]),
    ]
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    body_graph = helper.make_graph(
        body,
        "tick",
        [
            helper.make_tensor_value_info("iter", i64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", f32, ["N", C]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_next", f32, ["N", C]),
        ],
        # The head's weights are the body's own, placed on the device with it, not outer-scope
        # values passed into every call of the body (on an H200, MAR-B mar-16 at batch 64 went
        # from 0.275 to 0.265 s/image, two runs; the cause was not isolated further).
        initializer=head_weights,
    )
    outer = [
        n("Shape", ["active"], ["ticks"]),
        n("Squeeze", ["ticks", "k_axis0"], ["ticks_s"]),
        # what every tick reads of z's shape, made once
        *shape_nodes(),
        n("Loop", ["ticks_s", "", "x"], [OUTPUT], body=body_graph),
    ]
    graph = helper.make_graph(outer, "sampler", value_infos(INPUTS, C, z_width(hg, io)),
                              value_infos([OUTPUT], C, None), initializer=chain_constants(C))
    return model_like(head, graph, "sampler")


def build_tick(head: onnx.ModelProto, io: dict, token_dim: int, learned: bool) -> onnx.ModelProto:
    """One tick of the chains around `head`, without control flow (see TICK_INPUTS)."""
    return apart_from_the_chain(lambda apart: _tick(head, io, token_dim, learned, apart), head)


def _tick(head: onnx.ModelProto, io: dict, token_dim: int, learned: bool, apart) -> onnx.ModelProto:
    """build_tick, the head's initializers named in `apart` renamed (head_nodes)."""
    body_nodes, head_out, head_weights = head_nodes(head.graph, io, apart)
    n = helper.make_node
    nodes = [
        *shape_nodes(),
        # every row, both halves: the shapes never depend on the tick
        n("Shape", ["x"], ["x_shape"]),
        n("Slice", ["x_shape", "k_zero", "k_one", "k_axis0"], ["n"]),
        n("Identity", ["x"], ["xa"]),
        n("Reshape", ["z", "zf_shape"], ["zf"]),
        n("Tile", ["xa", "x_reps"], ["xt"]),
        n("Gather", ["t", "k"], ["t_k"], axis=0),
        n("Tile", ["t_k", "G"], ["tt"]),
        *body_nodes,
        n("Gather", ["coef", "k"], ["ca"], axis=0),
        n("Gather", ["noise", "k"], ["noise_a"], axis=0),
        *update_nodes(head_out, learned),
        # rows whose chain has ended keep their value
        n("Gather", ["running", "k"], ["run_k"], axis=0),
        n("Unsqueeze", ["run_k", "k_axis1"], ["run_rows"]),
        n("Where", ["run_rows", "x_new", "xa"], [TICK_OUTPUTS[0]]),
        n("Add", ["k", "k_one_scalar"], [TICK_OUTPUTS[1]]),
    ]
    C, D = token_dim, z_width(head.graph, io)
    graph = helper.make_graph(
        nodes, "tick", value_infos(TICK_INPUTS, C, D), value_infos(TICK_OUTPUTS, C, None),
        initializer=chain_constants(C)
        + [numpy_helper.from_array(np.array(1, np.int64), "k_one_scalar")]
        + head_weights,
    )
    return model_like(head, graph, "tick graph")


def manifest_with_sampler(text: str) -> str:
    """The manifest text with `sampler` and `tick` graph entries after the diffusion graph's."""
    text = manifest_with_graph(text, "sampler", SAMPLER_FILE, INPUTS, {"x_out": OUTPUT}, "diffusion")
    return manifest_with_graph(text, "tick", TICK_FILE, TICK_INPUTS, {r: r for r in TICK_OUTPUTS},
                               "sampler")


CHAIN_GRAPHS = {"sampler": (build_sampler, SAMPLER_FILE, "loop over the ticks"),
                "tick": (build_tick, TICK_FILE, "one tick, no control flow")}


def write_sampler(bundle: str, m: dict, head_file: str, precision: str | None = None, log=print,
                  roles=tuple(CHAIN_GRAPHS), staging=None) -> dict[str, str]:
    """Writes the chain graphs `roles` (sampler, tick) around the head graph `head_file` (the
    manifest's diffusion tensor names) as ROLE.onnx, or ROLE.PRECISION.onnx for a precision
    variant, into `staging` (models.onnx_save.Staging; without one, committed at once); returns
    the names by role."""
    io = m["graphs"]["diffusion"]
    learned = m["diffusion"]["variance"] == "learned_range"
    names = {}
    with staged(bundle, staging) as s:
        head = load_graph(s.read_path(os.path.join(bundle, head_file)), "diffusion", entry=io)
        for role in roles:
            build, file, what = CHAIN_GRAPHS[role]
            try:
                model = build(head, io, int(m["token_dim"]), learned)
            except BundleError as e:
                raise BundleError(f"{head_file}: {e}") from None
            names[role] = save_graph(bundle, model, file, precision, s, m, role)
            log(f"{names[role]}: {what} around {head_file} ({'learned' if learned else 'fixed'} variance)")
            blockers = capture_blockers(model) if role == "tick" else []
            if blockers:
                log(f"note: ONNX Runtime's CUDA provider cannot capture {names[role]} in a CUDA graph "
                    f"({'; '.join(blockers)}), which is what gtr-run --sampler ticks is for; on CUDA use "
                    f"--sampler graph")
    return names


def add_sampler(bundle: str, log=print, checked: bool = False) -> str:
    """Adds the sampler and tick graphs (with `checked`, compared by `check` before anything is replaced)."""
    bundle = os.path.realpath(bundle)  # the folder read is the folder written (symbolic links, `..`)
    names = add_graphs(bundle, manifest_with_sampler,
                       lambda m, s: write_sampler(bundle, m, m["graphs"]["diffusion"]["file"], log=log, staging=s),
                       (check, 1e-4, "a per-tick NumPy reference") if checked else None,
                       ("sampler", "tick"), ("diffusion",), log)
    return os.path.join(bundle, names["sampler"])


def reference_chain(head_sess, io, x, z, t, coef, noise, active, guidance, C, learned):
    """The sampler's contract in NumPy, one head call per tick (for --check)."""
    x = x.copy()
    G = z.shape[0]
    for k in range(t.shape[0]):
        n = int(active[k])
        xa = x[:n]
        feeds = {io["inputs"]["x"]: np.tile(xa, (G, 1)), io["inputs"]["t"]: np.tile(t[k, :n], G),
                 io["inputs"]["z"]: z[:, :n].reshape(G * n, -1)}
        out = head_sess.run([io["outputs"]["out"]], feeds)[0]
        oc, ou = out[:n], out[(G - 1) * n:]
        eps = ou[:, :C] + guidance[0] * (oc[:, :C] - ou[:, :C])
        a = coef[k, :n]
        if learned:
            frac = (oc[:, C:2 * C] + 1) / 2
            log_var = frac * a[:, 2:3] + (1 - frac) * a[:, 3:4]
        else:
            log_var = np.broadcast_to(a[:, 3:4], xa.shape)
        x[:n] = a[:, 0:1] * xa - a[:, 1:2] * eps + a[:, 4:5] * np.exp(0.5 * log_var) * noise[k, :n]
    return x


def check(bundle: str, log=print, staging=None) -> float:
    """Max |graph - per-tick NumPy reference| of the sampler and tick graphs (those staged in
    `staging`, if given) on random chains, with and without guidance."""
    import onnxruntime as ort

    m, path = bundle_view(bundle, staging)
    io = m["graphs"]["diffusion"]
    C, learned = int(m["token_dim"]), m["diffusion"]["variance"] == "learned_range"
    D = int(m["width"])
    rng = np.random.default_rng(0)
    N, T = 7, 5
    x = rng.standard_normal((N, C)).astype(np.float32)
    z = rng.standard_normal((2, N, D)).astype(np.float32)
    t = rng.integers(0, 1000, (T, N)).astype(np.int64)
    coef = np.stack([rng.uniform(0.5, 1.0, (T, N)), rng.uniform(0.0, 0.2, (T, N)),
                     rng.uniform(-6, -1, (T, N)), rng.uniform(-8, -2, (T, N)),
                     rng.uniform(0, 1, (T, N))], -1).astype(np.float32)
    noise = rng.standard_normal((T, N, C)).astype(np.float32)
    active = np.array([7, 7, 5, 3, 3], np.int64)
    guidance = np.array([2.5], np.float32)
    head = ort.InferenceSession(path(io["file"]), providers=["CPUExecutionProvider"])
    sampler = ort.InferenceSession(path(SAMPLER_FILE), providers=["CPUExecutionProvider"])
    tick = ort.InferenceSession(path(TICK_FILE), providers=["CPUExecutionProvider"])
    running = np.arange(N)[None, :] < active[:, None]
    worst = 0.0
    for g in (2, 1):
        zg = np.ascontiguousarray(z[:g])
        want = reference_chain(head, io, x, zg, t, coef, noise, active, guidance, C, learned)
        got = sampler.run([OUTPUT], {"x": x, "z": zg, "t": t, "coef": coef, "noise": noise,
                                     "active": active, "guidance": guidance})[0]
        err = float(np.abs(got - want).max())
        log(f"check (G = {g}): max |sampler - per-tick reference| = {err:.3g}")
        xk, k = x, np.array(0, np.int64)
        for _ in range(T):
            xk, k = tick.run(TICK_OUTPUTS, {"x": xk, "k": k, "z": zg, "t": t, "coef": coef, "noise": noise,
                                            "running": running, "guidance": guidance})
        if int(k) != T:
            raise CheckFailed(f"tick graph: k_next counted to {int(k)} after {T} ticks; nothing was changed")
        tick_err = float(np.abs(xk - want).max())
        log(f"check (G = {g}): max |tick graph, {T} calls - per-tick reference| = {tick_err:.3g}")
        worst = max(worst, err, tick_err)
    return worst


def main(argv=None) -> int:
    return graph_tool(argv, __doc__, "the diffusion graph", add_sampler)


if __name__ == "__main__":
    sys.exit(main())

"""Whether ONNX Runtime's CUDA provider can capture a graph in a CUDA graph.

gtr-run asks for capture (`enable_cuda_graph`) on the tick graph (`--sampler ticks`), so that a
tick is one replayed graph instead of ~125 kernel launches. ONNX Runtime (1.31, as read in its
sources) captures a session only when

- the graph has no control flow (Loop, If, Scan);
- every node runs on the CUDA provider, except the nodes it moves to the host on its own
  because they only compute shapes; and
- no tensor has to be copied between host and device while the graph runs (no Memcpy node;
  the inputs and outputs are bound on the device).

The second and third depend on where the provider puts each node. Its rule: a tensor is on
the host when it comes out of a kernel that writes host memory (Shape, Size), or of a node
moved to the host. A node that reads such a tensor is moved to the host too when each of its
inputs is on the host, a graph input or a small initializer (at most 100 elements), none is
float16/bfloat16, and none is an input the CUDA kernel reads from host memory anyway (Reshape's
shape, Slice's starts/ends/axes/steps, ...). What is moved then needs a copy wherever a
device kernel reads it as device memory, or where it reads a device tensor (a graph input
bound on the device included).

`capture_blockers(model)` applies that rule to a graph and says what would stop the capture;
an empty list means the provider accepts `enable_cuda_graph` for it. It takes every op to have a
CUDA kernel for its types (an op without one runs on the host and stops the capture through
its copies: check the kernel table first). Of the kernels themselves it
knows one limit (a Concat of more than 32 inputs fails while capturing); whether the kernels of
the tick graph's ops capture and replay correctly was read from ONNX Runtime 1.31.1, not run
(models/README.md, "The optional tick graph").
"""
from __future__ import annotations

import math

import onnx
from onnx import TensorProto

CONTROL_FLOW = {"Loop", "If", "Scan"}

# Outputs that the CUDA kernels write in host memory.
HOST_OUTPUTS = {"Shape": {0}, "Size": {0}}

# Inputs that the CUDA kernels read from host memory (shapes, axes, counts).
HOST_INPUTS = {
    "Reshape": {1}, "Expand": {1}, "Tile": {1}, "Unsqueeze": {1}, "Squeeze": {1}, "Split": {1},
    "Slice": {1, 2, 3, 4}, "ConstantOfShape": {0}, "Range": {0, 1, 2}, "Pad": {1, 2, 3},
    "TopK": {1}, "Resize": {1, 2, 3}, "ReduceSum": {1}, "ReduceMean": {1}, "ReduceMax": {1},
    "ReduceMin": {1}, "ReduceProd": {1}, "OneHot": {1}, "Loop": {0, 1}, "If": {0},
}

# ONNX Runtime 1.31.1's CUDA Concat refuses more inputs than this during a capture.
CONCAT_CAPTURE_INPUTS = 32

SMALL_INITIALIZER = 100
HALF = {TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(graph.input) + list(graph.value_info) + list(graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _small_constants(graph: onnx.GraphProto) -> set[str]:
    """Initializers of at most SMALL_INITIALIZER elements, and Constant nodes' outputs (ONNX
    Runtime folds those into initializers before placing nodes)."""
    small = {t.name for t in graph.initializer if math.prod(t.dims) <= SMALL_INITIALIZER}
    small |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    return small


def host_nodes(graph: onnx.GraphProto) -> tuple[set[int], set[str]]:
    """The nodes (indices into graph.node) the CUDA provider would move to the host, and the
    tensors that live in host memory."""
    types, small = _elem_types(graph), _small_constants(graph)
    inputs = {i.name for i in graph.input}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    on_host: set[str] = set()
    candidates: list[int] = []
    for node in graph.node:
        for j, name in enumerate(node.output):
            if j in HOST_OUTPUTS.get(node.op_type, ()):
                on_host.add(name)
                candidates += consumers.get(name, [])
    moved: set[int] = set()
    seen: set[int] = set()
    while candidates:
        i = min(candidates)  # graph order: a producer is decided before its consumers
        candidates = [c for c in candidates if c != i]
        if i in seen:
            continue
        seen.add(i)
        node = graph.node[i]
        if node.op_type in HOST_OUTPUTS or node.op_type == "Constant":
            continue
        if all(_may_move(node, j, name, types, small, inputs, on_host) for j, name in enumerate(node.input)):
            moved.add(i)
            on_host |= set(node.output)
            for name in node.output:
                candidates += consumers.get(name, [])
    return moved, on_host


def _may_move(node, j: int, name: str, types, small, inputs, on_host) -> bool:
    if not name:
        return True
    if types.get(name) in HALF:
        return False
    if name in small or name in inputs:
        return True
    return name in on_host and j not in HOST_INPUTS.get(node.op_type, ())


def capture_blockers(model: onnx.ModelProto) -> list[str]:
    """What would stop ONNX Runtime's CUDA provider from capturing `model` (inputs and outputs
    bound on the device), one line each; empty when nothing does."""
    graph = model.graph
    blockers = [f"{n.op_type} node {n.name or n.output[0]!r}: control flow"
                for n in graph.node if n.op_type in CONTROL_FLOW]
    blockers += [f"Concat node {n.name or n.output[0]!r}: {len(n.input)} inputs, the CUDA kernel takes at most "
                 f"{CONCAT_CAPTURE_INPUTS} while capturing"
                 for n in graph.node if n.op_type == "Concat" and len(n.input) > CONCAT_CAPTURE_INPUTS]
    moved, on_host = host_nodes(graph)
    small = _small_constants(graph)
    for i, node in enumerate(graph.node):
        what = f"{node.op_type} node {node.name or node.output[0]!r}"
        for j, name in enumerate(node.input):
            if not name or name in small:
                continue
            if i in moved and name not in on_host:
                blockers.append(f"{what} runs on the host but reads {name!r} from the device")
            elif i not in moved and name in on_host and j not in HOST_INPUTS.get(node.op_type, ()):
                blockers.append(f"{what} runs on the device but reads {name!r} from the host")
    blockers += [f"output {o.name!r} is computed on the host" for o in graph.output if o.name in on_host]
    return blockers

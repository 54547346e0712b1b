"""Writing an ONNX graph into a bundle: the one way the model tools save a graph.

A graph is written under a temporary name in its folder and renamed into place, so a reader
sees the old file or the new one, and a file shared through a hard link is never written
through. A graph whose weights exceed protobuf's 2 GB limit (with headroom) keeps them in a
file beside it (ONNX external data, `<graph>.<tag>.data`, read by ONNX Runtime and `onnx.load`
relative to the graph): the data file is written first under a name of its own, the graph
renamed into place last, and the data file the old graph used is then removed if it was its own
(named after it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile

import onnx

EXTERNAL_DATA_BYTES = 2_000_000_000 - 64 * 2**20   # protobuf's 2 GB limit, with headroom


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers as they would be serialized, subgraphs' (a Loop body's) too."""

    def graph_bytes(graph: onnx.GraphProto) -> int:
        inner = sum(graph_bytes(g) for n in graph.node for a in n.attribute
                    for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)))
        return inner + sum(i.ByteSize() for i in graph.initializer)

    return graph_bytes(model.graph)


def external_files(path: str) -> set[str]:
    """The external data files (paths) the graph at `path` reads, if it exists."""
    if not os.path.isfile(path):
        return set()
    folder = os.path.dirname(os.path.abspath(path))
    m = onnx.load(path, load_external_data=False)
    out = set()
    for init in m.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for entry in init.external_data:
                if entry.key == "location":
                    out.add(os.path.normpath(os.path.join(folder, entry.value)))
    return out


def save_model(model: onnx.ModelProto, path: str, limit: int | None = None, verify=None) -> list[str]:
    """Checks `model` and saves it at `path` (see the module docstring); returns the files
    written. Weights over `limit` bytes (default EXTERNAL_DATA_BYTES) go external.
    `verify(tmp_path)`, if given, sees the written graph before it replaces anything;
    if it raises, nothing is replaced. `model`'s weights are moved into the data file when they
    go external, so the proto must not be used afterwards."""
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    mode = stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else 0o644
    old_data = external_files(path)
    external = weight_bytes(model) > (EXTERNAL_DATA_BYTES if limit is None else limit)
    tmp_dir = tempfile.mkdtemp(prefix=f".{name}.", dir=folder)
    try:
        tmp = os.path.join(tmp_dir, name)
        written = [path]
        if external:
            location = f"{name}.{secrets.token_hex(4)}.data"
            onnx.save(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                      location=location, size_threshold=1024)
            onnx.checker.check_model(tmp)
        else:
            onnx.checker.check_model(model)
            onnx.save(model, tmp)
        if verify is not None:
            verify(tmp)
        os.chmod(tmp, mode)
        if external:
            os.chmod(os.path.join(tmp_dir, location), mode)
            os.replace(os.path.join(tmp_dir, location), os.path.join(folder, location))
            written.append(os.path.join(folder, location))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    # The old graph's own data (`<graph>.*data`, as export_mar.py and this module name it);
    # a data file named otherwise may be another graph's too and is left.
    for stale in old_data - {os.path.normpath(p) for p in written}:
        own = os.path.dirname(stale) == folder and os.path.basename(stale).startswith(name + ".")
        if own and os.path.isfile(stale):
            os.remove(stale)
    return written


def write_manifest(bundle: str, text: str) -> str:
    """Writes `text` as the bundle's manifest.yaml the same way: under a temporary name in the
    folder, renamed into place (a reader sees the old manifest or the new one; a manifest
    shared through a hard link is not written through). Returns its path."""
    path = os.path.join(bundle, "manifest.yaml")
    tmp = os.path.join(bundle, f".manifest.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path

"""Writing into a bundle: the one way the model tools save graphs and the manifest.

Every tool stages what it writes and commits it at the end (`Staging`):

- A run holds an exclusive lock on the bundle folder for its whole life (`fcntl.flock` on the
  folder itself, as gtr-run locks its run folders: no lock file is left behind); a second tool
  started on the bundle meanwhile refuses at once (BundleError: another model tool is writing
  it), so two runs never edit the same manifest. gtr-run holds a shared lock on the folder while it
  reads the manifest and loads the graphs, so a tool started then refuses too, and gtr-run
  refuses a bundle a tool holds, or whose commit was interrupted (until `recover` finishes it:
  `python3 models/onnx_save.py BUNDLE`).
- Each graph is written into a staging folder inside the bundle (`.gtr-tmp.<pid>.<random>/`),
  checked there (`verify`), and nothing of the bundle is replaced until the tool has written and
  checked everything it writes. A failed check, an error or an interruption before the commit
  leaves every file of the bundle as it was (the next run removes the staging folder).
- The commit first checks that every destination can be replaced (not a folder, its folder
  writable: else BundleError, nothing changed), writes its plan (`commit.json`: which staged
  file replaces which) into the staging folder, then renames the files into place, graphs first
  and the manifest last, then removes what the plan retires (the old graph's own external data,
  variants no longer listed). Once the plan is written the commit is decided: a tool killed (or
  stopped by an error) while renaming leaves the plan, and the next tool run on the bundle (any
  of them) finishes it before it does anything else (`recover`; under the lock, every staging
  folder it finds is a dead run's). A plan that cannot be finished is reported, naming it and
  what blocks it, and every tool refuses the bundle until the cause is removed.
- Folders that earlier versions of these tools left when killed (`.<graph>.onnx.XXXXXXXX/`,
  `.fuse_attention.XXXXXXXX/`, `.manifest.<hex>.tmp`) are not touched: they are harmless and may
  be removed by hand.
- Files are replaced by renaming, so a reader sees the old file or the new one, and a file
  shared through a hard link is never written through; a replaced file keeps its mode
  (permissions), the manifest included.
- A graph whose weights exceed protobuf's 2 GB limit (with headroom) keeps them in a file beside
  it (ONNX external data, `<graph>.<tag>.data`, read by ONNX Runtime and `onnx.load` relative to
  the graph); the data file the old graph used is removed at the commit if it was its own (named
  after it).
- The bundle is its real path (symbolic links and `..` resolved, `os.path.realpath`), so the
  folder read is the folder written.
- Nothing is written outside the bundle: a path whose real path (symbolic links resolved) is not
  inside the bundle's real path is refused (`inside`); tools give a graph kept outside the
  bundle (`../tiny/encoder.onnx`, a folder that is a link leading out) a derived file inside it
  (`placed_names`). A new graph never replaces a file the manifest lists under another entry
  (role or precision variant) or a listed graph's external data (`claim`: refused before it is
  staged). A commit plan found by `recover` is checked first: its sources inside its staging
  folder, its destinations and removals inside the bundle, or it is refused, nothing changed.

Errors the tools report as one line naming the input (exit status 2, nothing changed) are
`BundleError`s: a missing folder or manifest, malformed YAML, a graph entry without `file`, a
graph file missing or not ONNX (`read_manifest`, `load_graph`), a bundle another tool is
writing; `run_tool` turns them, and an OSError such as a read-only bundle, into that line. The
one error after which the bundle has changed says so: `CommitStopped`, a commit stopped partway
(how far, what stopped it, and that the next tool run finishes it).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import stat
import sys
import tempfile

import onnx

EXTERNAL_DATA_BYTES = 2_000_000_000 - 64 * 2**20   # protobuf's 2 GB limit, with headroom
TMP_PREFIX = ".gtr-tmp."
PLAN = "commit.json"


class BundleError(Exception):
    """A problem with the bundle or an input, named in the message; nothing was changed."""


class CheckFailed(BundleError):
    """A tool's --check found its new graphs off (exit status 1; nothing was changed)."""


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


# ----------------------------------------------------------------------------- reading


def check_folder(bundle: str) -> str:
    """`bundle`, if it is a folder; else BundleError saying what it is."""
    if not os.path.isdir(bundle):
        raise BundleError(f"{bundle}: {'not a folder' if os.path.exists(bundle) else 'no such folder'}; "
                          "give a bundle folder (holding manifest.yaml)")
    return bundle


def _unique_key_loader():
    """A safe YAML loader that refuses a key given twice in one mapping (PyYAML, like the YAML
    library gtr-run reads manifests with, would let the second win: a second `diffusion:` under
    `graphs` would name another graph than the first)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, str) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"`{key}` is given twice in one mapping", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return Loader


def read_manifest(bundle: str) -> tuple[str, dict]:
    """The manifest's text and its parsed content; BundleError naming what is wrong (no such
    folder, no manifest.yaml, malformed YAML or a key given twice in a mapping, no `graphs`
    mapping, a graph entry without `file`)."""
    import yaml

    check_folder(bundle)
    path = os.path.join(bundle, "manifest.yaml")
    if not os.path.isfile(path):
        raise BundleError(f"{bundle}: no manifest.yaml there; give a bundle folder")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        manifest = yaml.load(text, Loader=_unique_key_loader())
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: cannot be read ({one_line(e)})") from e
    except yaml.YAMLError as e:
        raise BundleError(f"{path}: not valid YAML ({one_line(e)})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("graphs"), dict):
        raise BundleError(f"{path}: not a gtr-run bundle manifest (no `graphs` mapping)")
    for role, entry in manifest["graphs"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not entry["file"]:
            raise BundleError(f"{path}: graphs.{role} has no `file`")
    check_contract(manifest, path)
    return text, manifest


# The tensor roles of the model graphs (models/README.md, "Graph contracts").
GRAPH_ROLES = {
    "encoder": (("tokens", "known", "label"), ("encoded",)),
    "decoder": (("encoded", "known"), ("z",)),
    "diffusion": (("x", "t", "z"), ("out",)),
    "vae_decoder": (("latent",), ("image",)),
}
VARIANCES = ("learned_range", "fixed_small", "fixed_large")


def check_contract(m: dict, path: str) -> None:
    """BundleError naming the first field of manifest `m` (read from `path`) that the model tools
    read and gtr-run would refuse: the shape fields, the diffusion settings, the four model
    graphs with their tensor roles, each graph entry's `inputs`/`outputs` as names, and the
    `precisions` section as precision → role → file."""
    def wrong(field: str, want: str) -> BundleError:
        return BundleError(f"{path}: `{field}` is {_shown(m, field)}, not {want}")

    def count(v, least: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    for field, least in (("token_dim", 1), ("width", 1), ("classes", 0), ("buffer", 0)):
        if not count(m.get(field), least):
            raise wrong(field, "a positive integer" if least else "an integer of at least 0")
    if not count(m.get("null_class"), -2**63):
        raise wrong("null_class", "an integer")
    scale = m.get("latent_scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise wrong("latent_scale", "a positive number")
    grid = m.get("grid")
    if not (isinstance(grid, list) and len(grid) == 2 and all(count(v, 1) for v in grid)):
        raise wrong("grid", "[H, W] (two positive integers)")
    diffusion = m.get("diffusion")
    if not isinstance(diffusion, dict):
        raise wrong("diffusion", "a mapping (schedule, train_steps, variance)")
    if not count(diffusion.get("train_steps"), 1):
        raise wrong("diffusion.train_steps", "a positive integer")
    if diffusion.get("variance") not in VARIANCES:
        raise wrong("diffusion.variance", " or ".join(VARIANCES))
    graphs = m["graphs"]
    for role, (inputs, outputs) in GRAPH_ROLES.items():
        if role not in graphs:
            raise BundleError(f"{path}: no `graphs.{role}` entry (every bundle has the encoder, decoder, "
                              f"diffusion and vae_decoder graphs)")
        for side, roles in (("inputs", inputs), ("outputs", outputs)):
            names = graphs[role].get(side)
            if not isinstance(names, dict) or any(r not in names for r in roles):
                raise wrong(f"graphs.{role}.{side}", "a mapping of " + ", ".join(roles) + " to tensor names")
    for role, entry in graphs.items():
        for side in ("inputs", "outputs"):
            names = entry.get(side, {})
            if not isinstance(names, dict) or not all(isinstance(v, str) and v for v in names.values()):
                raise wrong(f"graphs.{role}.{side}", "a mapping of roles to tensor names")
    precisions = m.get("precisions")
    if precisions is not None:
        if not isinstance(precisions, dict):
            raise wrong("precisions", "a mapping of precision to { role: file }")
        for precision, files in precisions.items():
            if not isinstance(files, dict) or not all(isinstance(f, str) and f for f in files.values()):
                raise wrong(f"precisions.{precision}", "a mapping of roles to graph files")


def _shown(m: dict, field: str) -> str:
    """The value of a dotted `field` of `m` as the message shows it (`missing` where absent)."""
    value = m
    for key in field.split("."):
        if not isinstance(value, dict) or key not in value:
            return "missing"
        value = value[key]
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_tensor_names(model: onnx.ModelProto, entry: dict, role: str, path: str) -> None:
    """BundleError unless every tensor the manifest's `entry` for graph `role` names is one of the
    graph's inputs or outputs (as its side says)."""
    for side, have in (("inputs", {v.name for v in model.graph.input}),
                       ("outputs", {v.name for v in model.graph.output})):
        for tensor_role, name in (entry.get(side) or {}).items():
            if name not in have:
                raise BundleError(f"{path} ({role}): manifest graphs.{role}.{side}.{tensor_role} names `{name}`, "
                                  f"which is not one of the graph's {side} ({', '.join(sorted(have))})")


def load_graph(path: str, what: str, load_external_data: bool = True, entry: dict | None = None) -> onnx.ModelProto:
    """The ONNX graph at `path` (`what`: its role, for messages); BundleError when the file is
    missing, unreadable, or not an ONNX graph (truncated, another format), or, given its manifest
    `entry`, when a tensor the entry names is not among the graph's inputs or outputs."""
    if not os.path.isfile(path):
        raise BundleError(f"{path} ({what}): " + ("a folder, not a graph file" if os.path.isdir(path) else
                                                  "not a file" if os.path.exists(path) else "no such file"))
    try:
        model = onnx.load(path, load_external_data=load_external_data)
    except OSError as e:
        raise BundleError(f"{path} ({what}): cannot be read ({one_line(e)})") from e
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, onnx's own errors
        raise BundleError(f"{path} ({what}) is not an ONNX graph ({type(e).__name__}: {one_line(e)})") from e
    if not model.graph.output or not model.graph.node:
        raise BundleError(f"{path} ({what}) is not an ONNX graph (no nodes or outputs: truncated or another format)")
    if entry is not None:
        check_tensor_names(model, entry, what, path)
    return model


def inside(bundle: str, path: str) -> bool:
    """Whether `path` lies in the bundle folder once symbolic links are resolved (a `../` entry,
    an absolute path, or a subfolder that is a link leading out do not)."""
    root = os.path.realpath(bundle)
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def listed_entries(manifest) -> list[tuple[str, str]]:
    """(entry, file) for each graph file a parsed manifest lists: `graphs.<role>` and
    `precisions.<precision>.<role>` (files as written, relative to the bundle; entries of
    another shape skipped)."""
    out = []
    graphs = manifest.get("graphs") if isinstance(manifest, dict) else None
    for role, e in graphs.items() if isinstance(graphs, dict) else ():
        if isinstance(e, dict) and isinstance(e.get("file"), str) and e["file"]:
            out.append((f"graphs.{role}", e["file"]))
    precisions = manifest.get("precisions") if isinstance(manifest, dict) else None
    for precision, files in precisions.items() if isinstance(precisions, dict) else ():
        for role, f in files.items() if isinstance(files, dict) else ():
            if isinstance(f, str) and f:
                out.append((f"precisions.{precision}.{role}", f))
    return out


def claim(bundle: str, manifest: dict, entry: str, file: str) -> None:
    """Refuses, before it is written, a new graph `file` (relative to `bundle`) for the manifest
    entry `entry` (`graphs.sampler`, `precisions.fp16.encoder`) that would replace a graph the
    parsed `manifest` lists under another entry, or the external data of a listed graph (the
    same file once symbolic links are resolved): BundleError naming both entries. The entry's
    own earlier file may be replaced (a tool run again)."""
    new = _key(os.path.join(bundle, file))
    real = os.path.realpath(new)
    same = lambda p: new in (_key(p), os.path.realpath(p)) or real == os.path.realpath(p)  # noqa: E731
    listed = listed_entries(manifest)
    own = False
    for other, f in listed:
        if same(os.path.join(bundle, f)):
            if other != entry:
                raise BundleError(f"{file}, the new {entry} graph, would replace {f}, which the manifest lists as "
                                  f"{other}; give that entry another file in manifest.yaml (nothing was changed)")
            own = True
    if own or not os.path.lexists(new):
        return   # an external data file exists: only a file already there can be one
    for other, f in listed:
        for data in external_files(os.path.join(bundle, f)):
            if same(data):
                raise BundleError(f"{file}, the new {entry} graph, would replace {os.path.relpath(data, bundle)}, "
                                  f"the external data of {other} ({f}); give that entry another file in "
                                  "manifest.yaml (nothing was changed)")


def placed_names(bundle: str, manifest: dict, roles, entry, inside_name, outside_names, reserved=(),
                 free_on_disk: bool = False) -> dict[str, str]:
    """{role: file in the bundle} for files made from `roles`' graphs (manifest `graphs`), each
    to be the manifest's `entry(role)`: a graph inside the bundle gets `inside_name(file, role)`
    (BundleError when that would replace another entry's graph: `claim`); one outside it is never
    written beside, and gets the first of `outside_names(file, role)` that no other role here
    (those inside first), nothing in `reserved`, no other entry of the manifest (`claim`) and,
    with `free_on_disk`, no file in the bundle has. BundleError when none is free."""
    graphs = manifest["graphs"]
    taken = {os.path.normpath(r) for r in reserved}
    is_in = {role: inside(bundle, os.path.join(bundle, graphs[role]["file"])) for role in roles}
    names = {}

    def free(name, role):
        if os.path.normpath(name) in taken or (free_on_disk and os.path.lexists(os.path.join(bundle, name))):
            return False
        try:
            claim(bundle, manifest, entry(role), name)
        except BundleError:
            return False
        return True

    for role in sorted(roles, key=lambda r: not is_in[r]):
        file = graphs[role]["file"]
        if is_in[role]:
            names[role] = inside_name(file, role)
            claim(bundle, manifest, entry(role), names[role])
            taken.add(os.path.normpath(names[role]))
            continue
        tried = outside_names(file, role)
        found = [n for n in tried if free(n, role)]
        if not found:
            raise BundleError(f"{file} ({role}) is outside the bundle and no free name is left in it for the "
                              f"file made from it (tried {', '.join(tried)})")
        names[role] = found[0]
        taken.add(os.path.normpath(found[0]))
    return {role: names[role] for role in roles}


# ----------------------------------------------------------------------------- writing


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers as they would be serialized, subgraphs' (a Loop body's) too."""

    def graph_bytes(graph: onnx.GraphProto) -> int:
        inner = sum(graph_bytes(g) for n in graph.node for a in n.attribute
                    for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)))
        return inner + sum(i.ByteSize() for i in graph.initializer)

    return graph_bytes(model.graph)


def external_files(path: str) -> set[str]:
    """The external data files (paths) the graph at `path` reads, if it exists and reads."""
    if not os.path.isfile(path):
        return set()
    folder = os.path.dirname(os.path.abspath(path))
    try:
        m = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable old graph has no data to retire
        return set()
    out = set()
    for init in m.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for entry in init.external_data:
                if entry.key == "location":
                    out.add(os.path.normpath(os.path.join(folder, entry.value)))
    return out


def listed_files(manifest) -> set[str]:
    """The graph files (as written, relative to the bundle) a parsed manifest lists: each
    `graphs.<role>.file` and each file of `precisions.<precision>` (listed_entries)."""
    return {f for _, f in listed_entries(manifest)}


def manifest_in(bundle: str):
    """The parsed manifest of `bundle` as it is now, None when it has none or one that cannot be
    parsed."""
    import yaml

    path = os.path.join(bundle, "manifest.yaml")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f.read(), Loader=_unique_key_loader())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def listed_in(bundle: str) -> set[str] | None:
    """The graph files the manifest of `bundle` lists now (`listed_files`), None when it has no
    manifest or one that cannot be parsed."""
    manifest = manifest_in(bundle)
    return None if manifest is None else listed_files(manifest)


def read_files(manifest) -> set[str]:
    """Every file (as written, relative to the bundle) a parsed manifest names, which a run reads:
    its graphs and precision variants (`listed_files`), the evaluator's graph and its reference."""
    files = listed_files(manifest)
    evaluator = manifest.get("evaluator") if isinstance(manifest, dict) else None
    if isinstance(evaluator, dict):
        files |= {f for f in (evaluator.get("file"), evaluator.get("reference")) if isinstance(f, str) and f}
    return files


def output_file(flag: str, path: str, bundle: str) -> str:
    """The real path (links followed) that a tool's output-file flag (`--report`, `--json`) names,
    checked before the tool changes anything: BundleError naming the flag when it lies in the
    bundle folder `bundle` (whose files change only through a Staging), is a file the bundle's
    manifest names (`read_files`: one kept outside it), or cannot be written as a file (no such folder,
    not writable, a folder). Write it with `write_atomic`."""
    real = os.path.realpath(path)
    if inside(bundle, real):
        raise BundleError(f"{flag} {path}: inside the bundle folder {os.path.realpath(bundle)}; write it "
                          "elsewhere (nothing was changed)")
    manifest = manifest_in(bundle)
    named = read_files(manifest) if manifest is not None else set()
    if real in {os.path.realpath(os.path.join(bundle, f)) for f in named}:
        raise BundleError(f"{flag} {path}: a file the bundle's manifest names (a graph, the evaluator or its "
                          "reference); write it elsewhere (nothing was changed)")
    folder = os.path.dirname(real)
    if (os.path.lexists(real) and not (os.path.isfile(real) and os.access(real, os.W_OK))) \
            or not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
        raise BundleError(f"{flag} {path}: cannot write a file there (no such folder, not writable, or not a "
                          "file); nothing was changed")
    return real


def write_atomic(path: str, text: str) -> None:
    """Writes `text` to the file `path` (links followed) through a temporary file beside it,
    renamed into place: the old file or the whole new one is there, never half of it; an existing
    file keeps its mode."""
    real = os.path.realpath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(real)}.", suffix=".tmp", dir=os.path.dirname(real))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, _mode(real))
        os.replace(tmp, real)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def _mode(path: str, default: int = 0o644) -> int:
    return stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else default


def _key(path: str) -> str:
    """`path` with its folder's real path (symbolic links and `..` resolved, as the kernel reads
    it); the file itself is not followed (a link is replaced, never written through)."""
    return os.path.join(os.path.realpath(os.path.dirname(path) or os.curdir), os.path.basename(path))


def _holders(bundle: str) -> str:
    """The pids named by the staging folders in `bundle` (a guess at who holds its lock)."""
    try:
        pids = sorted({int(m.group(1)) for m in (re.match(re.escape(TMP_PREFIX) + r"(\d+)\.", n)
                                                  for n in os.listdir(bundle)) if m})
    except OSError:
        pids = []
    return f" (pid {' or '.join(map(str, pids))}?)" if pids else ""


def _lock(bundle: str) -> int | None:
    """An open descriptor of the folder `bundle` holding an exclusive `flock` on it, released
    when it is closed (so a killed tool never leaves the bundle locked); BundleError at once if
    another process holds it."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no locking there
        return None
    fd = os.open(bundle, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # Readers (gtr-run loading the bundle) hold it shared: a shared lock is then granted.
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            who = (f"{bundle} is in use: gtr-run is loading its graphs (it holds a shared lock while "
                   "reading)")
        except BlockingIOError:
            who = f"another model tool{_holders(bundle)} is writing {bundle}"
        finally:
            os.close(fd)
        raise BundleError(f"{who}; wait for it to end (nothing was changed)") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


class CommitStopped(BundleError):
    """A decided commit (its plan written) stopped partway: `done` of `total` steps made."""

    def __init__(self, done: int, total: int, why: str):
        super().__init__(why)
        self.done, self.total, self.why = done, total, why


def _apply(folder: str, plan: dict) -> None:
    """Carries out a commit plan (paths relative to `folder`); safe to run again. CommitStopped
    naming the file when a step fails."""
    steps = [("move", src, dst) for src, dst in plan["moves"]] + [("remove", gone, None) for gone in plan["remove"]]
    for done, (kind, a, b) in enumerate(steps):
        path = os.path.join(folder, a)
        try:
            if kind == "move":
                if os.path.lexists(path):
                    os.replace(path, os.path.join(folder, b))
            elif os.path.isfile(path) or os.path.islink(path):
                os.remove(path)
        except OSError as e:
            what = f"{b} cannot be replaced" if kind == "move" else f"{a} cannot be removed"
            raise CommitStopped(done, len(steps), f"{what} ({e.strerror or one_line(e)})") from e


def _staging_folders(folder: str) -> list[str]:
    """The names of the tools' staging folders in `folder` (never a link: none is followed)."""
    return [name for name in sorted(os.listdir(folder)) if name.startswith(TMP_PREFIX)
            and not os.path.islink(os.path.join(folder, name)) and os.path.isdir(os.path.join(folder, name))]


def _plan_path(folder: str, rel, within: str) -> str:
    """The path of a commit plan's entry `rel` (relative to bundle `folder`), which must lie in
    the folder `within` (the bundle, or the plan's staging folder) once resolved as the commit
    would: a relative path without `..` whose folder's real path (symbolic links resolved) is
    inside `within`; the file itself is not followed (it is replaced or removed, never written
    through). ValueError naming the entry otherwise."""
    parts = rel.split("/") if isinstance(rel, str) else None
    if not parts or os.path.isabs(rel) or any(p in ("", ".", "..") for p in parts) or "\0" in rel:
        raise ValueError(f"`{rel}` is not a plain path inside the bundle")
    path = _key(os.path.join(folder, rel))
    if not inside(within, os.path.dirname(path)) or path == os.path.realpath(within):
        raise ValueError(f"`{rel}` lies outside {within} once resolved")
    return path


def _checked_plan(folder: str, name: str, plan) -> dict:
    """The commit plan `plan` read from staging folder `name` of bundle `folder`, checked before
    any step of it runs: `moves` pairs (source, destination) and `remove` paths, every source
    inside that staging folder and every destination and removal inside the bundle (_plan_path).
    ValueError naming the offending entry (a plan a tool did not write: nothing is changed)."""
    if not isinstance(plan, dict) or not isinstance(plan.get("moves"), list) or not isinstance(plan.get("remove"), list):
        raise ValueError("not a commit plan (`moves` and `remove` lists)")
    staging = os.path.join(folder, name)
    for move in plan["moves"]:
        if not (isinstance(move, list) and len(move) == 2):
            raise ValueError(f"move {move!r} is not a [source, destination] pair")
        _plan_path(folder, move[0], staging)
        _plan_path(folder, move[1], folder)
    for gone in plan["remove"]:
        _plan_path(folder, gone, folder)
    return plan


def recover(folder: str, log=None) -> None:
    """Cleans up after tools killed in `folder`; only under the bundle's lock (Staging takes it),
    when no other tool is active there, so every staging folder found is a dead run's: one whose
    commit plan was written is committed (the commit had been decided), any other is removed.
    Every plan is read and checked (_checked_plan) before any is carried out. BundleError naming
    the plan and what blocks it when a plan cannot be read, leads outside the bundle (nothing is
    then changed) or cannot be finished."""
    try:
        entries = _staging_folders(folder)
    except OSError:
        return
    plans = {}
    for name in entries:
        plan = os.path.join(folder, name, PLAN)
        if os.path.isfile(plan):
            try:
                with open(plan) as f:
                    plans[name] = _checked_plan(folder, name, json.load(f))
            except (OSError, ValueError) as e:
                raise BundleError(f"{folder}: the interrupted commit {os.path.join(name, PLAN)} cannot be used "
                                  f"({one_line(e)}); nothing was changed: inspect it and remove "
                                  f"{os.path.join(folder, name)} by hand") from e
    for name in entries:
        if name in plans:
            try:
                _apply(folder, plans[name])
            except CommitStopped as e:
                raise BundleError(f"{folder}: the interrupted commit {os.path.join(name, PLAN)} cannot be finished: "
                                  f"{e.why}; remove the cause and run any model tool on {folder} again") from e
            if log:
                log(f"{name}: finished the commit of an interrupted run")
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


class Staging:
    """What one tool run writes into `bundle`, staged and committed together (module docstring).

        with Staging(bundle) as s:                # locks the bundle, finishes killed commits
            text, manifest = s.manifest()         # read only now, under the lock
            s.save(model, os.path.join(bundle, "x.onnx"), verify=...)   # written aside, checked
            s.write_manifest(text)
            s.commit()                            # renamed into place

    Leaving the block without `commit()` discards everything staged; leaving it releases the
    lock. A tool reads the manifest through `manifest()`, not before the Staging exists: a
    manifest read earlier may predate the commit that `recover` finishes, or another tool's."""

    def __init__(self, bundle: str, log=None):
        self.bundle = os.path.realpath(check_folder(bundle))
        self._fd = _lock(self.bundle)
        try:
            recover(self.bundle, log)
            try:
                self.dir = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}.", dir=self.bundle)
            except PermissionError as e:
                raise BundleError(f"{self.bundle}: the bundle folder cannot be written ({e.strerror}); the tools "
                                  "write their graphs into it (nothing was changed)") from None
        except BaseException:
            self._unlock()
            raise
        self.staged: dict[str, str] = {}     # final path -> staged path (graphs, manifest)
        self.data: dict[str, list] = {}      # final path of a graph -> [(staged data, final data)]
        self.remove_after: set[str] = set()
        self.manifest_text: str | None = None
        self.planned = self.committed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _unlock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Discards what is staged (a commit that was decided, its plan written, but did not
        finish is left for the next run to finish: recover) and releases the lock."""
        try:
            if not (self.planned and not self.committed):
                shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            self._unlock()

    def _final(self, path: str) -> str:
        final = _key(path)
        if not inside(self.bundle, os.path.dirname(final)):
            raise BundleError(f"{path}: outside the bundle folder {self.bundle} (symbolic links resolved); "
                              "the tools write nothing there")
        if os.stat(os.path.dirname(final)).st_dev != os.stat(self.dir).st_dev:
            raise BundleError(f"{path}: on another file system than the bundle folder; it cannot be replaced "
                              "by renaming")
        return final

    def read_path(self, path: str) -> str:
        """Where the graph (or manifest) at `path` is read now: its staged file, if it is staged."""
        return self.staged.get(_key(path), path)

    def manifest(self) -> tuple[str, dict]:
        """The manifest as staged so far (text, parsed), else the bundle's (read_manifest)."""
        if self.manifest_text is None:
            return read_manifest(self.bundle)
        import yaml

        return self.manifest_text, yaml.safe_load(self.manifest_text)

    def save(self, model: onnx.ModelProto, path: str, limit: int | None = None, verify=None) -> list[str]:
        """Checks `model` and stages it to replace `path`; returns the files it will be (the graph,
        and its data file when weights over `limit` bytes, default EXTERNAL_DATA_BYTES, go
        external). `verify(staged_path)`, if given, sees the written graph; if it raises,
        nothing is staged. `model`'s weights are moved into the data file when they go external,
        so the proto must not be used afterwards."""
        name = os.path.basename(path)
        external = weight_bytes(model) > (EXTERNAL_DATA_BYTES if limit is None else limit)

        def write(tmp):
            if external:
                onnx.save(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                          location=f"{name}.{secrets.token_hex(4)}.data", size_threshold=1024)
                onnx.checker.check_model(tmp)
            else:
                onnx.checker.check_model(model)
                onnx.save(model, tmp)

        return self.save_with(write, path, verify)

    def save_with(self, write, path: str, verify=None) -> list[str]:
        """Stages the graph that `write(staged_path)` writes (an exporter's own save; its external
        data files beside it, named as it names them) to replace `path`; returns the files it
        will be. `verify` as in `save`."""
        final = self._final(path)
        sub = tempfile.mkdtemp(dir=self.dir)
        tmp = os.path.join(sub, os.path.basename(final))
        write(tmp)
        if verify is not None:
            verify(tmp)
        data = sorted(p for p in external_files(tmp) if os.path.isfile(p))
        for p in data:
            if os.path.dirname(p) != sub:
                raise BundleError(f"{path}: the written graph reads external data outside its folder ({p})")
        mode = _mode(final)
        for p in [tmp] + data:
            os.chmod(p, mode)
        self.staged[final] = tmp
        self.data[final] = [(p, os.path.join(os.path.dirname(final), os.path.basename(p))) for p in data]
        self.remove_after.discard(final)
        return [final] + [d for _, d in self.data[final]]

    def adopt(self, folder: str) -> list[str]:
        """Stages the whole bundle built in `folder`, a folder inside this staging folder (its
        graphs with their external data files, and its manifest), each file to replace the file of
        its name in the bundle; returns the files the bundle will then have from it. How a tool
        that writes a whole bundle (export_mar.py) builds and checks it aside, with the other tools
        run on `folder`, before anything of the bundle is replaced. Any other file there, hidden
        ones aside, is a BundleError (nothing is staged). With a manifest in `folder`, the graphs
        the bundle's manifest lists (`graphs`, `precisions`) and the new one does not are removed
        at the commit, each with its own data file (`_retire_unlisted`): a re-export leaves no
        graph made from the old weights; files the old manifest did not name are left."""
        if not inside(self.dir, folder):
            raise BundleError(f"{folder}: not inside the staging folder {self.dir}")
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
        graphs = [n for n in names if n.endswith(".onnx") and os.path.isfile(os.path.join(folder, n))]
        data = {n: sorted(p for p in external_files(os.path.join(folder, n)) if os.path.isfile(p)) for n in graphs}
        for n, files in data.items():
            for p in files:
                if os.path.dirname(os.path.abspath(p)) != os.path.abspath(folder):
                    raise BundleError(f"{n}: reads external data outside its folder ({p})")
        known = set(graphs) | {os.path.basename(p) for files in data.values() for p in files} | {"manifest.yaml"}
        stray = [n for n in names if n not in known]
        if stray:
            raise BundleError(f"{folder}: {', '.join(stray)}: neither a graph, its data nor the manifest")
        out = []
        for n in graphs:
            final = self._final(os.path.join(self.bundle, n))
            mode = _mode(final)
            for p in [os.path.join(folder, n)] + data[n]:
                os.chmod(p, mode)
            self.staged[final] = os.path.join(folder, n)
            self.data[final] = [(p, os.path.join(self.bundle, os.path.basename(p))) for p in data[n]]
            self.remove_after.discard(final)
            out += [final] + [d for _, d in self.data[final]]
        manifest = os.path.join(folder, "manifest.yaml")
        if os.path.isfile(manifest):
            old = self._listed_in_bundle()
            with open(manifest, encoding="utf-8") as f:
                self.write_manifest(f.read())
            out.append(os.path.join(self.bundle, "manifest.yaml"))
            self._retire_unlisted(old, out)
        return out

    def _listed_in_bundle(self) -> set[str] | None:
        """The graph files the bundle's manifest lists now (then nothing is retired when None)."""
        return listed_in(self.bundle)

    def _retire_unlisted(self, old: set[str] | None, kept: list[str]) -> None:
        """Marks for removal at the commit the graphs the old manifest listed (`old`) that the
        staged manifest does not, each with its own external data (`<graph>.*data` beside it, as
        the commit retires a replaced graph's): they were made from the bundle's old weights (an
        earlier export's precision variants, split head). Only files inside the bundle, never a
        file the old manifest did not name (a data file aside), one that `kept` (the files the
        bundle will have) or the new manifest's graphs or their data files hold, nor a folder."""
        import yaml

        if not old:
            return
        new = listed_files(yaml.safe_load(self.manifest_text))
        keep = {_key(p) for p in kept}
        for file in new:
            path = _key(os.path.join(self.bundle, file))
            keep.add(path)
            if path not in self.staged:   # a graph kept as it is, with its data files
                keep |= {_key(p) for p in external_files(path)}
        for file in sorted(old - new):
            path = _key(os.path.join(self.bundle, file))
            if (path in keep or path in self.staged or not inside(self.bundle, os.path.dirname(path))
                    or not (os.path.isfile(path) or os.path.islink(path))):
                continue
            folder, name = os.path.dirname(path), os.path.basename(path)
            own = {p for p in external_files(path) if os.path.dirname(p) == folder
                   and os.path.basename(p).startswith(name + ".") and os.path.isfile(p)}
            self.remove_after |= {path} | {p for p in own if _key(p) not in keep}

    def staged_bytes(self, path: str) -> int:
        """Bytes of the graph staged for `path`, its data files included."""
        final = _key(path)
        return os.path.getsize(self.staged[final]) + sum(os.path.getsize(s) for s, _ in self.data.get(final, []))

    def remove(self, path: str) -> None:
        """Removes the file at `path` at the commit (after the manifest is replaced)."""
        final = self._final(path)
        if final in self.staged:
            raise BundleError(f"{path}: staged and removed in the same run")
        self.remove_after.add(final)

    def write_manifest(self, text: str) -> None:
        """Stages `text` as the bundle's manifest.yaml (renamed into place last, keeping the old
        file's mode)."""
        final = os.path.join(self.bundle, "manifest.yaml")
        tmp = os.path.join(self.dir, "manifest.yaml")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, _mode(final))
        self.staged[final] = tmp
        self.manifest_text = text

    def commit(self) -> None:
        """Renames everything staged into place (the manifest last), then removes what it
        retires. Every destination is checked first (BundleError, nothing changed); the plan is
        written next, so that a commit interrupted, or stopped by an error (CommitStopped, saying
        so), is finished by the next tool run on the bundle."""
        manifest = os.path.join(self.bundle, "manifest.yaml")
        rel = lambda p: os.path.relpath(p, self.bundle)  # noqa: E731
        moves, retire = [], set(self.remove_after)
        graphs = [p for p in self.staged if p != manifest]
        for final in graphs:
            new_data = {d for _, d in self.data.get(final, [])}
            folder, name = os.path.dirname(final), os.path.basename(final)
            # The old graph's own data (`<graph>.*data`, as export_mar.py and this module name
            # it); a data file named otherwise may be another graph's too and is left.
            retire |= {p for p in external_files(final) - new_data
                       if os.path.dirname(p) == folder and os.path.basename(p).startswith(name + ".")}
            moves += [(s, d) for s, d in self.data.get(final, [])]
        moves += [(self.staged[p], p) for p in graphs]
        if manifest in self.staged:
            moves.append((self.staged[manifest], manifest))
        for _, dst in moves:
            if os.path.isdir(dst) and not os.path.islink(dst):
                raise BundleError(f"{dst}: a folder is in the way of the file to be written there; nothing was "
                                  "changed")
        for path in [d for _, d in moves] + sorted(retire):
            if not os.access(os.path.dirname(path), os.W_OK):
                raise BundleError(f"{os.path.dirname(path)}: not writable, so {rel(path)} cannot be replaced; "
                                  "nothing was changed")
        plan = {"moves": [(rel(s), rel(d)) for s, d in moves], "remove": sorted(rel(p) for p in retire)}
        tmp = os.path.join(self.dir, PLAN + ".tmp")
        with open(tmp, "w") as f:
            json.dump(plan, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.dir, PLAN))
        self.planned = True
        try:
            _apply(self.bundle, plan)
        except CommitStopped as e:
            raise CommitStopped(e.done, e.total,
                                f"{self.bundle}: the commit stopped after {e.done} of {e.total} files: {e.why}; "
                                f"remove the cause and run any model tool on {self.bundle} to finish it") from e
        self.committed = True


def save_model(model: onnx.ModelProto, path: str, limit: int | None = None, verify=None) -> list[str]:
    """Saves one graph at `path` through a Staging of its folder, committed at once; returns
    the files written (see Staging.save)."""
    with Staging(os.path.dirname(_key(path))) as s:
        written = s.save(model, path, limit, verify)
        s.commit()
    return written


def write_manifest(bundle: str, text: str) -> str:
    """Writes `text` as the bundle's manifest.yaml through a Staging, committed at once (a reader
    sees the old manifest or the new one; the file's mode is kept). Returns its path."""
    with Staging(bundle) as s:
        s.write_manifest(text)
        s.commit()
    return os.path.join(bundle, "manifest.yaml")


def main(argv=None) -> int:
    """`python3 models/onnx_save.py BUNDLE`: finishes a commit that a killed tool left in the
    bundle (gtr-run refuses such a bundle, naming this command) and removes dead runs' staging
    folders; changes nothing else."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__.split(":", 1)[1].strip())
    ap.add_argument("bundle", help="the bundle folder")
    args = ap.parse_args(argv)

    def body() -> int:
        bundle = os.path.realpath(check_folder(args.bundle))
        fd = _lock(bundle)
        try:   # recovery alone: a read-only bundle with nothing to finish is fine
            recover(bundle, lambda line: print(f"{args.bundle}: {line}"))
            left = [os.path.join(n, PLAN) for n in _staging_folders(bundle)
                    if os.path.isfile(os.path.join(bundle, n, PLAN))]
        finally:
            if fd is not None:
                os.close(fd)
        if left:
            raise BundleError(f"{args.bundle}: {', '.join(left)} could not be removed after its commit was "
                              "finished; remove it by hand")
        print(f"{args.bundle}: no interrupted commit is left")
        return 0

    return run_tool(body, args.bundle)


def interrupted_commit(bundle: str) -> bool:
    """Whether this process left a decided commit (its plan) in `bundle`: the next tool run
    finishes it."""
    try:
        return any(n.startswith(f"{TMP_PREFIX}{os.getpid()}.") and os.path.isfile(os.path.join(bundle, n, PLAN))
                   for n in os.listdir(bundle))
    except OSError:
        return False


def run_tool(body, what: str) -> int:
    """Runs a tool's `body()` (its exit status) and turns a BundleError or an OSError (a
    read-only bundle, a full disk) into one line on stderr and exit status 2, and Ctrl-C into
    one line and exit status 130 (what was staged is gone; a commit under way is left to the
    next tool run on the bundle `what`, which finishes it)."""
    try:
        return body()
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:
        print(f"error: {what}: {type(e).__name__}: {one_line(e)}; nothing was changed", file=sys.stderr)
    except KeyboardInterrupt:
        if interrupted_commit(what):
            print(f"error: interrupted during the commit: {what} holds its plan, which the next model tool run "
                  f"on it finishes (python3 models/onnx_save.py {shlex.quote(what)})", file=sys.stderr)
        else:
            print(f"error: interrupted; {what} was left as it was", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())

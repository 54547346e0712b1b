"""What the tools that add a graph derived from a bundle's graphs share (models/add_sampler.py,
add_backbone.py, split_head.py; convert_precision.py and fuse_attention.py rebuild those graphs
through the tools' write functions): the manifest entry, writing through a Staging
(models/onnx_save.py), the check before the commit, and the command line.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from contextlib import contextmanager, nullcontext

import onnx
import yaml

from models.onnx_save import BundleError, CheckFailed, Staging, claim, read_manifest, run_tool
from models.variants import variant_flags


def manifest_with_graph(text: str, role: str, file: str, inputs: list[str], outputs: dict[str, str],
                        after: str) -> str:
    """The manifest text with a `role` graph entry (`file`, each input role named as itself, the
    `outputs` roles → tensor names) on one line after the `after` graph's entry, indented as that
    one, replacing an earlier one-line `role` entry; the rest of the text, comments included, as
    written. BundleError where the result would not read back as exactly that change (an entry
    written over several lines), before anything is written."""
    want = {"file": file, "inputs": {r: r for r in inputs}, "outputs": dict(outputs)}
    entry = (f"{role}: {{ file: {file}, inputs: {{ "
             + ", ".join(f"{r}: {r}" for r in inputs)
             + " }, outputs: { " + ", ".join(f"{r}: {t}" for r, t in outputs.items()) + " } }")
    lines = [ln for ln in text.splitlines() if not re.match(rf"^\s+{role}:\s*\{{", ln)]
    for i, ln in enumerate(lines):
        if re.match(rf"^\s+{after}:\s*\{{\s*file:", ln):
            lines.insert(i + 1, ln[: len(ln) - len(ln.lstrip())] + entry)
            new_text = "\n".join(lines) + "\n"
            _check_edit(text, new_text, role, want)
            return new_text
    raise BundleError(f"manifest.yaml: no `graphs.{after}` entry written on one line (`{after}: {{ file: ..., ... }}`) "
                      f"to put the {role} entry after; write it so and run again (nothing was changed)")


def _check_edit(old_text: str, new_text: str, role: str, want: dict) -> None:
    """BundleError unless `new_text` reads as `old_text` with `graphs.<role>` set to `want`."""
    old, new = yaml.safe_load(old_text), None
    try:
        new = yaml.safe_load(new_text)
    except yaml.YAMLError:
        pass
    expected = dict(old, graphs={**old["graphs"], role: want})
    if new != expected:
        raise BundleError(f"manifest.yaml: the `graphs.{role}` entry could not be written on one line beside "
                          f"the others (an entry written over several lines, or indented otherwise); write "
                          f"each graph entry as `ROLE: {{ file: ..., ... }}` on one line and run again "
                          f"(nothing was changed)")


def save_graph(bundle: str, model: onnx.ModelProto, file: str, precision: str | None, staging,
               manifest: dict, role: str) -> str:
    """Checks `model` and stages it in `bundle` (models.onnx_save.Staging) as `file`, or as
    FILE.PRECISION.onnx for a precision variant; returns the name. BundleError, before it is
    staged, when that name is a graph the bundle's `manifest` lists under another entry than
    `role`'s (models.onnx_save.claim)."""
    name = file if precision is None else file.replace(".onnx", f".{precision}.onnx")
    claim(bundle, manifest, f"graphs.{role}" if precision is None else f"precisions.{precision}.{role}", name)
    staging.save(model, os.path.join(bundle, name))
    return name


def staged(bundle: str, staging):
    """`staging`, or a new Staging of `bundle` committed when the block ends without an error."""
    @contextmanager
    def own():
        with Staging(bundle) as s:
            yield s
            s.commit()

    if staging is not None:
        return nullcontext(staging)
    return own()


def add_graphs(bundle: str, edit, write, verify, roles, sources, log=print) -> dict[str, str]:
    """What add_sampler.py, add_backbone.py and split_head.py share (`bundle` a real path: the
    callers resolve it): the bundle locked and its manifest read through the Staging
    (models/onnx_save.py) and edited first (`edit(text)`: a manifest this cannot edit is refused
    before anything is written), the graphs written aside (`write(manifest, staging)` →
    {role: file}), with `verify` = (check, tolerance, what) compared there (CheckFailed over the
    tolerance), and only then all committed, the manifest last. Afterwards a note names every precision whose variant lists the `sources`
    graphs but not `roles`: gtr-run does not use a derived graph in another precision than the
    run's, and convert_precision.py rebuilds the derived graphs the bundle has."""
    with Staging(bundle, log=log) as s:
        # Read under the bundle's lock, after an interrupted commit is finished (onnx_save.py).
        text, m = s.manifest()
        new_text = edit(text)
        names = write(m, s)
        if verify is not None:
            check, tolerance, what = verify
            worst = check(bundle, log=log, staging=s)
            if not worst <= tolerance:
                raise CheckFailed(f"{bundle}: check failed: the graph differs from {what} by {worst:.3g} "
                                  f"(more than {tolerance:g}); nothing was changed")
        s.write_manifest(new_text)
        s.commit()
    for precision, files in (m.get("precisions") or {}).items():
        if isinstance(files, dict) and all(r in files for r in sources) and not all(r in files for r in roles):
            log(f"note: precisions.{precision} lists no {' and '.join(roles)} graph{'s' if len(roles) > 1 else ''} "
                f"yet (gtr-run --precision {precision} will not use {'them' if len(roles) > 1 else 'it'}); "
                f"build {'them' if len(roles) > 1 else 'it'} with python3 models/convert_precision.py {shlex.quote(bundle)} "
                f"--precision {precision}{variant_flags(bundle, m, precision)}")
    return names


def bundle_view(bundle: str, staging=None):
    """(manifest, path) of a bundle for a check: the manifest content and `path(file)`, the path to
    read the bundle's `file` from; the versions staged in `staging` (models.onnx_save.Staging)
    where given, else the bundle's as they are."""
    if staging is None:
        return read_manifest(bundle)[1], lambda file: os.path.join(bundle, file)
    return staging.manifest()[1], lambda file: staging.read_path(os.path.join(bundle, file))


def graph_tool(argv, doc: str, needs: str, add) -> int:
    """The command line of a script that adds a derived graph to a bundle: `add(bundle, checked=...)`
    (add_graphs). Exit status 0, 1 when --check fails, 2 on an error naming the input; in both
    failures nothing of the bundle is changed."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", help=f"bundle folder (manifest.yaml and {needs})")
    ap.add_argument("--check", action="store_true",
                    help="compare the new graphs with their references (the chain ticked in NumPy, the "
                         "encoder and decoder run one after the other, the whole head) before anything is "
                         "replaced; exit status 1 over the tolerance")
    args = ap.parse_args(argv)

    def body():
        try:
            add(args.bundle, checked=args.check)
        except CheckFailed as e:
            print(str(e), file=sys.stderr)
            return 1
        return 0

    return run_tool(body, args.bundle)

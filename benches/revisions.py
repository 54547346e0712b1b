#!/usr/bin/env python3
"""One Rust bench of several revisions of gtr-run, side by side in one run.

  python3 benches/revisions.py REV... [--bench engine_overhead] [--column "engine s/image"]
      [--bench-from REV] [--rounds 2] [--work DIR] [-- BENCH_ARGS...]

Builds the bench of each revision (`git worktree` under --work, one shared CARGO_TARGET_DIR), then
runs the revisions' benches one after the other, --rounds times (alternating, so that a machine
that slows down or speeds up is spread over all of them), each in its own worktree. Reads the
Markdown table each prints: a row's key is its cells before --column (matched against the header
by its beginning), its value that column's number. Prints one table: per key, each revision's
median over the rounds (and range), and each revision's median over the first's.

--bench-from REV puts that revision's bench file (and `benches/common/`, the benches' shared
module, where it has one) into every worktree before building, so that each revision is timed by
the same bench code (the revisions' own library code is what differs), and declares it
(`[[bench]]`, `harness = false`) in a revision whose Cargo.toml does not; it must compile against
each of them. The worktrees stay in --work for the next run (`git worktree remove` them, or
delete --work: a later run prunes what is gone). Exit status: 0, 1 when a build or a run failed, a run printed no
table, or a key is missing from a revision's output, 2 for bad arguments.

Example (README, "Speed"): python3 benches/revisions.py 247cece 6976338 HEAD --bench-from HEAD
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git(*args: str, cwd: str = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def build(worktree: str, bench: str, target: str) -> str:
    """The bench's executable, built in `worktree`."""
    out = subprocess.run(
        ["cargo", "bench", "--bench", bench, "--no-run", "--message-format=json"],
        cwd=worktree, env={**os.environ, "CARGO_TARGET_DIR": target}, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"building {bench} in {worktree} failed:\n{out.stderr[-3000:]}")
    for line in out.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and \
                msg["target"]["name"] == bench:
            return msg["executable"]
    raise RuntimeError(f"cargo built no {bench} executable in {worktree}")


def table_values(text: str, column: str) -> dict[tuple, float]:
    """The Markdown table rows of `text`: (cells before `column`) -> that column's number."""
    values, at = {}, None
    for line in text.splitlines():
        if not line.startswith("|"):
            at = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if at is None:
            hits = [i for i, c in enumerate(cells) if c.startswith(column)]
            at = hits[0] if hits else None
            continue
        if set("".join(cells)) <= set("-: "):
            continue
        m = re.match(r"[-+]?\d+(\.\d+)?([eE][-+]?\d+)?", cells[at]) if at < len(cells) else None
        if m:
            values[tuple(cells[:at])] = float(m.group(0))
    return values


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args = []
    if "--" in argv:
        at = argv.index("--")
        argv, bench_args = argv[:at], argv[at + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("revisions", nargs="+", metavar="REV")
    ap.add_argument("--bench", default="engine_overhead")
    ap.add_argument("--column", default="engine s/image",
                    help="the table column to compare, by the beginning of its header (default: %(default)s)")
    ap.add_argument("--bench-from", metavar="REV", help="time every revision with this revision's bench file")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default="/tmp/gtr-revisions", help="worktrees and the shared target folder")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    try:
        revs = [(r, git("rev-parse", "--short", f"{r}^{{commit}}")) for r in a.revisions]
        if a.bench_from:
            git("rev-parse", "--verify", f"{a.bench_from}^{{commit}}")
    except subprocess.CalledProcessError as e:
        ap.error(f"not a revision: {e.stderr.strip()}")
    shas = [sha for _, sha in revs]
    if len(set(shas)) < len(shas):
        ap.error("two of the revisions are one commit: " + ", ".join(f"{n} = {sha}" for n, sha in revs))
    bench_file = f"benches/{a.bench}.rs"
    # path in the repository -> text, put into every worktree
    sources = {}
    if a.bench_from:
        sources[bench_file] = git("show", f"{a.bench_from}:{bench_file}") + "\n"
        listed = git("ls-tree", "-r", "--name-only", a.bench_from, "benches/common/")
        for path in listed.splitlines():
            sources[path] = git("show", f"{a.bench_from}:{path}") + "\n"
    try:
        binaries = prepare(a, revs, sources, bench_file)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else ""
        print(f"revisions: {e}{': ' + detail if detail else ''}", file=sys.stderr)
        return 1
    return compare(a, revs, binaries, bench_args)


def prepare(a, revs: list, sources: dict, bench_file: str) -> dict:
    """Each revision's worktree under --work, with `sources` put in, and its bench built:
    sha -> (name, worktree, executable kept beside it)."""
    git("worktree", "prune")
    target = os.path.join(os.path.abspath(a.work), "target")
    binaries = {}
    for name, sha in revs:
        tree = os.path.join(os.path.abspath(a.work), sha)
        if not os.path.isdir(tree):
            git("worktree", "add", "--detach", tree, sha)
        # What an earlier run put there goes: edits, and files the revision does not track.
        git("checkout", "--", ".", cwd=tree)
        git("clean", "-fdq", "--", "benches", cwd=tree)
        for path, text in sources.items():
            os.makedirs(os.path.dirname(os.path.join(tree, path)), exist_ok=True)
            with open(os.path.join(tree, path), "w") as f:
                f.write(text)
        if sources:
            manifest = os.path.join(tree, "Cargo.toml")
            with open(manifest) as f:
                declared = re.search(rf'(?m)^name\s*=\s*"{re.escape(a.bench)}"', f.read())
            if not declared:
                with open(manifest, "a") as f:
                    f.write(f'\n[[bench]]\nname = "{a.bench}"\nharness = false\n')
        print(f"building {a.bench} of {name} ({sha}) in {tree}", flush=True)
        exe = build(tree, a.bench, target)
        kept = os.path.join(os.path.abspath(a.work), f"{a.bench}-{sha}")
        shutil.copy2(exe, kept)
        binaries[sha] = (name, tree, kept)
    return binaries


def compare(a, revs: list, binaries: dict, bench_args: list) -> int:
    """Runs the benches alternately, --rounds times, and prints the table; the exit status."""
    runs: dict[str, list] = {sha: [] for _, sha in revs}
    for r in range(a.rounds):
        for _, sha in revs:
            name, tree, exe = binaries[sha]
            print(f"round {r + 1}/{a.rounds}: {name} ({sha})", flush=True)
            out = subprocess.run([exe, *bench_args, "--bench"], cwd=tree, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{name}: the bench failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                return 1
            values = table_values(out.stdout, a.column)
            if not values:
                print(f"{name}: the bench printed no table with a column \"{a.column}\":\n{out.stdout[-2000:]}",
                      file=sys.stderr)
                return 1
            runs[sha].append(values)
    keys = list(runs[revs[0][1]][0])
    status = 0
    header = [f"{name} ({sha})" for name, sha in revs]
    print(f"\n{a.bench}{' ' + ' '.join(bench_args) if bench_args else ''}, column \"{a.column}\": median of "
          f"{a.rounds} alternating rounds (range)" + (f"; every revision timed by {a.bench_from}'s bench file"
                                                       if a.bench_from else "") + "\n")
    print("| " + " | ".join(["row"] + header + [f"{n} / {revs[0][0]}" for n, _ in revs[1:]]) + " |")
    print("|" + "---|" * (1 + 2 * len(revs) - 1))
    for key in keys:
        medians, cells = [], []
        for name, sha in revs:
            seen = [run[key] for run in runs[sha] if key in run]
            if len(seen) < a.rounds:
                print(f"{name}: no row {' | '.join(key)} in every round", file=sys.stderr)
                status = 1
            if not seen:
                medians.append(None)
                cells.append("missing")
                continue
            med = statistics.median(seen)
            medians.append(med)
            cells.append(f"{med:.4g} ({min(seen):.4g}–{max(seen):.4g})")
        ratios = [f"{m / medians[0]:.2f}×" if m is not None and medians[0] else "n/a" for m in medians[1:]]
        print("| " + " | ".join([" · ".join(key)] + cells + ratios) + " |")
    return status


if __name__ == "__main__":
    sys.exit(main())

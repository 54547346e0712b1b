#!/usr/bin/env python3
"""Tests of onnx_save.py, and of the model tools on graphs with external data (plain script:
run it, it exits non-zero on the first failure).

  .venv/bin/python models/tests/test_onnx_save.py        # ~20 s, needs models/fixtures/requirements.txt

1. Below the limit a graph is one file; above it, the graph and a data file named after it,
   which onnx and ONNX Runtime read; rewriting it removes the old data file; a hard link to the
   old graph keeps it; a `verify` that raises leaves the old graph and no temporary file.
2. With the limit lowered so that every graph goes external (as MAR-H's do at the real limit):
   fuse_attention.py, add_backbone.py and convert_precision.py (fp16) work on a bundle whose
   encoder and decoder keep their weights in data files, write their graphs the same way, and
   ONNX Runtime runs the results.
3. A Staging left without commit changes nothing; a commit killed after its plan was written is
   finished by the next run, which also removes the staging folders of killed runs (whatever pid
   they name: under the lock they are dead runs'), and leaves every other hidden file alone (a
   user's `.encoder.onnx.original`, earlier versions' leftovers); the manifest keeps its mode.
4. The lock: a second tool on a bundle being written refuses at once (exit 2, one line); tools
   read the manifest after the killed commit they finish (add_sampler.py, fuse_attention.py); a
   destination that is a folder is refused with nothing changed, a commit stopped partway says
   so and is finished once the cause is gone; `other/lnk/..` is read and written as its real
   path; small tensors over the limit; an exporter's own save staged (export_mar.py).
5. No tool's new graph replaces a graph the manifest lists under another entry (a role, a
   precision variant, through a link, or a listed graph's external data); a commit plan a tool
   did not write, leading out of the bundle or its staging folder, is refused.
6. A whole bundle adopted over one that other tools extended (a re-export): the graphs the old
   manifest listed and the new one does not are removed with their own data files at the commit,
   nothing else (files no manifest names, a listed graph outside the bundle); a commit killed
   before its removals is finished by the next run.
"""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

MODELS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(MODELS))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_copies import TINY, check, copy_tiny, run_tiny_backbone, without_write_override  # noqa: E402

from models import onnx_save  # noqa: E402


def data_files(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".data"))


def leftovers(folder):
    return [n for n in os.listdir(folder) if n.startswith(".")]


def run_encoder(path):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"tokens": rng.standard_normal((2, 256, 4)).astype(np.float32),
             "known_index": np.array([[1, 7, 9]] * 2, np.int64), "class_label": np.array([3, 10], np.int64)}
    return s.run(None, feeds)[0]


def test_save_model(tmp):
    folder = os.path.join(tmp, "save")
    os.makedirs(folder)
    path = os.path.join(folder, "encoder.onnx")
    want = run_encoder(os.path.join(TINY, "encoder.onnx"))
    onnx_save.save_model(onnx.load(os.path.join(TINY, "encoder.onnx")), path)
    check(data_files(folder) == [] and np.array_equal(run_encoder(path), want), "below the limit: one file")
    link = os.path.join(tmp, "encoder-link.onnx")
    os.link(path, link)
    written = onnx_save.save_model(onnx.load(os.path.join(TINY, "encoder.onnx")), path, limit=1000)
    first = data_files(folder)
    check(len(written) == 2 and len(first) == 1 and first[0].startswith("encoder.onnx."),
          f"above the limit: the graph and a data file named after it ({first})")
    check(np.array_equal(run_encoder(path), want), "… which ONNX Runtime reads")
    check(onnx.load(link).graph.initializer[0].data_location != onnx.TensorProto.EXTERNAL,
          "a hard link to the old graph keeps the old graph")
    onnx_save.save_model(onnx.load(path), path, limit=1000)
    second = data_files(folder)
    check(len(second) == 1 and second != first, "rewriting it replaces the data file, the old one removed")
    onnx_save.save_model(onnx.load(path), path)
    check(data_files(folder) == [] and np.array_equal(run_encoder(path), want),
          "written inline again, no data file is left")

    def refuse(_):
        raise RuntimeError("no")

    before = open(path, "rb").read()
    try:
        onnx_save.save_model(onnx.load(os.path.join(TINY, "decoder.onnx")), path, limit=1000, verify=refuse)
        check(False, "a verify that raises is passed on")
    except RuntimeError:
        pass
    check(open(path, "rb").read() == before and data_files(folder) == [] and leftovers(folder) == [],
          "a verify that raises leaves the old graph and no temporary file")


def test_tools_on_external_data(tmp):
    from models.add_backbone import add_backbone, check as backbone_check
    from models.convert_precision import convert
    from models.fuse_attention import fuse_bundle

    bundle = copy_tiny(tmp, "external")
    real = onnx_save.EXTERNAL_DATA_BYTES
    onnx_save.EXTERNAL_DATA_BYTES = 10_000
    try:
        for name in ("encoder.onnx", "decoder.onnx"):
            onnx_save.save_model(onnx.load(os.path.join(bundle, name)), os.path.join(bundle, name))
        check(len(data_files(bundle)) == 2, "the bundle's encoder and decoder keep their weights in data files")
        counts = fuse_bundle(bundle, log=lambda *_: None)
        check(counts == {"encoder": 1, "decoder": 1}, "fuse_attention.py fuses them (and checks them)")
        add_backbone(bundle, log=lambda *_: None)
        report = convert(bundle, "fp16", log=lambda *_: None)
    finally:
        onnx_save.EXTERNAL_DATA_BYTES = real
    names = data_files(bundle)
    for graph in ("encoder.onnx", "decoder.onnx", "backbone.onnx", "encoder.fp16.onnx", "backbone.fp16.onnx"):
        check(sum(n.startswith(graph + ".") for n in names) == 1, f"{graph} has its own data file")
    check(len(names) == len({n.split('.onnx.')[0] for n in names}), f"no stale data file is left ({names})")
    check(leftovers(bundle) == [], "no temporary file is left")
    check(report["graphs"]["encoder"]["error_vs_fp32"]["max_abs"] < 0.05, "the fp16 variant was checked")
    z = run_tiny_backbone(os.path.join(bundle, "backbone.onnx"))
    check(z.shape == (2, 2, 32) and np.isfinite(z).all(), "ONNX Runtime runs the backbone from its data file")
    err = backbone_check(bundle, log=lambda *_: None)
    check(err < 1e-5, f"… and it gives the encoder and decoder's rows ({err:.2g})")


def test_write_manifest(tmp):
    folder = os.path.join(tmp, "manifest")
    os.makedirs(folder)
    shared = os.path.join(tmp, "shared-manifest.yaml")
    with open(shared, "w") as f:
        f.write("name: before\n")
    os.link(shared, os.path.join(folder, "manifest.yaml"))
    path = onnx_save.write_manifest(folder, "name: after\n")
    check(open(path).read() == "name: after\n", "write_manifest: the new text is in place")
    check(open(shared).read() == "name: before\n", "write_manifest: a hard-linked manifest is not written through")
    check(sorted(os.listdir(folder)) == ["manifest.yaml"], "write_manifest: no temporary file is left")


def kill_a_commit(bundle):
    """Commits a.onnx, b.onnx and a manifest `name: new` into `bundle`, killed after the first
    rename: its plan is left in the staging folder."""
    real = onnx_save._apply

    def killed(folder, plan):  # the first file renamed, then the process dies
        src, dst = plan["moves"][0]
        os.replace(os.path.join(folder, src), os.path.join(folder, dst))
        raise KeyboardInterrupt

    onnx_save._apply = killed
    try:
        with onnx_save.Staging(bundle) as s:
            s.save(onnx.load(os.path.join(TINY, "decoder.onnx")), os.path.join(bundle, "a.onnx"))
            s.save(onnx.load(os.path.join(TINY, "decoder.onnx")), os.path.join(bundle, "b.onnx"))
            s.write_manifest("name: new\n")
            s.commit()
    except KeyboardInterrupt:
        pass
    finally:
        onnx_save._apply = real


def test_finish_command(tmp):
    """`python3 models/onnx_save.py BUNDLE` (the command gtr-run names when it refuses a bundle
    whose commit was interrupted) finishes the commit and changes nothing else."""
    bundle = copy_tiny(tmp, "finish")
    kill_a_commit(bundle)
    check(not os.path.exists(os.path.join(bundle, "b.onnx")) and len(leftovers(bundle)) == 1,
          "a killed commit leaves its plan")
    command = [sys.executable, os.path.join(MODELS, "onnx_save.py"), bundle]
    r = subprocess.run(command, capture_output=True, text=True)
    check(r.returncode == 0 and "finished the commit of an interrupted run" in r.stdout
          and os.path.exists(os.path.join(bundle, "b.onnx")) and leftovers(bundle) == []
          and open(os.path.join(bundle, "manifest.yaml")).read() == "name: new\n",
          f"onnx_save.py BUNDLE finishes it ({r.stdout.strip()} {r.stderr.strip()})")
    before = {n: open(os.path.join(bundle, n), "rb").read() for n in os.listdir(bundle)}
    r = subprocess.run(command, capture_output=True, text=True)
    check(r.returncode == 0 and "no interrupted commit is left" in r.stdout
          and {n: open(os.path.join(bundle, n), "rb").read() for n in os.listdir(bundle)} == before,
          "run again, it changes nothing")
    r = subprocess.run(command[:2] + [os.path.join(tmp, "nowhere")], capture_output=True, text=True)
    check(r.returncode == 2 and r.stderr.count("\n") == 1 and "no such folder" in r.stderr,
          f"a missing bundle: exit 2, one line ({r.stderr.strip()})")


def snapshot(folder):
    """{relative path: bytes, or the link's target} of every file and link under `folder`."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for n in dirs + files:
            p = os.path.join(root, n)
            if os.path.islink(p):
                out[os.path.relpath(p, folder)] = "-> " + os.readlink(p)
            elif os.path.isfile(p):
                out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


def test_hostile_plan(tmp):
    """A commit plan a tool did not write (a hostile bundle's `.gtr-tmp.*/commit.json`) whose
    sources leave its staging folder or whose destinations or removals leave the bundle (absolute,
    `..`, a link leading out) is refused by the finishing command and every tool: one line naming
    the plan and the path, exit 2, nothing changed inside the bundle or outside it; with another,
    valid plan beside it, neither runs."""
    victim = os.path.join(tmp, "victim")
    os.makedirs(victim)
    for n in ("config", "x"):
        with open(os.path.join(victim, n), "w") as f:
            f.write("precious\n")
    stage = ".gtr-tmp.1.x"
    plans = {
        "absolute destination": ({"moves": [[f"{stage}/payload", os.path.join(victim, "config")]], "remove": []},
                                 os.path.join(victim, "config")),
        "`..` destination": ({"moves": [[f"{stage}/payload", "../victim/config"]], "remove": []}, "../victim/config"),
        "`..` removal": ({"moves": [], "remove": ["../victim/x"]}, "../victim/x"),
        "source outside the staging folder": ({"moves": [["manifest.yaml", "../stolen.yaml"]], "remove": []},
                                              "manifest.yaml"),
        "destination through a link leading out": ({"moves": [[f"{stage}/payload", "out/config"]], "remove": []},
                                                   "out/config"),
        "source through a link leading out": ({"moves": [[f"{stage}/away/x", "x.onnx"]], "remove": []},
                                              f"{stage}/away/x"),
        "not a plan": ({"moves": "encoder.onnx", "remove": []}, "moves"),
    }
    command = [sys.executable, os.path.join(MODELS, "onnx_save.py")]
    for k, (what, (plan, offending)) in enumerate(plans.items()):
        bundle = copy_tiny(tmp, f"hostile{k}")
        os.symlink(victim, os.path.join(bundle, "out"))
        folder = os.path.join(bundle, stage)
        os.makedirs(folder)
        os.symlink(victim, os.path.join(folder, "away"))
        with open(os.path.join(folder, "payload"), "w") as f:
            f.write("pwned\n")
        with open(os.path.join(folder, "commit.json"), "w") as f:
            json.dump(plan, f)
        if k == 0:  # a valid plan beside it is not carried out either
            good = os.path.join(bundle, ".gtr-tmp.2.y")
            os.makedirs(good)
            with open(os.path.join(good, "new.onnx"), "w") as f:
                f.write("new\n")
            with open(os.path.join(good, "commit.json"), "w") as f:
                json.dump({"moves": [[".gtr-tmp.2.y/new.onnx", "new.onnx"]], "remove": []}, f)
        before, victims = snapshot(bundle), snapshot(victim)
        for tool in (command, [sys.executable, os.path.join(MODELS, "add_sampler.py")]):
            r = subprocess.run(tool + [bundle], capture_output=True, text=True)
            check(r.returncode == 2 and r.stderr.count("\n") == 1 and "commit.json" in r.stderr
                  and offending in r.stderr and "Traceback" not in r.stderr
                  and snapshot(bundle) == before and snapshot(victim) == victims,
                  f"{what}: {os.path.basename(tool[1])} refuses the plan in one line, nothing changed "
                  f"({r.stderr.strip()})")


def test_no_graph_replaces_another_entry(tmp):
    """A new graph whose name is a file the manifest lists under another entry (another role, a
    precision variant, through a symbolic link, or a listed graph's external data) is refused
    before anything is written: exit 2, one line naming both entries, nothing changed. Running a
    tool again, replacing its own entry's file, still works; a graph outside the bundle gets the
    next free name instead."""
    tools = {name: [sys.executable, os.path.join(MODELS, f"{name}.py")]
             for name in ("split_head", "add_sampler", "convert_precision")}

    def edited(name, *replacements):
        bundle = copy_tiny(tmp, name)
        path = os.path.join(bundle, "manifest.yaml")
        text = open(path).read()
        for old, new in replacements:
            check(old in text, f"({name}: the tiny manifest has `{old}`)")
            text = text.replace(old, new)
        open(path, "w").write(text)
        return bundle

    def refused(bundle, command, *want):
        before = snapshot(bundle)
        r = subprocess.run(command + [bundle], capture_output=True, text=True)
        check(r.returncode == 2 and r.stderr.count("\n") == 1 and all(w in r.stderr for w in want)
              and "Traceback" not in r.stderr and snapshot(bundle) == before,
              f"{os.path.basename(bundle)}: {os.path.basename(command[1])} refused, naming {', '.join(want)}, "
              f"nothing changed ({r.stderr.strip()})")

    # The VAE listed as diffusion_state.onnx: split_head.py would write its state part over it.
    bundle = edited("taken-vae", ("file: vae_decoder.onnx", "file: diffusion_state.onnx"))
    os.rename(os.path.join(bundle, "vae_decoder.onnx"), os.path.join(bundle, "diffusion_state.onnx"))
    refused(bundle, tools["split_head"], "graphs.diffusion_state", "graphs.vae_decoder")
    # An int8 variant listed as encoder.fp16.onnx: the fp16 conversion would write over it.
    bundle = copy_tiny(tmp, "taken-variant")
    shutil.copyfile(os.path.join(bundle, "encoder.onnx"), os.path.join(bundle, "encoder.fp16.onnx"))
    with open(os.path.join(bundle, "manifest.yaml"), "a") as f:
        f.write("precisions:\n  int8: { encoder: encoder.fp16.onnx }\n")
    refused(bundle, tools["convert_precision"] + ["--precision", "fp16", "--no-check"],
            "precisions.fp16.encoder", "precisions.int8.encoder")
    # The VAE listed through a link to sampler.onnx: the sampler would replace what it reads.
    bundle = edited("taken-link", ("file: vae_decoder.onnx", "file: vae.onnx"))
    os.rename(os.path.join(bundle, "vae_decoder.onnx"), os.path.join(bundle, "sampler.onnx"))
    os.symlink("sampler.onnx", os.path.join(bundle, "vae.onnx"))
    refused(bundle, tools["add_sampler"], "graphs.sampler", "graphs.vae_decoder")
    # The encoder's weights in a data file named tick.onnx.
    bundle = copy_tiny(tmp, "taken-data")
    onnx.save(onnx.load(os.path.join(bundle, "encoder.onnx")), os.path.join(bundle, "encoder.onnx"),
              save_as_external_data=True, all_tensors_to_one_file=True, location="tick.onnx", size_threshold=0)
    refused(bundle, tools["add_sampler"], "graphs.tick", "external data of graphs.encoder")
    # Run again, each tool replaces its own entry's files.
    bundle = copy_tiny(tmp, "run-twice")
    for command in (tools["add_sampler"], tools["split_head"], tools["convert_precision"] + ["--precision", "fp16"]):
        for n in (1, 2):
            r = subprocess.run(command[:2] + [bundle] + command[2:], capture_output=True, text=True)
            check(r.returncode == 0, f"{os.path.basename(command[1])} run {n}: exit 0 ({r.stderr.strip()[-200:]})")
    # A graph outside the bundle: its variant skips a name another entry lists.
    bundle = edited("outside-taken", ("file: encoder.onnx", f"file: {os.path.join(TINY, 'encoder.onnx')}"))
    os.remove(os.path.join(bundle, "encoder.onnx"))
    shutil.copyfile(os.path.join(TINY, "vae_decoder.onnx"), os.path.join(bundle, "encoder.fp16.onnx"))
    with open(os.path.join(bundle, "manifest.yaml"), "a") as f:
        f.write("precisions:\n  int8: { vae_decoder: encoder.fp16.onnx }\n")
    kept = open(os.path.join(bundle, "encoder.fp16.onnx"), "rb").read()
    r = subprocess.run(tools["convert_precision"] + [bundle, "--precision", "fp16", "--no-check"],
                       capture_output=True, text=True)
    import yaml

    m = yaml.safe_load(open(os.path.join(bundle, "manifest.yaml")))
    check(r.returncode == 0 and m["precisions"]["fp16"]["encoder"] == "encoder.encoder.fp16.onnx"
          and m["precisions"]["int8"] == {"vae_decoder": "encoder.fp16.onnx"}
          and open(os.path.join(bundle, "encoder.fp16.onnx"), "rb").read() == kept,
          f"an outside graph's variant takes the next free name ({m['precisions']}; {r.stderr.strip()[-200:]})")


def test_ctrl_c(tmp):
    """Ctrl-C in a tool: one line, exit status 130, the bundle as it was (no traceback)."""
    import signal

    bundle = copy_tiny(tmp, "ctrl-c")
    before = snapshot(bundle)
    p = subprocess.Popen([sys.executable, "-u", os.path.join(MODELS, "convert_precision.py"), bundle,
                          "--precision", "fp16"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = p.stdout.readline()   # the run has begun: a graph is converted
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    check(first and p.returncode == 130 and err.count("\n") == 1 and "interrupted" in err
          and "Traceback" not in err and snapshot(bundle) == before,
          f"Ctrl-C: exit 130, one line, nothing changed ({p.returncode}: {err.strip()[-300:]})")


def test_read_only_bundle(tmp):
    """A bundle folder the user cannot write: every tool says so in one line, exit 2, and changes
    nothing; `onnx_save.py BUNDLE` with nothing to finish succeeds. As root (which writes
    anyway), the tools run without the capabilities that override file modes (`setpriv`)."""
    bundle = copy_tiny(tmp, "read-only")
    as_user = without_write_override()
    if as_user is None:
        print("skipped: a read-only bundle (root, and setpriv cannot drop its override of file modes)")
        return
    os.chmod(bundle, 0o555)
    before = {n: open(os.path.join(bundle, n), "rb").read() for n in os.listdir(bundle)
              if os.path.isfile(os.path.join(bundle, n))}
    try:
        for tool in [["convert_precision.py", "--precision", "fp16"], ["add_sampler.py"], ["add_backbone.py"],
                     ["split_head.py"], ["fuse_attention.py"]]:
            r = subprocess.run(as_user + [sys.executable, os.path.join(MODELS, tool[0]), bundle] + tool[1:],
                               capture_output=True, text=True)
            check(r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot be written" in r.stderr,
                  f"{tool[0]} on a read-only bundle: exit 2, one line ({r.stderr.strip()})")
        r = subprocess.run(as_user + [sys.executable, os.path.join(MODELS, "onnx_save.py"), bundle],
                           capture_output=True, text=True)
        check(r.returncode == 0 and "no interrupted commit is left" in r.stdout,
              f"onnx_save.py on it, nothing to finish: exit 0 ({r.stderr.strip()})")
    finally:
        os.chmod(bundle, 0o755)
    check({n: open(os.path.join(bundle, n), "rb").read() for n in os.listdir(bundle)} == before,
          "the read-only bundle is as it was")


def test_interrupted_commit_and_leftovers(tmp):
    """A commit interrupted after its plan was written is finished by the next run; staging
    folders of runs killed earlier (and those of earlier versions) are removed; the manifest keeps
    its mode."""
    bundle = copy_tiny(tmp, "interrupted")
    manifest = os.path.join(bundle, "manifest.yaml")
    os.chmod(manifest, 0o600)
    onnx_save.write_manifest(bundle, open(manifest).read() + "# edited\n")
    check(oct(os.stat(manifest).st_mode & 0o777) == oct(0o600), "write_manifest keeps the manifest's mode (600)")
    before = {n: open(os.path.join(bundle, n), "rb").read() for n in os.listdir(bundle)}
    with onnx_save.Staging(bundle) as s:
        s.save(onnx.load(os.path.join(TINY, "decoder.onnx")), os.path.join(bundle, "a.onnx"))
        s.save(onnx.load(os.path.join(TINY, "decoder.onnx")), os.path.join(bundle, "b.onnx"))
        s.write_manifest("name: new\n")
    check({n: open(os.path.join(bundle, n), "rb").read() for n in os.listdir(bundle)} == before,
          "a Staging left without commit changes nothing and leaves nothing")
    kill_a_commit(bundle)
    check(os.path.exists(os.path.join(bundle, "a.onnx")) and not os.path.exists(os.path.join(bundle, "b.onnx"))
          and len(leftovers(bundle)) == 1, "a commit killed halfway leaves its plan")
    os.makedirs(os.path.join(bundle, ".gtr-tmp.999999999.abc"))       # a staging folder of a dead run
    # A dead run's staging folder named after a pid that is alive now (pid 1; reused pids, other
    # namespaces): under the lock it is a dead run's all the same.
    os.makedirs(os.path.join(bundle, ".gtr-tmp.1.def"))
    kept = [".fuse_attention.ab12cd_3", ".decoder.int8.onnx.x1y2z3w4",   # earlier versions' leftovers
            ".decoder.onnx.backup_1", ".encoder.onnx.original", ".encoder.onnx.20261207",   # a user's
            ".manifest.0123abcd.tmp"]
    for name in kept:
        if "backup" in name or "x1y2" in name or "ab12" in name:
            os.makedirs(os.path.join(bundle, name))
        else:
            with open(os.path.join(bundle, name), "w") as f:
                f.write("mine\n")
    onnx_save.write_manifest(bundle, "name: newer\n")
    check(os.path.exists(os.path.join(bundle, "b.onnx")), "the next run finishes the interrupted commit")
    check(open(manifest).read() == "name: newer\n" and sorted(leftovers(bundle)) == sorted(kept),
          f"… removes every staging folder of a dead run, whatever its pid ({leftovers(bundle)})")
    check(all(os.path.exists(os.path.join(bundle, n)) for n in kept),
          "… and leaves every other hidden file and folder alone (a user's `.encoder.onnx.original`, "
          "`.decoder.onnx.backup_1/`; earlier versions' leftovers)")


def test_plan_of_a_live_pid(tmp):
    """A staging folder with a plan, named after a live pid (1), is a dead run's
    under the lock: its plan is finished, not skipped (and not applied later over newer commits)."""
    bundle = copy_tiny(tmp, "livepid")
    stale = os.path.join(bundle, f"{onnx_save.TMP_PREFIX}1.zzz")
    os.makedirs(stale)
    with open(os.path.join(stale, "manifest.yaml"), "w") as f:
        f.write("name: planned\n")
    with open(os.path.join(stale, onnx_save.PLAN), "w") as f:
        json.dump({"moves": [[os.path.relpath(os.path.join(stale, "manifest.yaml"), bundle), "manifest.yaml"]],
                   "remove": []}, f)
    onnx_save.write_manifest(bundle, "name: newer\n")
    check(open(os.path.join(bundle, "manifest.yaml")).read() == "name: newer\n" and leftovers(bundle) == [],
          "a plan left under a live pid is finished before the run, not after it")


HOLD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from models import onnx_save
with onnx_save.Staging(sys.argv[2]):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_lock(tmp):
    """A second tool on a bundle another one is writing refuses at once, with one line; the lock
    goes with the holder, and leaves no file behind."""
    bundle = copy_tiny(tmp, "locked")
    before = sorted(os.listdir(bundle))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, os.path.dirname(MODELS), bundle],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        check(holder.stdout.readline() == "held\n", "another process holds a Staging of the bundle")
        try:
            onnx_save.write_manifest(bundle, "name: lost\n")
            check(False, "a second Staging is refused")
        except onnx_save.BundleError as e:
            check(f"another model tool (pid {holder.pid}?) is writing {os.path.realpath(bundle)}; wait for it to end"
                  in str(e), f"a second Staging is refused at once, naming the holder ({e})")
        started = time.time()
        r = subprocess.run([sys.executable, os.path.join(MODELS, "convert_precision.py"), bundle,
                            "--precision", "fp16"], capture_output=True, text=True)
        check(r.returncode == 2 and r.stderr.count("\n") == 1 and "another model tool" in r.stderr
              and time.time() - started < 30, f"convert_precision.py meanwhile: exit 2, one line ({r.stderr.strip()})")
    finally:
        holder.stdin.close()
        holder.wait()
    check(sorted(os.listdir(bundle)) == before, "the holder gone, nothing is left (no lock file)")
    onnx_save.write_manifest(bundle, open(os.path.join(bundle, "manifest.yaml")).read())
    check(True, "the lock goes with the holder")
    # gtr-run holds a shared lock on the folder while it loads the bundle.
    reader = os.open(bundle, os.O_RDONLY)
    try:
        fcntl.flock(reader, fcntl.LOCK_SH)
        try:
            onnx_save.write_manifest(bundle, "name: lost\n")
            check(False, "a Staging is refused while gtr-run reads the bundle")
        except onnx_save.BundleError as e:
            check("is in use: gtr-run is loading its graphs" in str(e),
                  f"a Staging is refused while gtr-run reads the bundle, saying so ({e})")
    finally:
        os.close(reader)


def test_manifest_read_after_recover(tmp):
    """A tool reads the manifest after the killed commit it finishes, not before (the edit of a
    stale manifest would overwrite the finished commit's): add_sampler.py and fuse_attention.py."""
    from models.add_sampler import add_sampler
    from models.fuse_attention import fuse_bundle

    shared = copy_tiny(tmp, "stale-shared")
    for tool, run in (("add_sampler", add_sampler), ("fuse_attention", fuse_bundle)):
        bundle = copy_tiny(tmp, f"stale-{tool}")
        manifest = os.path.join(bundle, "manifest.yaml")
        if tool == "fuse_attention":  # an encoder outside the bundle: fusing it edits the manifest
            text = open(manifest).read().replace("file: encoder.onnx,", f"file: ../{os.path.basename(shared)}/encoder.onnx,")
            with open(manifest, "w") as f:
                f.write(text)
        real = onnx_save._apply

        def killed(folder, plan):
            raise KeyboardInterrupt

        onnx_save._apply = killed
        try:
            with onnx_save.Staging(bundle) as s:
                s.write_manifest(open(manifest).read() + "# committed by a killed run\n")
                s.commit()
        except KeyboardInterrupt:
            pass
        finally:
            onnx_save._apply = real
        run(bundle, log=lambda *_: None)
        check("# committed by a killed run" in open(manifest).read() and leftovers(bundle) == [],
              f"{tool}: the killed run's commit is finished and kept")


def test_blocked_commit(tmp):
    """A destination that cannot be replaced is refused before anything changes; a commit that
    stops partway says so, and the next runs name the plan and what blocks it until it is gone."""
    bundle = copy_tiny(tmp, "blocked")
    manifest = os.path.join(bundle, "manifest.yaml")
    text = open(manifest).read()
    os.makedirs(os.path.join(bundle, "diffusion.fp16.onnx"))
    with open(os.path.join(bundle, "diffusion.fp16.onnx", "x"), "w") as f:
        f.write("mine\n")
    r = subprocess.run([sys.executable, os.path.join(MODELS, "convert_precision.py"), bundle, "--precision", "fp16"],
                       capture_output=True, text=True)
    check(r.returncode == 2 and "a folder is in the way" in r.stderr and "nothing was changed" in r.stderr
          and open(manifest).read() == text and leftovers(bundle) == []
          and not os.path.exists(os.path.join(bundle, "encoder.fp16.onnx")),
          f"a folder where a graph goes: refused before anything is replaced ({r.stderr.strip()})")
    onnx_save.write_manifest(bundle, text)
    check(open(manifest).read() == text, "… and nothing is left that stops the next run")

    decoder = onnx.load(os.path.join(TINY, "decoder.onnx"))
    real = os.replace
    blocker = os.path.join(bundle, "b.onnx")

    def replace(src, dst):  # the obstacle appears once the commit has begun
        real(src, dst)
        os.makedirs(blocker, exist_ok=True)

    try:
        with onnx_save.Staging(bundle) as s:
            s.save(decoder, os.path.join(bundle, "a.onnx"))
            s.save(decoder, blocker)
            s.write_manifest("name: new\n")
            os.replace = replace
            s.commit()
        check(False, "a stopped commit is reported")
    except onnx_save.BundleError as e:
        check("the commit stopped after 1 of 3 files: b.onnx cannot be replaced" in str(e)
              and "run any model tool on" in str(e), f"a commit stopped partway says so ({e})")
    finally:
        os.replace = real
    try:
        onnx_save.write_manifest(bundle, "name: newer\n")
        check(False, "the next run refuses while the cause is there")
    except onnx_save.BundleError as e:
        check(onnx_save.PLAN in str(e) and "b.onnx cannot be replaced" in str(e),
              f"the next run names the stuck plan and what blocks it ({e})")
    os.rmdir(blocker)
    onnx_save.write_manifest(bundle, "name: newer\n")
    check(os.path.isfile(blocker) and open(manifest).read() == "name: newer\n" and leftovers(bundle) == [],
          "the cause removed, the next run finishes the commit, then does its own")


def test_links(tmp):
    """`other/lnk/..` with other/lnk -> real/sub is real/: the tools read and write there."""
    from models.add_sampler import add_sampler

    real = copy_tiny(tmp, "linked")
    os.makedirs(os.path.join(real, "sub"))
    other = os.path.join(tmp, "other")
    os.makedirs(other)
    os.symlink(os.path.join(real, "sub"), os.path.join(other, "lnk"))
    given = os.path.join(other, "lnk", "..")
    add_sampler(given, log=lambda *_: None)
    check(os.path.isfile(os.path.join(real, "sampler.onnx")) and "sampler:" in open(os.path.join(real, "manifest.yaml")).read()
          and os.listdir(other) == ["lnk"], "add_sampler.py on other/lnk/.. reads and writes real/")
    onnx_save.save_model(onnx.load(os.path.join(TINY, "decoder.onnx")), os.path.join(given, "c.onnx"))
    check(os.path.isfile(os.path.join(real, "c.onnx")) and os.listdir(other) == ["lnk"],
          "save_model on other/lnk/../c.onnx writes real/c.onnx")


def small_model():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones(4, np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_small_tensors_over_the_limit(tmp):
    """Weights over the limit but every tensor under onnx's size threshold: no data file is
    written, and none is expected."""
    folder = os.path.join(tmp, "small")
    os.makedirs(folder)
    written = onnx_save.save_model(small_model(), os.path.join(folder, "g.onnx"), limit=0)
    check(written == [os.path.join(os.path.realpath(folder), "g.onnx")] and data_files(folder) == [],
          "small tensors over the limit: one file, no data file expected")


def test_save_with(tmp):
    """An exporter's own save (export_mar.py: `<graph>.onnx.data` beside the graph) goes through
    the staging: a failed export leaves the old graph and its data file; a new one replaces both."""
    folder = os.path.join(tmp, "exported")
    os.makedirs(folder)
    path = os.path.join(folder, "encoder.onnx")
    want = run_encoder(os.path.join(TINY, "encoder.onnx"))

    def export(tmp_path):
        onnx.save(onnx.load(os.path.join(TINY, "encoder.onnx")), tmp_path, save_as_external_data=True,
                  all_tensors_to_one_file=True, location=os.path.basename(tmp_path) + ".data")

    for _ in range(2):
        with onnx_save.Staging(folder) as s:
            files = s.save_with(export, path)
            s.commit()
        check(data_files(folder) == ["encoder.onnx.data"] and len(files) == 2 and np.array_equal(run_encoder(path), want)
              and leftovers(folder) == [], "an exported graph and its data file are renamed into place")

    def failed(tmp_path):
        raise RuntimeError("export failed")

    before = {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder)}
    try:
        with onnx_save.Staging(folder) as s:
            s.save_with(failed, path)
        check(False, "a failed export is raised")
    except RuntimeError as e:
        check(str(e) == "export failed", f"a failed export is raised ({e})")
    check({n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder)} == before,
          "a failed export leaves the old graph and its data file")


def adopt_tiny(bundle, apply=None):
    """Stages a fresh copy of the tiny bundle built inside a Staging of `bundle` (as export_mar.py
    builds its bundle) and commits it, with `_apply` replaced by `apply` if given."""
    real = onnx_save._apply
    if apply is not None:
        onnx_save._apply = apply
    try:
        with onnx_save.Staging(bundle) as s:
            work = os.path.join(s.dir, "bundle")
            os.makedirs(work)
            for name in os.listdir(TINY):
                if name != "golden":
                    shutil.copy(os.path.join(TINY, name), work)
            s.adopt(work)
            retired = sorted(os.path.relpath(p, s.bundle) for p in s.remove_after)
            s.commit()
        return retired
    finally:
        onnx_save._apply = real


def extend_bundle(tmp, name):
    """A copy of the tiny bundle that other tools extended: a listed fp16 variant with its weights
    in a data file, a listed split-head graph, a listed graph outside the bundle; and files no
    manifest names (a user's graph and data file). Returns (bundle, {file: bytes} of the files
    that must stay)."""
    bundle = copy_tiny(tmp, name)
    outside = os.path.join(tmp, f"{name}-outside")
    os.makedirs(outside)
    shutil.copy(os.path.join(TINY, "decoder.onnx"), os.path.join(outside, "decoder.onnx"))
    decoder = onnx.load(os.path.join(TINY, "decoder.onnx"))
    onnx_save.save_model(decoder, os.path.join(bundle, "decoder.fp16.onnx"), limit=1000)
    shutil.copy(os.path.join(TINY, "diffusion.onnx"), os.path.join(bundle, "diffusion_condition.onnx"))
    mine = ["notes.onnx", "decoder.fp16.onnx.mine.data"]   # a data file named after it, but not its own
    for name in mine:
        with open(os.path.join(bundle, name), "w") as f:
            f.write("mine\n")
    manifest = os.path.join(bundle, "manifest.yaml")
    text = open(manifest).read().replace("graphs:\n", "graphs:\n"
        "  diffusion_condition: { file: diffusion_condition.onnx, inputs: { t: t, z: z }, outputs: { cond: z } }\n"
        f"  extra: {{ file: ../{name}-outside/decoder.onnx, inputs: {{}}, outputs: {{}} }}\n")
    with open(manifest, "w") as f:
        f.write(text + "precisions:\n  fp16: { decoder: decoder.fp16.onnx }\n")
    kept = {p: open(p, "rb").read() for p in [os.path.join(bundle, n) for n in mine]
            + [os.path.join(outside, "decoder.onnx")]}
    check(len([n for n in data_files(bundle) if n.startswith("decoder.fp16.onnx.") and "mine" not in n]) == 1,
          "the extended bundle's fp16 variant keeps its weights in a data file")
    return bundle, kept


def test_adopt_retires_unlisted(tmp):
    """A whole bundle adopted over one that other tools extended (export_mar.py re-exporting):
    the commit removes the graphs the old manifest listed and the new one does not, with their
    own data files, and nothing else; a commit killed before it did is finished by the next run."""
    tiny_files = sorted(n for n in os.listdir(TINY) if n != "golden") + ["notes.onnx", "decoder.fp16.onnx.mine.data"]
    bundle, kept = extend_bundle(tmp, "adopt")
    retired = adopt_tiny(bundle)
    check(len(retired) == 3 and "decoder.fp16.onnx" in retired and "diffusion_condition.onnx" in retired
          and any(n.startswith("decoder.fp16.onnx.") for n in retired), f"the commit retires {retired}")
    check(sorted(os.listdir(bundle)) == sorted(tiny_files),
          f"… the listed fp16 variant, its data file and the split-head graph are gone ({sorted(os.listdir(bundle))})")
    check(all(open(p, "rb").read() == b for p, b in kept.items()),
          "… files the old manifest did not name, and a listed graph outside the bundle, are left as they were")
    check(open(os.path.join(bundle, "manifest.yaml")).read() == open(os.path.join(TINY, "manifest.yaml")).read(),
          "… and the manifest is the adopted one")
    check(adopt_tiny(bundle) == [], "adopted again: nothing more to retire")

    bundle, kept = extend_bundle(tmp, "adopt-killed")

    def killed(folder, plan):  # the first file renamed, then the process dies
        src, dst = plan["moves"][0]
        os.replace(os.path.join(folder, src), os.path.join(folder, dst))
        raise KeyboardInterrupt

    try:
        adopt_tiny(bundle, killed)
        check(False, "the killed commit is interrupted")
    except KeyboardInterrupt:
        pass
    check(os.path.exists(os.path.join(bundle, "decoder.fp16.onnx")) and len(leftovers(bundle)) == 1,
          "a commit killed before its removals leaves the stale graphs and its plan")
    r = subprocess.run([sys.executable, os.path.join(MODELS, "onnx_save.py"), bundle], capture_output=True, text=True)
    check(r.returncode == 0 and sorted(os.listdir(bundle)) == sorted(tiny_files)
          and all(open(p, "rb").read() == b for p, b in kept.items()),
          f"… the next run finishes it: the stale graphs removed, the others kept ({r.stdout.strip()})")

    bundle = copy_tiny(tmp, "adopt-bad-manifest")
    shutil.copy(os.path.join(TINY, "decoder.onnx"), os.path.join(bundle, "decoder.fp16.onnx"))
    with open(os.path.join(bundle, "manifest.yaml"), "w") as f:
        f.write("graphs: [decoder.fp16.onnx\n")
    check(adopt_tiny(bundle) == [] and os.path.exists(os.path.join(bundle, "decoder.fp16.onnx")),
          "an old manifest that cannot be parsed: nothing is retired")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        test_save_model(tmp)
        test_write_manifest(tmp)
        test_interrupted_commit_and_leftovers(tmp)
        test_finish_command(tmp)
        test_hostile_plan(tmp)
        test_no_graph_replaces_another_entry(tmp)
        test_ctrl_c(tmp)
        test_read_only_bundle(tmp)
        test_plan_of_a_live_pid(tmp)
        test_lock(tmp)
        test_manifest_read_after_recover(tmp)
        test_blocked_commit(tmp)
        test_links(tmp)
        test_small_tensors_over_the_limit(tmp)
        test_save_with(tmp)
        test_adopt_retires_unlisted(tmp)
        test_tools_on_external_data(tmp)
    print("all onnx_save tests passed")


if __name__ == "__main__":
    main()

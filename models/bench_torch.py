#!/usr/bin/env python3
"""Speed of gtr-run against the project's PyTorch reference sampler, on the same weights and
the same schedule, both on the CPU, in one run.

What is compared
----------------
* **Rust**: the `gtr-run` binary generating B images in one batch from a bundle (the four ONNX
  graphs, ONNX Runtime's CPU provider, `--threads T`):
  `gtr-run BUNDLE SCHEDULE --num-images B --batch B --seed S --threads T --out DIR --force`.
  The time is `seconds.generation` of its run.json: the engine's in-process generation (backbone
  passes, FTS, diffusion chains with their ChaCha20 noise draws, VAE decode); it leaves out
  process start, loading the ORT library and the graphs, planning and writing PNGs.
  (`seconds.wall`, which adds planning and the PNGs, is kept in the JSON.) Each repetition is a
  fresh process, so its time includes ONNX Runtime's first-call costs of each graph.
* **PyTorch**: `models/torch/reference_sampler.py`'s `sample(model, case)` on the PyTorch modules
  (eager, float32, `torch.no_grad`) loaded from the training checkpoints: `train/mar.pt` (its
  `ema` weights) and `train/vae.pt` of models/mar-tiny, built with train.py's `mar_config` and
  `load_vae`, latent scale from `train/latent_scale.json`. The time is the `sample` call
  (perf_counter, model already loaded, case arrays already made): backbone passes, FTS, the
  diffusion chains, VAE decode, pixels. Threads: `torch.set_num_threads(T)` with the same T as
  gtr-run's `--threads` (ONNX Runtime: T intra-op threads per graph, intra-op spinning off,
  sequential graph execution; PyTorch: T intra-op OpenMP threads, OMP_WAIT_POLICY=PASSIVE unless
  the environment sets it, the counterpart of spinning off; the inter-op pool is untouched,
  eager mode uses none). Both sides run at the script's own nice level.
  The reference is written to be checked, not to be fast: one Python call per token for FTS
  scores, float64 update arithmetic, rows of one step grouped by chain length (one head call per
  iteration and group, where gtr-run runs every row of a step in one call per tick). The JSON and
  the table also give the share of its time spent inside module calls.

The same work on both sides: the schedule is planned by the Rust side (`gtr-run plan SCHEDULE
--json --seed S`) and turned into a reference "case" (models/fixtures/README.md layout): the
same steps and tokens per step, diffusion steps, per-step CFG (MAR's batch doubling; null = no
unconditional pass), temperature and FTS rule (fraction, selector, detail steps; the count rule
clamp(round_half_even(β·n), 1, n) is checked against the plan's). Every image of the PyTorch
batch takes the plan's token order; gtr-run gives each image its own order (same step sizes, so
the same cost). The case's noise comes from numpy (made before timing; gtr-run draws its noise
inside the timed part). Labels are gtr-run's balanced ones. After the warm-up of each batch size
the script checks, and stops if they differ, that gtr-run's run.json has the plan's per-step
table and that both sides ran the same number of backbone passes and diffusion-head rows per image
(rows = tokens × chain length × 2 with CFG).

Timing: for each schedule and batch size, one warm-up pair (not counted), then `--reps`
repetitions interleaved Rust, PyTorch, Rust, PyTorch, ... so machine drift hits both alike.
Reported: images per second of each (median, min–max over repetitions) and the ratio
Rust/PyTorch (ratio of the medians; min–max of the per-repetition pairs).

Checks before timing:
* same weights: the bundle's graphs in onnxruntime against the PyTorch modules on random
  inputs (export_mar.check_parity, tolerance 1e-4), and the bundle's latent_scale against
  train/latent_scale.json;
* agreement (`--replay-check`, default on): per schedule, one image at batch 1 with injected
  orders and noise on both sides (gtr-run `--replay FILE.npz`, see README "replay"); reports the
  largest pixel difference (0–255) and how many pixels differ.

  .venv-torch/bin/python models/bench_torch.py                       # bundle models/mar-tiny
  .venv-torch/bin/python models/bench_torch.py --bundle /tmp/mt --batches 1 4 --reps 3

Writes a Markdown table to stdout and every raw timing to --json (default
runs/bench-torch/bench_torch.json). Run it on an otherwise idle machine for numbers to quote.

Exit status 0 when every measurement was made; 2 when it stops, saying why on stderr: a missing
binary, bundle or weights file, not the same model (one line: the parity check above fails, the
bundle's graphs are of another shape than the PyTorch model's, or the latent scales differ), a
plan or run.json that does not match, a gtr-run command that fails (with its stderr). The defaults
(--bundle, --weights, --schedules, --binary, --work) are paths in this repository, wherever it
is run from.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(_HERE)
# models/torch would shadow PyTorch if this script's folder stayed on sys.path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, REPO)

# gtr-run runs ONNX Runtime with intra-op spinning off; the PyTorch counterpart is OpenMP's
# passive wait policy (read once, when PyTorch loads libgomp). On a busy machine the default
# (spinning) policy makes small eager ops up to ~100x slower. An OMP_WAIT_POLICY already in the
# environment is kept (e.g. OMP_WAIT_POLICY=ACTIVE to measure PyTorch with spinning).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.torch import reference_sampler as ref  # noqa: E402
from models.torch import mar as M  # noqa: E402
from models.run_record import read_run_record  # noqa: E402

MAR_TINY = os.path.join(_HERE, "mar-tiny")
GRAPHS = ("encoder.onnx", "decoder.onnx", "diffusion.onnx", "vae_decoder.onnx")
SELECTORS = {"high_freq": ref.SELECTOR_HIGH, "low_freq": ref.SELECTOR_LOW, "all": ref.SELECTOR_ALL}


class BenchError(Exception):
    """What stops the benchmark before it times anything, said in one line (exit status 2)."""


def ort_errors() -> tuple:
    """onnxruntime's own exception types (InvalidArgument, Fail, ...: not RuntimeErrors)."""
    import inspect

    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(c for c in vars(state).values() if inspect.isclass(c) and issubclass(c, Exception))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the PyTorch side -------------------------------------------------------------------------

def import_train():
    """models/mar-tiny/train.py as a module (its folder name is not a package name)."""
    path = os.path.join(MAR_TINY, "train.py")
    spec = importlib.util.spec_from_file_location("mar_tiny_train", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class TimedModel(ref.TorchModel):
    """The reference's TorchModel, counting calls, diffusion-head rows and seconds per role."""

    def reset(self):
        self.calls = {"backbone": 0, "diffusion": 0, "vae": 0}
        self.seconds = {"backbone": 0.0, "diffusion": 0.0, "vae": 0.0}
        self.rows = 0

    def _timed(self, role, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds[role] += time.perf_counter() - t0
        self.calls[role] += 1
        return out

    def backbone(self, tokens, known, labels):
        return self._timed("backbone", super().backbone, tokens, known, labels)

    def diffusion(self, x, t, z):
        self.rows += x.shape[0]
        return self._timed("diffusion", super().diffusion, x, t, z)

    def vae_decode(self, latent):
        return self._timed("vae", super().vae_decode, latent)


def load_torch_model(weights: str) -> tuple:
    """(TimedModel, MAR training step) from train/mar.pt (ema) + train/vae.pt + latent_scale.json."""
    need = {"mar.pt": "train.py mar", "vae.pt": "train.py vae", "latent_scale.json": "train.py scale"}
    for name, stage in need.items():
        if not os.path.isfile(os.path.join(weights, name)):
            raise BenchError(f"PyTorch weights: {os.path.join(weights, name)} is missing "
                             f"(made by `.venv-torch/bin/python models/mar-tiny/{stage}`)")
    train = import_train()
    train.TRAIN_DIR = weights          # load_vae reads vae.pt from here
    s = train.load_settings()
    ck = torch.load(os.path.join(weights, "mar.pt"), weights_only=False)
    if "ema" not in ck:
        raise BenchError(f"{os.path.join(weights, 'mar.pt')} has no `ema` weights (keys: {sorted(ck)})")
    mar = M.MAR(train.mar_config(s))
    mar.load_state_dict(ck["ema"])
    vae = train.load_vae(s)
    with open(os.path.join(weights, "latent_scale.json")) as f:
        scale = json.load(f)["latent_scale"]
    # The diffusion role as the bundle exports it (mar-tiny wraps MAR's MLP, see train.py).
    model = TimedModel(mar, vae, head=train.diffusion_role(mar), latent_scale=scale)
    model.reset()
    return model, int(ck.get("step", -1))


# -- the bundle and the Rust side -------------------------------------------------------------

def check_bundle(bundle: str) -> dict:
    manifest = os.path.join(bundle, "manifest.yaml")
    missing = [f for f in ("manifest.yaml", *GRAPHS) if not os.path.isfile(os.path.join(bundle, f))]
    if missing:
        hint = ""
        if os.path.abspath(bundle) == os.path.abspath(MAR_TINY):
            hint = ("\n  models/mar-tiny has no exported bundle yet (training in progress?); export one to a "
                    "temporary folder:\n    .venv-torch/bin/python models/mar-tiny/train.py export --out /tmp/mt\n"
                    "  and pass --bundle /tmp/mt")
        raise BenchError(f"bundle {bundle}: missing {', '.join(missing)}{hint}")
    import yaml

    try:
        with open(manifest, encoding="utf-8") as f:
            m = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise BenchError(f"{manifest}: cannot be read as YAML ({' '.join(str(e).split())})") from e
    info = {}
    for key, kind in (("name", str), ("latent_scale", float), ("classes", int), ("null_class", int)):
        value = m.get(key) if isinstance(m, dict) else None
        if value is None:
            raise BenchError(f"{manifest}: no `{key}`")
        try:
            info[key] = kind(value)
        except (TypeError, ValueError):
            raise BenchError(f"{manifest}: `{key}` is {value!r}, not {kind.__name__}") from None
    return info


def run_cmd(cmd: list) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise BenchError(f"`{' '.join(cmd)}` failed ({p.returncode}):\n{p.stderr.strip()}")
    return p


def rust_plan(a, schedule: str) -> dict:
    cmd = [a.binary, "plan", schedule, "--json", "--seed", str(a.seed)]
    for s in a.set:
        cmd += ["--set", s]
    return json.loads(run_cmd(cmd).stdout)


def run_rust(a, schedule: str, B: int, out: str, replay: str | None = None, npz: str | None = None) -> dict:
    cmd = [a.binary, a.bundle, schedule, "--num-images", str(B), "--batch", str(B), "--seed", str(a.seed),
           "--threads", str(a.threads), "--out", out, "--force"]
    for s in a.set:
        cmd += ["--set", s]
    if replay:
        cmd += ["--replay", replay]
    if npz:
        cmd += ["--npz", npz]
    run_cmd(cmd)
    return read_run_record(out)


# -- plan -> reference case -------------------------------------------------------------------

def step_cfg(x) -> float:
    return float("nan") if x is None or float(x) == 1.0 else float(x)


def case_from_plan(plan: dict, B: int, labels: list, L: int, C: int, rng: np.random.Generator) -> dict:
    steps = plan["steps"]
    order = np.concatenate([np.asarray(s["tokens"], dtype=np.int64) for s in steps])
    if order.shape != (L,) or not np.array_equal(np.sort(order), np.arange(L)):
        raise BenchError(f"the plan's tokens are not a permutation of the model's {L} tokens "
                         f"(plan grid {plan['grid']})")
    S = len(steps)
    frac, dsteps, sel = np.zeros(S), np.zeros(S, dtype=np.int64), np.zeros(S, dtype=np.int64)
    for k, s in enumerate(steps):
        if s.get("clip_timesteps") is not None:
            raise BenchError(f"step {k}: clip_timesteps {s['clip_timesteps']} has no place in the "
                             f"reference sampler's case layout (its chains keep every timestep)")
        d = s["detail"]
        if d is None:
            continue
        if d["selector"] not in SELECTORS:
            raise BenchError(f"step {k}: FTS selector `{d['selector']}` has no counterpart in the PyTorch "
                             f"reference sampler (it knows {', '.join(SELECTORS)})")
        n = len(s["tokens"])
        want = n if d["selector"] == "all" else min(max(round(d["fraction"] * n), 1), n)
        if want != d["count"]:
            raise BenchError(f"step {k}: the plan gives FTS {d['count']} of {n} tokens, the reference "
                             f"sampler's rule {want}")
        frac[k], dsteps[k], sel[k] = d["fraction"], d["steps"], SELECTORS[d["selector"]]
    diff = np.asarray([s["diffusion_steps"] for s in steps], dtype=np.int64)
    tmax = int(max(diff.max(), dsteps.max()))
    return {
        "labels": np.asarray(labels, dtype=np.int64),
        "order": np.tile(order, (B, 1)),
        "step_sizes": np.asarray([len(s["tokens"]) for s in steps], dtype=np.int64),
        "diffusion_steps": diff,
        "detail_fraction": frac, "detail_steps": dsteps, "detail_selector": sel,
        "cfg": np.asarray([step_cfg(s["cfg"]) for s in steps], dtype=np.float64),
        "temperature": np.asarray([s["temperature"] for s in steps], dtype=np.float64),
        "init_noise": rng.standard_normal([B, L, C]).astype(np.float32),
        "step_noise": rng.standard_normal([B, L, tmax, C]).astype(np.float32),
    }


def check_same_work(plan: dict, run: dict, model: TimedModel, B: int, schedule: str) -> dict:
    """gtr-run's run.json step table against the plan, and the work per image of both sides."""
    rs = run["steps"]
    if len(rs) != len(plan["steps"]):
        raise BenchError(f"{schedule}: plan has {len(plan['steps'])} steps, gtr-run ran {len(rs)}")
    for k, (p, r) in enumerate(zip(plan["steps"], rs)):
        same = (len(p["tokens"]) == r["tokens"] and p["diffusion_steps"] == r["diffusion_steps"]
                and p["detail"] == r["detail"] and p["temperature"] == r["temperature"]
                and (p["cfg"] is None) == (r["cfg"] is None)
                and (p["cfg"] is None or abs(p["cfg"] - r["cfg"]) <= 1e-12))
        if not same:
            raise BenchError(f"{schedule}: step {k} differs between the plan and gtr-run's run.json:\n"
                             f"  plan    {dict(p, tokens=len(p['tokens']))}\n  gtr-run {r}")
    rust_rows = sum(r["diffusion_rows"] for r in rs) / run["num_images"]
    torch_rows = model.rows / B
    rust_passes = run["mar_steps"]
    if rust_rows != torch_rows or model.calls["backbone"] != rust_passes:
        raise BenchError(f"{schedule}, batch {B}: not the same work: diffusion-head rows per image "
                         f"gtr-run {rust_rows}, PyTorch {torch_rows}; backbone passes gtr-run {rust_passes}, "
                         f"PyTorch {model.calls['backbone']}")
    return {"diffusion_rows_per_image": rust_rows, "backbone_passes": rust_passes,
            "rust_diffusion_calls": sum(r["diffusion_calls"] for r in rs),
            "torch_diffusion_calls": model.calls["diffusion"]}


# -- measuring --------------------------------------------------------------------------------

def time_torch(model: TimedModel, case: dict) -> tuple:
    model.reset()
    t0 = time.perf_counter()
    out = ref.sample(model, case)
    dt = time.perf_counter() - t0
    return dt, {"seconds": dt, "in_module_calls": sum(model.seconds.values()),
                "module_seconds": dict(model.seconds), "calls": dict(model.calls), "rows": model.rows}, out


def rust_record(run: dict) -> dict:
    s = run["seconds"]
    return {"generation": s["generation"], "wall": s["wall"], "in_model_calls": s["in_model_calls"],
            "graphs": {g["graph"]: g["seconds"] for g in run["graphs"]}}


def balanced_labels(n: int, classes: int, null_class: int) -> list:
    return [i * classes // n for i in range(n)] if classes > 0 else [null_class] * n


def replay_check(a, schedule: str, plan: dict, model: TimedModel, work: str) -> dict:
    """One image with injected order and noise through both; pixel differences."""
    L, C = model.L, model.C
    rng = np.random.default_rng(a.seed + 7)
    case = case_from_plan(plan, 1, [0], L, C, rng)
    path = os.path.join(work, "replay.npz")
    np.savez(path, order=case["order"], init_noise=case["init_noise"], step_noise=case["step_noise"])
    out_dir, npz = os.path.join(work, "replay-run"), os.path.join(work, "replay-images.npz")
    run = run_rust(a, schedule, 1, out_dir, replay=path, npz=npz)
    case["labels"] = np.asarray(run["labels"], dtype=np.int64)
    out = ref.sample(model, case)
    with np.load(npz) as f:
        rust = f["arr_0"]
    mine = out["pixels"]                                   # [1, H, W, channels]
    rust = rust[..., :mine.shape[-1]]
    if rust.shape != mine.shape:
        raise BenchError(f"replay: gtr-run pixels {rust.shape}, PyTorch {mine.shape}")
    d = np.abs(rust.astype(int) - mine.astype(int))
    return {"label": int(case["labels"][0]), "pixels": int(d.size), "pixels_differing": int((d > 0).sum()),
            "max_pixel_difference": int(d.max()), "mean_pixel_difference": float(d.mean())}


def summary(vals: list) -> tuple:
    return statistics.median(vals), min(vals), max(vals)


def bench(a) -> dict:
    if not os.path.isfile(a.binary):
        raise BenchError(f"{a.binary} not found: build it with `cargo build --release`")
    binfo = check_bundle(a.bundle)
    torch.set_num_threads(a.threads)
    model, step = load_torch_model(a.weights)
    log(f"PyTorch weights: {a.weights} (MAR step {step}); bundle {a.bundle} ({binfo['name']})")
    if not math.isclose(binfo["latent_scale"], model.latent_scale, rel_tol=1e-12):
        raise BenchError(f"latent scale: bundle {binfo['latent_scale']}, train/latent_scale.json "
                         f"{model.latent_scale}: not the same model")
    from models import export_mar
    log("same weights? the bundle's graphs (onnxruntime) vs the PyTorch modules:")
    try:
        parity = export_mar.check_parity(a.bundle, export_mar.role_modules(model.mar, model.vae, model.head),
                                         model.mar.cfg, tolerance=1e-4, quick_vae=True, log=log,
                                         threads=a.threads)
    except (export_mar.ExportCheckFailed, RuntimeError, *ort_errors()) as e:
        # graphs that differ (ExportCheckFailed), or of another shape: onnxruntime refuses the
        # PyTorch model's inputs (InvalidArgument) or the graph (its own exception types)
        why = " ".join(str(e).split())
        raise BenchError(f"the bundle's graphs are not these PyTorch weights ({type(e).__name__}: "
                         f"{why[:300]}{'...' if len(why) > 300 else ''}): not the same model; re-export the "
                         f"bundle from {a.weights}") from e

    work = a.work
    os.makedirs(work, exist_ok=True)
    L, C = model.L, model.C
    result = {
        "what": "gtr-run (ONNX Runtime CPU) vs models/torch/reference_sampler.py (PyTorch eager CPU), "
                "images per second, same weights and schedule",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "load_average_start": os.getloadavg()},
        "torch": torch.__version__, "numpy": np.__version__,
        "threads": a.threads, "torch_num_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "bundle": os.path.abspath(a.bundle), "bundle_name": binfo["name"], "weights": os.path.abspath(a.weights),
        "mar_step": step, "parity_max_abs": parity, "seed": a.seed, "sets": a.set, "reps": a.reps,
        "binary": os.path.abspath(a.binary), "schedules": {},
    }
    for schedule in a.schedules:
        plan = rust_plan(a, schedule)
        if tuple(plan["grid"]) != tuple(model.grid):
            raise BenchError(f"{schedule}: planned for grid {plan['grid']}, the model's is {list(model.grid)}")
        sres = {"mar_steps": len(plan["steps"]), "batches": {}}
        result["schedules"][schedule] = sres
        if a.replay_check:
            log(f"{schedule}: replay agreement check (batch 1)")
            sres["replay_check"] = replay_check(a, schedule, plan, model, work)
            log(f"  {sres['replay_check']}")
        for B in a.batches:
            labels = balanced_labels(B, binfo["classes"], binfo["null_class"])
            case = case_from_plan(plan, B, labels, L, C, np.random.default_rng(a.seed))
            out_dir = os.path.join(work, "rust-run")
            log(f"{schedule}, batch {B}: warm-up")
            run = run_rust(a, schedule, B, out_dir)
            if run["labels"] != labels:
                raise BenchError(f"gtr-run's labels {run['labels']} are not the expected {labels}")
            _, warm_torch, _ = time_torch(model, case)
            work_check = check_same_work(plan, run, model, B, schedule)
            reps = []
            for r in range(a.reps):
                run = run_rust(a, schedule, B, out_dir)
                rr = rust_record(run)
                dt, tr, _ = time_torch(model, case)
                reps.append({"rust": rr, "torch": tr})
                log(f"  rep {r + 1}/{a.reps}: gtr-run {rr['generation']:.3f} s, PyTorch {dt:.3f} s")
            rust_ips = [B / x["rust"]["generation"] for x in reps]
            torch_ips = [B / x["torch"]["seconds"] for x in reps]
            pair = [x / y for x, y in zip(rust_ips, torch_ips)]
            sres["batches"][str(B)] = {
                "batch": B, "same_work": work_check, "warmup": {"rust": rust_record(run), "torch": warm_torch},
                "reps": reps,
                "rust_images_per_s": dict(zip(("median", "min", "max"), summary(rust_ips))),
                "torch_images_per_s": dict(zip(("median", "min", "max"), summary(torch_ips))),
                "ratio_of_medians": summary(rust_ips)[0] / summary(torch_ips)[0],
                "ratio_pairs": dict(zip(("median", "min", "max"), summary(pair))),
                "rust_in_model_share": statistics.median(x["rust"]["in_model_calls"] / x["rust"]["generation"]
                                                         for x in reps),
                "torch_in_module_share": statistics.median(x["torch"]["in_module_calls"] / x["torch"]["seconds"]
                                                           for x in reps),
            }
    result["machine"]["load_average_end"] = os.getloadavg()
    return result


def table(res: dict) -> str:
    lines = [f"gtr-run vs PyTorch reference sampler, CPU, {res['threads']} threads each "
             f"(OMP_WAIT_POLICY={res['omp_wait_policy']}), bundle "
             f"`{res['bundle_name']}` (MAR step {res['mar_step']}), {res['reps']} interleaved repetitions "
             f"after a warm-up; images/s as median (min–max)", "",
             "| schedule | batch | gtr-run img/s | PyTorch img/s | gtr-run / PyTorch | "
             "gtr-run in model calls | PyTorch in module calls |",
             "|---|---|---|---|---|---|---|"]
    for sched, s in res["schedules"].items():
        for b in s["batches"].values():
            ru, to, pr = b["rust_images_per_s"], b["torch_images_per_s"], b["ratio_pairs"]
            lines.append(f"| {os.path.basename(sched)} | {b['batch']} "
                         f"| {ru['median']:.3g} ({ru['min']:.3g}–{ru['max']:.3g}) "
                         f"| {to['median']:.3g} ({to['min']:.3g}–{to['max']:.3g}) "
                         f"| {b['ratio_of_medians']:.2f}× ({pr['min']:.2f}–{pr['max']:.2f}) "
                         f"| {b['rust_in_model_share']:.0%} | {b['torch_in_module_share']:.0%} |")
    rc = [(os.path.basename(k), s["replay_check"]) for k, s in res["schedules"].items() if "replay_check" in s]
    if rc:
        lines.append("")
        for name, c in rc:
            lines.append(f"Replay check ({name}, batch 1, label {c['label']}, injected orders and noise): "
                         f"max pixel difference {c['max_pixel_difference']}/255, "
                         f"{c['pixels_differing']} of {c['pixels']} pixels differ.")
    la, lb = res["machine"]["load_average_start"], res["machine"]["load_average_end"]
    lines.append(f"\nLoad average (1 min) at start {la[0]:.2f}, at end {lb[0]:.2f}; {res['machine']['cpus']} CPUs.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=MAR_TINY, help="bundle folder for gtr-run (default: models/mar-tiny)")
    ap.add_argument("--weights", default=os.path.join(MAR_TINY, "train"),
                    help="folder with mar.pt, vae.pt, latent_scale.json (default: models/mar-tiny/train)")
    ap.add_argument("--schedules", nargs="+",
                    default=[os.path.join(REPO, "schedules", "mar-64.gtr"), os.path.join(REPO, "schedules", "gtr.gtr")],
                    help="schedule files (default: the repository's schedules/mar-64.gtr and schedules/gtr.gtr)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per side (after one warm-up)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="gtr-run --threads and torch.set_num_threads (default: all CPUs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="schedule parameter override, given to both sides (repeatable)")
    ap.add_argument("--binary", default=os.path.join(REPO, "target", "release", "gtr-run"))
    ap.add_argument("--no-replay-check", dest="replay_check", action="store_false",
                    help="skip the batch-1 pixel agreement check with injected orders and noise")
    ap.add_argument("--work", default=os.path.join(REPO, "runs", "bench-torch"),
                    help="scratch folder for gtr-run's output (default: runs/bench-torch)")
    ap.add_argument("--json", default=None, help="raw timings (default: WORK/bench_torch.json)")
    a = ap.parse_args(argv)
    if a.reps < 1 or a.threads < 1 or any(b < 1 for b in a.batches):
        ap.error("--reps, --threads and --batches must be at least 1")
    from models.onnx_save import BundleError, output_file, write_atomic

    path = a.json or os.path.join(a.work, "bench_torch.json")
    try:
        if not a.json:
            os.makedirs(a.work, exist_ok=True)
        path = output_file("--json", path, a.bundle)   # checked before the long run
        res = bench(a)
    except (BenchError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: --json {path}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    write_atomic(path, json.dumps(res, indent=1))
    shutil.rmtree(os.path.join(a.work, "rust-run"), ignore_errors=True)
    print(table(res))
    print(f"\nraw timings: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""GPU benchmark: gtr-run against MAR's PyTorch sampler on the same MAR-B weights, one command.

  python3 benches/gpu.py --gtr-run target/release/gtr-run [--out runs/gpu-bench] [options]

Phases (each timed and printed; a phase that fails is reported and the rest still runs):
0. device check (--device cuda): ORT_DYLIB_PATH names a file and gtr-run makes one mar-tiny image
   on CUDA, else the run stops here, before the minutes of the export.
1. weights + export: random official-layout MAR weights and KL-16 VAE
   (models/make_fake_checkpoint.py --size mar_base --no-model --denoising-head: the diffusion
   head predicts ε ≈ x_t, so that sampling keeps the tokens finite in float16), exported to a bundle by
   models/export_mar.py (--quick-vae-check), in --work (default /tmp/gtr-gpubench; reused by a
   later run with the same size and seed, or skipped with --bundle).
1b. bundle variants, where a configuration asks for them, made just before its first measurement
   (so that a run cut short spends nothing on configurations it never reaches; listed here in
   the order of the rest): `--fused-attention` in a --variant's
   ARGS runs it on a copy of the bundle with models/fuse_attention.py applied (BUNDLE-fused),
   `--split-head` on a copy with the head's two parts of models/split_head.py (BUNDLE-split;
   both: BUNDLE-fused-split), each reused while the graphs it was made from are unchanged;
   `--precision fp16|bf16|int8` writes the variant graphs its bundle lacks
   (models/convert_precision.py --no-check).
1c. images (--image-check N, default 16; 0 skips): mar-tiny's GtR images made with each
   variant's --sampler arguments on --device, against the CPU host path (`--npz`, pixels
   compared): how many differ and by how much, so that a wrong result is seen before its timing.
2. gtr-run: `gtr-run eval BUNDLE <schedules> --device cuda --batch B --num-images N` per batch
   size and per gtr-run configuration (--variant; --gtr-arg goes to all); seconds per image,
   the share of timed time outside ONNX Runtime's run calls, and the measured and FLOPs
   speed-ups over the first schedule, all from its eval.json (eval runs one untimed warm-up
   batch per schedule first).
3. PyTorch: models/torch/fast_sampler.py (MAR's sample_tokens + DiffLoss.sample + VAE decode,
   batched on the device, noise drawn there, fused attention as timm does) on the same
   checkpoint, float32 and under torch.autocast(fp16) (bf16 on the CPU), the same schedule
   plans (`gtr-run plan --json`), the same balanced class labels, the same batch; a truncated
   untimed warm-up, then torch.cuda.synchronize() around each timed batch, pixels copied to the
   host inside the timing. Schedules with FTS (GtR) have no MAR counterpart: "n/a".
3a. With --vae-check N, after the measurements: gtr-run's plain command (`gtr-run BUNDLE
   --vae-check-schedule --num-images N --batch B`, B the first batch size, the first variant
   that does not run `--sampler ticks` on CUDA: gtr-run refuses to decode beside CUDA graphs)
   with `--vae inline` and `--vae overlap` alternating, twice each: each batch's VAE decode after
   its MAR steps, or beside the next batch's. Seconds per image of the generation loop (run.json
   `seconds.wall`), the ratio, and a check that both ways wrote the same images (else an error).
3b. With --profile, after the measurements: one generation of --profile-schedule per variant
   under ONNX Runtime's profiler (`gtr-run --ort-profile`), summarised under the table: which
   execution provider ran each graph's nodes (any node off CUDA is a note) and its top ops.
4. One Markdown table (printed last, and written to OUT/gpu-bench.md) plus every raw number in
   OUT/gpu-bench.json and the table so far in OUT/gpu-bench.md, rewritten after every phase (also
   into --summary DIR), so a run cut short still leaves its data. Exit status 0: everything
   measured; 1: a phase failed, or a check found a wrong result (images off the CPU's by more
   than --image-tolerance, PyTorch doing other work than gtr-run); 3: nothing failed but the run
   was cut short (SIGTERM, or measurements skipped or stopped at the deadline).

Order of work: batch sizes in the order given (default 64 first), and inside each: the first
gtr-run variant, PyTorch half precision, the other variants, PyTorch float32, so that a run cut
short still holds the comparison the table is for. Nothing new starts with less than 20 s before
--deadline; every subprocess in flight is stopped 15 s after it; a measurement that the same kind
at another batch size predicts (x1.25) to end more than 15 s after the deadline is skipped; the
table is printed with what was measured. SIGTERM, in any phase, does the same.

--prepare-only makes steps 1 and 1b (the export and every variant's graphs) in --work and stops,
needing no GPU library: on a machine whose calls are short, start it in the background while
the CUDA libraries are still arriving, and the measuring run that follows reuses it all.

Full size (defaults) is planned for about 6-7 minutes on one H200 (an estimate from issue 9's
per-image times; set --deadline about 60 s under the machine's limit). Smaller: --batches 64, --schedules mar-64 gtr-3.7x, --skip-torch-fp32,
--bundle DIR (reuse an export), --num-images (default: one batch per batch size).
CPU test at a tiny size: --size tiny --device cpu --batches 2 4 --threads 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback

from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, REPO)

T0 = time.time()
# For --device cpu: OpenMP threads that sleep when idle, the counterpart of gtr-run's ORT sessions
# (intra-op spinning off); as models/bench_torch.py does. Kept if the environment sets it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# make_fake_checkpoint.py / export_mar.py arguments per --size
SIZES = {
    "base": (["--size", "mar_base"], ["--size", "mar_base"]),
    "large": (["--size", "mar_large"], ["--size", "mar_large"]),
    "huge": (["--size", "mar_huge"], ["--size", "mar_huge"]),
    # a few-MB custom MAR for testing the script on a CPU: 16x16 tokens, 32x32 images
    "tiny": (["--size", "custom", "--width", "64", "--depth", "1", "--heads", "4", "--diffloss-w", "64",
              "--diffloss-d", "2", "--classes", "10", "--vae-ch", "32", "--vae-ch-mult", "1,2",
              "--vae-res-blocks", "1"], ["--size", "custom"]),
}
DEFAULT_SCHEDULES = ["mar-64", "mar-16", "gtr", "gtr-3.7x"]
# A measurement starts only with at least START_FLOOR seconds before the deadline, and a
# subprocess it started is stopped GRACE seconds after it (what `measure` lets a predicted
# measurement overrun); predictions are scaled by SAFETY (a smaller batch is less efficient, and
# start-up costs do not shrink with the images).
START_FLOOR, GRACE, SAFETY = 20.0, 15.0, 1.25
# The most seconds one mar-tiny generation of the image check may take (a few seconds on any
# device): a path that hangs is stopped there instead of at the deadline.
IMAGE_CHECK_LIMIT = 120.0
# The share of a graph's kernel time from which an op run off CUDA is a note of its own.
OFF_GPU_SHARE = 0.01
# The most bytes of each subprocess log copied into --summary (its end).
LOG_TAIL = 64 * 1024
# Exit statuses: 0 every measurement made, 1 some phase failed (whether or not the run was also
# cut short), 3 cut short only (interrupted, or measurements skipped or stopped at the deadline).
CUT_SHORT = 3


class Interrupted(BaseException):
    """SIGTERM: ends the run with the table (a BaseException, so that no `except Exception` of a
    phase swallows it)."""


class Variant(NamedTuple):
    """One gtr-run configuration of the table (--variant NAME=ARGS)."""
    name: str
    binary: str
    bundle: str | None          # None: the benchmark's bundle
    args: list
    fused_attention: bool       # run on a copy of the bundle with models/fuse_attention.py applied
    split_head: bool            # ... with the head's two parts of models/split_head.py added


def _on_term(signum, frame):
    raise Interrupted(f"signal {signum}")


def log(msg: str = "") -> None:
    print(f"[{time.time() - T0:6.1f} s] {msg}" if msg else "", flush=True)


def short(e: BaseException, limit: int = 600) -> str:
    s = f"{type(e).__name__}: {e}" if not isinstance(e, BenchError) else str(e)
    return s if len(s) <= limit else s[:limit] + " …"


def profile_notes(name: str, graphs: dict, captured: bool) -> list[str]:
    """The table's notes on variant `name`'s kernel profile: `graphs` maps a graph to its summary,
    whose `ops_off_gpu` lists [op, provider, nodes, share of the graph's kernel time] for the ops
    run off CUDA; `captured`: the variant's timed runs captured CUDA graphs. ONNX Runtime puts
    shape computations (Shape, a Gather of a shape, ...) on the CPU by design, so an op off CUDA
    is a note of its own only from OFF_GPU_SHARE of its graph's kernel time; the rest are counted."""
    notes = []
    big = {g: [o for o in v["ops_off_gpu"] if o[3] >= OFF_GPU_SHARE] for g, v in graphs.items()}
    small = sum(n for v in graphs.values() for _, _, n, share in v["ops_off_gpu"] if share < OFF_GPU_SHARE)
    if any(big.values()):
        notes.append(f"profile {name}: ops off CUDA with {OFF_GPU_SHARE:.0%} or more of a graph's kernel time: "
                     + "; ".join(f"{g}: " + ", ".join(f"{op} ×{n} on {p} ({share:.1%})" for op, p, n, share in ops)
                                 for g, ops in big.items() if ops))
    if small:
        notes.append(f"profile {name}: {small} nodes off CUDA in ops under {OFF_GPU_SHARE:.0%} of their graph's "
                     f"kernel time each (shape computations, which ONNX Runtime places on the CPU; listed in "
                     f"gpu-bench.json)")
    if captured:
        notes.append(f"profile {name}: run without CUDA graphs (gtr-run does not capture under --ort-profile), "
                     f"unlike its timed rows")
    return notes


class BenchError(Exception):
    pass


class DeadlineStop(BenchError):
    """A measurement stopped, or not started, for the deadline: the run is cut short, nothing
    failed."""


class Bench:
    def __init__(self, a):
        self.a = a
        self.out = os.path.abspath(a.out)
        os.makedirs(self.out, exist_ok=True)
        self.res = {
            "what": "gtr-run eval vs MAR's PyTorch sampler (models/torch/fast_sampler.py) on the same weights; "
                    "seconds per image",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": [sys.executable] + sys.argv,
            "args": {k: v for k, v in vars(a).items()},
            "environment": {},
            "phases": [],
            "bundle": None,
            "plans": {},
            "gtr_run": {},
            "torch": {},
            "notes": [],
            "errors": [],
        }
        self.bundle = None
        self.manifest = {}
        self.checkpoint = None
        self.vae_ckpt = None
        self.plans = {}
        self.schedules = [self.schedule_path(s) for s in a.schedules]
        self.variants = self.parse_variants()
        self.profile_schedule = self.schedule_path(a.profile_schedule) if a.profile else None
        # (bundle, fused attention, split head) -> the copy made for them
        self.derived_bundles: dict[tuple, str] = {}
        self.prepared: set[str] = set()              # configurations whose bundle variants are made
        self.torch_model = None
        self.torch_failed = None

    # -- bookkeeping ---------------------------------------------------------------------

    def remaining(self) -> float:
        return self.a.deadline - (time.time() - T0)

    def subprocess_timeout(self, limit: float | None = None) -> float:
        """How long a subprocess started now may run: to GRACE seconds past the deadline, or
        `limit` seconds where that is sooner."""
        left = max(1.0, self.remaining() + GRACE)
        return left if not limit else min(left, limit)

    def save(self) -> None:
        """gpu-bench.json and the table so far (gpu-bench.md), in --out and in --summary: a run
        cut short at any point leaves what it measured."""
        try:
            self.res["table"] = self.table()
        except Exception as e:  # noqa: BLE001 - the raw numbers are written all the same
            self.res["table"] = f"(no table: {short(e)})"
        for folder in [self.out] + ([self.a.summary] if self.a.summary else []):
            for name, text in (("gpu-bench.json", json.dumps(self.res, indent=1, default=str)),
                               ("gpu-bench.md", self.res["table"] + "\n")):
                path = os.path.join(folder, name)
                with open(path + ".tmp", "w") as f:
                    f.write(text)
                os.replace(path + ".tmp", path)
        if self.a.summary:
            self.copy_logs(os.path.join(self.a.summary, "logs"))

    def copy_logs(self, into: str) -> None:
        """The subprocess logs of OUT/logs, each cut to its last LOG_TAIL bytes, into `into`
        (--summary's logs/), so that a machine that returns only --summary returns them too."""
        logdir = os.path.join(self.out, "logs")
        if not os.path.isdir(logdir) or os.path.abspath(logdir) == os.path.abspath(into):
            return
        os.makedirs(into, exist_ok=True)
        for name in sorted(os.listdir(logdir)):
            source = os.path.join(logdir, name)
            if not os.path.isfile(source):
                continue
            with open(source, "rb") as f:
                f.seek(max(0, os.path.getsize(source) - LOG_TAIL))
                tail = f.read()
            with open(os.path.join(into, name), "wb") as f:
                f.write(tail)

    def failed(self, where: str, msg: str) -> None:
        """A check that found a wrong result (not an exception): an error, so the exit status is 1;
        the other phases still run."""
        self.res["errors"].append({"where": where, "error": msg})
        log(f"ERROR {where}: {msg}")
        self.save()

    def error(self, where: str, e: BaseException) -> None:
        msg = f"{where}: {short(e)}"
        self.res["errors"].append({"where": where, "error": short(e, 4000),
                                   "traceback": traceback.format_exc(limit=6)})
        log(f"ERROR {msg}")
        self.save()

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time a phase; an exception other than an interruption is recorded and swallowed."""
        t = time.time()
        log(f"== {name}")
        rec = {"phase": name, "start_s": round(t - T0, 2)}
        self.res["phases"].append(rec)
        try:
            yield rec
            rec["seconds"] = round(time.time() - t, 2)
            rec["ok"] = True
            log(f"== {name}: done in {rec['seconds']:.1f} s")
        except Interrupted:
            rec["seconds"] = round(time.time() - t, 2)
            rec["ok"] = False
            rec["error"] = "interrupted"
            raise
        except DeadlineStop as e:
            rec["seconds"] = round(time.time() - t, 2)
            rec["ok"] = False
            rec["error"] = short(e)
            self.res.setdefault("skipped_at_deadline", []).append(f"{name} ({short(e, 200)})")
            log(f"stopped {name}: {short(e, 200)}")
        except Exception as e:  # noqa: BLE001 - every phase is allowed to fail
            rec["seconds"] = round(time.time() - t, 2)
            rec["ok"] = False
            rec["error"] = short(e)
            self.error(name, e)
        finally:
            self.save()

    def run_logged(self, cmd: list, logname: str, timeout: float | None = None, show=None,
                   limit: float | None = None) -> str:
        """Run cmd with its output in OUT/logs/logname; raise BenchError with its tail on failure.
        A run stopped at `timeout` is a DeadlineStop, unless `limit` (the cap that timeout came
        from, when it was sooner than the deadline) stopped it: that is a failure."""
        logdir = os.path.join(self.out, "logs")
        os.makedirs(logdir, exist_ok=True)
        path = os.path.join(logdir, logname)
        log("$ " + " ".join(shlex.quote(str(c)) for c in cmd))
        with open(path, "w") as f:
            try:
                p = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                   timeout=timeout)
                rc = p.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        with open(path, errors="replace") as f:
            text = f.read()
        if show:
            for line in text.splitlines():
                if show(line):
                    log("  " + line.strip())
        if rc == "timeout" and limit and timeout is not None and timeout >= limit:
            raise BenchError(f"`{os.path.basename(str(cmd[0]))} {' '.join(map(str, cmd[1:3]))} …` stopped "
                             f"after its limit of {limit:.0f} s (log: {path})")
        if rc == "timeout":
            raise DeadlineStop(f"`{os.path.basename(str(cmd[0]))} {' '.join(map(str, cmd[1:3]))} …` stopped "
                               f"{GRACE:.0f} s after the deadline (log: {path})")
        if rc != 0:
            lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
            said = next((x for x in reversed(lines) if x.lower().startswith("error")), lines[-1] if lines else "")
            tail = "\n".join(lines[-15:])
            raise BenchError(f"`{os.path.basename(str(cmd[0]))} {' '.join(map(str, cmd[1:3]))} …` "
                             f"{'stopped at the deadline' if rc == 'timeout' else f'exited with {rc}'}"
                             f"{': ' + said if said and rc != 'timeout' else ''} (log: {path})\n{tail}")
        return text

    # -- inputs ----------------------------------------------------------------------------

    def schedule_path(self, s: str) -> str:
        for cand in (s, os.path.join(REPO, s), os.path.join(REPO, "schedules", s),
                     os.path.join(REPO, "schedules", s + ".gtr")):
            if os.path.isfile(cand):
                return os.path.abspath(cand)
        raise SystemExit(f"error: schedule {s!r} not found (looked in schedules/)")

    @staticmethod
    def schedule_name(path: str) -> str:
        return os.path.splitext(os.path.basename(path))[0]

    def parse_variants(self) -> list:
        """[Variant] from --variant NAME=ARGS (default: one). ARGS go to `gtr-run eval`, but for
        `--binary PATH`, `--bundle DIR`, `--fused-attention` and `--split-head`, which this script
        takes."""
        specs = self.a.variant or ["gtr-run="]
        out, seen = [], set()
        for spec in specs:
            name, sep, rest = spec.partition("=")
            name = name.strip()
            if not sep or not name or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or name in seen:
                raise SystemExit(f"error: --variant {spec!r}: expected a new NAME=ARGS (name of letters, digits, . _ + -)")
            seen.add(name)
            args, binary, bundle, fused, split = shlex.split(rest), self.a.gtr_run, None, False, False
            keep = []
            i = 0
            while i < len(args):
                if args[i] in ("--binary", "--bundle") and i + 1 < len(args):
                    if args[i] == "--binary":
                        binary = args[i + 1]
                    else:
                        bundle = args[i + 1]
                    i += 2
                    continue
                if args[i] == "--fused-attention":
                    fused = True
                elif args[i] == "--split-head":
                    split = True
                else:
                    keep.append(args[i])
                i += 1
            out.append(Variant(name, os.path.abspath(binary), bundle, keep, fused, split))
        return out

    # -- phase: environment -----------------------------------------------------------------

    def environment(self) -> None:
        env = self.res["environment"]
        env["python"] = sys.version.split()[0]
        env["platform"] = platform.platform()
        env["cpus"] = os.cpu_count()
        if os.environ.get("ORT_DYLIB_PATH"):
            # the subprocesses run in the repository: a relative path would name another file
            os.environ["ORT_DYLIB_PATH"] = os.path.abspath(os.environ["ORT_DYLIB_PATH"])
        env["ORT_DYLIB_PATH"] = os.environ.get("ORT_DYLIB_PATH")
        try:
            env["gtr_run_version"] = subprocess.run([self.a.gtr_run, "--version"], capture_output=True,
                                                    text=True, timeout=30).stdout.strip()
        except Exception as e:  # noqa: BLE001
            env["gtr_run_version"] = f"unavailable ({short(e)})"
        try:
            env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                               cwd=REPO, timeout=10).stdout.strip() or None
        except Exception:  # noqa: BLE001
            env["git_commit"] = None
        if self.a.device == "cuda":
            try:
                env["nvidia_smi"] = subprocess.run(
                    ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                    capture_output=True, text=True, timeout=30).stdout.strip()
            except Exception as e:  # noqa: BLE001
                env["nvidia_smi"] = f"unavailable ({short(e)})"
        log(f"gtr-run: {env['gtr_run_version']}; ORT_DYLIB_PATH={env['ORT_DYLIB_PATH']}; "
            f"{env.get('nvidia_smi', 'CPU')}; {env['cpus']} CPUs")
        for v in self.variants:
            log(f"variant {v.name}: {v.binary} {' '.join(v.args)}{' (bundle ' + v.bundle + ')' if v.bundle else ''}"
                f"{' (fused attention)' if v.fused_attention else ''}{' (split head)' if v.split_head else ''}")

    def device_check(self) -> None:
        """Before the minutes of the export: one mar-tiny image with gtr-run on --device (strict),
        so that a missing or CPU-only ONNX Runtime stops the run at once (BenchError)."""
        if self.a.device != "cuda" or self.a.skip_gtr_run:
            return
        dylib = os.environ.get("ORT_DYLIB_PATH")
        if not dylib or not os.path.isfile(dylib):
            raise BenchError(f"ORT_DYLIB_PATH is {dylib!r}: give onnxruntime-gpu's libonnxruntime.so "
                             "(gtr-run would otherwise fetch the CPU library from PyPI)")
        out = os.path.join(os.path.abspath(self.a.work), "device-check")
        shutil.rmtree(out, ignore_errors=True)
        self.run_logged([self.a.gtr_run, os.path.join(REPO, "models", "mar-tiny"),
                         os.path.join(REPO, "schedules", "gtr-fast.gtr"), "--num-images", 1, "--batch", 1,
                         "--device", "cuda", "--out", out], "device-check.log",
                        timeout=max(START_FLOOR, self.remaining()))

    # -- phase: weights and bundle ----------------------------------------------------------

    def prepare_bundle(self) -> None:
        a = self.a
        work = os.path.abspath(a.work)
        ckpt, vae = os.path.join(work, "checkpoint-last.pth"), os.path.join(work, "kl16.ckpt")
        if a.bundle:
            self.bundle = os.path.abspath(a.bundle)
            parent = os.path.dirname(self.bundle)
            self.checkpoint = a.checkpoint or next(
                (p for p in [os.path.join(parent, "checkpoint-last.pth")] if os.path.isfile(p)), None)
            self.vae_ckpt = a.vae or next((p for p in [os.path.join(parent, "kl16.ckpt")] if os.path.isfile(p)), None)
            log(f"bundle {self.bundle} (given); PyTorch weights: {self.checkpoint or 'none'}, {self.vae_ckpt or 'none'}")
        else:
            fake_args, export_args = SIZES[a.size]
            # a head that keeps tokens at a trained model's scale: a random one drives them past
            # float16's range, and no half-precision run would end in finite images
            fake_args = [*fake_args, "--denoising-head"]
            stamp_path = os.path.join(work, "stamp.json")
            stamp = {"size": a.size, "seed": a.seed, "fake_args": fake_args, "export_args": export_args}
            bundle = os.path.join(work, "bundle")
            cached = False
            if not a.fresh and os.path.isfile(stamp_path) and os.path.isfile(os.path.join(bundle, "manifest.yaml")):
                with open(stamp_path) as f:
                    cached = json.load(f) == stamp and os.path.isfile(ckpt) and os.path.isfile(vae)
            if cached:
                log(f"reusing the weights and bundle in {work} (same size and seed; --fresh re-makes them)")
            else:
                os.makedirs(work, exist_ok=True)
                if os.path.exists(stamp_path):
                    os.remove(stamp_path)
                py = sys.executable
                self.run_logged([py, os.path.join(REPO, "models", "make_fake_checkpoint.py"), *fake_args,
                                 "--seed", a.seed, "--no-model", "--out", ckpt, "--vae-out", vae],
                                "make_fake_checkpoint.log", show=lambda line: "parameters" in line,
                                timeout=self.subprocess_timeout())
                self.run_logged([py, os.path.join(REPO, "models", "export_mar.py"), "--checkpoint", ckpt,
                                 "--vae", vae, *export_args, "--out", bundle, "--quick-vae-check",
                                 "--name", f"mar-{a.size}-random"],
                                "export_mar.log",
                                show=lambda line: any(k in line for k in ("max |ort", "exported in", "max |sampler", "max |tick"))
                                or line.startswith("wrote"), timeout=self.subprocess_timeout())
                with open(stamp_path, "w") as f:
                    json.dump(stamp, f)
            self.bundle, self.checkpoint, self.vae_ckpt = bundle, ckpt, vae
        self.read_manifest()
        self.res["bundle"] = {"path": self.bundle, "checkpoint": self.checkpoint, "vae": self.vae_ckpt,
                              "manifest": self.manifest,
                              "bytes": sum(os.path.getsize(os.path.join(self.bundle, f))
                                           for f in os.listdir(self.bundle) if ".onnx" in f)}

    def read_manifest(self) -> None:
        path = os.path.join(self.bundle, "manifest.yaml")
        if not os.path.isfile(path):
            raise BenchError(f"{path} not found")
        from models.onnx_save import read_manifest

        _, manifest = read_manifest(self.bundle)
        try:
            m = {key: manifest[key] for key in ("name", "latent_scale", "classes", "null_class", "grid")}
            m["grid"] = [int(v) for v in m["grid"]]
            m["latent_scale"] = float(m["latent_scale"])
            m["classes"], m["null_class"] = int(m["classes"]), int(m["null_class"])
        except (KeyError, TypeError, ValueError) as e:
            raise BenchError(f"{path}: {e!r} (see models/README.md, the manifest)") from e
        self.manifest = m

    # -- phase: bundle variants ---------------------------------------------------------------

    def derived_copy(self, source: str, fused: bool, split: bool) -> str:
        """A copy of bundle `source` (its graphs hard-linked where the file system allows: the model
        tools replace a graph, never write through it) with fused attention
        (models/fuse_attention.py) and/or the head's two parts (models/split_head.py), beside it as
        SOURCE-fused, SOURCE-split or SOURCE-fused-split; reused while the source's graphs those
        are made from are unchanged."""
        from models.onnx_save import read_manifest
        from models.fuse_attention import fuse_bundle
        from models.split_head import add_split

        target = source.rstrip(os.sep) + ("-fused" if fused else "") + ("-split" if split else "")
        _, manifest = read_manifest(source)
        roles = (["encoder", "decoder"] if fused else []) + (["diffusion"] if split else [])
        stamp = {"source": source, "graphs": {
            role: [os.path.getsize(p), os.path.getmtime(p)]
            for role in roles for p in [os.path.join(source, manifest["graphs"][role]["file"])]}}
        stamp_path = os.path.join(target, ".derived-from.json")
        if os.path.isfile(stamp_path):
            with open(stamp_path) as f:
                if json.load(f) == stamp:
                    log(f"reusing {target} (made from the same {', '.join(roles)} of {source})")
                    return target
        if os.path.exists(target):
            shutil.rmtree(target)
        log(f"copying {source} to {target}" + (" and fusing its attention" if fused else "")
            + (" and splitting its head" if split else ""))

        def link_or_copy(src, dst):
            # graphs are hard-linked (the tools replace files by renaming, never writing through
            # a link); the small manifest gets a copy of its own all the same
            if src.endswith((".onnx", ".data")):
                try:
                    return os.link(src, dst)
                except OSError:
                    pass
            shutil.copy2(src, dst)

        shutil.copytree(source, target, copy_function=link_or_copy)
        if fused:
            counts = fuse_bundle(target, log=lambda line: log("  " + line))
            if not any(counts.values()):
                raise BenchError(f"{source}: no attention chain to fuse (see the lines above)")
        if split:
            add_split(target, log=lambda line: log("  " + line))
        with open(stamp_path, "w") as f:
            json.dump(stamp, f)
        return target

    def bundle_of(self, v: Variant) -> str | None:
        """The bundle variant `v` runs: its own or the benchmark's, or the copy its
        `--fused-attention` / `--split-head` ask for (None while that has not been made)."""
        source = os.path.abspath(v.bundle or self.bundle)
        if not (v.fused_attention or v.split_head):
            return source
        return self.derived_bundles.get((source, v.fused_attention, v.split_head))

    def runnable_bundle(self, v: Variant) -> str:
        """bundle_of(v), or BenchError where its derived copy was not made."""
        bundle = self.bundle_of(v)
        if bundle is None:
            raise BenchError(f"variant {v.name}: its derived bundle (fused attention, split head) was not made "
                             "(see the bundle variants phase)")
        return bundle

    def asked_precisions(self, variants: list) -> list:
        """[(bundle, precision)] of every variant graph the gtr-run configurations `variants` ask
        for with `--precision fp16|bf16|int8` (variant args or --gtr-arg), in order, each pair once."""
        from models.variants import PRECISIONS

        out = []
        for v in variants:
            args = list(self.a.gtr_arg) + v.args
            for i, arg in enumerate(args):
                value = args[i + 1] if arg == "--precision" and i + 1 < len(args) else (
                    arg.partition("=")[2] if arg.startswith("--precision=") else None)
                pair = (self.bundle_of(v), value)
                if value in PRECISIONS and pair[0] and pair not in out:
                    out.append(pair)
        return out

    def ensure_bundle_variants(self, v: Variant) -> None:
        """Makes the graphs configuration `v` asks for, once, as a phase of its own: when first
        needed, so that a run cut short spends no time on configurations it never reaches."""
        if v.name not in self.prepared and (v.fused_attention or v.split_head or self.asked_precisions([v])):
            self.measure(f"bundle variants for {v.name}", self.prepare_bundle_variants, [v])

    def prepare_bundle_variants(self, variants: list) -> None:
        """Makes what the configurations `variants` ask of their bundles: a derived copy for
        `--fused-attention` and `--split-head`, then the variant graphs of `--precision fp16|bf16|int8` where a
        bundle lacks them (models/convert_precision.py, without its CPU check), so that one command
        compares them with PyTorch's autocast on a fresh export."""
        from models.onnx_save import read_manifest

        for v in variants:
            self.prepared.add(v.name)
            source = os.path.abspath(v.bundle or self.bundle)
            key = (source, v.fused_attention, v.split_head)
            if (v.fused_attention or v.split_head) and key not in self.derived_bundles:
                self.derived_bundles[key] = self.derived_copy(*key)
        for bundle, precision in self.asked_precisions(variants):
            _, manifest = read_manifest(bundle)
            if precision in (manifest.get("precisions") or {}):
                log(f"{bundle} has {precision} graphs")
                continue
            self.run_logged([sys.executable, os.path.join(REPO, "models", "convert_precision.py"), bundle,
                             "--precision", precision, "--no-check"], f"convert_{precision}.log",
                            timeout=self.subprocess_timeout(),
                            show=lambda line: "wrote" in line or "error" in line.lower())

    # -- phase: plans -------------------------------------------------------------------------

    def make_plans(self) -> None:
        g = self.manifest.get("grid", [16, 16])
        for path in self.schedules:
            name = self.schedule_name(path)
            try:
                p = subprocess.run([self.a.gtr_run, "plan", path, "--json", "--seed", str(self.a.seed),
                                    "--grid", f"{g[0]}x{g[1]}"], capture_output=True, text=True, timeout=60,
                                   cwd=REPO)
                if p.returncode != 0:
                    raise BenchError(f"gtr-run plan {name} failed: {p.stderr.strip()[-500:]}")
                plan = json.loads(p.stdout)
                self.plans[name] = plan
                fts = any(s.get("detail") is not None for s in plan["steps"])
                self.res["plans"][name] = {"mar_steps": len(plan["steps"]), "fts": fts}
            except Exception as e:  # noqa: BLE001
                self.error(f"plan {name}", e)

    # -- phase: gtr-run --------------------------------------------------------------------------

    def images_for(self, B: int) -> int:
        n = self.a.num_images or B
        return -(-n // B) * B

    def gtr_eval(self, variant, B: int) -> None:
        name, binary, extra = variant.name, variant.binary, variant.args
        bundle = self.runnable_bundle(variant)
        N = self.images_for(B)
        evaldir = os.path.join(self.out, "eval", f"{name}-b{B}")
        cmd = [binary, "eval", bundle, *self.schedules, "--device", self.a.device,
               "--batch", B, "--num-images", N, "--seed", self.a.seed, "--out", evaldir, "--force"]
        if self.a.threads:
            cmd += ["--threads", self.a.threads]
        cmd += self.a.gtr_arg + extra
        if self.torch_model is not None and self.a.device == "cuda":
            import torch
            torch.cuda.empty_cache()              # leave the GPU's memory to ONNX Runtime
        t = time.time()
        try:
            self.run_logged(cmd, f"eval-{name}-b{B}.log", timeout=self.subprocess_timeout(self.a.eval_limit),
                            limit=self.a.eval_limit)
        except (BenchError, Interrupted):
            # gtr-run rewrites eval.json after every timed batch: a stopped eval leaves its rows.
            ej = self.eval_json(evaldir, since=t)
            if ej is not None and not ej["comparison"].get("finished", True):
                self.record_eval(name, B, cmd, t, N, evaldir, ej)
            raise
        ej = self.eval_json(evaldir)
        if ej is None:
            raise BenchError(f"gtr-run eval wrote no {os.path.join(evaldir, 'eval.json')}")
        self.record_eval(name, B, cmd, t, N, evaldir, ej)

    @staticmethod
    def eval_json(evaldir: str, since: float | None = None) -> dict | None:
        """The eval.json in `evaldir` (written after `since`, a Unix time, where given: an eval
        that failed before taking its folder leaves an older one), if any."""
        path = os.path.join(evaldir, "eval.json")
        try:
            if since is not None and os.path.getmtime(path) < since:
                return None
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def record_eval(self, name: str, B: int, cmd: list, t: float, N: int, evaldir: str, ej: dict) -> None:
        """Records variant `name`'s eval at batch B from its eval.json `ej`: of an eval stopped
        partway (`finished` false), the rows it had timed, marked partial."""
        comp = ej["comparison"]
        partial = not comp.get("finished", True)
        rec = {"command": [str(c) for c in cmd], "seconds": round(time.time() - t, 2), "images": N,
               "execution_provider": comp.get("execution_provider"),
               "diffusion_chains": comp.get("diffusion_chains"),       # gtr-run with a sampler graph says where
               "vae_decode": comp.get("vae_decode"),                   # inline, or overlapping the next batch
               "eval_json": os.path.join(evaldir, "eval.json"),
               "partial": partial,
               "schedules": {}}
        for s, d in zip(comp["schedules"], ej["derived"]):
            if partial and not (s.get("images_timed") and isinstance(d.get("seconds_per_image"), float)):
                continue
            rec["schedules"][s["name"]] = {
                "seconds_per_image": d["seconds_per_image"],
                "outside_runtime_share": d["outside_runtime_share"],
                "speedup_measured": d["speedup_measured"], "speedup_range": d["speedup_range"],
                "speedup_flops": d["speedup_flops"],
                **{k: s[k] for k in ("mar_steps", "backbone_passes", "diffusion_evaluations", "flops_per_image",
                                     "images_timed", "wall_seconds", "runtime_seconds", "model_seconds",
                                     "round_seconds") if k in s},
            }
        self.res["gtr_run"].setdefault(name, {})[str(B)] = rec
        if partial:
            timed = ", ".join(f"{s} {r['images_timed']}" for s, r in rec["schedules"].items()) or "none"
            self.res["notes"].append(f"{name}, batch {B}: the eval ended early (stopped, or failed: see the errors); "
                                     f"its rows are those it had timed (images: {timed}; of {N} each)")
        if self.a.device == "cuda" and "cuda" not in str(rec["execution_provider"]).lower():
            self.res["notes"].append(f"{name}, batch {B}: eval.json says the provider was "
                                     f"{rec['execution_provider']!r}, not CUDA")
        for sname, s in rec["schedules"].items():
            log(f"  {name} b{B} {sname}: {s['seconds_per_image']:.4f} s/image, outside ORT "
                f"{s['outside_runtime_share']:.1%} ({rec['execution_provider']}"
                + (f", chains: {rec['diffusion_chains']}" if rec["diffusion_chains"] else "")
                + (f", VAE decode: {rec['vae_decode']}" if rec["vae_decode"] else "") + ")")

    def gtr_profile(self, variant, B: int) -> None:
        """One generation of --profile-schedule at batch B under ONNX Runtime's profiler
        (`gtr-run --ort-profile`): which provider ran each graph's nodes, and the ops with the
        most kernel time (on CUDA these are launch times, not device times). Profiles and images
        go to --work; the summary to gpu-bench.json and the table's notes."""
        name, binary, extra = variant.name, variant.binary, variant.args
        bundle = self.runnable_bundle(variant)
        work = os.path.join(os.path.abspath(self.a.work), "profile", name)
        shutil.rmtree(work, ignore_errors=True)
        rundir = os.path.join(work, "run")
        sched = self.profile_schedule
        cmd = [binary, bundle, sched, "--device", self.a.device, "--batch", B, "--num-images", B,
               "--seed", self.a.seed, "--out", rundir, "--ort-profile", os.path.join(work, "ort")]
        if self.a.threads:
            cmd += ["--threads", self.a.threads]
        cmd += self.a.gtr_arg + extra
        self.run_logged(cmd, f"profile-{name}.log", timeout=self.subprocess_timeout(),
                        show=lambda line: "kernel profile" in line)
        with open(os.path.join(rundir, "run.json")) as f:
            run = json.load(f)
        graphs = {}
        for g in run["graphs"]:
            k = g.get("kernels")
            if not k or not g["calls"]:
                continue
            graphs[g["graph"]] = {
                "calls": g["calls"], "truncated": k["truncated"], "file": k["file"],
                "providers": {p["provider"]: {"nodes": p["nodes"], "seconds": round(p["seconds"], 4)}
                              for p in k["providers"]},
                "top_ops": [[o["op"], o["provider"], round(o["share"], 3)] for o in k["ops"] if o["share"]][:5],
                "ops_off_gpu": [[o["op"], o["provider"], o["nodes"], round(o["share"], 4)] for o in k["ops"]
                                if o["provider"] != "CUDAExecutionProvider"] if self.a.device == "cuda" else [],
            }
        self.res.setdefault("profiles", {})[name] = {
            "schedule": self.schedule_name(sched), "batch": B, "command": [str(c) for c in cmd],
            "execution_provider": run.get("execution_provider"), "graphs": graphs}
        self.res["notes"] += profile_notes(name, graphs, self.captures_cuda_graphs(variant))

    # -- phase: --vae overlap against inline -------------------------------------------------------

    def captures_cuda_graphs(self, v: Variant) -> bool:
        """Whether configuration `v` runs the tick graph on CUDA (`--sampler ticks`), which
        captures CUDA graphs: gtr-run refuses `--vae overlap` beside them."""
        args = self.a.gtr_arg + v.args
        ticks = any(w == "--sampler=ticks" or (w == "--sampler" and i + 1 < len(args) and args[i + 1] == "ticks")
                    for i, w in enumerate(args))
        return ticks and self.a.device == "cuda"

    def vae_check_variant(self) -> Variant | None:
        """The configuration --vae-check runs: the first that can decode beside sampling."""
        return next((v for v in self.variants if not self.captures_cuda_graphs(v)), None)

    def vae_check(self, variant, B: int) -> None:
        """`gtr-run BUNDLE SCHEDULE --num-images N --batch B` with `--vae inline` and `--vae
        overlap`, alternating, twice each (--vae-check N, --vae-check-schedule): seconds per image
        of the generation loop (run.json `seconds.wall`, sessions loaded before it) per way, the
        median of the pairs' ratios, and whether every run wrote the same images (an error if
        not)."""
        name, binary, extra = variant.name, variant.binary, variant.args
        bundle = self.runnable_bundle(variant)
        N, sched = self.a.vae_check, self.schedule_path(self.a.vae_check_schedule)
        work = os.path.join(os.path.abspath(self.a.work), "vae-check")
        walls, hashes = {"inline": [], "overlap": []}, []
        for rep in range(2):
            for way in walls:
                rundir = os.path.join(work, f"{way}-{rep}")
                shutil.rmtree(rundir, ignore_errors=True)
                cmd = [binary, bundle, sched, "--device", self.a.device, "--batch", B, "--num-images", N,
                       "--seed", self.a.seed, "--out", rundir, "--vae", way]
                if self.a.threads:
                    cmd += ["--threads", self.a.threads]
                cmd += self.a.gtr_arg + extra
                self.run_logged(cmd, f"vae-{way}-{rep}.log", timeout=self.subprocess_timeout())
                with open(os.path.join(rundir, "run.json")) as f:
                    run = json.load(f)
                if run.get("vae_decode") != way:
                    raise BenchError(f"--vae {way}: run.json says vae_decode {run.get('vae_decode')!r}")
                walls[way].append(run["seconds"]["wall"] / N)
                hashes.append(run["images_sha256"])
        median = {way: statistics.median(w) for way, w in walls.items()}
        # As benches/vae_overlap.rs: the median of the pairs' ratios.
        ratio = statistics.median(i / o for i, o in zip(walls["inline"], walls["overlap"]))
        same = all(h == hashes[0] for h in hashes)
        self.res["vae_check"] = {
            "variant": name, "schedule": self.schedule_name(sched), "batch": B, "images": N,
            "seconds_per_image": walls, "median": median, "inline_over_overlap": ratio,
            "same_images": same}
        if not same:
            raise BenchError("the --vae runs wrote different images (every run's are compared)")
        self.res["notes"].append(
            f"--vae ({name}, {self.schedule_name(sched)}, {N} images at batch {B}, 2 runs each way, alternating; "
            f"generation loop): inline {median['inline']:.4f} s/image, overlap {median['overlap']:.4f} (medians), "
            f"inline/overlap {ratio:.3f}× (median of the pairs); same images in every run")

    # -- phase: images against the CPU -------------------------------------------------------------

    # The arguments of a variant that say where chains run; mar-tiny takes them (it has sampler and
    # tick graphs, but no precision variants or backbone graph).
    CHAIN_ARGS = ("--sampler", "--sampler-ticks")

    def image_check(self) -> None:
        """mar-tiny's GtR images made by each variant's way of running chains on --device, against
        the CPU host path: how many pixels differ, by how much. A wrong result on the GPU shows
        here before its timing means anything."""
        import numpy as np

        n, seed = self.a.image_check, 3
        tiny, sched = os.path.join(REPO, "models", "mar-tiny"), os.path.join(REPO, "schedules", "gtr.gtr")
        work = os.path.join(os.path.abspath(self.a.work), "images")
        os.makedirs(work, exist_ok=True)

        def generate(name: str, binary: str, device: str, args: list):
            out = os.path.join(work, name)
            shutil.rmtree(out, ignore_errors=True)
            cmd = [binary, tiny, sched, "--num-images", n, "--batch", n, "--seed", seed, "--device", device,
                   "--out", out, "--npz", out + ".npz", *args]
            if self.a.threads:
                cmd += ["--threads", self.a.threads]
            self.run_logged(cmd, f"images-{name}.log", timeout=self.subprocess_timeout(IMAGE_CHECK_LIMIT),
                            limit=IMAGE_CHECK_LIMIT)
            with open(os.path.join(out, "run.json")) as f:
                chains = json.load(f).get("diffusion_chains")
            return np.load(out + ".npz")["arr_0"].astype(np.int16), chains, [str(c) for c in cmd]

        reference, _, ref_cmd = generate("cpu-host", self.a.gtr_run, "cpu", ["--sampler", "host"])
        checks = {}
        for v in self.variants:
            given = self.a.gtr_arg + v.args
            args = [w for i, w in enumerate(given)
                    if w in self.CHAIN_ARGS or w.split("=", 1)[0] in self.CHAIN_ARGS
                    or (i > 0 and given[i - 1] in self.CHAIN_ARGS)]
            try:
                got, chains, cmd = generate(v.name, v.binary, self.a.device, args)
            except Exception as e:  # noqa: BLE001 - reported, the other variants still run
                checks[v.name] = {"error": short(e)}
                self.res["notes"].append(f"images of {v.name} against the CPU: not made ({short(e, 200)})")
                continue
            d = np.abs(got - reference)
            checks[v.name] = {"command": cmd, "diffusion_chains": chains, "pixels": int(d.size),
                              "differ": int((d > 0).sum()), "max_levels": int(d.max()),
                              "mean_levels": round(float(d.mean()), 4)}
            log(f"  {v.name} ({chains}): {checks[v.name]['differ']} of {d.size} pixels differ from the CPU "
                f"host path, by up to {checks[v.name]['max_levels']} levels")
            if checks[v.name]["max_levels"] > self.a.image_tolerance:
                self.failed("images against the CPU",
                            f"{v.name}: pixels up to {checks[v.name]['max_levels']} levels from the CPU host path's "
                            f"(more than --image-tolerance {self.a.image_tolerance}): its timing measures a wrong "
                            f"result")
        self.res["images_vs_cpu"] = {"images": n, "seed": seed, "reference": ref_cmd, "variants": checks}

    # -- phase: PyTorch --------------------------------------------------------------------------

    def load_torch(self):
        if self.torch_model is not None:
            return self.torch_model
        if self.torch_failed:
            raise BenchError(f"PyTorch model unavailable ({self.torch_failed})")
        try:
            self.torch_model = self._load_torch()
        except Exception as e:
            self.torch_failed = short(e)
            raise
        return self.torch_model

    def _load_torch(self):
        import torch
        from models import export_mar
        from models.torch import fast_sampler as fast
        from models.torch.mar import MAR, AutoencoderKL

        if not (self.checkpoint and self.vae_ckpt):
            raise BenchError("no PyTorch checkpoint for this bundle (give --checkpoint and --vae)")
        dev = torch.device(self.a.device)
        if self.a.threads:
            torch.set_num_threads(self.a.threads)
        t = time.time()
        size = {"base": "mar_base", "large": "mar_large", "huge": "mar_huge"}.get(self.a.size, "custom")
        sd, args = export_mar.load_mar_checkpoint(self.checkpoint)
        cfg, vcfg, _ = export_mar.resolve_configs(size, args, None)
        mar = MAR(cfg)
        export_mar.strict_load(mar, sd, self.checkpoint)
        vsd, _ = export_mar.load_vae_checkpoint(self.vae_ckpt)
        vae = AutoencoderKL(vcfg, with_encoder=False)
        export_mar.strict_load(vae, vsd, self.vae_ckpt)
        del sd, vsd
        mar.eval()
        vae.eval()
        info = {"load_seconds": round(time.time() - t, 2), "torch": torch.__version__,
                "attention": self.a.torch_attention}
        info["same_weights_check"] = self.same_weights(mar)
        if self.a.torch_attention == "sdpa":
            info["fused_attention_blocks"] = fast.use_fused_attention(mar)
        mar.to(dev)
        vae.to(dev)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True          # as MAR's main_mar.py sets it
            info["device_name"] = torch.cuda.get_device_name(dev)
            info["cudnn_benchmark"] = True
            for k, f in (("matmul_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
                         ("cudnn_allow_tf32", lambda: torch.backends.cudnn.allow_tf32)):
                try:
                    info[k] = bool(f())
                except Exception as e:  # noqa: BLE001
                    info[k] = f"unknown ({short(e)})"
        self.res["torch_setup"] = info
        log(f"PyTorch {torch.__version__} on {info.get('device_name', dev)}: model loaded in "
            f"{info['load_seconds']:.1f} s; same weights as the bundle: {info['same_weights_check']}")
        return mar, vae, dev

    def same_weights(self, mar) -> str:
        """The bundle's diffusion graph (onnxruntime, CPU) against the loaded head on a few rows."""
        try:
            import numpy as np
            import onnxruntime as ort
            import torch
        except Exception as e:  # noqa: BLE001
            return f"not checked ({short(e)})"
        sess = ort.InferenceSession(os.path.join(self.bundle, "diffusion.onnx"), providers=["CPUExecutionProvider"])
        g = torch.Generator().manual_seed(1)
        x = torch.randn(5, mar.cfg.token_dim, generator=g)
        t = torch.tensor([0, 10, 500, 990, 999])
        z = torch.randn(5, mar.cfg.decoder_width, generator=g)
        with torch.no_grad():
            want = mar.diffusion_head(x, t, z).numpy()
        got = sess.run(None, {"x": x.numpy(), "t": t.numpy(), "z": z.numpy()})[0]
        err = float(np.abs(got - want).max())
        if not err <= 1e-3:
            raise BenchError(f"the bundle's diffusion graph differs from the checkpoint's head by {err:.2e}: "
                             f"not the same weights")
        return f"diffusion head max |ORT - PyTorch| {err:.1e}"

    def half_dtype(self):
        import torch
        return torch.float16 if self.a.device == "cuda" else torch.bfloat16

    def torch_measure(self, sched: str, B: int, precision: str) -> None:
        import torch
        from models.torch import fast_sampler as fast

        plan = self.plans[sched]
        steps, order = fast.steps_from_plan(plan)
        mar, vae, dev = self.load_torch()
        N = self.images_for(B)
        classes, null = self.manifest["classes"], self.manifest["null_class"]
        all_labels = [i * classes // N for i in range(N)] if classes > 0 else [null] * N
        orders = torch.tensor(order, dtype=torch.int64, device=dev)[None].expand(B, -1).contiguous()
        order_len = len(order)
        gen = torch.Generator(device=dev).manual_seed(self.a.seed)
        cuda = dev.type == "cuda"

        def sync():
            if cuda:
                torch.cuda.synchronize(dev)

        def ctx():
            if precision == "fp32":
                return contextlib.nullcontext()
            return torch.autocast(dev.type, dtype=self.half_dtype())

        if self.remaining() < START_FLOOR:      # loading the model may have taken the time
            raise DeadlineStop(f"PyTorch {precision} {sched} b{B}: {self.remaining():.0f} s left after loading; "
                             "not started")
        latent_scale, grid = self.manifest["latent_scale"], mar.cfg.grid
        # warm-up at this batch size and precision: the first and the last steps of the schedule
        # (shortest and longest encoder sequences, so the allocator has seen the largest shapes) and a
        # VAE decode; --torch-warmup-steps 0: the whole schedule
        t = time.time()
        labels = torch.tensor(all_labels[:B], dtype=torch.int64, device=dev)
        k = self.a.torch_warmup_steps
        with ctx():
            if k == 0 or k >= len(steps):
                parts = [(steps, 0)]
            else:
                head, tail = steps[:(k + 1) // 2], steps[len(steps) - k // 2:]
                parts = [(head, 0)] + ([(tail, order_len - sum(x.tokens for x in tail))] if tail else [])
            for part, before in parts:
                o = fast.sample(mar, vae, part, labels, orders, latent_scale, generator=gen, known_before=before)
                o["pixels"].cpu()
        sync()
        warm = time.time() - t
        batches, tokens_s, vae_s, counts = [], 0.0, 0.0, {}
        for start in range(0, N, B):
            labels = torch.tensor(all_labels[start:start + B], dtype=torch.int64, device=dev)
            sync()
            t0 = time.perf_counter()
            with ctx():
                o = fast.sample(mar, vae, steps, labels, orders, latent_scale, generator=gen, counts=counts,
                                decode=False)
                sync()
                t1 = time.perf_counter()
                px = fast.decode_pixels(vae, o["tokens"], latent_scale, grid)["pixels"].cpu()
            sync()
            t2 = time.perf_counter()
            batches.append(t2 - t0)
            tokens_s += t1 - t0
            vae_s += t2 - t1
            if start + B < N and self.remaining() < 0:
                self.res["notes"].append(f"PyTorch {precision} {sched} b{B}: stopped after {len(batches)} of "
                                         f"{N // B} batches at the deadline")
                break
        images = B * len(batches)
        total = sum(batches)
        rec = {"seconds_per_image": total / images, "images_timed": images, "batch_seconds": batches,
               "sampling_seconds": tokens_s, "vae_and_pixels_seconds": vae_s, "warmup_seconds": warm,
               "warmup_steps": min(self.a.torch_warmup_steps or len(steps), len(steps)),
               "backbone_passes_per_image": counts.get("backbone_passes"),
               "diffusion_rows_per_image": counts.get("diffusion_rows"),
               "pixel_mean": float(px.float().mean()), "finite": bool(torch.isfinite(o["tokens"]).all())}
        if cuda:
            rec["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
        self.res["torch"].setdefault(precision, {}).setdefault(str(B), {})[sched] = rec
        self.check_same_work(sched, B, precision, rec)
        log(f"  PyTorch {precision} b{B} {sched}: {rec['seconds_per_image']:.4f} s/image "
            f"({images} images, warm-up {warm:.1f} s)")

    def check_same_work(self, sched: str, B: int, precision: str, rec: dict) -> None:
        """PyTorch's backbone passes and head rows per image against gtr-run's eval.json."""
        for name, per_b in self.res["gtr_run"].items():
            g = per_b.get(str(B), {}).get("schedules", {}).get(sched)
            if not g:
                continue
            same = (g.get("backbone_passes") == rec["backbone_passes_per_image"]
                    and g.get("diffusion_evaluations") == rec["diffusion_rows_per_image"])
            rec["same_work_as_gtr_run"] = same
            if not same:
                self.failed(f"PyTorch {precision} b{B} {sched}",
                            f"not the same work: gtr-run ({name}) {g.get('backbone_passes')} backbone passes, "
                            f"{g.get('diffusion_evaluations')} head rows per image; PyTorch "
                            f"{rec['backbone_passes_per_image']}, {rec['diffusion_rows_per_image']}: "
                            f"the ratio compares different samplers")
            return

    # -- the run ------------------------------------------------------------------------------------

    def predicted_seconds(self, kind: str, key: tuple, B: int) -> float | None:
        """A guess of how long a measurement will take, from one of the same kind measured at
        another batch size: gtr-run evals scale with the images they make (warm-up batch included),
        PyTorch cells with the images timed plus their warm-up. None if nothing to go by."""
        if kind == "gtr":
            done = self.res["gtr_run"].get(key[0], {})
            for b, rec in done.items():
                if rec.get("partial"):
                    continue
                return SAFETY * rec["seconds"] * (self.images_for(B) + B) / (rec["images"] + int(b))
        else:
            prec, sched = key
            for b, cells in self.res["torch"].get(prec, {}).items():
                if sched in cells:
                    c = cells[sched]
                    return SAFETY * (c["seconds_per_image"] * self.images_for(B)
                                     + c["warmup_seconds"] * B / int(b))
        return None

    def measure(self, label: str, fn, *args, predict=None) -> None:
        """Run one measurement as a phase, unless past the deadline or predicted to end after it."""
        left = self.remaining()
        guess = predict() if predict else None
        if left < START_FLOOR or (guess is not None and guess > left + GRACE):
            why = (f"{left:.0f} s left, under {START_FLOOR:.0f}" if left < START_FLOOR
                   else f"predicted {guess:.0f} s, {left:.0f} s left")
            self.res.setdefault("skipped_at_deadline", []).append(f"{label} ({why})")
            log(f"skip {label}: {why}")
            return
        with self.phase(label):
            fn(*args)

    def run(self) -> None:
        a = self.a
        try:
            with self.phase("environment"):
                self.environment()
            if not a.prepare_only:
                with self.phase("device check"):
                    self.device_check()
                if not self.res["phases"][-1]["ok"]:
                    raise BenchError("the device check failed: nothing would run on the device")
            with self.phase("weights and bundle"):
                self.prepare_bundle()
            if self.bundle is None or not self.manifest:
                raise BenchError("no bundle: nothing to measure")
            if a.prepare_only:
                for v in [] if a.skip_gtr_run else self.variants:
                    self.ensure_bundle_variants(v)
                return
            with self.phase("plans"):
                self.make_plans()
            if a.image_check and not a.skip_gtr_run:
                self.measure("images against the CPU", self.image_check)
            precisions = [] if a.skip_torch else (["half"] + ([] if a.skip_torch_fp32 else ["fp32"]))
            variants = [] if a.skip_gtr_run else self.variants
            for B in a.batches:
                self.measure_gtr_run(variants[:1], B)
                self.measure_torch(precisions[:1], B)
                self.measure_gtr_run(variants[1:], B)
                self.measure_torch(precisions[1:], B)
            if a.vae_check and not a.skip_gtr_run:
                v = self.vae_check_variant()
                if v is None:
                    self.res["notes"].append("--vae-check: not run, every variant runs `--sampler ticks` on CUDA, "
                                             "whose CUDA graphs gtr-run does not decode beside")
                else:
                    self.ensure_bundle_variants(v)
                    self.measure(f"gtr-run --vae overlap against inline, batch {a.batches[0]}", self.vae_check,
                                 v, a.batches[0])
            if a.profile and not a.skip_gtr_run:
                for v in self.variants:
                    self.ensure_bundle_variants(v)
                    self.measure(f"gtr-run {v[0]} kernel profile", self.gtr_profile, v, a.batches[0])
            fts = [s for s in self.plans if self.res["plans"][s]["fts"]]
            if fts and precisions:
                self.res["notes"].append(f"no PyTorch column for {', '.join(fts)}: GtR's FTS is not part of "
                                         f"MAR's sampler")
        except Interrupted as e:
            self.res["notes"].append(f"interrupted ({e}): the table holds what was measured before")
            self.res["interrupted"] = str(e)
            log(f"interrupted ({e})")
        except BenchError as e:
            self.error("run", e)
        self.res["total_seconds"] = round(time.time() - T0, 1)

    def measure_gtr_run(self, variants: list, B: int) -> None:
        """`gtr-run eval` of every schedule for each of `variants` at batch B."""
        for v in variants:
            self.ensure_bundle_variants(v)
            self.measure(f"gtr-run {v[0]} batch {B}", self.gtr_eval, v, B,
                         predict=lambda v=v, B=B: self.predicted_seconds("gtr", (v[0],), B))

    def measure_torch(self, precisions: list[str], B: int) -> None:
        """PyTorch's sampler in each of `precisions` at batch B, for the schedules MAR has."""
        for prec in precisions:
            for sched in self.plans:
                if self.res["plans"][sched]["fts"]:
                    continue
                self.measure(f"PyTorch {prec} batch {B} {sched}", self.torch_measure, sched, B, prec,
                             predict=lambda p=prec, s=sched, B=B: self.predicted_seconds("torch", (p, s), B))

    # -- the table ----------------------------------------------------------------------------------

    def table(self) -> str:
        a, r = self.a, self.res
        half = "fp16" if a.device == "cuda" else "bf16"
        multi = len(self.variants) > 1
        first = self.schedule_name(self.schedules[0])
        ts = r.get("torch_setup", {})
        env = r["environment"]
        smi = env.get("nvidia_smi") or ""
        device = (smi if smi and not smi.startswith("unavailable") else None) or ts.get("device_name") or a.device
        providers = sorted({str(b.get("execution_provider")) for v in r["gtr_run"].values() for b in v.values()})
        chains = sorted({f"{n}: {b['diffusion_chains']}" if multi else str(b["diffusion_chains"])
                         for n, v in r["gtr_run"].items() for b in v.values() if b.get("diffusion_chains")})
        decodes = sorted({f"{n}: {b['vae_decode']}" if multi else str(b["vae_decode"])
                          for n, v in r["gtr_run"].items() for b in v.values() if b.get("vae_decode")})
        head = [f"gtr-run vs MAR's PyTorch sampler, {r['date'][:10]}: MAR-{a.size} random weights "
                f"({self.manifest.get('name', '?')}), {device}; "
                f"gtr-run `eval --device {a.device}` (provider {', '.join(providers) or 'not run'}"
                + (f"; diffusion chains: {', '.join(chains)}" if chains else "")
                + (f"; VAE decode: {', '.join(decodes)}" if decodes else "")
                + (f", args {' '.join(a.gtr_arg)}" if a.gtr_arg else "") + f"); PyTorch {ts.get('torch', '?')} "
                f"(attention {a.torch_attention}); images per cell: "
                + ", ".join(f"{self.images_for(B)} at batch {B}" for B in a.batches)
                + ", after warm-up. Seconds per image (lower is better); 'speed vs autocast' = PyTorch autocast "
                  "s/image ÷ gtr-run s/image (> 1: gtr-run faster).", ""]
        cols = ["schedule", "batch"] + (["gtr-run variant"] if multi else []) + [
            "gtr-run s/image", "PyTorch fp32", f"PyTorch autocast {half}", "gtr-run speed vs autocast",
            "gtr-run outside ORT", f"speed-up over {first} measured (FLOPs)"]
        if multi:
            described = []
            for n, b, bd, args, fused, split in self.variants:
                words = (([] if b == a.gtr_run else ["--binary", b]) + ([] if not bd else ["--bundle", bd])
                         + (["--fused-attention"] if fused else []) + (["--split-head"] if split else []) + args)
                described.append(f"{n} = `{' '.join(words)}`" if words else f"{n} = no extra arguments")
            head.insert(1, "gtr-run variants: " + "; ".join(described) + ".")
        lines = head + ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

        def f(x, fmt="{:.3f}"):
            return fmt.format(x) if isinstance(x, (int, float)) else "n/a"

        for path in self.schedules:
            s = self.schedule_name(path)
            fts = r["plans"].get(s, {}).get("fts")
            for B in a.batches:
                tp = {p: r["torch"].get(p, {}).get(str(B), {}).get(s, {}).get("seconds_per_image")
                      for p in ("fp32", "half")}
                tcell = {p: ("no FTS in MAR" if fts else f(tp[p])) for p in tp}
                if not fts and (a.skip_torch or a.skip_torch_fp32):
                    tcell["fp32"] = "skipped"
                if not fts and a.skip_torch:
                    tcell["half"] = "skipped"
                for name, *_ in self.variants:
                    g = r["gtr_run"].get(name, {}).get(str(B), {}).get("schedules", {}).get(s, {})
                    gs = g.get("seconds_per_image")
                    ratio = tp["half"] / gs if isinstance(gs, float) and isinstance(tp["half"], float) and gs > 0 else None
                    sp = (f"{g['speedup_measured']:.2f}× ({g['speedup_flops']:.2f}×)"
                          if "speedup_measured" in g else "n/a")
                    row = [s, str(B)] + ([name] if multi else []) + [
                        f(gs), tcell["fp32"], tcell["half"], f(ratio, "{:.2f}×"),
                        f(g.get("outside_runtime_share"), "{:.1%}"), sp]
                    lines.append("| " + " | ".join(row) + " |")
        skipped = r.get("skipped_at_deadline", [])
        if r["notes"] or r["errors"] or skipped:
            lines.append("")
            if skipped:
                lines.append(f"- not run, --deadline {a.deadline:.0f} s: {'; '.join(skipped)}")
            for n in r["notes"]:
                lines.append(f"- {n}")
            for e in r["errors"]:
                lines.append(f"- error in {e['where']}: {e['error'].splitlines()[0][:300]}")
        images = r.get("images_vs_cpu")
        if images and any("differ" in c for c in images["variants"].values()):
            lines.append("")
            lines.append(f"Images against the CPU host path (mar-tiny, GtR, {images['images']} images, seed "
                         f"{images['seed']}; each variant's --sampler on --device {a.device}): " + "; ".join(
                             f"{name} ({c['diffusion_chains']}): {c['differ']} of {c['pixels']} pixels differ, "
                             f"max {c['max_levels']} levels" for name, c in images["variants"].items() if "differ" in c)
                         + ".")
        for name, prof in r.get("profiles", {}).items():
            lines.append("")
            lines.append(f"Kernel profile of {name} (`gtr-run --ort-profile`, {prof['schedule']}, batch "
                         f"{prof['batch']}; op shares are of kernel time as ONNX Runtime's profiler sees it):")
            for g, d in prof["graphs"].items():
                where = ", ".join(f"{v['nodes']} nodes on {p}" for p, v in d["providers"].items())
                ops = ", ".join(f"{op} {share:.0%}" for op, _, share in d["top_ops"])
                lines.append(f"- {g} ({d['calls']} calls): {where}; {ops}" + (" (profile truncated)" if d["truncated"] else ""))
        phases = "; ".join(f"{p['phase']} {p.get('seconds', '?')} s" + ("" if p.get("ok") else " (failed)")
                           for p in r["phases"])
        lines += ["", f"Phases: {phases}. Total {r.get('total_seconds', '?')} s."]
        return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked; --gtr-run made absolute and --summary made."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gtr-run", required=True, help="the gtr-run binary (built with --features cuda for the GPU)")
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "gpu-bench"),
                    help="folder for gpu-bench.md, gpu-bench.json, logs/ and eval/ (small files only)")
    ap.add_argument("--work", default="/tmp/gtr-gpubench",
                    help="folder for the checkpoints and the bundle (~3 GB at MAR-B); reused when size and seed match")
    ap.add_argument("--size", default="base", choices=list(SIZES), help="MAR size (tiny: a small custom model for tests)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="for gtr-run and PyTorch")
    ap.add_argument("--seed", type=int, default=0, help="weights, plans and sampling seed")
    ap.add_argument("--fresh", action="store_true", help="re-make the weights and bundle even if --work has them")
    ap.add_argument("--bundle", help="use this exported bundle (skips phase 1); PyTorch weights from --checkpoint/--vae "
                    "or checkpoint-last.pth/kl16.ckpt beside it")
    ap.add_argument("--checkpoint", help="MAR checkpoint of --bundle, for the PyTorch side")
    ap.add_argument("--vae", help="KL VAE checkpoint of --bundle, for the PyTorch side")
    ap.add_argument("--schedules", nargs="+", default=DEFAULT_SCHEDULES,
                    help="schedule names or files; the first is the speed-up baseline (default: %(default)s)")
    ap.add_argument("--batches", nargs="+", type=int, default=[64, 32], help="batch sizes, measured in this order")
    ap.add_argument("--num-images", type=int, default=0,
                    help="images timed per schedule and batch size, rounded up to whole batches (default: one batch)")
    ap.add_argument("--gtr-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for every gtr-run eval (repeatable: --gtr-arg=--precision --gtr-arg=fp16)")
    ap.add_argument("--variant", action="append", metavar="NAME=ARGS",
                    help="a gtr-run configuration (repeatable): extra eval arguments, plus optionally "
                         "--binary PATH and --bundle DIR for that configuration; e.g. --variant host= "
                         "--variant 'fp16=--precision fp16'")
    ap.add_argument("--skip-gtr-run", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-torch-fp32", action="store_true", help="PyTorch in autocast only")
    ap.add_argument("--torch-attention", default="sdpa", choices=["sdpa", "matmul"],
                    help="sdpa: F.scaled_dot_product_attention, what timm (MAR's code) uses; matmul: explicit, as exported")
    ap.add_argument("--torch-warmup-steps", type=int, default=4,
                    help="MAR steps of the untimed PyTorch warm-up batch, half from the start of the schedule "
                         "and half from its end, plus VAE decodes (0: the whole schedule, as gtr-run eval warms "
                         "up; default 4)")
    ap.add_argument("--profile", action="store_true",
                    help="after the measurements, one generation per variant under ONNX Runtime's profiler "
                         "(gtr-run --ort-profile): which provider ran each graph's nodes, and the top ops")
    ap.add_argument("--profile-schedule", default="gtr-3.7x",
                    help="the schedule of the --profile runs, one batch of the first batch size (default: %(default)s)")
    ap.add_argument("--vae-check", type=int, default=0, metavar="N",
                    help="after the measurements, gtr-run's plain command making N images at the first batch "
                         "size with --vae inline and --vae overlap, alternating, twice each (0: skip, the "
                         "default; N should be several batches)")
    ap.add_argument("--vae-check-schedule", default="gtr-3.7x",
                    help="the schedule of --vae-check (default: %(default)s)")
    ap.add_argument("--image-check", type=int, default=16, metavar="N",
                    help="first, N mar-tiny GtR images per variant (its --sampler) on --device against the CPU "
                         "host path, pixels compared (0: skip; default %(default)s)")
    ap.add_argument("--image-tolerance", type=int, default=2, metavar="LEVELS",
                    help="the most grey levels a variant's image-check pixel may be from the CPU host path's; "
                         "more is an error, exit status 1 (default %(default)s: float tolerance; measured on "
                         "an H200 2026-12-04: 1)")
    ap.add_argument("--threads", type=int, help="gtr-run --threads and torch.set_num_threads (for CPU runs)")
    ap.add_argument("--summary", metavar="DIR",
                    help="also write gpu-bench.json, gpu-bench.md and the last 64 KiB of every subprocess log "
                         "(logs/) here, after every phase (e.g. the device machine's $OUT, with --out elsewhere: "
                         "its eval folders are many files)")
    ap.add_argument("--prepare-only", action="store_true",
                    help="make the weights, the bundle and every variant's bundle graphs (fp16, fused attention, "
                         "...) in --work, then stop, measuring nothing and needing no GPU library: a later run "
                         "with the same --work, size, seed and variants reuses them and starts measuring at once")
    ap.add_argument("--eval-limit", type=float, default=0.0, metavar="SECONDS",
                    help="the most seconds one gtr-run eval may take before it is stopped as failed (its timed "
                         "rows kept), so that a configuration that hangs leaves time for the rest (0: up to the "
                         "deadline, the default)")
    ap.add_argument("--deadline", type=float, default=450.0,
                    help="seconds after start past which nothing new starts and gtr-run is stopped (default 450)")
    a = ap.parse_args(argv)
    if (any(b < 1 for b in a.batches) or a.num_images < 0 or a.torch_warmup_steps < 0 or a.image_check < 0
            or a.vae_check < 0 or a.eval_limit < 0):
        ap.error("--batches must be at least 1, --num-images, --torch-warmup-steps, --image-check, "
                 "--vae-check and --eval-limit at least 0")
    if not os.path.isfile(a.gtr_run):
        ap.error(f"--gtr-run {a.gtr_run}: not found")
    a.gtr_run = os.path.abspath(a.gtr_run)
    if a.summary:
        a.summary = os.path.abspath(a.summary)
        os.makedirs(a.summary, exist_ok=True)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    signal.signal(signal.SIGTERM, _on_term)
    b = Bench(a)
    log(f"gpu bench: size {a.size}, device {a.device}, schedules {' '.join(a.schedules)}, batches "
        f"{' '.join(map(str, a.batches))}, deadline {a.deadline:.0f} s, out {b.out}")
    try:
        b.run()
    except KeyboardInterrupt:
        b.res["notes"].append("interrupted (Ctrl-C)")
        b.res["interrupted"] = "Ctrl-C"
    # A late SIGTERM must not cut the table's writing short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    b.save()
    print("", flush=True)
    if a.prepare_only:
        print(f"prepared in {os.path.abspath(a.work)}: " + "; ".join(
            f"{p['phase']} {'ok' if p.get('ok') else 'FAILED'}" for p in b.res["phases"]), flush=True)
    else:
        print(b.res["table"], flush=True)
    print(f"\nraw numbers: {os.path.join(b.out, 'gpu-bench.json')}", flush=True)
    if b.res["errors"]:
        return 1
    return CUT_SHORT if b.res.get("interrupted") or b.res.get("skipped_at_deadline") else 0


if __name__ == "__main__":
    sys.exit(main())

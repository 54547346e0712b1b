#!/usr/bin/env python3
"""Tests of benches/gpu.py's decisions that a CPU rehearsal never reaches (plain script: run it,
it exits non-zero on the first failure). The whole script is rehearsed on the CPU at a tiny size
(README, "GPU benchmark"); these check, without a GPU, what only happens with --device cuda or
with real durations.

  .venv/bin/python models/tests/test_gpu_bench.py           # ~3 s, needs models/fixtures/requirements.txt

1. --vae-check runs the first variant that does not capture CUDA graphs (`--sampler ticks` on
   CUDA, either spelling, from --gtr-arg too), on the CPU the first variant, and none when every
   variant captures.
2. A subprocess stopped at --eval-limit is a failure naming the limit; one stopped at the
   deadline is a deadline stop; the timeout is the sooner of the two.
3. The profile's notes: an op off CUDA with 1% or more of its graph's kernel time is named, the
   shape computations under it are counted, and a capturing variant's profile says it ran
   without CUDA graphs.
4. --summary gets the end of every subprocess log.
5. --prepare-only (on a copy of the tiny bundle, --bundle: no PyTorch needed) makes every
   variant's graphs (fp16 variants, the fused-attention copy) without a device check or any
   measurement, and a second run reuses them.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benches"))
from fixture_copies import check, copy_tiny  # noqa: E402

import gpu  # noqa: E402


def bench(tmp, *args):
    """A Bench on the command line `args` (gtr-run stood in for by this Python, never run)."""
    a = gpu.parse_args(["--gtr-run", sys.executable, "--out", os.path.join(tmp, "out"), *args])
    return gpu.Bench(a)


def test_vae_check_variant(tmp):
    variants = ["--variant", "ticks16=--sampler ticks --precision fp16", "--variant", "graph16=--precision fp16"]
    check(bench(tmp, *variants).vae_check_variant().name == "graph16", "on CUDA: the first variant without ticks")
    check(bench(tmp, "--device", "cpu", *variants).vae_check_variant().name == "ticks16",
          "on the CPU: the first variant (no CUDA graphs there)")
    check(bench(tmp, "--variant", "t=--sampler=ticks", "--variant", "g=").vae_check_variant().name == "g",
          "--sampler=ticks captures too")
    check(bench(tmp, "--gtr-arg=--sampler", "--gtr-arg=ticks", "--variant", "a=", "--variant", "b=")
          .vae_check_variant() is None, "every variant capturing (through --gtr-arg): none")


def test_limits(tmp):
    b = bench(tmp, "--eval-limit", "1", "--deadline", "600")
    check(abs(b.subprocess_timeout(b.a.eval_limit) - 1) < 1e-6, "a limit sooner than the deadline is the timeout")
    check(b.subprocess_timeout() > 500, "no limit: up to the deadline")
    start = time.time()
    try:
        b.run_logged([sys.executable, "-c", "import time; time.sleep(30)"], "slow.log",
                     timeout=b.subprocess_timeout(b.a.eval_limit), limit=b.a.eval_limit)
        check(False, "a run past its limit raises")
    except gpu.DeadlineStop:
        check(False, "a run past its limit is not a deadline stop")
    except gpu.BenchError as e:
        check("limit of 1 s" in str(e) and time.time() - start < 10, f"stopped as a failure at its limit: {e}")
    late = bench(tmp, "--eval-limit", "100", "--deadline", "0")
    timeout = late.subprocess_timeout(late.a.eval_limit)
    check(timeout < 100, f"the deadline sooner than the limit is the timeout ({timeout:.1f} s)")
    try:
        late.run_logged([sys.executable, "-c", "import time; time.sleep(60)"], "late.log", timeout=0.5,
                        limit=late.a.eval_limit)
        check(False, "a run past the deadline raises")
    except gpu.DeadlineStop as e:
        check("after the deadline" in str(e), f"stopped at the deadline: {e}")


def test_profile_notes():
    graphs = {
        "tick": {"ops_off_gpu": [["Shape", "CPUExecutionProvider", 2, 0.0004],
                                 ["Gather", "CPUExecutionProvider", 3, 0.002]]},
        "decoder": {"ops_off_gpu": [["ScatterElements", "CPUExecutionProvider", 1, 0.08]]},
        "encoder": {"ops_off_gpu": []},
    }
    notes = gpu.profile_notes("ticks16", graphs, captured=True)
    check(len(notes) == 3, f"three notes ({notes})")
    check("decoder: ScatterElements ×1 on CPUExecutionProvider (8.0%)" in notes[0] and "Shape" not in notes[0],
          f"an op with a share of the kernel time is named: {notes[0]}")
    check(notes[1].startswith("profile ticks16: 5 nodes off CUDA"), f"the shape computations are counted: {notes[1]}")
    check("without CUDA graphs" in notes[2], f"a capturing variant's profile says so: {notes[2]}")
    check(gpu.profile_notes("graph16", {"encoder": {"ops_off_gpu": []}}, captured=False) == [],
          "all on CUDA, not capturing: no note")


def test_summary_logs(tmp):
    summary = os.path.join(tmp, "summary")
    b = bench(tmp, "--summary", summary)
    logs = os.path.join(b.out, "logs")
    os.makedirs(logs, exist_ok=True)
    with open(os.path.join(logs, "big.log"), "w") as f:
        f.write("x" * (gpu.LOG_TAIL + 10) + "END")
    with open(os.path.join(logs, "small.log"), "w") as f:
        f.write("small")
    b.save()
    with open(os.path.join(summary, "logs", "big.log")) as f:
        big = f.read()
    check(len(big) == gpu.LOG_TAIL and big.endswith("END"), "a long log's end, LOG_TAIL bytes")
    with open(os.path.join(summary, "logs", "small.log")) as f:
        check(f.read() == "small", "a short log whole")
    check(os.path.isfile(os.path.join(summary, "gpu-bench.md")), "the table beside them")


def test_prepare_only(tmp):
    bundle = copy_tiny(tmp, "prepare")

    def prepare():
        return subprocess.run([sys.executable, "benches/gpu.py", "--gtr-run", sys.executable, "--bundle", bundle,
                               "--work", os.path.join(tmp, "work"), "--out", os.path.join(tmp, "prepared"),
                               "--prepare-only", "--variant", "f=--precision fp16", "--variant",
                               "m=--fused-attention --precision fp16"],
                              cwd=ROOT, capture_output=True, text=True)

    r = prepare()
    check(r.returncode == 0, f"--prepare-only exits 0 ({r.stdout[-300:]} {r.stderr[-300:]})")
    with open(os.path.join(tmp, "prepared", "gpu-bench.json")) as f:
        phases = [p["phase"] for p in json.load(f)["phases"]]
    check(phases == ["environment", "weights and bundle", "bundle variants for f", "bundle variants for m"],
          f"no device check, nothing measured: {phases}")
    fused = bundle + "-fused"
    for folder in (bundle, fused):
        check(os.path.isfile(os.path.join(folder, "diffusion.fp16.onnx")), f"{os.path.basename(folder)}: fp16 graphs made")
    check(os.path.isfile(os.path.join(fused, ".derived-from.json")), "the fused-attention copy made")
    again = prepare()
    check(again.returncode == 0 and f"{bundle} has fp16 graphs" in again.stdout and f"reusing {fused}" in again.stdout,
          "a second run reuses what the first made")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        test_vae_check_variant(tmp)
        test_limits(tmp)
        test_profile_notes()
        test_summary_logs(tmp)
        test_prepare_only(tmp)
    print("all passed")


if __name__ == "__main__":
    main()

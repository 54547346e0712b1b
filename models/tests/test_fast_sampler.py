#!/usr/bin/env python3
"""models/torch/fast_sampler.py (the batched, on-device MAR sampler that benches/gpu.py times)
against models/torch/reference_sampler.py, on CPU (plain script; exits non-zero on failure).

  .venv-torch/bin/python models/tests/test_fast_sampler.py          # ~10 s

Both samplers get the same random small MAR + KL VAE (official key layout, weights from
make_fake_checkpoint.randomize), the same orders and the same injected noise:
1. a MAR case (make `sample_tokens`' cosine steps, linear CFG, 5 diffusion steps, temperature
   0.95, a null label in the batch): tokens and images agree to float32 tolerance, pixels to ±1;
2. an unguided case with T = 1 and T = 3 chains and MAR-style steps;
3. the fused attention switch (what timm / MAR's code use) gives the same tokens;
4. the per-image work counts (backbone passes and head rows, both CFG halves);
5. a run with on-device noise under CPU bf16 autocast is finite and close to float32 in the mean;
6. `known_before` runs the last steps alone and leaves the tokens taken as known untouched;
7. make_fake_checkpoint's --denoising-head: the plain head predicts ε = x_t and v = 0, and 100-step
   sampling keeps tokens below 10 where the random head's pass 1000 (fp16 autocast stays finite);
8. a plan's clip_timesteps (DiSA): 50 steps clipped at 950 are 48, and run as 48.
The diffusion role is the torch-small fixture's wrapper (make_torch_golden.FixtureEpsHead), so a
random head does not blow samples up and float32-vs-float64 differences stay small.
"""

from __future__ import annotations

import os
import sys
import time

_MODELS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, os.path.dirname(_MODELS))
sys.path.insert(1, os.path.join(_MODELS, "fixtures"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models import make_fake_checkpoint  # noqa: E402
from models.make_torch_golden import FixtureEpsHead  # noqa: E402
from models.torch import fast_sampler as fast  # noqa: E402
from models.torch import reference_sampler as ref  # noqa: E402
from models.torch.mar import MAR, AutoencoderKL, MARConfig, VAEConfig  # noqa: E402

torch.set_num_threads(2)
FAILED = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILED.append(name)


def build():
    cfg = MARConfig(grid=(8, 8), token_dim=16, encoder_width=64, decoder_width=64, encoder_depth=1,
                    decoder_depth=1, encoder_heads=4, decoder_heads=4, buffer=16, classes=10,
                    diffloss_width=64, diffloss_depth=2)
    vcfg = VAEConfig(embed_dim=16, z_channels=16, ch=32, ch_mult=(1, 2), num_res_blocks=1)
    mar, vae = MAR(cfg), AutoencoderKL(vcfg)
    mar.load_state_dict(make_fake_checkpoint.randomize(mar, 7))
    vae.load_state_dict(make_fake_checkpoint.randomize(vae, 8))
    return mar.eval(), vae.eval()


def run_fast(mar, vae, head, case, counts=None):
    steps = [fast.Step(int(n), int(T), None if np.isnan(c) else float(c), float(tp))
             for n, T, c, tp in zip(case["step_sizes"], case["diffusion_steps"], case["cfg"], case["temperature"])]
    noise = {"init": torch.from_numpy(case["init_noise"]), "step": torch.from_numpy(case["step_noise"])}
    out = fast.sample(mar, vae, steps, torch.from_numpy(case["labels"]), torch.from_numpy(case["order"]),
                      0.2325, head=head, noise=noise, counts=counts)
    return {k: v.numpy() for k, v in out.items()}


def compare(name, want, got):
    dt = float(np.abs(want["tokens"] - got["tokens"]).max())
    di = float(np.abs(want["images"] - got["images"]).max())
    dp = np.abs(want["pixels"].astype(int) - got["pixels"].astype(int))
    scale = float(np.abs(want["tokens"]).max())
    check(f"{name}: tokens", dt <= 1e-4 * max(scale, 1.0), f"max |fast - reference| {dt:.2e} (tokens up to {scale:.2f})")
    check(f"{name}: images", di <= 1e-4, f"max {di:.2e}")
    check(f"{name}: pixels", int(dp.max()) <= 1, f"max {int(dp.max())}, {int((dp > 0).sum())} of {dp.size} differ")


def main():
    t0 = time.time()
    mar, vae = build()
    head = FixtureEpsHead(mar.diffusion_head).eval()
    L, C = mar.cfg.seq_len, mar.cfg.token_dim
    rng = np.random.default_rng(5)

    # 1. MAR's own settings
    B, iters, T = 3, 6, 5
    orders = np.stack([rng.permutation(L) for _ in range(B)])
    case = ref.mar_case([3, 10, 7], orders, iters, 3.0, rng.standard_normal((B, L, C)).astype(np.float32),
                        rng.standard_normal((B, L, T, C)).astype(np.float32), temperature=0.95, diffusion_steps=T)
    model = ref.TorchModel(mar, vae, head=head)
    want = ref.sample(model, case)
    counts = {}
    got = run_fast(mar, vae, head, case, counts)
    compare("MAR case (cfg linear 3.0, T 5)", want, got)
    rows = 2 * L * T
    check("work counts", counts == {"backbone_passes": 2 * iters, "diffusion_rows": rows}, str(counts))

    # 2. unguided, T = 1 and 3, MAR-style step sizes
    sizes = ref.mar_step_sizes(L, 4)
    case2 = dict(case)
    case2.update({
        "labels": np.asarray([1, 2, 10]), "step_sizes": np.asarray(sizes),
        "diffusion_steps": np.asarray([1, 3, 3, 1]), "cfg": np.full(4, np.nan), "temperature": np.ones(4),
        "detail_fraction": np.zeros(4), "detail_steps": np.zeros(4, dtype=np.int64),
        "detail_selector": np.zeros(4, dtype=np.int64),
        "step_noise": rng.standard_normal((B, L, 3, C)).astype(np.float32),
    })
    compare("unguided, T 1 and 3", ref.sample(model, case2), run_fast(mar, vae, head, case2))

    # 3. fused attention: same numbers
    mar_f, _ = build()
    n = fast.use_fused_attention(mar_f)
    got_f = run_fast(mar_f, vae, FixtureEpsHead(mar_f.diffusion_head).eval(), case)
    d = float(np.abs(got_f["tokens"] - got["tokens"]).max())
    check("fused attention", n == 2 and d <= 1e-4, f"{n} blocks switched, max token difference {d:.2e}")

    # 4. FTS plans are refused
    try:
        fast.steps_from_plan({"steps": [{"tokens": [0], "diffusion_steps": 2, "cfg": None, "temperature": 1.0,
                                         "detail": {"selector": "high_freq"}}]})
        check("FTS refused", False)
    except ValueError as e:
        check("FTS refused", "FTS" in str(e), str(e))

    # 5. on-device noise, bf16 autocast on the CPU (the benchmark's CPU "half" column)
    steps = [fast.Step(int(n), 5, c, 1.0) for n, c in zip(case["step_sizes"], case["cfg"])]
    labels, order = torch.tensor([3, 10, 7]), torch.from_numpy(case["order"])
    g = torch.Generator().manual_seed(0)
    o32 = fast.sample(mar, vae, steps, labels, order, 0.2325, generator=g, head=head)
    g = torch.Generator().manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o16 = fast.sample(mar, vae, steps, labels, order, 0.2325, generator=g, head=head)
    fin = bool(torch.isfinite(o16["images"].float()).all())
    md = float((o16["tokens"] - o32["tokens"]).abs().mean())
    # Autocast really ran in bf16 (the tokens moved), and stayed close to fp32.
    check("bf16 autocast", fin and 0 < md < 0.1 and o16["pixels"].dtype == torch.uint8,
          f"finite {fin}, mean |bf16 - fp32| token difference {md:.3g}")

    # 6. known_before: the last steps alone (the benchmark's warm-up of the long sequences)
    last = steps[-2:]
    before = L - sum(x.tokens for x in last)
    o = fast.sample(mar, vae, last, labels, order, 0.2325, generator=g, head=head, known_before=before, counts={})
    untouched = bool((o["tokens"].gather(1, order[:, :before, None].expand(-1, -1, C)) == 0).all())
    check("known_before", untouched and bool(torch.isfinite(o["images"]).all()),
          f"{before} tokens taken as known, left zero: {untouched}")

    # 7. make_fake_checkpoint --denoising-head: the plain head (no wrapper) predicts eps = x_t, and
    # MAR's sampler with 100 diffusion steps keeps the tokens at a trained model's scale, where the
    # random head's pass float16's range (the benchmark's half-precision runs need them finite)
    tame = MAR(mar.cfg)
    sd = make_fake_checkpoint.randomize(tame, 7)
    make_fake_checkpoint.make_denoising_head(sd, C)
    tame.load_state_dict(sd)
    tame.eval()
    x = torch.randn(64, C) * 2
    with torch.no_grad():
        out = tame.diffusion_head(x, torch.randint(0, 1000, (64,)), torch.randn(64, mar.cfg.decoder_width))
    err, v, top = float((out[:, :C] - x).abs().max()), float(out[:, C:].abs().max()), float(x.abs().max())
    check("denoising head: eps = x", err < 1e-3 * top and v < 1e-4,
          f"max |eps - x| {err:.1e} (x up to {top:.1f}; the norm shrinks eps by about |x|²/K²), max |v| {v:.1e}")
    steps100 = [fast.Step(int(n), 100, c, 1.0) for n, c in zip(case["step_sizes"], case["cfg"])]
    peaks = {}
    for name, model in (("random", mar), ("denoising", tame)):
        g = torch.Generator().manual_seed(0)
        peaks[name] = float(fast.sample(model, vae, steps100, labels, order, 0.2325, generator=g,
                                        decode=False)["tokens"].abs().max())
    g = torch.Generator().manual_seed(0)
    with torch.autocast("cpu", dtype=torch.float16):
        o16 = fast.sample(tame, vae, steps100, labels, order, 0.2325, generator=g)
    fin = bool(torch.isfinite(o16["images"].float()).all())
    check("denoising head: tokens stay small", peaks["denoising"] < 10 < 1000 < peaks["random"] and fin,
          f"max |token| {peaks['denoising']:.2f} against the random head's {peaks['random']:.3g}; "
          f"fp16 autocast images finite: {fin}")

    # 8. clip_timesteps (DiSA): the chains gtr-run builds (its respace tests: 50 steps become 48,
    # sampling from 950), read from a plan, and run for their own length
    from models.torch.diffusion import chain, respaced_timesteps
    clipped = chain(50, 1000, 950)
    check("clip_timesteps chains", respaced_timesteps(5, 1000, 950) == [0, 250, 500, 749, 950]
          and clipped.T == 48 and int(clipped.timesteps[-1]) == 950, f"{clipped.T} steps")
    plan_steps, _ = fast.steps_from_plan({"steps": [{"tokens": list(range(L)), "diffusion_steps": 50, "cfg": None,
                                                     "temperature": 1.0, "detail": None, "clip_timesteps": 950}]})
    counts = {}
    g = torch.Generator().manual_seed(0)
    fast.sample(mar, vae, plan_steps, labels, order, 0.2325, generator=g, head=head, counts=counts, decode=False)
    check("clip_timesteps rows", counts["diffusion_rows"] == L * 48, str(counts))

    print(f"{'FAILED: ' + ', '.join(FAILED) if FAILED else 'all passed'} in {time.time() - t0:.1f} s")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())

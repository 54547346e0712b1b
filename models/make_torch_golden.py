#!/usr/bin/env python3
"""Build models/fixtures/torch-small/ (a small random-weight bundle exported from PyTorch) and
its golden sampling cases, written by the PyTorch reference sampler and cross-checked against
the numpy reference.

Steps:
1. Random weights in the official checkpoint layout (make_fake_checkpoint.py, custom size,
   fixed seed), written to a temporary folder and loaded back through export_mar.py's strict
   loader, exactly like an official checkpoint.
2. Export with export_mar.export_bundle (+ its contract and ORT-vs-PyTorch parity checks). The
   diffusion role is MAR's SimpleMLPAdaLN wrapped by `FixtureEpsHead` (below): a test-fixture
   device that keeps random-weight sampling O(1). export_mar.py itself never does this.
3. Golden cases (CASES) run by models/torch/reference_sampler.py (PyTorch modules) and saved as
   `golden/<case>.npz` in the layout of models/fixtures/README.md.
4. The same cases run by the numpy reference (models/fixtures/reference_sampler.py, the
   exported graphs in onnxruntime); the two must agree to 1e-5 (tokens, images, every
   intermediate canvas, z of step 0), with identical FTS selections and step counts.

  .venv-torch/bin/python models/make_torch_golden.py            # writes models/fixtures/torch-small/
  .venv-torch/bin/python models/make_torch_golden.py --verify   # writes nothing; recomputes and compares
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
# models/torch would shadow PyTorch if this script's folder stayed on sys.path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(1, os.path.join(_HERE, "fixtures"))  # the numpy reference

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import reference_sampler as np_ref  # noqa: E402  (models/fixtures/reference_sampler.py)
from make_golden import finish, linear_ramp, uniform_sizes  # noqa: E402  (the numpy goldens' cases)
from models import export_mar, make_fake_checkpoint  # noqa: E402
from models.torch import reference_sampler as torch_ref  # noqa: E402
from models.torch.diffusion import train_alphas_cumprod  # noqa: E402
from models.torch.mar import AutoencoderKL, MAR, MARConfig, VAEConfig  # noqa: E402

OUT = os.path.join(_HERE, "fixtures", "torch-small")
NAME = "torch-small-random"
WEIGHT_SEED = 20251129
SEEDS = {"gtr_cfg": 1101, "mar_nocfg": 1202, "null_t1": 1303}
AGREE = 1e-5   # torch reference vs numpy reference (tokens, images, canvases, z)

# The torch-small shape: MAR's token_dim 16, buffer 64 and 16x16 grid; width 64, 1 + 1 blocks of
# 4 heads, 10 classes; diffusion MLP 64 x 2; a KL VAE with ch 32, ch_mult (1, 2), 2 blocks per
# level (every key kind of KL-16: mid attention, upsample conv, nin_shortcut), so 32x32 images.
CONFIG = MARConfig(grid=(16, 16), token_dim=16, encoder_width=64, decoder_width=64, encoder_depth=1,
                   decoder_depth=1, encoder_heads=4, decoder_heads=4, mlp_ratio=4.0, buffer=64,
                   classes=10, diffloss_width=64, diffloss_depth=2)
VAE_CONFIG = VAEConfig(embed_dim=16, z_channels=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32)


class FixtureEpsHead(nn.Module):
    """TEST FIXTURE ONLY: the diffusion role of torch-small.

    out = [ sqrt(1 − ᾱ_t)·x + ᾱ_t·m , v ]  where [m, v] = SimpleMLPAdaLN(x, t, z)

    (ᾱ from the 1000-step cosine table, gathered by t, float32). The I/O contract is unchanged
    (x, t, z -> ε then v, [N, 2C]); only what the ε channels mean differs from a plain head.
    Why: MAR's sampler computes x0 = x/sqrt(ᾱ) − sqrt(1/ᾱ − 1)·ε, which multiplies x − ε by up to
    1/sqrt(ᾱ_999) = 20290. A trained head has ε ≈ x at high noise; a random one does not, so its
    samples blow up (±1e4). With this form the implied x0 is sqrt(ᾱ)·x − sqrt(ᾱ(1−ᾱ))·m, O(1) at
    every t, and at t = 999 ε equals x exactly in float32 (sqrt(1 − ᾱ) rounds to 1, ᾱ·m is below
    half an ulp of x unless |x| is tiny), so last-bit differences in m between PyTorch and
    onnxruntime are not amplified. Same device as the numpy fixture (models/fixtures/README.md).
    """

    def __init__(self, net: nn.Module, train_steps: int = 1000):
        super().__init__()
        self.net = net
        acp = train_alphas_cumprod(train_steps)
        self.register_buffer("abar", acp.to(torch.float32), persistent=False)
        self.register_buffer("sqrt_one_minus_abar", torch.sqrt(1.0 - acp).to(torch.float32), persistent=False)

    def forward(self, x, t, z):
        o = self.net(x, t, z)
        c = x.shape[-1]
        m, v = o[:, :c], o[:, c:]
        eps = self.sqrt_one_minus_abar[t][:, None] * x + self.abar[t][:, None] * m
        return torch.cat([eps, v], dim=-1)


# -- model ----------------------------------------------------------------------------------

def build_model(log=print):
    """(MAR, VAE, head) with the fixture's random weights, loaded through the exporter's
    strict loader from checkpoint files in the official layout."""
    ckpt, vae_ckpt, _, _ = make_fake_checkpoint.make("custom", CONFIG, VAE_CONFIG, seed=WEIGHT_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        mp, vp = os.path.join(tmp, "checkpoint-last.pth"), os.path.join(tmp, "kl16.ckpt")
        torch.save(ckpt, mp)
        torch.save(vae_ckpt, vp)
        sd, args = export_mar.load_mar_checkpoint(mp)
        cfg, vcfg, _ = export_mar.resolve_configs("custom", args, None)
        assert cfg == CONFIG, (cfg, CONFIG)
        assert (vcfg.ch, vcfg.ch_mult, vcfg.num_res_blocks) == (VAE_CONFIG.ch, VAE_CONFIG.ch_mult,
                                                                 VAE_CONFIG.num_res_blocks)
        mar = MAR(cfg)
        export_mar.strict_load(mar, sd, "torch-small MAR")
        vsd, ignored = export_mar.load_vae_checkpoint(vp)
        vae = AutoencoderKL(vcfg)
        export_mar.strict_load(vae, vsd, "torch-small VAE")
    log(f"weights: seed {WEIGHT_SEED}; MAR {sum(p.numel() for p in mar.parameters())} parameters, "
        f"VAE decoder {sum(p.numel() for p in vae.parameters())}; ignored VAE keys {ignored}")
    return mar.eval(), vae.eval(), FixtureEpsHead(mar.diffusion_head).eval()


# -- cases ----------------------------------------------------------------------------------

def case_gtr_cfg(cfg):
    """B = 2, labels [3, 7]; GtR K = 3 checkerboard: (i+j)%4==0 in 3 steps, (i+j)%4==2 in 2, odd
    in 1; linear cfg 3.0; diffusion 6 -> 3 over generation, 3 in reconstruction; FTS top 10% by
    high_freq -> 6 on the reconstruction step (13 of 128 per image)."""
    rng = np.random.default_rng(SEEDS["gtr_cfg"])
    h, w = cfg.grid
    L, C, B = cfg.seq_len, cfg.token_dim, 2
    cells = [(i, j) for i in range(h) for j in range(w)]
    s1 = [i * w + j for i, j in cells if (i + j) % 4 == 0]
    s2 = [i * w + j for i, j in cells if (i + j) % 4 == 2]
    s3 = [i * w + j for i, j in cells if (i + j) % 2 == 1]
    order = np.stack([np.concatenate([rng.permutation(s1), rng.permutation(s2), rng.permutation(s3)])
                      for _ in range(B)])
    sizes = uniform_sizes(len(s1), 3) + uniform_sizes(len(s2), 2) + [len(s3)]
    gen = 5
    case = {
        "labels": [3, 7], "order": order, "step_sizes": sizes,
        "cfg": torch_ref.mar_cfg_per_step(3.0, sizes, L, "linear"), "temperature": [1.0] * 6,
        "diffusion_steps": linear_ramp(6, 3, gen) + [3],
        "detail_fraction": [0.0] * gen + [0.1], "detail_steps": [0] * gen + [6],
        "detail_selector": [torch_ref.SELECTOR_NONE] * gen + [torch_ref.SELECTOR_HIGH],
    }
    return finish(case, rng, B, L, C)


def case_mar_nocfg(cfg):
    """B = 1, label 2; random order, MAR cosine sizes for 6 steps; no guidance; 4 diffusion
    steps, temperature 0.95; FTS 25% by low_freq -> 5 on every step."""
    rng = np.random.default_rng(SEEDS["mar_nocfg"])
    L, C = cfg.seq_len, cfg.token_dim
    sizes = torch_ref.mar_step_sizes(L, 6)
    S = len(sizes)
    case = {
        "labels": [2], "order": rng.permutation(L)[None, :], "step_sizes": sizes,
        "cfg": [np.nan] * S, "temperature": [0.95] * S, "diffusion_steps": [4] * S,
        "detail_fraction": [0.25] * S, "detail_steps": [5] * S,
        "detail_selector": [torch_ref.SELECTOR_LOW] * S,
    }
    return finish(case, rng, 1, L, C)


def case_null_t1(cfg):
    """B = 2, labels [null_class, 5]; random orders, 4 steps of 64; constant cfg 1.5 (the null
    image's two halves are both null); diffusion 1, 2, 3, 2 (a one-step chain first); FTS all
    -> 4 on the last step."""
    rng = np.random.default_rng(SEEDS["null_t1"])
    L, C = cfg.seq_len, cfg.token_dim
    case = {
        "labels": [cfg.null_class, 5], "order": np.stack([rng.permutation(L) for _ in range(2)]),
        "step_sizes": [64] * 4, "cfg": [1.5] * 4, "temperature": [1.0] * 4,
        "diffusion_steps": [1, 2, 3, 2], "detail_fraction": [0.0, 0.0, 0.0, 1.0],
        "detail_steps": [0, 0, 0, 4], "detail_selector": [0, 0, 0, torch_ref.SELECTOR_ALL],
    }
    return finish(case, rng, 2, L, C)


CASES = {"gtr_cfg": case_gtr_cfg, "mar_nocfg": case_mar_nocfg, "null_t1": case_null_t1}


# -- comparison --------------------------------------------------------------------------------

def compare(a: dict, b: dict) -> dict:
    """Differences between two sampler outputs (same keys)."""
    d = {}
    for k in ("tokens", "images", "canvas_after_step", "z_step0"):
        d[k] = float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max())
    fa, fb = a["fts_scores"], b["fts_scores"]
    same_nan = bool(np.array_equal(np.isnan(fa), np.isnan(fb)))
    m = ~np.isnan(fa)
    d["fts_scores_rel"] = (float(np.abs(fa[m] - fb[m]).max() / np.abs(fa[m]).max()) if m.any() else 0.0) \
        if same_nan else float("inf")
    d["detail_mask_equal"] = bool(np.array_equal(a["detail_mask"], b["detail_mask"]))
    d["token_steps_equal"] = bool(np.array_equal(a["token_steps"], b["token_steps"]))
    dp = np.abs(a["pixels"].astype(int) - b["pixels"].astype(int))
    d["pixels_off"] = int((dp > 0).sum())
    d["pixels_max"] = int(dp.max())
    return d


def agree(d: dict, tol: float) -> bool:
    return (max(d["tokens"], d["images"], d["canvas_after_step"], d["z_step0"]) <= tol
            and d["fts_scores_rel"] <= 1e-6 and d["detail_mask_equal"] and d["token_steps_equal"]
            and d["pixels_max"] <= 1)


def fmt(d: dict) -> str:
    return (f"tokens {d['tokens']:.1e}, images {d['images']:.1e}, canvases {d['canvas_after_step']:.1e}, "
            f"z_step0 {d['z_step0']:.1e}, fts rel {d['fts_scores_rel']:.1e}, detail masks "
            f"{'equal' if d['detail_mask_equal'] else 'DIFFER'}, steps {'equal' if d['token_steps_equal'] else 'DIFFER'}, "
            f"pixels off {d['pixels_off']} (max {d['pixels_max']})")


def fts_margin(case, out):
    """Smallest relative gap between the last chosen and the first unchosen FTS score."""
    gaps, c = [], 0
    for s, n in enumerate(case["step_sizes"]):
        if int(case["detail_selector"][s]) in (1, 2):
            for b in range(len(case["labels"])):
                toks = case["order"][b, c:c + n]
                sc, ch = out["fts_scores"][b, toks], out["detail_mask"][b, toks]
                if ch.all() or not ch.any():
                    continue
                gap = (sc[ch].min() - sc[~ch].max()) if case["detail_selector"][s] == 1 else (sc[~ch].min() - sc[ch].max())
                gaps.append(gap / np.abs(sc).max())
        c += n
    return min(gaps) if gaps else None


def report(case, out, trace, C):
    zs = torch.cat([t["z"].flatten() for t in trace])
    heads = [o for t in trace for o in t["head_out"]]
    eps = torch.cat([o[:, :C].flatten() for o in heads])
    v = torch.cat([o[:, C:].flatten() for o in heads])
    sat = np.mean((out["pixels"] == 0) | (out["pixels"] == 255))
    m = fts_margin(case, out)
    print(f"  steps {case['step_sizes'].tolist()}, diffusion {case['diffusion_steps'].tolist()}, "
          f"detail {case['detail_steps'].tolist()} selector {case['detail_selector'].tolist()}, "
          f"cfg {[None if math.isnan(x) else round(float(x), 6) for x in case['cfg']]}, "
          f"temperature {sorted(set(case['temperature'].tolist()))}")
    print(f"  detail tokens per image {out['detail_mask'].sum(1).tolist()}; z [{zs.min():+.2f}, {zs.max():+.2f}] "
          f"eps [{eps.min():+.2f}, {eps.max():+.2f}] v [{v.min():+.2f}, {v.max():+.2f}]; tokens "
          f"[{out['tokens'].min():+.2f}, {out['tokens'].max():+.2f}] std {out['tokens'].std():.2f}; images "
          f"[{out['images'].min():+.2f}, {out['images'].max():+.2f}] std {out['images'].std():.2f}; pixels "
          f"[{out['pixels'].min()}, {out['pixels'].max()}], saturated {sat:.3f}"
          + (f"; smallest FTS margin {m:.1e}" if m is not None else ""))


# -- main ---------------------------------------------------------------------------------

def check_chains():
    """diffusion.Chain (PyTorch, float64) against the numpy reference's tables."""
    from models.torch.diffusion import chain

    worst = 0.0
    for T in (1, 2, 3, 4, 5, 6, 7, 8, 20, 50, 100):
        a, b = chain(T), np_ref.respaced_chain(T)
        assert np.array_equal(a.timesteps.numpy(), b["timestep_map"]), T
        for k in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_recip_alphas_cumprod",
                  "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                  "log_betas", "coef1", "coef2"):
            x, y = getattr(a, k).numpy(), b[k]
            assert np.array_equal(np.isnan(x), np.isnan(y)), (T, k)
            m = ~np.isnan(x)
            worst = max(worst, float((np.abs(x[m] - y[m]) / np.maximum(np.abs(y[m]), 1e-300)).max(initial=0.0)))
    print(f"respaced chains T = 1 … 100: PyTorch vs numpy tables, max relative difference {worst:.1e}")
    assert worst < 1e-12, worst


def run_case(model, bundle, name, case):
    trace = []
    out = torch_ref.sample(model, case, trace=trace)
    ref = np_ref.sample(bundle, case)
    d = compare(out, ref)
    return out, ref, d, trace


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--verify", action="store_true",
                    help="write nothing: rebuild the weights, re-check the stored graphs against them, "
                         "build every case's inputs again and recompute its golden with both references, "
                         "and compare with what is stored")
    a = ap.parse_args(argv)
    torch.manual_seed(0)

    mar, vae, head = build_model()
    model = torch_ref.TorchModel(mar, vae, head)
    if a.verify:
        print(f"stored graphs vs the rebuilt PyTorch model ({a.out}):")
        export_mar.check_parity(a.out, export_mar.role_modules(mar, vae, head), CONFIG, tolerance=1e-4)
    else:
        if os.path.isdir(a.out):
            shutil.rmtree(a.out)
        export_mar.export_bundle(mar, vae, a.out, NAME, cfg_scale=3.0, head=head, tolerance=1e-4, derived=False)
        os.makedirs(os.path.join(a.out, "golden"))
    check_chains()
    bundle = np_ref.Bundle(a.out)
    plain = np_ref.Bundle(a.out, threads=1, optimize=False)
    worst = 0.0
    ok = True
    for name, make in CASES.items():
        path = os.path.join(a.out, "golden", name + ".npz")
        if a.verify:
            with np.load(path) as f:
                stored = {k: f[k] for k in f.files}
            case = {k: stored[k] for k in torch_ref.CASE_INPUTS}
            made = make(CONFIG)
            differ = [k for k in torch_ref.CASE_INPUTS
                      if not np.array_equal(made[k], case[k], equal_nan=True)]
            print(f"  the case built again vs stored: {'equal' if not differ else 'differ in ' + ', '.join(differ)}")
            ok &= not differ
        else:
            case = make(CONFIG)
        out, ref, d, trace = run_case(model, bundle, name, case)
        print(f"{name}:")
        report(case, out, trace, CONFIG.token_dim)
        print(f"  torch reference vs numpy reference (onnxruntime graphs): {fmt(d)}")
        worst = max(worst, d["tokens"], d["images"], d["canvas_after_step"], d["z_step0"])
        ok &= agree(d, AGREE)
        for label, b, batching in (("onnxruntime optimizations off, 1 thread", plain, "batch"),
                                   ("one diffusion row per call", bundle, "row")):
            dv = compare(out, np_ref.sample(b, case, batching=batching))
            print(f"  torch reference vs numpy reference, {label}: {fmt(dv)}")
            ok &= agree(dv, AGREE)
        if a.verify:
            ds = compare(out, stored)
            print(f"  recomputed torch reference vs stored: {fmt(ds)}")
            ok &= agree(ds, 1e-4)
        else:
            data = {k: case[k] for k in torch_ref.CASE_INPUTS}
            data.update(out)
            data["latent_scale"] = np.float64(model.latent_scale)
            np.savez(path, **data)
            print(f"  wrote {path} ({os.path.getsize(path) / 1e3:.0f} KB)")
    sizes = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(a.out) for f in fs)
    print(f"largest torch-vs-numpy difference over all cases: {worst:.2e} (allowed {AGREE}); "
          f"{a.out}: {sizes / 1e6:.2f} MB")
    if not ok:
        print("error: the references disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Trains `mar-tiny`, the default model that ships with gtr-run: a class-conditional MAR on
Fashion-MNIST with all four parts of the real thing, at a size a 2-core CPU (or a few GPU
minutes) can train.

    python models/mar-tiny/train.py vae  --steps 4000      # KL autoencoder 32x32x1 -> 16x16x4
    python models/mar-tiny/train.py scale                  # latent scale (1 / std of latents)
    python models/mar-tiny/train.py mar  --steps 20000     # MAR + DiffLoss on the latents
    python models/mar-tiny/train.py export                 # EMA weights -> the bundle in models/mar-tiny/
    python models/mar-tiny/train.py export --untrained --out DIR   # the untrained baseline
    python models/mar-tiny/train.py slim                   # drop optimizer state before committing

Every stage resumes from its checkpoint in models/mar-tiny/train/ (written atomically every
--save-every steps and at the end), so training can be spread over sessions; losses are
appended to train/<stage>_loss.csv. Settings live in settings.json beside this file.

Data: the Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist); images
are padded from 28x28 to 32x32 and scaled to [-1, 1].

The training objective follows MAR (mar.md §3.6): masked tokens only, mask ratio from a
normal(1.0, 0.25) truncated to [0.7, 1.0], label dropout 0.1 to the learned null embedding,
diffusion_batch_mul 4, t uniform on the 1000-step cosine chain, loss = MSE on ε + the
variational bound term for the learned-range variance (with ε detached), as in
guided-diffusion with learn_sigma. EMA weights are kept for export. One deliberate difference:
the head's ε outputs are v-parameterised inside the graph (VPredictionHead, from MAR step 2750
on), because a head this small cannot learn ε at t = 999 precisely enough for MAR's sampler.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root
sys.path.insert(0, HERE)  # data.py, also when this file is loaded by path (bench_torch.py)

from models.torch import diffusion as D  # noqa: E402
from models.torch import mar as M  # noqa: E402
from data import TRAIN_DIR, fashion_mnist, save_atomic  # noqa: E402

def load_settings() -> dict:
    with open(os.path.join(HERE, "settings.json")) as f:
        return json.load(f)


def vae_config(s: dict) -> M.VAEConfig:
    v = s["vae"]
    return M.VAEConfig(embed_dim=v["embed_dim"], z_channels=v["embed_dim"], ch=v["ch"],
                       ch_mult=tuple(v["ch_mult"]), num_res_blocks=v["num_res_blocks"],
                       out_ch=1, in_channels=1, encoder_attn_resolutions=(), resolution=32)


def mar_config(s: dict) -> M.MARConfig:
    m = s["mar"]
    return M.MARConfig(grid=(16, 16), token_dim=s["vae"]["embed_dim"],
                       encoder_width=m["width"], decoder_width=m["width"],
                       encoder_depth=m["depth"], decoder_depth=m["depth"],
                       encoder_heads=m["heads"], decoder_heads=m["heads"], mlp_ratio=4.0,
                       buffer=m["buffer"], classes=10, diffloss_width=m["diffloss_width"],
                       diffloss_depth=m["diffloss_depth"], learn_sigma=True,
                       label_drop_prob=m["label_drop"])


def log_loss(stage: str, step: int, values: dict) -> None:
    os.makedirs(TRAIN_DIR, exist_ok=True)
    path = os.path.join(TRAIN_DIR, f"{stage}_loss.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["step", *values.keys()])
        w.writerow([step, *(f"{v:.6g}" for v in values.values())])


def ema_update(ema: dict, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(decay).add_(v, alpha=1.0 - decay)
            else:
                ema[k].copy_(v)


# ---- stage 1: the KL autoencoder -----------------------------------------------------------

def train_vae(args, s) -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = vae_config(s)
    vae = M.AutoencoderKL(cfg, with_encoder=True)
    opt = torch.optim.Adam(vae.parameters(), lr=s["vae"]["lr"])
    path = os.path.join(TRAIN_DIR, "vae.pt")
    step = 0
    gen = torch.Generator().manual_seed(s["seed"])
    if os.path.exists(path):
        ck = torch.load(path, weights_only=False)
        vae.load_state_dict(ck["model"])
        if "opt" in ck:  # committed checkpoints are slimmed to the weights
            opt.load_state_dict(ck["opt"])
        step, gen = ck["step"], ck["gen"]
        print(f"resuming the VAE at step {step}")
    x_all, _ = fashion_mnist("train")
    bs, kl_w = s["vae"]["batch"], s["vae"]["kl_weight"]
    start = time.time()
    while step < args.steps:
        idx = torch.randint(0, len(x_all), (bs,), generator=gen)
        x = x_all[idx]
        mean, logvar = vae.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
        rec = vae.decode(z)
        rec_loss = F.mse_loss(rec, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = rec_loss + kl_w * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            log_loss("vae", step, {"loss": loss.item(), "mse": rec_loss.item(), "kl": kl.item()})
            print(f"vae step {step}: mse {rec_loss.item():.4f} kl {kl.item():.3f} "
                  f"({(time.time() - start) / 50:.3f} s/step)", flush=True)
            start = time.time()
        if step % args.save_every == 0 or step == args.steps:
            save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                         "gen": gen, "config": cfg.to_dict()}, path)


def load_vae(s) -> M.AutoencoderKL:
    vae = M.AutoencoderKL(vae_config(s), with_encoder=True)
    ck = torch.load(os.path.join(TRAIN_DIR, "vae.pt"), weights_only=False)
    vae.load_state_dict(ck["model"])
    return vae.eval()


def compute_scale(args, s) -> None:
    """latent_scale = 1 / std of posterior samples, as MAR's 0.2325 normalises KL-16's latents."""
    vae = load_vae(s)
    x, _ = fashion_mnist("train")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        mean, logvar = vae.encode(x[:4096])
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
    scale = 1.0 / z.std().item()
    out = {"latent_scale": scale, "latent_std": z.std().item(), "samples": 4096}
    with open(os.path.join(TRAIN_DIR, "latent_scale.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(out)


# ---- stage 2: MAR + DiffLoss -----------------------------------------------------------------

def approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class VPredictionHead(torch.nn.Module):
    """mar-tiny's diffusion role: MAR's SimpleMLPAdaLN whose first C outputs m are read as the
    v-prediction (Salimans & Ho 2022) and turned into ε inside the graph:

        ε = sqrt(ᾱ_t)·m + sqrt(1 − ᾱ_t)·x_t,   v passes through unchanged.

    The I/O contract (x, t, z -> ε then v) and the sampler's math are MAR's; only what the net's
    raw outputs mean differs. Why: the first step of every respaced chain (T >= 2) is t = 999,
    where ᾱ = 2.4e-9 and the sampler's x0 = 20291·(x − ε) enters the next mean with weight
    ≈ 0.031 (T = 50), so an ε error e moves the token by ≈ 630·e. Trained with plain ε output for
    2750 steps, the head's ε MSE at t = 999 was 0.0095 and sampled tokens blew up to std ~2500
    (class accuracy 20%); substituting the exact ε = x_t at t = 999 alone gave 85%. Up-weighting
    t = 999 got its MSE only to ~1e-4 in 200 steps, far from the ~1e-6 needed. With this form an
    error e in m moves ε by sqrt(ᾱ)·e, 5e-5·e at t = 999, while near t = 0 it is the plain
    ε-prediction. (The test fixture torch-small uses a similar device; official MAR heads are
    exported unchanged.)"""

    def __init__(self, net: torch.nn.Module, train_steps: int = 1000):
        super().__init__()
        self.net = net
        acp = D.train_alphas_cumprod(train_steps)
        self.register_buffer("sqrt_abar", acp.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_abar", (1.0 - acp).sqrt().float(), persistent=False)

    def forward(self, x, t, z):
        o = self.net(x, t, z)
        c = x.shape[-1]
        eps = self.sqrt_abar[t][:, None] * o[:, :c] + self.sqrt_one_minus_abar[t][:, None] * x
        return torch.cat([eps, o[:, c:]], dim=-1)


def diffusion_role(mar: M.MAR) -> torch.nn.Module:
    """What the bundle's diffusion graph computes for mar-tiny (see VPredictionHead)."""
    return VPredictionHead(mar.diffusion_head)


def diffusion_loss(head, target, z, gen, acp, train_steps=1000):
    """MSE on ε plus the VLB term for the learned-range variance (guided-diffusion, learn_sigma;
    mar.md §3.6). head: the diffusion role (ε then v). target [N, C] clean tokens, z [N, D]
    conditions. Returns (loss, ε MSE, VB term)."""
    n = target.shape[0]
    t = torch.randint(0, train_steps, (n,), generator=gen)
    noise = torch.randn(target.shape, generator=gen)
    a = acp[t][:, None].float()
    x_t = a.sqrt() * target + (1 - a).sqrt() * noise
    out = head(x_t, t, z)
    c = target.shape[1]
    eps, v = out[:, :c], out[:, c:]
    mse = (eps - noise).pow(2).mean(dim=1)

    # Training-chain posterior tables (float64 → float32 at the gathered rows).
    betas = 1.0 - acp / torch.cat([torch.ones(1, dtype=acp.dtype), acp[:-1]])
    acp_prev = torch.cat([torch.ones(1, dtype=acp.dtype), acp[:-1]])
    post_var = betas * (1 - acp_prev) / (1 - acp)
    plvc = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    coef1 = betas * acp_prev.sqrt() / (1 - acp)
    coef2 = (1 - acp_prev) * (1 - betas).sqrt() / (1 - acp)
    g = lambda tab: tab[t][:, None].float()  # noqa: E731
    x0_pred = g(1.0 / acp).sqrt() * x_t - g(1.0 / acp - 1.0).sqrt() * eps.detach()
    mean_p = g(coef1) * x0_pred + g(coef2) * x_t
    frac = (v + 1) / 2
    logvar_p = frac * g(torch.log(betas)) + (1 - frac) * g(plvc)
    mean_q = g(coef1) * target + g(coef2) * x_t
    logvar_q = g(plvc)
    kl = 0.5 * (-1.0 + logvar_p - logvar_q + torch.exp(logvar_q - logvar_p)
                + (mean_q - mean_p).pow(2) * torch.exp(-logvar_p))
    kl = kl.mean(dim=1) / math.log(2.0)
    # t = 0: discretised Gaussian decoder likelihood, as guided-diffusion does.
    centered = target - mean_p
    inv = torch.exp(-0.5 * logvar_p)
    cdf_plus = approx_std_normal_cdf(inv * (centered + 1.0 / 255))
    cdf_min = approx_std_normal_cdf(inv * (centered - 1.0 / 255))
    log_probs = torch.where(
        target < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),
        torch.where(target > 0.999, torch.log((1 - cdf_min).clamp(min=1e-12)),
                    torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    nll = -log_probs.mean(dim=1) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    return (mse + vb).mean(), mse.mean().item(), vb.mean().item()


def init_mar(mar: M.MAR) -> None:
    """MAR's initialisation of the learned embeddings (normal, std 0.02)."""
    for name, p in mar.named_parameters():
        if name.endswith(("pos_embed_learned", "mask_token", "fake_latent")) or "class_emb" in name:
            torch.nn.init.normal_(p, std=0.02)


def train_mar(args, s) -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    scale = json.load(open(os.path.join(TRAIN_DIR, "latent_scale.json")))["latent_scale"]
    cfg = mar_config(s)
    m = s["mar"]
    mar = M.MAR(cfg)
    init_mar(mar)
    opt = torch.optim.AdamW(mar.parameters(), lr=m["lr"], weight_decay=m["weight_decay"],
                            betas=(0.9, 0.95))
    ema = {k: v.detach().clone() for k, v in mar.state_dict().items()}
    path = os.path.join(TRAIN_DIR, "mar.pt")
    step = 0
    gen = torch.Generator().manual_seed(s["seed"] + 1)
    if os.path.exists(path):
        ck = torch.load(path, weights_only=False)
        mar.load_state_dict(ck["model"])
        if "opt" in ck:  # committed checkpoints are slimmed to the weights
            opt.load_state_dict(ck["opt"])
        ema, step, gen = ck["ema"], ck["step"], ck["gen"]
        print(f"resuming MAR at step {step}")
    print(f"MAR: {M.count_parameters(mar) / 1e6:.2f} M parameters, latent scale {scale:.4f}")

    # Posterior moments of every training image, computed once.
    moments_path = os.path.join(TRAIN_DIR, "moments.pt")
    x_all, y_all = fashion_mnist("train")
    if os.path.exists(moments_path):
        mean_all, logvar_all = torch.load(moments_path)
    else:
        vae = load_vae(s)
        with torch.no_grad():
            parts = [vae.encode(x_all[i:i + 1000]) for i in range(0, len(x_all), 1000)]
        mean_all = torch.cat([p[0] for p in parts])
        logvar_all = torch.cat([p[1] for p in parts])
        torch.save((mean_all, logvar_all), moments_path)

    acp = D.train_alphas_cumprod(1000)
    head = diffusion_role(mar)
    bs, L, mul = m["batch"], cfg.seq_len, m["diffusion_batch_mul"]
    start = time.time()
    while step < args.steps:
        idx = torch.randint(0, len(x_all), (bs,), generator=gen)
        mean, logvar = mean_all[idx], logvar_all[idx]
        lat = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)) * scale
        tokens = M.patchify(lat)                                           # [B, L, C]
        labels = y_all[idx]
        # Mask ratio ~ N(1.0, 0.25) truncated to [0.7, 1.0] (MAR's mask_ratio_generator).
        while True:
            r = 1.0 + 0.25 * torch.randn(1, generator=gen).item()
            if 0.7 <= r <= 1.0:
                break
        n_masked = int(math.ceil(L * r))
        order = torch.argsort(torch.rand(bs, L, generator=gen), dim=1)
        known = torch.sort(order[:, n_masked:], dim=1).values
        masked = order[:, :n_masked]
        drop = torch.rand(bs, generator=gen) < m["label_drop"]
        z = mar.decode(mar.encode(tokens, known, labels, drop), known)     # [B, L, D]
        zm = torch.gather(z, 1, masked[:, :, None].expand(-1, -1, z.shape[2])).reshape(-1, z.shape[2])
        tm = torch.gather(tokens, 1, masked[:, :, None].expand(-1, -1, tokens.shape[2])).reshape(-1, tokens.shape[2])
        zm, tm = zm.repeat(mul, 1), tm.repeat(mul, 1)
        loss, mse, vb = diffusion_loss(head, tm, zm, gen, acp)
        lr = m["lr"] * min(1.0, (step + 1) / m["warmup"])
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mar.parameters(), 3.0)
        opt.step()
        ema_update(ema, mar, m["ema"])
        step += 1
        if step % 25 == 0:
            log_loss("mar", step, {"loss": loss.item(), "mse": mse, "vb": vb, "lr": lr})
            print(f"mar step {step}: loss {loss.item():.4f} (mse {mse:.4f}, vb {vb:.4f}) "
                  f"{(time.time() - start) / 25:.3f} s/step", flush=True)
            start = time.time()
        if step % args.save_every == 0 or step == args.steps:
            save_atomic({"model": mar.state_dict(), "ema": ema, "opt": opt.state_dict(),
                         "step": step, "gen": gen, "config": cfg.to_dict()}, path)


def export(args, s) -> None:
    """Writes the bundle (manifest.yaml + four graphs) beside this script from the EMA weights,
    with export_mar.py's contract and parity checks."""
    from models.export_mar import export_bundle

    scale = json.load(open(os.path.join(TRAIN_DIR, "latent_scale.json")))["latent_scale"]
    mar = M.MAR(mar_config(s))
    if args.untrained:  # the baseline for quality numbers: MAR at its initialisation
        init_mar(mar)
        step, name = 0, "mar-tiny-untrained"
    else:
        ck = torch.load(os.path.join(TRAIN_DIR, "mar.pt"), weights_only=False)
        mar.load_state_dict(ck["ema"])
        step, name = ck["step"], "mar-tiny"
    vae = load_vae(s)
    result = export_bundle(mar, vae, args.out, name, cfg_scale=s["sampling"]["cfg"], head=diffusion_role(mar),
                           temperature=s["sampling"]["temperature"], latent_scale=scale)
    print(f"exported MAR step {step}: max parity errors {result['errors']}")
    from classifier import add_evaluator
    if add_evaluator(args.out):
        print("added the Fashion-MNIST evaluator (classifier.py) to the manifest")


def slim(args, s) -> None:
    """Drops the optimizer state from train/*.pt so the checkpoints are small enough to
    commit; training resumes from them with a fresh optimizer."""
    for name in ("vae.pt", "mar.pt"):
        path = os.path.join(TRAIN_DIR, name)
        if os.path.exists(path):
            ck = torch.load(path, weights_only=False)
            ck.pop("opt", None)
            save_atomic(ck, path)
            print(f"{path}: step {ck['step']}, {os.path.getsize(path) / 1e6:.1f} MB")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["vae", "scale", "mar", "export", "slim"])
    p.add_argument("--steps", type=int, default=1000, help="train until this many steps in total")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--out", default=HERE, help="export: the bundle folder (default: beside this script)")
    p.add_argument("--untrained", action="store_true",
                   help="export: the MAR at its initialisation (the quality baseline), with the trained VAE")
    args = p.parse_args(argv)
    s = load_settings()
    torch.manual_seed(s["seed"])
    {"vae": train_vae, "scale": compute_scale, "mar": train_mar, "export": export, "slim": slim}[args.stage](args, s)


if __name__ == "__main__":
    main()

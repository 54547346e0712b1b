"""MAR's sampling loop in the form MAR's own evaluation runs it: batched, on the model's device.

`reference_sampler.py` is written to be checked (float64 update arithmetic, per-token FTS in
Python, host tensors); it cannot run on a GPU and is not what MAR users time. This module is
the PyTorch stand-in for speed comparisons (`benches/gpu.py`): the structure of MAR's
`sample_tokens` + `DiffLoss.sample` + VAE decode (mar.md §2-3), with every tensor on the device
of the modules and nothing copied back to the host until the pixels:

* one backbone pass per MAR step (encoder over the buffer plus the known tokens, decoder over
  every position), with MAR's CFG batch doubling [conditional; unconditional];
* all tokens predicted by a step go through the respaced DDPM chain together: one head call per
  diffusion iteration on [x; x] with [z_cond; z_uncond], ε guided, v from the conditional half,
  learned-range variance, temperature on the per-iteration noise (float32 state; the head's output
  is cast to float32, so under autocast only the networks run in half precision);
* noise drawn on the device with `torch.randn` (or injected, for checking against the reference);
* VAE decode of tokens ÷ latent_scale, then pixels round(clip((x+1)/2)·255) as uint8.

It runs any plan whose steps give every token of a step the same number of diffusion steps
(MAR, Halton, GtR without FTS...); FTS (GtR's frequency-weighted selection) is not part of MAR's
sampler and is refused. Deviations from MAR's code that only make PyTorch faster, never slower:
the chain's coefficients are Python floats (MAR gathers them per row from float64 tables), and the
update runs on the N conditional rows only (MAR updates both halves of the doubled batch and
discards one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .diffusion import chain as get_chain
from .mar import MAR, Attention, AutoencoderKL, unpatchify


@dataclass(frozen=True)
class Step:
    """One MAR step: `tokens` revealed, each through a chain of `diffusion_steps`; `cfg` None (or
    1.0) runs no unconditional pass."""

    tokens: int
    diffusion_steps: int
    cfg: float | None
    temperature: float
    clip_timesteps: int | None = None

    @property
    def guided(self) -> bool:
        return self.cfg is not None and float(self.cfg) != 1.0


def steps_from_plan(plan: dict) -> tuple:
    """(steps, token order) from `gtr-run plan SCHEDULE --json`; refuses FTS steps."""
    steps, order = [], []
    for k, s in enumerate(plan["steps"]):
        if s.get("detail") is not None:
            raise ValueError(f"step {k} uses FTS ({s['detail'].get('selector')}); MAR's sampler has no FTS")
        steps.append(Step(len(s["tokens"]), int(s["diffusion_steps"]), s["cfg"], float(s["temperature"]),
                          s.get("clip_timesteps")))
        order.extend(int(t) for t in s["tokens"])
    return steps, order


class _Coefficients:
    """A respaced chain's per-iteration constants as Python floats (index i = 0 … T−1)."""

    def __init__(self, T: int, train_steps: int, clip: int | None):
        ch = get_chain(T, train_steps, clip)
        self.timesteps = [int(t) for t in ch.timesteps]
        self.sqrt_recip = ch.sqrt_recip_alphas_cumprod.tolist()
        self.sqrt_recipm1 = ch.sqrt_recipm1_alphas_cumprod.tolist()
        self.coef1 = ch.coef1.tolist()
        self.coef2 = ch.coef2.tolist()
        self.log_beta = ch.log_betas.tolist()
        self.log_post = ch.posterior_log_variance_clipped.tolist()


_COEFFS: dict = {}


def _coefficients(T: int, train_steps: int, clip: int | None = None) -> _Coefficients:
    key = (T, train_steps, clip)
    if key not in _COEFFS:
        _COEFFS[key] = _Coefficients(T, train_steps, clip)
    return _COEFFS[key]


def use_fused_attention(module: torch.nn.Module) -> int:
    """Switch every attention block of `module` to `F.scaled_dot_product_attention` (what timm,
    and hence MAR's own code, uses by default); returns how many blocks were switched. The
    explicit matmul + softmax form (the exported graphs' form) is numerically the same."""

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))

    count = 0
    for m in module.modules():
        if isinstance(m, Attention):
            m.forward = forward.__get__(m, Attention)
            count += 1
    return count


def _autocast_safe(mar: MAR) -> None:
    """Under autocast, `MAR.decode` would scatter the half-precision `decoder_embed` output into the
    float32 mask-token canvas, which `torch.scatter` refuses. MAR's code assigns into that canvas
    (casting to float32); a forward hook casting `decoder_embed`'s output to float32 does the same.
    A no-op in float32. Installed once per module."""
    if not getattr(mar, "_fast_sampler_hook", False):
        mar.decoder_embed.register_forward_hook(lambda _m, _i, out: out.float())
        mar._fast_sampler_hook = True


def _chain(head, zc, zu, step: Step, coeffs: _Coefficients, C: int, learned: bool, x, noise_at):
    """Rows x [N, C] through the step's chain; zc/zu [N, D] (zu None = unguided)."""
    N = zc.shape[0]
    guided = zu is not None
    zz = torch.cat([zc, zu]) if guided else zc
    T = len(coeffs.timesteps)  # the step's diffusion steps, fewer where clip_timesteps merges some
    for i in range(T - 1, -1, -1):
        t = torch.full((zz.shape[0],), coeffs.timesteps[i], dtype=torch.int64, device=x.device)
        out = head(torch.cat([x, x]) if guided else x, t, zz).float()
        eps = out[:N, :C]
        if guided:
            eps_u = out[N:, :C]
            eps = eps_u + step.cfg * (eps - eps_u)
        x0 = coeffs.sqrt_recip[i] * x - coeffs.sqrt_recipm1[i] * eps
        mean = coeffs.coef1[i] * x0 + coeffs.coef2[i] * x
        if i == 0:
            x = mean
        else:
            if learned:
                frac = (out[:N, C:2 * C] + 1.0) * 0.5
                log_var = frac * coeffs.log_beta[i] + (1.0 - frac) * coeffs.log_post[i]
                sigma = torch.exp(0.5 * log_var)
            else:
                # MAR without learn_sigma: fixed-large, log σ² = log β'.
                sigma = math.exp(0.5 * coeffs.log_beta[i])
            x = mean + sigma * noise_at(T - 1 - i) * step.temperature
    return x


@torch.no_grad()
def sample(mar: MAR, vae: AutoencoderKL, steps: list, labels: torch.Tensor, orders: torch.Tensor,
           latent_scale: float, generator: torch.Generator | None = None, head=None,
           noise: dict | None = None, counts: dict | None = None, train_steps: int = 1000,
           decode: bool = True, known_before: int = 0) -> dict:
    """Sample len(labels) images. `orders` i64 [B, L] lists each image's tokens in reveal order
    (step s reveals the next steps[s].tokens). Everything lives on labels.device.

    noise: None (drawn with torch.randn from `generator`) or {"init": f32 [B, L, C], "step":
    f32 [B, L, Tmax, C]} in the reference layout (iteration k = T−1−i uses step[b, t, k]).
    counts: optional dict, gets per-image "backbone_passes" and "diffusion_rows" (both CFG halves).
    decode: False stops after the tokens (the steps may then cover only part of the canvas).
    known_before: start as if the first `known_before` tokens of each order were known already
    (their canvas values stay zero): runs the late, long-sequence steps alone, e.g. to warm up.
    Returns {"tokens": f32 [B, L, C], "images": [B, 3, H, W], "pixels": u8 [B, H, W, 3]} (device)."""
    cfg = mar.cfg
    _autocast_safe(mar)
    head = head if head is not None else mar.diffusion_head
    dev = labels.device
    B, L, C, D = labels.shape[0], cfg.seq_len, cfg.token_dim, cfg.decoder_width
    if tuple(orders.shape) != (B, L):
        raise ValueError(f"orders has shape {tuple(orders.shape)}, expected {(B, L)}")
    tokens = torch.zeros(B, L, C, device=dev)
    null = torch.full((B,), cfg.null_class, dtype=torch.int64, device=dev)
    passes, rows = 0, 0
    c = known_before
    for step in steps:
        n = step.tokens
        known = torch.sort(orders[:, :c], dim=1).values
        if step.guided:
            both = torch.cat([known, known])
            z = mar.decode(mar.encode(torch.cat([tokens, tokens]), both, torch.cat([labels, null])), both)
        else:
            z = mar.decode(mar.encode(tokens, known, labels), known)
        pred = orders[:, c:c + n]                                          # [B, n]
        zc = torch.gather(z[:B], 1, pred[:, :, None].expand(-1, -1, D)).reshape(B * n, D)
        zu = (torch.gather(z[B:], 1, pred[:, :, None].expand(-1, -1, D)).reshape(B * n, D)
              if step.guided else None)
        if noise is None:
            x = torch.randn(B * n, C, device=dev, generator=generator)

            def noise_at(k, _n=B * n):
                return torch.randn(_n, C, device=dev, generator=generator)
        else:
            bi = torch.arange(B, device=dev)[:, None].expand(-1, n).reshape(-1)
            ti = pred.reshape(-1)
            x = noise["init"][bi, ti].float()

            def noise_at(k, _bi=bi, _ti=ti):
                return noise["step"][_bi, _ti, k].float()
        coeffs = _coefficients(step.diffusion_steps, train_steps, step.clip_timesteps)
        x = _chain(head, zc, zu, step, coeffs, C, cfg.learn_sigma, x, noise_at)
        tokens = torch.scatter(tokens, 1, pred[:, :, None].expand(-1, -1, C), x.reshape(B, n, C).to(tokens.dtype))
        passes += 2 if step.guided else 1
        rows += n * len(coeffs.timesteps) * (2 if step.guided else 1)
        c += n
    if counts is not None:
        counts["backbone_passes"] = passes
        counts["diffusion_rows"] = rows
    out = {"tokens": tokens}
    if decode:
        out.update(decode_pixels(vae, tokens, latent_scale, cfg.grid))
    return out


@torch.no_grad()
def decode_pixels(vae: AutoencoderKL, tokens: torch.Tensor, latent_scale: float, grid) -> dict:
    """VAE decode of tokens f32 [B, L, C] ÷ latent_scale; {"images": [B, 3, H, W], "pixels": u8
    [B, H, W, 3]} with pixels = round(clip((image + 1)/2, 0, 1)·255), on the tokens' device."""
    latent = unpatchify(tokens / latent_scale, grid).contiguous()
    images = vae.decode(latent)
    pixels = torch.round(torch.clamp((images.float() + 1.0) * 0.5, 0.0, 1.0) * 255.0).to(torch.uint8)
    return {"images": images, "pixels": pixels.permute(0, 2, 3, 1)}

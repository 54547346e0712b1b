"""MAR's Gaussian diffusion in PyTorch float64 (mar.md §3): cosine schedule, respacing,
posterior quantities, learned-range variance, p_sample with temperature.

All tables are float64 tensors, as in the upstream code (numpy float64). The same functions
serve the reference sampler (respaced chains) and a training script (`q_sample`,
`train_alphas_cumprod`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

F64 = torch.float64


def cosine_betas(train_steps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """β_i = min(1 − f((i+1)/T)/f(i/T), 0.999), f(s) = cos²((s + 0.008)/1.008 · π/2)."""

    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1.0 - f((i + 1) / train_steps) / f(i / train_steps), max_beta)
                         for i in range(train_steps)], dtype=F64)


def train_alphas_cumprod(train_steps: int = 1000) -> torch.Tensor:
    """ᾱ_i of the full training chain (float64)."""
    return torch.cumprod(1.0 - cosine_betas(train_steps), dim=0)


def respaced_timesteps(T: int, train_steps: int = 1000, clip: int | None = None) -> list:
    """MAR's `space_timesteps(train_steps, str(T))` for one section: stride (train_steps−1)/(T−1)
    added repeatedly to a float starting at 0.0, each value rounded half to even; T = 1 gives [0].
    With `clip` (DiSA's `clip_timesteps`, a schedule's `clip_timesteps`), every timestep above it
    becomes `clip` and the duplicates merge: the chain may have fewer than T steps."""
    if not 1 <= T <= train_steps:
        raise ValueError(f"{T} diffusion steps: must be within 1..{train_steps}")
    stride = (train_steps - 1) / (T - 1) if T > 1 else 1.0
    cur, steps = 0.0, set()
    for _ in range(T):
        steps.add(round(cur))
        cur += stride
    if len(steps) != T:
        raise ValueError(f"cannot respace {train_steps} steps into {T}")
    if clip is not None:
        steps = {min(t, clip) for t in steps}
    return sorted(steps)


class Chain:
    """The respaced chain of T steps (fewer when `clip` merges timesteps): float64 tensors indexed
    by i = 0 … self.T−1 (i = self.T−1 runs first)."""

    def __init__(self, T: int, train_steps: int = 1000, clip: int | None = None):
        acp_full = train_alphas_cumprod(train_steps)
        self.timesteps = torch.tensor(respaced_timesteps(T, train_steps, clip), dtype=torch.int64)
        self.T = len(self.timesteps)
        acp_tau = acp_full[self.timesteps]
        prev = torch.cat([torch.ones(1, dtype=F64), acp_tau[:-1]])
        self.betas = 1.0 - acp_tau / prev                                   # β'_i
        alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)                   # recomputed from β'
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=F64), self.alphas_cumprod[:-1]])
        acp, acpp = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / acp - 1.0)
        self.posterior_variance = self.betas * (1.0 - acpp) / (1.0 - acp)
        if self.T > 1:
            pv = self.posterior_variance
            self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]]))
        else:
            # T = 1: posterior_variance = [0] and there is no entry 1; the only iteration (i = 0)
            # adds no noise, so this is never read.
            self.posterior_log_variance_clipped = torch.full((1,), float("nan"), dtype=F64)
        self.log_betas = torch.log(self.betas)
        self.coef1 = self.betas * torch.sqrt(acpp) / (1.0 - acp)
        self.coef2 = (1.0 - acpp) * torch.sqrt(alphas) / (1.0 - acp)

    def p_sample(self, i: int, x: torch.Tensor, eps: torch.Tensor, v: torch.Tensor | None,
                 noise: torch.Tensor | None, temperature: float) -> torch.Tensor:
        """One reverse step at respaced index i, all in float64 (x, eps, v, noise are converted):
        x0 = √(1/ᾱ')x − √(1/ᾱ'−1)ε (no clipping); mean = coef1·x0 + coef2·x; for i ≠ 0 add
        exp(½·log σ²)·noise·temperature with log σ² = frac·log β' + (1−frac)·plvc, frac = (v+1)/2
        (learned range; v None = MAR's fixed-large variance, log σ² = log β')."""
        x = x.to(F64)
        eps = eps.to(F64)
        x0 = self.sqrt_recip_alphas_cumprod[i] * x - self.sqrt_recipm1_alphas_cumprod[i] * eps
        mean = self.coef1[i] * x0 + self.coef2[i] * x
        if i == 0:
            return mean
        if v is None:
            log_var = self.log_betas[i].expand_as(mean)
        else:
            frac = (v.to(F64) + 1.0) / 2.0
            log_var = frac * self.log_betas[i] + (1.0 - frac) * self.posterior_log_variance_clipped[i]
        return mean + torch.exp(0.5 * log_var) * noise.to(F64) * temperature


@lru_cache(maxsize=None)
def chain(T: int, train_steps: int = 1000, clip: int | None = None) -> Chain:
    return Chain(T, train_steps, clip)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, train_steps: int = 1000) -> torch.Tensor:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε on the training chain (for training scripts)."""
    acp = train_alphas_cumprod(train_steps).to(x0.device)[t].to(x0.dtype)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return acp.sqrt().reshape(shape) * x0 + (1.0 - acp).sqrt().reshape(shape) * noise

"""PyTorch reference of MAR's sampling loop (mar.md §2-3) on injected orders and noise.

It runs our PyTorch modules (not ONNX graphs), so comparing it with the numpy reference
(models/fixtures/reference_sampler.py, which runs a bundle's graphs in onnxruntime) checks the
export and both samplers at once. Inputs and outputs use the golden layout of
models/fixtures/README.md ("npz layout"); the semantics are MAR's `sample_tokens` +
`DiffLoss.sample` with the conventions written there:

* Token order: `order[b]` lists every token in reveal order; step s reveals
  `order[b, c_s : c_s + step_sizes[s]]` (MAR reveals from the end of its `orders` array;
  a MAR order is this one reversed). Known tokens are passed sorted ascending; unknown
  canvas positions hold zeros.
* CFG (`cfg[s]` not NaN): MAR's batch doubling. The backbone runs once on 2B rows:
  tokens [canvas; canvas], known [known; known], labels [labels; null_class × B]. Each
  diffusion iteration runs the head on [x; x] with [z_cond; z_uncond] and guides ε only:
  ε = ε_u + cfg·(ε_c − ε_u); v comes from the conditional half (mar.md §3.5). One noise draw
  per token (MAR's unconditional half is discarded). The per-step scale is given (a linear
  schedule is computed by the caller: 1 + (cfg−1)(L − masked_after)/L).
* FTS (GtR eq. 5) on the conditional z row in float64 (torch.fft.rfft); count =
  clamp(round_half_even(β·n), 1, n); ties rank the lower token index first.
* Diffusion: each token gets its own respaced cosine chain (diffusion.Chain) of T steps,
  learned-range variance, temperature on the per-step noise; x starts at init_noise[b, t]
  and iteration k = T−1−i uses step_noise[b, t, k]. The update arithmetic is float64 and x
  is rounded to float32 after every iteration (the head always sees float32). Rows of one
  step with the same T run together, one head call per iteration (the same grouping as the
  numpy reference).
* Decode: latent = f32(f64(tokens)/latent_scale), unpatchified; pixels =
  round_half_even(clip((image+1)/2, 0, 1)·255).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .diffusion import chain as get_chain
from .mar import MAR, AutoencoderKL, unpatchify

SELECTOR_NONE, SELECTOR_HIGH, SELECTOR_LOW, SELECTOR_ALL = 0, 1, 2, 3

CASE_INPUTS = (
    "labels", "order", "step_sizes", "diffusion_steps", "detail_fraction", "detail_steps",
    "detail_selector", "cfg", "temperature", "init_noise", "step_noise",
)


class TorchModel:
    """The four contract roles as PyTorch modules (float32, eval mode, no grad).

    head: the diffusion role (default: the MAR's own SimpleMLPAdaLN)."""

    def __init__(self, mar: MAR, vae: AutoencoderKL, head: nn.Module | None = None,
                 latent_scale: float = 0.2325, train_steps: int = 1000):
        self.mar = mar.eval()
        self.vae = vae.eval()
        self.head = (head if head is not None else mar.diffusion_head).eval()
        cfg = mar.cfg
        self.grid = tuple(cfg.grid)
        self.L, self.C, self.D = cfg.seq_len, cfg.token_dim, cfg.decoder_width
        self.null_class = cfg.null_class
        self.latent_scale = float(latent_scale)
        self.train_steps = train_steps

    @torch.no_grad()
    def backbone(self, tokens, known, labels):
        return self.mar.decode(self.mar.encode(tokens, known, labels), known)

    @torch.no_grad()
    def diffusion(self, x, t, z):
        return self.head(x, t, z)

    @torch.no_grad()
    def vae_decode(self, latent):
        return self.vae.decode(latent)


def fts_score(z_row: torch.Tensor) -> float:
    """s = Σ_{n=1}^{⌊D/2⌋} |rfft(z)[n]|·(1 + n/⌊D/2⌋) in float64 (GtR eq. 5)."""
    z = z_row.to(torch.float64)
    half = z.shape[-1] // 2
    amp = torch.fft.rfft(z).abs()[1:half + 1]
    n = torch.arange(1, half + 1, dtype=torch.float64)
    return float((amp * (1.0 + n / half)).sum())


def detail_tokens(tokens: list, scores: dict, selector: int, beta: float) -> set:
    """Which of this step's tokens (of one image) get the detail step count."""
    n = len(tokens)
    if selector == SELECTOR_NONE or n == 0:
        return set()
    if selector == SELECTOR_ALL:
        return set(tokens)
    count = min(max(round(beta * n), 1), n)       # Python round: half to even
    if selector == SELECTOR_HIGH:
        ranked = sorted(tokens, key=lambda t: (-scores[t], t))
    elif selector == SELECTOR_LOW:
        ranked = sorted(tokens, key=lambda t: (scores[t], t))
    else:
        raise ValueError(f"unknown FTS selector {selector}")
    return set(ranked[:count])


def diffuse(model: TorchModel, x: torch.Tensor, zc: torch.Tensor, zu: torch.Tensor | None, T: int,
            cfg: float, temperature: float, noise: torch.Tensor, trace: list | None = None) -> torch.Tensor:
    """M tokens through the T-step chain together (DiffLoss.sample with injected noise).

    x f32 [M, C], zc/zu f32 [M, D] (zu None = unguided), noise f32 [M, ≥T−1, C]."""
    ch = get_chain(T, model.train_steps)
    M, C = x.shape
    guided = zu is not None
    zz = torch.cat([zc, zu]) if guided else zc
    x = x.to(torch.float32).clone()
    for i in range(T - 1, -1, -1):
        k = T - 1 - i
        t = torch.full((2 * M if guided else M,), int(ch.timesteps[i]), dtype=torch.int64)
        out = model.diffusion(torch.cat([x, x]) if guided else x, t, zz)
        eps_c, v = out[:M, :C].to(torch.float64), out[:M, C:2 * C].to(torch.float64)
        if guided:
            eps_u = out[M:, :C].to(torch.float64)
            eps = eps_u + cfg * (eps_c - eps_u)
        else:
            eps = eps_c
        if trace is not None:
            trace.append(out)
        x = ch.p_sample(i, x, eps, v, noise[:, k] if i != 0 else None, temperature).to(torch.float32)
    return x


# -- MAR's own schedule (mar.md §2.2) as per-step arrays of the golden layout --------

def mar_step_sizes(L: int, num_iter: int) -> list:
    """Tokens revealed per step by MAR's cosine mask schedule: mask_len =
    floor(L·cos(π/2·(step+1)/num_iter)) clamped to [1, masked − 1]; the last step takes the rest."""
    masked, sizes = L, []
    for step in range(num_iter):
        if step == num_iter - 1:
            sizes.append(masked)
            break
        mask_len = max(1, min(masked - 1, math.floor(L * math.cos(math.pi / 2.0 * (step + 1) / num_iter))))
        sizes.append(masked - mask_len)
        masked = mask_len
    return sizes


def mar_cfg_per_step(cfg: float, sizes: list, L: int, schedule: str = "linear") -> list:
    """MAR's guidance scale per step: linear = 1 + (cfg − 1)(L − mask_len)/L with mask_len the
    (clamped, ≥ 1) number still masked after the step; constant = cfg. cfg == 1 means MAR runs
    no unconditional pass at all: NaN in the golden layout."""
    if cfg == 1.0:
        return [float("nan")] * len(sizes)
    out, revealed = [], 0
    for n in sizes:
        revealed += n
        mask_len = max(L - revealed, 1)
        out.append(1.0 + (cfg - 1.0) * (L - mask_len) / L if schedule == "linear" else float(cfg))
    return out


def mar_case(labels, mar_orders, num_iter: int, cfg: float, init_noise, step_noise,
             cfg_schedule: str = "linear", temperature: float = 1.0, diffusion_steps: int = 100) -> dict:
    """A case in the golden layout for MAR's `sample_tokens(num_iter, cfg, cfg_schedule, labels,
    temperature)` with `num_sampling_steps` = diffusion_steps. `mar_orders` [B, L] are in MAR's
    layout (`sample_orders`: tokens are revealed from the end), so the golden order is reversed."""
    orders = np.asarray(mar_orders, dtype=np.int64)
    L = orders.shape[1]
    sizes = mar_step_sizes(L, num_iter)
    S = len(sizes)
    return {
        "labels": np.asarray(labels, dtype=np.int64),
        "order": np.ascontiguousarray(orders[:, ::-1]),
        "step_sizes": np.asarray(sizes, dtype=np.int64),
        "diffusion_steps": np.full(S, diffusion_steps, dtype=np.int64),
        "detail_fraction": np.zeros(S), "detail_steps": np.zeros(S, dtype=np.int64),
        "detail_selector": np.zeros(S, dtype=np.int64),
        "cfg": np.asarray(mar_cfg_per_step(cfg, sizes, L, cfg_schedule), dtype=np.float64),
        "temperature": np.full(S, float(temperature)),
        "init_noise": np.asarray(init_noise, dtype=np.float32),
        "step_noise": np.asarray(step_noise, dtype=np.float32),
    }


def _to_torch(a, dtype=None):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(dtype) if dtype is not None else t


def sample(model: TorchModel, case: dict, trace: list | None = None) -> dict:
    """Run one golden case (numpy arrays in, numpy arrays out; keys of models/fixtures/README.md).

    trace: optional list, gets per step {"z", "head_out": [tensors]} for range reports."""
    labels = _to_torch(case["labels"], torch.int64)
    order = _to_torch(case["order"], torch.int64)
    init_noise = _to_torch(case["init_noise"], torch.float32)
    step_noise = _to_torch(case["step_noise"], torch.float32)
    B, L, C = labels.shape[0], model.L, model.C
    if tuple(order.shape) != (B, L):
        raise ValueError(f"order has shape {tuple(order.shape)}, expected {(B, L)}")
    if int(np.sum(case["step_sizes"])) != L:
        raise ValueError("step_sizes do not sum to the number of tokens")
    canvas = torch.zeros(B, L, C, dtype=torch.float32)
    detail_mask = np.zeros((B, L), dtype=bool)
    token_steps = np.zeros((B, L), dtype=np.int64)
    fts_scores = np.full((B, L), np.nan, dtype=np.float64)
    after = []
    z_step0 = None
    c = 0
    for s, n in enumerate(case["step_sizes"]):
        n = int(n)
        known = torch.sort(order[:, :c], dim=1).values.reshape(B, c)
        cfg = float(case["cfg"][s])
        guided = not math.isnan(cfg)
        if guided:   # MAR's CFG batch doubling: [cond; uncond]
            z = model.backbone(torch.cat([canvas, canvas]), torch.cat([known, known]),
                               torch.cat([labels, torch.full((B,), model.null_class, dtype=torch.int64)]))
        else:
            z = model.backbone(canvas, known, labels)
        if s == 0:
            z_step0 = z.numpy().copy()
        pred = order[:, c:c + n]
        selector = int(case["detail_selector"][s])
        rows = []   # (b, token, T) in image order, then reveal order
        for b in range(B):
            toks = [int(t) for t in pred[b]]
            scores = {}
            if selector in (SELECTOR_HIGH, SELECTOR_LOW):
                for t in toks:
                    scores[t] = fts_score(z[b, t])
                    fts_scores[b, t] = scores[t]
            chosen = detail_tokens(toks, scores, selector, float(case["detail_fraction"][s]))
            for t in toks:
                T = int(case["detail_steps"][s]) if t in chosen else int(case["diffusion_steps"][s])
                detail_mask[b, t] = t in chosen
                token_steps[b, t] = T
                rows.append((b, t, T))
        head_out = [] if trace is not None else None
        new = canvas.clone()   # every token of the step is sampled from this step's z
        for T in sorted({r[2] for r in rows}):
            grp = [r for r in rows if r[2] == T]
            bi = torch.tensor([r[0] for r in grp])
            ti = torch.tensor([r[1] for r in grp])
            x = diffuse(model, init_noise[bi, ti], z[bi, ti], z[B + bi, ti] if guided else None, T, cfg,
                        float(case["temperature"][s]), step_noise[bi, ti], head_out)
            new[bi, ti] = x
        canvas = new
        if trace is not None:
            trace.append({"step": s, "z": z, "head_out": head_out, "guided": guided})
        after.append(canvas.numpy().copy())
        c += n
    latent = (canvas.to(torch.float64) / model.latent_scale).to(torch.float32)
    images = model.vae_decode(unpatchify(latent, model.grid).contiguous())
    pixels = torch.round(torch.clamp((images.to(torch.float64) + 1.0) / 2.0, 0.0, 1.0) * 255.0)
    pixels = pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return {
        "tokens": canvas.numpy(),
        "images": images.numpy(),
        "pixels": pixels.numpy(),
        "detail_mask": detail_mask,
        "token_steps": token_steps,
        "fts_scores": fts_scores,
        "canvas_after_step": np.stack(after),
        "z_step0": z_step0,
    }

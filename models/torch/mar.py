"""PyTorch definitions of MAR and of the KL-16 VAE, written from the MAR paper (Li et al., 2024,
"Autoregressive Image Generation without Vector Quantization").

Everything here follows its MAR backbone and SimpleMLPAdaLN diffusion head and its KL-16 VAE
(the latent-diffusion autoencoder it uses); module and parameter names reproduce the official state-dict keys exactly,
so an official checkpoint loads with `load_state_dict(strict=True)`:

* MAR: `class_emb.weight`, `fake_latent`, `z_proj`, `z_proj_ln`, `encoder_pos_embed_learned`,
  `encoder_blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `encoder_norm`,
  `decoder_embed`, `mask_token`, `decoder_pos_embed_learned`, `decoder_blocks.{i}.…`,
  `decoder_norm`, `diffusion_pos_embed_learned`, `diffloss.net.…` (SimpleMLPAdaLN).
* VAE: `post_quant_conv`, `decoder.{conv_in, mid.block_1, mid.attn_1, mid.block_2,
  up.{lvl}.block.{k}, up.{lvl}.upsample.conv, norm_out, conv_out}`; optionally the encoder side
  (`encoder.…`, `quant_conv`) for training a small VAE.

Sizes are configurable (`MARConfig`, `VAEConfig`); `mar_base`, `mar_large`, `mar_huge` and
`kl16` give the official shapes (mar.md §1.1, §4).

Sampling-time forward passes are split into the four roles of the gtr-run bundle contract
(models/README.md): `MAR.encode(tokens, known_index, class_label)`, `MAR.decode(encoded,
known_index)`, `MAR.diffusion_head(x, t, z)` (= `MAR.diffloss.net`) and
`AutoencoderKL.decode(latent)`. Attention is the explicit matmul + softmax form (timm's
non-fused path), GELU is the exact erf GELU, every LayerNorm has eps 1e-6, every GroupNorm
has 32 groups and eps 1e-6.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6
GN_EPS = 1e-6
GN_GROUPS = 32


# -- configuration ---------------------------------------------------------------------

@dataclass(frozen=True)
class MARConfig:
    """Shape of a MAR model. Defaults are MAR-B (mar.md §1.1)."""

    grid: tuple = (16, 16)          # token grid h x w (img_size / vae_stride)
    token_dim: int = 16             # C = vae_embed_dim * patch_size**2
    encoder_width: int = 768        # encoder_embed_dim
    decoder_width: int = 768        # decoder_embed_dim (= width of z)
    encoder_depth: int = 12
    decoder_depth: int = 12
    encoder_heads: int = 12
    decoder_heads: int = 12
    mlp_ratio: float = 4.0
    buffer: int = 64                # class-embedding buffer slots
    classes: int = 1000             # class_num; null_class = classes (fake_latent)
    diffloss_width: int = 1024      # W
    diffloss_depth: int = 6         # number of res blocks
    learn_sigma: bool = True        # head outputs 2C (eps, v) instead of C
    # training only (inactive in eval mode; MAR trains with 0.1 / 0.1 / 0.1)
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    label_drop_prob: float = 0.0

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def null_class(self) -> int:
        return self.classes

    @property
    def head_channels(self) -> int:
        return 2 * self.token_dim if self.learn_sigma else self.token_dim

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d


MAR_SIZES = {
    "mar_base": dict(encoder_width=768, decoder_width=768, encoder_depth=12, decoder_depth=12,
                     encoder_heads=12, decoder_heads=12, diffloss_width=1024, diffloss_depth=6),
    "mar_large": dict(encoder_width=1024, decoder_width=1024, encoder_depth=16, decoder_depth=16,
                      encoder_heads=16, decoder_heads=16, diffloss_width=1280, diffloss_depth=8),
    "mar_huge": dict(encoder_width=1280, decoder_width=1280, encoder_depth=20, decoder_depth=20,
                     encoder_heads=16, decoder_heads=16, diffloss_width=1536, diffloss_depth=12),
}


def mar_config(size: str, **overrides) -> MARConfig:
    """The config of an official size (`mar_base`, `mar_large`, `mar_huge`), with overrides."""
    if size not in MAR_SIZES:
        raise ValueError(f"unknown MAR size {size!r}; known: {', '.join(MAR_SIZES)}")
    return replace(MARConfig(**MAR_SIZES[size]), **overrides)


def mar_base(**overrides) -> "MAR":
    return MAR(mar_config("mar_base", **overrides))


def mar_large(**overrides) -> "MAR":
    return MAR(mar_config("mar_large", **overrides))


def mar_huge(**overrides) -> "MAR":
    return MAR(mar_config("mar_huge", **overrides))


@dataclass(frozen=True)
class VAEConfig:
    """Shape of an LDM-style KL autoencoder. Defaults are MAR's KL-16 (mar.md §4)."""

    embed_dim: int = 16             # latent channels (= MAR token_dim)
    z_channels: int = 16
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2         # decoder levels hold num_res_blocks + 1 blocks
    out_ch: int = 3
    in_channels: int = 3
    encoder_attn_resolutions: tuple = (16,)   # encoder only; the decoder has no up-level attention
    resolution: int = 256           # image side the encoder was built for (encoder attention placement)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def image_size(self, grid) -> tuple:
        return (grid[0] * self.downsample, grid[1] * self.downsample)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["encoder_attn_resolutions"] = list(self.encoder_attn_resolutions)
        return d


def kl16_config(**overrides) -> VAEConfig:
    return replace(VAEConfig(), **overrides)


# -- transformer block (timm 0.9.12 Block, pre-norm; mar.md §1.3) ---------------------

class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # rows of qkv: q (all heads), k, v; head-major inside each
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        y = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(y))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# -- diffusion MLP (SimpleMLPAdaLN; mar.md §1.6) ----------------------------------------

class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the (original-scale) timestep, cos then sin, then an MLP."""

    def __init__(self, width: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        half = freq_dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)  # not a state-dict key

    def embedding(self, t: torch.Tensor) -> torch.Tensor:
        args = t[:, None].to(torch.float32) * self.freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.freq_dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embedding(t))


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        h = self.in_ln(x) * (1 + scale) + shift
        return x + gate * self.mlp(h)


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class SimpleMLPAdaLN(nn.Module):
    """(x [N, C], t [N] int, c [N, D]) -> [N, 2C] (eps then v) or [N, C]."""

    def __init__(self, in_channels: int, width: int, out_channels: int, cond_width: int, depth: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_width, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for blk in self.res_blocks:
            h = blk(h, y)
        return self.final_layer(h, y)


class DiffLoss(nn.Module):
    """Holds the head as `.net` so the keys read `diffloss.net.…` (the diffusion process itself
    lives in `diffusion.py`; the training loss belongs to the training script)."""

    def __init__(self, cfg: MARConfig):
        super().__init__()
        self.net = SimpleMLPAdaLN(cfg.token_dim, cfg.diffloss_width, cfg.head_channels,
                                  cfg.decoder_width, cfg.diffloss_depth)


# -- MAR backbone (mar.md §1.4-1.5) ---------------------------------------------------

class MAR(nn.Module):
    def __init__(self, cfg: MARConfig):
        super().__init__()
        self.cfg = cfg
        C, P, L = cfg.token_dim, cfg.buffer, cfg.seq_len
        De, Dd = cfg.encoder_width, cfg.decoder_width
        self.class_emb = nn.Embedding(cfg.classes, De)
        self.fake_latent = nn.Parameter(torch.zeros(1, De))
        self.z_proj = nn.Linear(C, De)
        self.z_proj_ln = nn.LayerNorm(De, eps=LN_EPS)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, P + L, De))
        self.encoder_blocks = nn.ModuleList([
            Block(De, cfg.encoder_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout)
            for _ in range(cfg.encoder_depth)])
        self.encoder_norm = nn.LayerNorm(De, eps=LN_EPS)
        self.decoder_embed = nn.Linear(De, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, P + L, Dd))
        self.decoder_blocks = nn.ModuleList([
            Block(Dd, cfg.decoder_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout)
            for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(Dd, eps=LN_EPS)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, Dd))
        self.diffloss = DiffLoss(cfg)

    @property
    def diffusion_head(self) -> SimpleMLPAdaLN:
        return self.diffloss.net

    # ---- class conditioning
    def class_embedding(self, class_label: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """[B] labels -> [B, D]: class_emb[label] for 0 <= label < classes, fake_latent where
        label == null_class (= classes) or where `drop` is true (training-time label dropout).
        The class table has no extra row; any other label fails in the table lookup."""
        cfg = self.cfg
        b = class_label.shape[0]
        fake = self.fake_latent.expand(b, -1)
        if cfg.classes == 0:
            return fake
        null = class_label == cfg.null_class
        if drop is not None:
            null = null | drop
        emb = self.class_emb(torch.where(null, torch.zeros_like(class_label), class_label))
        return torch.where(null[:, None], fake, emb)

    def _keep_index(self, known_index: torch.Tensor) -> torch.Tensor:
        """[B, K] known token indices -> [B, P + K] sequence rows kept by the encoder
        (the P buffer slots, then the known tokens shifted by P)."""
        P = self.cfg.buffer
        b = known_index.shape[0]
        buf = torch.arange(P, dtype=known_index.dtype, device=known_index.device)[None].expand(b, P)
        return torch.cat([buf, known_index + P], dim=1)

    # ---- contract role: encoder
    def encode(self, tokens: torch.Tensor, known_index: torch.Tensor, class_label: torch.Tensor,
               label_drop: torch.Tensor | None = None) -> torch.Tensor:
        """tokens f32 [B, L, C] (unknown positions are never read), known_index i64 [B, K]
        (ascending, same K in every row, K may be 0), class_label i64 [B] -> [B, P + K, De]."""
        cfg = self.cfg
        P = cfg.buffer
        b = tokens.shape[0]
        De = cfg.encoder_width
        x = self.z_proj(tokens)                                            # [B, L, De]
        buf = self.class_embedding(class_label, label_drop)[:, None, :].expand(b, P, De)
        x = torch.cat([buf, x], dim=1) + self.encoder_pos_embed_learned    # [B, P + L, De]
        x = self.z_proj_ln(x)
        keep = self._keep_index(known_index)                               # [B, P + K]
        x = torch.gather(x, 1, keep[:, :, None].expand(-1, -1, De))
        for blk in self.encoder_blocks:
            x = blk(x)
        return self.encoder_norm(x)

    # ---- contract role: decoder
    def decode(self, encoded: torch.Tensor, known_index: torch.Tensor) -> torch.Tensor:
        """encoded [B, P + K, De], known_index [B, K] -> z [B, L, Dd]."""
        cfg = self.cfg
        P, L, Dd = cfg.buffer, cfg.seq_len, cfg.decoder_width
        y = self.decoder_embed(encoded)                                    # [B, P + K, Dd]
        b = y.shape[0]
        keep = self._keep_index(known_index)
        x = self.mask_token.expand(b, P + L, Dd)
        x = torch.scatter(x, 1, keep[:, :, None].expand(-1, -1, Dd), y)   # mask tokens elsewhere
        x = x + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return x[:, P:] + self.diffusion_pos_embed_learned

    def forward(self, tokens, known_index, class_label):
        """Backbone: encoder then decoder -> z [B, L, Dd]."""
        return self.decode(self.encode(tokens, known_index, class_label), known_index)


# -- KL VAE (mar.md §4) -----------------------------------------------------------------

def _norm(ch: int) -> nn.GroupNorm:
    if ch % GN_GROUPS:
        raise ValueError(f"GroupNorm({GN_GROUPS}) needs a channel count divisible by {GN_GROUPS}, not {ch}")
    return nn.GroupNorm(GN_GROUPS, ch, eps=GN_EPS, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout 0
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 convs (keys norm, q, k, v, proj_out)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q = self.q(hn).reshape(b, c, h * w).transpose(1, 2)        # [b, hw, c]
        k = self.k(hn).reshape(b, c, h * w)                        # [b, c, hw]
        v = self.v(hn).reshape(b, c, h * w)                        # [b, c, hw]
        attn = torch.softmax((q @ k) * (c ** -0.5), dim=-1)        # [b, hw_q, hw_k]
        y = (v @ attn.transpose(1, 2)).reshape(b, c, h, w)         # [b, c, hw_q]
        return x + self.proj_out(y)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    """3x3 stride-2 conv after padding one row/column at the bottom/right."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Level(nn.Module):
    """One resolution level: `block.{k}` (+ `upsample`/`downsample`)."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch)
        self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class VAEDecoder(nn.Module):
    """conv_in -> mid -> up levels n-1 .. 0 (num_res_blocks + 1 blocks each, upsample above 0)
    -> norm_out -> swish -> conv_out. `up[i]` is resolution level i (up[n-1] runs first)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = tuple(cfg.ch_mult)
        ch_in = cfg.ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch_in, 3, padding=1)
        self.mid = _Mid(ch_in)
        levels = [None] * len(mult)
        for lvl in reversed(range(len(mult))):
            level = _Level()
            ch_out = cfg.ch * mult[lvl]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(ch_in, ch_out))
                ch_in = ch_out
            if lvl != 0:
                level.upsample = Upsample(ch_in)
            levels[lvl] = level
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for lvl in reversed(range(len(self.up))):
            level = self.up[lvl]
            for blk in level.block:
                h = blk(h)
            if lvl != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAEEncoder(nn.Module):
    """conv_in -> down levels 0 .. n-1 (num_res_blocks blocks, attention at the configured
    resolutions, downsample below the last) -> mid -> norm_out -> swish -> conv_out (2 z)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = (1,) + tuple(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        res = cfg.resolution
        self.down = nn.ModuleList()
        ch_in = cfg.ch
        for lvl in range(len(cfg.ch_mult)):
            level = _Level()
            ch_out = cfg.ch * mult[lvl + 1]
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(ch_in, ch_out))
                ch_in = ch_out
                if res in cfg.encoder_attn_resolutions:
                    level.attn.append(AttnBlock(ch_in))
            if lvl != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(ch_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(ch_in)
        self.norm_out = _norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for lvl, level in enumerate(self.down):
            for k, blk in enumerate(level.block):
                h = blk(h)
                if len(level.attn):
                    h = level.attn[k](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The KL VAE. `with_encoder=False` builds only what sampling needs (`post_quant_conv`,
    `decoder.*`); the encoder side (`encoder.*`, `quant_conv`) is for training."""

    def __init__(self, cfg: VAEConfig = VAEConfig(), with_encoder: bool = False):
        super().__init__()
        self.cfg = cfg
        if with_encoder:
            self.encoder = VAEEncoder(cfg)
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = VAEDecoder(cfg)

    def encode(self, image: torch.Tensor):
        """image [B, 3, H, W] in [-1, 1] -> (mean, logvar) [B, embed_dim, h, w] (logvar clamped
        to [-30, 20]); a training latent is (mean + exp(logvar/2)·N(0,1)) · latent_scale."""
        moments = self.quant_conv(self.encoder(image))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, embed_dim, h, w] (tokens / latent_scale) -> image [B, out_ch, H, W]."""
        return self.decoder(self.post_quant_conv(latent))


def vae_decoder_keys(state_dict) -> tuple:
    """Split a VAE state dict into (decoder-side keys, other keys)."""
    dec = [k for k in state_dict if k.startswith("post_quant_conv.") or k.startswith("decoder.")]
    other = [k for k in state_dict if k not in set(dec)]
    return dec, other


# -- helpers ----------------------------------------------------------------------------

def patchify(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> tokens [B, h*w, C] (token index = row * w + col; patch_size 1)."""
    b, c, h, w = latent.shape
    return latent.permute(0, 2, 3, 1).reshape(b, h * w, c)


def unpatchify(tokens: torch.Tensor, grid) -> torch.Tensor:
    """tokens [B, h*w, C] -> [B, C, h, w]."""
    b, _, c = tokens.shape
    return tokens.reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

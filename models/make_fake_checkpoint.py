#!/usr/bin/env python3
"""Write random-weight checkpoints in the layout of the official MAR release.

MAR checkpoint (`checkpoint-last.pth`): a dict with `model` and `model_ema` (plain state dicts
with the keys of mar.md §1.2; `model` differs from `model_ema` so that picking the wrong one is
detectable), `args` (an argparse.Namespace with the fields of MAR's main_mar.py), `epoch`.
VAE (`kl16.ckpt`): a dict with `model` = the full KL VAE state dict, encoder side included
(`encoder.*`, `quant_conv.*`), which the exporter must report and ignore.

Official sizes (`--size mar_base|mar_large|mar_huge`) get MAR's exact shapes and the KL-16 VAE.
`--size custom` takes every shape from flags; the extra shape fields are stored in `args` under
MAR's constructor names (`encoder_embed_dim`, `encoder_depth`, `encoder_num_heads`, …) plus
`vae_ch`, `vae_ch_mult`, `vae_num_res_blocks`, so `export_mar.py --size custom` can read them
back; `img_size` / `vae_stride` are set consistently with the VAE (stride = 2^(levels-1)).

Weights are random normal, scaled so that every activation stays O(1) with no
saturation (fan-in scaling, LayerNorm/GroupNorm gains near 1, small output layers), and
deterministic for a given --seed. Sampling with a random diffusion head still drives the tokens
to ~1e5 (its error in ε is multiplied by up to 1/sqrt(ᾱ)); `--denoising-head` sets the head's
weights so that it predicts ε ≈ x_t and the tokens stay near 1, as a trained model's do
(`make_denoising_head`; the benchmark uses it so that half-precision runs stay finite).

  python models/make_fake_checkpoint.py --size mar_base --out /tmp/mar_b/checkpoint-last.pth --vae-out /tmp/mar_b/kl16.ckpt
  python models/make_fake_checkpoint.py --size custom --width 64 --depth 2 --heads 4 \\
      --diffloss-w 128 --diffloss-d 2 --vae-ch 32 --vae-ch-mult 1,1,2,2,4 --out small.pth --vae-out small_vae.ckpt
"""

from __future__ import annotations

import argparse
import math
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# models/torch would shadow PyTorch if this script's folder stayed on sys.path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import torch  # noqa: E402

from models.torch.mar import (  # noqa: E402
    MAR, MAR_SIZES, AutoencoderKL, MARConfig, VAEConfig, count_parameters, kl16_config, mar_config,
)

def _gain(name: str) -> float:
    """Extra scale of a weight matrix, by key (keeps outputs moderate with random weights)."""
    if name.startswith("diffloss.net.final_layer.linear"):
        return 0.2          # v (learned-range channel) stays within about ±1
    if "adaLN_modulation" in name:
        return 0.3          # scale/shift/gate of the adaLN blocks stay well below 1
    if name.endswith("decoder.conv_out.weight"):
        return 0.4          # VAE image within about [-1, 1]
    return 1.0


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> dict:
    """A random state dict for `module` (keys in sorted order, one generator stream)."""
    gen = torch.Generator().manual_seed(seed)
    sd = module.state_dict()
    out = {}
    for name in sorted(sd):
        shape = sd[name].shape

        def normal(std, shape=shape):
            return torch.randn(shape, generator=gen, dtype=torch.float32) * std

        leaf = name.rsplit(".", 1)[-1]
        if name in ("class_emb.weight", "fake_latent", "mask_token"):
            t = normal(1.0)
        elif name.endswith("pos_embed_learned"):
            t = normal(0.5)
        elif leaf == "bias":
            t = normal(0.1)
        elif len(shape) == 1:                       # LayerNorm / GroupNorm weight
            t = 1.0 + normal(0.1)
        elif len(shape) >= 2:                       # Linear [out, in] / Conv [out, in, kh, kw]
            fan_in = math.prod(shape[1:])
            t = normal(_gain(name) / math.sqrt(fan_in))
        else:
            raise ValueError(f"no rule for {name} {tuple(shape)}")
        out[name] = t.contiguous()
    return out


# --denoising-head: the offset that carries the head's input through its norms, and the scale
# left on the adaLN modulations (their gates, shifts and scales stay this close to 0).
DENOISING_OFFSET = 100.0
DENOISING_MODULATION = 1e-6


@torch.no_grad()
def make_denoising_head(sd: dict, token_dim: int, prefix: str = "diffloss.net.") -> None:
    """Turns the random diffusion head in `sd` into one that predicts ε ≈ x_t (and v = 0).

    With random weights, MAR's sampler turns the head's error in ε into tokens of ~1e5 (the
    ε-to-x0 step divides by sqrt(ᾱ), down to 5e-5), and `tokens / 0.2325` overflows float16
    (65504) at the VAE's input, so no half-precision run would end in finite images. A head that
    predicts ε = x_t makes every x0 estimate a shrunken x_t instead, and the tokens stay at a
    trained model's scale (about 1). Only values change: the kernels multiply every weight
    matrix in full whatever it holds, so the speed is the same (README, "GPU benchmark"):

    - input_proj: h = [x, -x, 0, ...] + K·u, u = ±1 alternating on the other channels (sum 0), so
      that h's mean is 0 and its norm is dominated by K: LayerNorm divides x by a near constant;
    - res blocks and the final layer: adaLN modulations scaled by DENOISING_MODULATION (gates,
      shifts and scales ≈ 0: the blocks leave h as it is), their biases 0;
    - final linear: ε = x·(1 − O(|x|²/K²)) from the first C channels, v = 0.
    """
    C, K = token_dim, DENOISING_OFFSET
    weight = sd[prefix + "input_proj.weight"]
    width = weight.shape[0]
    if width < 2 * C + 2:
        raise SystemExit(f"--denoising-head needs a head width of at least {2 * C + 2} (got {width})")
    proj = torch.zeros_like(weight)
    proj[:C] = torch.eye(C)
    proj[C:2 * C] = -torch.eye(C)
    free = width - 2 * C - (width - 2 * C) % 2           # an even count of ±1 channels
    offset = torch.zeros(width)
    offset[2 * C:2 * C + free] = K * torch.tensor([1.0, -1.0]).repeat(free // 2)
    sd[prefix + "input_proj.weight"], sd[prefix + "input_proj.bias"] = proj, offset
    for name in [n for n in sd if n.startswith(prefix) and ".adaLN_modulation." in n]:
        sd[name] = sd[name] * DENOISING_MODULATION if name.endswith("weight") else torch.zeros_like(sd[name])
    # LayerNorm's denominator for h: sqrt(mean(h²)) = sqrt((2|x|² + K²·free) / width) ≈ K·sqrt(free / width)
    linear = torch.zeros_like(sd[prefix + "final_layer.linear.weight"])
    linear[:C, :C] = K * math.sqrt(free / width) * torch.eye(C)
    sd[prefix + "final_layer.linear.weight"] = linear
    sd[prefix + "final_layer.linear.bias"] = torch.zeros_like(sd[prefix + "final_layer.linear.bias"])


def official_args(size: str, cfg: MARConfig, vcfg: VAEConfig, seed: int) -> argparse.Namespace:
    """An argparse.Namespace with the fields MAR's main_mar.py saves (values for this shape)."""
    stride = vcfg.downsample
    ns = argparse.Namespace(
        batch_size=64, epochs=400, model=size, img_size=cfg.grid[0] * stride,
        vae_path="pretrained_models/vae/kl16.ckpt", vae_embed_dim=vcfg.embed_dim, vae_stride=stride,
        patch_size=1, num_iter=64, num_images=50000, cfg=1.0, cfg_schedule="linear",
        label_drop_prob=0.1, eval_freq=40, save_last_freq=5, online_eval=False, evaluate=False,
        eval_bsz=64, weight_decay=0.02, grad_checkpointing=False, lr=None, blr=1e-4, min_lr=0.0,
        lr_schedule="constant", warmup_epochs=100, ema_rate=0.9999, mask_ratio_min=0.7,
        grad_clip=3.0, attn_dropout=0.1, proj_dropout=0.1, buffer_size=cfg.buffer,
        diffloss_d=cfg.diffloss_depth, diffloss_w=cfg.diffloss_width, num_sampling_steps="100",
        diffusion_batch_mul=4, temperature=1.0, data_path="./data/imagenet", class_num=cfg.classes,
        output_dir="./output_dir", log_dir="./output_dir", device="cuda", seed=seed, resume="",
        start_epoch=0, num_workers=5, pin_mem=True, world_size=1, local_rank=-1,
        dist_on_itp=False, dist_url="env://", use_cached=False, cached_path="",
    )
    if size == "custom":
        # not in MAR's args: the shape of a custom model, under MAR's constructor names
        ns.encoder_embed_dim = cfg.encoder_width
        ns.decoder_embed_dim = cfg.decoder_width
        ns.encoder_depth = cfg.encoder_depth
        ns.decoder_depth = cfg.decoder_depth
        ns.encoder_num_heads = cfg.encoder_heads
        ns.decoder_num_heads = cfg.decoder_heads
        ns.mlp_ratio = cfg.mlp_ratio
        ns.vae_ch = vcfg.ch
        ns.vae_ch_mult = list(vcfg.ch_mult)
        ns.vae_num_res_blocks = vcfg.num_res_blocks
    return ns


def build_configs(a) -> tuple:
    """(MARConfig, VAEConfig) from parsed flags."""
    if a.size in MAR_SIZES:
        cfg = mar_config(a.size)
        vcfg = kl16_config()
    else:
        mult = a.vae_ch_mult
        mult = tuple(int(x) for x in mult.split(",")) if isinstance(mult, str) else tuple(mult)
        vcfg = VAEConfig(embed_dim=a.token_dim, z_channels=a.token_dim, ch=a.vae_ch, ch_mult=mult,
                         num_res_blocks=a.vae_res_blocks, resolution=a.grid * 2 ** (len(mult) - 1))
        cfg = MARConfig(grid=(a.grid, a.grid), token_dim=a.token_dim, encoder_width=a.width,
                        decoder_width=a.width, encoder_depth=a.depth, decoder_depth=a.depth,
                        encoder_heads=a.heads, decoder_heads=a.heads, mlp_ratio=a.mlp_ratio,
                        buffer=a.buffer, classes=a.classes, diffloss_width=a.diffloss_w,
                        diffloss_depth=a.diffloss_d)
    return cfg, vcfg


def make(size: str, cfg: MARConfig, vcfg: VAEConfig, seed: int = 0, with_model: bool = True,
         denoising_head: bool = False):
    """(MAR checkpoint dict, VAE checkpoint dict) with random weights (the diffusion head made a
    denoiser by make_denoising_head if asked)."""
    mar = MAR(cfg)
    ema = randomize(mar, seed)
    if denoising_head:
        make_denoising_head(ema, cfg.token_dim)
    ckpt = {"model_ema": ema, "args": official_args(size, cfg, vcfg, seed), "epoch": 399}
    if with_model:
        # the non-EMA weights: a different draw, so exporting `model` by mistake is visible
        ckpt["model"] = randomize(mar, seed + 1000)
    vae = AutoencoderKL(vcfg, with_encoder=True)
    vae_ckpt = {"model": randomize(vae, seed + 2000)}
    return ckpt, vae_ckpt, count_parameters(mar), count_parameters(vae)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`error: ...`, exit status 2), as the model
    tools' other refusals are, instead of the usage text and the error."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def integer(least: int):
    """An argparse type: an integer of at least `least`."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < least:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer of at least {least}")
        return v
    parse.__name__ = "integer"
    return parse


def number(least: float, positive: bool = False, allow_inf: bool = False):
    """An argparse type: a number of at least `least` (above it with `positive`), never NaN, and
    finite unless `allow_inf`."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        finite = allow_inf or math.isfinite(v)
        if not (finite and (v > least if positive else v >= least)):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {'finite ' if not allow_inf else ''}number "
                f"{'above' if positive else 'of at least'} {least:g}")
        return v
    parse.__name__ = "number"
    return parse


def channel_mult(text: str) -> tuple:
    """An argparse type: channel multipliers, positive integers separated by commas (`1,1,2,2,4`)."""
    try:
        mult = tuple(int(x) for x in text.split(","))
    except ValueError:
        mult = ()
    if not mult or any(m < 1 for m in mult):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of positive integers separated by commas "
                                         "(e.g. 1,1,2,2,4)")
    return mult


def shape_problem(width: int | None, heads: int | None, vae_ch: int | None, ch_mult, encoder: bool = False,
                  names=("--width", "--heads", "--vae-ch", "--vae-ch-mult")) -> str | None:
    """Why these shape values cannot make a model (`names`: how the message calls them), or None:
    the attention heads must divide the width, and every GroupNorm of the VAE (32 groups) needs
    a channel count divisible by 32: `vae_ch` times each multiplier (and `vae_ch` itself, the
    encoder's first level, with `encoder`). A pair with a value None is not checked."""
    from models.torch.mar import GN_GROUPS

    if width is not None and heads is not None and width % heads:
        return f"{names[1]} {heads} does not divide {names[0]} {width} (each head takes width / heads channels)"
    if vae_ch is None or ch_mult is None:
        return None
    for m in ((1,) if encoder else ()) + tuple(ch_mult):
        if (vae_ch * m) % GN_GROUPS:
            return (f"{names[2]} {vae_ch} with {names[3]} {','.join(map(str, ch_mult))}: a VAE level of "
                    f"{vae_ch * m} channels, which GroupNorm({GN_GROUPS}) cannot split (every level's channels, "
                    f"{names[2]} times each multiplier{f' and {names[2]} itself' if encoder else ''}, must be a "
                    f"multiple of {GN_GROUPS})")
    return None


def output_file_problem(path: str) -> str | None:
    """Why a file cannot be written at `path` (empty, a folder, a parent that is not a folder or
    cannot be written), or None. Missing parent folders are made."""
    if not path:
        return "is empty; give a file path"
    if os.path.isdir(path):
        return "is a folder; give a file path"
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} cannot be written"
    return None


CUSTOM_DEFAULTS = dict(width=64, depth=2, heads=4, mlp_ratio=4.0, diffloss_w=128, diffloss_d=2, classes=1000,
                       buffer=64, grid=16, token_dim=16, vae_ch=128, vae_ch_mult=(1, 1, 2, 2, 4), vae_res_blocks=2)


def main(argv=None) -> int:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", required=True, choices=list(MAR_SIZES) + ["custom"])
    ap.add_argument("--out", required=True, help="MAR checkpoint path (e.g. checkpoint-last.pth)")
    ap.add_argument("--vae-out", help="VAE checkpoint path (e.g. kl16.ckpt); omitted = no VAE file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-model", action="store_true", help="write model_ema only (halves the file)")
    ap.add_argument("--denoising-head", action="store_true",
                    help="a diffusion head that predicts eps = x_t, so that sampling keeps tokens near a trained "
                         "model's scale (random heads drive them to ~1e5, past float16); for speed benchmarks "
                         "in half precision")
    d = CUSTOM_DEFAULTS
    g = ap.add_argument_group("custom size (only with --size custom; the official sizes have their own shapes)")
    g.add_argument("--width", type=integer(1), help=f"default {d['width']}")
    g.add_argument("--depth", type=integer(0), help=f"default {d['depth']}")
    g.add_argument("--heads", type=integer(1), help=f"attention heads, dividing --width (default {d['heads']})")
    g.add_argument("--mlp-ratio", type=number(0, positive=True), help=f"default {d['mlp_ratio']}")
    g.add_argument("--diffloss-w", type=integer(1), help=f"default {d['diffloss_w']}")
    g.add_argument("--diffloss-d", type=integer(0), help=f"default {d['diffloss_d']}")
    g.add_argument("--classes", type=integer(0), help=f"default {d['classes']}")
    g.add_argument("--buffer", type=integer(0), help=f"default {d['buffer']}")
    g.add_argument("--grid", type=integer(1), help=f"token grid side (default {d['grid']})")
    g.add_argument("--token-dim", type=integer(1), help=f"default {d['token_dim']}")
    g.add_argument("--vae-ch", type=integer(1),
                   help=f"times each multiplier a multiple of 32 (GroupNorm), itself too (default {d['vae_ch']})")
    g.add_argument("--vae-ch-mult", type=channel_mult, help="default 1,1,2,2,4")
    g.add_argument("--vae-res-blocks", type=integer(0), help=f"default {d['vae_res_blocks']}")
    a = ap.parse_args(argv)

    given = [k for k in CUSTOM_DEFAULTS if getattr(a, k) is not None]
    if a.size != "custom":
        if given:
            ap.error(f"--{given[0].replace('_', '-')} is only for --size custom ({a.size} has its own shape)")
    else:
        for k, v in CUSTOM_DEFAULTS.items():
            if getattr(a, k) is None:
                setattr(a, k, v)
        why = shape_problem(a.width, a.heads, a.vae_ch, a.vae_ch_mult, encoder=True)
        if why:
            ap.error(why)
    if a.denoising_head:
        width = a.diffloss_w if a.size == "custom" else MAR_SIZES[a.size]["diffloss_width"]
        token_dim = a.token_dim if a.size == "custom" else 16
        if width < 2 * token_dim + 2:
            ap.error(f"--denoising-head needs a diffusion head width (--diffloss-w) of at least "
                     f"{2 * token_dim + 2}, not {width}")
    for flag, path in (("--out", a.out), ("--vae-out", a.vae_out)):
        why = output_file_problem(path) if path is not None else None
        if why:
            ap.error(f"{flag} {path!r} {why}" if why.startswith("is ") else f"{flag} {path}: {why}")
    if a.vae_out is not None and os.path.abspath(a.vae_out) == os.path.abspath(a.out):
        ap.error(f"--vae-out {a.vae_out} is the same file as --out")

    cfg, vcfg = build_configs(a)
    ckpt, vae_ckpt, n_mar, n_vae = make(a.size, cfg, vcfg, a.seed, with_model=not a.no_model,
                                        denoising_head=a.denoising_head)
    try:
        save(ckpt, a.out)
        print(f"{a.out}: MAR {a.size}, {n_mar / 1e6:.2f} M parameters, keys {sorted(ckpt)}, "
              f"{os.path.getsize(a.out) / 1e6:.1f} MB")
        if a.vae_out:
            save(vae_ckpt, a.vae_out)
            n_enc = sum(1 for k in vae_ckpt["model"] if not k.startswith(("decoder.", "post_quant_conv.")))
            print(f"{a.vae_out}: KL VAE ch {vcfg.ch} ch_mult {list(vcfg.ch_mult)} res blocks {vcfg.num_res_blocks}, "
                  f"{n_vae / 1e6:.2f} M parameters ({n_enc} encoder-side keys), "
                  f"{os.path.getsize(a.vae_out) / 1e6:.1f} MB")
    except OSError as e:
        print(f"error: {e.filename or a.out}: cannot be written ({type(e).__name__}: {e.strerror or e})",
              file=sys.stderr)
        return 2
    return 0


def save(obj, path: str) -> None:
    """torch.save to `path` through a temporary file beside it, renamed into place (an
    interrupted or failed write leaves no partial checkpoint); makes missing folders."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

if __name__ == "__main__":
    sys.exit(main())

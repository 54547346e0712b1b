#!/usr/bin/env python3
"""Export an official MAR checkpoint and its KL-16 VAE to a gtr-run model bundle.

  python models/export_mar.py --checkpoint checkpoint-last.pth --vae kl16.ckpt \\
      --size mar_base|mar_large|mar_huge|custom --out DIR [--cfg 2.9] [--name NAME]

1. Loads the MAR checkpoint (`torch.load(..., weights_only=False)`, weights under `model_ema`,
   or `--weights model`) and the VAE (state dict under `model`; only `post_quant_conv.*` and
   `decoder.*` are used, every other key is reported and ignored) STRICTLY: the key set and
   every shape must be exactly those of our definitions (models/torch/mar.py); otherwise the
   export stops with the missing, unexpected and mis-shaped keys listed.
2. Exports the four graphs of the bundle contract (models/README.md) with torch.onnx (the
   torch.export-based exporter, opset 18): encoder (tokens, known_index, class_label ->
   encoded), decoder (encoded, known_index -> z), diffusion (x, t, z -> out), vae_decoder
   (latent -> image); batch, K and N dynamic. A graph whose weights exceed 2 GB is written
   with its weights in `<graph>.onnx.data` beside it (ONNX external data).
3. Checks each graph's inputs/outputs against the contract, then runs every graph in
   onnxruntime and in PyTorch on random inputs (several batch sizes, K = 0, K > 0 and K = L,
   null and real labels, t including 0 and 999) and prints the max abs error per graph;
   fails above 1e-3 (`--tolerance`).
4. Writes manifest.yaml (format gtr-run/mar-bundle@1; the name as a double-quoted YAML string).
   The whole bundle is built and checked aside and committed at once (models/onnx_save.py); the
   commit removes the graphs the old manifest of --out listed and the new one does not (another
   tool's variants made from the old weights).

Exit status 0; 1 when a check fails (one line, --out as it was, the folders the run made for it
removed); 2, one line, nothing written, for a bad argument (checked before anything is loaded:
input files, --out, custom shapes, --name, --cfg and --temperature from 0 to 3.4e38), a checkpoint
that does not match, or a bundle another tool holds; 130 / 143 when interrupted by SIGINT /
SIGTERM (one line; the staging folder and the folders the run made are removed, an existing
bundle is left as it was).

`--size custom` reads the shape from the checkpoint's `args` (fields written by
make_fake_checkpoint.py: encoder_embed_dim, encoder_depth, encoder_num_heads, …, vae_ch,
vae_ch_mult, vae_num_res_blocks) or from flags (--width, --depth, --heads, …), flags winning.

The graphs compute exactly MAR's forward passes: no reparametrisation of the head, no
clipping, float32 throughout.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
import unicodedata

_HERE = os.path.dirname(os.path.abspath(__file__))
# models/torch would shadow PyTorch if this script's folder stayed on sys.path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from models.make_fake_checkpoint import (  # noqa: E402
    OneLineParser, channel_mult, integer, number, shape_problem,
)
from models.onnx_save import (  # noqa: E402
    EXTERNAL_DATA_BYTES, BundleError, CheckFailed, Staging, interrupted_commit, one_line,
    write_manifest,
)
from models.torch.mar import (  # noqa: E402
    MAR, MAR_SIZES, AutoencoderKL, MARConfig, VAEConfig, count_parameters, kl16_config, mar_config,
    vae_decoder_keys,
)

logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"

FORMAT = "gtr-run/mar-bundle@1"
LATENT_SCALE = 0.2325
DEFAULT_CFG = {"mar_base": 2.9, "mar_large": 3.0, "mar_huge": 3.2}  # mar.md §2.6 (linear schedule)
OPSET = 18
GRAPH_FILES = {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "diffusion": "diffusion.onnx",
               "vae_decoder": "vae_decoder.onnx"}
# role -> (input tensor names in role order, output tensor name); the roles' keys are fixed by gtr-run
GRAPH_IO = {
    "encoder": ({"tokens": "tokens", "known": "known_index", "label": "class_label"}, {"encoded": "encoded"}),
    "decoder": ({"encoded": "encoded", "known": "known_index"}, {"z": "z"}),
    "diffusion": ({"x": "x", "t": "t", "z": "z"}, {"out": "out"}),
    "vae_decoder": ({"latent": "latent"}, {"image": "image"}),
}


class CheckpointError(Exception):
    """A checkpoint does not match the model definition (message lists what differs)."""


class ExportCheckFailed(Exception):
    """An exported graph failed its check (contract, parity with PyTorch, a derived graph against
    its reference); the message names the graph and by how much."""


# -- loading -----------------------------------------------------------------------------

def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _natural(key: str):
    """Sort key that puts block 2 before block 10."""
    import re
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _listing(keys, sd=None, limit=40) -> str:
    keys = sorted(keys, key=_natural)
    lines = [f"    {k} {_shape(sd[k])}" if sd is not None else f"    {k}" for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"    … and {len(keys) - limit} more")
    return "\n".join(lines)


def strict_load(module: nn.Module, sd: dict, what: str) -> None:
    """Load `sd` into `module` only if key sets and shapes are identical; otherwise raise
    CheckpointError naming every missing, unexpected and mis-shaped key."""
    want = module.state_dict()
    missing = set(want) - set(sd)
    unexpected = set(sd) - set(want)
    mism = [(k, sd[k], want[k]) for k in sorted(set(want) & set(sd), key=_natural)
            if tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or mism:
        parts = [f"{what} does not match the model: {len(missing)} missing, {len(unexpected)} unexpected, "
                 f"{len(mism)} mis-shaped key(s)"]
        if missing:
            parts.append("  missing from the checkpoint (expected shape):\n" + _listing(missing, want))
        if unexpected:
            parts.append("  unexpected in the checkpoint:\n" + _listing(unexpected, sd))
        if mism:
            parts.append("  shape mismatch (checkpoint vs model):\n" + "\n".join(
                f"    {k}: checkpoint {_shape(a)}, model {_shape(b)}" for k, a, b in mism[:40])
                + (f"\n    … and {len(mism) - 40} more" if len(mism) > 40 else ""))
        if unexpected and all(k.startswith("module.") for k in sd):
            parts.append("  hint: every key starts with `module.` (a DistributedDataParallel wrapper)")
        raise CheckpointError("\n".join(parts))
    for k, v in sd.items():
        if not torch.is_floating_point(v):
            raise CheckpointError(f"{what}: {k} has dtype {v.dtype}, expected a floating-point tensor")
    module.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)


def input_file_problem(path: str) -> str | None:
    """Why `path` cannot be a checkpoint file to read (missing, a folder, empty, unreadable), or None."""
    if not path:
        return "is empty; give a checkpoint file"
    if not os.path.exists(path):
        return "does not exist"
    if not os.path.isfile(path):
        return "is not a file"
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    if os.path.getsize(path) == 0:
        return "is empty (0 bytes)"
    return None


def load_file(path: str, flag: str):
    """torch.load of `path` (weights_only=False: the official checkpoints hold an argparse
    Namespace); CheckpointError naming `flag` and the file when it is not a file torch can read
    (missing, a folder, empty, truncated, text, another format)."""
    why = input_file_problem(path)
    if why:
        raise CheckpointError(f"{flag} {path!r} {why}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, zip RuntimeError, OSError, ...
        raise CheckpointError(f"{flag} {path}: not a checkpoint torch.load can read "
                              f"({type(e).__name__}: {one_line(e)[:200]})") from e


def load_mar_checkpoint(path: str, weights: str = "model_ema", flag: str = "--checkpoint"):
    """(state dict, args Namespace or None) from an official MAR checkpoint file."""
    obj = load_file(path, flag)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict with `{weights}`, found {type(obj).__name__}")
    if weights not in obj:
        raise CheckpointError(f"{path}: no `{weights}` entry (entries: {', '.join(map(str, obj))})")
    sd = obj[weights]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"{path}: `{weights}` is not a state dict of tensors")
    return sd, obj.get("args")


def load_vae_checkpoint(path: str, flag: str = "--vae"):
    """(decoder-side state dict, {ignored top-level prefix: count}) from a KL VAE checkpoint."""
    obj = load_file(path, flag)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        sd = obj["model"]
    else:
        raise CheckpointError(f"{path}: expected a dict with the VAE state dict under `model` "
                              f"(entries: {', '.join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__})")
    dec, other = vae_decoder_keys(sd)
    ignored = {}
    for k in other:
        head = k.split(".", 1)[0]
        ignored[head] = ignored.get(head, 0) + 1
    return {k: sd[k] for k in dec}, ignored


# -- configuration -------------------------------------------------------------------------

def _get(args, name, default=None):
    return getattr(args, name, default) if args is not None else default


def _integer(v, least: int, label: str) -> int:
    """`v` (a flag's or the checkpoint's args' value) as an integer of at least `least`, else
    CheckpointError naming `label` (where it came from)."""
    try:
        n = None if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()) else int(v)
    except (TypeError, ValueError, OverflowError):
        n = None
    if n is None or n < least:
        raise CheckpointError(f"{label} is {v!r}, not an integer of at least {least}")
    return n


def resolve_configs(size: str, args, flags) -> tuple:
    """(MARConfig, VAEConfig, notes). Official sizes take the transformer shape from mar.md §1.1
    and the shared constants from the checkpoint's args where present (else MAR's defaults);
    `custom` takes everything from flags, then args. A value that cannot make a model (a count
    below its least, heads that do not divide the width, VAE channels GroupNorm cannot split) is
    a CheckpointError naming the flag or the checkpoint's args field it came from."""
    notes = []
    where = {}   # key -> the flag or args field its value came from (for messages)

    def pick(flag, arg, default, key=None):
        key = key or flag
        v = getattr(flags, flag, None) if flags is not None else None
        if v is not None:
            where[key] = "--" + flag.replace("_", "-")
            return v
        v = _get(args, arg) if arg is not None else None
        if v is not None:
            where[key] = f"the checkpoint's args.{arg}"
            return v
        where[key] = f"the default {key}"
        return default

    def count(key, v, least):
        return _integer(v, least, where[key])

    ckpt_model = _get(args, "model")
    if size in MAR_SIZES and ckpt_model is not None and ckpt_model != size:
        raise CheckpointError(f"--size {size}, but the checkpoint's args say model={ckpt_model!r}")
    patch = _get(args, "patch_size", 1)
    if patch != 1:
        raise CheckpointError(f"patch_size {patch}: gtr-run bundles need one token per latent position (patch_size 1)")
    token_dim = count("token_dim", pick("token_dim", "vae_embed_dim", 16), 1)
    classes = count("classes", pick("classes", "class_num", 1000), 0)
    buffer = count("buffer", pick("buffer", "buffer_size", 64), 0)
    if size in MAR_SIZES:
        base = MAR_SIZES[size]
        diff_w = count("diffloss_w", pick("diffloss_w", "diffloss_w", base["diffloss_width"]), 1)
        diff_d = count("diffloss_d", pick("diffloss_d", "diffloss_d", base["diffloss_depth"]), 0)
        vcfg = kl16_config(embed_dim=token_dim, z_channels=token_dim)
        where["img"], where["stride"] = "the checkpoint's args.img_size", "the checkpoint's args.vae_stride"
        img = count("img", _get(args, "img_size", 256), 1)
        stride = count("stride", _get(args, "vae_stride", 16), 1)
        if stride != vcfg.downsample:
            raise CheckpointError(f"vae_stride {stride} in the checkpoint's args, but the KL-16 VAE downsamples "
                                  f"by {vcfg.downsample}")
        if img < stride:
            raise CheckpointError(f"img_size {img} in the checkpoint's args is below vae_stride {stride}")
        cfg = mar_config(size, grid=(img // stride, img // stride), token_dim=token_dim, classes=classes,
                         buffer=buffer, diffloss_width=diff_w, diffloss_depth=diff_d)
    elif size == "custom":
        width = pick("width", "encoder_embed_dim", None)
        depth = pick("depth", "encoder_depth", None)
        heads = pick("heads", "encoder_num_heads", None)
        diff_w = pick("diffloss_w", "diffloss_w", None)
        diff_d = pick("diffloss_d", "diffloss_d", None)
        need = {"--width": width, "--depth": depth, "--heads": heads, "--diffloss-w": diff_w,
                "--diffloss-d": diff_d}
        if any(v is None for v in need.values()):
            raise CheckpointError("--size custom: the checkpoint's args do not give "
                                  + ", ".join(k for k, v in need.items() if v is None) + "; pass them as flags")
        width, heads = count("width", width, 1), count("heads", heads, 1)
        depth, diff_w, diff_d = count("depth", depth, 0), count("diffloss_w", diff_w, 1), count("diffloss_d", diff_d, 0)
        dec_width = count("dec_width", pick("width", "decoder_embed_dim", width, key="dec_width"), 1)
        dec_depth = count("dec_depth", pick("depth", "decoder_depth", depth, key="dec_depth"), 0)
        dec_heads = count("dec_heads", pick("heads", "decoder_num_heads", heads, key="dec_heads"), 1)
        mlp_ratio = pick("mlp_ratio", "mlp_ratio", 4.0)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not 0 < mlp_ratio < math.inf:
            raise CheckpointError(f"{where['mlp_ratio']} is {mlp_ratio!r}, not a positive number")
        mult = pick("vae_ch_mult", "vae_ch_mult", (1, 1, 2, 2, 4))
        try:
            mult = channel_mult(mult) if isinstance(mult, str) else channel_mult(",".join(str(int(m)) for m in mult))
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise CheckpointError(f"{where['vae_ch_mult']} is {mult!r}, not a list of positive integers") from None
        vae_ch = count("vae_ch", pick("vae_ch", "vae_ch", 128), 1)
        res_blocks = count("vae_res_blocks", pick("vae_res_blocks", "vae_num_res_blocks", 2), 0)
        for w, h, ww, wh in ((width, heads, "width", "heads"), (dec_width, dec_heads, "dec_width", "dec_heads")):
            why = shape_problem(w, h, vae_ch, mult, names=(where[ww], where[wh], where["vae_ch"], where["vae_ch_mult"]))
            if why:
                raise CheckpointError(why)
        vcfg = VAEConfig(embed_dim=token_dim, z_channels=token_dim, ch=vae_ch, ch_mult=mult,
                         num_res_blocks=res_blocks)
        grid = pick("grid", None, None)
        if grid is None:
            img = _get(args, "img_size")
            stride = _get(args, "vae_stride")
            where["grid"] = "the checkpoint's args.img_size / vae_stride"
            grid = img // stride if isinstance(img, int) and isinstance(stride, int) and img and stride else 16
            if stride and stride != vcfg.downsample:
                raise CheckpointError(f"vae_stride {stride} in the checkpoint's args, but a VAE with ch_mult "
                                      f"{list(vcfg.ch_mult)} upsamples by {vcfg.downsample}")
        grid = count("grid", grid, 1)
        cfg = MARConfig(grid=(grid, grid), token_dim=token_dim,
                        encoder_width=width, decoder_width=dec_width,
                        encoder_depth=depth, decoder_depth=dec_depth,
                        encoder_heads=heads, decoder_heads=dec_heads,
                        mlp_ratio=float(mlp_ratio), buffer=buffer, classes=classes,
                        diffloss_width=diff_w, diffloss_depth=diff_d)
    else:
        raise CheckpointError(f"unknown size {size!r}")
    return cfg, vcfg, notes


# -- export ----------------------------------------------------------------------------

class EncoderRole(nn.Module):
    def __init__(self, mar: MAR):
        super().__init__()
        self.mar = mar

    def forward(self, tokens, known_index, class_label):
        return self.mar.encode(tokens, known_index, class_label)


class DecoderRole(nn.Module):
    def __init__(self, mar: MAR):
        super().__init__()
        self.mar = mar

    def forward(self, encoded, known_index):
        return self.mar.decode(encoded, known_index)


class DiffusionRole(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x, t, z):
        return self.head(x, t, z)


class VaeRole(nn.Module):
    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent)


def role_modules(mar: MAR, vae: AutoencoderKL, head: nn.Module | None = None) -> dict:
    """The four contract roles as modules (head defaults to MAR's own diffusion MLP)."""
    return {"encoder": EncoderRole(mar).eval(), "decoder": DecoderRole(mar).eval(),
            "diffusion": DiffusionRole(head if head is not None else mar.diffusion_head).eval(),
            "vae_decoder": VaeRole(vae).eval()}


def example_inputs(cfg: MARConfig, role: str, gen: torch.Generator):
    """Inputs used to trace a role (B = 2, K = 3, N = 5: sizes above 1 so no axis is specialised)."""
    L, C, P = cfg.seq_len, cfg.token_dim, cfg.buffer
    if role == "encoder":
        known = torch.stack([torch.sort(torch.randperm(L, generator=gen)[:3]).values for _ in range(2)])
        return (torch.randn(2, L, C, generator=gen), known, torch.tensor([1 % max(cfg.classes, 1), cfg.null_class]))
    if role == "decoder":
        known = torch.stack([torch.sort(torch.randperm(L, generator=gen)[:3]).values for _ in range(2)])
        return (torch.randn(2, P + 3, cfg.decoder_width, generator=gen), known)
    if role == "diffusion":
        return (torch.randn(5, C, generator=gen), torch.tensor([0, 10, 500, 998, 999]),
                torch.randn(5, cfg.decoder_width, generator=gen))
    return (torch.randn(2, C, cfg.grid[0], cfg.grid[1], generator=gen),)


def dynamic_shapes(cfg: MARConfig, role: str):
    from torch.export import Dim

    batch = Dim("batch", min=1)
    K = Dim("K", min=0, max=cfg.seq_len)
    N = Dim("N", min=1)
    return {
        "encoder": {"tokens": {0: batch}, "known_index": {0: batch, 1: K}, "class_label": {0: batch}},
        "decoder": {"encoded": {0: batch, 1: K + cfg.buffer}, "known_index": {0: batch, 1: K}},
        "diffusion": {"x": {0: N}, "t": {0: N}, "z": {0: N}},
        "vae_decoder": {"latent": {0: batch}},
    }[role]


def strip_metadata(model) -> None:
    """Drop the exporter's per-node/per-value debug metadata (Python stack traces with local
    paths, FX node text): it is bulky and would make the files depend on where they were made."""
    g = model.graph
    values = list(g.inputs) + list(g.outputs) + list(g.initializers.values())
    for node in g:
        node.metadata_props.clear()
        values.extend(node.outputs)
    for v in values:
        v.metadata_props.clear()


def export_graph(module: nn.Module, role: str, cfg: MARConfig, path: str, log=print,
                 external_above: int = EXTERNAL_DATA_BYTES) -> dict:
    """Export one role to `path`; weights go to `<path>.data` beside it when they exceed
    `external_above` bytes (protobuf cannot hold more than 2 GB). Returns info."""
    import warnings

    gen = torch.Generator().manual_seed(1234)
    args = example_inputs(cfg, role, gen)
    ins, outs = GRAPH_IO[role]
    t0 = time.time()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module, args, None, dynamo=True, opset_version=OPSET,
            input_names=list(ins.values()), output_names=list(outs.values()),
            dynamic_shapes=dynamic_shapes(cfg, role), verbose=False,
        )
    strip_metadata(prog.model)
    nbytes = sum(int(v.const_value.nbytes) for v in prog.model.graph.initializers.values()
                 if v.const_value is not None)
    external = nbytes > external_above
    # Written aside and renamed into place (models/onnx_save.py): an old graph and its data file
    # are replaced only once the new ones exist (the old data file removed if the new graph has none).
    with Staging(os.path.dirname(path) or os.curdir) as s:
        files = s.save_with(lambda tmp: prog.save(tmp, external_data=external), path)
        s.commit()
    size = sum(os.path.getsize(f) for f in files)
    log(f"  {role}: {os.path.basename(path)}{' + external data' if external else ''}, "
        f"{size / 1e6:.1f} MB, exported in {time.time() - t0:.1f} s")
    return {"files": files, "bytes": size, "external": external}


def check_contract(path: str, role: str, cfg: MARConfig, vcfg: VAEConfig) -> None:
    """The graph's inputs and outputs: names, element types, fixed and dynamic dims."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    opset = max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 17:
        raise ExportCheckFailed(f"{role}: opset {opset} < 17")
    L, C = cfg.seq_len, cfg.token_dim
    D = cfg.decoder_width
    H, W = vcfg.image_size(cfg.grid)
    F, I = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    dyn = None
    want_in = {
        "encoder": {"tokens": (F, [dyn, L, C]), "known_index": (I, [dyn, dyn]), "class_label": (I, [dyn])},
        "decoder": {"encoded": (F, [dyn, dyn, cfg.encoder_width]), "known_index": (I, [dyn, dyn])},
        "diffusion": {"x": (F, [dyn, C]), "t": (I, [dyn]), "z": (F, [dyn, D])},
        "vae_decoder": {"latent": (F, [dyn, C, cfg.grid[0], cfg.grid[1]])},
    }[role]
    want_out = {
        "encoder": {"encoded": (F, [dyn, dyn, cfg.encoder_width])},
        "decoder": {"z": (F, [dyn, L, D])},
        "diffusion": {"out": (F, [dyn, cfg.head_channels])},
        "vae_decoder": {"image": (F, [dyn, vcfg.out_ch, H, W])},
    }[role]
    for kind, vals, want in (("input", m.graph.input, want_in), ("output", m.graph.output, want_out)):
        have = {v.name: v for v in vals}
        if set(have) != set(want):
            raise ExportCheckFailed(f"{role}: {kind}s {sorted(have)}, expected {sorted(want)}")
        for name, (ty, dims) in want.items():
            tt = have[name].type.tensor_type
            got = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
                   for d in tt.shape.dim]
            ok = tt.elem_type == ty and len(got) == len(dims)
            for g, w in zip(got, dims):
                if w is None:
                    ok &= isinstance(g, str)          # a named (dynamic) axis
                else:
                    ok &= g == w
            if not ok:
                raise ExportCheckFailed(f"{role}: {kind} {name} has type {tt.elem_type} dims {got}, "
                                   f"expected type {ty} dims {['dynamic' if d is None else d for d in dims]}")


# -- parity -------------------------------------------------------------------------------

def random_known(gen: torch.Generator, B: int, K: int, L: int) -> torch.Tensor:
    if K == 0:
        return torch.zeros(B, 0, dtype=torch.int64)
    return torch.stack([torch.sort(torch.randperm(L, generator=gen)[:K]).values for _ in range(B)])


def parity_inputs(cfg: MARConfig, role: str, gen: torch.Generator, roles: dict, quick: bool = False):
    """Lists of input tuples covering the dynamic axes."""
    L, C = cfg.seq_len, cfg.token_dim
    cases = []
    if role in ("encoder", "decoder"):
        combos = [(1, 0), (3, 5), (2, L), (4, 0), (3, 17)] if not quick else [(1, 0), (2, 7)]
        for B, K in combos:
            labels = torch.randint(0, max(cfg.classes, 1), (B,), generator=gen)
            if cfg.classes == 0:
                labels[:] = cfg.null_class
            labels[::2] = cfg.null_class                 # null and real labels in one batch
            tokens = torch.randn(B, L, C, generator=gen)
            known = random_known(gen, B, K, L)
            if role == "encoder":
                cases.append((tokens, known, labels))
            else:
                with torch.no_grad():
                    enc = roles["encoder"](tokens, known, labels)
                cases.append((enc, known))
    elif role == "diffusion":
        for N in ((1, 7, 64, 300) if not quick else (1, 9)):
            t = torch.randint(0, 1000, (N,), generator=gen)
            t[0] = 999
            if N > 1:
                t[1] = 0
            cases.append((torch.randn(N, C, generator=gen), t, torch.randn(N, cfg.decoder_width, generator=gen)))
    else:
        for B in ((1, 2) if not quick else (1,)):
            cases.append((torch.randn(B, C, cfg.grid[0], cfg.grid[1], generator=gen) / LATENT_SCALE,))
    return cases


def check_parity(out_dir: str, roles: dict, cfg: MARConfig, tolerance: float = 1e-3, quick_vae: bool = False,
                 log=print, threads: int = 0) -> dict:
    """Max |onnxruntime − PyTorch| per graph on random inputs; raises above `tolerance`."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    gen = torch.Generator().manual_seed(4321)
    results = {}
    for role, module in roles.items():
        sess = ort.InferenceSession(os.path.join(out_dir, GRAPH_FILES[role]), so, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        worst, scale, shapes = 0.0, 0.0, []
        t0 = time.time()
        for inputs in parity_inputs(cfg, role, gen, roles, quick=quick_vae and role == "vae_decoder"):
            with torch.no_grad():
                want = module(*inputs).numpy()
            order = list(GRAPH_IO[role][0].values())
            feeds = {n: inputs[order.index(n)].numpy() for n in names}
            got = sess.run(None, feeds)[0]
            if got.shape != want.shape:
                raise ExportCheckFailed(f"{role}: onnxruntime shape {got.shape}, PyTorch {want.shape}")
            if not np.isfinite(got).all():
                raise ExportCheckFailed(f"{role}: non-finite onnxruntime output for inputs "
                                        f"{[tuple(i.shape) for i in inputs]}")
            err = float(np.abs(got - want).max()) if got.size else 0.0
            worst = max(worst, err)
            scale = max(scale, float(np.abs(want).max()) if want.size else 0.0)
            shapes.append(("x".join(str(s) for s in inputs[1].shape) if role in ("encoder", "decoder")
                           else str(inputs[0].shape[0]), err))
        results[role] = worst
        detail = ", ".join(f"{s}: {e:.1e}" for s, e in shapes)
        label = {"encoder": "B x K", "decoder": "B x K", "diffusion": "N", "vae_decoder": "B"}[role]
        log(f"  {role}: max |ort - torch| = {worst:.2e} (outputs up to {scale:.2f}; by {label}: {detail}) "
            f"[{time.time() - t0:.1f} s]")
        if not (worst <= tolerance):
            raise ExportCheckFailed(f"{role}: onnxruntime and PyTorch differ by {worst:.3e} > {tolerance}")
    return results


# -- manifest -------------------------------------------------------------------------------

F32_MAX = 3.4028234663852886e38   # float32's largest: gtr-run's limit on a guidance scale or temperature


def name_problem(name) -> str | None:
    """Why `name` cannot be a bundle's name (not a string, empty, or holding a line break or
    another control or format character, which no one-line YAML string holds), or None."""
    if not isinstance(name, str) or not name:
        return "is empty; give a name" if isinstance(name, str) else f"is {type(name).__name__}, not a string"
    bad = [c for c in name if unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp")]
    if bad:
        return (f"holds {'a line break' if any(c in chr(10) + chr(13) for c in bad) else 'a control character'} "
                f"({', '.join(sorted({f'U+{ord(c):04X}' for c in bad}))}); give one line of printable text")
    return None


def sampler_scale_problem(value) -> str | None:
    """Why `value` cannot be a guidance scale or temperature of a manifest (gtr-run's rule: a
    number from 0 to float32's largest), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= F32_MAX:
        return f"{value!r} is not a number >= 0 and at most 3.4e38 (float32's largest), as gtr-run requires"
    return None


def yaml_string(text: str) -> str:
    """`text` as a double-quoted YAML string: JSON's string syntax is YAML's (name_problem has
    refused the characters where the two differ)."""
    return json.dumps(text, ensure_ascii=False)


def manifest_text(name: str, cfg: MARConfig, vcfg: VAEConfig, cfg_scale: float, temperature: float,
                  latent_scale: float = LATENT_SCALE) -> str:
    for what, why in (("name", name_problem(name)), ("cfg", sampler_scale_problem(cfg_scale)),
                      ("temperature", sampler_scale_problem(temperature))):
        if why:
            raise ValueError(f"manifest {what}: {why}")
    H, W = vcfg.image_size(cfg.grid)
    lines = [
        f"format: {FORMAT}",
        f"name: {yaml_string(name)}",
        f"grid: [{cfg.grid[0]}, {cfg.grid[1]}]",
        f"token_dim: {cfg.token_dim}",
        f"width: {cfg.decoder_width}",
        f"buffer: {cfg.buffer}",
        f"classes: {cfg.classes}",
        f"null_class: {cfg.null_class}",
        f"latent_scale: {latent_scale}",
        "diffusion:",
        "  schedule: cosine",
        "  train_steps: 1000",
        # MAR's create_diffusion: learned range with learn_sigma, else the
        # fixed-large variance (sigma_small=False), never fixed-small.
        f"  variance: {'learned_range' if cfg.learn_sigma else 'fixed_large'}",
        f"image: {{ height: {H}, width: {W}, channels: {vcfg.out_ch} }}",
        f"sampling: {{ cfg: {float(cfg_scale)}, temperature: {float(temperature)} }}",
        "cost:",
        f"  encoder_depth: {cfg.encoder_depth}",
        f"  decoder_depth: {cfg.decoder_depth}",
        f"  diffusion_width: {cfg.diffloss_width}",
        f"  diffusion_depth: {cfg.diffloss_depth}",
        "graphs:",
    ]
    for role, (ins, outs) in GRAPH_IO.items():
        i = ", ".join(f"{k}: {v}" for k, v in ins.items())
        o = ", ".join(f"{k}: {v}" for k, v in outs.items())
        lines.append(f"  {role}: {{ file: {GRAPH_FILES[role]}, inputs: {{ {i} }}, outputs: {{ {o} }} }}")
    return "\n".join(lines) + "\n"


def export_bundle(mar: MAR, vae: AutoencoderKL, out_dir: str, name: str, cfg_scale: float,
                  temperature: float = 1.0, head: nn.Module | None = None, tolerance: float = 1e-3,
                  quick_vae: bool = False, log=print, external_above: int = EXTERNAL_DATA_BYTES,
                  latent_scale: float = LATENT_SCALE, fused_attention: bool = False,
                  derived: bool = True) -> dict:
    """Exports the four graphs + manifest into `out_dir` and checks their contract and their
    parity with PyTorch; with `derived` (default) adds the sampler, tick and backbone graphs
    (add_sampler.py, add_backbone.py) and checks them against their references; with
    `fused_attention`, fuses the encoder's and decoder's attention (fuse_attention.py).

    All or nothing: the bundle is built and checked in a staging folder inside `out_dir`
    (models/onnx_save.py), and its files replace those of `out_dir` only once every check has
    passed; a failed check (ExportCheckFailed), an error or an interruption leaves `out_dir` as
    it was. The commit also removes the graphs (and their own external data) that the old
    manifest of `out_dir` listed and the new one does not, such as the precision variants and
    split-head graphs other tools made from the old weights (Staging.adopt)."""
    cfg, vcfg = mar.cfg, vae.cfg
    if vcfg.embed_dim != cfg.token_dim:
        raise CheckpointError(f"VAE latent channels {vcfg.embed_dim} != MAR token_dim {cfg.token_dim}")
    manifest = manifest_text(name, cfg, vcfg, cfg_scale, temperature, latent_scale)  # ValueError before anything
    os.makedirs(out_dir, exist_ok=True)
    mar.eval()
    vae.eval()
    roles = role_modules(mar, vae, head)
    with Staging(out_dir) as staging:
        work = os.path.join(staging.dir, "bundle")
        os.makedirs(work)
        log(f"exporting to {out_dir} (opset {OPSET}; built in {os.path.relpath(work, out_dir)} until checked)")
        info = {}
        for role, module in roles.items():
            path = os.path.join(work, GRAPH_FILES[role])
            info[role] = export_graph(module, role, cfg, path, log, external_above)
            check_contract(path, role, cfg, vcfg)
        write_manifest(work, manifest)
        log("contract: every graph has the tensor names, element types and fixed/dynamic dims of models/README.md")
        log(f"parity, onnxruntime vs PyTorch (tolerance {tolerance}):")
        errors = check_parity(work, roles, cfg, tolerance, quick_vae=quick_vae, log=log)
        if fused_attention:
            # ONNX Runtime's MultiHeadAttention in place of each block's attention chain, compared
            # there with the plain graphs that were just checked against PyTorch.
            from models.fuse_attention import FuseError, fuse_bundle
            try:
                fuse_bundle(work, log=log)
            except FuseError as e:  # the fused graphs' comparison: a check of this export
                raise ExportCheckFailed(str(e)) from e
        if derived:
            # The whole-chain sampler and the tick graph around the diffusion graph just written
            # (models/add_sampler.py), then the fused encoder and decoder (models/add_backbone.py).
            from models.add_backbone import add_backbone
            from models.add_backbone import check as check_backbone
            from models.add_sampler import add_sampler
            from models.add_sampler import check as check_sampler
            for what, add, check, reference in (
                    ("sampler", add_sampler, check_sampler, "its per-tick reference"),
                    ("backbone", add_backbone, check_backbone, "the encoder and decoder")):
                add(work, log=log)
                try:
                    errors[what] = check(work, log=log)
                except CheckFailed as e:
                    raise ExportCheckFailed(str(e)) from e
                if not errors[what] <= tolerance:
                    raise ExportCheckFailed(f"the {what} graph differs from {reference} by "
                                            f"{errors[what]:.3e} > {tolerance}")
        files = staging.adopt(work)
        retired = sorted(staging.remove_after)
        staging.commit()
    log(f"checked, then placed in {out_dir}: {', '.join(sorted(os.path.basename(f) for f in files))}")
    if retired:
        log(f"removed what the old manifest listed and the new one does not (made from the old weights): "
            f"{', '.join(os.path.relpath(f, staging.bundle) for f in retired)}")
    return {"graphs": info, "errors": errors, "files": files, "retired": retired}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, as Ctrl-C raises KeyboardInterrupt: the staging folders'
    context managers then remove what the run wrote (a BaseException, so that no `except
    Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def out_problem(out: str) -> tuple[str | None, list]:
    """(why `out` cannot be the bundle folder to write, or None; the folders the run will create
    for it, outermost first)."""
    if not out:
        return "is empty; give a bundle folder", []
    if os.path.exists(out) and not os.path.isdir(out):
        return "is not a folder (a file is there); give a bundle folder", []
    missing, folder = [], os.path.abspath(out)
    while not os.path.exists(folder):
        missing.insert(0, folder)
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"cannot be made: {folder} is not a folder", []
    if not os.access(folder, os.W_OK | os.X_OK):
        return (f"cannot be written: {folder} is not writable" if missing
                else "is not writable; the bundle is written into it"), []
    return None, missing


def remove_created(folders: list) -> None:
    """Removes the folders of `folders` (outermost first) that this run created, innermost first,
    where they are empty (an interrupted commit's plan, kept for the next run, keeps its folder)."""
    for folder in reversed(folders):
        try:
            os.rmdir(folder)
        except OSError:
            return


def main(argv=None):
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="MAR checkpoint (checkpoint-last.pth)")
    ap.add_argument("--vae", required=True, help="KL-16 VAE checkpoint (kl16.ckpt)")
    ap.add_argument("--size", required=True, choices=list(MAR_SIZES) + ["custom"])
    ap.add_argument("--out", required=True, help="bundle folder to write (made if missing)")
    ap.add_argument("--cfg", type=float, help="default guidance scale in the manifest, from 0 to 3.4e38 "
                    "(MAR's linear schedule; default 2.9 / 3.0 / 3.2 for B / L / H, 3.0 for custom)")
    ap.add_argument("--temperature", type=float, default=1.0, help="default temperature in the manifest, "
                    "from 0 to 3.4e38 (default 1.0)")
    ap.add_argument("--name", help="bundle name, one line of text (default mar-base / mar-large / mar-huge / "
                    "mar-custom)")
    ap.add_argument("--weights", default="model_ema", choices=["model_ema", "model"],
                    help="which weights of the checkpoint to export (default: the EMA weights, as MAR evaluates)")
    ap.add_argument("--tolerance", type=number(0, allow_inf=True), default=1e-3,
                    help="max |onnxruntime - PyTorch| allowed per graph")
    ap.add_argument("--quick-vae-check", action="store_true", help="parity-check the VAE at batch 1 only")
    ap.add_argument("--fused-attention", action="store_true",
                    help="fuse each block's attention into ONNX Runtime's MultiHeadAttention (models/fuse_attention.py)")
    ap.add_argument("--external-data-mb", type=number(0), default=EXTERNAL_DATA_BYTES / 2**20,
                    help="write a graph's weights to <graph>.onnx.data when they exceed this many MiB "
                         "(default: just under protobuf's 2 GB limit; the graphs written after the export, "
                         "sampler, backbone and fused attention, go external above that default: models/onnx_save.py)")
    g = ap.add_argument_group("shape of --size custom (default: from the checkpoint's args)")
    g.add_argument("--width", type=integer(1))
    g.add_argument("--depth", type=integer(0))
    g.add_argument("--heads", type=integer(1), help="attention heads, dividing --width")
    g.add_argument("--mlp-ratio", dest="mlp_ratio", type=number(0, positive=True))
    g.add_argument("--diffloss-w", dest="diffloss_w", type=integer(1))
    g.add_argument("--diffloss-d", dest="diffloss_d", type=integer(0))
    g.add_argument("--classes", type=integer(0))
    g.add_argument("--buffer", type=integer(0))
    g.add_argument("--grid", type=integer(1), help="token grid side")
    g.add_argument("--token-dim", dest="token_dim", type=integer(1))
    g.add_argument("--vae-ch", dest="vae_ch", type=integer(1), help="times each multiplier a multiple of 32 (GroupNorm)")
    g.add_argument("--vae-ch-mult", dest="vae_ch_mult", type=channel_mult, help="e.g. 1,1,2,2,4")
    g.add_argument("--vae-res-blocks", dest="vae_res_blocks", type=integer(0))
    a = ap.parse_args(argv)
    if a.size in MAR_SIZES:
        given = [f for f in ("width", "depth", "heads", "mlp_ratio", "vae_ch", "vae_ch_mult", "vae_res_blocks", "grid")
                 if getattr(a, f) is not None]
        if given:
            ap.error(f"--{given[0].replace('_', '-')} is only for --size custom")
    why = shape_problem(a.width, a.heads, a.vae_ch, a.vae_ch_mult)
    if why:
        ap.error(why)
    for flag, value in (("--cfg", a.cfg), ("--temperature", a.temperature)):
        why = sampler_scale_problem(value) if value is not None else None
        if why:
            ap.error(f"{flag}: {why}")
    if a.name is not None and name_problem(a.name):
        ap.error(f"--name {a.name!r} {name_problem(a.name)}")
    for flag, path in (("--checkpoint", a.checkpoint), ("--vae", a.vae)):
        why = input_file_problem(path)
        if why:
            ap.error(f"{flag} {path!r} {why}")
    why, created = out_problem(a.out)
    if why:
        ap.error(f"--out {a.out!r} {why}")

    # SIGTERM (a job scheduler, `kill`, benches/gpu.py) ends the run as Ctrl-C does: the staging
    # folder is removed on the way out, --out is left as it was, exit status 128 + the signal.
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _export(a, created)
    except KeyboardInterrupt as e:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)   # the cleanup below is not interrupted in turn
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        commit = interrupted_commit(a.out)
        remove_created(created)
        if commit:
            print(f"error: interrupted ({signal.Signals(signum).name}) during the commit: {a.out} holds its plan, "
                  f"which the next model tool run on it finishes (python3 models/onnx_save.py {shlex.quote(a.out)})",
                  file=sys.stderr)
        else:
            print(f"error: interrupted ({signal.Signals(signum).name}); {a.out} was left as it was"
                  + (" (the folders this run made were removed)" if created else ""), file=sys.stderr)
        return 128 + signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _export(a, created: list) -> int:
    """The export of main's parsed arguments `a` into a.out, removing the folders of `created`
    (those the run makes for a.out) unless it succeeds."""
    t_start = time.time()
    torch.manual_seed(0)
    try:
        sd, args = load_mar_checkpoint(a.checkpoint, a.weights)
        cfg, vcfg, _ = resolve_configs(a.size, args, a)
        print(f"MAR {a.size}: grid {list(cfg.grid)}, C {cfg.token_dim}, D {cfg.decoder_width}, depth "
              f"{cfg.encoder_depth}+{cfg.decoder_depth}, heads {cfg.encoder_heads}, buffer {cfg.buffer}, "
              f"classes {cfg.classes}, diffusion MLP {cfg.diffloss_width} x {cfg.diffloss_depth}")
        mar = MAR(cfg)
        strict_load(mar, sd, f"{a.checkpoint} [{a.weights}]")
        print(f"  loaded {len(sd)} tensors from `{a.weights}` strictly ({count_parameters(mar) / 1e6:.2f} M parameters)")
        vsd, ignored = load_vae_checkpoint(a.vae)
        vae = AutoencoderKL(vcfg, with_encoder=False)
        strict_load(vae, vsd, f"{a.vae} [model] (decoder side)")
        print(f"VAE: ch {vcfg.ch}, ch_mult {list(vcfg.ch_mult)}, {vcfg.num_res_blocks + 1} blocks per level, "
              f"image {'x'.join(map(str, vcfg.image_size(cfg.grid)))}; loaded {len(vsd)} decoder-side tensors strictly "
              f"({count_parameters(vae) / 1e6:.2f} M parameters)")
        if ignored:
            print("  ignored (not needed to decode): "
                  + ", ".join(f"{k}.* ({n} keys)" for k, n in sorted(ignored.items())))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    del sd, vsd
    cfg_scale = a.cfg if a.cfg is not None else DEFAULT_CFG.get(a.size, 3.0)
    name = a.name if a.name is not None else {"mar_base": "mar-base", "mar_large": "mar-large",
                                              "mar_huge": "mar-huge"}.get(a.size, "mar-custom")
    done = False
    try:
        res = export_bundle(mar, vae, a.out, name, cfg_scale, a.temperature, tolerance=a.tolerance,
                            quick_vae=a.quick_vae_check, external_above=int(a.external_data_mb * 2**20),
                            fused_attention=a.fused_attention)
        done = True
    except ExportCheckFailed as e:
        print(f"error: {a.out}: a check failed: {one_line(e)}; nothing was changed", file=sys.stderr)
        return 1
    except (CheckpointError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # a full disk, a folder made read-only meanwhile
        print(f"error: {a.out}: {type(e).__name__}: {one_line(e)}; nothing was changed", file=sys.stderr)
        return 2
    finally:
        if not done:
            remove_created(created)
    graphs = [f for f in res["files"] if f.endswith(".onnx")]
    total = sum(os.path.getsize(f) for f in res["files"] if not f.endswith(".yaml"))
    print(f"wrote {a.out}: manifest.yaml + {len(graphs)} graphs ({', '.join(sorted(map(os.path.basename, graphs)))}), "
          f"{total / 1e6:.1f} MB, in {time.time() - t_start:.1f} s")
    return 0

if __name__ == "__main__":
    sys.exit(main())

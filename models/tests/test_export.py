#!/usr/bin/env python3
"""Tests of the MAR exporter (plain script: run it, it exits non-zero on the first failure).

  .venv-torch/bin/python models/tests/test_export.py [--keep DIR]

1. make_fake_checkpoint.py writes a small custom checkpoint in the official layout
   (width 64, 2 blocks, 4 heads, diffusion MLP 128 x 2, VAE ch 32 ch_mult 1,1,2,2,4).
2. export_mar.py --size custom exports it (contract and ORT-vs-PyTorch parity checked inside);
   the test reads the printed errors back and checks the manifest.
   With --fused-attention, both blocks of the encoder and decoder are fused and checked.
3. The exported graphs hold the `model_ema` weights, not `model`; unknown canvas positions do
   not change the encoder output; K = 0 works; labels outside the table plus null are refused;
   a graph written with external data (forced) loads and matches.
4. Broken checkpoints are refused with a message naming the key: a renamed key, a wrong
   shape, a missing VAE decoder key, a wrong --size, a missing `model_ema`.
5. Bad arguments are refused up front, one line naming the flag, exit 2, nothing written
   (export_mar.py and make_fake_checkpoint.py): input files that are missing, folders, empty or
   not checkpoints; --out a file, empty, under a file or a read-only folder; custom shapes that
   cannot be built; names that are empty or hold a line break; --cfg / --temperature outside
   0 … 3.4e38. A name with YAML syntax in it reads back as written; a failed export removes every
   folder it made for --out.
6. SIGINT and SIGTERM during an export: one line, exit 130 / 143, an existing bundle unchanged,
   a new --out removed, no staging folder left.
7. A re-export over a bundle that split_head.py and convert_precision.py extended removes the
   graphs the new manifest does not list (and only those).
8. bench_torch.py: graphs that are not the PyTorch weights, or of another shape, stop it with
   one line, exit 2; its default schedules are the repository's wherever it runs from.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

_MODELS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROOT = os.path.dirname(_MODELS)
sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import numpy_helper  # noqa: E402
import yaml  # noqa: E402

from models import export_mar, make_fake_checkpoint  # noqa: E402
from models.tests.fixture_copies import without_write_override  # noqa: E402
from models.torch.mar import MAR  # noqa: E402

PY = sys.executable
FAKE = os.path.join(_MODELS, "make_fake_checkpoint.py")
EXPORT = os.path.join(_MODELS, "export_mar.py")
SMALL = ["--size", "custom", "--width", "64", "--depth", "2", "--heads", "4", "--diffloss-w", "128",
         "--diffloss-d", "2", "--vae-ch", "32", "--vae-ch-mult", "1,1,2,2,4", "--classes", "1000"]
# smaller still (16x16 images), for the exports that sections 6 and 7 interrupt or repeat
TINY = ["--size", "custom", "--width", "32", "--depth", "1", "--heads", "2", "--diffloss-w", "64", "--diffloss-d", "1",
        "--vae-ch", "32", "--vae-ch-mult", "1,2", "--vae-res-blocks", "1", "--classes", "10", "--grid", "8"]


def run(cmd):
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=_ROOT)
    return p, time.time() - t0


def export_in_process(argv, tool=export_mar):
    """(return code, stdout, stderr) of export_mar.main(argv) (fails before exporting), or of
    another tool's main; an argument error's SystemExit gives its code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = tool.main(argv)
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def refused(name, rc, err, flag, made=(), code=2):
    """An up-front refusal: exit `code`, one line naming `flag`, none of `made` written."""
    assert rc == code and err.count("\n") == 1 and flag in err, f"{name}: exit {rc}, expected {code}, one line " \
        f"naming {flag}:\n{err}"
    for path in made:
        assert not os.path.exists(path), f"{name}: wrote {path}"
    print(f"ok   {name}: exit {rc}; {err.strip()}")


def signal_export(argv, sig, after):
    """Runs export_mar.py with `argv`, sends `sig` once a stdout line holds `after`; (exit
    status, stderr)."""
    p = subprocess.Popen([PY, EXPORT, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=_ROOT,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seen = []
    for line in p.stdout:
        seen.append(line)
        if after in line:
            break
    p.send_signal(sig)
    rest, err = p.communicate()
    assert after in "".join(seen), f"the export ended before `{after}`:\n{''.join(seen)}{rest}{err}"
    return p.returncode, err


def expect_refusal(tmp, name, ckpt, vae, size, must_contain):
    rc, out, err = export_in_process(["--checkpoint", ckpt, "--vae", vae, "--size", size,
                                      "--out", os.path.join(tmp, "never-" + name)])
    assert rc == 2, f"{name}: exit {rc}, expected 2\n{out}\n{err}"
    for s in must_contain:
        assert s in err, f"{name}: the message does not contain {s!r}:\n{err}"
    assert not os.path.exists(os.path.join(tmp, "never-" + name)), f"{name}: wrote a bundle"
    first = err.strip().splitlines()
    print(f"ok   {name}: refused; " + " | ".join(l.strip() for l in first[:4]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", help="keep the temporary files in this folder")
    a = ap.parse_args()
    ctx = tempfile.TemporaryDirectory() if not a.keep else contextlib.nullcontext(a.keep)
    with ctx as tmp:
        os.makedirs(tmp, exist_ok=True)
        ckpt, vae = os.path.join(tmp, "checkpoint-last.pth"), os.path.join(tmp, "kl16.ckpt")
        out = os.path.join(tmp, "bundle")

        # 1. fake checkpoint
        p, dt = run([PY, FAKE, *SMALL, "--out", ckpt, "--vae-out", vae, "--seed", "7"])
        assert p.returncode == 0, p.stderr
        print(f"ok   make_fake_checkpoint ({dt:.1f} s): " + " / ".join(p.stdout.strip().splitlines()))
        obj = torch.load(ckpt, map_location="cpu", weights_only=False)
        assert set(obj) >= {"model", "model_ema", "args"} and isinstance(obj["args"], argparse.Namespace)
        vobj = torch.load(vae, map_location="cpu", weights_only=False)
        assert any(k.startswith("encoder.") for k in vobj["model"]) and "quant_conv.weight" in vobj["model"]

        # 2. export, parity read back from the output
        p, dt = run([PY, EXPORT, "--checkpoint", ckpt, "--vae", vae, "--size", "custom", "--out", out])
        assert p.returncode == 0, p.stdout + p.stderr
        errs = dict((m.group(1), float(m.group(2)))
                    for m in re.finditer(r"^\s+(\w+): max \|ort - torch\| = ([0-9.e+-]+)", p.stdout, re.M))
        assert set(errs) == {"encoder", "decoder", "diffusion", "vae_decoder"}, p.stdout
        assert max(errs.values()) < 1e-4, errs
        assert "ignored (not needed to decode): encoder.*" in p.stdout, p.stdout
        print(f"ok   export --size custom ({dt:.1f} s): max |ort - torch| "
              + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
        with open(os.path.join(out, "manifest.yaml")) as f:
            m = yaml.safe_load(f)
        want = {"format": "gtr-run/mar-bundle@1", "grid": [16, 16], "token_dim": 16, "width": 64, "buffer": 64,
                "classes": 1000, "null_class": 1000, "latent_scale": 0.2325,
                "diffusion": {"schedule": "cosine", "train_steps": 1000, "variance": "learned_range"},
                "image": {"height": 256, "width": 256, "channels": 3},
                "sampling": {"cfg": 3.0, "temperature": 1.0},
                "cost": {"encoder_depth": 2, "decoder_depth": 2, "diffusion_width": 128, "diffusion_depth": 2}}
        for k, v in want.items():
            assert m[k] == v, (k, m[k], v)
        assert set(m["graphs"]) == {"encoder", "decoder", "diffusion", "vae_decoder", "sampler", "tick", "backbone"}
        with open(os.path.join(_ROOT, "models", "fixtures", "tiny", "manifest.yaml")) as f:
            assert set(yaml.safe_load(f)) == set(m), "manifest keys differ from the format's example"
        print("ok   manifest")

        # 2b. export with fused attention: the same parity, both blocks of both graphs fused
        fused = os.path.join(tmp, "bundle-fused")
        yaml_name = '#not a comment: [x, "y" \\ é'
        p, dt = run([PY, EXPORT, "--checkpoint", ckpt, "--vae", vae, "--size", "custom", "--out", fused,
                     "--quick-vae-check", "--fused-attention", "--name", yaml_name])
        assert p.returncode == 0, p.stdout + p.stderr
        with open(os.path.join(fused, "manifest.yaml"), encoding="utf-8") as f:
            assert yaml.safe_load(f)["name"] == yaml_name, "the name does not read back as written"
        for role in ("encoder", "decoder"):
            assert f"{role}: 2 attention chains fused into MultiHeadAttention" in p.stdout, p.stdout
            err = float(re.search(rf"^{role}: \|fused - plain\| max ([0-9.e+-]+)", p.stdout, re.M).group(1))
            assert err < 1e-4, (role, err)
            assert "MultiHeadAttention" in [n.op_type for n in onnx.load(os.path.join(fused, f"{role}.onnx")).graph.node]
        print(f"ok   export --fused-attention ({dt:.1f} s); --name {yaml_name!r} reads back as written")

        # 2c. all or nothing: a failed parity check changes nothing, in an existing bundle or a new
        # folder (which is not left behind); one line, exit status 1
        def contents(folder):
            return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}

        before = contents(out)
        for target in (out, os.path.join(tmp, "never-made", "a", "b")):
            p, dt = run([PY, EXPORT, "--checkpoint", ckpt, "--vae", vae, "--size", "custom", "--out", target,
                         "--quick-vae-check", "--tolerance", "1e-12"])
            assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
            assert "a check failed: encoder: onnxruntime and PyTorch differ by" in p.stderr, p.stderr
        assert contents(out) == before, "a failed export changed the bundle"
        assert not os.path.exists(os.path.join(tmp, "never-made")), "a failed export left a folder it made"
        print(f"ok   a failed parity check: exit 1, one line, nothing changed, no folder left ({p.stderr.strip()})")

        # 3. semantics of the exported graphs
        import onnxruntime as ort

        sd_ema, args = export_mar.load_mar_checkpoint(ckpt)
        cfg, _, _ = export_mar.resolve_configs("custom", args, None)
        ema, raw = MAR(cfg).eval(), MAR(cfg).eval()
        export_mar.strict_load(ema, sd_ema, "ema")
        export_mar.strict_load(raw, obj["model"], "model")
        quiet = ort.SessionOptions()
        quiet.log_severity_level = 4  # the out-of-range label below is expected to fail
        enc = ort.InferenceSession(os.path.join(out, "encoder.onnx"), quiet, providers=["CPUExecutionProvider"])
        dec = ort.InferenceSession(os.path.join(out, "decoder.onnx"), providers=["CPUExecutionProvider"])
        g = torch.Generator().manual_seed(0)
        tokens = torch.randn(2, 256, 16, generator=g)
        known = torch.stack([torch.sort(torch.randperm(256, generator=g)[:9]).values for _ in range(2)])
        labels = torch.tensor([5, 1000])
        got = enc.run(None, {"tokens": tokens.numpy(), "known_index": known.numpy(), "class_label": labels.numpy()})[0]
        with torch.no_grad():
            e_ema = float(np.abs(got - ema.encode(tokens, known, labels).numpy()).max())
            e_raw = float(np.abs(got - raw.encode(tokens, known, labels).numpy()).max())
        assert e_ema < 1e-4 and e_raw > 1e-1, (e_ema, e_raw)
        print(f"ok   the graphs hold model_ema (|Δ| {e_ema:.1e}), not model (|Δ| {e_raw:.1e})")
        unknown = torch.ones(2, 256, dtype=torch.bool)
        unknown[torch.arange(2)[:, None], known] = False
        t2 = tokens.clone()
        t2[unknown] = torch.randn(int(unknown.sum()), 16, generator=g) * 10
        got2 = enc.run(None, {"tokens": t2.numpy(), "known_index": known.numpy(), "class_label": labels.numpy()})[0]
        assert np.array_equal(got, got2), "unknown canvas positions changed the encoder output"
        k0 = np.zeros((3, 0), np.int64)
        e0 = enc.run(None, {"tokens": np.zeros((3, 256, 16), np.float32), "known_index": k0,
                            "class_label": np.array([0, 999, 1000], np.int64)})[0]
        z0 = dec.run(None, {"encoded": e0, "known_index": k0})[0]
        assert e0.shape == (3, 64, 64) and z0.shape == (3, 256, 64) and np.isfinite(z0).all()
        print("ok   unknown canvas positions are never read; K = 0 gives [B, 64, D] and a finite z")
        try:
            enc.run(None, {"tokens": np.zeros((1, 256, 16), np.float32), "known_index": np.zeros((1, 0), np.int64),
                           "class_label": np.array([1001], np.int64)})
            raise AssertionError("label 1001 (> null_class) was accepted")
        except AssertionError:
            raise
        except Exception as ex:  # onnxruntime's out-of-range gather
            print(f"ok   label 1001 is refused by the graph ({type(ex).__name__})")

        # external data (used above 2 GB; forced here with a zero threshold)
        ext = os.path.join(tmp, "ext")
        os.makedirs(ext)
        info = export_mar.export_graph(export_mar.DiffusionRole(ema.diffusion_head).eval(), "diffusion", cfg,
                                       os.path.join(ext, "diffusion.onnx"), log=lambda *_: None, external_above=0)
        assert info["external"] and os.path.getsize(os.path.join(ext, "diffusion.onnx.data")) > 500_000, info
        assert os.path.getsize(os.path.join(ext, "diffusion.onnx")) < 100_000, info
        export_mar.check_contract(os.path.join(ext, "diffusion.onnx"), "diffusion", cfg, export_mar.kl16_config())
        sess = ort.InferenceSession(os.path.join(ext, "diffusion.onnx"), providers=["CPUExecutionProvider"])
        x, t, zc = torch.randn(6, 16, generator=g), torch.tensor([0, 1, 500, 998, 999, 3]), torch.randn(6, 64, generator=g)
        with torch.no_grad():
            e_ext = float(np.abs(sess.run(None, {"x": x.numpy(), "t": t.numpy(), "z": zc.numpy()})[0]
                                 - ema.diffusion_head(x, t, zc).numpy()).max())
        assert e_ext < 1e-4, e_ext
        print(f"ok   external data: diffusion.onnx + diffusion.onnx.data load in onnxruntime (|Δ| {e_ext:.1e})")

        # 4. refusals
        bad = dict(sd_ema)
        bad["encoder_blocks.1.attn.qkv_renamed.weight"] = bad.pop("encoder_blocks.1.attn.qkv.weight")
        p1 = os.path.join(tmp, "renamed.pth")
        torch.save({**obj, "model_ema": bad}, p1)
        expect_refusal(tmp, "renamed key", p1, vae, "custom",
                       ["encoder_blocks.1.attn.qkv.weight", "encoder_blocks.1.attn.qkv_renamed.weight",
                        "1 missing", "1 unexpected"])
        bad = dict(sd_ema)
        bad["diffloss.net.final_layer.linear.weight"] = torch.zeros(30, 128)
        p2 = os.path.join(tmp, "shape.pth")
        torch.save({**obj, "model_ema": bad}, p2)
        expect_refusal(tmp, "wrong shape", p2, vae, "custom",
                       ["diffloss.net.final_layer.linear.weight: checkpoint [30, 128], model [32, 128]"])
        vbad = dict(vobj["model"])
        del vbad["decoder.up.1.upsample.conv.weight"]
        vbad["decoder.up.4.block.0.nin_shortcut.weight"] = torch.zeros(128, 128, 1, 1)  # 128 -> 128: none
        p3 = os.path.join(tmp, "vae_bad.ckpt")
        torch.save({"model": vbad}, p3)
        expect_refusal(tmp, "VAE missing + unexpected key", ckpt, p3, "custom",
                       ["decoder.up.1.upsample.conv.weight", "decoder.up.4.block.0.nin_shortcut.weight",
                        "1 missing, 1 unexpected"])
        expect_refusal(tmp, "wrong --size", ckpt, vae, "mar_base", ["--size mar_base", "model='custom'"])
        p4 = os.path.join(tmp, "no_ema.pth")
        torch.save({"model": obj["model"], "args": obj["args"]}, p4)
        expect_refusal(tmp, "no model_ema", p4, vae, "custom", ["no `model_ema` entry"])
        # an official size whose args agree, but with custom shapes inside: shape errors listed
        o5 = dict(obj)
        o5["args"] = argparse.Namespace(**{**vars(obj["args"]), "model": "mar_base"})
        p5 = os.path.join(tmp, "small_as_base.pth")
        torch.save(o5, p5)
        expect_refusal(tmp, "custom weights as mar_base", p5, vae, "mar_base",
                       ["240 missing", "65 mis-shaped", "decoder_blocks.2.attn.proj.bias [768]",
                        "… and 200 more", "class_emb.weight: checkpoint [1000, 64], model [1000, 768]",
                        "… and 25 more"])
        # 5. bad arguments: one line naming the flag, exit 2, nothing written
        never = os.path.join(tmp, "never")
        base = ["--checkpoint", ckpt, "--vae", vae, "--size", "custom", "--out", never]
        folder, empty, text = os.path.join(tmp, "a-folder"), os.path.join(tmp, "empty.pth"), os.path.join(tmp, "text.pth")
        os.makedirs(folder)
        open(empty, "w").close()
        with open(text, "w") as f:
            f.write("not a checkpoint\n")
        for flag, path in (("--checkpoint", os.path.join(tmp, "missing.pth")), ("--checkpoint", folder),
                           ("--checkpoint", empty), ("--checkpoint", text), ("--vae", text), ("--vae", "")):
            argv = list(base)
            argv[argv.index(flag) + 1] = path
            refused(f"{flag} {os.path.basename(path) or repr(path)}", *export_in_process(argv)[::2], flag, [never])
        cases = [(["--out", ckpt], "--out"), (["--out", ""], "--out"), (["--out", os.path.join(ckpt, "sub")], "--out"),
                 (["--heads", "3"], "--heads"), (["--heads", "0"], "--heads"), (["--vae-ch-mult", "a,b"], "--vae-ch-mult"),
                 (["--vae-ch", "33"], "--vae-ch"), (["--grid", "0"], "--grid"), (["--mlp-ratio", "nan"], "--mlp-ratio"),
                 (["--external-data-mb", "nan"], "--external-data-mb"), (["--tolerance", "nan"], "--tolerance"),
                 (["--name", ""], "--name"), (["--name", "two\nlines"], "--name"), (["--name", "bell\a"], "--name"),
                 (["--cfg", "nan"], "--cfg"), (["--cfg", "-1"], "--cfg"), (["--cfg", "1e39"], "--cfg"),
                 (["--temperature", "inf"], "--temperature"), (["--temperature", "-0.5"], "--temperature")]
        for extra, flag in cases:
            refused(f"export_mar {' '.join(map(repr, extra))}", *export_in_process(base + extra)[::2], flag, [never])
        refused("--size mar_base --width 64", *export_in_process(base[:5] + ["mar_base", "--out", never, "--width", "64"])[::2],
                "--width", [never])
        fake_out = os.path.join(tmp, "fake", "x.pth")
        fbase = ["--size", "custom", "--out", fake_out]
        for extra, flag in [(["--heads", "3", "--width", "32"], "--heads"), (["--vae-ch", "16"], "--vae-ch"),
                            (["--vae-ch-mult", "1,x"], "--vae-ch-mult"), (["--grid", "0"], "--grid"),
                            (["--out", folder], "--out"), (["--out", ""], "--out"), (["--out", os.path.join(ckpt, "x")], "--out"),
                            (["--vae-out", fake_out], "--vae-out")]:
            refused(f"make_fake_checkpoint {' '.join(map(repr, extra))}",
                    *export_in_process(fbase + extra, make_fake_checkpoint)[::2], flag, [os.path.dirname(fake_out)])
        refused("make_fake_checkpoint --size mar_base --width 64",
                *export_in_process(["--size", "mar_base", "--out", fake_out, "--width", "64"], make_fake_checkpoint)[::2],
                "--width", [os.path.dirname(fake_out)])
        as_user = without_write_override()
        if as_user is None:
            print("skipped: a read-only parent folder (root, and setpriv cannot drop its override of file modes)")
        else:
            locked = os.path.join(tmp, "read-only")
            os.makedirs(locked)
            os.chmod(locked, 0o555)
            for cmd, flag in (([PY, EXPORT, *base[:-1], os.path.join(locked, "sub")], "--out"),
                              ([PY, EXPORT, *base[:-1], locked], "--out"),
                              ([PY, FAKE, "--size", "custom", "--out", os.path.join(locked, "sub", "x.pth")], "--out")):
                p, _ = run(as_user + cmd)
                refused(f"{os.path.basename(cmd[1])} {flag} under a read-only folder", p.returncode, p.stderr, flag,
                        [os.path.join(locked, "sub")])
            os.chmod(locked, 0o755)

        # 6. interrupted: one line, 128 + the signal, nothing changed, nothing left
        small, small_vae = os.path.join(tmp, "small.pth"), os.path.join(tmp, "small_vae.ckpt")
        rc, _, err = export_in_process(TINY + ["--out", small, "--vae-out", small_vae, "--seed", "3"], make_fake_checkpoint)
        assert rc == 0, err
        sargs = ["--checkpoint", small, "--vae", small_vae, "--size", "custom"]
        fresh = os.path.join(tmp, "interrupted", "a", "b")
        rc, err = signal_export(sargs + ["--out", fresh], signal.SIGINT, "encoder: encoder.onnx")
        assert rc == 130 and err.count("\n") == 1 and "interrupted (SIGINT)" in err, (rc, err)
        assert not os.path.exists(os.path.join(tmp, "interrupted")), "an interrupted export left the folders it made"
        print(f"ok   SIGINT: exit 130, one line, the folders it made removed ({err.strip()})")
        before = contents(out)
        rc, err = signal_export(sargs + ["--out", out], signal.SIGTERM, "decoder: decoder.onnx")
        assert rc == 143 and err.count("\n") == 1 and "interrupted (SIGTERM)" in err, (rc, err)
        assert contents(out) == before, "an export stopped by SIGTERM changed the bundle (or left its staging folder)"
        print(f"ok   SIGTERM: exit 143, one line, the bundle unchanged, no staging folder left ({err.strip()})")

        # 7. re-export over a bundle that other tools extended: what they made from the old
        # weights goes, files no manifest named stay
        for tool in (["split_head.py", out], ["convert_precision.py", out, "--precision", "fp16"]):
            p, _ = run([PY, os.path.join(_MODELS, tool[0]), *tool[1:]])
            assert p.returncode == 0, p.stdout + p.stderr
        with open(os.path.join(out, "notes.fp16.onnx"), "w") as f:
            f.write("mine\n")
        extended = set(os.listdir(out))
        assert {"diffusion_condition.onnx", "encoder.fp16.onnx", "diffusion_state.fp16.onnx"} <= extended, extended
        p, dt = run([PY, EXPORT, *sargs, "--out", out, "--quick-vae-check"])
        assert p.returncode == 0, p.stdout + p.stderr
        with open(os.path.join(out, "manifest.yaml")) as f:
            listed = {e["file"] for e in yaml.safe_load(f)["graphs"].values()}
        left = set(os.listdir(out))
        assert left == listed | {"manifest.yaml", "notes.fp16.onnx"}, sorted(left)
        print(f"ok   re-export over an extended bundle ({dt:.1f} s): removed {', '.join(sorted(extended - left))}; "
              "kept notes.fp16.onnx (not in the old manifest)")

        # 8. bench_torch.py: not the same model -> one line, exit 2 (before gtr-run is run)
        bench = os.path.join(_MODELS, "bench_torch.py")
        tiny_bundle = os.path.join(_MODELS, "mar-tiny")
        with open(os.path.join(tiny_bundle, "manifest.yaml")) as f:
            tiny_scale = yaml.safe_load(f)["latent_scale"]
        tampered, other = os.path.join(tmp, "bench-tampered"), os.path.join(tmp, "bench-other")
        os.makedirs(tampered)
        for n in ("manifest.yaml", "encoder.onnx", "decoder.onnx", "diffusion.onnx", "vae_decoder.onnx"):
            shutil.copy(os.path.join(tiny_bundle, n), tampered)
        m = onnx.load(os.path.join(tampered, "decoder.onnx"))
        w = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, w.name))
        onnx.save(m, os.path.join(tampered, "decoder.onnx"))
        shutil.copytree(out, other)
        with open(os.path.join(other, "manifest.yaml")) as f:
            text = re.sub(r"^latent_scale: .*$", f"latent_scale: {tiny_scale!r}", f.read(), flags=re.M)
        with open(os.path.join(other, "manifest.yaml"), "w") as f:
            f.write(text)
        for bundle, what in ((tampered, "ExportCheckFailed: decoder"), (other, "InvalidArgument")):
            p, _ = run([PY, bench, "--bundle", bundle, "--binary", sys.executable, "--batches", "1", "--reps", "1"])
            err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
            assert p.returncode == 2 and len(err) == 1 and what in err[0] and "not the same model" in err[0] \
                and "Traceback" not in p.stderr, p.stderr
            print(f"ok   bench_torch.py on {os.path.basename(bundle)}: exit 2, one line ({err[0][:150]}...)")
        fake_gtr = os.path.join(tmp, "fake-gtr-run")
        with open(fake_gtr, "w") as f:
            f.write("#!/bin/sh\necho \"fake gtr-run: $*\" >&2\nexit 1\n")
        os.chmod(fake_gtr, 0o755)
        p = subprocess.run([PY, bench, "--binary", fake_gtr, "--batches", "1", "--reps", "1", "--work",
                            os.path.join(tmp, "bench-work")], capture_output=True, text=True, cwd=tmp)
        want = f"fake gtr-run: plan {os.path.join(_ROOT, 'schedules', 'mar-64.gtr')} --json"
        assert p.returncode == 2 and want in p.stderr, p.stderr
        print("ok   bench_torch.py's default schedules are the repository's, run from elsewhere")
    print("all export tests passed")


if __name__ == "__main__":
    main()

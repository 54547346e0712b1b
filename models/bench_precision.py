#!/usr/bin/env python3
"""Measure what each precision costs and gains on a bundle, against fp32, in one run.

    python models/bench_precision.py [--bundle models/mar-tiny] [--schedule schedules/mar-64.gtr]

Works on a copy of the bundle (the bundle itself is not changed):

1. writes the fp16, bf16 and int8 variants with convert_precision.py and reports, per graph,
   the max and mean |variant - fp32| on the script's random inputs (bf16: the fp32 emulation,
   see convert_precision.py);
2. generates --images images with each precision and the same seed and compares the pixels
   with fp32's (mean and max |difference| in grey levels, share of pixels that differ);
3. times generation (`seconds.generation` of run.json, per image) of every precision,
   interleaved rep by rep (fp32, fp16, int8, bf16, fp32, ...) so that a shared machine's drift
   hits all alike, after one untimed warm-up run each;
4. with --eval-images N, runs `gtr-run eval` for each precision (N images, --eval-repeats
   seeds) and reports the evaluator's Fréchet distance, class accuracy and classifier score.

bf16 is first tried as it is (ONNX Runtime's CPU provider has no bf16 MatMul kernels: the
failure is reported), then measured through its emulation, listed as `bf16 (emulated)`: a
copy of the bundle whose `precisions.bf16` graphs round the MatMul/Gemm operands and results
to bfloat16 and compute in float32. Its quality numbers are those of bf16 arithmetic with fp32
accumulation; its speed is not bf16's.

Everything goes into a new folder (`bench-precision-XXXX`, made in --work or the system's
temporary folder): nothing already in --work is changed. Prints Markdown tables; everything
measured goes to --json (default <that folder>/bench_precision.json). A bundle that is missing or
malformed is reported in one line (exit status 2) before anything is made.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert_precision  # noqa: E402  (puts the repository root on sys.path for models.*)
from run_record import read_run_record  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_bundle(src, dst):
    """Copies what the manifest of bundle `src` references into the new folder `dst`: the
    manifest, its graphs (with their external data files), precision variants and evaluator files
    inside `src`, at the same relative paths. A graph kept outside `src` (`../tiny/encoder.onnx`)
    is not copied: the copy's manifest names it by its absolute path (never replaced: its variants
    go into the copy). BundleError (models/onnx_save.py) naming what is missing, or a graph whose
    external data lies outside `src` (its location leading out), before anything is copied."""
    from models.fuse_attention import manifest_with_files
    from models.onnx_save import BundleError, external_files, inside, read_manifest

    text, manifest = read_manifest(src)
    files = [e["file"] for e in manifest["graphs"].values()]
    for variant in (manifest.get("precisions") or {}).values():
        files += list(variant.values()) if isinstance(variant, dict) else []
    evaluator = manifest.get("evaluator") or {}
    files += [evaluator[k] for k in ("file", "reference") if isinstance(evaluator.get(k), str)]
    outside = {role: os.path.abspath(os.path.join(src, e["file"])) for role, e in manifest["graphs"].items()
               if not inside(src, os.path.join(src, e["file"]))}
    copies = []   # (source, target): everything checked before anything is copied
    for file in files:
        path = os.path.join(src, file)
        if not inside(src, path):
            continue
        if not os.path.isfile(path):
            raise BundleError(f"{path}: no such file (named in {src}/manifest.yaml)")
        graph = os.path.normpath(os.path.join(dst, os.path.relpath(os.path.abspath(path), os.path.abspath(src))))
        copies.append((path, graph))
        for p in sorted(external_files(path)):
            target = os.path.normpath(os.path.join(os.path.dirname(graph),
                                                   os.path.relpath(p, os.path.dirname(os.path.abspath(path)))))
            if not inside(src, p) or not target.startswith(os.path.join(dst, "")):
                raise BundleError(f"{path} ({file}): its external data {p} lies outside the bundle {src}; "
                                  "nothing was copied")
            copies.append((p, target))
    os.makedirs(dst)
    for path, target in copies:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(path, target)
    with open(os.path.join(dst, "manifest.yaml"), "w") as f:
        f.write(manifest_with_files(text, outside) if outside else text)


def run(cmd, check=True):
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if check and p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    return p


def generate(args, bundle, precision, out, n, batch, seed, npz=None):
    cmd = [args.gtr_run, bundle, args.schedule, "--num-images", str(n), "--batch", str(batch),
           "--seed", str(seed), "--precision", precision, "--out", out, "--force", "--device", args.device,
           "--sampler", args.sampler]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if npz:
        cmd += ["--npz", npz]
    p = run(cmd, check=False)
    if p.returncode != 0:
        return None, p.stderr.strip()
    return read_run_record(out), None


def pixel_stats(a, b):
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {
        "mean_abs": float(d.mean()),
        "max_abs": int(d.max()),
        "share_differing": float((d > 0).mean()),
        "share_over_8": float((d > 8).mean()),
        "images_identical": int(sum(1 for k in range(len(a)) if not d[k].any())),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="the fp32 bundle to measure, copied into the work folder first "
                    "(default: the repository's models/mar-tiny)")
    ap.add_argument("--schedule", help="the schedule of every run (default: the repository's schedules/mar-64.gtr)")
    ap.add_argument("--gtr-run", help="the gtr-run binary (default: the repository's target/release/gtr-run)")
    ap.add_argument("--precisions", nargs="+", default=["fp16", "int8", "bf16"],
                    choices=convert_precision.PRECISIONS + ["tf32"], help="compared with fp32 (tf32: CUDA only)")
    ap.add_argument("--device", default="cpu", help="gtr-run --device (cuda: e.g. --precisions tf32 fp16 bf16)")
    ap.add_argument("--sampler", default="auto", choices=["auto", "host", "graph"], help="gtr-run --sampler")
    ap.add_argument("--images", type=int, default=20, help="images for the pixel comparison")
    ap.add_argument("--speed-images", type=int, default=8, help="images (one batch) per timed run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, help="--threads for gtr-run (default: ONNX Runtime's)")
    ap.add_argument("--eval-images", type=int, default=0, help="images per eval (0: no eval)")
    ap.add_argument("--eval-repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-row-activations", action="store_true",
                    help="int8 variants with one activation scale per row (convert_precision.py's option)")
    ap.add_argument("--quantize-token-projections", action="store_true",
                    help="int8 variants with the token projections quantized too (convert_precision.py's option)")
    ap.add_argument("--work", help="folder in which a new folder of this run is made (default: the system's "
                                   "temporary folder); nothing already there is changed")
    ap.add_argument("--json", help="write everything measured here")
    args = ap.parse_args()
    # Paths given are the caller's (relative to the current folder); the defaults are the
    # repository's.
    for key, default in (("bundle", "models/mar-tiny"), ("schedule", "schedules/mar-64.gtr"),
                         ("gtr_run", "target/release/gtr-run")):
        given = getattr(args, key)
        setattr(args, key, os.path.abspath(given) if given else os.path.join(ROOT, default))
    from models.onnx_save import run_tool

    return run_tool(lambda: bench(args), args.bundle)


def bench(args):
    from models.onnx_save import output_file, read_manifest, write_atomic

    source = args.bundle
    read_manifest(source)  # a missing or malformed bundle is reported before anything is made
    json_path = args.json and output_file("--json", args.json, source)
    if args.work:
        os.makedirs(args.work, exist_ok=True)
    # A new folder of its own: nothing of --work's is overwritten or removed.
    work = tempfile.mkdtemp(prefix="bench-precision-", dir=args.work)
    print(f"working in {work}")
    started = time.time()
    result = {"args": vars(args), "work": work, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}

    # 1. Variants and their per-graph error.
    bundle = os.path.join(work, "bundle")
    copy_bundle(source, bundle)
    emulated = None
    conversions = {}
    quiet = lambda *_: None  # noqa: E731
    for p in args.precisions:
        if p != "tf32":
            conversions[p] = convert_precision.convert(bundle, p, seed=args.seed, log=quiet,
                                                       per_row=args.per_row_activations,
                                                       quantize_token_projections=args.quantize_token_projections)
    if "bf16" in args.precisions and args.device == "cpu":
        emulated = os.path.join(work, "bundle-bf16-emulated")
        copy_bundle(source, emulated)
        conversions["bf16 (emulated)"] = convert_precision.convert(emulated, "bf16", emulate=True, seed=args.seed, log=quiet)
    result["conversions"] = conversions

    # Contenders: (label, bundle, precision).
    contenders = [("fp32", bundle, "fp32")]
    for p in args.precisions:
        contenders.append((p, bundle, p))
    if emulated:
        contenders.append(("bf16 (emulated)", emulated, "bf16"))

    # 2. Pixels against fp32.
    images = {}
    chains = {}
    failures = {}
    for label, b, p in contenders:
        out = os.path.join(work, f"images-{p}" + ("-emulated" if b == emulated else ""))
        npz = out + ".npz"
        record, error = generate(args, b, p, out, args.images, min(args.images, 25), args.seed, npz)
        if error:
            failures[label] = error
            continue
        images[label] = np.load(npz)["arr_0"]
        chains[label] = record.get("diffusion_chains", "host")
    result["failures"] = failures
    result["diffusion_chains"] = chains
    result["pixels"] = {label: pixel_stats(images["fp32"], a) for label, a in images.items() if label != "fp32"}
    timed = [c for c in contenders if c[0] in images]

    # 3. Speed, interleaved.
    speed = {label: [] for label, _, _ in timed}
    graphs = {label: [] for label, _, _ in timed}
    for rep in range(-1, args.reps):
        for label, b, p in timed:
            out = os.path.join(work, "speed")
            record, error = generate(args, b, p, out, args.speed_images, args.speed_images, 1000 + max(rep, 0))
            if error:
                raise SystemExit(f"{label}: {error}")
            if rep >= 0:
                speed[label].append(record["seconds"]["generation"] / args.speed_images)
                graphs[label].append({g["graph"]: g["seconds"] / args.speed_images for g in record["graphs"]})
    result["speed"] = {label: {"seconds_per_image": v, "graphs_per_image": graphs[label]} for label, v in speed.items()}

    # 4. Quality with the bundle's evaluator.
    quality = {}
    if args.eval_images:
        for label, b, p in timed:
            out = os.path.join(work, "eval-" + label.replace(" ", "_").replace("(", "").replace(")", ""))
            cmd = [args.gtr_run, "eval", b, args.schedule, "--precision", p, "--num-images", str(args.eval_images),
                   "--repeats", str(args.eval_repeats), "--seed", str(args.seed), "--out", out, "--force",
                   "--device", args.device, "--sampler", args.sampler]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            run(cmd)
            with open(os.path.join(out, "eval.json")) as f:
                row = json.load(f)["comparison"]["schedules"][0]
            quality[label] = row["quality"]
    result["quality"] = quality
    result["seconds"] = time.time() - started

    # Tables.
    print(f"\n{args.bundle}, {args.schedule}, seed {args.seed}, --device {args.device}, diffusion chains: "
          f"{', '.join(sorted(set(chains.values())))}; {result['date']}\n")
    print("Per graph: |variant − fp32| on random inputs (max / mean; outputs up to)\n")
    roles = ["encoder", "decoder", "diffusion", "vae_decoder"]
    print("| precision | " + " | ".join(roles) + " |")
    print("|---|" + "---|" * len(roles))
    for label, rep in conversions.items():
        if label == "bf16 (emulated)" and "bf16" in conversions:
            continue  # the same numbers: bf16's check runs the emulation
        cells = []
        for r in roles:
            g = rep["graphs"].get(r, {})
            e = g.get("error_vs_fp32")
            cells.append("fp32 graph" if e is None else f"{e['max_abs']:.2g} / {e['mean_abs']:.2g} ({e['output_max_abs']:.2g})")
        name = label + (" (emulated check)" if label == "bf16" and rep["graphs"] else "")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nImages ({args.images}, seed {args.seed}) against fp32, grey levels 0–255\n")
    print("| precision | mean |Δ| | max |Δ| | pixels differing | > 8 levels | identical images |")
    print("|---|---|---|---|---|---|")
    for label, s in result["pixels"].items():
        print(f"| {label} | {s['mean_abs']:.3f} | {s['max_abs']} | {100 * s['share_differing']:.1f}% | "
              f"{100 * s['share_over_8']:.2f}% | {s['images_identical']}/{args.images} |")
    for label, e in failures.items():
        print(f"| {label} | fails: {e.splitlines()[0][:160]} |||||")
    base = statistics.median(speed["fp32"])
    print(f"\nSpeed: {args.speed_images} images per run, {args.reps} interleaved reps, threads {args.threads or 'default'}\n")
    print("| precision | s/image (median, min–max) | vs fp32 (ratio of medians) | diffusion (+sampler) s/image | encoder+decoder s/image |")
    print("|---|---|---|---|---|")
    for label, v in speed.items():
        med = statistics.median(v)
        diff = statistics.median(g["diffusion"] + g.get("sampler", 0.0) for g in graphs[label])
        bb = statistics.median(g["encoder"] + g["decoder"] for g in graphs[label])
        print(f"| {label} | {med:.3f} ({min(v):.3f}–{max(v):.3f}) | {base / med:.2f}× | {diff:.3f} | {bb:.3f} |")
    if quality:
        print(f"\nQuality: gtr-run eval, {args.eval_images} images × {args.eval_repeats} seed(s)\n")
        print("| precision | FD | class accuracy | classifier score |")
        print("|---|---|---|---|")
        for label, q in quality.items():
            def ms(key, scale=1.0):
                v = [scale * x[key] for x in q]
                s = statistics.stdev(v) if len(v) > 1 else 0.0
                return f"{statistics.mean(v):.2f} ± {s:.2f}" if len(v) > 1 else f"{v[0]:.2f}"
            print(f"| {label} | {ms('frechet_distance')} | {ms('class_accuracy', 100)}% | {ms('classifier_score')} |")
    path = json_path or os.path.join(work, "bench_precision.json")
    write_atomic(path, json.dumps(result, indent=2) + "\n")
    print(f"\n({result['seconds']:.0f} s; everything in {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

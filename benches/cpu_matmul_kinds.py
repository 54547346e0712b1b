#!/usr/bin/env python3
"""Which of the ways ONNX Runtime's CPU provider can run a bundle's MatMuls is fastest here, and
what each costs in error: one graph of a bundle timed in every kind side by side on the same
inputs, each against the fp32 graph.

  python3 benches/cpu_matmul_kinds.py BUNDLE [--graph diffusion|encoder|decoder] [--rows 32]
      [--known 128] [--threads 2] [--reps 30] [--kinds fp32 int8 ...]

The kinds (every one but fp32 and fp16 made here, in a temporary folder, from the fp32 graph):

- fp32: the bundle's graph (gtr-run's default).
- int8, int8-row: what `models/convert_precision.py --precision int8` writes (dynamic quantization:
  int8 weights per output channel, activations quantized on the fly, one scale per tensor or,
  with `--per-row-activations`, per row), made by the same function; what `--precision int8` runs.
- fp16: the weights and MatMuls in float16 as `convert_precision.py --precision fp16` writes them
  (on the CPU, ONNX Runtime runs them through casts in fp32 arithmetic).
- nbits8, nbits8-int8, nbits4, nbits4-int8: weight-only quantization, ONNX Runtime's
  `MatMulNBits` (`onnxruntime.quantization.matmul_nbits_quantizer`, blocks of 32 along the input,
  symmetric) at 8 or 4 bits: activations stay float32 and the weights are expanded in the kernel
  (accuracy level 0), or the activations are quantized to int8 in the kernel (accuracy level 4,
  `-int8`). Token projections stay float32, as in int8.

bf16 is not a kind: the CPU provider has no bf16 MatMul kernel on x86.

For --graph diffusion the inputs are --rows rows (MAR-16 at batch 1 with guidance: 32); for the
encoder or decoder, --rows images (batch rows) with --known known tokens. Prints one Markdown
row per kind: the median seconds of --reps calls after one untimed call, fp32's time over the
kind's, and max |kind - fp32| over the largest fp32 output magnitude. Needs onnx, onnxruntime
(with its quantization tools), numpy and PyYAML (models/fixtures/requirements.txt).
"""

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.convert_precision import convert_graph, gemm_to_matmul, random_feeds, token_projections  # noqa: E402

KINDS = ["fp32", "int8", "int8-row", "fp16", "nbits8", "nbits8-int8", "nbits4", "nbits4-int8"]


def nbits(model: onnx.ModelProto, bits: int, accuracy_level: int, token_dim: int) -> onnx.ModelProto:
    """`model` with its constant-weight MatMuls (Gemms rewritten as MatMuls first) as MatMulNBits,
    token projections excepted."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model, _ = gemm_to_matmul(model)
    keep = token_projections(model, token_dim)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True,
                                     accuracy_level=accuracy_level, nodes_to_exclude=keep)
    quantizer.process()
    return quantizer.model.model


def variant(model: onnx.ModelProto, kind: str, token_dim: int) -> onnx.ModelProto:
    """The graph `model` in `kind` (module doc)."""
    if kind == "fp32":
        return model
    if kind in ("int8", "int8-row"):
        return convert_graph(model, "int8", per_row=kind == "int8-row", token_dim=token_dim)[0]
    if kind == "fp16":
        return convert_graph(model, "fp16")[0]
    bits = int(kind[len("nbits"):].split("-")[0])
    return nbits(model, bits, 4 if kind.endswith("-int8") else 0, token_dim)


def timed(session: ort.InferenceSession, feed: dict, reps: int) -> tuple[float, list]:
    """(median seconds of `reps` runs after one untimed run, the outputs)."""
    outputs = session.run(None, feed)
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run(None, feed)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--graph", default="diffusion", choices=["diffusion", "encoder", "decoder"])
    ap.add_argument("--rows", type=int, default=32, help="head rows, or images for the encoder and decoder")
    ap.add_argument("--known", type=int, default=128, help="known tokens (encoder and decoder)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    a = ap.parse_args()
    if a.rows < 1 or a.reps < 1 or a.threads < 1 or a.known < 0:
        sys.exit("--rows, --reps and --threads must be at least 1, --known at least 0")

    manifest_path = a.bundle / "manifest.yaml"
    try:
        manifest = yaml.safe_load(manifest_path.read_text())
        entry = manifest["graphs"][a.graph]
        path = a.bundle / entry["file"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        sys.exit(f"{manifest_path}: no graphs.{a.graph} entry to read ({e})")
    grid = manifest["grid"][0] * manifest["grid"][1]
    if a.graph != "diffusion" and a.known > grid:
        sys.exit(f"--known {a.known}: the grid has {grid} tokens")
    case = (a.rows,) if a.graph == "diffusion" else (a.rows, a.known)
    base = onnx.load(str(path))

    options = ort.SessionOptions()
    options.intra_op_num_threads = a.threads
    options.log_severity_level = 3
    cpu = ["CPUExecutionProvider"]
    feed = None
    rows = []
    print(f"{path} ({a.graph}), case {case}, {a.threads} threads, median of {a.reps} calls", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in a.kinds:
            try:
                model = variant(onnx.load(str(path)) if kind != "fp32" else base, kind, manifest["token_dim"])
                file = f"{tmp}/{kind}.onnx"
                onnx.save(model, file)
                session = ort.InferenceSession(file, options, providers=cpu)
            except Exception as e:  # a kind this ONNX Runtime cannot make or load is a row, not the end
                rows.append((kind, None, f"not run: {type(e).__name__}: {str(e).splitlines()[0][:160]}"))
                print(f"{kind}: not run ({e})", flush=True)
                continue
            if feed is None:
                feed = random_feeds(a.graph, manifest, entry, session, np.random.default_rng(0), case)
            seconds, outputs = timed(session, feed, a.reps)
            rows.append((kind, seconds, outputs))
            print(f"{kind}: {seconds * 1e3:.2f} ms", flush=True)

    reference = next((out for kind, s, out in rows if kind == "fp32" and s is not None), None)
    fp32_seconds = next((s for kind, s, _ in rows if kind == "fp32"), None)
    print("\n| kind | ms per call | fp32 / kind | max abs error / fp32 output scale |")
    print("|---|---|---|---|")
    for kind, seconds, outputs in rows:
        if seconds is None:
            print(f"| {kind} | {outputs} | | |")
            continue
        speed = f"{fp32_seconds / seconds:.2f}×" if fp32_seconds else ""
        error = ""
        if reference is not None:
            scale = max(float(np.abs(r).max()) for r in reference)
            worst = max(float(np.abs(o.astype(np.float64) - r).max()) for o, r in zip(outputs, reference))
            error = f"{worst / scale:.2e}"
        print(f"| {kind} | {seconds * 1e3:.2f} | {speed} | {error} |")


if __name__ == "__main__":
    main()

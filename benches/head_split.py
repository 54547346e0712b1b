#!/usr/bin/env python3
"""What splitting a bundle's diffusion head in two gains per tick on this machine, the parts
timed alone: the bundle's own split head where it has one for the precision (models/split_head.py's
graphs, what gtr-run's `--head split` runs), else this script's own cut at the same place (without
split_head's packing of the cut tensors; for --precision fp16/int8 a cut of the converted head,
where split_head cuts in fp32 and converts each part). It says which it timed.

  python3 benches/head_split.py BUNDLE [--precision int8] [--rows 32] [--ticks 10 25 100]

A head's result for a row is f(x, g(t, z)): much of it (MAR's time and condition embeddings and
every block's adaLN modulation) reads only the timestep t and the conditioning z, never the
chain's state x. Within a MAR step every row's z is fixed and every tick's t is known before the
first tick, so g could run once for many ticks at a time, on rows x ticks rows, and the per-tick
call would run only the part that reads x. This script cuts the head's graph there (the tensors
computed from t and z alone that a node reading x consumes), checks that the two parts together
give the whole graph's output (exit 1 past 1e-5 in fp32, 1e-3 otherwise, of the output's scale),
and times:

- the whole head on --rows rows (what a tick costs today);
- the x part on --rows rows, plus the (t, z) part on rows x T rows divided by T (a tick's cost
  when g runs once per T ticks), for each T of --ticks.

Needs onnx, onnxruntime and numpy (models/fixtures/requirements.txt) and PyYAML.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import yaml
from onnx.utils import Extractor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.split_head import cut  # noqa: E402  (the repository's models/ package)


def head_file(bundle: Path, precision: str) -> tuple[Path, dict, int]:
    """The diffusion head's graph file for `precision`, its manifest entry (I/O names) and the
    model's training timesteps."""
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    entry = manifest["graphs"]["diffusion"]
    steps = int(manifest["diffusion"]["train_steps"])
    if precision == "fp32":
        return bundle / entry["file"], entry, steps
    variants = manifest.get("precisions", {}).get(precision, {})
    if "diffusion" not in variants:
        sys.exit(f"{bundle}/manifest.yaml: precisions.{precision} has no diffusion graph "
                 f"(models/convert_precision.py {bundle} --precision {precision})")
    return bundle / variants["diffusion"], entry, steps


def split_files(bundle: Path, precision: str) -> tuple[Path, dict, Path, dict] | None:
    """The bundle's own split head for `precision` (models/split_head.py's diffusion_condition and
    diffusion_state graphs, what gtr-run's `--head split` runs): (condition file, its entry, state
    file, its entry), or None where the bundle has none."""
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    graphs = manifest["graphs"]
    if "diffusion_condition" not in graphs or "diffusion_state" not in graphs:
        return None
    files = {role: graphs[role]["file"] for role in ("diffusion_condition", "diffusion_state")}
    if precision != "fp32":
        variants = manifest.get("precisions", {}).get(precision, {})
        if not all(role in variants for role in files):
            return None
        files = {role: variants[role] for role in files}
    return (bundle / files["diffusion_condition"], graphs["diffusion_condition"],
            bundle / files["diffusion_state"], graphs["diffusion_state"])


def weights_in(model: onnx.ModelProto) -> int:
    """Number of initializer values of a graph."""
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer)


def timed(session: ort.InferenceSession, feed: dict, reps: int) -> float:
    """Median seconds of `reps` runs after one untimed run."""
    session.run(None, feed)
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run(None, feed)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    ap.add_argument("--rows", type=int, default=32, help="rows of a tick (MAR-16 at batch 1 with CFG: 32)")
    ap.add_argument("--ticks", type=int, nargs="+", default=[10, 25, 100])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    path, entry, train_steps = head_file(a.bundle, a.precision)
    names = entry["inputs"]
    x, t, z, out = names["x"], names["t"], names["z"], entry["outputs"]["out"]
    model = onnx.load(str(path))
    own = split_files(a.bundle, a.precision)
    if own:
        # The parts gtr-run runs; their inputs renamed to the whole head's where they differ.
        cond_path, cond_entry, state_path, state_entry = own
        cond_part, x_part = onnx.load(str(cond_path)), onnx.load(str(state_path))
        rename = {cond_entry["inputs"]["t"]: t, cond_entry["inputs"]["z"]: z, state_entry["inputs"]["x"]: x}
        for part in (cond_part, x_part):
            for node in part.graph.node:
                node.input[:] = [rename.get(i, i) for i in node.input]
            for value in part.graph.input:
                value.name = rename.get(value.name, value.name)
        frontier = [cond_entry["outputs"]["cond"]]
        if state_entry["inputs"]["cond"] != frontier[0]:
            sys.exit(f"{a.bundle}: diffusion_condition's output and diffusion_state's input are named apart")
        source = f"the bundle's split head ({cond_path.name}, {state_path.name}: what gtr-run --head split runs)"
    else:
        frontier = cut(model, x, [t, z])
        if not frontier:
            sys.exit(f"{path}: nothing is computed from {t} and {z} alone before {x} is read")
        extractor = Extractor(onnx.shape_inference.infer_shapes(model))
        for name in frontier:  # where shape inference gave no type: the tensors of heads' cuts are float
            extractor.value_infos.setdefault(name, onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                                                     None))
        cond_part = extractor.extract_model([t, z], frontier)
        x_part = extractor.extract_model([x] + frontier, [out])
        source = ("this script's own cut of the head (the bundle has no split head for this precision: "
                  "models/split_head.py makes one, as gtr-run runs it)")

    options = ort.SessionOptions()
    options.intra_op_num_threads = a.threads
    cpu = ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(cond_part, f"{tmp}/cond.onnx")
        onnx.save(x_part, f"{tmp}/x.onnx")
        whole = ort.InferenceSession(str(path), options, providers=cpu)
        cond = ort.InferenceSession(f"{tmp}/cond.onnx", options, providers=cpu)
        xs = ort.InferenceSession(f"{tmp}/x.onnx", options, providers=cpu)

    rng = np.random.default_rng(0)
    shapes = {i.name: i.shape for i in whole.get_inputs()}
    n, width, token = a.rows, shapes[z][1], shapes[x][1]

    def rows_of(count: int) -> dict:
        return {t: rng.integers(0, train_steps, count).astype(np.int64),
                z: rng.standard_normal((count, width), dtype=np.float32)}

    tick = {x: rng.standard_normal((n, token), dtype=np.float32), **rows_of(n)}
    parts = dict(zip(frontier, cond.run(None, {t: tick[t], z: tick[z]})))
    for name, value in parts.items():
        if value.shape[:1] != (n,):
            sys.exit(f"{path}: split tensor {name} has shape {value.shape}, not [rows, ...]; "
                     "this head does not split by rows")
    split_out = xs.run(None, {x: tick[x], **parts})[0]
    whole_out = whole.run(None, tick)[0]
    print(f"{path}: timing {source}; {len(frontier)} tensors cross the cut; weights in the (t, z) part "
          f"{weights_in(cond_part) / weights_in(model):.0%} of the head's")
    diff, scale = float(np.abs(split_out - whole_out).max()), float(np.abs(whole_out).max())
    print(f"check: max |split - whole| = {diff:.3g} (whole output up to {scale:.3g})")
    tolerance = (1e-5 if a.precision == "fp32" else 1e-3) * max(1.0, scale)
    if not diff <= tolerance:
        sys.exit(f"{path}: the two parts are {diff:.3g} from the whole head (over {tolerance:.3g}); "
                 "nothing is timed")

    print(f"\nper tick on {n} rows, {a.threads} threads, {a.precision} (medians: the whole head and the x part "
          f"of {a.reps} runs, timed again before each row; the (t, z) part of max(3, {a.reps} // T) runs "
          "on rows x T rows):")
    print("| (t, z) part runs once per | whole head | x part | (t, z) part per tick | split | whole / split "
          "| max diff, rows batched vs alone |")
    print("|---|---|---|---|---|---|---|")
    for ticks in a.ticks:
        many = rows_of(n * ticks)
        alone = cond.run(None, {t: many[t][:n], z: many[z][:n]})
        batched = cond.run(None, many)
        drift = max(float(np.abs(b[:n] - s).max()) for b, s in zip(batched, alone))
        t_whole = timed(whole, tick, a.reps)
        t_x = timed(xs, {x: tick[x], **parts}, a.reps)
        t_cond = timed(cond, many, max(3, a.reps // ticks)) / ticks
        print(f"| {ticks} ticks | {t_whole * 1e3:.2f} ms | {t_x * 1e3:.2f} ms | {t_cond * 1e3:.2f} ms "
              f"| {(t_x + t_cond) * 1e3:.2f} ms | {t_whole / (t_x + t_cond):.2f}x | {drift:.3g} |")

if __name__ == "__main__":
    main()

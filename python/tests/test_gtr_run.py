"""The Python API against the command line: same plans, same image bytes, same errors.

The command line is ``$GTR_RUN_BIN``, else ``target/debug/gtr-run`` (built here if missing).
"""

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gtr_run

ROOT = Path(__file__).resolve().parents[2]
SCHEDULES = ROOT / "schedules"
TINY = ROOT / "models" / "fixtures" / "tiny"
MAR_TINY = ROOT / "models" / "mar-tiny"


@pytest.fixture(scope="session")
def cli():
    path = Path(os.environ.get("GTR_RUN_BIN", ROOT / "target" / "debug" / "gtr-run"))
    if not path.exists():
        subprocess.run(["cargo", "build", "--bin", "gtr-run"], cwd=ROOT, check=True)
    return path


def run_cli(cli, *args, ok=True):
    out = subprocess.run([str(cli), *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if ok:
        assert out.returncode == 0, out.stderr
    return out


@pytest.mark.parametrize(
    "name, seed, grid, params",
    [
        ("gtr.gtr", 0, None, {}),
        ("mar-64.gtr", 3, None, {}),
        ("random.gtr", 7, (8, 12), {}),
        ("disa.gtr", 1, None, {}),
        ("gtr-fts-random.gtr", 2, "16x16", {"cfg_scale": 1.5}),
    ],
)
def test_plan_matches_plan_json(cli, name, seed, grid, params):
    path = f"schedules/{name}"
    args = ["plan", path, "--json", "--seed", seed, "--cost", "mar-b"]
    if grid is not None:
        args += ["--grid", grid if isinstance(grid, str) else f"{grid[0]}x{grid[1]}"]
    for k, v in params.items():
        args += ["--set", f"{k}={v}"]
    want = json.loads(run_cli(cli, *args).stdout)

    cwd = os.getcwd()
    os.chdir(ROOT)  # the schedule's name is the path as given, as on the command line
    try:
        p = gtr_run.plan(path, grid=grid, seed=seed, **params)
    finally:
        os.chdir(cwd)
    got = p.to_json()
    got["cost"] = p.cost("mar-b")
    assert got == want

    assert len(p) == len(want["steps"])
    for step, w in zip(p.steps, want["steps"]):
        assert step.stage == w["stage"]
        assert step.tokens.dtype == np.int64
        assert step.tokens.tolist() == w["tokens"]
        assert (step.known_before, step.diffusion_steps) == (w["known_before"], w["diffusion_steps"])
        assert (step.cfg, step.temperature, step.detail) == (w["cfg"], w["temperature"], w["detail"])
        assert step.clip_timesteps == w.get("clip_timesteps")
        if step.clip_timesteps is not None:
            assert f"clip_timesteps={step.clip_timesteps}" in repr(step)
    assert p.grid == tuple(want["grid"]) and p.seed == seed
    assert p.stages == want["stages"] and p.params == want["params"]


def test_reveal_grid_and_picture():
    p = gtr_run.plan(SCHEDULES / "gtr.gtr", seed=4)
    reveal = p.reveal
    assert reveal.shape == (16, 16)
    for k, step in enumerate(p.steps):
        assert (reveal.reshape(-1)[step.tokens] == k).all()
    assert sorted(np.unique(p.stage_of_token).tolist()) == [0, 1, 2]
    picture = p.picture()
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert "reveal step of each token" in str(p)


def test_schedule_from_text_plans_like_the_file():
    path = SCHEDULES / "gtr-fast.gtr"
    from_file = gtr_run.plan(path, seed=2).to_json()
    from_text = gtr_run.plan(path.read_text(), seed=2).to_json()
    assert from_text.pop("schedule") == "<string>"
    from_file.pop("schedule")
    assert from_text == from_file


def test_cost_takes_a_bundle_and_refuses_unknown_specs(cli, tmp_path):
    p = gtr_run.plan(SCHEDULES / "mar-8.gtr")
    assert p.cost(TINY)["total_flops"] > 0
    with pytest.raises(ValueError, match="no such model spec or bundle"):
        p.cost("mar-xl")
    # On a bundle, as `plan --cost BUNDLE`: planned with the bundle's guidance default, so a
    # schedule without `cfg` costs both branches.
    unguided = tmp_path / "unguided.gtr"
    unguided.write_text("stage a { tokens all  order random  steps 8 }\n")
    want = json.loads(run_cli(cli, "plan", unguided, "--json", "--cost", MAR_TINY).stdout)["cost"]
    assert gtr_run.plan(unguided).cost(MAR_TINY) == want
    assert want["encoder_passes"] == 16
    with pytest.raises(ValueError, match="has a 16x16 grid"):
        gtr_run.plan(unguided, grid="8x8").cost(MAR_TINY)
    # A plan the bundle cannot run (50 diffusion steps on a 10-step training chain) is refused,
    # as a run on it would be.
    short = tmp_path / "short-chain"
    shutil.copytree(TINY, short, ignore=shutil.ignore_patterns("golden"))
    manifest = (short / "manifest.yaml").read_text()
    (short / "manifest.yaml").write_text(manifest.replace("train_steps: 1000 ", "train_steps: 10 ", 1))
    with pytest.raises(gtr_run.ScheduleError, match="was trained with 10"):
        gtr_run.plan(SCHEDULES / "gtr.gtr").cost(short)


def test_schedule_errors_carry_the_cli_message_and_position(cli, tmp_path):
    bad = tmp_path / "bad.gtr"
    bad.write_text("partition checker(2)\nstage a { tokens S9  steps 4 }\n")
    cli_message = run_cli(cli, "plan", bad, ok=False).stderr
    with pytest.raises(gtr_run.ScheduleError) as caught:
        gtr_run.plan(bad)
    e = caught.value
    assert str(e) + "\n" == cli_message
    assert (e.line, e.column, e.file) == (2, 18, str(bad))
    assert isinstance(e, gtr_run.GtrRunError)
    with pytest.raises(gtr_run.ScheduleError) as caught:
        gtr_run.plan("stage a {\n  tokens all\n  steps }\n")
    assert caught.value.line == 3 and caught.value.file == "<string>"
    with pytest.raises(gtr_run.ScheduleError, match="no-such.gtr"):
        gtr_run.plan("no-such.gtr")
    # A parameter the schedule lacks is a bad argument, as in eval.
    with pytest.raises(ValueError, match="params: `no_such_param`: .* has no parameter"):
        gtr_run.plan(SCHEDULES / "gtr.gtr", no_such_param=1.0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="grid"):
        gtr_run.plan(SCHEDULES / "gtr.gtr", grid="sixteen")
    with pytest.raises(ValueError, match="not a finite number"):
        gtr_run.plan(SCHEDULES / "gtr.gtr", cfg_scale=float("nan"))
    with pytest.raises(ValueError, match="device"):
        gtr_run.Model(TINY, device="gpu")
    with pytest.raises(ValueError, match="precision"):
        gtr_run.Model(TINY, precision="fp8")
    with pytest.raises(gtr_run.GtrRunError, match="no-such-bundle"):
        gtr_run.Model(ROOT / "no-such-bundle")
    with pytest.raises(ValueError, match="sampler"):
        gtr_run.Model(TINY, sampler="loop")
    with pytest.raises(gtr_run.GtrRunError, match="has no tick graph"):
        gtr_run.Model(TINY, sampler="ticks")
    with pytest.raises(ValueError, match="head"):
        gtr_run.Model(TINY, head="halves")
    with pytest.raises(gtr_run.GtrRunError, match="models/split_head.py"):
        gtr_run.Model(TINY, head="split")
    with pytest.raises(ValueError, match="head: --head split chooses"):
        gtr_run.Model(TINY, head="split", sampler="graph")


def test_sampler_choice_runs_the_chains_there():
    """`sampler` is `--sampler`: mar-tiny's tick graph (a call per tick) gives the host path's
    images to within a level, and the record says where the chains ran."""
    schedule = SCHEDULES / "gtr-fast.gtr"
    runs = {}
    for sampler in ["host", "ticks"]:
        model = gtr_run.Model(MAR_TINY, sampler=sampler)
        runs[sampler] = model.generate(schedule, 4, seed=3, progress=False)
    assert runs["host"][1]["diffusion_chains"] == "host"
    assert runs["ticks"][1]["diffusion_chains"] == "tick graph"
    gap = np.abs(runs["host"][0].astype(int) - runs["ticks"][0].astype(int)).max()
    assert gap <= 1, gap


def test_head_choice_gives_the_same_images():
    """`head` is `--head`: the tiny fixture's head in its two parts makes the whole head's bytes,
    and the record says which ran."""
    schedule = SCHEDULES / "gtr-fast.gtr"
    runs = {head: gtr_run.Model(TINY.parent / "tiny-split", head=head).generate(schedule, 3, seed=2, progress=False)
            for head in ["split", "whole"]}
    assert runs["split"][1]["diffusion_chains"] == "host (split head)"
    assert runs["whole"][1]["diffusion_chains"] == "host"
    assert np.array_equal(runs["split"][0], runs["whole"][0])


def test_backbone_choice_is_the_command_lines():
    """`backbone` is `--backbone`: on the CPU `auto` runs the two graphs, as the command line does,
    `fused` the bundle's backbone graph; the images are the same."""
    schedule = SCHEDULES / "gtr-fast.gtr"
    bundle = TINY.parent / "tiny-sampler"
    runs = {b: gtr_run.Model(bundle, backbone=b).generate(schedule, 3, seed=2, progress=False)
            for b in ["auto", "fused"]}
    assert runs["auto"][1]["backbone"] == "encoder and decoder"
    assert runs["fused"][1]["backbone"] == "backbone graph"
    assert np.array_equal(runs["auto"][0], runs["fused"][0])
    with pytest.raises(ValueError, match="backbone: "):
        gtr_run.Model(bundle, backbone="both")


def test_vae_choice_is_the_command_lines():
    """`vae` is `--vae`: on the CPU `auto` decodes inline, as the command line does; `overlap`
    decodes beside the next batch's sampling, to the same images, each batch seen in order."""
    schedule = SCHEDULES / "mar-8.gtr"
    runs = {}
    for vae in ["auto", "overlap"]:
        seen = []
        runs[vae] = gtr_run.Model(TINY, vae=vae).generate(
            schedule, 5, seed=2, batch=2, progress=lambda done, total: seen.append(done))
        assert seen == [2, 4, 5], vae
    assert runs["auto"][1]["vae_decode"] == "inline"
    assert runs["overlap"][1]["vae_decode"] == "overlap"
    assert np.array_equal(runs["auto"][0], runs["overlap"][0])
    assert runs["auto"][1]["images_sha256"] == runs["overlap"][1]["images_sha256"]
    with pytest.raises(ValueError, match="vae: "):
        gtr_run.Model(TINY, vae="later")


@pytest.fixture(scope="module")
def tiny():
    return gtr_run.Model(TINY)


def test_generate_refuses_bad_requests(tiny):
    fast = SCHEDULES / "gtr-fast.gtr"
    with pytest.raises(ValueError, match="num_images"):
        tiny.generate(fast, 0)
    with pytest.raises(ValueError, match="class 12 is out of range"):
        tiny.generate(fast, 2, classes=[1, 12])
    with pytest.raises(ValueError, match="cfg"):
        tiny.generate(fast, 1, cfg=-1.0)
    with pytest.raises(ValueError, match="progress"):
        tiny.generate(fast, 1, progress="yes")
    # Out of range, negative or huge: a ValueError with the range, not an
    # OverflowError from the conversion; another type: a TypeError naming it.
    for kwargs, name in [({"num_images": -1}, "num_images"), ({"num_images": 10**30}, "num_images"),
                         ({"seed": -1}, "seed"), ({"batch": -2}, "batch")]:
        args = {"num_images": 1, **kwargs}
        with pytest.raises(ValueError, match=f"{name}: .* is not a whole number from"):
            tiny.generate(fast, progress=False, **args)
    with pytest.raises(TypeError, match="num_images"):
        tiny.generate(fast, "2")
    # numpy's ints are ints.
    assert tiny.generate(fast, np.int64(1), seed=np.uint64(3), progress=False)[0].shape[0] == 1
    with pytest.raises(ValueError, match="seed: -1 is not a whole number from 0 to"):
        gtr_run.plan(fast, seed=-1)
    with pytest.raises(ValueError, match="params: `nope`"):
        tiny.generate(fast, 1, params={"nope": 1.0}, progress=False)
    # More images than memory holds: refused before the work, not an abort.
    with pytest.raises(ValueError, match="do not fit in memory"):
        tiny.generate(SCHEDULES / "mar-8.gtr", 10**7, progress=False)


def test_params_take_any_mapping(tiny):
    from types import MappingProxyType
    fast = SCHEDULES / "gtr-fast.gtr"
    a = tiny.generate(fast, 1, params=MappingProxyType({"cfg_scale": 2.0}), progress=False)[0]
    b = tiny.generate(fast, 1, params={"cfg_scale": 2.0}, progress=False)[0]
    assert np.array_equal(a, b)


def test_each_record_counts_its_own_calls(tiny):
    """A Model used again: each call's record holds that call's graph calls and seconds."""
    records = [tiny.generate(SCHEDULES / "mar-8.gtr", 2, seed=s, progress=False)[1] for s in range(3)]
    calls = [{g["graph"]: g["calls"] for g in r["graphs"]} for r in records]
    assert calls[1] == calls[2] and calls[1]["vae_decoder"] == 1, calls
    for r in records[1:]:
        assert r["seconds"]["outside_runtime_run_calls"] >= 0, r["seconds"]


def test_a_busy_model_says_so(tiny):
    """A call from a progress function (or another thread) while one runs is refused with a
    message; the model's description can be read meanwhile."""
    seen = []

    def nested(done, total):
        seen.append(tiny.image_shape)
        tiny.generate(SCHEDULES / "mar-8.gtr", 1, progress=False)

    with pytest.raises(gtr_run.GtrRunError, match="busy with another generate or eval call"):
        tiny.generate(SCHEDULES / "mar-8.gtr", 2, batch=1, progress=nested)
    assert seen == [tiny.image_shape]
    # Free again afterwards.
    tiny.generate(SCHEDULES / "mar-8.gtr", 1, progress=False)


def test_a_bundle_a_model_tool_is_changing_is_refused(tmp_path):
    """Model() reads the bundle under a shared lock on its folder, as the command line does: while
    a model tool holds the folder (exclusively), or where a tool's commit was interrupted, it
    refuses with GtrRunError; another reader's shared lock does not keep it out."""
    import fcntl

    bundle = tmp_path / "bundle"
    shutil.copytree(TINY, bundle, ignore=shutil.ignore_patterns("golden"))
    fd = os.open(bundle, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(gtr_run.GtrRunError, match="a model tool .* is changing this bundle"):
            gtr_run.Model(bundle)
        fcntl.flock(fd, fcntl.LOCK_SH)
        with pytest.warns(UserWarning):
            gtr_run.Model(bundle)
    finally:
        os.close(fd)
    (bundle / ".gtr-tmp.4242.abcd1234").mkdir()
    (bundle / ".gtr-tmp.4242.abcd1234" / "commit.json").write_text('{"moves": [], "remove": []}')
    with pytest.raises(gtr_run.GtrRunError, match="commit was interrupted"):
        gtr_run.Model(bundle)


def test_the_loader_note_is_a_warning():
    with pytest.warns(UserWarning, match="has no sampler graph"):
        gtr_run.Model(TINY)


def png_pixels(path):
    with Image.open(path) as img:
        a = np.asarray(img)
    return a[..., None] if a.ndim == 2 else a


@pytest.mark.parametrize(
    "bundle, schedule, extra",
    [
        (TINY, "gtr-fast.gtr", []),
        (TINY, "mar-8.gtr", ["--classes", "3,1", "--cfg", "2.5"]),
        (MAR_TINY, "gtr-fast.gtr", ["--temperature", "0.9", "--set", "cfg_scale=2"]),
    ],
)
def test_generate_gives_the_cli_png_bytes(cli, tmp_path, bundle, schedule, extra):
    n, seed = 5, 11
    out = tmp_path / "run"
    run_cli(cli, bundle, SCHEDULES / schedule, "--num-images", n, "--seed", seed, "--out", out, *extra)
    run_json = json.loads((out / "run.json").read_text())

    options = dict(zip(extra[::2], extra[1::2]))
    model = gtr_run.Model(bundle)
    images, record = model.generate(
        SCHEDULES / schedule,
        n,
        seed=seed,
        classes=[int(c) for c in options["--classes"].split(",")] if "--classes" in options else None,
        cfg=float(options["--cfg"]) if "--cfg" in options else None,
        temperature=float(options["--temperature"]) if "--temperature" in options else None,
        params={k: float(v) for k, v in [options["--set"].split("=")]} if "--set" in options else None,
        batch=2,  # the command line used 8: batch size never changes an image
        progress=False,
    )
    assert images.dtype == np.uint8 and images.shape == (n, *model.image_shape)
    for i in range(n):
        png = out / f"{i:05d}.png"
        assert np.array_equal(images[i], png_pixels(png)), f"image {i}"
        assert record["images_sha256"][png.name] == hashlib.sha256(png.read_bytes()).hexdigest()
    assert record["images_sha256"] == run_json["images_sha256"]
    for key in ["seed", "labels", "mar_steps", "num_images", "precision", "execution_provider"]:
        assert record[key] == run_json[key], key
    assert record["schedule"]["params"] == run_json["schedule"]["params"]


def test_progress_callback_sees_each_batch(tiny):
    seen = []
    tiny.generate(SCHEDULES / "mar-8.gtr", 5, batch=2, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 5), (4, 5), (5, 5)]


@pytest.mark.parametrize("vae", ["inline", "overlap"])
def test_an_exception_in_progress_stops_generation(vae):
    """A progress function's exception stops the run at the first batch (with `vae="overlap"`
    the next batch, sampled meanwhile, is dropped), and the Model runs again after it."""
    model = gtr_run.Model(TINY, vae=vae)
    calls = []

    def stop(done, total):
        calls.append(done)
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        model.generate(SCHEDULES / "mar-8.gtr", 6, batch=2, progress=stop)
    assert calls == [2]
    pixels, record = model.generate(SCHEDULES / "mar-8.gtr", 2, batch=1, progress=False)
    assert pixels.shape[0] == 2 and record["vae_decode"] == vae


def test_the_gil_is_released_while_generating():
    model = gtr_run.Model(MAR_TINY)
    ticks = []
    stop = threading.Event()

    def count():
        while not stop.is_set():
            ticks.append(time.perf_counter())

    thread = threading.Thread(target=count)
    thread.start()
    try:
        time.sleep(0.05)
        start = time.perf_counter()
        # One batch, no progress: the call takes the GIL back only at its end.
        model.generate(SCHEDULES / "gtr-fast.gtr", 8, batch=8, progress=False)
        end = time.perf_counter()
    finally:
        stop.set()
        thread.join()
    assert end - start > 0.2, "the generation is too short to tell"
    middle = [t for t in ticks if start + 0.05 < t < end - 0.05]
    assert len(middle) > 1000, f"the other thread ran {len(middle)} times during {end - start:.2f} s"


@pytest.mark.parametrize("progress", ["function", False, True])
def test_ctrl_c_stops_a_generation(tiny, progress):
    """Whatever reports progress (a Python function, which would see the
    signal itself, nothing, or the bar), the generation checks for signals
    between batches."""
    def interrupt():
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)

    done = []
    if progress == "function":
        progress = lambda d, n: done.append(d)  # noqa: E731
    threading.Thread(target=interrupt).start()
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        tiny.generate(SCHEDULES / "gtr.gtr", 10_000, batch=1, progress=progress)
    # Stopped at the end of the batch running when the signal came (the
    # whole run takes minutes).
    assert time.perf_counter() - start < 20 and len(done) < 100


@pytest.mark.parametrize("vae", ["auto", "overlap"])
def test_eval_gives_the_cli_table(cli, tmp_path, vae):
    """`eval` is `gtr-run eval`; with `vae="overlap"` too, against the command line's inline
    decodes (the same images, so the same quality)."""
    schedules = [SCHEDULES / "mar-8.gtr", SCHEDULES / "gtr-fast.gtr"]
    out = tmp_path / "eval"
    run_cli(cli, "eval", MAR_TINY, *schedules, "--num-images", 4, "--batch", 4, "--seed", 3, "--out", out)
    with open(out / "eval.csv", newline="") as f:
        want = list(csv.DictReader(f))
    rows = gtr_run.Model(MAR_TINY, vae=vae).eval(schedules, num_images=4, batch=4, seed=3, progress=False)
    assert [r["schedule"] for r in rows] == [w["schedule"] for w in want] == ["mar-8", "gtr-fast"]
    # Everything but the measured times is the same as the command line's.
    same = ["mar_steps", "backbone_passes", "diffusion_evaluations", "flops_per_image", "speedup_flops"]
    same += ["frechet_distance", "class_accuracy", "classifier_score"]
    for row, w in zip(rows, want):
        for key in same:
            assert row[key] == pytest.approx(float(w[key]), rel=1e-12), key
        assert row["seconds_per_image"] > 0
        # One repeat measures no spread: the std cells are empty, as in eval.csv.
        assert row["frechet_distance_std"] is None and w["frechet_distance_std"] == ""
    assert isinstance(rows[0]["mar_steps"], int)
    # Measurements are floats in every row, the baseline's 1.0 included.
    for row in rows:
        for key in ["speedup_measured", "speedup_flops", "class_accuracy", "seconds_per_image"]:
            assert isinstance(row[key], float), (key, row[key])


def test_sweep_gives_the_cli_table(cli, tmp_path):
    """`sweep` is `gtr-run sweep`: one row per setting, named by its values (the first axis
    slowest), with the command line's counts, FLOPs and quality."""
    schedule = SCHEDULES / "gtr-fast.gtr"
    out = tmp_path / "sweep"
    run_cli(cli, "sweep", MAR_TINY, schedule, "--set", "beta=0.1,0.3", "--set", "t_max=10,20",
            "--num-images", 4, "--batch", 4, "--seed", 2, "--out", out)
    with open(out / "sweep.csv", newline="") as f:
        want = list(csv.DictReader(f))
    rows = gtr_run.Model(MAR_TINY).sweep(schedule, {"beta": [0.1, 0.3], "t_max": [10, 20]}, num_images=4,
                                         batch=4, seed=2, progress=False)
    assert [r["schedule"] for r in rows] == [w["schedule"] for w in want]
    assert rows[1]["schedule"] == "beta=0.1 t_max=20"
    for row, w in zip(rows, want):
        for key in ["diffusion_evaluations", "flops_per_image", "frechet_distance", "class_accuracy"]:
            assert row[key] == pytest.approx(float(w[key]), rel=1e-12), key


def test_sweep_refuses_bad_axes(tiny):
    schedule = SCHEDULES / "gtr-fast.gtr"
    for axes, message in [({"nope": [1, 2]}, "axes: `nope`"), ({"beta": [0.1, 0.1]}, "axes: .*twice"),
                          ({"beta": [float("nan")]}, "axes: .*finite"), ([1, 2], "axes: give a mapping"),
                          ({}, "axes: give a mapping")]:
        with pytest.raises(ValueError, match=message):
            tiny.sweep(schedule, axes, num_images=2, progress=False)


def test_eval_repeats_take_the_command_lines_range(tiny):
    with pytest.raises(ValueError, match="repeats.*10000"):
        tiny.eval([SCHEDULES / "mar-8.gtr"], num_images=2, repeats=10_001, progress=False)
    with pytest.raises(ValueError, match="pass 2\\^64 - 1"):
        tiny.eval([SCHEDULES / "mar-8.gtr"], num_images=2, seed=2**64 - 1, repeats=2, progress=False)


def test_eval_refuses_undeclared_parameters(tiny):
    with pytest.raises(ValueError, match="params: `nope`: no schedule given declares a parameter `nope`"):
        tiny.eval([SCHEDULES / "mar-8.gtr"], num_images=2, params={"nope": 1.0}, progress=False)


def test_eval_progress_counts_each_batch_once():
    """With an evaluator and two repeats (each repeat's scoring is reported at its last count)."""
    seen = []
    gtr_run.Model(MAR_TINY).eval([SCHEDULES / "mar-8.gtr"], num_images=2, batch=1, repeats=2,
                                 progress=lambda done, total: seen.append((done, total)))
    assert seen == [(k, 4) for k in range(5)]


def test_an_exception_in_progress_stops_eval_after_the_batch(tiny):
    calls = []

    def stop(done, total):
        calls.append((done, total))
        if done == 1:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        tiny.eval([SCHEDULES / "mar-8.gtr", SCHEDULES / "gtr-fast.gtr"], num_images=4, batch=1, progress=stop)
    assert calls == [(0, 8), (1, 8)]


def test_eval_as_frame_is_a_pandas_table(tiny):
    pytest.importorskip("pandas")  # CI installs it
    schedules = [SCHEDULES / "mar-8.gtr", SCHEDULES / "gtr-fast.gtr"]
    frame = tiny.eval(schedules, num_images=2, batch=2, as_frame=True, progress=False)
    rows = tiny.eval(schedules, num_images=2, batch=2, progress=False)
    assert type(frame).__name__ == "DataFrame"
    assert list(frame.columns) == list(rows[0])
    assert list(frame["schedule"]) == ["mar-8", "gtr-fast"]
    for key in ("mar_steps", "backbone_passes", "diffusion_evaluations", "flops_per_image"):
        assert list(frame[key]) == [r[key] for r in rows], key


def test_eval_as_frame_without_pandas_names_it_before_any_image(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` raises ImportError
    calls = []
    with pytest.raises(ImportError, match="as_frame=True needs pandas"):
        tiny.eval([SCHEDULES / "mar-8.gtr"], num_images=2, as_frame=True,
                  progress=lambda done, total: calls.append(done))
    assert calls == []

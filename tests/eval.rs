//! `gtr-run eval` end to end on the tiny fixture bundle, with and without
//! an evaluator (models/fixtures/tiny-evaluator, random weights).

use std::path::{Path, PathBuf};

mod common;
use common::{fails, gtr_run, ok, tmp};

const TINY: &str = "models/fixtures/tiny";

/// The tiny bundle plus the random-weight evaluator, as `manifest_edit` leaves it.
fn bundle_with_evaluator(name: &str, manifest_edit: impl Fn(String) -> String) -> PathBuf {
    let evaluator = "evaluator:\n  name: tiny-random\n  file: evaluator.onnx\n  inputs: { pixels: pixels }\n  outputs: { logits: logits, features: features }\n  reference: evaluator.npz\n";
    common::tiny_bundle_with(name, "tiny-evaluator", evaluator, manifest_edit)
}

fn json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).unwrap()).unwrap()
}

#[test]
fn speed_and_cost_columns_without_an_evaluator() {
    let out = tmp("no-evaluator");
    let o = ok(&[
        "eval",
        TINY,
        "schedules/mar-8.gtr",
        "schedules/gtr-fast.gtr",
        "--num-images",
        "2",
        "--batch",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("| mar-8 | 8 | 16 | 51200 |"), "{table}");
    assert!(table.contains("| gtr-fast | 8 |"), "{table}");
    assert!(
        !table.contains("FD ("),
        "no quality columns without an evaluator"
    );
    let v = json(&out);
    assert_eq!(v["comparison"]["finished"], true);
    let rows = v["comparison"]["schedules"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["images_timed"], 2);
    assert!(rows[1]["wall_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(v["derived"][0]["speedup_measured"], 1.0);
    // Row 1's measured speed-up is row 0's seconds per image over its own,
    // inside its per-round range.
    let per_image = |k: usize| {
        rows[k]["wall_seconds"].as_f64().unwrap() / rows[k]["images_timed"].as_f64().unwrap()
    };
    let derived = &v["derived"][1];
    // Within a rounding: each number went through JSON's decimal form.
    let seconds = derived["seconds_per_image"].as_f64().unwrap();
    assert!(
        (seconds - per_image(1)).abs() <= 1e-12 * seconds,
        "{seconds}"
    );
    let measured = derived["speedup_measured"].as_f64().unwrap();
    let want = per_image(0) / per_image(1);
    assert!(
        (measured - want).abs() <= 1e-12 * want,
        "{measured} vs {want}"
    );
    let range = &derived["speedup_range"];
    let (lo, hi) = (range[0].as_f64().unwrap(), range[1].as_f64().unwrap());
    assert!(
        lo <= measured * (1.0 + 1e-9) && measured <= hi * (1.0 + 1e-9),
        "{lo} {measured} {hi}"
    );
    // The analytic ratio of the two presets on this model.
    let flops = v["derived"][1]["speedup_flops"].as_f64().unwrap();
    assert!((flops - 3.24).abs() < 0.01, "{flops}");
    let csv = std::fs::read_to_string(out.join("eval.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3);
    assert!(csv.lines().nth(2).unwrap().starts_with("gtr-fast,8,"));
    assert_eq!(
        std::fs::read_to_string(out.join("eval.md")).unwrap(),
        table.as_ref()
    );
    // A second evaluation into the same folder is refused without --force,
    // as a wrong input (exit 3, as for a run's folder).
    let again = [
        "eval",
        TINY,
        "schedules/mar-8.gtr",
        "--num-images",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    fails(&again, "holds the output of a previous `gtr-run eval`");
    assert_eq!(gtr_run(&again).status.code(), Some(3));
    // Any of its files counts (eval.md alone was overwritten), and a file
    // an evaluation does not write is refused, --force or not (a run's
    // folder, somebody's notes), and left as it was.
    std::fs::remove_file(out.join("eval.json")).unwrap();
    std::fs::remove_file(out.join("eval.csv")).unwrap();
    fails(&again, "holds the output of a previous `gtr-run eval`");
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let forced = [&again[..], &["--force"]].concat();
    fails(
        &forced,
        "holds `notes.txt`, which `gtr-run eval` does not write",
    );
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"mine");
    std::fs::remove_file(out.join("notes.txt")).unwrap();
    // A folder at one of its files' names is named as such.
    std::fs::create_dir(out.join("eval.csv")).unwrap();
    fails(
        &forced,
        "holds `eval.csv`, which is not a file (a folder, a pipe, a link to one), where `gtr-run eval` writes its file of that name",
    );
    std::fs::remove_dir(out.join("eval.csv")).unwrap();
    // --force replaces the previous evaluation's files.
    ok(&forced);
    assert!(
        json(&out)["comparison"]["schedules"]
            .as_array()
            .unwrap()
            .len()
            == 1
    );
    let run = tmp("eval-into-run");
    ok(&[
        TINY,
        "schedules/gtr-fast.gtr",
        "--num-images",
        "1",
        "--out",
        run.to_str().unwrap(),
    ]);
    fails(
        &[
            "eval",
            TINY,
            "schedules/mar-8.gtr",
            "--force",
            "--out",
            run.to_str().unwrap(),
        ],
        "holds `00000.png`, which `gtr-run eval` does not write",
    );
    // A usage mistake with --force is refused before the folder is
    // touched: the previous evaluation stays (it was emptied first).
    let before = std::fs::read(out.join("eval.json")).unwrap();
    for mistake in [
        &["--repeats", "0"][..],
        &["--seed", "18446744073709551615", "--repeats", "2"],
    ] {
        let args = [&forced[..], mistake].concat();
        let o = gtr_run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert_eq!(std::fs::read(out.join("eval.json")).unwrap(), before);
    }
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&run);
}

/// A child process killed (and reaped) when dropped, so that a failing
/// test leaves none running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_evaluation_stopped_partway_leaves_what_it_measured() {
    // eval.json is first written after the first timed batch; the process
    // is killed once it is there (a thousand rounds: it cannot finish first).
    let out = tmp("stopped");
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_gtr-run"))
            .args([
                "eval",
                TINY,
                "schedules/mar-8.gtr",
                "schedules/gtr-fast.gtr",
            ])
            .args(["--num-images", "500", "--batch", "1", "--out"])
            .arg(&out)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = std::time::Instant::now();
    let partial = loop {
        let read = std::fs::read_to_string(out.join("eval.json")).ok();
        if let Some(v) = read.and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok()) {
            break v;
        }
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "the evaluation ended before eval.json appeared"
        );
        assert!(
            started.elapsed().as_secs() < 120,
            "no eval.json after 2 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    drop(child);
    assert_eq!(partial["comparison"]["finished"], false, "{partial}");
    let rows = partial["comparison"]["schedules"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let timed: Vec<u64> = rows
        .iter()
        .map(|r| r["images_timed"].as_u64().unwrap())
        .collect();
    assert!(timed[0] >= 1 && timed[0] < 500, "{timed:?}");
    // A row not timed yet has no seconds per image (null), not 0.
    for (k, &n) in timed.iter().enumerate() {
        let per_image = &partial["derived"][k]["seconds_per_image"];
        assert_eq!(
            per_image.is_null(),
            n == 0,
            "row {k}: {per_image} after {n} images"
        );
    }
    // The other files are written once everything is measured.
    let written = json(&out);
    assert_eq!(written["comparison"]["finished"], false);
    assert!(!out.join("eval.md").exists() && !out.join("eval.csv").exists());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn quality_columns_are_deterministic_and_identical_for_identical_schedules() {
    let bundle = bundle_with_evaluator("bundle", |m| m);
    let out = tmp("quality");
    let run = |out: &Path, vae: &str| {
        ok(&[
            "eval",
            bundle.to_str().unwrap(),
            "schedules/mar-8.gtr",
            "schedules/mar-8.gtr",
            "schedules/gtr-fast.gtr",
            "--num-images",
            "3",
            "--batch",
            "2",
            "--repeats",
            "2",
            "--out",
            out.to_str().unwrap(),
            "--force",
            "--vae",
            vae,
        ]);
        json(out)
    };
    let v = run(&out, "auto");
    let q = |k: usize| v["comparison"]["schedules"][k]["quality"].clone();
    assert_eq!(q(0).as_array().unwrap().len(), 2, "one entry per repeat");
    assert_eq!(q(0)[1]["seed"], 1);
    // The same schedule on the same images scores the same.
    assert_eq!(q(0), q(1));
    let fd = q(2)[0]["frechet_distance"].as_f64().unwrap();
    assert!(fd.is_finite() && fd >= 0.0, "{fd}");
    let acc = q(2)[0]["class_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let score = q(2)[0]["classifier_score"].as_f64().unwrap();
    assert!((1.0..=10.0).contains(&score), "{score}");
    // Seeds fix the images, so a rerun gives the same quality numbers,
    // its decodes beside the next batch's sampling or not (`auto` is
    // inline on the CPU).
    let again = tmp("quality-again");
    let w = run(&again, "overlap");
    assert_eq!(
        v["comparison"]["schedules"][2]["quality"],
        w["comparison"]["schedules"][2]["quality"]
    );
    assert_eq!(v["comparison"]["vae_decode"], "inline");
    assert_eq!(w["comparison"]["vae_decode"], "overlap");
    let header = std::fs::read_to_string(again.join("eval.md")).unwrap();
    assert!(header.contains("VAE decode: overlap"), "{header}");
    let table = std::fs::read_to_string(out.join("eval.md")).unwrap();
    assert!(table.contains("FD (tiny-random)"), "{table}");
    assert!(table.contains(" ± "), "repeats show their spread: {table}");
    // eval.csv: a std column per quality column, measured over the
    // repeats; with one repeat there is no spread, and its cells are empty.
    let quality_cells = |dir: &Path| -> Vec<String> {
        let csv = std::fs::read_to_string(dir.join("eval.csv")).unwrap();
        let row = csv.lines().last().unwrap().to_string();
        row.split(',').skip(11).map(str::to_string).collect()
    };
    let cells = quality_cells(&out);
    assert_eq!(cells.len(), 6, "{cells:?}");
    assert!(cells.iter().all(|c| c.parse::<f64>().is_ok()), "{cells:?}");
    let single = tmp("quality-single");
    ok(&[
        "eval",
        bundle.to_str().unwrap(),
        "schedules/gtr-fast.gtr",
        "--num-images",
        "3",
        "--out",
        single.to_str().unwrap(),
    ]);
    let cells = quality_cells(&single);
    for (k, cell) in cells.iter().enumerate() {
        assert_eq!(cell.is_empty(), k % 2 == 1, "{cells:?}");
    }
    for d in [&out, &again, &single, &bundle] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn bad_evaluators_and_arguments_are_reported_clearly() {
    let missing = bundle_with_evaluator("missing-ref", |m| {
        m.replace("reference: evaluator.npz", "reference: nowhere.npz")
    });
    fails(
        &["eval", missing.to_str().unwrap(), "schedules/mar-8.gtr"],
        "evaluator.reference",
    );
    let wrong_role = bundle_with_evaluator("wrong-role", |m| {
        m.replace("logits: logits", "classes: logits")
    });
    fails(
        &["eval", wrong_role.to_str().unwrap(), "schedules/mar-8.gtr"],
        "evaluator.outputs",
    );
    let wrong_tensor = bundle_with_evaluator("wrong-tensor", |m| {
        m.replace("features: features", "features: feats")
    });
    fails(
        &[
            "eval",
            wrong_tensor.to_str().unwrap(),
            "schedules/mar-8.gtr",
        ],
        "graph `evaluator`, tensor `feats`",
    );
    fails(
        &[
            "eval",
            TINY,
            "schedules/mar-8.gtr",
            "--set",
            "no_such_param=3",
        ],
        "no schedule given declares a parameter `no_such_param`",
    );
    fails(
        &["eval", TINY, "schedules/mar-8.gtr", "--num-images", "0"],
        "`0` is not a whole number from 1 to 10000000",
    );
    // The logits (10 a image) as features, against a reference of 8:
    // refused as a wrong input before any image is made.
    let wrong_width = bundle_with_evaluator("wrong-width", |m| {
        m.replace("features: features", "features: logits")
    });
    let out = tmp("eval-wrong-width-out");
    let args = [
        "eval",
        wrong_width.to_str().unwrap(),
        "schedules/mar-8.gtr",
        "--out",
        out.to_str().unwrap(),
    ];
    fails(&args, "in its output `logits`");
    assert_eq!(gtr_run(&args).status.code(), Some(3));
    assert!(!out.exists(), "refused before the folder is made");
    // A reference whose `.npy` header claims a terabyte is refused (it
    // aborted the process on the allocation).
    let huge = bundle_with_evaluator("huge-ref", |m| m);
    let claim = "{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000,), }";
    common::write_npz_claiming(&huge.join("evaluator.npz"), "mu.npy", claim, 64);
    let args = ["eval", huge.to_str().unwrap(), "schedules/mar-8.gtr"];
    fails(&args, "`mu`'s header claims shape [1000000000000]");
    assert_eq!(gtr_run(&args).status.code(), Some(3));
    // A reference whose `sigma` is no covariance (negative definite: FD
    // came out 0; not symmetric) or whose `count` is negative is refused.
    let bad_sigma = bundle_with_evaluator("bad-sigma", |m| m);
    let reference = bad_sigma.join("evaluator.npz");
    let f = 8;
    for (sigma, count, want) in [
        (
            -ndarray::Array2::<f64>::eye(f),
            10i64,
            "`sigma` is not a covariance matrix: it has a negative eigenvalue",
        ),
        (
            ndarray::Array2::<f64>::from_shape_fn((f, f), |(i, j)| if i < j { 1.0 } else { 0.0 }),
            10,
            "`sigma` is not a covariance matrix: [1, 0] is 0 but [0, 1] is 1 (not symmetric)",
        ),
        (ndarray::Array2::<f64>::eye(f), -5, "`count` is negative"),
    ] {
        let mut npz = ndarray_npy::NpzWriter::new(std::fs::File::create(&reference).unwrap());
        npz.add_array("mu", &ndarray::Array1::<f64>::zeros(f))
            .unwrap();
        npz.add_array("sigma", &sigma).unwrap();
        npz.add_array("count", &ndarray::arr0(count)).unwrap();
        npz.finish().unwrap();
        let args = ["eval", bad_sigma.to_str().unwrap(), "schedules/mar-8.gtr"];
        fails(&args, want);
        assert_eq!(gtr_run(&args).status.code(), Some(3), "{want}");
    }
    for d in [
        &missing,
        &wrong_role,
        &wrong_tensor,
        &wrong_width,
        &huge,
        &bad_sigma,
    ] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// `gtr-run sweep`: every setting of the grid is a row (named by its
/// values, the first the baseline), the table is written as eval writes
/// its own, and with an evaluator `pareto.svg` shows every setting and the
/// front; without one it says there is nothing to draw. A parameter the
/// schedule does not declare, or a malformed value list, is refused.
#[test]
fn sweeps_write_the_table_and_the_trade_off() {
    let bundle = bundle_with_evaluator("sweep-evaluator", |m| m);
    let out = tmp("sweep");
    let o = ok(&[
        "sweep",
        bundle.to_str().unwrap(),
        "schedules/gtr-fast.gtr",
        "--set",
        "beta=0.1,0.3",
        "--set",
        "t_max=10,20",
        "--num-images",
        "4",
        "--batch",
        "4",
        "--repeats",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    let table = String::from_utf8_lossy(&o.stdout);
    let names = [
        "beta=0.1 t_max=10",
        "beta=0.1 t_max=20",
        "beta=0.3 t_max=10",
        "beta=0.3 t_max=20",
    ];
    for name in names {
        assert!(table.contains(&format!("| {name} |")), "{name}: {table}");
    }
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap()).unwrap();
    let schedules = rows["comparison"]["schedules"].as_array().unwrap();
    assert_eq!(schedules.len(), 4);
    assert_eq!(schedules[0]["name"], names[0]);
    assert!(out.join("sweep.csv").is_file() && out.join("sweep.md").is_file());
    let svg = std::fs::read_to_string(out.join("pareto.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("Pareto front"));
    for name in names {
        assert!(svg.contains(name), "{name} is labelled");
    }
    // The fastest setting's label is written to the right of its point, the
    // slowest's to its left, so that the picture's edge does not cut it.
    let anchors: Vec<&str> = names
        .iter()
        .map(|name| {
            let at = svg.find(&format!(">\n{name}\n</text>")).unwrap();
            let tag = &svg[svg[..at].rfind("<text").unwrap()..at];
            if tag.contains("text-anchor=\"end\"") {
                "end"
            } else {
                "start"
            }
        })
        .collect();
    assert!(
        anchors.contains(&"end") && anchors.contains(&"start"),
        "{anchors:?}"
    );
    std::fs::remove_dir_all(&out).unwrap();

    let plain = tmp("sweep-plain");
    let o = ok(&[
        "sweep",
        TINY,
        "schedules/gtr-fast.gtr",
        "--set",
        "beta=0.1,0.3",
        "--num-images",
        "2",
        "--out",
        plain.to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("has no evaluator, so there is no quality to draw")
    );
    assert!(plain.join("sweep.json").is_file() && !plain.join("pareto.svg").exists());
    std::fs::remove_dir_all(&plain).unwrap();

    let refused = tmp("sweep-refused");
    let r = refused.to_str().unwrap();
    fails(
        &[
            "sweep",
            TINY,
            "schedules/gtr-fast.gtr",
            "--set",
            "nope=1,2",
            "--out",
            r,
        ],
        "nope",
    );
    fails(
        &[
            "sweep",
            TINY,
            "schedules/gtr-fast.gtr",
            "--set",
            "beta=0.1,0.1",
            "--out",
            r,
        ],
        "lists 0.1 twice",
    );
    // The axes are the command line's: exit 2, before any work.
    let sweep = |axes: &[&'static str]| -> Vec<&str> {
        let mut args = vec!["sweep", TINY, "schedules/gtr-fast.gtr", "--out", r];
        for axis in axes {
            args.extend(["--set", axis]);
        }
        args
    };
    for (axes, want) in [
        (
            &["beta=0.1", "beta=0.5"][..],
            "--set beta=...: the parameter is given twice",
        ),
        (
            &[
                "scaffold_steps=1,2,3,4,5,6,7,8,9",
                "detail_steps=1,2,3,4,5,6,7,8",
            ],
            "the sweep's grid has 72 settings (9 x 8 values); at most 64",
        ),
    ] {
        fails(&sweep(axes), want);
        assert_eq!(gtr_run(&sweep(axes)).status.code(), Some(2));
    }
    assert!(!refused.exists());
}

/// Every row can be traced to what it ran: one schedule given twice gets
/// two names, and eval.json records each row's file, its parameters (the
/// `--set` ones named) and the guidance and temperature given.
#[test]
fn rows_are_named_apart_and_record_their_settings() {
    let out = tmp("eval-settings");
    ok(&[
        "eval",
        TINY,
        "schedules/gtr-fast.gtr",
        "schedules/gtr-fast.gtr",
        "--set",
        "scaffold_steps=4",
        "--cfg",
        "2",
        "--num-images",
        "1",
        "--batch",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    let v = json(&out);
    let rows = &v["schedules"];
    assert_eq!(rows[0]["name"], "gtr-fast");
    assert_eq!(rows[1]["name"], "gtr-fast#2");
    assert_eq!(rows[0]["path"], "schedules/gtr-fast.gtr");
    assert_eq!(rows[0]["params"]["scaffold_steps"], 4.0);
    assert_eq!(rows[0]["set"], serde_json::json!(["scaffold_steps"]));
    assert_eq!(v["cfg_override"], 2.0);
    assert!(v["temperature_override"].is_null());
    let table = std::fs::read_to_string(out.join("eval.md")).unwrap();
    assert!(table.contains("| gtr-fast#2 |"), "{table}");
    std::fs::remove_dir_all(&out).unwrap();
}

/// A graph that fails while a batch is made is exit 4, naming the schedule
/// and the images of the batch (here the untimed warm-up's).
#[test]
fn a_failing_batch_names_its_schedule_and_images() {
    let out = tmp("failing-batch");
    let o = gtr_run(&[
        "eval",
        "models/fixtures/nan-diffusion",
        "schedules/mar-8.gtr",
        "--num-images",
        "2",
        "--batch",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(
        err.contains(
            "schedule `mar-8`, images 0..1 (the untimed warm-up) of seed 1: graph `diffusion`"
        ),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

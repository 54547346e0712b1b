//! The `gtr-run plan` command as a user runs it.

mod common;

use std::path::Path;
use std::process::Output;

use common::{gtr_run, ok, tmp};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn text_report_has_grids_and_table() {
    let o = gtr_run(&["plan", "schedules/gtr.gtr"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("grid 16x16, seed 0, 32 MAR steps, 3 stages"),
        "{out}"
    );
    assert!(out.contains("reveal step of each token"));
    assert!(out.contains("stage of each token"));
    assert!(out.contains("A scaffold"));
    assert!(out.contains("6 by high_freq -> 50"));
}

#[test]
fn json_has_the_documented_fields() {
    let o = gtr_run(&[
        "plan",
        "schedules/gtr.gtr",
        "--json",
        "--seed",
        "3",
        "--cost",
        "mar-h",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["grid"], serde_json::json!([16, 16]));
    assert_eq!(v["seed"], 3);
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 32);
    let total: usize = steps
        .iter()
        .map(|s| s["tokens"].as_array().unwrap().len())
        .sum();
    assert_eq!(total, 256);
    assert_eq!(steps[0]["stage"], "scaffold");
    assert_eq!(steps[0]["diffusion_steps"], 50);
    assert!(steps[0]["detail"].is_null());
    assert!(steps[0]["cfg"].as_f64().unwrap() > 1.0);
    assert_eq!(steps[0]["temperature"], 1.0);
    let d = &steps[31]["detail"];
    assert_eq!(d["fraction"], 0.1);
    assert_eq!(d["steps"], 50);
    assert_eq!(d["selector"], "high_freq");
    let tflops = v["cost"]["total_flops"].as_f64().unwrap() / 1e12;
    assert!((20.0..30.0).contains(&tflops), "{tflops}");
}

#[test]
fn cost_on_a_model_bundle() {
    let o = gtr_run(&[
        "plan",
        "schedules/mar-64.gtr",
        "--json",
        "--cost",
        "models/fixtures/tiny",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["cost"]["model"], "tiny-random");
    assert_eq!(v["cost"]["decoder_passes"], 128); // 64 steps, both CFG halves

    // A schedule that says nothing of guidance is planned with the
    // bundle's default (manifest `sampling.cfg`), as a run on it is: the
    // cost is the run's (it was priced without guidance, half of it).
    let dir = tmp("cost-bundle-defaults");
    std::fs::create_dir_all(&dir).unwrap();
    let schedule = dir.join("plain.gtr");
    std::fs::write(&schedule, "stage generate { tokens all steps 16 }\n").unwrap();
    let s = schedule.to_str().unwrap();
    let o = gtr_run(&["plan", s, "--json", "--cost", "models/fixtures/tiny"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let planned: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let out = dir.join("run");
    let o = gtr_run(&[
        "models/fixtures/tiny",
        s,
        "--num-images",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    for field in [
        "encoder_passes",
        "decoder_passes",
        "diffusion_evaluations",
        "total_flops",
    ] {
        assert_eq!(
            planned["cost"][field], record["cost_per_image"][field],
            "{field}"
        );
    }
    assert_eq!(planned["cost"]["encoder_passes"], 32, "16 steps, guided");
    // A schedule of another grid is refused at its `grid` line (exit 3),
    // as a run on the bundle refuses it.
    std::fs::write(
        &schedule,
        "grid 4x4\nstage generate { tokens all steps 4 }\n",
    )
    .unwrap();
    let o = gtr_run(&["plan", s, "--cost", "models/fixtures/tiny"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("plain.gtr:1:6"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn set_overrides_a_parameter() {
    let o = gtr_run(&[
        "plan",
        "schedules/gtr-3.7x.gtr",
        "--json",
        "--set",
        "scaffold_steps=4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["steps"].as_array().unwrap().len(), 4 + 6 + 2);
    assert_eq!(v["params"]["scaffold_steps"], 4.0);
}

#[test]
fn png_is_written() {
    let dir = tmp("png");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("order.png");
    let o = gtr_run(&[
        "plan",
        "schedules/gtr-k4.gtr",
        "--png",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let img = image::load_from_memory(&bytes).unwrap();
    assert!(img.width() > img.height(), "panels side by side");
    // No temporary file is left beside it.
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(left.len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A negative whole number is refused naming its flag (clap took `-1` for
/// a flag of its own, and its tip `-- -1` did not work).
#[test]
fn negative_whole_numbers_name_their_flag() {
    let out = common::tmp("negative-flags");
    let out = out.to_str().unwrap();
    // (flag, value, exit status, what the message says)
    let cases = [
        ("--num-images", "-1", 2, "'-1' for '--num-images"),
        ("--batch", "-3", 2, "'-3' for '--batch"),
        ("--seed", "-1", 2, "'-1' for '--seed"),
        ("--threads", "-1", 2, "'-1' for '--threads"),
        ("--sampler-ticks", "-2", 2, "'-2' for '--sampler-ticks"),
        ("--class", "-1", 3, "class -1 is out of range"),
        ("--classes", "-1,2", 3, "class -1 is out of range"),
    ];
    for (flag, value, status, want) in cases {
        let args = [
            "models/fixtures/tiny",
            "schedules/mar-8.gtr",
            flag,
            value,
            "--out",
            out,
        ];
        let o = gtr_run(&args);
        assert_eq!(o.status.code(), Some(status), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
    assert!(!std::path::Path::new(out).exists());
}

/// `--head` with a chain graph, and `--sampler-ticks` with the host path,
/// do not go together (they were ignored, and run.json recorded them).
#[test]
fn runner_flags_that_do_not_go_together_are_refused() {
    let out = common::tmp("runner-conflicts");
    let out = out.to_str().unwrap();
    for (flags, want) in [
        (
            &["--head", "split", "--sampler", "graph"][..],
            "--head split chooses",
        ),
        (
            &["--head", "whole", "--sampler", "ticks"][..],
            "--sampler ticks runs the chains in a graph",
        ),
        (
            &["--sampler-ticks", "2", "--sampler", "host"][..],
            "--sampler host makes one head call per tick",
        ),
    ] {
        let args = [
            &["models/fixtures/tiny", "schedules/mar-8.gtr", "--out", out][..],
            flags,
        ]
        .concat();
        let o = gtr_run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
    assert!(!std::path::Path::new(out).exists());
    // `--sampler auto` on the CPU runs the host path: the flag is said to
    // do nothing, and not recorded as if it had.
    let o = gtr_run(&[
        "models/fixtures/tiny",
        "schedules/mar-8.gtr",
        "--num-images",
        "1",
        "--sampler-ticks",
        "2",
        "--out",
        out,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--sampler-ticks 2 has no effect"),
        "{}",
        stderr(&o)
    );
    let record = std::fs::read_to_string(Path::new(out).join("run.json")).unwrap();
    assert!(
        record.contains("\"sampler_ticks_per_call\": null"),
        "{record}"
    );
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn bad_input_gives_clear_errors_and_exit_code_2() {
    let cases: [(&[&str], &str); 9] = [
        (
            &[
                "plan",
                "schedules/mar-8.gtr",
                "--set",
                "mar_steps=4",
                "--set",
                "mar_steps=5",
            ],
            "--set mar_steps: given twice (4 and 5)",
        ),
        // The file's text does not show where a --set value comes from.
        (
            &["plan", "schedules/mar-8.gtr", "--set", "mar_steps=0"],
            "= note: parameters given from outside the file (--set): mar_steps = 0",
        ),
        (
            &["plan", "schedules/no-such.gtr"],
            "cannot read schedule schedules/no-such.gtr",
        ),
        (
            &["plan", "schedules/gtr.gtr", "--set", "nope=1"],
            "has no parameter `nope`",
        ),
        (
            &["plan", "schedules/gtr.gtr", "--cost", "mar-xl"],
            "built-in specs are mar-b, mar-l, mar-h, or give a model bundle",
        ),
        (
            &["plan", "tests/invalid/overlap.gtr"],
            "tests/invalid/overlap.gtr:4:28",
        ),
        (
            &["plan", "schedules/gtr.gtr", "--grid", "1x1"],
            "does not fit a 1x1 grid",
        ),
        (
            &["plan", "schedules/gtr.gtr", "--png", "."],
            "this is a folder",
        ),
        (
            &["plan", "schedules/gtr.gtr", "--png", "no-such-folder/x.png"],
            "--png no-such-folder/x.png: the folder no-such-folder does not exist",
        ),
    ];
    for (args, want) in cases {
        let o = gtr_run(args);
        assert!(
            matches!(o.status.code(), Some(2..=4)),
            "{args:?}: {}",
            stderr(&o)
        );
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{args:?}");
    }
    // Clap refuses a malformed grid or override before we run.
    for args in [
        &["plan", "schedules/gtr.gtr", "--grid", "16"][..],
        &["plan", "schedules/gtr.gtr", "--set", "x"][..],
        &["plan", "schedules/gtr.gtr", "--set", "x=abc"][..],
        &["plan", "schedules/gtr.gtr", "--set", "=3"][..],
    ] {
        let o = gtr_run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{args:?}");
    }
    assert!(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schedules/gtr.gtr")
            .exists()
    );
}

/// `plan --snapshot DIR` writes one snapshot per schedule (the body the
/// presets' snapshots have), `--check` passes on them, and fails, naming the
/// file and line, once a schedule's order changes or has no snapshot.
#[test]
fn snapshot_a_folder_of_schedules() {
    let dir = tmp("snapshot");
    // A folder that is not there is a wrong input.
    let o = gtr_run(&["plan", "--snapshot", dir.to_str().unwrap(), "--check"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot read folder"), "{}", stderr(&o));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["raster.gtr", "wavefront.gtr"] {
        let preset = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schedules")
            .join(name);
        std::fs::copy(preset, dir.join(name)).unwrap();
    }
    let d = dir.to_str().unwrap();
    let o = gtr_run(&["plan", "--snapshot", d]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("raster.gtr: written to"),
        "{}",
        stdout(&o)
    );
    let body = |text: &str| {
        text.splitn(3, "---\n")
            .nth(2)
            .unwrap()
            .trim_end()
            .to_string()
    };
    let ours = std::fs::read_to_string(dir.join("snapshots/raster.gtr.snap")).unwrap();
    let preset = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/snapshots/presets__preset_orders@raster.gtr.snap"),
    )
    .unwrap();
    assert_eq!(body(&ours), body(&preset));

    let o = gtr_run(&["plan", "--snapshot", d, "--check"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "raster.gtr: unchanged\nwavefront.gtr: unchanged\n"
    );

    let raster = dir.join("raster.gtr");
    let text = std::fs::read_to_string(&raster).unwrap();
    std::fs::write(&raster, text.replace("order raster", "order subsample")).unwrap();
    std::fs::write(
        dir.join("new.gtr"),
        "# new\nstage a { tokens all  steps 4 }\n",
    )
    .unwrap();
    let o = gtr_run(&["plan", "--snapshot", d, "--check"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a check that differs exits with 1"
    );
    // The report is on standard output, as when the check passes; standard
    // error says how many failed.
    assert_eq!(
        stderr(&o),
        "error: 2 of 3 snapshots fail the check (listed above)\n"
    );
    let err = stdout(&o);
    assert!(err.contains("raster.gtr: differs from"), "{err}");
    // A line of the snapshot file (its 5-line header counted), where the
    // reveal grid's first row differs.
    assert!(err.contains("raster.gtr.snap at line 11"), "{err}");
    let snap = std::fs::read_to_string(dir.join("snapshots/raster.gtr.snap")).unwrap();
    assert!(snap.lines().nth(10).unwrap().starts_with(" 0 |"), "{snap}");
    assert!(err.contains("new.gtr: no snapshot"), "{err}");
    assert!(err.contains("wavefront.gtr: unchanged"), "{err}");
    // A snapshot whose schedule is gone fails the check too.
    std::fs::remove_file(dir.join("wavefront.gtr")).unwrap();
    let err = stdout(&gtr_run(&["plan", "--snapshot", d, "--check"]));
    assert!(err.contains("wavefront.gtr: the schedule is gone"), "{err}");

    let o = gtr_run(&["plan", "--check", "schedules/gtr.gtr"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("use it with --snapshot DIR"),
        "{}",
        stderr(&o)
    );
    let o = gtr_run(&["plan", "--snapshot", "docs"]);
    assert!(
        stderr(&o).contains("docs holds no .gtr schedules"),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `plan --snapshot`: what a folder holds that no snapshot can stand for
/// is refused (exit 3), naming it; a file at a snapshot's name that is no
/// snapshot fails the check and is replaced by a write; snapshots whose
/// schedules are all gone still fail the check; a schedule that does not
/// plan leaves every snapshot as it was.
#[cfg(unix)]
#[test]
fn snapshot_folders_say_what_they_cannot_use() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tmp("snapshot-odd");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.to_str().unwrap();
    let preset = |name: &str| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schedules")
            .join(name)
    };
    let refused = |want: &str| {
        for check in [false, true] {
            let mut args = vec!["plan", "--snapshot", d];
            args.extend(check.then_some("--check"));
            let o = gtr_run(&args);
            assert_eq!(o.status.code(), Some(3), "{args:?}: {}", stderr(&o));
            assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
        }
    };
    refused("holds no .gtr schedules");
    // Two names that a lossy conversion makes one would share a snapshot.
    let odd = dir.join(std::ffi::OsStr::from_bytes(b"a\xff.gtr"));
    std::fs::copy(preset("mar-8.gtr"), &odd).unwrap();
    refused("this name is not UTF-8 text without control characters");
    std::fs::remove_file(&odd).unwrap();
    std::os::unix::fs::symlink("nowhere", dir.join("dangling.gtr")).unwrap();
    refused("dangling.gtr is a link to no file, not a schedule");
    std::fs::remove_file(dir.join("dangling.gtr")).unwrap();

    std::fs::copy(preset("mar-8.gtr"), dir.join("a.gtr")).unwrap();
    std::fs::copy(preset("raster.gtr"), dir.join("b.gtr")).unwrap();
    assert!(gtr_run(&["plan", "--snapshot", d]).status.success());
    let snaps = dir.join("snapshots");
    // Line endings made CRLF (git's autocrlf) are the same snapshot.
    let a = std::fs::read_to_string(snaps.join("a.gtr.snap")).unwrap();
    std::fs::write(snaps.join("a.gtr.snap"), a.replace('\n', "\r\n")).unwrap();
    // A file that is no snapshot fails the check, and a write replaces it.
    std::fs::write(snaps.join("b.gtr.snap"), "garbage").unwrap();
    let o = gtr_run(&["plan", "--snapshot", d, "--check"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o),
        format!(
            "a.gtr: unchanged\nb.gtr: {} is not a gtr-run snapshot (no `---` header); run without --check to replace it\n",
            snaps.join("b.gtr.snap").display()
        )
    );
    assert!(gtr_run(&["plan", "--snapshot", d]).status.success());
    assert!(
        gtr_run(&["plan", "--snapshot", d, "--check"])
            .status
            .success()
    );
    // A pipe at a snapshot's name is refused, not read (that waits forever).
    let b = std::fs::read(snaps.join("b.gtr.snap")).unwrap();
    std::fs::remove_file(snaps.join("b.gtr.snap")).unwrap();
    let fifo = std::process::Command::new("mkfifo")
        .arg(snaps.join("b.gtr.snap"))
        .status()
        .unwrap();
    assert!(fifo.success());
    refused("b.gtr.snap is a pipe, socket or device, not a snapshot file");
    std::fs::remove_file(snaps.join("b.gtr.snap")).unwrap();
    std::fs::write(snaps.join("b.gtr.snap"), &b).unwrap();
    // Every schedule is planned before a snapshot is written.
    std::fs::write(dir.join("a.gtr"), "stage a { tokens all  steps 2 }\n").unwrap();
    std::fs::write(dir.join("b.gtr"), "stage {\n").unwrap();
    assert_eq!(gtr_run(&["plan", "--snapshot", d]).status.code(), Some(3));
    assert_eq!(
        std::fs::read_to_string(snaps.join("a.gtr.snap")).unwrap(),
        a.replace('\n', "\r\n")
    );
    // Snapshots whose schedules are all gone fail the check.
    std::fs::remove_file(dir.join("a.gtr")).unwrap();
    std::fs::remove_file(dir.join("b.gtr")).unwrap();
    let o = gtr_run(&["plan", "--snapshot", d, "--check"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("a.gtr: the schedule is gone"),
        "{}",
        stdout(&o)
    );
    assert!(
        stdout(&o).contains("b.gtr: the schedule is gone"),
        "{}",
        stdout(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The exit status says what failed (README, "Exit status"): 2 a usage
/// error, 3 a wrong input (schedule, bundle, class), 4 a failure while
/// running (tests/generate.rs: a missing ONNX Runtime library), 1 a
/// snapshot check that differs (above).
#[test]
fn exit_statuses_say_what_failed() {
    let tiny = "models/fixtures/tiny";
    let out = tmp("status");
    let o = out.to_str().unwrap();
    let cases: [(&[&str], i32); 12] = [
        (&["plan", "--no-such-flag"], 2),
        // A `--set` the schedule does not declare is the command line's
        // mistake, as a bad value for it is, in every command.
        (&["plan", "schedules/gtr.gtr", "--set", "nope=1"], 2),
        (
            &[tiny, "schedules/gtr.gtr", "--set", "nope=1", "--out", o],
            2,
        ),
        (
            &[
                "eval",
                tiny,
                "schedules/gtr.gtr",
                "--set",
                "nope=1",
                "--out",
                o,
            ],
            2,
        ),
        (
            &[
                "sweep",
                tiny,
                "schedules/gtr.gtr",
                "--set",
                "nope=1,2",
                "--out",
                o,
            ],
            2,
        ),
        // An output path checked before the run, as --npz and --png are.
        (
            &[
                tiny,
                "schedules/gtr.gtr",
                "--ort-profile",
                "Cargo.toml/prof",
                "--out",
                o,
            ],
            3,
        ),
        // A value that makes the schedule wrong is the schedule's (its line).
        (&["plan", "schedules/gtr.gtr", "--set", "beta=0"], 3),
        (&["plan", "--check", "schedules/gtr.gtr"], 2),
        (
            &[tiny, "schedules/gtr.gtr", "--trt-cache", "/tmp", "--out", o],
            2,
        ),
        (&["plan", "tests/invalid/beta-zero.gtr"], 3),
        (&["models/fixtures", "schedules/gtr.gtr", "--out", o], 3),
        (&[tiny, "schedules/gtr.gtr", "--class", "12", "--out", o], 3),
    ];
    for (args, want) in cases {
        let o = gtr_run(args);
        assert_eq!(o.status.code(), Some(want), "{args:?}: {}", stderr(&o));
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// An output name that holds a device or a pipe (`--png /dev/full`) is
/// refused before any work (exit 3) and left as it was: the atomic write
/// would otherwise rename the file over it.
#[cfg(unix)]
#[test]
fn outputs_never_replace_devices_or_pipes() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tmp("not-a-file");
    std::fs::create_dir_all(&dir).unwrap();
    let pipe = dir.join("grid.png");
    let made = std::process::Command::new("mkfifo").arg(&pipe).status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("skipped: no mkfifo here");
        return;
    }
    let o = gtr_run(&["plan", "schedules/gtr.gtr", "--png", pipe.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("this is a pipe, not a file"),
        "{}",
        stderr(&o)
    );
    assert!(
        std::fs::symlink_metadata(&pipe)
            .unwrap()
            .file_type()
            .is_fifo()
    );
    // A pipe as the schedule, or as an order file, is refused at once
    // (opening it waited for a writer forever).
    let pipe = pipe.to_str().unwrap();
    let o = gtr_run(&["plan", pipe]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("a pipe or socket, not a file"),
        "{}",
        stderr(&o)
    );
    let schedule = dir.join("by-file.gtr");
    let order = format!("grid 2x2\nstage a {{ tokens all  steps 1  order file \"{pipe}\" }}\n");
    std::fs::write(&schedule, order).unwrap();
    let o = gtr_run(&["plan", schedule.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("a pipe or socket, not a file"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// File names are the user's data: a schedule or output path holding
/// terminal escapes reaches stderr and stdout escaped (it was printed raw
/// in "cannot read schedule", the `-->` line and the plan's summary),
/// while `plan --json` keeps the name as JSON writes it.
#[test]
fn paths_reach_the_terminal_escaped() {
    let dir = common::tmp("escaped-paths");
    std::fs::create_dir_all(&dir).unwrap();
    let raw = |o: &Output| {
        [stdout(o), stderr(o)]
            .iter()
            .any(|t| t.contains(['\u{1b}', '\u{7}', '\u{202e}']))
    };
    let missing = dir.join("no\u{1b}[2J\u{7}.gtr");
    let o = gtr_run(&["plan", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(!raw(&o), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot read schedule")
            && stderr(&o).contains("no\\u{1b}[2J\\u{7}.gtr"),
        "{}",
        stderr(&o)
    );
    let invalid = dir.join("bad\u{1b}]0;x\u{7}.gtr");
    std::fs::write(&invalid, "stage a: tokens all\n").unwrap();
    let o = gtr_run(&["plan", invalid.to_str().unwrap()]);
    assert!(common::is_failure_status(o.status.code()), "{}", stderr(&o));
    assert!(!raw(&o), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("bad\\u{1b}]0;x\\u{7}.gtr:1:8"),
        "{}",
        stderr(&o)
    );
    let valid = dir.join("ok\u{202e}.gtr");
    std::fs::write(&valid, "stage a { tokens all steps 2 }\n").unwrap();
    let png = dir.join("p\u{1b}[1m.png");
    let o = ok(&[
        "plan",
        valid.to_str().unwrap(),
        "--png",
        png.to_str().unwrap(),
    ]);
    assert!(!raw(&o), "{}", stdout(&o));
    assert!(stdout(&o).contains("p\\u{1b}[1m.png"), "{}", stdout(&o));
    assert!(png.exists());
    let o = ok(&["plan", valid.to_str().unwrap(), "--json"]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(json.to_string().contains("ok\u{202e}.gtr"), "{json}");
    std::fs::remove_dir_all(dir).unwrap();
}

//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use gtr_run::engine::ImageJob;
use gtr_run::grid::Grid;
use gtr_run::plan::{Plan, plan};
use gtr_run::schedule::{Schedule, ScheduleError, Source};

/// Reads a file with a stable, repository-relative name for messages.
pub fn load(path: &Path, overrides: &BTreeMap<String, f64>) -> Result<Schedule, ScheduleError> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let name = path
        .strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string();
    let text = std::fs::read_to_string(path).unwrap();
    Schedule::from_source(Source::new(name, text), overrides)
}

pub fn preset(name: &str) -> Schedule {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schedules")
        .join(name);
    load(&path, &BTreeMap::new()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The plan of a schedule on its own grid (default 16x16) with `seed`.
pub fn plan_default(schedule: &Schedule, seed: u64) -> Plan {
    plan(schedule, schedule.grid.unwrap_or(Grid::MAR), seed).unwrap_or_else(|d| panic!("{d}"))
}

pub fn preset_paths() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schedules");
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "gtr"))
        .collect();
    v.sort();
    v
}

/// The repository root (tests run the binary from here).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh (removed if there) path `NAME` for this test binary under
/// Cargo's `target/tmp`: what a run leaves stays there for a look until the
/// next run or `cargo clean`, and nothing piles up in the system's temp
/// folder run after run.
pub fn tmp(name: &str) -> std::path::PathBuf {
    let d =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{name}", env!("CARGO_CRATE_NAME")));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A copy of the tiny fixture bundle with the files of `extra` (a folder
/// under models/fixtures) beside its own, in a fresh folder `tmp(name)`;
/// its manifest is the tiny one plus `more`, passed through `edit`.
pub fn tiny_bundle_with(
    name: &str,
    extra: &str,
    more: &str,
    edit: impl Fn(String) -> String,
) -> std::path::PathBuf {
    let dir = tmp(name);
    std::fs::create_dir_all(&dir).unwrap();
    for src in [
        "models/fixtures/tiny".to_string(),
        format!("models/fixtures/{extra}"),
    ] {
        for entry in std::fs::read_dir(root().join(src)).unwrap() {
            let p = entry.unwrap().path();
            if p.is_file() {
                std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
            }
        }
    }
    let tiny = root().join("models/fixtures/tiny/manifest.yaml");
    let manifest = std::fs::read_to_string(tiny).unwrap() + more;
    std::fs::write(dir.join("manifest.yaml"), edit(manifest)).unwrap();
    dir
}

/// Runs the `gtr-run` binary from the repository root.
pub fn gtr_run(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_gtr-run"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

/// Runs `gtr-run` and asserts that it succeeded.
pub fn ok(args: &[&str]) -> std::process::Output {
    let o = gtr_run(args);
    assert!(
        o.status.success(),
        "{args:?}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Whether `status` is one of the documented failure statuses (README,
/// "Exit status"): 2 usage, 3 a wrong input, 4 a failure while running.
pub fn is_failure_status(status: Option<i32>) -> bool {
    matches!(status, Some(2..=4))
}

/// Runs `gtr-run` and asserts a clear failure: a documented failure status,
/// `want` in the message, no panic.
pub fn fails(args: &[&str], want: &str) {
    let o = gtr_run(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(is_failure_status(o.status.code()), "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}: expected `{want}` in\n{err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}

/// Images `indices` of a run with `seed`: their own seeds, labels `i % 10`.
pub fn image_jobs(seed: u64, indices: std::ops::Range<u64>) -> Vec<ImageJob> {
    indices
        .map(|i| ImageJob {
            index: i,
            seed: gtr_run::rng::image_seed(seed, i),
            label: (i % 10) as i64,
        })
        .collect()
}

/// Writes an `.npz` of one entry `entry`: a version 1 `.npy` header holding
/// the dictionary `dict` (padded to 128 bytes), then `data_len` zero bytes,
/// whatever shape the dictionary claims: a hand-made file for the size
/// checks of `.npz` inputs.
pub fn write_npz_claiming(path: &Path, entry: &str, dict: &str, data_len: usize) {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    zip.start_file(entry, zip::write::SimpleFileOptions::default())
        .unwrap();
    let mut header = format!("{dict:<117}\n").into_bytes();
    header.splice(0..0, *b"\x93NUMPY\x01\x00\x76\x00");
    zip.write_all(&header).unwrap();
    zip.write_all(&vec![0u8; data_len]).unwrap();
    zip.finish().unwrap();
}

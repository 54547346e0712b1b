//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

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

//! Snapshots of schedules' token orders, so that a folder of schedules is
//! regression-tested like the presets: `gtr-run plan --snapshot DIR` writes
//! one insta-format `.snap` file per `*.gtr` into `DIR/snapshots/`, and with
//! `--check` compares against them instead. The body is what
//! tests/presets.rs snapshots for the presets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::grid::Grid;
use crate::plan::{Plan, plan};
use crate::report::text;
use crate::schedule::{Schedule, ScheduleError};

/// The snapshot of a plan: steps and grid, the reveal step and the stage of
/// each token, and the step table.
pub fn body(plan: &Plan) -> String {
    format!(
        "{} MAR steps on {}\n\nreveal step (1 = first):\n{}\nstages:\n{}\n{}",
        plan.steps.len(),
        plan.grid,
        text::step_grid(plan),
        text::stage_grid(plan),
        text::step_table(plan)
    )
}

/// The plan a snapshot shows: seed 0, on the schedule's own grid (else 16x16).
pub fn snapshot_plan(schedule: &Schedule) -> Result<Plan, ScheduleError> {
    plan(schedule, schedule.grid.unwrap_or(Grid::MAR), 0)
        .map_err(|d| ScheduleError::Invalid(Box::new(d)))
}

/// A `.snap` file: insta's header (naming the schedule file) and the body.
pub fn file_text(input_file: &str, body: &str) -> String {
    format!(
        "---\nsource: gtr-run plan --snapshot\nexpression: body\ninput_file: {input_file}\n---\n{}\n",
        body.trim_end()
    )
}

/// The body of a `.snap` file's text (what follows its header), if it has one.
pub fn file_body(text: &str) -> Option<&str> {
    let rest = text.strip_prefix("---\n")?;
    let end = rest.find("\n---\n")?;
    Some(rest[end + 5..].trim_end())
}

/// What became of one schedule's snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The file holds this body already.
    Unchanged,
    /// Written (new, or replacing another body), when not checking.
    Written,
    /// Checking: no snapshot file yet.
    Missing,
    /// A snapshot whose schedule is gone (`NAME.gtr` no longer in the
    /// folder); a failure when checking, only reported when writing.
    Orphan,
    /// Checking: the bodies first differ at this 1-based line of the
    /// snapshot file.
    Differs {
        line: usize,
        stored: String,
        now: String,
    },
}

/// Where the snapshot of the schedule at `path` lives.
pub fn snap_path(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name("snapshots")
        .join(format!("{name}.snap"))
}

/// Plans every `*.gtr` of `dir` and writes (`check` false) or compares
/// (`check` true) its snapshot; outcomes by file name. A schedule that does
/// not plan, or a folder or file that cannot be read or written, is an error
/// naming it.
pub fn snapshot_dir(dir: &Path, check: bool) -> anyhow::Result<BTreeMap<String, Outcome>> {
    use anyhow::Context;
    // A folder that cannot be read is a wrong input (exit 3), as a
    // schedule file that cannot be read is.
    let entries = std::fs::read_dir(dir).map_err(|e| {
        crate::run::RunError::Invalid(format!("cannot read folder {}: {e}", dir.display()))
    })?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot read folder {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "gtr") && path.is_file() {
            paths.push(path);
        }
    }
    if paths.is_empty() {
        anyhow::bail!("{} holds no .gtr schedules", dir.display());
    }
    paths.sort();
    let mut outcomes = BTreeMap::new();
    for path in paths {
        let schedule = Schedule::from_file(&path, &BTreeMap::new())?;
        let now = body(&snapshot_plan(&schedule)?);
        let snap = snap_path(&path);
        let stored = match std::fs::read_to_string(&snap) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", snap.display())),
        };
        let stored_body = stored.as_deref().and_then(file_body);
        let outcome = match (stored_body, check) {
            (Some(b), _) if b == now.trim_end() => Outcome::Unchanged,
            (None, true) => Outcome::Missing,
            (Some(b), true) => {
                // `b` is a slice of the file's text: the lines before it
                // are insta's header.
                let text = stored.as_deref().unwrap_or_default();
                let start = b.as_ptr() as usize - text.as_ptr() as usize;
                let header = text[..start].matches('\n').count();
                first_difference(b, now.trim_end(), header)
            }
            (_, false) => {
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                std::fs::create_dir_all(snap.parent().unwrap_or(dir))
                    .and_then(|()| {
                        crate::fsutil::write_atomic(&snap, file_text(&name, &now).as_bytes())
                    })
                    .with_context(|| format!("cannot write {}", snap.display()))?;
                Outcome::Written
            }
        };
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        outcomes.insert(name, outcome);
    }
    // Snapshots of schedules no longer in the folder.
    if let Ok(entries) = std::fs::read_dir(dir.join("snapshots")) {
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if let Some(name) = file.strip_suffix(".snap")
                && name.ends_with(".gtr")
                && !outcomes.contains_key(name)
            {
                outcomes.insert(name.to_string(), Outcome::Orphan);
            }
        }
    }
    Ok(outcomes)
}

/// Where the bodies `stored` (which starts after `header` lines of its
/// file) and `now` first differ, as a line of the file.
fn first_difference(stored: &str, now: &str, header: usize) -> Outcome {
    let (a, b): (Vec<&str>, Vec<&str>) = (stored.lines().collect(), now.lines().collect());
    let k = (0..a.len().max(b.len()))
        .find(|&k| a.get(k) != b.get(k))
        .unwrap_or(0);
    let at = |v: &[&str]| v.get(k).map_or("(end)".to_string(), |l| l.to_string());
    Outcome::Differs {
        line: header + k + 1,
        stored: at(&a),
        now: at(&b),
    }
}

/// What [`summary`] found: a line per schedule, and how many of them fail
/// the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The report for people, one line (or three, for a difference) per
    /// schedule, ending with a newline.
    pub text: String,
    /// Schedules whose snapshot is missing or differs, and, when checking,
    /// snapshots whose schedule is gone.
    pub failures: usize,
    /// Schedules and orphan snapshots reported.
    pub total: usize,
}

/// A report of `outcomes` for people, with the number that fail the check.
pub fn summary(dir: &Path, outcomes: &BTreeMap<String, Outcome>, checking: bool) -> Summary {
    let mut lines = Vec::new();
    let mut failures = 0;
    for (name, outcome) in outcomes {
        let snap = dir.join("snapshots").join(format!("{name}.snap"));
        let snap = snap.display();
        lines.push(match outcome {
            Outcome::Unchanged => format!("{name}: unchanged"),
            Outcome::Written => format!("{name}: written to {snap}"),
            Outcome::Missing => {
                failures += 1;
                format!("{name}: no snapshot ({snap}); run without --check to write it")
            }
            Outcome::Orphan => {
                failures += usize::from(checking);
                format!(
                    "{name}: the schedule is gone, but {snap} is still there; remove the snapshot, or restore the schedule"
                )
            }
            Outcome::Differs { line, stored, now } => {
                failures += 1;
                format!(
                    "{name}: differs from {snap} at line {line}\n  snapshot: {stored}\n  now:      {now}"
                )
            }
        });
    }
    Summary {
        text: lines.join("\n") + "\n",
        failures,
        total: outcomes.len(),
    }
}

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
    /// Written (new, or replacing another body or a file that was no
    /// snapshot), when not checking.
    Written,
    /// Checking: no snapshot file yet.
    Missing,
    /// Checking: the file at the snapshot's name is not a snapshot (the
    /// reason); writing replaces it.
    NotASnapshot(String),
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

/// Where the snapshot of the schedule named `name` in folder `dir` lives.
fn snap_path(dir: &Path, name: &str) -> PathBuf {
    dir.join("snapshots").join(format!("{name}.snap"))
}

/// A wrong input found in the folder (exit status 3).
fn invalid(message: String) -> anyhow::Error {
    crate::run::RunError::Invalid(message).into()
}

/// The `*.gtr` schedules of `dir` by file name, sorted. A name a snapshot
/// cannot carry (not UTF-8, or with a control character such as a line
/// break: two such names could share one snapshot, or break its header),
/// or a `.gtr` entry that is no file (a folder, a dangling link), is an
/// error naming it.
fn schedule_files(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    // A folder that cannot be read is a wrong input (exit 3), as a
    // schedule file that cannot be read is.
    let cannot_read =
        |e: std::io::Error| invalid(format!("cannot read folder {}: {e}", dir.display()));
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(cannot_read)? {
        let path = entry.map_err(cannot_read)?.path();
        if path.extension().is_none_or(|e| e != "gtr") {
            continue;
        }
        let name = match path.file_name().and_then(|n| n.to_str()) {
            Some(name) if !name.chars().any(char::is_control) => name.to_string(),
            _ => {
                return Err(invalid(format!(
                    "{}: a schedule's snapshot is named after its file, and this name is not UTF-8 text without control characters; rename the file",
                    path.to_string_lossy().escape_debug()
                )));
            }
        };
        if !path.is_file() {
            let what = match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => "a link to no file",
                Ok(m) if m.is_dir() => "a folder",
                _ => "not a file",
            };
            return Err(invalid(format!(
                "{} is {what}, not a schedule; every DIR/*.gtr is planned",
                path.display()
            )));
        }
        files.push((name, path));
    }
    files.sort();
    Ok(files)
}

/// The names of the schedules `DIR/snapshots` holds snapshots of (none when
/// it is not there); a `snapshots` that is no folder is an error.
fn snapshot_names(dir: &Path) -> anyhow::Result<Vec<String>> {
    let folder = dir.join("snapshots");
    let entries = match std::fs::read_dir(&folder) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(invalid(format!(
                "{}: not a folder of snapshots ({e})",
                folder.display()
            )));
        }
    };
    Ok(entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter_map(|file| file.strip_suffix(".snap").map(str::to_string))
        .filter(|name| name.ends_with(".gtr"))
        .collect())
}

/// What is stored at a snapshot's name.
enum Stored {
    Absent,
    /// A snapshot's text, line endings made `\n`.
    Text(String),
    /// A file that is not a snapshot of a body of `len` bytes (why).
    NotASnapshot(String),
}

/// Reads the snapshot at `snap` of a body of `len` bytes: a file far longer
/// than that, or not UTF-8, is no snapshot of it (it is not read whole); a
/// folder, pipe or device there is an error (reading a pipe waits forever).
fn read_snapshot(snap: &Path, len: usize) -> anyhow::Result<Stored> {
    use std::io::Read;
    let cannot = |e: std::io::Error| invalid(format!("cannot read {}: {e}", snap.display()));
    let meta = match std::fs::metadata(snap) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Stored::Absent),
        Err(e) => return Err(cannot(e)),
    };
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a folder"
        } else {
            "a pipe, socket or device"
        };
        return Err(invalid(format!(
            "{} is {what}, not a snapshot file",
            snap.display()
        )));
    }
    // The header and a few bytes of slack.
    let limit = len as u64 + 64 * 1024;
    let mut bytes = Vec::new();
    std::fs::File::open(snap)
        .and_then(|f| f.take(limit + 1).read_to_end(&mut bytes))
        .map_err(cannot)?;
    if bytes.len() as u64 > limit {
        return Ok(Stored::NotASnapshot(format!(
            "over {} KiB, far longer than this schedule's snapshot",
            limit / 1024
        )));
    }
    Ok(match String::from_utf8(bytes) {
        Ok(text) => Stored::Text(text.replace("\r\n", "\n")),
        Err(_) => Stored::NotASnapshot("not UTF-8 text".into()),
    })
}

/// Plans every `*.gtr` of `dir` and writes (`check` false) or compares
/// (`check` true) its snapshot; outcomes by file name, snapshots whose
/// schedule is gone included. Every schedule is planned before anything is
/// written, so a schedule that does not plan (an error naming it) leaves
/// every snapshot as it was. A folder or file that cannot be read, or is
/// not what its name says, is a wrong input naming it; one that cannot be
/// written, a failure.
pub fn snapshot_dir(dir: &Path, check: bool) -> anyhow::Result<BTreeMap<String, Outcome>> {
    use anyhow::Context;
    let schedules = schedule_files(dir)?;
    let mut outcomes: BTreeMap<String, Outcome> = snapshot_names(dir)?
        .into_iter()
        .filter(|name| schedules.iter().all(|(n, _)| n != name))
        .map(|name| (name, Outcome::Orphan))
        .collect();
    if schedules.is_empty() && outcomes.is_empty() {
        return Err(invalid(format!(
            "{} holds no .gtr schedules",
            dir.display()
        )));
    }
    let mut bodies = Vec::with_capacity(schedules.len());
    for (name, path) in schedules {
        let schedule = Schedule::from_file(&path, &BTreeMap::new())?;
        bodies.push((name, body(&snapshot_plan(&schedule)?)));
    }
    for (name, now) in bodies {
        let snap = snap_path(dir, &name);
        let now = now.trim_end();
        let stored = match read_snapshot(&snap, now.len())? {
            Stored::Text(text) => match file_body(&text) {
                Some(b) if b == now => {
                    outcomes.insert(name, Outcome::Unchanged);
                    continue;
                }
                Some(b) if check => {
                    // `b` is a slice of the file's text: the lines before
                    // it are insta's header.
                    let start = b.as_ptr() as usize - text.as_ptr() as usize;
                    let header = text[..start].matches('\n').count();
                    outcomes.insert(name, first_difference(b, now, header));
                    continue;
                }
                Some(_) => Stored::Text(text),
                None => Stored::NotASnapshot("no `---` header".into()),
            },
            other => other,
        };
        let outcome = match (stored, check) {
            (Stored::Absent, true) => Outcome::Missing,
            (Stored::NotASnapshot(why), true) => Outcome::NotASnapshot(why),
            (_, _) => {
                std::fs::create_dir_all(snap.parent().unwrap_or(dir))
                    .and_then(|()| {
                        crate::fsutil::write_atomic(&snap, file_text(&name, now).as_bytes())
                    })
                    .with_context(|| format!("cannot write {}", snap.display()))?;
                Outcome::Written
            }
        };
        outcomes.insert(name, outcome);
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
            Outcome::NotASnapshot(why) => {
                failures += 1;
                format!(
                    "{name}: {snap} is not a gtr-run snapshot ({why}); run without --check to replace it"
                )
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

//! A run's output folder: where it is, what may be in it, who holds it,
//! and whether a previous run in it is refused, resumed or overwritten.

use std::path::{Path, PathBuf};

use super::RunError;
use super::jobs::Shard;
use super::record::{RECORD_FILE, RunRecord};
use crate::fsutil::{FolderLock, LOCK_FILE, LockError, is_temporary};
use crate::precision::Precision;

/// What to do with an output folder that holds a previous run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    Refuse,
    /// Skip images whose PNG is already there.
    Resume,
    /// Replace the previous run's files.
    Overwrite,
}

/// The default output folder: `runs/<model>-<schedule>-seed<seed>`, with
/// `-<precision>` added for a precision other than fp32 (whose images
/// differ, so that its run does not land in the fp32 run's folder) and
/// `-shard<k>of<n>` for a shard (so that shards sharing a disk do not
/// collide).
pub fn default_out_dir(
    model_name: &str,
    schedule: &Path,
    seed: u64,
    precision: Precision,
    shard: Option<Shard>,
) -> PathBuf {
    let stem = schedule
        .file_stem()
        .map_or("schedule".into(), |s| s.to_string_lossy().into_owned());
    let clean = |s: &str| {
        s.chars()
            .map(|c| {
                if c.is_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect::<String>()
    };
    let part = shard.map_or(String::new(), |s| format!("-shard{}of{}", s.k, s.n));
    PathBuf::from("runs").join(format!(
        "{}-{}-seed{seed}{}{part}",
        clean(model_name),
        clean(&stem),
        precision_suffix(precision)
    ))
}

/// `-<precision>` for a precision other than fp32, else nothing: the part
/// of a default folder name that keeps variant precisions' outputs apart.
pub fn precision_suffix(precision: Precision) -> String {
    match precision {
        Precision::Fp32 => String::new(),
        p => format!("-{p}"),
    }
}

/// The file of image `index` in an output folder.
pub fn image_path(out: &Path, index: usize) -> PathBuf {
    out.join(image_name(index))
}

/// The file name of image `index`: `00000.png`, ….
pub fn image_name(index: usize) -> String {
    format!("{index:05}.png")
}

/// Whether an image is written at `path`: a file, not a symbolic link
/// (gtr-run writes none; a link there is replaced, never followed).
pub(super) fn is_written(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file())
}

/// On `--resume`, the record already in `out` (written before the first
/// image, so present even when that run was killed) must be of this run and
/// this shard; otherwise images of two runs would be mixed. A folder with
/// images but no record cannot be checked and is refused.
pub(super) fn check_resumable(
    out: &Path,
    previous: Option<&RunRecord>,
    record: &RunRecord,
) -> Result<(), RunError> {
    let Some(previous) = previous else {
        let any_image = std::fs::read_dir(out)
            .map_err(|source| RunError::Write {
                path: out.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok())
            .any(|e| is_run_file(&e.file_name().to_string_lossy()));
        if any_image {
            return Err(RunError::Invalid(format!(
                "{} holds images but no run.json, so nothing says which run they belong to and resuming could mix two runs; pass --force to start over, or --out elsewhere",
                out.display()
            )));
        }
        return Ok(());
    };
    let mut differ = previous.disagreements("the folder", record, "this run");
    if previous.shard != record.shard {
        let name = |r: &RunRecord| match r.shard {
            Some(s) => format!("shard {}/{}", s.k, s.n),
            None => "no shard".to_string(),
        };
        differ.push(format!(
            "the shard ({} in the folder, {} in this run)",
            name(previous),
            name(record)
        ));
    }
    if differ.is_empty() {
        return Ok(());
    }
    Err(RunError::Invalid(format!(
        "{} holds a different run, so resuming would mix images of two runs: they differ in {}; use the same settings, --force to overwrite, or --out elsewhere",
        out.display(),
        differ.join(", ")
    )))
}

/// Refuses, before any work, a path a file cannot be written to: a folder,
/// or a file in a folder that does not exist. `what` names the option.
pub(super) fn check_file_target(path: &Path, what: &str) -> Result<(), RunError> {
    if path.is_dir() {
        return Err(RunError::Invalid(format!(
            "{what} {}: this is a folder; give a file name",
            path.display()
        )));
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(RunError::Invalid(format!(
            "{what} {}: the folder {} does not exist",
            path.display(),
            dir.display()
        )));
    }
    // Found now, not after every image is made: can a file be made there?
    tempfile::NamedTempFile::new_in(dir).map(drop).map_err(|e| {
        RunError::Invalid(format!(
            "{what} {}: cannot write in the folder {}: {e}",
            path.display(),
            dir.display()
        ))
    })
}

/// Takes the output folder `out` for this run and returns the lock that
/// keeps other gtr-run processes out of it (hold it until the run ends)
/// with the record of the run already there, if any.
///
/// In order: `out` is created if missing; locked (another process holding
/// it is named and refused); refused, `--force` or not, if it holds
/// anything gtr-run does not write (a folder, an unknown name, a `run.json`
/// that is not gtr-run's, an `.npz` without a run); cleared of temporary
/// files a killed run left; and then a previous run in it is refused
/// ([`Existing::Refuse`]), kept ([`Existing::Resume`], checked by
/// [`check_resumable`]) or its files removed ([`Existing::Overwrite`]).
pub(super) fn claim(
    out: &Path,
    existing: Existing,
) -> Result<(FolderLock, Option<RunRecord>), RunError> {
    let io = |path: &Path, source| RunError::Write {
        path: path.to_path_buf(),
        source,
    };
    if out.exists() && !out.is_dir() {
        return Err(RunError::Invalid(format!(
            "{} exists and is not a folder",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let lock = match FolderLock::try_new(out) {
        Ok(lock) => lock,
        Err(LockError::Busy) => {
            let holder = RunRecord::read(out)
                .ok()
                .and_then(|r| r.writer)
                .map(|w| match w.host.as_str() {
                    "" => format!(" (pid {})", w.pid),
                    host => format!(" (pid {} on {host})", w.pid),
                })
                .unwrap_or_default();
            return Err(RunError::Invalid(format!(
                "{} is being written by another gtr-run process{holder}; two runs in one folder would overwrite each other's images: wait for it to end, or give --out another folder",
                out.display()
            )));
        }
        Err(LockError::Io(e)) => {
            return Err(RunError::Invalid(format!(
                "cannot lock {} for this run: {e}",
                out.display()
            )));
        }
    };

    let mut run_files = Vec::new();
    let mut temporaries = Vec::new();
    let mut npz = None;
    let mut has_record = false;
    for entry in std::fs::read_dir(out).map_err(|e| io(out, e))? {
        let entry = entry.map_err(|e| io(out, e))?;
        let kind = entry.file_type().map_err(|e| io(&entry.path(), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let plain = kind.is_file() || kind.is_symlink();
        if name == LOCK_FILE {
            continue;
        } else if plain && is_run_file(&name) {
            has_record |= name == RECORD_FILE;
            run_files.push(entry.path());
        } else if plain && is_temporary(&name) {
            temporaries.push(entry.path());
        } else if plain && name.ends_with(".npz") {
            npz = Some(name);
        } else {
            return Err(foreign(out, &name));
        }
    }
    let record = if has_record {
        let path = out.join(RECORD_FILE);
        let ours = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
        match RunRecord::read(out) {
            Ok(r) if ours => Some(r),
            _ => {
                return Err(RunError::Invalid(format!(
                    "{} holds a run.json that is not a gtr-run record; gtr-run writes only into a new or empty folder or one holding its own run, --force or not, so give --out a new folder",
                    out.display()
                )));
            }
        }
    } else {
        None
    };
    if let (Some(name), None) = (npz, &record) {
        return Err(foreign(out, &name));
    }
    // No other gtr-run process can be writing these: the lock is ours.
    for path in temporaries {
        std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
    }
    match existing {
        Existing::Refuse if !run_files.is_empty() => {
            let unfinished = record.as_ref().is_some_and(|r| !r.finished);
            Err(RunError::Invalid(format!(
                "{} holds a previous run{}; pass --resume to skip the images already written, --force to overwrite, or --out elsewhere",
                out.display(),
                if unfinished {
                    " (unfinished: it was interrupted)"
                } else {
                    ""
                }
            )))
        }
        Existing::Overwrite => {
            for path in run_files {
                std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
            }
            Ok((lock, None))
        }
        _ => Ok((lock, record)),
    }
}

/// The refusal of a folder holding `name`, which gtr-run did not write.
fn foreign(out: &Path, name: &str) -> RunError {
    RunError::Invalid(format!(
        "{} holds `{name}`, which gtr-run does not write; gtr-run writes only into a new or empty folder or one holding its own run, --force or not, so give --out a new folder",
        out.display()
    ))
}

/// Whether a generation run writes files of this name: [`RECORD_FILE`],
/// `grid.png` and the images (`00000.png`, …).
pub(super) fn is_run_file(name: &str) -> bool {
    let image = name
        .strip_suffix(".png")
        .is_some_and(|stem| stem.len() >= 5 && stem.bytes().all(|b| b.is_ascii_digit()));
    image || name == RECORD_FILE || name == "grid.png"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_output_folder_names_model_schedule_and_seed() {
        let gtr = Path::new("schedules/gtr.gtr");
        let p = default_out_dir(
            "tiny random",
            Path::new("schedules/gtr-3.7x.gtr"),
            42,
            Precision::Fp32,
            None,
        );
        assert_eq!(p, PathBuf::from("runs/tiny_random-gtr-3.7x-seed42"));
        let shard = Some(Shard { k: 1, n: 8 });
        let p = default_out_dir("tiny", gtr, 0, Precision::Fp32, shard);
        assert_eq!(p, PathBuf::from("runs/tiny-gtr-seed0-shard1of8"));
        let p = default_out_dir("tiny", gtr, 0, Precision::Int8, shard);
        assert_eq!(p, PathBuf::from("runs/tiny-gtr-seed0-int8-shard1of8"));
    }
}

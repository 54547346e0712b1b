//! A run's output folder: where it is, what may be in it, who holds it,
//! and whether a previous run in it is refused, resumed or overwritten.

use std::ops::Range;
use std::path::{Path, PathBuf};

use super::RunError;
use super::jobs::Shard;
use super::record::{RECORD_FILE, RunRecord};
use crate::fsutil::{FolderLock, LOCK_FILE, LockError, temporary_target};
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

/// The most bytes of the model's and the schedule's names in a default
/// folder name (the rest is cut).
const NAME_PART_BYTES: usize = 96;

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
    // Each part at most NAME_PART_BYTES, so that the folder's name stays
    // under file systems' 255 bytes whatever the model and file are called.
    let clean = |s: &str| {
        let mut part = String::new();
        for c in s.chars() {
            let c = if c.is_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            };
            if part.len() + c.len_utf8() > NAME_PART_BYTES {
                break;
            }
            part.push(c);
        }
        part
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
/// this shard; otherwise images of two runs would be mixed. (A folder with
/// images but no record is refused by [`claim`].)
pub(super) fn check_resumable(
    out: &Path,
    previous: Option<&RunRecord>,
    record: &RunRecord,
) -> Result<(), RunError> {
    let Some(previous) = previous else {
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

/// On `--resume`, every image already in `out` must be one of the run's
/// (`range`): the folder is finished with the run's images alone, so an
/// image of another index (copied in, or left by a larger run) would stay
/// beside them unvouched for.
pub(super) fn check_images_in_range(out: &Path, range: &Range<usize>) -> Result<(), RunError> {
    for entry in std::fs::read_dir(out).map_err(|e| io(out, e))? {
        let name = entry.map_err(|e| io(out, e))?.file_name();
        let name = name.to_string_lossy();
        if image_index(&name).is_some_and(|i| !range.contains(&i)) {
            return Err(RunError::Invalid(format!(
                "{} holds `{name}`, which is not one of this run's images ({} to {}), so resuming would leave it beside them: remove it, --force to overwrite, or --out elsewhere",
                out.display(),
                image_name(range.start),
                image_name(range.end.saturating_sub(1)),
            )));
        }
    }
    Ok(())
}

/// Refuses, before any work, a path a file cannot be written to: a folder,
/// a device, pipe or socket (never replaced: [`crate::fsutil::not_a_file`]),
/// or a file in a folder that does not exist. `what` names the option.
pub fn check_file_target(path: &Path, what: &str) -> Result<(), RunError> {
    if path.is_dir() {
        return Err(RunError::Invalid(format!(
            "{what} {}: this is a folder; give a file name",
            path.display()
        )));
    }
    if let Some(kind) = crate::fsutil::not_a_file(path) {
        return Err(RunError::Invalid(format!(
            "{what} {}: this is {kind}, not a file; give a file name (it is not replaced)",
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
/// In order: `out` is created if missing and locked ([`create_and_lock`]); refused,
/// `--force` or not, if it holds anything gtr-run does not write
/// ([`inventory`]); cleared of temporary files a killed run left; and then
/// a previous run in it is refused ([`Existing::Refuse`]), kept
/// ([`Existing::Resume`], checked by [`check_resumable`]) or its files,
/// `.npz` files included, removed ([`Existing::Overwrite`]).
pub(super) fn claim(
    out: &Path,
    existing: Existing,
) -> Result<(FolderLock, Option<RunRecord>), RunError> {
    let lock = create_and_lock(out)?;
    let held = inventory(out)?;
    // No other gtr-run process can be writing these: the lock is ours.
    for path in &held.temporaries {
        std::fs::remove_file(path).map_err(|e| io(path, e))?;
    }
    // The record is written before the first image: images (or a grid)
    // without one are not a run's that gtr-run can vouch for, and neither
    // --force nor --resume may take them.
    if held.record.is_none() && !held.run_files.is_empty() {
        let first = held.run_files.iter().filter_map(|p| p.file_name()).min();
        return Err(RunError::Invalid(format!(
            "{} holds `{}` and other files named as a run's, but no run.json, so nothing says which run made them: they are not replaced or resumed; remove them yourself, or choose another folder",
            out.display(),
            first.map(|n| n.to_string_lossy()).unwrap_or_default()
        )));
    }
    match existing {
        Existing::Refuse if !held.run_files.is_empty() => {
            let unfinished = held.record.as_ref().is_some_and(|r| !r.finished);
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
            for path in held.run_files.iter().chain(&held.npz_files) {
                std::fs::remove_file(path).map_err(|e| io(path, e))?;
            }
            Ok((lock, None))
        }
        _ => Ok((lock, held.record)),
    }
}

fn io(path: &Path, source: std::io::Error) -> RunError {
    RunError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// `out` as an output folder is named: its `.` components left out
/// (`runs/a/.` is `runs/a`); refused if a `..` follows a folder name that
/// does not exist (`runs/new/..` would make `runs/new` on the way to its
/// parent), accepted where it exists (`$DIR/../runs/a`).
pub(super) fn folder_path(out: &Path) -> Result<PathBuf, RunError> {
    use std::path::Component;
    let mut before = PathBuf::new();
    for part in out.components() {
        if part == Component::ParentDir
            && matches!(before.components().next_back(), Some(Component::Normal(_)))
            && !before.is_dir()
        {
            return Err(RunError::Invalid(format!(
                "{}: `..` after {}, which does not exist (it would be made on the way); name the output folder without it",
                out.display(),
                before.display()
            )));
        }
        before.push(part);
    }
    Ok(out.components().collect())
}

/// Makes the folder `out` if it is missing (refusing a file of that name,
/// and a folder inside another command's output) and locks it ([`lock`]).
pub(super) fn create_and_lock(out: &Path) -> Result<FolderLock, RunError> {
    let out = &folder_path(out)?;
    if out.exists() && !out.is_dir() {
        return Err(RunError::Invalid(format!(
            "{} exists and is not a folder",
            out.display()
        )));
    }
    if !out.exists() && std::fs::symlink_metadata(out).is_ok() {
        return Err(RunError::Invalid(format!(
            "{} is a symbolic link to nothing (a folder that does not exist); make that folder, or give another",
            out.display()
        )));
    }
    // The nearest part of the path that exists must be a folder to make
    // the rest in.
    if let Some(file) = out
        .ancestors()
        .skip(1)
        .find(|a| a.exists())
        .filter(|a| !a.is_dir())
    {
        return Err(RunError::Invalid(format!(
            "{}: {} is a file, not a folder to make it in",
            out.display(),
            file.display()
        )));
    }
    // Inside another command's output folder (not the folder itself: a
    // previous run there is refused, resumed or replaced by `claim`).
    if let Some((folder, record)) = real_path(out).parent().and_then(other_output_above) {
        return Err(RunError::Invalid(format!(
            "{}: inside {}, which holds the output of another gtr-run command (its {record}); gtr-run writes there only as that command: choose a folder outside it",
            out.display(),
            folder.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    lock(out)
}

/// Locks the existing folder `out` for this process; another gtr-run
/// process holding it is named and refused.
pub(super) fn lock(out: &Path) -> Result<FolderLock, RunError> {
    match FolderLock::try_new(out) {
        Ok(lock) => Ok(lock),
        Err(LockError::Busy) => {
            let holder = RunRecord::read(out)
                .ok()
                .and_then(|r| r.writer)
                .map(|w| match w.host.as_str() {
                    "" => format!(" (pid {})", w.pid),
                    host => format!(" (pid {} on {host})", w.pid),
                })
                .unwrap_or_default();
            Err(RunError::Invalid(format!(
                "{} is being written by another gtr-run process{holder}; two processes writing one folder would overwrite each other's files: wait for it to end, or choose another folder",
                out.display()
            )))
        }
        Err(LockError::Io(e)) => Err(RunError::Invalid(format!(
            "cannot lock {} for this run: {e}",
            out.display()
        ))),
    }
}

/// What an output folder holds, every entry accounted for.
#[derive(Debug, Default)]
pub(super) struct Inventory {
    /// The run's own files: images, `grid.png`, `run.json`.
    pub run_files: Vec<PathBuf>,
    /// `.npz` files beside a run (`--npz`).
    pub npz_files: Vec<PathBuf>,
    /// Temporary files of those names that a killed gtr-run left
    /// ([`temporary_target`]).
    pub temporaries: Vec<PathBuf>,
    /// The folder's gtr-run record, if it has one.
    pub record: Option<RunRecord>,
}

/// An entry of an output folder, told by the names its writer uses.
enum Entry {
    /// A file (or a link, which is replaced, never followed) of one of the
    /// writer's names.
    Ours(PathBuf, String),
    /// A temporary file [`crate::fsutil::write_atomic`] left for one of them.
    Temporary(PathBuf),
    /// Anything else: a folder, another name.
    Foreign(String),
}

/// The entries of the existing folder `out` (its lock file left out),
/// each told by `ours`, the names its writer uses.
fn entries(out: &Path, ours: impl Fn(&str) -> bool) -> Result<Vec<Entry>, RunError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(out).map_err(|e| io(out, e))? {
        let entry = entry.map_err(|e| io(out, e))?;
        let kind = entry.file_type().map_err(|e| io(&entry.path(), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let plain = kind.is_file() || kind.is_symlink();
        found.push(if name == LOCK_FILE {
            continue;
        } else if plain && ours(&name) {
            Entry::Ours(entry.path(), name)
        } else if plain && temporary_target(&name).is_some_and(&ours) {
            Entry::Temporary(entry.path())
        } else {
            Entry::Foreign(name)
        });
    }
    Ok(found)
}

/// Lists the existing folder `out`, refusing it if it holds anything
/// gtr-run does not write there: a folder, an unknown name, a `run.json`
/// that is not a gtr-run record, an `.npz` without a run, a temporary file
/// of another name. Removes nothing.
pub(super) fn inventory(out: &Path) -> Result<Inventory, RunError> {
    let mut held = Inventory::default();
    let mut has_record = false;
    for entry in entries(out, |name| is_run_file(name) || name.ends_with(".npz"))? {
        match entry {
            Entry::Ours(path, name) if is_run_file(&name) => {
                has_record |= name == RECORD_FILE;
                held.run_files.push(path);
            }
            Entry::Ours(path, _) => held.npz_files.push(path),
            Entry::Temporary(path) => held.temporaries.push(path),
            Entry::Foreign(name) => return Err(foreign(out, &name)),
        }
    }
    if has_record {
        let path = out.join(RECORD_FILE);
        let plain = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
        match RunRecord::read(out) {
            Ok(r) if plain => held.record = Some(r),
            _ => {
                return Err(RunError::Invalid(format!(
                    "{} holds a run.json that is not a gtr-run record; gtr-run writes only into a new or empty folder or one holding its own run, --force or not: remove it, or choose a new folder",
                    out.display()
                )));
            }
        }
    }
    if let (Some(npz), None) = (held.npz_files.first(), &held.record) {
        let name = npz.file_name().unwrap_or_default().to_string_lossy();
        return Err(foreign(out, &name));
    }
    Ok(held)
}

/// Takes the folder `out` for a report made of files of fixed names
/// (`names`: an evaluation's `eval.md`, `eval.csv`, `eval.json`, …) and
/// returns its lock (hold it until the files are written). The folder is
/// created if missing and locked, as a run's is; refused if it holds anything
/// else than those files and gtr-run's temporary files of them (a run's
/// images, anybody's notes); refused if it holds one of them (the output
/// of a previous `command`, e.g. `gtr-run eval`) unless `force`, which
/// removes them, so that no file of the previous report is left beside the
/// new one.
pub fn claim_report(
    out: &Path,
    names: &[&str],
    command: &str,
    force: bool,
) -> Result<FolderLock, RunError> {
    let lock = create_and_lock(out)?;
    let (mut previous, mut temporaries) = (Vec::new(), Vec::new());
    for entry in entries(out, |name| names.contains(&name))? {
        match entry {
            Entry::Ours(path, _) => previous.push(path),
            Entry::Temporary(path) => temporaries.push(path),
            Entry::Foreign(name) if names.contains(&name.as_str()) => {
                return Err(RunError::Invalid(format!(
                    "{} holds `{name}`, which is not a file (a folder, a pipe, a link to one), where `{command}` writes its file of that name; remove it, or choose a new folder",
                    out.display()
                )));
            }
            Entry::Foreign(name) => {
                return Err(RunError::Invalid(format!(
                    "{} holds `{name}`, which `{command}` does not write (it writes {}); it writes only into a new or empty folder or one holding its own output, --force or not: remove it, or choose a new folder",
                    out.display(),
                    names.join(", ")
                )));
            }
        }
    }
    if !previous.is_empty() && !force {
        return Err(RunError::Invalid(format!(
            "{} holds the output of a previous `{command}`; give --force to replace it or --out for another folder",
            out.display()
        )));
    }
    for path in previous.iter().chain(&temporaries) {
        std::fs::remove_file(path).map_err(|e| io(path, e))?;
    }
    Ok(lock)
}

/// Checks an `--npz` target before any work and says whether it lies
/// directly in the output folder `out` (links and `..` resolved). There its
/// name must end in `.npz`, since every other name in the folder is the
/// run's own (an image, `run.json`); elsewhere it must be a file that can
/// be written ([`check_file_target`]), outside another command's output
/// folder ([`check_outside_other_output`]). Anywhere, it may not be nor lie
/// in one of `inputs` ([`check_outside_inputs`]).
pub(super) fn check_npz_target(
    npz: &Path,
    out: &Path,
    inputs: &[PathBuf],
) -> Result<bool, RunError> {
    check_outside_inputs(npz, "--npz", inputs)?;
    let name = npz.file_name().map(|n| n.to_string_lossy());
    let well_named = name
        .as_ref()
        .is_some_and(|name| name.ends_with(".npz") && name.len() > 4 && !name.starts_with('.'));
    let inside = in_folder(npz, out);
    if inside && !well_named {
        return Err(RunError::Invalid(format!(
            "--npz {}: in the output folder {} an .npz must be named NAME.npz; the folder's other names are the run's own files",
            npz.display(),
            out.display()
        )));
    }
    if !well_named {
        return Err(RunError::Invalid(format!(
            "--npz {}: give a name ending in .npz (it replaces a file of that name; another run's record, an image or a graph is never replaced)",
            npz.display()
        )));
    }
    // The file is written under a temporary name 13 bytes longer, then renamed.
    if name.is_some_and(|name| name.len() + 13 > 255) {
        return Err(RunError::Invalid(format!(
            "--npz {}: the name is too long (at most 242 bytes)",
            npz.display()
        )));
    }
    if !inside {
        check_outside_other_output(npz, "--npz")?;
        check_file_target(npz, "--npz")?;
        // A link there is replaced, never written through, whatever it names.
        let file = std::fs::symlink_metadata(npz).is_ok_and(|m| m.is_file());
        if file && !is_npz(npz) {
            return Err(RunError::Invalid(format!(
                "--npz {}: a file of that name is there and is not an .npz (a zip archive); it is not replaced",
                npz.display()
            )));
        }
    }
    Ok(inside)
}

/// Whether the file at `path` begins as a zip archive (an .npz) does.
fn is_npz(path: &Path) -> bool {
    begins_with(path, &[b"PK\x03\x04", b"PK\x05\x06"])
}

/// Whether the file at `path` begins with one of `signatures`.
fn begins_with(path: &Path, signatures: &[&[u8]]) -> bool {
    use std::io::Read;
    let longest = signatures.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut head = Vec::with_capacity(longest);
    std::fs::File::open(path)
        .and_then(|f| f.take(longest as u64).read_to_end(&mut head))
        .is_ok_and(|_| signatures.iter().any(|s| head.starts_with(s)))
}

/// Refuses, before any work, a picture target (`what`, e.g. `--png`) that
/// [`check_file_target`] refuses, that lies in another command's output
/// folder ([`check_outside_other_output`]), or where a file that is not a
/// PNG is: a PNG there is replaced (a link is replaced, never followed),
/// a graph, a manifest, a record or an archive never.
pub fn check_png_target(path: &Path, what: &str) -> Result<(), RunError> {
    check_file_target(path, what)?;
    check_outside_other_output(path, what)?;
    let file = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file());
    if file && !begins_with(path, &[b"\x89PNG\r\n\x1a\n"]) {
        return Err(RunError::Invalid(format!(
            "{what} {}: a file of that name is there and is not a PNG; it is not replaced",
            path.display()
        )));
    }
    Ok(())
}

/// Whether `path` names an entry directly in `folder`, with links and `..`
/// resolved where the paths exist (lexically where they do not yet).
pub(super) fn in_folder(path: &Path, folder: &Path) -> bool {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    real_path(parent)
        .components()
        .eq(real_path(folder).components())
}

/// Refuses a folder of other output (`flag`, e.g. `--ort-profile`) that is
/// the run folder `out` or inside it (the run would refuse its own folder
/// for files it does not write, now and on every later run), or inside
/// another command's output folder ([`check_outside_other_output`]).
pub fn check_outside_run(path: &Path, flag: &str, out: &Path) -> Result<(), RunError> {
    if real_path(path).starts_with(real_path(out)) {
        return Err(RunError::Invalid(format!(
            "{flag} {}: inside the run's folder {}, which holds only the run's own files: choose a folder outside it",
            path.display(),
            out.display()
        )));
    }
    check_outside_other_output(path, flag)
}

/// The files `gtr-run eval` (`command` "eval") or `gtr-run sweep`
/// ("sweep") writes in its output folder: the table as Markdown and CSV,
/// the results as JSON (the record), and a sweep's drawing.
pub fn report_files(command: &str) -> Vec<String> {
    let mut names: Vec<String> = ["md", "csv", "json"]
        .map(|extension| format!("{command}.{extension}"))
        .into();
    if command == "sweep" {
        names.push("pareto.svg".into());
    }
    names
}

/// The commands whose output folders gtr-run recognises: the record each
/// writes (JSON whose top level has `gtr_run_version`), and the command
/// ("run" for a run or a merge).
const OUTPUT_RECORDS: [(&str, &str); 3] = [
    (RECORD_FILE, "run"),
    ("eval.json", "eval"),
    ("sweep.json", "sweep"),
];

/// The record of the gtr-run command that owns the folder `dir`: one of
/// [`OUTPUT_RECORDS`] as that command wrote it (a plain file whose top level
/// records `gtr_run_version`, read as a stream, other fields skipped), and
/// nothing in the folder that the command does not write there (a run's
/// images, `grid.png` and `.npz` files, a report's files, temporary files
/// of those names). A folder holding anything else (a project holding a
/// copy of a record) is not a command's output.
fn owner_record(dir: &Path) -> Option<&'static str> {
    #[derive(serde::Deserialize)]
    struct Written {
        #[serde(rename = "gtr_run_version")]
        _version: String,
    }
    let (record, command) = OUTPUT_RECORDS.into_iter().find(|(name, _)| {
        let path = dir.join(name);
        std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file())
            && std::fs::File::open(&path).is_ok_and(|f| {
                serde_json::from_reader::<_, Written>(std::io::BufReader::new(f)).is_ok()
            })
    })?;
    let reports = report_files(command);
    let writes = |name: &str| match command {
        "run" => is_run_file(name) || name.ends_with(".npz"),
        _ => reports.iter().any(|r| r == name),
    };
    let found = entries(dir, writes).ok()?;
    let owned = !found.iter().any(|e| matches!(e, Entry::Foreign(_)));
    owned.then_some(record)
}

/// The nearest folder at or above `path` (links and `..` resolved) that
/// holds the output of a gtr-run command (a run, a merge, an evaluation, a
/// sweep), with the record that says so.
fn other_output_above(path: &Path) -> Option<(PathBuf, &'static str)> {
    real_path(path)
        .ancestors()
        .find_map(|folder| owner_record(folder).map(|record| (folder.to_path_buf(), record)))
}

/// Refuses `path` (given as `what`, a flag) when it is, or lies in, the
/// output folder of a gtr-run command (a folder holding its record): files
/// added there would mix with that output, and its command would refuse
/// its own folder for them afterwards.
pub fn check_outside_other_output(path: &Path, what: &str) -> Result<(), RunError> {
    match other_output_above(path) {
        Some((folder, record)) => Err(RunError::Invalid(format!(
            "{what} {}: inside {}, which holds the output of another gtr-run command (its {record}); gtr-run writes there only as that command: choose a path outside it",
            path.display(),
            folder.display()
        ))),
        None => Ok(()),
    }
}

/// Refuses an output `path` (given as `what`) that is one of the run's
/// inputs or lies in one (`inputs`: the bundle's folder, the replay file),
/// links and `..` resolved: an output is never written over what the run
/// reads.
pub fn check_outside_inputs(path: &Path, what: &str, inputs: &[PathBuf]) -> Result<(), RunError> {
    let real = real_path(path);
    match inputs
        .iter()
        .find(|input| real.starts_with(real_path(input)))
    {
        Some(input) => Err(RunError::Invalid(format!(
            "{what} {}: {} {}, which this run reads; outputs never go there: choose a path outside it",
            path.display(),
            if real == real_path(input) {
                "is"
            } else {
                "lies in"
            },
            input.display()
        ))),
        None => Ok(()),
    }
}

/// `path` with links and `..` resolved as far as it exists (its nearest
/// existing ancestor made canonical, the rest appended), absolute.
pub(super) fn real_path(path: &Path) -> PathBuf {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    for base in path.ancestors() {
        if let Ok(real) = base.canonicalize() {
            return match path.strip_prefix(base) {
                Ok(rest) if !rest.as_os_str().is_empty() => real.join(rest),
                _ => real,
            };
        }
    }
    path
}

/// The refusal of a folder holding `name`, which gtr-run did not write.
fn foreign(out: &Path, name: &str) -> RunError {
    RunError::Invalid(format!(
        "{} holds `{name}`, which gtr-run does not write; gtr-run writes only into a new or empty folder or one holding its own run, --force or not: remove it, or choose a new folder",
        out.display()
    ))
}

/// The index of the image file named `name` ([`image_name`] of it), if
/// `name` is one.
pub(super) fn image_index(name: &str) -> Option<usize> {
    let index: usize = name.strip_suffix(".png")?.parse().ok()?;
    (image_name(index) == name).then_some(index)
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

    #[test]
    fn default_output_folder_names_stay_under_255_bytes() {
        let model = "m".repeat(256);
        let schedule = format!("schedules/{}.gtr", "é".repeat(120));
        let shard = Some(Shard { k: 1000, n: 1000 });
        let p = default_out_dir(
            &model,
            Path::new(&schedule),
            u64::MAX,
            Precision::Int8,
            shard,
        );
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(name.len() <= 255, "{} bytes", name.len());
        assert!(name.starts_with(&"m".repeat(NAME_PART_BYTES)), "{name}");
        assert!(
            name.ends_with(&format!("-seed{}-int8-shard1000of1000", u64::MAX)),
            "{name}"
        );
    }

    #[test]
    fn npz_in_the_output_folder_is_recognised_through_links_and_dots() {
        assert!(in_folder(Path::new("a/b/x.npz"), Path::new("a/b")));
        assert!(in_folder(Path::new("a/b/x.npz"), Path::new("a/b/")));
        assert!(!in_folder(Path::new("a/x.npz"), Path::new("a/b")));
        assert!(in_folder(Path::new("x.npz"), Path::new(".")));
        let scratch = tempfile::tempdir().unwrap();
        let out = scratch.path().join("out");
        std::fs::create_dir(&out).unwrap();
        assert!(in_folder(&out.join("../out/x.npz"), &out));
        #[cfg(unix)]
        {
            let link = scratch.path().join("link");
            std::os::unix::fs::symlink(&out, &link).unwrap();
            assert!(in_folder(&link.join("x.npz"), &out));
        }
        // A folder not made yet.
        let later = scratch.path().join("later");
        assert!(in_folder(&later.join("x.npz"), &later));
        let refused = check_npz_target(&out.join("00000.png"), &out, &[]).unwrap_err();
        assert!(
            refused.to_string().contains("must be named NAME.npz"),
            "{refused}"
        );
        assert!(check_npz_target(&out.join("all.npz"), &out, &[]).unwrap());
    }
}

//! `gtr-run merge`: joins the output folders of the shards of one run
//! (`--shard K/N`) into the folder one machine would have written.

use std::ops::Range;
use std::path::{Path, PathBuf};

use super::folder::{
    check_npz_target, create_and_lock, folder_path, image_index, image_name, image_path, inventory,
    lock, real_path,
};
use super::outputs::{write_grid, write_npz};
use super::record::RunRecord;
use super::{RunError, Shard};
use crate::fsutil::{FolderLock, sha256_file};

#[derive(Debug, Clone)]
pub struct MergeRequest {
    /// The folder to create (or, with `force`, replace).
    pub out: PathBuf,
    /// Finished shard folders (or whole-run folders), in any order.
    pub parts: Vec<PathBuf>,
    /// Also write all images as an `.npz` here.
    pub npz: Option<PathBuf>,
    /// Replace a non-empty `out` that holds only gtr-run output.
    pub force: bool,
}

/// One finished part: its folder, its record and the images it holds.
struct Part {
    dir: PathBuf,
    record: RunRecord,
    /// Images in the whole run.
    num: usize,
    shard: Option<Shard>,
    range: Range<usize>,
}

impl Part {
    fn read(dir: &Path) -> Result<Part, RunError> {
        if !dir.is_dir() {
            return Err(RunError::Invalid(format!(
                "{}: no such folder",
                dir.display()
            )));
        }
        let record = RunRecord::read(dir)?;
        if !record.finished {
            return Err(RunError::Invalid(format!(
                "{} holds an unfinished run (its run.json is written before the first image and marked finished only at the end): it was interrupted or is still running; finish it with --resume, then merge",
                dir.display()
            )));
        }
        let num = record.num_images;
        if num == 0 || num > crate::limits::MAX_IMAGES {
            return Err(RunError::Invalid(format!(
                "{}/run.json: {num} images, outside 1 to {}; is it a gtr-run record?",
                dir.display(),
                crate::limits::MAX_IMAGES
            )));
        }
        let shard = record.shard.map(|s| Shard { k: s.k, n: s.n });
        if let Some(shard) = shard
            && (shard.k >= shard.n || shard.n > num)
        {
            return Err(RunError::Invalid(format!(
                "{}/run.json: shard {shard} of {num} images is impossible; is it a gtr-run record?",
                dir.display()
            )));
        }
        let range = shard.map_or(0..num, |s| s.range(num));
        check_consistent(dir, &record, &range)?;
        Ok(Part {
            dir: dir.to_path_buf(),
            record,
            num,
            shard,
            range,
        })
    }

    /// Every image the part claims must be there as a file of its own: a
    /// symbolic link (gtr-run writes none) could lead out of the part, to
    /// anything. Each must also have a hash in the part's record, which
    /// [`Part::check_hash`] compares, and, for a schedule with adaptive
    /// steps, its reveal order.
    fn check_files(&self) -> Result<(), RunError> {
        for i in self.range.clone() {
            let path = image_path(&self.dir, i);
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_symlink() => {
                    let to = std::fs::read_link(&path)
                        .map_or_else(|_| "?".into(), |t| t.display().to_string());
                    return Err(RunError::Invalid(format!(
                        "{} is a symbolic link (to {to}), but gtr-run writes images as files; a link can lead out of the part, so merge refuses it: put the image itself there, or run the part again with --resume after removing the link",
                        path.display()
                    )));
                }
                Ok(m) if m.is_file() => {}
                _ => {
                    return Err(RunError::Invalid(format!(
                        "{} lacks {}, which its run.json says it holds",
                        self.describe(),
                        path.display()
                    )));
                }
            }
            // An adaptive run's orders exist only in its record.
            if self.record.cost_per_image.cost.adaptive_candidates > 0
                && !self.record.reveal_orders.contains_key(&image_name(i))
            {
                return Err(RunError::Invalid(format!(
                    "{}/run.json records no reveal order for {} (`reveal_orders`), which its schedule's adaptive steps chose; run the part again with --resume to make the image anew",
                    self.dir.display(),
                    image_name(i)
                )));
            }
            if !self.record.images_sha256.contains_key(&image_name(i)) {
                return Err(RunError::Invalid(format!(
                    "{}/run.json records no SHA-256 for {} (`images_sha256`; records written before gtr-run kept image hashes have none), so the image cannot be checked; make the part again with --force",
                    self.dir.display(),
                    image_name(i)
                )));
            }
        }
        Ok(())
    }

    /// The image `i` of this part, as found at `path`, must have the
    /// SHA-256 the part's record gives it.
    fn check_hash(&self, i: usize, path: &Path) -> Result<(), RunError> {
        let name = image_name(i);
        let want = self
            .record
            .images_sha256
            .get(&name)
            .map_or("", String::as_str);
        let got = sha256_file(path)
            .map_err(|e| RunError::Invalid(format!("reading {}: {e}", path.display())))?;
        if got == want {
            return Ok(());
        }
        Err(RunError::Invalid(format!(
            "{} is not the image its run.json recorded (SHA-256 {got}, recorded {want}): it was changed or replaced after the run; remove it and run the part again with --resume to make it anew",
            self.dir.join(&name).display()
        )))
    }

    fn name(&self) -> String {
        self.dir.display().to_string()
    }

    /// E.g. `parts/1 (shard 1/2, images 2-3)`.
    fn describe(&self) -> String {
        let images = spans(&self.range.clone().collect::<Vec<_>>());
        match self.shard {
            Some(s) => format!("{} (shard {s}, images {images})", self.name()),
            None => format!("{} (a whole run, images {images})", self.name()),
        }
    }
}

/// Merges `req.parts` into `req.out`: checks that the parts are of one run
/// (same model, schedule text and parameters, seed, number of images,
/// labels, guidance and temperature overrides, version) and hold each image
/// index exactly once, with every PNG they claim present; then builds the
/// folder beside `out` (PNGs hard-linked where the file system allows, else
/// copied; `grid.png`; a combined `run.json`, see
/// [`RunRecord::combine`]; the `.npz` if asked) and renames
/// it into place, so `out` is never seen half-written. A non-empty `out` is
/// refused unless `force`, and even then only if it holds nothing but
/// gtr-run output. Returns the combined record.
pub fn merge(req: &MergeRequest) -> Result<RunRecord, RunError> {
    // The folder as the commit renames it: named plainly, and a link to a
    // folder followed (renaming the link would replace the link itself).
    let mut out = folder_path(&req.out)?;
    if std::fs::symlink_metadata(&out).is_ok_and(|m| m.file_type().is_symlink()) && out.is_dir() {
        out = out.canonicalize().map_err(|source| RunError::Write {
            path: out.clone(),
            source,
        })?;
    }
    let out = out.as_path();
    let mut parts: Vec<Part> = req
        .parts
        .iter()
        .map(|dir| Part::read(dir))
        .collect::<Result<_, _>>()?;
    parts.sort_by_key(|p| (p.range.start, p.range.end));
    let Some(first) = parts.first() else {
        return Err(RunError::Invalid(
            "give at least one part folder to merge".into(),
        ));
    };
    for part in &parts[1..] {
        let differ = first
            .record
            .disagreements(&first.name(), &part.record, &part.name());
        if !differ.is_empty() {
            return Err(RunError::Invalid(format!(
                "{} and {} are not parts of one run: they differ in {}",
                first.name(),
                part.name(),
                differ.join(", ")
            )));
        }
    }
    let num = first.num;
    check_coverage(&parts, num)?;
    for part in &parts {
        part.check_files()?;
    }
    // Held until the merged folder is in place: no gtr-run writes into the
    // old one meanwhile.
    let mut held = check_out(out, &parts, req.force)?;
    let npz_in_out = match &req.npz {
        Some(npz) => {
            let parts: Vec<PathBuf> = parts.iter().map(|p| p.dir.clone()).collect();
            check_npz_target(npz, out, &parts)?
        }
        None => false,
    };

    let staging = Staging::new(out)?;
    for part in &parts {
        for i in part.range.clone() {
            let staged = image_path(&staging.dir, i);
            link_or_copy(&image_path(&part.dir, i), &staged)?;
            // The file as merged, checked against the part's record.
            part.check_hash(i, &staged)?;
        }
    }
    write_grid(
        &staging.dir,
        num,
        &first.record.labels,
        first.record.model.classes,
    )?;
    let records: Vec<(String, RunRecord)> =
        parts.iter().map(|p| (p.name(), p.record.clone())).collect();
    let record = RunRecord::combine(&records).expect("at least one part");
    record.write(&staging.dir)?;
    if let Some(npz) = &req.npz {
        // An .npz meant to sit in `out` is made in the staging folder too.
        let target = match (npz_in_out, npz.file_name()) {
            (true, Some(name)) => staging.dir.join(name),
            _ => npz.clone(),
        };
        write_npz(&target, &staging.dir, 0..num)?;
    }
    staging.commit(out)?;
    held.made = None;
    Ok(record)
}

/// `OUT` as a merge holds it: locked until the merged folder replaces it;
/// made (empty) by the merge where it did not exist, so that no run can
/// take it meanwhile, and removed again if the merge fails.
struct HeldOut {
    _lock: FolderLock,
    made: Option<PathBuf>,
}

impl Drop for HeldOut {
    fn drop(&mut self) {
        if let Some(dir) = &self.made {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Every index in `0..num` must be held by exactly one part; the error
/// names overlapping parts, missing indices and, when all parts are shards
/// of one N, the missing shards.
fn check_coverage(parts: &[Part], num: usize) -> Result<(), RunError> {
    let mut problems = Vec::new();
    for (k, a) in parts.iter().enumerate() {
        for b in &parts[k + 1..] {
            let both: Vec<usize> =
                (a.range.start.max(b.range.start)..a.range.end.min(b.range.end)).collect();
            if !both.is_empty() {
                problems.push(format!(
                    "images {} are in both {} and {}",
                    spans(&both),
                    a.describe(),
                    b.describe()
                ));
            }
        }
    }
    let mut held = vec![false; num];
    for part in parts {
        held[part.range.clone()].fill(true);
    }
    let missing: Vec<usize> = (0..num).filter(|&i| !held[i]).collect();
    if !missing.is_empty() {
        let mut problem = format!("no part holds images {}", spans(&missing));
        let ns: Vec<usize> = parts.iter().filter_map(|p| p.shard.map(|s| s.n)).collect();
        if ns.len() == parts.len() && ns.windows(2).all(|w| w[0] == w[1]) {
            let n = ns[0];
            let absent: Vec<String> = (0..n)
                .filter(|&k| !parts.iter().any(|p| p.shard.is_some_and(|s| s.k == k)))
                .map(|k| format!("{k}/{n}"))
                .collect();
            problem += &format!(" (missing: shard {})", absent.join(", "));
        }
        problems.push(problem);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(RunError::Invalid(format!(
            "the parts must hold each of the {num} images exactly once: {}",
            problems.join("; ")
        )))
    }
}

/// Indices (ascending) as runs, e.g. `0-3, 7`.
fn spans(indices: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut k = 0;
    while k < indices.len() {
        let start = indices[k];
        while k + 1 < indices.len() && indices[k + 1] == indices[k] + 1 {
            k += 1;
        }
        out.push(if indices[k] == start {
            start.to_string()
        } else {
            format!("{start}-{}", indices[k])
        });
        k += 1;
    }
    out.join(", ")
}

/// `out` may not be a file nor a part; it is made if missing and locked
/// (hold the returned [`HeldOut`] until the merge is committed), and if it
/// holds anything, `force` must be given and it may hold only gtr-run
/// output ([`inventory`]), which the merge replaces.
fn check_out(out: &Path, parts: &[Part], force: bool) -> Result<HeldOut, RunError> {
    let invalid = |m: String| Err(RunError::Invalid(m));
    if out.exists() && !out.is_dir() {
        return invalid(format!("{} exists and is not a folder", out.display()));
    }
    if out.file_name().is_none() {
        return invalid(format!("{}: give the merged folder a name", out.display()));
    }
    let canonical = out.canonicalize().ok();
    if let Some(part) = parts
        .iter()
        .find(|p| canonical.is_some() && p.dir.canonicalize().ok() == canonical)
    {
        return invalid(format!(
            "{} is one of the parts ({}); merge into a new folder",
            out.display(),
            part.describe()
        ));
    }
    // Nor inside one (the part would then hold a folder no run writes, and
    // be refused by --resume), nor around one.
    let out_path = real_path(out);
    if let Some(part) = parts.iter().find(|p| {
        let part = real_path(&p.dir);
        out_path.starts_with(&part) || part.starts_with(&out_path)
    }) {
        return invalid(format!(
            "{} lies inside, or holds, one of the parts ({}); merge into a folder beside them",
            out.display(),
            part.describe()
        ));
    }
    if !out.is_dir() {
        let lock = create_and_lock(out)?;
        return Ok(HeldOut {
            _lock: lock,
            made: Some(out.to_path_buf()),
        });
    }
    let held = lock(out)?;
    let empty = std::fs::read_dir(out)
        .map_err(|source| RunError::Write {
            path: out.to_path_buf(),
            source,
        })?
        .next()
        .is_none();
    if !empty && !force {
        return invalid(format!(
            "{} is not empty; pass --force to replace the run in it, or give a new folder",
            out.display()
        ));
    }
    inventory(out)?;
    Ok(HeldOut {
        _lock: held,
        made: None,
    })
}

/// A part's record must agree with itself: a label per image of the whole
/// run, each one of the model's classes, and image hashes only for the
/// images of the part's `range` (a record edited by hand would otherwise
/// merge into a folder whose record and images disagree).
fn check_consistent(dir: &Path, record: &RunRecord, range: &Range<usize>) -> Result<(), RunError> {
    let bad = |problem: String| {
        Err(RunError::Invalid(format!(
            "{}/run.json: {problem}; is it a gtr-run record?",
            dir.display()
        )))
    };
    let (labels, num) = (record.labels.len(), record.num_images);
    if labels != num {
        return bad(format!("{labels} labels for {num} images"));
    }
    let classes = record.model.classes;
    if let Some(label) = record
        .labels
        .iter()
        .find(|&&l| usize::try_from(l).map_or(true, |l| l >= classes))
    {
        return bad(format!(
            "label {label} is not one of the model's {classes} classes"
        ));
    }
    let ours = |name: &str| image_index(name).is_some_and(|i| range.contains(&i));
    if let Some(name) = record.images_sha256.keys().find(|name| !ours(name)) {
        return bad(format!(
            "a hash for `{name}`, which is not one of the part's images ({})",
            spans(&range.clone().collect::<Vec<_>>())
        ));
    }
    Ok(())
}

fn link_or_copy(from: &Path, to: &Path) -> Result<(), RunError> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|source| RunError::Write {
            path: to.to_path_buf(),
            source,
        })
}

/// A hidden folder beside the destination where the merge is built; removed
/// unless committed.
struct Staging {
    dir: PathBuf,
    committed: bool,
}

impl Staging {
    /// A new staging folder for `out`, which the caller holds locked: the
    /// staging folders of merges into `out` that were killed (`.<name>.merge-
    /// XXXXXX.tmp`, none of them live, since none holds the lock) are
    /// removed first. (A killed commit's `.old-` folder is left: it may be
    /// the only copy of what `out` held.)
    fn new(out: &Path) -> Result<Staging, RunError> {
        for leftover in siblings(out, "merge")? {
            std::fs::remove_dir_all(&leftover).map_err(|source| RunError::Write {
                path: leftover.clone(),
                source,
            })?;
        }
        let dir = hidden_sibling(out, "merge")?;
        Ok(Staging {
            dir,
            committed: false,
        })
    }

    /// Puts the built folder at `out`, replacing what is there (checked by
    /// [`check_out`]); the old folder is moved aside first and restored if
    /// the move fails.
    fn commit(mut self, out: &Path) -> Result<(), RunError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RunError::Write { path, source }
        };
        if out.is_dir() {
            // A folder renamed onto an empty folder replaces it.
            let old = hidden_sibling(out, "old")?;
            if let Err(e) = std::fs::rename(out, &old) {
                let _ = std::fs::remove_dir(&old);
                return Err(io(out)(e));
            }
            if let Err(e) = std::fs::rename(&self.dir, out) {
                let _ = std::fs::rename(&old, out);
                return Err(io(out)(e));
            }
            self.committed = true;
            std::fs::remove_dir_all(&old).map_err(io(&old))
        } else {
            std::fs::rename(&self.dir, out).map_err(io(out))?;
            self.committed = true;
            Ok(())
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The folders (not links) beside `out` named as [`hidden_sibling`] names
/// them for `what`.
fn siblings(out: &Path, what: &str) -> Result<Vec<PathBuf>, RunError> {
    let (prefix, parent) = sibling_prefix(out, what);
    let entries = std::fs::read_dir(parent).map_err(|source| RunError::Write {
        path: parent.to_path_buf(),
        source,
    })?;
    Ok(entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let random = name
                .strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix(".tmp"));
            random.is_some_and(|r| r.len() == 6 && r.chars().all(|c| c.is_ascii_alphanumeric()))
                && e.file_type().is_ok_and(|t| t.is_dir())
        })
        .map(|e| e.path())
        .collect())
}

/// The name prefix `.<name>.<what>-` of `out`'s hidden siblings, and the
/// folder they lie in.
fn sibling_prefix<'a>(out: &'a Path, what: &str) -> (String, &'a Path) {
    let name = out
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy().into_owned());
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    (format!(".{name}.{what}-"), parent)
}

/// A new empty folder `.<name>.<what>-XXXXXX.tmp` beside `out`, its name
/// random and created exclusively (an existing name, a planted symbolic
/// link included, is never reused), with the usual permissions.
fn hidden_sibling(out: &Path, what: &str) -> Result<PathBuf, RunError> {
    let (prefix, parent) = sibling_prefix(out, what);
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp").rand_bytes(6);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o777));
    }
    builder
        .tempdir_in(parent)
        .map(|d| d.keep())
        .map_err(|source| RunError::Write {
            path: parent.join(format!("{prefix}XXXXXX.tmp")),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_join_consecutive_indices() {
        assert_eq!(spans(&[0, 1, 2, 3, 7, 9, 10]), "0-3, 7, 9-10");
        assert_eq!(spans(&[5]), "5");
        assert_eq!(spans(&[]), "");
    }
}

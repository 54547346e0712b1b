//! File writing that never leaves a half-written file behind, never writes
//! through a symbolic link, and folders that one process at a time may
//! write.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Writes `bytes` to `path` by writing a temporary file beside it and
/// renaming it into place, so readers see the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Like [`write_atomic`], with the content streamed by `fill` into a
/// buffered temporary file beside `path`. The file appears at `path` only
/// if `fill`, the flush and the sync all succeed; otherwise the temporary
/// file is removed and `path` is left as it was.
///
/// The temporary file is `.NAME.XXXXXX.tmp` with six random characters,
/// created exclusively (`O_CREAT|O_EXCL`, which fails on any existing
/// name, a symbolic link included, instead of following it), so a link
/// planted beside `path` cannot redirect the write. The rename replaces
/// whatever is at `path`: a symbolic link there is replaced by the file,
/// never written through. Anything else there that is not a regular file
/// (a device such as `/dev/full`, a pipe, a socket, a folder, or a link to
/// one of them, such as `/dev/stdout`) is refused
/// ([`std::io::ErrorKind::InvalidInput`]), never replaced. The file gets the
/// usual permissions (0666 less the umask), as `File::create` would give it.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    if let Some(kind) = not_a_file(path) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} is {kind}, not a file; it is not replaced",
                path.display()
            ),
        ));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy().into_owned());
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp").rand_bytes(6);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    // Removed when dropped, so every early return below cleans up.
    let tmp = builder.tempfile_in(dir)?;
    let (file, tmp_path) = tmp.into_parts();
    let mut w = BufWriter::new(file);
    fill(&mut w)?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    tmp_path.persist(path).map_err(|e| e.error)
}

/// What is at `path` if it is neither missing nor a regular file: "a
/// folder", "a device", "a pipe", "a socket", or "a link to" one of them (a
/// link to a file, or a dangling one, is fine: a write replaces the link,
/// never the file it names; `--png /dev/stdout` names a stream, not a file).
pub fn not_a_file(path: &Path) -> Option<&'static str> {
    let own = std::fs::symlink_metadata(path).ok()?.file_type();
    let (kind, link) = if own.is_symlink() {
        (std::fs::metadata(path).ok()?.file_type(), true)
    } else {
        (own, false)
    };
    if kind.is_file() {
        return None;
    }
    if link {
        return Some(if kind.is_dir() {
            "a link to a folder"
        } else {
            "a link to a device, pipe or socket"
        });
    }
    if kind.is_dir() {
        return Some("a folder");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return Some("a pipe");
        }
        if kind.is_socket() {
            return Some("a socket");
        }
    }
    Some("a device")
}

/// If `name` is a temporary file of [`write_atomic_with`]
/// (`.NAME.XXXXXX.tmp`, six letters or digits), left behind only by a
/// process that was killed, the `NAME` it was to become.
pub fn temporary_target(name: &str) -> Option<&str> {
    let inner = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (target, random) = inner.rsplit_once('.')?;
    let random_ok = random.len() == 6 && random.bytes().all(|b| b.is_ascii_alphanumeric());
    (random_ok && !target.is_empty()).then_some(target)
}

/// SHA-256 of `bytes`, as 64 lowercase hex digits.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// SHA-256 of the file at `path`, read in pieces, as 64 lowercase hex
/// digits.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An exclusive OS lock on a folder, held until dropped (or until the
/// process ends, however it ends: the kernel releases it, so a killed run
/// leaves no stale lock).
///
/// On Unix the folder itself is opened and locked with `flock` (through
/// [`File::try_lock`]), so the lock leaves no file behind; elsewhere the
/// file [`LOCK_FILE`] in the folder carries it. The lock is advisory: it
/// keeps out processes that ask for it (other gtr-run runs), nothing else.
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
    pub dir: PathBuf,
}

/// The file that carries a [`FolderLock`] where folders cannot be locked
/// themselves (not Unix); it belongs to the folder's run.
pub const LOCK_FILE: &str = ".gtr-run.lock";

/// Why [`FolderLock::try_new`] did not get the lock.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds it.
    Busy,
    /// The folder could not be opened or locked.
    Io(std::io::Error),
}

impl FolderLock {
    /// Takes the lock on the existing folder `dir` without waiting.
    pub fn try_new(dir: &Path) -> Result<FolderLock, LockError> {
        #[cfg(unix)]
        let file = File::open(dir).map_err(LockError::Io)?;
        #[cfg(not(unix))]
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(LockError::Io)?;
        match file.try_lock() {
            Ok(()) => Ok(FolderLock {
                _file: file,
                dir: dir.to_path_buf(),
            }),
            Err(std::fs::TryLockError::WouldBlock) => Err(LockError::Busy),
            Err(std::fs::TryLockError::Error(e)) => Err(LockError::Io(e)),
        }
    }
}

/// This machine's name, for messages naming who holds a folder; empty if
/// unknown.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder, removed when the returned guard drops.
    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    /// A pipe (as a device would be) or a folder at the output's name is
    /// refused and left as it was, never replaced by the file.
    #[cfg(unix)]
    #[test]
    fn what_is_not_a_file_is_never_replaced() {
        use std::os::unix::fs::FileTypeExt;
        let dir = scratch();
        let pipe = dir.path().join("pipe");
        let made = std::process::Command::new("mkfifo").arg(&pipe).status();
        if made.is_ok_and(|s| s.success()) {
            let e = write_atomic(&pipe, b"x").unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
            assert!(e.to_string().contains("is a pipe, not a file"), "{e}");
            assert!(
                std::fs::symlink_metadata(&pipe)
                    .unwrap()
                    .file_type()
                    .is_fifo()
            );
        }
        let folder = dir.path().join("folder");
        std::fs::create_dir(&folder).unwrap();
        let e = write_atomic(&folder, b"x").unwrap_err();
        assert!(e.to_string().contains("is a folder, not a file"), "{e}");
        assert!(folder.is_dir());
        assert_eq!(not_a_file(&dir.path().join("missing")), None);
        // A link to a folder is refused; to a file, or dangling, it is replaced.
        let to_folder = dir.path().join("to-folder");
        std::os::unix::fs::symlink(&folder, &to_folder).unwrap();
        assert_eq!(not_a_file(&to_folder), Some("a link to a folder"));
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert_eq!(not_a_file(&dangling), None);
        std::fs::remove_file(&to_folder).unwrap();
        std::fs::remove_file(&dangling).unwrap();
        // Nothing was left beside them.
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1 + usize::from(pipe.exists())
        );
    }

    #[test]
    fn sha256_matches_the_standard_test_vectors() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let scratch = scratch();
        let dir = scratch.path().to_path_buf();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.join("f"), &big).unwrap();
        assert_eq!(sha256_file(&dir.join("f")).unwrap(), sha256_hex(&big));
    }

    #[cfg(unix)]
    #[test]
    fn a_symbolic_link_at_the_output_is_replaced_not_written_through() {
        let scratch = scratch();
        let dir = scratch.path().to_path_buf();
        let victim = dir.join("victim.txt");
        std::fs::write(&victim, "keep").unwrap();
        let out = dir.join("out.png");
        std::os::unix::fs::symlink(&victim, &out).unwrap();
        write_atomic(&out, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(!std::fs::symlink_metadata(&out).unwrap().is_symlink());
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_failed_fill_leaves_nothing() {
        let scratch = scratch();
        let dir = scratch.path().to_path_buf();
        let out = dir.join("x.npz");
        let err = write_atomic_with(&out, |w| {
            w.write_all(b"part")?;
            Err(std::io::Error::other("stop"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        assert_eq!(temporary_target(".x.npz.a1B2c3.tmp"), Some("x.npz"));
        for not in [
            "x.tmp",
            ".tmp",
            ".notes.tmp",
            ".x.npz.a1B2.tmp",
            "..a1B2c3.tmp",
        ] {
            assert_eq!(temporary_target(not), None, "{not}");
        }
    }

    #[test]
    fn a_folder_is_locked_by_one_holder_at_a_time() {
        let scratch = scratch();
        let dir = scratch.path().to_path_buf();
        let first = FolderLock::try_new(&dir).unwrap();
        assert!(matches!(FolderLock::try_new(&dir), Err(LockError::Busy)));
        drop(first);
        FolderLock::try_new(&dir).unwrap();
    }
}

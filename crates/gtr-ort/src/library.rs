//! Finding the ONNX Runtime shared library, with no manual step.
//!
//! Order: `ORT_DYLIB_PATH` if set; else a copy cached by an earlier run;
//! else the library is taken from the PyPI `onnxruntime` wheel (fetched
//! with `python3 -m pip download`, unpacked into the cache). The cache is
//! `$GTR_RUN_CACHE`, else `$XDG_CACHE_HOME/gtr-run`, else `~/.cache/gtr-run`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The ONNX Runtime release fetched when none is given (API 1.31+ for ort rc.15).
pub const ORT_VERSION: &str = "1.32.0";

#[derive(Debug, thiserror::Error)]
#[error(
    "ONNX Runtime could not be loaded: {problem}\n  To provide it yourself, point ORT_DYLIB_PATH at libonnxruntime.so {ORT_VERSION} (or newer),\n  e.g. from `pip download onnxruntime=={ORT_VERSION} --no-deps`: the file onnxruntime/capi/libonnxruntime.so.* inside the wheel."
)]
pub struct LibraryError {
    pub problem: String,
}

fn fail(problem: impl Into<String>) -> LibraryError {
    LibraryError {
        problem: problem.into(),
    }
}

/// The cache folder for fetched libraries (and TensorRT's engines):
/// `$GTR_RUN_CACHE`, else `$XDG_CACHE_HOME/gtr-run`, else
/// `$HOME/.cache/gtr-run`; an empty variable counts as unset.
pub fn cache_dir() -> Option<PathBuf> {
    cache_dir_in(|name| std::env::var_os(name))
}

/// [`cache_dir`] with the environment read through `var`.
fn cache_dir_in(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let set = |name: &str| var(name).filter(|p| !p.is_empty()).map(PathBuf::from);
    if let Some(p) = set("GTR_RUN_CACHE") {
        return Some(p);
    }
    if let Some(p) = set("XDG_CACHE_HOME") {
        return Some(p.join("gtr-run"));
    }
    set("HOME").map(|h| h.join(".cache").join("gtr-run"))
}

fn library_file_name() -> String {
    if cfg!(target_os = "macos") {
        format!("libonnxruntime.{ORT_VERSION}.dylib")
    } else {
        format!("libonnxruntime.so.{ORT_VERSION}")
    }
}

/// Where the library is, fetching it if needed.
/// Asks ONNX Runtime, through its environment variable
/// `ORT_DISABLE_TELEMETRY`, not to start its telemetry: its Linux builds
/// otherwise keep an event store and a device id under `~/.cache/Microsoft`
/// as soon as the first session is made (turning the events off through
/// the API comes too late for that), and a run writes nothing outside its
/// output folder. A value the user set is kept.
///
/// # Safety
/// Sets a process environment variable: call it before any other thread
/// that may read or write the environment exists (first thing in `main`).
pub unsafe fn disable_telemetry() {
    if std::env::var_os("ORT_DISABLE_TELEMETRY").is_none() {
        // SAFETY: the caller guarantees that no other thread exists.
        unsafe { std::env::set_var("ORT_DISABLE_TELEMETRY", "1") };
    }
}

pub fn locate() -> Result<PathBuf, LibraryError> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(fail(format!(
                "ORT_DYLIB_PATH is {}, which is not a file",
                p.display()
            )))
        };
    }
    let cache = cache_dir().ok_or_else(|| fail("no cache folder: set GTR_RUN_CACHE or HOME"))?;
    let dir = cache.join(format!("onnxruntime-{ORT_VERSION}"));
    let lib = dir.join(library_file_name());
    if lib.is_file() {
        return Ok(lib);
    }
    fetch(&dir, &lib)?;
    Ok(lib)
}

fn wheel_platform() -> Result<&'static str, LibraryError> {
    match (std::env::consts::OS, std::env::consts::ARCH) {
        ("linux", "x86_64") => Ok("manylinux_2_28_x86_64"),
        ("linux", "aarch64") => Ok("manylinux_2_28_aarch64"),
        (os, arch) => Err(fail(format!(
            "fetching ONNX Runtime automatically is supported on Linux x86_64 and aarch64, not {os} {arch}"
        ))),
    }
}

/// Downloads the wheel with pip and unpacks the library into `dir`.
fn fetch(dir: &Path, lib: &Path) -> Result<(), LibraryError> {
    let platform = wheel_platform()?;
    std::fs::create_dir_all(dir)
        .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    let download = dir.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&download);
    eprintln!(
        "gtr-run: fetching ONNX Runtime {ORT_VERSION} from PyPI into {} (once)",
        gtr_plan::schedule::terminal_safe(&dir.display().to_string())
    );
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
        ])
        .args(["--python-version", "3.11", "--platform", platform])
        .arg(format!("onnxruntime=={ORT_VERSION}"))
        .arg("-d")
        .arg(&download)
        .output()
        .map_err(|e| fail(format!("could not run `{python} -m pip` to fetch it: {e}")))?;
    let cleanup = || {
        let _ = std::fs::remove_dir_all(&download);
    };
    if !output.status.success() {
        cleanup();
        return Err(fail(format!(
            "`{python} -m pip download onnxruntime=={ORT_VERSION}` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let wheel = std::fs::read_dir(&download)
        .ok()
        .and_then(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "whl"))
        })
        .ok_or_else(|| {
            cleanup();
            fail("pip reported success but left no wheel")
        })?;
    let result = extract(&wheel, lib);
    cleanup();
    result
}

/// Copies `onnxruntime/capi/libonnxruntime.so.*` out of the wheel, writing a
/// temporary file and renaming it so that no half-written library is left.
fn extract(wheel: &Path, lib: &Path) -> Result<(), LibraryError> {
    let file = std::fs::File::open(wheel).map_err(|e| fail(format!("{}: {e}", wheel.display())))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| fail(format!("{}: {e}", wheel.display())))?;
    let name = archive
        .file_names()
        .find(|n| {
            let base = n.rsplit('/').next().unwrap_or(n);
            n.contains("capi/") && base.starts_with("libonnxruntime.so.")
                || base.starts_with("libonnxruntime.") && base.ends_with(".dylib")
        })
        .map(str::to_string)
        .ok_or_else(|| fail(format!("{} holds no libonnxruntime", wheel.display())))?;
    let mut entry = archive.by_name(&name).map_err(|e| fail(e.to_string()))?;
    let mut bytes = Vec::new();
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| fail(e.to_string()))?;
    let writing = |e: std::io::Error| fail(format!("writing {}: {e}", lib.display()));
    let dir = lib.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(writing)?;
    tmp.write_all(&bytes).map_err(writing)?;
    tmp.as_file().sync_all().map_err(writing)?;
    tmp.persist(lib).map_err(|e| writing(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `GTR_RUN_CACHE` before `XDG_CACHE_HOME` before `HOME`; an empty one
    /// is skipped (an empty `HOME` made a folder relative to the working
    /// directory).
    #[test]
    fn the_cache_folder_follows_the_environment_in_order() {
        let env = |vars: &[(&str, &str)]| {
            cache_dir_in(|name| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            })
        };
        let all = [
            ("GTR_RUN_CACHE", "/c"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(env(&all), Some(PathBuf::from("/c")));
        assert_eq!(env(&all[1..]), Some(PathBuf::from("/x/gtr-run")));
        assert_eq!(env(&all[2..]), Some(PathBuf::from("/h/.cache/gtr-run")));
        assert_eq!(
            env(&[
                ("GTR_RUN_CACHE", ""),
                ("XDG_CACHE_HOME", ""),
                ("HOME", "/h")
            ]),
            Some(PathBuf::from("/h/.cache/gtr-run"))
        );
        assert_eq!(env(&[("HOME", "")]), None);
        assert_eq!(env(&[]), None);
    }
}

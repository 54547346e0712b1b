//! Run folders that cannot be mixed, shared or escaped (issue 10, cases
//! 1–5), end to end with the `gtr-run` binary on the tiny fixture bundle:
//! a killed run resumed with other settings is refused; a second process
//! on a folder in use is refused; symbolic links planted at temporary or
//! output names are never written through; a folder holding no run is
//! refused even with `--force`; `merge` checks every image against its
//! part's record and refuses links.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{fails, ok, root, tmp};

const TINY: &str = "models/fixtures/tiny";
const FAST: &str = "schedules/gtr-fast.gtr";

/// A `gtr-run` started in the background, killed (SIGKILL) when dropped.
struct Running(Child);

impl Running {
    fn start(args: &[&str]) -> Running {
        let child = Command::new(env!("CARGO_BIN_EXE_gtr-run"))
            .args(args)
            .current_dir(root())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Running(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Waits until `path` exists; fails if the process ends first.
    fn wait_for(&mut self, path: &Path) {
        let start = Instant::now();
        while !path.exists() {
            if let Some(status) = self.0.try_wait().unwrap() {
                panic!(
                    "gtr-run ended ({status}) before {} appeared",
                    path.display()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "{} did not appear",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `kill -9`, and waits for the process to be gone.
    fn kill(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn record(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap()
}

/// The image files (`NNNNN.png`) in `dir`, sorted, with their bytes.
fn pngs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.len() == 9 && name.ends_with(".png") && name != "grid.png"
        })
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Every image of `dir` is a plain file whose SHA-256 is the one its
/// run.json records, and the record holds no other.
fn assert_hashes_match(dir: &Path) {
    let run = record(dir);
    let hashes = run["images_sha256"].as_object().unwrap();
    let files = pngs(dir);
    assert_eq!(hashes.len(), files.len(), "{}", dir.display());
    for (name, bytes) in files {
        assert!(
            !std::fs::symlink_metadata(dir.join(&name))
                .unwrap()
                .is_symlink()
        );
        assert_eq!(
            hashes[&name],
            gtr_run::fsutil::sha256_hex(&bytes),
            "{}/{name}",
            dir.display()
        );
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Case 1: a run killed with `kill -9` has its identity on disk already,
/// so `--resume` with another seed is refused instead of mixing two runs;
/// with the same settings it finishes the run. An image changed after the
/// run makes --resume refuse too.
#[test]
fn a_killed_run_resumed_with_another_seed_is_refused() {
    let out = tmp("safety-killed");
    let run = |seed: &'static str| {
        vec![
            TINY,
            FAST,
            "--num-images",
            "60",
            "--batch",
            "1",
            "--seed",
            seed,
            "--out",
            s(&out),
        ]
    };
    let mut child = Running::start(&run("7"));
    child.wait_for(&out.join("00000.png"));
    child.kill();
    let killed = record(&out);
    assert_eq!(killed["finished"], false, "killed too late: {killed}");
    assert_eq!(killed["seed"], 7);
    let before = pngs(&out);
    assert!(!before.is_empty() && before.len() < 60, "{}", before.len());

    fails(
        &[&run("8")[..], &["--resume"]].concat(),
        "differ in the seed (7 in the folder, 8 in this run)",
    );
    // The same seed without --resume is refused too, as unfinished.
    fails(&run("7"), "holds a previous run (unfinished");
    assert!(
        pngs(&out) == before,
        "a refused run must not touch the folder"
    );
    assert_eq!(record(&out)["seed"], 7);

    ok(&[&run("7")[..], &["--resume"]].concat());
    let done = record(&out);
    assert_eq!(done["finished"], true);
    assert_eq!(done["generated_now"], 60 - before.len());
    assert_eq!(pngs(&out).len(), 60);
    assert_hashes_match(&out);

    // An image replaced after the run is not kept by --resume.
    std::fs::copy(out.join("00001.png"), out.join("00000.png")).unwrap();
    fails(
        &[&run("7")[..], &["--resume"]].concat(),
        &format!(
            "{} is not the image the folder's run.json recorded",
            out.join("00000.png").display()
        ),
    );
    assert_eq!(record(&out)["finished"], true, "the record is untouched");
    std::fs::remove_dir_all(&out).unwrap();
}

/// Case 1b: two bundles of one name, with other settings or other
/// weights, are two models: a run of one is not resumed nor merged with
/// the other (the record's `model.sha256`).
#[test]
fn a_run_is_not_resumed_or_merged_with_another_model_of_its_name() {
    let scaled = common::tiny_bundle_with("safety-scaled", "", "", |m| {
        let mut out = String::new();
        for line in m.lines() {
            match line.strip_prefix("latent_scale:") {
                Some(_) => out += "latent_scale: 0.9\n",
                None => out += &format!("{line}\n"),
            }
        }
        out
    });
    // Other weights: one bit of the head's graph flipped in the middle of
    // the file, inside its weights (they are nearly all of its bytes), so
    // that it still loads.
    let retrained = common::tiny_bundle_with("safety-retrained", "", "", |m| m);
    let mut graph = std::fs::read(retrained.join("diffusion.onnx")).unwrap();
    let middle = graph.len() / 2;
    graph[middle] ^= 1;
    std::fs::write(retrained.join("diffusion.onnx"), graph).unwrap();

    let out = tmp("safety-two-models");
    fn run<'a>(bundle: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![s(bundle), FAST, "--num-images", "4", "--out", s(out)];
        args.extend(extra);
        args
    }
    let tiny = root().join(TINY);
    ok(&run(&tiny, &out, &["--shard", "0/2"]));
    for other in [&scaled, &retrained] {
        fails(
            &run(other, &out, &["--shard", "0/2", "--resume"]),
            "differ in the model's settings and graphs (SHA-256)",
        );
    }
    let part = tmp("safety-two-models-part");
    ok(&[
        &[s(&scaled), FAST, "--num-images", "4", "--shard", "1/2"][..],
        &["--out", s(&part)],
    ]
    .concat());
    fails(
        &[
            "merge",
            s(&tmp("safety-two-models-merged")),
            s(&out),
            s(&part),
        ],
        "differ in the model's settings and graphs (SHA-256)",
    );
    for d in [&scaled, &retrained, &out, &part] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// Case 2: while one process writes a folder, a second one on the same
/// `--out` is refused, whatever it asks, and told who holds it; once the
/// holder is gone (even killed), the folder is free again.
#[test]
fn a_second_process_on_a_folder_in_use_is_refused() {
    let out = tmp("safety-locked");
    let mut first = Running::start(&[
        TINY,
        FAST,
        "--num-images",
        "5000",
        "--batch",
        "1",
        "--out",
        s(&out),
    ]);
    first.wait_for(&out.join("00000.png"));
    let holder = format!(
        "is being written by another gtr-run process (pid {}",
        first.pid()
    );
    let second = [TINY, FAST, "--num-images", "2", "--out", s(&out)];
    for extra in [&[][..], &["--resume"], &["--force"]] {
        fails(&[&second[..], extra].concat(), &holder);
    }
    // `merge --force` into it too (it replaced the folder under the
    // running process, which went on writing into the merged one).
    let part = tmp("safety-locked-part");
    ok(&[TINY, FAST, "--num-images", "2", "--out", s(&part)]);
    fails(&["merge", s(&out), s(&part), "--force"], &holder);
    std::fs::remove_dir_all(&part).unwrap();
    // The first is still writing its own run.
    assert_eq!(record(&out)["num_images"], 5000);
    first.kill();
    ok(&[&second[..], &["--force"]].concat());
    assert_eq!(pngs(&out).len(), 2);
    assert_hashes_match(&out);
    std::fs::remove_dir_all(&out).unwrap();
}

/// A bundle is read under a shared lock on its folder, as the model tools
/// (models/onnx_save.py) write it under an exclusive one: while a tool
/// holds it, or where a tool's commit was interrupted (a staging folder
/// holding its `commit.json`), gtr-run refuses the bundle, naming it and
/// what to do, before any output folder is made; readers share the lock.
#[cfg(unix)]
#[test]
fn a_bundle_that_a_model_tool_is_changing_is_not_read() {
    let bundle = common::tiny_bundle_with("safety-bundle-locked", "tiny", "", |m| m);
    let out = tmp("safety-bundle-locked-out");
    let run = [s(&bundle), FAST, "--num-images", "1", "--out", s(&out)];
    let eval = [
        "eval",
        s(&bundle),
        FAST,
        "--num-images",
        "1",
        "--out",
        s(&out),
    ];

    // A model tool holds the folder.
    let tool = std::fs::File::open(&bundle).unwrap();
    tool.lock().unwrap();
    for args in [&run[..], &eval] {
        fails(args, "a model tool (models/*.py) is changing this bundle");
        assert_eq!(common::gtr_run(args).status.code(), Some(3));
    }
    assert!(!out.exists(), "nothing is written");
    // Another reader's shared lock does not keep gtr-run out.
    tool.unlock().unwrap();
    tool.lock_shared().unwrap();
    ok(&run);
    drop(tool);

    // A commit that was decided and stopped partway.
    let staging = bundle.join(".gtr-tmp.4242.abcd1234");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(
        staging.join("commit.json"),
        r#"{"moves": [], "remove": []}"#,
    )
    .unwrap();
    let again = [&run[..], &["--force"]].concat();
    fails(&again, "a model tool's commit was interrupted");
    // A path that does not exist is named as such, not as its parent folder.
    let typo = bundle.join("typo.yaml");
    fails(
        &[s(&typo), FAST, "--num-images", "1", "--out", s(&out)],
        "no such file or folder",
    );
    fails(
        &again,
        &format!("`python3 models/onnx_save.py {}`", bundle.display()),
    );
    // A staging folder without a plan is a tool's work in progress or a
    // dead one's leftover: its files are not the bundle's yet.
    std::fs::remove_file(staging.join("commit.json")).unwrap();
    ok(&again);
    // A link named like a staging folder is not one (the tools' recovery
    // does not follow it either).
    let elsewhere = tmp("safety-bundle-elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("commit.json"), "{}").unwrap();
    std::os::unix::fs::symlink(&elsewhere, bundle.join(".gtr-tmp.5.linked")).unwrap();
    ok(&again);
    std::fs::remove_dir_all(&elsewhere).unwrap();
    std::fs::remove_dir_all(&bundle).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
}

/// Case 3: symbolic links planted where gtr-run writes (its temporary
/// names as they were before they became random, `.NAME.PID.tmp` with the
/// PID in six digits; image,
/// grid, record and `.npz` names; `plan --png`) are replaced or removed,
/// never written through: the files they point to are untouched.
#[cfg(unix)]
#[test]
fn symbolic_links_at_temporary_or_output_names_are_never_written_through() {
    use std::os::unix::fs::symlink;
    let dir = tmp("safety-links");
    let victims = dir.join("victims");
    std::fs::create_dir_all(&victims).unwrap();
    let victim = |name: &str| {
        let path = victims.join(name);
        std::fs::write(&path, format!("victim {name}")).unwrap();
        path
    };
    let untouched = || {
        for entry in std::fs::read_dir(&victims).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                std::fs::read(&path).unwrap() == format!("victim {name}").into_bytes(),
                "{} was written through a link",
                path.display()
            );
        }
    };

    // Links at the temporary names a run would have used, planted as soon
    // as the process exists (it loads the model for a while first).
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let npz = dir.join("all.npz");
    let child = Running::start(&[
        TINY,
        FAST,
        "--num-images",
        "3",
        "--out",
        s(&out),
        "--npz",
        s(&npz),
    ]);
    let pid = child.pid();
    for name in [
        "00000.png",
        "00001.png",
        "00002.png",
        "grid.png",
        "run.json",
    ] {
        // Six characters, as in gtr-run's own temporary names, so that a
        // link planted before the run takes the folder is cleared as a
        // leftover (another name would be refused as not gtr-run's).
        let tmp_name = format!(".{name}.{:06}.tmp", pid % 1_000_000);
        let _ = symlink(victim(&tmp_name), out.join(&tmp_name));
    }
    let _ = symlink(victim("npz-tmp"), dir.join(format!(".all.npz.{pid}.tmp")));
    let mut child = child;
    let status = child.0.wait().unwrap();
    assert!(status.success());
    untouched();
    assert_eq!(pngs(&out).len(), 3);
    assert_hashes_match(&out);

    // A link at an image's name: resuming makes the image again as a file.
    let before = pngs(&out);
    std::fs::remove_file(out.join("00001.png")).unwrap();
    symlink(victim("image"), out.join("00001.png")).unwrap();
    let run = [TINY, FAST, "--num-images", "3", "--out", s(&out)];
    ok(&[&run[..], &["--resume"]].concat());
    untouched();
    assert!(pngs(&out) == before);
    assert_eq!(record(&out)["generated_now"], 1);
    assert_hashes_match(&out);

    // Links at the record's, grid's, an image's and the .npz's names,
    // replaced by --force.
    let saved_record = std::fs::read(out.join("run.json")).unwrap();
    for name in ["run.json", "grid.png", "00002.png"] {
        std::fs::remove_file(out.join(name)).unwrap();
        symlink(victim(name), out.join(name)).unwrap();
    }
    // (A run.json that is a link is not gtr-run's record.)
    fails(
        &[&run[..], &["--force"]].concat(),
        "holds a run.json that is not a gtr-run record",
    );
    // The record back as a file: images without one are refused (below).
    std::fs::remove_file(out.join("run.json")).unwrap();
    std::fs::write(out.join("run.json"), &saved_record).unwrap();
    std::fs::remove_file(&npz).unwrap();
    symlink(victim("npz"), &npz).unwrap();
    ok(&[&run[..], &["--force", "--npz", s(&npz)]].concat());
    untouched();
    assert!(pngs(&out) == before);
    assert_hashes_match(&out);
    for path in [out.join("grid.png"), npz.clone()] {
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
    }

    // `plan --png` onto a link.
    let picture = dir.join("order.png");
    symlink(victim("order"), &picture).unwrap();
    ok(&["plan", FAST, "--png", s(&picture)]);
    untouched();
    assert!(std::fs::symlink_metadata(&picture).unwrap().is_file());
    image::open(&picture).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Case 4: a folder that holds anything gtr-run does not write is refused,
/// with or without `--force` or `--resume`, and left as it was.
#[test]
fn a_folder_holding_no_run_is_refused_even_with_force() {
    for extra in [&[][..], &["--force"], &["--resume"]] {
        fails(
            &[&[TINY, FAST, "--num-images", "1", "--out", "/"][..], extra].concat(),
            "which gtr-run does not write",
        );
    }
    let out = tmp("safety-foreign");
    std::fs::create_dir_all(out.join("sub")).unwrap();
    let run = [TINY, FAST, "--num-images", "2", "--out", s(&out)];
    for extra in [&[][..], &["--force"], &["--resume"]] {
        fails(
            &[&run[..], extra].concat(),
            "holds `sub`, which gtr-run does not write; gtr-run writes only into a new or empty folder or one holding its own run, --force or not: remove it, or choose a new folder",
        );
    }
    std::fs::remove_dir(out.join("sub")).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    fails(&[&run[..], &["--force"]].concat(), "holds `notes.txt`");
    std::fs::remove_file(out.join("notes.txt")).unwrap();
    std::fs::write(out.join("run.json"), "{\"mine\": 1}").unwrap();
    fails(
        &[&run[..], &["--force"]].concat(),
        "holds a run.json that is not a gtr-run record",
    );
    std::fs::remove_file(out.join("run.json")).unwrap();
    std::fs::write(out.join("data.npz"), "mine").unwrap();
    fails(&[&run[..], &["--force"]].concat(), "holds `data.npz`");
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        1,
        "nothing was written"
    );
    // Images without a record are nobody's gtr-run can name: neither
    // resumed nor replaced, --force or not (they may be the user's own).
    std::fs::remove_file(out.join("data.npz")).unwrap();
    // A dot-file ending in .tmp is not one of gtr-run's temporary files
    // (`.NAME.XXXXXX.tmp`, NAME a file it writes): refused, not removed.
    std::fs::write(out.join(".notes.tmp"), "mine").unwrap();
    fails(&run, "holds `.notes.tmp`");
    assert_eq!(std::fs::read(out.join(".notes.tmp")).unwrap(), b"mine");
    std::fs::remove_file(out.join(".notes.tmp")).unwrap();
    std::fs::write(out.join("00000.png"), "old").unwrap();
    for mode in ["--resume", "--force"] {
        fails(
            &[&run[..], &[mode]].concat(),
            "holds `00000.png` and other files named as a run's, but no run.json",
        );
        assert_eq!(std::fs::read(out.join("00000.png")).unwrap(), b"old");
    }
    std::fs::remove_file(out.join("00000.png")).unwrap();
    ok(&[&run[..], &["--force"]].concat());
    assert_hashes_match(&out);
    // --npz may not name one of the run's own files (it replaced image 0,
    // or was overwritten by the record).
    for name in ["00000.png", "run.json"] {
        let npz = out.join(name);
        fails(
            &[&run[..], &["--force", "--npz", s(&npz)]].concat(),
            "an .npz must be named NAME.npz",
        );
    }
    // Outside the run's folder too: another run's record, an image or a
    // graph is never replaced (it turned another run's run.json into a zip
    // archive), nor a file named .npz that is not one; and a name too long
    // for the temporary file is refused before the run, not after it.
    let other = out.with_file_name("other-run");
    ok(&[TINY, FAST, "--num-images", "1", "--out", s(&other)]);
    let record_before = std::fs::read(other.join("run.json")).unwrap();
    for (npz, want) in [
        (other.join("run.json"), "give a name ending in .npz"),
        (
            root().join("models/fixtures/tiny/encoder.onnx"),
            "which this run reads; outputs never go there",
        ),
        (
            other.with_file_name("not-a-zip.npz"),
            "is not an .npz (a zip archive)",
        ),
        (
            other.with_file_name(format!("{}.npz", "n".repeat(240))),
            "the name is too long",
        ),
    ] {
        if want.contains("zip") {
            std::fs::write(&npz, "mine").unwrap();
        }
        fails(&[&run[..], &["--force", "--npz", s(&npz)]].concat(), want);
    }
    assert_eq!(
        std::fs::read(other.join("run.json")).unwrap(),
        record_before
    );
    assert_eq!(
        std::fs::read(other.with_file_name("not-a-zip.npz")).unwrap(),
        b"mine"
    );
    std::fs::remove_file(other.with_file_name("not-a-zip.npz")).unwrap();
    std::fs::remove_dir_all(&other).unwrap();
    // --force replaces the previous run's .npz with the rest of its files:
    // none of seed 0's is left beside seed 7's run.
    ok(&[&run[..], &["--force", "--npz", s(&out.join("all.npz"))]].concat());
    ok(&[&run[..], &["--force", "--seed", "7"]].concat());
    assert!(!out.join("all.npz").exists());
    assert_hashes_match(&out);
    std::fs::remove_dir_all(&out).unwrap();
}

/// Case 5: `merge` compares every image of every part with the SHA-256 its
/// part's run.json records, and refuses images that are symbolic links
/// and parts whose run is unfinished.
#[cfg(unix)]
#[test]
fn merge_checks_images_against_their_record_and_refuses_links() {
    let dir = tmp("safety-merge");
    std::fs::create_dir_all(&dir).unwrap();
    let part = |k: usize, seed: &str| -> PathBuf {
        let out = dir.join(format!("p{k}-seed{seed}"));
        let shard = format!("{k}/2");
        ok(&[
            TINY,
            FAST,
            "--num-images",
            "5",
            "--seed",
            seed,
            "--shard",
            &shard,
            "--out",
            s(&out),
        ]);
        out
    };
    let (p0, p1, other) = (part(0, "7"), part(1, "7"), part(1, "8"));
    assert_hashes_match(&p0);
    let out = dir.join("merged");
    let merge = |want: &str| {
        fails(&["merge", s(&out), s(&p0), s(&p1)], want);
        assert!(!out.exists(), "a refused merge writes nothing");
    };

    // An image swapped for another run's.
    let good = std::fs::read(p1.join("00003.png")).unwrap();
    std::fs::copy(other.join("00003.png"), p1.join("00003.png")).unwrap();
    merge(&format!(
        "{} is not the image its run.json recorded",
        p1.join("00003.png").display()
    ));

    // An image that is a link leaving the part, even to the right bytes.
    let outside = dir.join("outside.png");
    std::fs::write(&outside, &good).unwrap();
    std::fs::remove_file(p1.join("00003.png")).unwrap();
    std::os::unix::fs::symlink(&outside, p1.join("00003.png")).unwrap();
    merge(&format!(
        "{} is a symbolic link (to {})",
        p1.join("00003.png").display(),
        outside.display()
    ));
    std::fs::remove_file(p1.join("00003.png")).unwrap();
    std::fs::write(p1.join("00003.png"), &good).unwrap();

    // A record without hashes, and an unfinished part.
    let text = std::fs::read_to_string(p0.join("run.json")).unwrap();
    let mut edited: serde_json::Value = serde_json::from_str(&text).unwrap();
    edited.as_object_mut().unwrap().remove("images_sha256");
    std::fs::write(p0.join("run.json"), edited.to_string()).unwrap();
    merge("records no SHA-256 for 00000.png");
    edited["finished"] = serde_json::json!(false);
    std::fs::write(p0.join("run.json"), edited.to_string()).unwrap();
    merge("holds an unfinished run");
    std::fs::write(p0.join("run.json"), text).unwrap();

    ok(&["merge", s(&out), s(&p0), s(&p1)]);
    assert_eq!(pngs(&out).len(), 5);
    assert_hashes_match(&out);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Weights kept beside a graph (ONNX external data,
/// models/fixtures/external-data): part of the model's digest, so
/// `--resume` refuses a run whose weights changed (it kept the old images
/// beside new ones before); a data file cut short or missing is a wrong
/// input, named.
#[test]
fn weights_kept_beside_a_graph_are_part_of_the_model() {
    let bundle = common::tiny_bundle_with("external-data", "external-data", "", |m| m);
    let out = tmp("external-data-run");
    let (b, o) = (bundle.to_str().unwrap(), out.to_str().unwrap());
    let run = [b, "schedules/gtr-fast.gtr", "--num-images", "2", "--out", o];
    ok(&run);
    std::fs::remove_file(out.join("00001.png")).unwrap();
    let data = bundle.join("vae_decoder.onnx.data");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&data, &bytes).unwrap();
    let resume = [&run[..], &["--resume"]].concat();
    fails(&resume, "differ in the model's settings and graphs");
    assert_eq!(common::gtr_run(&resume).status.code(), Some(3));
    assert!(
        !out.join("00001.png").exists(),
        "nothing made beside the old image"
    );
    let elsewhere = [
        b,
        "schedules/gtr-fast.gtr",
        "--num-images",
        "1",
        "--out",
        o,
        "--force",
    ];
    std::fs::write(&data, &bytes[..bytes.len() - 8]).unwrap();
    fails(
        &elsewhere,
        "holds 1720 bytes, but a tensor's data runs from byte",
    );
    std::fs::remove_file(&data).unwrap();
    fails(
        &elsewhere,
        "its weights file `vae_decoder.onnx.data` is not there",
    );
    assert_eq!(common::gtr_run(&elsewhere).status.code(), Some(3));
    let _ = std::fs::remove_dir_all(&bundle);
    let _ = std::fs::remove_dir_all(&out);
}

/// The host path and a chain graph may differ by a pixel level: a run is
/// not resumed, nor its shards merged, with the chains run another way.
#[test]
fn chains_run_another_way_are_another_run() {
    let bundle = "models/fixtures/tiny-sampler";
    let out = tmp("chains-resume");
    let o = out.to_str().unwrap();
    let run = [
        bundle,
        FAST,
        "--num-images",
        "2",
        "--batch",
        "1",
        "--out",
        o,
    ];
    ok(&[&run[..], &["--sampler", "host"]].concat());
    std::fs::remove_file(out.join("00001.png")).unwrap();
    fails(
        &[&run[..], &["--sampler", "graph", "--resume"]].concat(),
        "the diffusion chains (--sampler, --head) (\"host\" in the folder, \"sampler graph\" in this run)",
    );
    ok(&[&run[..], &["--sampler", "host", "--resume"]].concat());
    let parts: Vec<PathBuf> = (0..2).map(|k| tmp(&format!("chains-part{k}"))).collect();
    for (k, (part, sampler)) in parts.iter().zip(["host", "graph"]).enumerate() {
        let shard = format!("{k}/2");
        let args = [bundle, FAST, "--num-images", "2", "--shard", &shard];
        ok(&[&args[..], &["--sampler", sampler, "--out", s(part)]].concat());
    }
    let merged = tmp("chains-merged");
    fails(
        &["merge", s(&merged), s(&parts[0]), s(&parts[1])],
        "diffusion chains (--sampler, --head)",
    );
    for dir in parts.iter().chain([&out, &merged]) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A part whose record claims an impossible number of images is refused
/// (2^64 - 1 overflowed an allocation: a panic, or an abort at 1e11).
#[test]
fn merge_refuses_a_record_claiming_impossible_counts() {
    let part = tmp("merge-count-part");
    ok(&[
        TINY,
        FAST,
        "--num-images",
        "2",
        "--shard",
        "0/2",
        "--out",
        s(&part),
    ]);
    let path = part.join("run.json");
    let text = std::fs::read_to_string(&path).unwrap();
    for count in ["100000000000", "18446744073709551615"] {
        let edited = text.replace("\"num_images\": 2", &format!("\"num_images\": {count}"));
        assert_ne!(edited, text);
        std::fs::write(&path, edited).unwrap();
        let merged = tmp("merge-count-out");
        fails(
            &["merge", s(&merged), s(&part)],
            &format!("{count} images, outside 1 to 10000000"),
        );
    }
    let _ = std::fs::remove_dir_all(&part);
}

/// ONNX Runtime's Linux builds keep a telemetry store and a device id
/// under `~/.cache/Microsoft` unless told not to: a run writes nothing
/// outside its output folder (and gtr-run's own cache).
#[test]
fn onnx_runtime_writes_no_telemetry_store() {
    let home = tmp("telemetry-home");
    std::fs::create_dir_all(&home).unwrap();
    let out = home.join("run");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gtr-run"));
    command
        .args([TINY, FAST, "--num-images", "1", "--out"])
        .arg(&out)
        .current_dir(root())
        .env("HOME", &home)
        .env_remove("XDG_CACHE_HOME")
        .env_remove("ORT_DISABLE_TELEMETRY");
    // The library the other tests use, not one fetched again into HOME.
    if let Some(cache) = gtr_run::backend::library::cache_dir() {
        command.env("GTR_RUN_CACHE", cache);
    }
    let run = command.output().unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(out.join("00000.png").is_file());
    assert!(
        !home.join(".cache/Microsoft").exists(),
        "ONNX Runtime wrote its telemetry store under HOME"
    );
    let _ = std::fs::remove_dir_all(&home);
}

/// An interrupted run's record has no hashes for the images it made, so
/// `--resume` checks each one it keeps is a whole PNG of the model's size:
/// a cut-short one is named (it was kept and failed at the grid, on every
/// retry).
#[test]
fn resume_names_a_kept_image_that_is_not_whole() {
    let out = tmp("resume-cut-image");
    let run = [TINY, FAST, "--num-images", "3", "--out", s(&out)];
    ok(&run);
    // The record as an interrupted run leaves it.
    let path = out.join("run.json");
    let mut record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    record["finished"] = false.into();
    record["images_sha256"] = serde_json::json!({});
    std::fs::write(&path, record.to_string()).unwrap();
    let image = out.join("00001.png");
    let bytes = std::fs::read(&image).unwrap();
    std::fs::write(&image, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(out.join("00002.png")).unwrap();
    let resume = [&run[..], &["--resume"]].concat();
    fails(&resume, "00001.png cannot be read as a PNG");
    std::fs::remove_file(&image).unwrap();
    ok(&resume);
    assert_hashes_match(&out);
    let _ = std::fs::remove_dir_all(&out);
}

/// A merge killed while it builds leaves its staging folder beside `OUT`
/// (`.OUT.merge-XXXXXX.tmp`); the next merge into `OUT` removes it, and
/// nothing else of `OUT`'s folder.
#[test]
fn a_killed_merges_staging_folder_is_removed_by_the_next() {
    let dir = tmp("merge-leftover");
    std::fs::create_dir_all(&dir).unwrap();
    let part = dir.join("part");
    ok(&[TINY, FAST, "--num-images", "2", "--out", s(&part)]);
    let leftover = dir.join(".merged.merge-Ab3dE9.tmp");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("00000.png"), "a killed merge's").unwrap();
    let kept = [
        dir.join(".merged.merge-notours.tmp"),
        dir.join(".other.merge-Ab3dE9.tmp"),
    ];
    for k in &kept {
        std::fs::create_dir_all(k).unwrap();
    }
    ok(&["merge", s(&dir.join("merged")), s(&part)]);
    assert!(
        !leftover.exists(),
        "the killed merge's staging folder is removed"
    );
    assert!(kept.iter().all(|k| k.is_dir()), "other names are left");
    assert!(dir.join("merged/00001.png").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Output paths that cannot be made are wrong inputs, said as such (exit
/// 3; they were exit 4 with the system's "File exists" / "Not a
/// directory"), and a merge is refused into a folder inside one of its
/// parts (which `--resume` then refused for the folder no run writes).
#[cfg(unix)]
#[test]
fn output_paths_that_cannot_be_made_are_named() {
    let dir = tmp("out-paths");
    std::fs::create_dir_all(&dir).unwrap();
    let dangling = dir.join("dangling");
    std::os::unix::fs::symlink(dir.join("nowhere"), &dangling).unwrap();
    let file = dir.join("a-file");
    std::fs::write(&file, "mine").unwrap();
    for (out, want) in [
        (dangling.clone(), "is a symbolic link to nothing"),
        (
            file.join("sub"),
            "a-file is a file, not a folder to make it in",
        ),
    ] {
        let args = [TINY, FAST, "--num-images", "1", "--out", s(&out)];
        fails(&args, want);
        assert_eq!(common::gtr_run(&args).status.code(), Some(3), "{want}");
    }
    let part = dir.join("part");
    ok(&[TINY, FAST, "--num-images", "1", "--out", s(&part)]);
    fails(
        &["merge", s(&part.join("merged")), s(&part)],
        "lies inside, or holds, one of the parts",
    );
    assert!(!part.join("merged").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Outputs never land on what a run reads nor in another command's
/// output: `plan --png` over a graph or into a run folder, `--npz` into
/// the bundle or another run's folder, `--out` and `--ort-profile` inside
/// another run's folder were all written (the bundle, the run or the
/// reference destroyed, two runs mixed); a PNG already at `--png` is
/// still replaced.
#[test]
fn outputs_stay_off_inputs_and_other_commands_folders() {
    let dir = tmp("outputs-off-inputs");
    std::fs::create_dir_all(&dir).unwrap();
    let bundle = dir.join("tiny");
    std::fs::create_dir_all(&bundle).unwrap();
    for entry in std::fs::read_dir(root().join(TINY)).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, bundle.join(path.file_name().unwrap())).unwrap();
        }
    }
    let graph = std::fs::read(bundle.join("encoder.onnx")).unwrap();
    let other = dir.join("other");
    ok(&[s(&bundle), FAST, "--num-images", "2", "--out", s(&other)]);
    let other_before = pngs(&other);
    let other_record = std::fs::read(other.join("run.json")).unwrap();

    // plan --png: never over a file that is not a PNG, never in a run folder.
    fails(
        &["plan", FAST, "--png", s(&bundle.join("encoder.onnx"))],
        "is there and is not a PNG; it is not replaced",
    );
    fails(
        &["plan", FAST, "--png", s(&other.join("00001.png"))],
        "which holds the output of another gtr-run command (its run.json)",
    );
    let picture = dir.join("order.png");
    std::fs::copy(other.join("00000.png"), &picture).unwrap();
    ok(&["plan", FAST, "--png", s(&picture)]);
    assert_ne!(std::fs::read(&picture).unwrap(), other_before[0].1);

    // --npz: not in the bundle, not in another run's folder; --out and
    // --ort-profile not inside another run's folder.
    let new = dir.join("new");
    let run = |flag: &str, path: &Path, want: &str| {
        let args = [
            s(&bundle),
            FAST,
            "--num-images",
            "2",
            "--out",
            s(&new),
            flag,
            s(path),
        ];
        fails(&args, want);
    };
    let reads = "which this run reads; outputs never go there";
    let others = "which holds the output of another gtr-run command (its run.json)";
    run("--npz", &bundle.join("images.npz"), reads);
    run("--npz", &other.join("images.npz"), others);
    run("--ort-profile", &other.join("profile"), others);
    run("--ort-profile", &bundle, reads);
    fails(
        &[
            s(&bundle),
            FAST,
            "--num-images",
            "1",
            "--out",
            s(&other.join("sub")),
        ],
        others,
    );
    // plan --png into the bundle `--cost` reads.
    fails(
        &[
            "plan",
            FAST,
            "--cost",
            s(&bundle),
            "--png",
            s(&bundle.join("order.png")),
        ],
        "which this run reads",
    );
    // A folder holding a copy of a record among other files (a project) is
    // no command's output: outputs go inside it.
    let project = dir.join("project");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::copy(other.join("run.json"), project.join("run.json")).unwrap();
    std::fs::write(project.join("notes.txt"), "mine").unwrap();
    ok(&[
        s(&bundle),
        FAST,
        "--num-images",
        "1",
        "--out",
        s(&project.join("runs/a")),
    ]);
    assert!(
        !dir.join("new").exists(),
        "refused before the folder is made"
    );
    assert_eq!(std::fs::read(bundle.join("encoder.onnx")).unwrap(), graph);
    assert!(pngs(&other) == other_before);
    assert_eq!(std::fs::read(other.join("run.json")).unwrap(), other_record);
    // Two images, grid.png, run.json.
    assert_eq!(
        std::fs::read_dir(&other).unwrap().count(),
        4,
        "nothing added"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An output folder named with `/.` is the folder (it failed with exit 4),
/// one with `..` after a name is refused before anything is made (it made
/// the folder before `..`), and `merge` into a link to a folder merges into
/// that folder (it failed renaming the link, exit 4).
#[test]
fn output_folders_are_named_plainly_and_merge_follows_a_link() {
    let dir = tmp("out-named-plainly");
    std::fs::create_dir_all(&dir).unwrap();
    let dotted = dir.join("dotted");
    ok(&[
        TINY,
        FAST,
        "--num-images",
        "2",
        "--out",
        &format!("{}/.", s(&dotted)),
    ]);
    assert_eq!(pngs(&dotted).len(), 2);
    let back = format!("{}/sub/..", s(&dir.join("back")));
    fails(
        &[TINY, FAST, "--num-images", "1", "--out", &back],
        "sub, which does not exist (it would be made on the way)",
    );
    assert!(!dir.join("back").exists());
    // A `..` after a folder that exists is the path it names.
    let up = format!("{}/../up", s(&dotted));
    ok(&[TINY, FAST, "--num-images", "1", "--out", &up]);
    assert_eq!(pngs(&dir.join("up")).len(), 1);
    let target = dir.join("target");
    std::fs::create_dir_all(&target).unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    ok(&["merge", s(&link), s(&dotted)]);
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(pngs(&target) == pngs(&dotted));
    let merged = dir.join("merged");
    ok(&["merge", &format!("{}/.", s(&merged)), s(&dotted)]);
    assert!(pngs(&merged) == pngs(&dotted));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A part's record must agree with itself (labels per image, classes,
/// hashes of its own images only), and `--resume` refuses a folder with
/// an image of an index the run does not make: both were accepted, the
/// first merging a folder whose record and images disagreed.
#[test]
fn records_and_folders_that_disagree_with_themselves_are_refused() {
    let dir = tmp("self-disagree");
    std::fs::create_dir_all(&dir).unwrap();
    let part = dir.join("part");
    ok(&[TINY, FAST, "--num-images", "4", "--out", s(&part)]);
    let path = part.join("run.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (edit, want) in [
        (
            Box::new(|v: &mut serde_json::Value| v["labels"] = serde_json::json!([0, 1]))
                as Box<dyn Fn(&mut serde_json::Value)>,
            "2 labels for 4 images",
        ),
        (
            Box::new(|v: &mut serde_json::Value| v["labels"][1] = serde_json::json!(-1)),
            "label -1 is not one of the model's",
        ),
        (
            Box::new(|v: &mut serde_json::Value| {
                v["images_sha256"]["00009.png"] = v["images_sha256"]["00000.png"].clone()
            }),
            "a hash for `00009.png`, which is not one of the part's images",
        ),
    ] {
        let mut edited = value.clone();
        edit(&mut edited);
        std::fs::write(&path, serde_json::to_string_pretty(&edited).unwrap()).unwrap();
        fails(&["merge", s(&dir.join("merged")), s(&part)], want);
        assert!(!dir.join("merged").exists());
    }
    std::fs::write(&path, &text).unwrap();
    std::fs::copy(part.join("00000.png"), part.join("00009.png")).unwrap();
    fails(
        &[
            TINY,
            FAST,
            "--num-images",
            "4",
            "--out",
            s(&part),
            "--resume",
        ],
        "holds `00009.png`, which is not one of this run's images (00000.png to 00003.png)",
    );
    ok(&[
        TINY,
        FAST,
        "--num-images",
        "4",
        "--out",
        s(&part),
        "--force",
    ]);
    assert!(!part.join("00009.png").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs on other execution providers are other runs: CPU and CUDA kernels
/// differ in the last bits, so `--resume` and `merge` do not join them.
#[test]
fn a_run_on_another_execution_provider_is_another_run() {
    let dir = tmp("provider-identity");
    let part = dir.join("part");
    ok(&[
        TINY,
        FAST,
        "--num-images",
        "2",
        "--shard",
        "0/2",
        "--out",
        s(&part),
    ]);
    let cpu = record(&part);
    assert_eq!(cpu["runtime_settings"]["execution_provider"], "cpu");
    let path = part.join("run.json");
    let mut cuda = cpu.clone();
    cuda["runtime_settings"]["execution_provider"] = "cuda".into();
    std::fs::write(&path, serde_json::to_string_pretty(&cuda).unwrap()).unwrap();
    fails(
        &[
            TINY,
            FAST,
            "--num-images",
            "2",
            "--shard",
            "0/2",
            "--out",
            s(&part),
            "--resume",
        ],
        "the execution provider (--device) (\"cuda\" in the folder, \"cpu\" in this run)",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `--replay` that is a pipe is refused at once (opening it waited for a
/// writer, forever), and a folder is named as one.
#[test]
fn a_replay_that_is_a_pipe_or_folder_is_refused_at_once() {
    let dir = tmp("replay-pipe");
    std::fs::create_dir_all(&dir).unwrap();
    let pipe = dir.join("noise.npz");
    let out = dir.join("o");
    let made = Command::new("mkfifo").arg(&pipe).status();
    if made.is_ok_and(|s| s.success()) {
        let args = [
            TINY,
            FAST,
            "--num-images",
            "1",
            "--replay",
            s(&pipe),
            "--out",
            s(&out),
        ];
        let mut child = Command::new(env!("CARGO_BIN_EXE_gtr-run"))
            .args(args)
            .current_dir(root())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("gtr-run waited on the pipe");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(3));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("a pipe, socket or device, not a file"),
            "{err}"
        );
    }
    let folder = dir.join("folder.npz");
    std::fs::create_dir_all(&folder).unwrap();
    fails(
        &[
            TINY,
            FAST,
            "--num-images",
            "1",
            "--replay",
            s(&folder),
            "--out",
            s(&out),
        ],
        "a folder, not an .npz file",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

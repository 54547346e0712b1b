//! `--precision` and the manifest's `precision` / `precisions` fields: parsing,
//! every error a user can meet, fp16 variant graphs of the tiny bundle
//! generating images close to fp32 on the CPU provider, and int8 ones, with
//! activations per row and per tensor, against batch size and `--resume`
//! (models/fixtures/tiny-fp16 and tiny-int8, written by
//! models/fixtures/make_tiny_precision.py).

use std::path::{Path, PathBuf};

use gtr_run::backend::Device;
use gtr_run::backend::precision_choice::{PrecisionSource, choose};
use gtr_run::bundle::Bundle;
use gtr_run::precision::Precision;

mod common;
use common::{gtr_run, ok, root, tmp};

/// Runs `gtr-run`, expects a clear failure (a documented failure status,
/// no panic) and returns its message.
fn fails(args: &[&str]) -> String {
    let o = gtr_run(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        common::is_failure_status(o.status.code()),
        "{args:?}: {err}"
    );
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    err
}

const TINY: &str = "models/fixtures/tiny";

/// The tiny bundle with the variant graphs of models/fixtures/`fixture`,
/// the manifest passed through `edit` after the `precisions` section in
/// the fixture's file `section` is appended.
fn tiny_with(fixture: &str, section: &str, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let path = root().join("models/fixtures").join(fixture).join(section);
    let precisions = std::fs::read_to_string(path).unwrap();
    common::tiny_bundle_with(name, fixture, &precisions, edit)
}

/// [`tiny_with`] its fp16 variants.
fn tiny_with_fp16(name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    tiny_with("tiny-fp16", "precisions.yaml", name, edit)
}

fn open_err(dir: &Path) -> String {
    Bundle::open(dir).unwrap_err().to_string()
}

#[test]
fn the_fixture_lists_fp16_variants_of_every_graph() {
    let dir = tiny_with_fp16("fixture", |m| m);
    let b = Bundle::open(&dir).unwrap();
    assert_eq!(b.default_precision(), None);
    let fp16 = &b.manifest.precisions["fp16"];
    assert_eq!(fp16.len(), 4);
    assert_eq!(fp16["diffusion"], "diffusion.fp16.onnx");
    // The plain tiny bundle has no precisions at all.
    let plain = Bundle::open(&root().join(TINY)).unwrap();
    assert!(plain.manifest.precisions.is_empty() && plain.manifest.precision.is_none());
}

#[test]
fn manifest_fields_are_checked_with_their_names() {
    /// (name, manifest edit, what the message must hold)
    type Case = (&'static str, fn(String) -> String, &'static [&'static str]);
    let cases: [Case; 9] = [
        (
            "fp8",
            |m| m.replace("  fp16:", "  fp8:"),
            &["precisions.fp8", "unknown precision `fp8`"],
        ),
        (
            "fp32",
            |m| m.replace("  fp16:", "  fp32:"),
            &["precisions.fp32", "`graphs` section"],
        ),
        (
            "tf32",
            |m| m.replace("  fp16:", "  tf32:"),
            &["precisions.tf32", "CUDA provider"],
        ),
        (
            "role",
            |m| m.replace("vae_decoder: vae_decoder.fp16", "vae: vae_decoder.fp16"),
            &["precisions.fp16.vae", "no graph of this role"],
        ),
        (
            "file",
            |m| m.replace("diffusion.fp16.onnx", "missing.fp16.onnx"),
            &[
                "precisions.fp16.diffusion",
                "missing.fp16.onnx does not exist",
            ],
        ),
        (
            "folder",
            |m| m.replace("diffusion.fp16.onnx", "."),
            &[
                "precisions.fp16.diffusion",
                "is not a regular file (a folder, device or pipe)",
            ],
        ),
        (
            "empty",
            |m| {
                m.replace(
                "{ encoder: encoder.fp16.onnx, decoder: decoder.fp16.onnx, diffusion: diffusion.fp16.onnx, vae_decoder: vae_decoder.fp16.onnx }",
                "{}",
            )
            },
            &["precisions.fp16 lists no graphs"],
        ),
        (
            "default",
            |m| m + "precision: fp9\n",
            &[
                "precision: `fp9` is not a precision",
                "fp32, tf32, fp16, bf16, int8",
            ],
        ),
        (
            "default-without-variant",
            |m| m + "precision: int8\n",
            &[
                "precision: int8 is the default",
                "no `precisions: int8:` entry",
            ],
        ),
    ];
    for (name, edit, wants) in cases {
        let dir = tiny_with_fp16(&format!("bad-{name}"), edit);
        let e = open_err(&dir);
        assert!(e.contains("manifest.yaml"), "{name}: {e}");
        for want in wants {
            assert!(e.contains(want), "{name}: `{want}` not in: {e}");
        }
    }
}

#[test]
fn the_flag_wins_over_the_manifest_which_wins_over_fp32() {
    let dir = tiny_with_fp16("choose", |m| m + "precision: fp16\n");
    let b = Bundle::open(&dir).unwrap();
    assert_eq!(b.default_precision(), Some(Precision::Fp16));
    let c = choose(&b, None, Device::Cpu).unwrap();
    assert_eq!(
        (c.precision, c.source),
        (Precision::Fp16, PrecisionSource::Manifest)
    );
    assert_eq!(c.graph_files["encoder"], "encoder.fp16.onnx");
    assert!(!c.cuda_tf32 && !c.tensorrt_fp16);
    let c = choose(&b, Some(Precision::Fp32), Device::Cpu).unwrap();
    assert_eq!(
        (c.precision, c.source),
        (Precision::Fp32, PrecisionSource::Flag)
    );
    assert_eq!(c.graph_files["encoder"], "encoder.onnx");
    let plain = Bundle::open(&root().join(TINY)).unwrap();
    let c = choose(&plain, None, Device::Cpu).unwrap();
    assert_eq!(
        (c.precision, c.source),
        (Precision::Fp32, PrecisionSource::Default)
    );
    // tf32 is the CUDA switch on the fp32 graphs.
    let c = choose(&plain, Some(Precision::Tf32), Device::Cuda).unwrap();
    assert!(c.cuda_tf32);
    assert_eq!(c.graph_files["diffusion"], "diffusion.onnx");
    // With TensorRT, fp16 and bf16 are builder flags on the fp32 graphs, so
    // no variant is needed.
    let c = choose(&plain, Some(Precision::Fp16), Device::TensorRt).unwrap();
    assert!(c.tensorrt_fp16 && !c.tensorrt_bf16);
    assert_eq!(c.graph_files["decoder"], "decoder.onnx");
    let c = choose(&plain, Some(Precision::Bf16), Device::TensorRt).unwrap();
    assert!(c.tensorrt_bf16 && !c.tensorrt_fp16);
    // A variant of some roles only: the others stay fp32.
    let partial = tiny_with_fp16("partial", |m| {
        m.replace(", vae_decoder: vae_decoder.fp16.onnx", "")
    });
    let c = choose(
        &Bundle::open(&partial).unwrap(),
        Some(Precision::Fp16),
        Device::Cpu,
    )
    .unwrap();
    assert_eq!(c.graph_files["diffusion"], "diffusion.fp16.onnx");
    assert_eq!(c.graph_files["vae_decoder"], "vae_decoder.onnx");
}

#[test]
fn impossible_choices_name_the_flag_or_the_manifest() {
    let plain = Bundle::open(&root().join(TINY)).unwrap();
    let e = choose(&plain, Some(Precision::Fp16), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("--precision fp16:"), "{e}");
    assert!(
        e.contains("manifest.yaml") && e.contains("`precisions: fp16:`"),
        "{e}"
    );
    assert!(e.contains("models/convert_precision.py"), "{e}");
    let e = choose(&plain, Some(Precision::Tf32), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--precision tf32") && e.contains("--device cuda"),
        "{e}"
    );
    let e = choose(&plain, Some(Precision::Tf32), Device::TensorRt)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--precision tf32") && e.contains("tensorrt"),
        "{e}"
    );
    let e = choose(&plain, Some(Precision::Int8), Device::Cuda)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--precision int8 with --device cuda"), "{e}");
    // A variant the bundle lacks, from the manifest's default.
    let dir = tiny_with_fp16("int8-default", |m| {
        m.replace("  fp16:", "  int8:") + "precision: int8\n"
    });
    let b = Bundle::open(&dir).unwrap();
    let e = choose(&b, None, Device::Cuda).unwrap_err().to_string();
    assert!(
        e.contains("the manifest's default `precision: int8`") && e.contains("manifest.yaml"),
        "{e}"
    );
    let e = choose(&b, Some(Precision::Fp16), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("it has variants for int8 only"), "{e}");
}

#[test]
fn cli_flag_errors() {
    let out = tmp("cli-errors");
    let o = out.to_str().unwrap();
    let e = fails(&[
        TINY,
        "schedules/mar-8.gtr",
        "--precision",
        "fp9",
        "--out",
        o,
    ]);
    assert!(
        e.contains("--precision") && e.contains("`fp9` is not a precision"),
        "{e}"
    );
    let e = fails(&[
        TINY,
        "schedules/mar-8.gtr",
        "--precision",
        "fp16",
        "--out",
        o,
    ]);
    assert!(
        e.contains("--precision fp16: the bundle") && e.contains("convert_precision.py"),
        "{e}"
    );
    let e = fails(&[
        TINY,
        "schedules/mar-8.gtr",
        "--precision",
        "tf32",
        "--out",
        o,
    ]);
    assert!(
        e.contains("--precision tf32") && e.contains("--device cuda"),
        "{e}"
    );
    let e = fails(&[
        TINY,
        "schedules/mar-8.gtr",
        "--trt-cache",
        "/tmp/x",
        "--out",
        o,
    ]);
    assert!(
        e.contains("--trt-cache") && e.contains("--device tensorrt"),
        "{e}"
    );
    let e = fails(&[
        "eval",
        TINY,
        "schedules/mar-8.gtr",
        "--precision",
        "int8",
        "--out",
        o,
    ]);
    assert!(e.contains("--precision int8: the bundle"), "{e}");
    assert!(!out.join("run.json").exists() && !out.join("eval.json").exists());
}

fn pixels(dir: &Path, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            image::open(dir.join(format!("{i:05}.png")))
                .unwrap()
                .to_rgb8()
                .into_raw()
        })
        .collect()
}

fn record(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap()
}

/// fp16 variants on the CPU provider give images within 3 grey levels of
/// fp32 everywhere and 0.1 on average (measured: 1 and 0.019).
#[test]
fn fp16_images_stay_close_to_fp32() {
    let bundle = tiny_with_fp16("fp16-images", |m| m);
    let b = bundle.to_str().unwrap();
    let n = 4;
    let mut runs = Vec::new();
    for precision in ["fp32", "fp16"] {
        let out = tmp(&format!("fp16-images-{precision}"));
        // fp32 is the default.
        let extra: &[&str] = if precision == "fp32" {
            &[]
        } else {
            &["--precision", precision]
        };
        generate(b, &out, n, extra);
        runs.push(out);
    }
    let (a, h) = (pixels(&runs[0], n), pixels(&runs[1], n));
    let (mut worst, mut sum, mut count) = (0u8, 0u64, 0u64);
    for (x, y) in a.iter().zip(&h) {
        for (p, q) in x.iter().zip(y) {
            let d = p.abs_diff(*q);
            worst = worst.max(d);
            sum += u64::from(d);
            count += 1;
        }
    }
    let mean = sum as f64 / count as f64;
    assert!(worst <= 3 && mean <= 0.1, "max {worst}, mean {mean}");
    assert!(a != h, "fp16 should not be bit-identical to fp32");
    let fp32 = record(&runs[0]);
    let fp16 = record(&runs[1]);
    assert_eq!(fp32["precision"], "fp32");
    assert_eq!(fp32["runtime_settings"]["precision_source"], "default");
    assert_eq!(fp16["precision"], "fp16");
    assert_eq!(fp16["runtime_settings"]["precision_source"], "flag");
    assert_eq!(
        fp16["runtime_settings"]["graph_files"]["diffusion"],
        "diffusion.fp16.onnx"
    );
    for key in ["session_creation", "first_calls"] {
        assert!(fp16["seconds"][key].as_f64().unwrap() > 0.0, "{key}");
    }
    assert!(fp16["graphs"][2]["first_call_seconds"].as_f64().unwrap() > 0.0);
    // Resuming a folder with another precision would mix images.
    let e = fails(&[
        b,
        "schedules/gtr-fast.gtr",
        "--num-images",
        &n.to_string(),
        "--precision",
        "fp16",
        "--resume",
        "--out",
        runs[0].to_str().unwrap(),
    ]);
    assert!(e.contains("precision"), "{e}");
}

#[test]
fn eval_reports_the_precision() {
    let bundle = tiny_with_fp16("eval", |m| m + "precision: fp16\n");
    let out = tmp("eval-out");
    let o = ok(&[
        "eval",
        bundle.to_str().unwrap(),
        "schedules/mar-8.gtr",
        "--num-images",
        "2",
        "--batch",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("cpu, fp16"), "{table}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(v["comparison"]["precision"], "fp16");
    assert_eq!(v["runtime_settings"]["precision_source"], "manifest");
}

/// A bundle with sampler and tick graphs: `precisions.fp16.sampler` (the
/// sampler rebuilt around the fp16 head, fixtures/tiny-fp16/sampler.fp16.onnx)
/// runs the chains, one call per MAR step, with images close to fp32's; and
/// `precisions.fp16.tick` runs them a tick per call with the same images to
/// within a level.
#[test]
fn fp16_runs_through_the_sampler_graph() {
    let bundle = tiny_with_fp16("fp16-sampler", |m| {
        m.replace(
            "graphs:\n",
            "graphs:\n  sampler: { file: sampler.onnx, inputs: { x: x, z: z, t: t, coef: coef, noise: noise, active: active, guidance: guidance }, outputs: { x_out: x_out } }\n  tick: { file: tick.onnx, inputs: { x: x, k: k, z: z, t: t, coef: coef, noise: noise, running: running, guidance: guidance }, outputs: { x_next: x_next, k_next: k_next } }\n",
        )
        .replace(
            "vae_decoder: vae_decoder.fp16.onnx }",
            "vae_decoder: vae_decoder.fp16.onnx, sampler: sampler.fp16.onnx, tick: tick.fp16.onnx }",
        )
    });
    for graph in ["sampler.onnx", "tick.onnx"] {
        std::fs::copy(
            root().join("models/fixtures/tiny-sampler").join(graph),
            bundle.join(graph),
        )
        .unwrap();
    }
    let b = bundle.to_str().unwrap();
    let mut runs = Vec::new();
    for precision in ["fp32", "fp16"] {
        let out = tmp(&format!("fp16-sampler-{precision}"));
        ok(&[
            b,
            "schedules/mar-8.gtr",
            "--num-images",
            "2",
            "--precision",
            precision,
            "--sampler",
            "graph",
            "--out",
            out.to_str().unwrap(),
        ]);
        runs.push(out);
    }
    let fp16 = record(&runs[1]);
    assert_eq!(fp16["diffusion_chains"], "sampler graph");
    assert_eq!(
        fp16["runtime_settings"]["graph_files"]["sampler"],
        "sampler.fp16.onnx"
    );
    let sampler_calls = fp16["graphs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["graph"] == "sampler")
        .map(|g| g["calls"].clone());
    assert_eq!(sampler_calls, Some(serde_json::json!(8)));
    let (a, h) = (pixels(&runs[0], 2), pixels(&runs[1], 2));
    let diffs: Vec<u8> = a
        .iter()
        .zip(&h)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| p.abs_diff(*q)))
        .collect();
    let worst = diffs.iter().copied().max().unwrap();
    let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
    assert!(worst <= 3 && mean <= 0.1, "max {worst}, mean {mean}");

    let ticks = tmp("fp16-ticks");
    ok(&[
        b,
        "schedules/mar-8.gtr",
        "--num-images",
        "2",
        "--precision",
        "fp16",
        "--sampler",
        "ticks",
        "--out",
        ticks.to_str().unwrap(),
    ]);
    let run = record(&ticks);
    assert_eq!(run["diffusion_chains"], "tick graph");
    assert_eq!(
        run["runtime_settings"]["graph_files"]["tick"],
        "tick.fp16.onnx"
    );
    let off = pixels(&ticks, 2)
        .iter()
        .zip(&h)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| p.abs_diff(*q)))
        .max()
        .unwrap();
    assert!(
        off <= 1,
        "tick graph against sampler graph in fp16: {off} levels"
    );
}

/// Generates `n` images of the tiny bundle `b` with `schedules/gtr-fast.gtr`
/// into `out` on one thread, `extra` arguments added.
fn generate(b: &str, out: &Path, n: usize, extra: &[&str]) {
    let count = n.to_string();
    let mut args = vec![
        b,
        "schedules/gtr-fast.gtr",
        "--num-images",
        &count,
        "--threads",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    ok(&args);
}

/// [`generate`] in int8 at `batch`, resuming the folder's run if `resume`.
fn generate_int8(b: &str, out: &Path, n: usize, batch: &str, resume: bool) {
    let mut extra = vec!["--batch", batch, "--precision", "int8"];
    if resume {
        extra.push("--resume");
    }
    generate(b, out, n, &extra);
}

/// The bytes of image `i` in `dir`.
fn png(dir: &Path, i: usize) -> Vec<u8> {
    std::fs::read(dir.join(format!("{i:05}.png"))).unwrap()
}

/// int8 variants with activations quantized per row
/// (`convert_precision.py --per-row-activations`) make an image that does
/// not depend on the images of its batch: the same bytes at any batch size,
/// as in fp32.
#[test]
fn per_row_int8_images_do_not_depend_on_their_batch() {
    let bundle = tiny_with(
        "tiny-int8",
        "precisions-per-row.yaml",
        "int8-per-row",
        |m| m,
    );
    let b = bundle.to_str().unwrap();
    let n = 6;
    let outs: Vec<PathBuf> = ["3", "1", "6"]
        .iter()
        .map(|batch| {
            let out = tmp(&format!("int8-per-row-{batch}"));
            generate_int8(b, &out, n, batch, false);
            out
        })
        .collect();
    for out in &outs[1..] {
        for i in 0..n {
            assert!(png(out, i) == png(&outs[0], i), "image {i} in {out:?}");
        }
    }
    assert_eq!(
        record(&outs[0])["runtime_settings"]["graph_files"]["diffusion"],
        "diffusion.int8-per-row.onnx"
    );
}

/// With one activation scale per tensor (convert_precision.py's default,
/// ONNX Runtime's dynamic quantization as it is) an image depends on the
/// other images of its batch. The same command still gives the same bytes,
/// and `--resume` remakes a missing image within the batch a whole run
/// makes it in, so it comes back byte-identical.
#[test]
fn int8_images_depend_on_their_batch_and_resume_remakes_them_exactly() {
    let bundle = tiny_with("tiny-int8", "precisions.yaml", "int8-per-tensor", |m| m);
    let b = bundle.to_str().unwrap();
    let n = 6;
    let whole = tmp("int8-per-tensor-3");
    generate_int8(b, &whole, n, "3", false);
    let again = tmp("int8-per-tensor-3-again");
    generate_int8(b, &again, n, "3", false);
    let single = tmp("int8-per-tensor-1");
    generate_int8(b, &single, n, "1", false);
    assert!((0..n).all(|i| png(&whole, i) == png(&again, i)));
    assert!(
        (0..n).any(|i| pixels(&whole, n)[i] != pixels(&single, n)[i]),
        "int8 images (activations per tensor) no longer depend on their batch: README and models/README say they do"
    );

    // Images 1 and 4 lost (one in each batch of 3): made again beside 0, 2
    // and 3, 5, not as a batch of their own.
    let resumed = tmp("int8-per-tensor-resumed");
    std::fs::create_dir_all(&resumed).unwrap();
    for entry in std::fs::read_dir(&whole).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, resumed.join(p.file_name().unwrap())).unwrap();
    }
    for i in [1, 4] {
        std::fs::remove_file(resumed.join(format!("{i:05}.png"))).unwrap();
    }
    generate_int8(b, &resumed, n, "3", true);
    for i in 0..n {
        assert!(
            png(&resumed, i) == png(&whole, i),
            "image {i} after --resume"
        );
    }
    assert_eq!(record(&resumed)["generated_now"], 2);
    // Resumed at another batch, the remade images would be another run's:
    // refused, naming the batch.
    std::fs::remove_file(resumed.join("00001.png")).unwrap();
    let out = resumed.to_str().unwrap();
    let args = [
        b,
        "schedules/gtr-fast.gtr",
        "--num-images",
        "6",
        "--precision",
        "int8",
    ];
    let at_2 = [&args[..], &["--batch", "2", "--out", out, "--resume"]].concat();
    common::fails(
        &at_2,
        "the batch (--batch; int8 images depend on it) (3 in the folder, 2 in this run)",
    );
}

/// A precision whose variant lists the diffusion head but not its two parts
/// (models/split_head.py) runs its whole head: the bundle's fp32 parts would
/// mix precisions. `--head auto` then runs the int8 head whole, `--head
/// split` is refused naming the variant, and fp32 still splits.
#[test]
fn a_variant_without_the_split_head_runs_its_whole_head() {
    let bundle = tiny_with("tiny-int8", "precisions.yaml", "int8-no-split", |m| {
        m.replace(
            "  vae_decoder:",
            "  diffusion_condition: { file: diffusion_condition.onnx, inputs: { t: t, z: z }, outputs: { cond: cond } }\n  diffusion_state: { file: diffusion_state.onnx, inputs: { x: x, cond: cond }, outputs: { out: out } }\n  vae_decoder:",
        )
    });
    for part in ["diffusion_condition.onnx", "diffusion_state.onnx"] {
        let from = root().join("models/fixtures/tiny-split").join(part);
        std::fs::copy(from, bundle.join(part)).unwrap();
    }
    let b = bundle.to_str().unwrap();
    let chains = |name: &str, extra: &[&str]| {
        let out = tmp(name);
        generate(b, &out, 2, extra);
        let run: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
        run["diffusion_chains"].as_str().unwrap().to_string()
    };
    assert_eq!(chains("no-split-int8", &["--precision", "int8"]), "host");
    assert_eq!(chains("no-split-fp32", &[]), "host (split head)");
    let out = tmp("no-split-int8-split");
    let err = fails(&[
        b,
        "schedules/gtr-fast.gtr",
        "--precision",
        "int8",
        "--head",
        "split",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        err.contains("--head split") && err.contains("precisions.int8"),
        "{err}"
    );
}

/// Without `--out`, a run and an eval in a precision other than fp32 write
/// to folders named with it (`…-seed0-int8`), beside the fp32 ones, not
/// into them; the manifest's default precision counts like the flag.
#[test]
fn default_folders_carry_a_variant_precision() {
    let bundle = tiny_with("tiny-int8", "precisions.yaml", "int8-default-out", |m| m);
    let cwd = tmp("default-out");
    std::fs::create_dir_all(&cwd).unwrap();
    let schedule = root().join("schedules/gtr-fast.gtr");
    let run = |extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_gtr-run"))
            .args([bundle.to_str().unwrap(), schedule.to_str().unwrap()])
            .args(["--num-images", "1"])
            .args(extra)
            .current_dir(&cwd)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(&[]);
    run(&["--precision", "int8"]);
    let eval = std::process::Command::new(env!("CARGO_BIN_EXE_gtr-run"))
        .args(["eval", bundle.to_str().unwrap(), schedule.to_str().unwrap()])
        .args(["--num-images", "2", "--precision", "int8"])
        .current_dir(&cwd)
        .output()
        .unwrap();
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let mut made: Vec<String> = std::fs::read_dir(cwd.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    made.sort();
    assert_eq!(
        made,
        [
            "eval-tiny-random-seed0-int8",
            "tiny-random-gtr-fast-seed0",
            "tiny-random-gtr-fast-seed0-int8"
        ]
    );
    // A bundle whose manifest defaults to int8, run without the flag.
    let defaulting = tiny_with(
        "tiny-int8",
        "precisions.yaml",
        "int8-default-manifest",
        |m| m + "precision: int8\n",
    );
    let cwd2 = tmp("default-out-manifest");
    std::fs::create_dir_all(&cwd2).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_gtr-run"))
        .args([defaulting.to_str().unwrap(), schedule.to_str().unwrap()])
        .args(["--num-images", "1"])
        .current_dir(&cwd2)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(cwd2.join("runs/tiny-random-gtr-fast-seed0-int8").is_dir());
    let _ = std::fs::remove_dir_all(&cwd);
    let _ = std::fs::remove_dir_all(&cwd2);
}

/// A sampler, tick or backbone graph the bundle got after its int8 variants
/// were written (listed under `graphs`, not under `precisions.int8`) is
/// not mixed into an int8 run: asked for, it is refused naming the fix;
/// with the default choices the run takes the host chains and split
/// backbone and says so. fp32 runs still use it.
#[test]
fn fp32_derived_graphs_are_not_mixed_into_an_int8_run() {
    const DERIVED: &str = "graphs:\n  sampler: { file: sampler.onnx, inputs: { x: x, z: z, t: t, coef: coef, noise: noise, active: active, guidance: guidance }, outputs: { x_out: x_out } }\n  tick: { file: tick.onnx, inputs: { x: x, k: k, z: z, t: t, coef: coef, noise: noise, running: running, guidance: guidance }, outputs: { x_next: x_next, k_next: k_next } }\n  backbone: { file: backbone.onnx, inputs: { tokens: tokens, known: known, label: label, predict: predict }, outputs: { z: z } }\n";
    let bundle = tiny_with("tiny-int8", "precisions.yaml", "int8-fp32-derived", |m| {
        m.replace("graphs:\n", DERIVED)
    });
    for graph in ["sampler.onnx", "tick.onnx", "backbone.onnx"] {
        std::fs::copy(
            root().join("models/fixtures/tiny-sampler").join(graph),
            bundle.join(graph),
        )
        .unwrap();
    }
    let b = bundle.to_str().unwrap();
    let out = tmp("int8-fp32-derived-out");
    let o = out.to_str().unwrap();
    let base = [b, "schedules/mar-8.gtr", "--num-images", "1", "--out", o];
    let run = |extra: &[&'static str]| -> Vec<&str> { [&base[..], extra].concat() };
    for (flags, what) in [
        (
            &["--sampler", "graph"][..],
            "--sampler graph: bundle `tiny-random` has a sampler graph, but not in int8",
        ),
        (
            &["--sampler", "ticks"][..],
            "--sampler ticks: bundle `tiny-random` has a tick graph, but not in int8",
        ),
        (
            &["--backbone", "fused"][..],
            "--backbone fused: bundle `tiny-random` has a backbone graph, but not in int8",
        ),
    ] {
        let err = fails(&run(&[&["--precision", "int8"][..], flags].concat()));
        assert!(err.contains(what), "{err}");
        assert!(err.contains("models/convert_precision.py"), "{err}");
        assert!(!out.exists());
    }
    // The defaults: host chains, the encoder and decoder, said once.
    let done = ok(&run(&["--precision", "int8"]));
    let note = String::from_utf8_lossy(&done.stderr);
    assert!(
        note.contains("has a sampler graph, but not in int8"),
        "{note}"
    );
    let made = record(&out);
    assert_eq!(made["diffusion_chains"], "host");
    assert_eq!(made["backbone"], "encoder and decoder");
    std::fs::remove_dir_all(&out).unwrap();
    // fp32 uses them.
    ok(&run(&["--sampler", "graph", "--backbone", "fused"]));
    assert_eq!(record(&out)["diffusion_chains"], "sampler graph");
    // Once the variants list them (as convert_precision.py writes them
    // for a bundle that has these graphs), int8 uses them.
    std::fs::remove_dir_all(&out).unwrap();
    let listed = tiny_with("tiny-int8", "precisions.yaml", "int8-derived-listed", |m| {
        m.replace("graphs:\n", DERIVED).replace(
            "diffusion: diffusion.int8.onnx }",
            "diffusion: diffusion.int8.onnx, sampler: sampler.int8.onnx, tick: tick.int8.onnx }",
        )
    });
    for graph in ["sampler.onnx", "tick.onnx", "backbone.onnx"] {
        std::fs::copy(bundle.join(graph), listed.join(graph)).unwrap();
    }
    let l = listed.to_str().unwrap();
    ok(&[
        l,
        "schedules/mar-8.gtr",
        "--num-images",
        "1",
        "--out",
        o,
        "--precision",
        "int8",
        "--sampler",
        "graph",
    ]);
    assert_eq!(
        record(&out)["runtime_settings"]["graph_files"]["sampler"],
        "sampler.int8.onnx"
    );
    for d in [&bundle, &listed, &out] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

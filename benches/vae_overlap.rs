//! Whether a batch's VAE decode beside the next batch's sampling
//! (`--vae overlap`) pays against decoding after it (`--vae inline`), the
//! two side by side in one run:
//!
//!     cargo bench --bench vae_overlap -- [BUNDLE] [--schedule NAME] [--images N]
//!         [--batch B] [--reps R] [--threads T] [--device D]
//!
//! Makes the same N images R times each way, alternating (inline first),
//! after one untimed run each way, in memory (the library's
//! `generate_in_memory`: decodes and PNG encoding as a folder run does them,
//! no files written). Prints each way's median wall seconds per image with
//! its range, the median of the per-pair ratios inline / overlap, and the
//! share of the run the VAE took inline; exits 1 if any run's pixels differ
//! from the first inline run's. Defaults: models/mar-tiny, gtr-3.7x, 32 images in batches of 8,
//! 5 repetitions, 2 threads, cpu. Not a test: numbers depend on the machine.

use std::collections::BTreeMap;
use std::path::PathBuf;

use gtr_run::backend::{Device, LoadOptions, OrtModel, VaeRunner};
use gtr_run::bundle::Bundle;
use gtr_run::engine::{Engine, MarModel};
use gtr_run::run::{Classes, Existing, RunRequest, generate_in_memory};
use gtr_run::schedule::Schedule;

const USAGE: &str = "cargo bench --bench vae_overlap -- [BUNDLE] [--schedule NAME] [--images N] [--batch B] [--reps R] [--threads T] [--device D]";

mod common;

/// Says what is wrong with the command line and exits with status 2.
fn usage(problem: &str) -> ! {
    common::refuse("vae_overlap", problem, USAGE)
}

/// The command line's settings.
struct Settings {
    bundle: PathBuf,
    schedule: String,
    images: usize,
    batch: usize,
    reps: usize,
    threads: usize,
    device: Device,
}

fn settings() -> Settings {
    let mut args = common::bench_args();
    let mut s = Settings {
        bundle: PathBuf::from("models/mar-tiny"),
        schedule: "gtr-3.7x".into(),
        images: 32,
        batch: 8,
        reps: 5,
        threads: 2,
        device: Device::Cpu,
    };
    let mut bundle = None;
    let count = |flag: &str, value: Option<String>| -> usize {
        common::count(value)
            .unwrap_or_else(|| usage(&format!("{flag} takes a whole number above 0")))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--images" => s.images = count("--images", args.next()),
            "--batch" => s.batch = count("--batch", args.next()),
            "--reps" => s.reps = count("--reps", args.next()),
            "--threads" => s.threads = count("--threads", args.next()),
            "--schedule" => {
                s.schedule = args
                    .next()
                    .unwrap_or_else(|| usage("--schedule takes a preset's name"))
            }
            "--device" => {
                s.device = args
                    .next()
                    .unwrap_or_default()
                    .parse()
                    .unwrap_or_else(|e: String| usage(&format!("--device: {e}")))
            }
            flag if flag.starts_with('-') => usage(&format!("unknown flag `{flag}`")),
            path if bundle.is_none() => bundle = Some(PathBuf::from(path)),
            extra => usage(&format!("one bundle only (`{extra}` is a second)")),
        }
    }
    if let Some(path) = bundle {
        s.bundle = path;
    }
    s
}

/// The median of `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The least and greatest of `v`.
fn range(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)))
}

fn main() {
    let s = settings();
    let fail = |what: String| -> ! {
        eprintln!("vae_overlap: {what}");
        std::process::exit(3)
    };
    let bundle = Bundle::open(&s.bundle).unwrap_or_else(|e| fail(e.to_string()));
    let schedule = Schedule::from_file(
        &PathBuf::from(format!("schedules/{}.gtr", s.schedule)),
        &BTreeMap::new(),
    )
    .unwrap_or_else(|e| usage(&format!("--schedule {}: {e}", s.schedule)));
    gtr_run::engine::set_host_threads(s.threads);
    let options = LoadOptions::new(&bundle, s.device, Some(s.threads));
    let model = OrtModel::load_with(&bundle, &options).unwrap_or_else(|e| fail(e.to_string()));
    let mut engine = Engine::new(model);
    let request = |vae| RunRequest {
        schedule: schedule.clone(),
        num_images: s.images,
        batch: s.batch,
        seed: 0,
        classes: Classes::Balanced,
        cfg: None,
        temperature: None,
        out: PathBuf::new(),
        existing: Existing::Refuse,
        replay: None,
        device_requested: s.device.name().into(),
        runtime_settings: serde_json::Value::Null,
        shard: None,
        npz: None,
        ticks_per_call: None,
        vae,
        model_sha256: None,
    };
    let ways = [VaeRunner::Inline, VaeRunner::Overlap];
    let mut run = |vae: VaeRunner| {
        let (pixels, record) =
            generate_in_memory(&bundle, &mut engine, &request(vae), |_, _| Ok(()))
                .unwrap_or_else(|e| fail(format!("--vae {}: {e:#}", vae.name())));
        let measured = record.measured.expect("an in-memory run measures");
        let ran = serde_json::to_value(measured.vae_decode).expect("a name");
        assert_eq!(ran, vae.name(), "the way asked for ran");
        (pixels, measured.seconds)
    };
    // Untimed: sessions warm, allocations made. Every later run must make
    // these pixels.
    let expected = run(VaeRunner::Inline).0;
    let check = |(pixels, seconds), vae: VaeRunner| {
        if pixels != expected {
            eprintln!(
                "vae_overlap: --vae {} made other pixels than --vae inline",
                vae.name()
            );
            std::process::exit(1);
        }
        seconds
    };
    check(run(VaeRunner::Overlap), VaeRunner::Overlap);
    let mut walls = [Vec::new(), Vec::new()];
    let mut ratios = Vec::new();
    let mut vae_share = Vec::new();
    for _ in 0..s.reps {
        let inline: gtr_run::run::record::Seconds =
            check(run(VaeRunner::Inline), VaeRunner::Inline);
        let overlap = check(run(VaeRunner::Overlap), VaeRunner::Overlap);
        walls[0].push(inline.wall / s.images as f64);
        walls[1].push(overlap.wall / s.images as f64);
        ratios.push(inline.wall / overlap.wall);
        vae_share.push(inline.vae / inline.wall);
    }
    println!(
        "bundle {} ({}), {} on {}, {} images in batches of {}, {} threads, {} alternating pairs after one warm-up each\n",
        bundle.manifest.name,
        s.bundle.display(),
        s.schedule,
        engine.model.execution_provider(),
        s.images,
        s.batch,
        s.threads,
        s.reps
    );
    println!("| --vae | s/image, median (range) |");
    println!("|---|---|");
    for (way, w) in ways.iter().zip(walls.iter_mut()) {
        let (lo, hi) = range(w);
        println!("| {} | {:.4} ({lo:.4}–{hi:.4}) |", way.name(), median(w));
    }
    let (lo, hi) = range(&ratios);
    println!(
        "\ninline / overlap, median of the pairs: {:.3}x ({lo:.3}–{hi:.3}); the VAE call was {:.1}% of an inline run; same pixels both ways",
        median(&mut ratios),
        100.0 * median(&mut vae_share)
    );
}

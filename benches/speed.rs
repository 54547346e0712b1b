//! Speed of the engine on a model bundle, schedules interleaved in one run:
//!
//!     cargo bench --bench speed -- [BUNDLE] [--images N] [--reps R]
//!
//! For each schedule: wall seconds per image (warm-up excluded), the
//! wall-time ratio to the first schedule next to the ratio of analytic
//! FLOPs, and the share of generation time spent outside ONNX Runtime's run
//! calls (planning, gathers, sampler arithmetic, FFT, tensor hand-over).
//! The measuring is `gtr_run::eval::compare`'s, without quality scoring.
//! Not a test: numbers depend on the machine.

use std::collections::BTreeMap;
use std::path::PathBuf;

use gtr_run::backend::{Device, OrtModel, VaeRunner};
use gtr_run::bundle::Bundle;
use gtr_run::engine::{Engine, MarModel};
use gtr_run::eval::{CompareRequest, Contender, compare};
use gtr_run::schedule::Schedule;

mod common;

/// Says what is wrong with the command line and exits with status 2.
fn usage(problem: &str) -> ! {
    common::refuse(
        "speed",
        problem,
        "cargo bench --bench speed -- [BUNDLE] [--images N] [--reps R]",
    )
}

fn main() {
    let mut args = common::bench_args();
    let mut bundle_path = None;
    let (mut images, mut reps) = (8usize, 5usize);
    let count = |flag: &str, value: Option<String>| -> usize {
        common::count(value)
            .unwrap_or_else(|| usage(&format!("{flag} takes a whole number above 0")))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--images" => images = count("--images", args.next()),
            "--reps" => reps = count("--reps", args.next()),
            flag if flag.starts_with('-') => usage(&format!("unknown flag `{flag}`")),
            path if bundle_path.is_none() => bundle_path = Some(PathBuf::from(path)),
            extra => usage(&format!("one bundle only (`{extra}` is a second)")),
        }
    }
    let bundle_path = bundle_path.unwrap_or_else(|| PathBuf::from("models/fixtures/tiny"));
    let bundle = Bundle::open(&bundle_path).unwrap_or_else(|e| {
        eprintln!("speed: {e}");
        std::process::exit(3)
    });
    let model = OrtModel::load(&bundle, Device::Cpu, None).expect("model");
    let info = model.info().clone();
    let contenders: Vec<Contender> = ["mar-64", "gtr", "gtr-3.7x", "gtr-fast"]
        .iter()
        .map(|n| Contender {
            name: n.to_string(),
            schedule: Schedule::from_file(
                &PathBuf::from(format!("schedules/{n}.gtr")),
                &BTreeMap::new(),
            )
            .expect("schedule"),
        })
        .collect();
    let request = CompareRequest {
        num_images: images,
        batch: images,
        seed: 0,
        repeats: reps,
        options: info.defaults.plan_options(None, None),
        warm_up: true,
        // As `gtr-run eval` by default: inline on the CPU.
        vae: VaeRunner::Auto,
    };
    let mut engine = Engine::new(model);
    let c = compare(
        &mut engine,
        None,
        &contenders,
        &bundle.cost_spec(),
        &request,
        |_, _, _| std::ops::ControlFlow::Continue(()),
    )
    .expect("compare");
    println!(
        "bundle {} ({}), {images} images per run, {reps} interleaved repetitions after one warm-up\n",
        info.name,
        bundle_path.display()
    );
    println!(
        "| schedule | MAR steps | GFLOPs/image | s/image | wall ratio to {} (per-run range) | FLOPs ratio | wall/FLOPs − 1 | outside ORT run calls | outside model calls |",
        c.schedules[0].name
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (k, s) in c.schedules.iter().enumerate() {
        let (lo, hi) = c.speedup_range(k);
        let (wr, fr) = (c.speedup(k), c.flops_speedup(k));
        println!(
            "| {} | {} | {:.2} | {:.4} | {wr:.2}x ({lo:.2}–{hi:.2}) | {fr:.2}x | {:+.1}% | {:.1}% | {:.1}% |",
            s.name,
            s.mar_steps,
            s.flops_per_image / 1e9,
            s.seconds_per_image(),
            100.0 * (wr / fr - 1.0),
            100.0 * s.outside_runtime_share(),
            100.0 * (s.wall_seconds - s.model_seconds) / s.wall_seconds,
        );
    }
}

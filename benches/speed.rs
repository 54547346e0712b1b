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

use gtr_run::backend::{Device, OrtModel};
use gtr_run::bundle::Bundle;
use gtr_run::engine::{Engine, MarModel};
use gtr_run::eval::{CompareRequest, Contender, compare};
use gtr_run::schedule::Schedule;

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let mut bundle_path = PathBuf::from("models/fixtures/tiny");
    let (mut images, mut reps) = (8usize, 5usize);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--images" => images = args.next().and_then(|v| v.parse().ok()).unwrap_or(images),
            "--reps" => reps = args.next().and_then(|v| v.parse().ok()).unwrap_or(reps),
            other => bundle_path = PathBuf::from(other),
        }
    }
    let bundle = Bundle::open(&bundle_path).expect("bundle");
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

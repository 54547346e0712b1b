//! Speed of the engine on a model bundle, schedules interleaved in one run:
//!
//!     cargo bench --bench speed -- [BUNDLE] [--images N] [--reps R]
//!
//! For each schedule: wall seconds per image (median over repetitions,
//! warm-up excluded), the wall-time ratio to the first schedule next to the
//! ratio of analytic FLOPs, and the share of generation time spent outside
//! ONNX Runtime's run calls (planning, gathers, sampler arithmetic, FFT,
//! tensor hand-over). Not a test: numbers depend on the machine.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use gtr_run::backend::ort::{Device, OrtModel};
use gtr_run::bundle::Bundle;
use gtr_run::cost::plan_cost;
use gtr_run::engine::{Engine, ImageJob, MarModel, Noise};
use gtr_run::plan::{PlanOptions, Planner};
use gtr_run::rng::image_seed;
use gtr_run::schedule::Schedule;

struct Sample {
    wall: f64,
    runtime: f64,
    model: f64,
}

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
    let mut engine = Engine::new(model);
    let names = ["mar-64", "gtr", "gtr-3.7x", "gtr-fast"];
    let schedules: Vec<Schedule> = names
        .iter()
        .map(|n| {
            Schedule::from_file(
                &PathBuf::from(format!("schedules/{n}.gtr")),
                &BTreeMap::new(),
            )
            .expect("schedule")
        })
        .collect();
    let options = PlanOptions {
        default_cfg: Some(info.defaults.cfg),
        default_temperature: Some(info.defaults.temperature),
        ..PlanOptions::default()
    };
    let jobs: Vec<ImageJob> = (0..images as u64)
        .map(|i| ImageJob {
            index: i,
            seed: image_seed(0, i),
            label: if info.classes > 0 {
                (i % info.classes as u64) as i64
            } else {
                info.null_class
            },
        })
        .collect();
    let mut samples: Vec<Vec<Sample>> = names.iter().map(|_| Vec::new()).collect();
    for rep in 0..=reps {
        for (k, schedule) in schedules.iter().enumerate() {
            let before_runtime: f64 = engine.model.graph_stats().iter().map(|g| g.seconds).sum();
            let before_model = engine.stats.model_seconds();
            // Planning counts as generation time.
            let start = Instant::now();
            let planner = Planner::new(schedule, info.grid).expect("plan");
            let plans: Vec<_> = jobs
                .iter()
                .map(|j| planner.plan_with(j.seed, &options).expect("plan"))
                .collect();
            engine
                .generate(&plans, &jobs, Noise::Seeded, |_, _| {})
                .expect("generate");
            let wall = start.elapsed().as_secs_f64();
            let runtime: f64 = engine
                .model
                .graph_stats()
                .iter()
                .map(|g| g.seconds)
                .sum::<f64>()
                - before_runtime;
            let model = engine.stats.model_seconds() - before_model;
            if rep > 0 {
                samples[k].push(Sample {
                    wall,
                    runtime,
                    model,
                });
            }
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "bundle {} ({}), {images} images per run, {reps} interleaved repetitions after one warm-up\n",
        info.name,
        bundle_path.display()
    );
    println!(
        "| schedule | MAR steps | GFLOPs/image | s/image (median) | wall ratio to mar-64 | FLOPs ratio | wall/FLOPs − 1 | outside ORT run calls | outside model calls |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut base: Option<(f64, f64)> = None;
    for (k, name) in names.iter().enumerate() {
        let planner = Planner::new(&schedules[k], info.grid).expect("plan");
        let plan = planner.plan_with(0, &options).expect("plan");
        let flops = plan_cost(&plan, &bundle.cost_spec()).total_flops();
        let s = &samples[k];
        let wall = median(s.iter().map(|x| x.wall / images as f64).collect());
        let outside = median(s.iter().map(|x| (x.wall - x.runtime) / x.wall).collect());
        let engine_only = median(s.iter().map(|x| (x.wall - x.model) / x.wall).collect());
        let (bw, bf) = *base.get_or_insert((wall, flops));
        let (wr, fr) = (bw / wall, bf / flops);
        println!(
            "| {name} | {} | {:.2} | {:.4} | {:.2}x | {:.2}x | {:+.1}% | {:.1}% | {:.1}% |",
            plan.steps.len(),
            flops / 1e9,
            wall,
            wr,
            fr,
            100.0 * (wr / fr - 1.0),
            100.0 * outside,
            100.0 * engine_only
        );
    }
}

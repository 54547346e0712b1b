//! Plans a schedule and generates a few images with the library's engine.
//!
//! ```sh
//! cargo run --example tiny                      # the tiny fixture, gtr-fast, into runs/example-tiny
//! cargo run --example tiny -- models/mar-tiny schedules/gtr.gtr runs/example-mar-tiny
//! ```
//!
//! The tiny fixture (`models/fixtures/tiny`) is a randomly initialised
//! bundle: its images are noise, but every graph and every step of the
//! pipeline runs. ONNX Runtime is found as the command line finds it
//! (`ORT_DYLIB_PATH`, else fetched once into `~/.cache/gtr-run`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use gtr_run::backend::{ChainRunner, Device, OrtModel};
use gtr_run::bundle::Bundle;
use gtr_run::engine::{Engine, ImageJob, SeededNoise};
use gtr_run::plan::Planner;
use gtr_run::report::text::step_table;
use gtr_run::run::encode_png;
use gtr_run::run::folder::image_name;
use gtr_run::schedule::Schedule;
use ndarray::Axis;

const IMAGES: usize = 4;
const SEED: u64 = 0;

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let bundle_path = args
        .next()
        .unwrap_or_else(|| root.join("models/fixtures/tiny"));
    let schedule_path = args
        .next()
        .unwrap_or_else(|| root.join("schedules/gtr-fast.gtr"));
    let out = args
        .next()
        .unwrap_or_else(|| PathBuf::from("runs/example-tiny"));

    // Plan: the schedule on the model's grid, with the model's guidance and
    // temperature where the schedule sets none.
    let bundle = Bundle::open(&bundle_path)?;
    let schedule = Schedule::from_file(&schedule_path, &BTreeMap::new())?;
    let planner = Planner::new(&schedule, bundle.grid())?;
    let options = bundle.manifest.sampling.plan_options(None, None);
    let plan = planner.plan_with(SEED, &options)?;
    println!(
        "{} on {} ({} MAR steps):\n{}",
        schedule_path.display(),
        bundle.manifest.name,
        plan.steps.len(),
        step_table(&plan)
    );

    // Generate: each image has its own seed and plan (its own random order),
    // all in one batch; classes 0, 1, 2, ….  Image i is the image i of
    // `gtr-run MODEL SCHEDULE --seed 0 --classes 0,1,2,3`.
    // Diffusion chains run where the command line runs them by default.
    let (model, note) =
        OrtModel::load(&bundle, Device::Cpu, None)?.run_chains(ChainRunner::Auto, &bundle)?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    let mut engine = Engine::new(model);
    let labels: Vec<i64> = (0..IMAGES)
        .map(|i| (i % bundle.manifest.classes.max(1)) as i64)
        .collect();
    let indices: Vec<usize> = (0..IMAGES).collect();
    let (jobs, plans) = ImageJob::batch(&planner, &options, SEED, &indices, &labels)?;
    let batch = engine.generate(&plans, &jobs, &SeededNoise, |_, _| {})?;

    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for job in &jobs {
        let pixels = batch.pixels.index_axis(Axis(0), job.index as usize);
        let path = out.join(image_name(job.index as usize));
        gtr_run::fsutil::write_atomic(&path, &encode_png(&pixels.to_owned()))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let (_, h, w, c) = batch.pixels.dim();
    println!(
        "wrote {IMAGES} images of {h}x{w}x{c} to {} in {:.2} s",
        out.display(),
        engine.stats.total_seconds
    );
    Ok(())
}

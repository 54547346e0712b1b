//! The engine's own hot paths, without ONNX Runtime (`cargo bench --bench
//! hot_paths`): planning a schedule, FTS scoring, the diffusion sampler
//! update, and a whole batch through the engine on the in-process fake
//! model (canvas and conditioning gathers, row layout, CFG mixing, noise),
//! and a batch's PNGs one by one against `encode_batch`.
//! Timings only; `cargo bench --bench speed` measures the share of real
//! generation time these take.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};

use gtr_run::engine::fake::FakeModel;
use gtr_run::engine::{Engine, ImageJob, SeededNoise};
use gtr_run::grid::Grid;
use gtr_run::plan::{PlanOptions, Planner};
use gtr_run::rng::image_seed;
use gtr_run::run::{encode_batch, encode_png};
use gtr_run::sampler::fts::{FtsScorer, select};
use gtr_run::sampler::{NoiseSchedule, Variance};
use gtr_run::schedule::{Schedule, Selector};

fn schedule(name: &str) -> Schedule {
    Schedule::from_file(
        Path::new(&format!("schedules/{name}.gtr")),
        &BTreeMap::new(),
    )
    .expect("preset schedule")
}

fn options() -> PlanOptions {
    PlanOptions {
        default_cfg: Some(3.0),
        default_temperature: Some(1.0),
        ..PlanOptions::default()
    }
}

fn planning(c: &mut Criterion) {
    for name in ["mar-64", "gtr", "halton-16"] {
        let s = schedule(name);
        let planner = Planner::new(&s, Grid::MAR).expect("plan");
        let mut seed = 0u64;
        c.bench_function(&format!("plan {name} 16x16"), |b| {
            b.iter(|| {
                seed += 1;
                black_box(planner.plan_with(seed, &options()).expect("plan"))
            })
        });
    }
}

fn fts_scoring(c: &mut Criterion) {
    // MAR-B's width; one step's worth of tokens (the GtR reconstruction step).
    let width = 768;
    let tokens = 128;
    let z: Vec<f32> = (0..tokens * width)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut scorer = FtsScorer::new(width);
    c.bench_function("fts score 128 tokens, width 768", |b| {
        b.iter(|| {
            let scores: Vec<f64> = z.chunks(width).map(|row| scorer.score(row)).collect();
            black_box(scores)
        })
    });
    let scores: Vec<f64> = (0..tokens).map(|i| ((i * 31) % 97) as f64).collect();
    let draws: Vec<u64> = (0..tokens as u64).map(|i| i.wrapping_mul(0x9e37)).collect();
    c.bench_function("fts select 13 of 128", |b| {
        b.iter(|| black_box(select(&scores, 13, Selector::HighFreq, &draws)))
    });
}

fn sampler_update(c: &mut Criterion) {
    // One diffusion tick of a 256-token step at MAR's token size.
    let chain = NoiseSchedule::cosine(1000).respace(100, None);
    let channels = 16;
    let rows = 256;
    let start: Vec<f32> = (0..rows * channels)
        .map(|i| (i % 13) as f32 / 13.0)
        .collect();
    let eps: Vec<f64> = (0..channels).map(|i| i as f64 / 16.0 - 0.5).collect();
    let v: Vec<f32> = (0..channels).map(|i| i as f32 / 16.0 - 0.5).collect();
    let noise: Vec<f32> = (0..channels).map(|i| (i as f32 - 8.0) / 8.0).collect();
    // Each iteration updates the same starting state (updated in place
    // again and again, it grew past f32's range within a few thousand
    // iterations, and the bench timed infinities).
    let mut x = start.clone();
    c.bench_function("sampler update 256 tokens x 16 channels", |b| {
        b.iter(|| {
            x.copy_from_slice(&start);
            for xr in x.chunks_mut(channels) {
                chain.step(
                    50,
                    Variance::LearnedRange,
                    xr,
                    black_box(&eps),
                    black_box(&v),
                    black_box(&noise),
                    1.0,
                );
            }
            black_box(&x);
        })
    });
    assert!(
        x.iter().all(|v| v.is_finite()),
        "the timed update stays finite"
    );
}

fn engine_batch(c: &mut Criterion) {
    // Everything the engine does around the model calls, on a model whose
    // calls cost almost nothing: gathers, layout, FTS, sampler, noise.
    let s = schedule("gtr");
    let planner = Planner::new(&s, Grid::MAR).expect("plan");
    let jobs: Vec<ImageJob> = (0..8u64)
        .map(|i| ImageJob {
            index: i,
            seed: image_seed(0, i),
            label: (i % 10) as i64,
        })
        .collect();
    let plans: Vec<_> = jobs
        .iter()
        .map(|j| planner.plan_with(j.seed, &options()).expect("plan"))
        .collect();
    let mut engine = Engine::new(FakeModel::new());
    let mut group = c.benchmark_group("engine");
    group.sample_size(10);
    group.bench_function("gtr batch of 8 on the fake model", |b| {
        b.iter(|| {
            black_box(
                engine
                    .generate(&plans, &jobs, &SeededNoise, |_, _| {})
                    .expect("generate"),
            )
        })
    });
    group.finish();
}

fn png_encoding(c: &mut Criterion) {
    // A batch of 64 MAR-B-sized images (256×256 RGB) of smooth content.
    let pixels = ndarray::Array4::from_shape_fn((64, 256, 256, 3), |(i, y, x, ch)| {
        ((x * (ch + 1) + y * 3 + i * 7) % 256) as u8
    });
    let mut group = c.benchmark_group("png");
    group.sample_size(10);
    group.bench_function("64 images 256x256 one by one", |b| {
        b.iter(|| {
            let pngs: Vec<Vec<u8>> = (0..64)
                .map(|k| encode_png(&pixels.index_axis(ndarray::Axis(0), k).to_owned()))
                .collect();
            black_box(pngs)
        })
    });
    group.bench_function("64 images 256x256 encode_batch", |b| {
        b.iter(|| black_box(encode_batch(pixels.view())))
    });
    group.finish();
}

criterion_group!(
    benches,
    planning,
    fts_scoring,
    sampler_update,
    engine_batch,
    png_encoding
);
criterion_main!(benches);

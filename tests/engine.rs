//! The engine on the deterministic fake model: batching never changes an
//! image, seeds reproduce, calls are batched as promised, replay is honoured.

mod common;

use std::collections::BTreeMap;

use common::image_jobs as jobs;

use gtr_run::engine::fake::FakeModel;
use gtr_run::engine::{
    Engine, EngineError, ImageJob, ModelError, Replay, SPLIT_TICK_ROWS, SeededNoise,
};
use gtr_run::grid::Grid;
use gtr_run::plan::{Plan, PlanOptions, Planner};
use gtr_run::schedule::{Schedule, Source};
use ndarray::{Array2, Array3, Array4, Axis};

fn schedule(text: &str) -> Schedule {
    Schedule::from_source(Source::new("t.gtr", text), &BTreeMap::new()).unwrap()
}

fn preset(name: &str) -> Schedule {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schedules")
        .join(name);
    Schedule::from_file(&path, &BTreeMap::new()).unwrap()
}

fn plans(s: &Schedule, jobs: &[ImageJob]) -> Vec<Plan> {
    let planner = Planner::new(s, Grid::MAR).unwrap();
    let opts = PlanOptions {
        default_cfg: Some(2.0),
        ..PlanOptions::default()
    };
    jobs.iter()
        .map(|j| planner.plan_with(j.seed, &opts).unwrap())
        .collect()
}

fn run(s: &Schedule, jobs: &[ImageJob]) -> Array3<f32> {
    let mut engine = Engine::new(FakeModel::new());
    engine
        .generate(&plans(s, jobs), jobs, &SeededNoise, |_, _| {})
        .unwrap()
        .tokens
}

#[test]
fn batch_size_never_changes_an_image() {
    let s = preset("gtr-fast.gtr");
    let all = jobs(11, 0..4);
    let together = run(&s, &all);
    for (k, job) in all.iter().enumerate() {
        let alone = run(&s, std::slice::from_ref(job));
        assert_eq!(
            alone.index_axis(Axis(0), 0),
            together.index_axis(Axis(0), k),
            "image {k}"
        );
    }
    // A batch starting elsewhere gives the same images for the same indices.
    let later = run(&s, &all[2..]);
    assert_eq!(
        later.index_axis(Axis(0), 0),
        together.index_axis(Axis(0), 2)
    );
}

#[test]
fn same_seed_same_tokens_other_seed_other_tokens() {
    let s = preset("mar-8.gtr");
    assert_eq!(run(&s, &jobs(3, 0..2)), run(&s, &jobs(3, 0..2)));
    assert_ne!(run(&s, &jobs(3, 0..2)), run(&s, &jobs(4, 0..2)));
}

/// FTS `random` draws its detail tokens from each image's selection
/// stream: the planned count per step, the same tokens for the same seed,
/// other tokens for another seed, and not the tokens `high_freq` picks.
/// The orders are raster, so that only the selection depends on the seed.
#[test]
fn random_fts_draws_its_tokens_from_the_image_seed() {
    let text = |selector: &str| {
        format!(
            "partition checker(2)
             cfg constant 2
             diffusion 4
             stage a {{ tokens S1 order raster steps 2 }}
             stage b {{ tokens rest order raster steps 2 fts top 25% by {selector} -> 8 }}"
        )
    };
    let detail = |selector: &str, seed: u64| {
        let s = schedule(&text(selector));
        let jobs = jobs(seed, 0..2);
        let mut engine = Engine::new(FakeModel::new());
        engine
            .generate(&plans(&s, &jobs), &jobs, &SeededNoise, |_, _| {})
            .unwrap()
            .detail
    };
    let random = detail("random", 5);
    // Stage b's 128 tokens in 2 steps of 64, a quarter of each: 2 x 16.
    for (img, row) in random.outer_iter().enumerate() {
        assert_eq!(row.iter().filter(|&&d| d).count(), 32, "image {img}");
    }
    assert_ne!(random.row(0), random.row(1), "each image its own draws");
    assert_eq!(random, detail("random", 5), "same seed");
    assert_ne!(random, detail("random", 6), "other seed");
    assert_ne!(random, detail("high_freq", 5), "not the high_freq tokens");
}

/// One image (seed 1, class 2) of the schedule `text` on the fake model's
/// 4x4 grid: its plan, the engine after it, and its output.
fn one_image_on_4x4(text: &str) -> (Plan, Engine<FakeModel>, gtr_run::engine::BatchOutput) {
    let s = schedule(text);
    let job = ImageJob {
        index: 0,
        seed: 1,
        label: 2,
    };
    let plan = Planner::new(&s, Grid::new(4, 4))
        .unwrap()
        .plan(job.seed)
        .unwrap();
    let mut engine = Engine::new(FakeModel::with_grid(Grid::new(4, 4)));
    let out = engine
        .generate(std::slice::from_ref(&plan), &[job], &SeededNoise, |_, _| {})
        .unwrap();
    (plan, engine, out)
}

#[test]
fn one_diffusion_call_per_tick_of_the_longest_chain() {
    // 2 steps of 8 tokens; FTS gives 2 tokens 12 steps, the rest 5: 12 calls
    // per step, not 17; guided, so every call carries both halves.
    let (_, engine, out) = one_image_on_4x4(
        "grid 4x4\ncfg constant 3\nstage a { tokens all  steps 2  diffusion 5  fts top 25% by high_freq -> 12 }",
    );
    let fake = &engine.model;
    assert_eq!(fake.backbone_calls, 2);
    assert_eq!(fake.diffusion_calls, 24);
    // First tick: 8 rows × 2 halves; after tick 5 only the 2 detail rows remain.
    assert_eq!(fake.diffusion_rows[0], 16);
    assert_eq!(fake.diffusion_rows[5], 4);
    assert_eq!(fake.diffusion_rows[11], 4);
    assert_eq!(out.detail.iter().filter(|&&d| d).count(), 4);
    let stats = &engine.stats.steps;
    assert_eq!(stats[0].diffusion_calls, 12);
    assert_eq!(stats[0].diffusion_rows, 2 * (8 * 5 + 2 * 7));
}

/// `clip_timesteps`: each token runs its clipped chain's iterations (50
/// steps clipped at 950 are 48), as many as the cost model counts.
#[test]
fn clipped_chains_run_their_own_length() {
    let (plan, engine, _) = one_image_on_4x4(
        "grid 4x4\nclip_timesteps 950\nstage a { tokens all  steps 2  diffusion 50 }",
    );
    assert_eq!(engine.model.diffusion_calls, 2 * 48);
    let spec = gtr_run::cost::ModelSpec::builtin("mar-b").unwrap();
    let rows: u64 = engine.stats.steps.iter().map(|s| s.diffusion_rows).sum();
    assert_eq!(
        rows,
        gtr_run::cost::plan_cost(&plan, &spec).diffusion_evaluations
    );
}

#[test]
fn a_split_head_gives_the_same_tokens_with_its_condition_part_once_per_group_of_ticks() {
    let s = preset("mar-8.gtr");
    let all = jobs(5, 0..2);
    let mut engine = Engine::new(FakeModel::new().with_split_head(usize::MAX));
    let split = engine
        .generate(&plans(&s, &all), &all, &SeededNoise, |_, _| {})
        .unwrap();
    assert_eq!(split.tokens, run(&s, &all), "split head against whole head");
    let fake = &engine.model;
    // One state call per tick, as the whole head; the condition part covers
    // the same rows in calls of whole ticks, none over 256 rows, and fewer
    // calls (steps of few tokens share one call among many ticks).
    assert_eq!(fake.state_rows, fake.diffusion_rows, "every tick split");
    let state_rows: usize = fake.state_rows.iter().sum();
    assert_eq!(fake.condition_rows.iter().sum::<usize>(), state_rows);
    assert!(
        fake.condition_rows.iter().all(|&r| r <= 256),
        "{:?}",
        fake.condition_rows
    );
    let steps = engine.stats.steps.len();
    assert!(
        fake.condition_rows.len() > steps && fake.condition_rows.len() < fake.diffusion_calls,
        "{} condition calls for {} state calls in {steps} steps",
        fake.condition_rows.len(),
        fake.diffusion_calls
    );
    let calls: u64 = engine.stats.steps.iter().map(|s| s.diffusion_calls).sum();
    assert_eq!(
        calls as usize,
        fake.diffusion_calls + fake.condition_rows.len()
    );
    // A group's rows are let go before the next group is made.
    assert_eq!(fake.condition_outputs.most(), 1);
}

#[test]
fn a_split_head_whose_condition_part_gives_too_few_rows_is_an_error_naming_it() {
    let s = preset("mar-8.gtr");
    let all = jobs(5, 0..1);
    let mut model = FakeModel::new().with_split_head(usize::MAX);
    model.short_condition = true;
    let mut engine = Engine::new(model);
    let err = engine
        .generate(&plans(&s, &all), &all, &SeededNoise, |_, _| {})
        .unwrap_err();
    let EngineError::Model {
        step: 0,
        source: ModelError::Shape { graph, tensor, .. },
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!((*graph, tensor.as_str()), ("diffusion_condition", "cond"));
    assert!(engine.model.state_rows.is_empty(), "no state call after it");
}

/// Non-finite state output made from non-finite condition rows names the
/// condition part, not the state part that only passed them on.
#[test]
fn non_finite_condition_rows_are_blamed_on_the_condition_part() {
    let s = preset("mar-8.gtr");
    let all = jobs(5, 0..1);
    let mut model = FakeModel::new().with_split_head(usize::MAX);
    model.nan_condition = true;
    let mut engine = Engine::new(model);
    let err = engine
        .generate(&plans(&s, &all), &all, &SeededNoise, |_, _| {})
        .unwrap_err();
    let EngineError::NonFinite {
        graph,
        what,
        step: 0,
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(*graph, "diffusion_condition", "{err}");
    assert!(what.contains("in `cond`"), "{err}");
}

#[test]
fn a_split_head_runs_whole_in_steps_too_wide_to_share_a_call() {
    // One step of all 16 tokens, guided: 32 rows a tick, so 8 ticks share
    // a condition call of 256 rows; 2 images make 64 rows a tick: whole.
    let s = schedule("grid 4x4\ncfg constant 3\nstage a { tokens all  steps 1  diffusion 6 }");
    let planner = Planner::new(&s, Grid::new(4, 4)).unwrap();
    for (images, split) in [(1, true), (2, false)] {
        let jobs = jobs(3, 0..images);
        let plans: Vec<Plan> = jobs.iter().map(|j| planner.plan(j.seed).unwrap()).collect();
        let model = FakeModel::with_grid(Grid::new(4, 4)).with_split_head(SPLIT_TICK_ROWS);
        let mut engine = Engine::new(model);
        engine
            .generate(&plans, &jobs, &SeededNoise, |_, _| {})
            .unwrap();
        let fake = &engine.model;
        assert_eq!(fake.diffusion_calls, 6, "{images} images");
        assert_eq!(!fake.condition_rows.is_empty(), split, "{images} images");
        assert_eq!(
            fake.state_rows.len(),
            if split { 6 } else { 0 },
            "{images} images"
        );
    }
}

#[test]
fn unguided_steps_run_single_rows() {
    let s = schedule("grid 4x4\ncfg none\nstage a { tokens all  steps 2  diffusion 3 }");
    let plan = Planner::new(&s, Grid::new(4, 4)).unwrap().plan(0).unwrap();
    let job = ImageJob {
        index: 0,
        seed: 1,
        label: 2,
    };
    let mut engine = Engine::new(FakeModel::with_grid(Grid::new(4, 4)));
    engine
        .generate(&[plan], &[job], &SeededNoise, |_, _| {})
        .unwrap();
    assert_eq!(engine.model.diffusion_rows, vec![8; 6]);
}

#[test]
fn replay_sets_order_and_noise() {
    let s = preset("mar-8.gtr");
    let job = jobs(5, 0..1);
    let plan = plans(&s, &job);
    let (l, c) = (256, 4);
    let mut order = Array2::<i64>::zeros((1, l));
    for t in 0..l {
        order[[0, t]] = (l - 1 - t) as i64; // reverse raster
    }
    let replay = Replay {
        order,
        init_noise: Array3::from_elem((1, l, c), 0.25),
        step_noise: Array4::zeros((1, l, 100, c)),
    };
    replay.check().unwrap();
    let mut engine = Engine::new(FakeModel::new());
    let a = engine.generate(&plan, &job, &replay, |_, _| {}).unwrap();
    let mut engine = Engine::new(FakeModel::new());
    let b = engine.generate(&plan, &job, &replay, |_, _| {}).unwrap();
    assert_eq!(a.tokens, b.tokens);
    // Each step reveals the replay's next tokens (listed ascending), not
    // the plan's own.
    let mut want = Vec::new();
    let mut reversed = (0..l).rev();
    for step in &plan[0].steps {
        let mut tokens: Vec<usize> = reversed.by_ref().take(step.tokens.len()).collect();
        tokens.sort_unstable();
        want.extend(tokens);
    }
    assert_eq!(a.reveal_orders[0], want);
    assert_ne!(
        plan[0].steps[0].tokens,
        want[..plan[0].steps[0].tokens.len()]
    );
    // The initial noise is the replay's.
    let other_init = Replay {
        init_noise: Array3::from_elem((1, l, c), -0.5),
        ..replay.clone()
    };
    let mut engine = Engine::new(FakeModel::new());
    let moved = engine
        .generate(&plan, &job, &other_init, |_, _| {})
        .unwrap();
    assert_ne!(a.tokens, moved.tokens);
    assert_eq!(moved.reveal_orders, a.reveal_orders);
    // Zero step noise and equal initial noise: tokens differ only through
    // their position and context, never through a random draw.
    let seeded = engine
        .generate(&plan, &job, &SeededNoise, |_, _| {})
        .unwrap();
    assert_ne!(a.tokens, seeded.tokens);
    // Too little step noise for the chains is refused, not indexed out of bounds.
    let short = Replay {
        step_noise: Array4::zeros((1, l, 10, c)),
        ..replay
    };
    let err = engine.generate(&plan, &job, &short, |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("needs 100"), "{err}");
}

#[test]
fn out_of_range_classes_and_foreign_grids_are_refused() {
    let s = preset("mar-8.gtr");
    let mut bad = jobs(0, 0..1);
    bad[0].label = 11;
    let mut engine = Engine::new(FakeModel::new());
    let err = engine
        .generate(&plans(&s, &bad), &bad, &SeededNoise, |_, _| {})
        .unwrap_err();
    assert!(
        err.to_string().contains("class 11 is out of range"),
        "{err}"
    );
    let p = Planner::new(&s, Grid::new(8, 8)).unwrap().plan(0).unwrap();
    let ok = jobs(0, 0..1);
    let err = engine
        .generate(&[p], &ok, &SeededNoise, |_, _| {})
        .unwrap_err();
    assert!(err.to_string().contains("8x8 grid"), "{err}");
}

#[test]
fn every_preset_runs_on_the_fake_model() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schedules");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let s = Schedule::from_file(&path, &BTreeMap::new()).unwrap();
        let job = jobs(1, 0..1);
        let tokens = run(&s, &job);
        assert!(tokens.iter().all(|v| v.is_finite()), "{}", path.display());
        assert!(tokens.iter().any(|&v| v != 0.0), "{}", path.display());
    }
}

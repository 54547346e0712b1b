//! Adaptive orders (`order adaptive by high_freq|low_freq`): planned as
//! step sizes with a provisional order, chosen by the engine from each
//! step's backbone pass, deterministic per seed, overridden by a replay,
//! and priced by the cost model.

mod common;

use std::collections::BTreeMap;

use gtr_run::cost::{ModelSpec, plan_cost};
use gtr_run::engine::fake::FakeModel;
use gtr_run::engine::{BatchOutput, Engine, ImageJob, NoiseSource, Replay, SeededNoise};
use gtr_run::grid::Grid;
use gtr_run::plan::{Plan, Planner};
use gtr_run::schedule::{Schedule, Selector, Source};
use ndarray::{Array2, Array3, Array4};

/// An adaptive scaffold on the checkerboard, then a random fill.
fn schedule(selector: &str) -> Schedule {
    let text = format!(
        "partition checker(2)
         cfg constant 2
         diffusion 6
         stage scaffold {{ tokens S1  order adaptive by {selector}  steps [3, 5, 8, 16, 32, 64] }}
         stage fill {{ tokens rest  order random  steps 4  fts top 10% by high_freq -> 12 }}"
    );
    Schedule::from_source(Source::new("adaptive.gtr", text), &BTreeMap::new()).unwrap()
}

fn jobs(seed: u64, n: u64) -> Vec<ImageJob> {
    common::image_jobs(seed, 0..n)
}

fn plans(s: &Schedule, jobs: &[ImageJob]) -> Vec<Plan> {
    let planner = Planner::new(s, Grid::MAR).unwrap();
    jobs.iter().map(|j| planner.plan(j.seed).unwrap()).collect()
}

fn run(s: &Schedule, jobs: &[ImageJob], noise: &dyn NoiseSource) -> BatchOutput {
    let mut engine = Engine::new(FakeModel::new());
    engine
        .generate(&plans(s, jobs), jobs, noise, |_, _| {})
        .unwrap()
}

/// Image `img`'s tokens of step `k` in `out`.
fn step_tokens<'a>(plan: &Plan, out: &'a BatchOutput, img: usize, k: usize) -> &'a [usize] {
    let step = &plan.steps[k];
    &out.reveal_orders[img][step.known_before..step.known_before + step.tokens.len()]
}

#[test]
fn the_plan_marks_adaptive_steps_and_keeps_a_provisional_order() {
    let s = schedule("high_freq");
    let plan = Planner::new(&s, Grid::MAR).unwrap().plan(0).unwrap();
    plan.check_invariants().unwrap();
    assert!(plan.is_adaptive());
    for step in &plan.steps {
        let want = (step.stage == 0).then_some(Selector::HighFreq);
        assert_eq!(step.adaptive, want);
    }
    // The provisional tokens are the stage's, in the planned counts.
    let counts: Vec<usize> = plan.steps[..6].iter().map(|s| s.tokens.len()).collect();
    assert_eq!(counts, [3, 5, 8, 16, 32, 64]);
    let mut scaffold = plan.stage_sequence(0);
    scaffold.sort_unstable();
    let (i, j) = (|t: usize| t / 16, |t: usize| t % 16);
    assert!(scaffold.iter().all(|&t| (i(t) + j(t)) % 2 == 0));
    assert_eq!(scaffold.len(), 128);
}

#[test]
fn the_engine_chooses_each_step_inside_the_stage_deterministically() {
    let s = schedule("high_freq");
    let jobs = jobs(5, 3);
    let plans = plans(&s, &jobs);
    let out = run(&s, &jobs, &SeededNoise);
    let again = run(&s, &jobs, &SeededNoise);
    assert_eq!(out.tokens, again.tokens, "same seed, same tokens");
    assert_eq!(out.reveal_orders, again.reveal_orders);
    let mut differs = 0;
    for (img, plan) in plans.iter().enumerate() {
        let order = &out.reveal_orders[img];
        let mut all = order.clone();
        all.sort_unstable();
        assert_eq!(all, (0..256).collect::<Vec<_>>(), "every token once");
        let stage: Vec<usize> = plan.stage_sequence(0);
        for k in 0..plan.steps.len() {
            let chosen = step_tokens(plan, &out, img, k);
            let step = &plan.steps[k];
            assert_eq!(chosen.len(), step.tokens.len(), "the step's count");
            assert!(chosen.windows(2).all(|w| w[0] < w[1]), "ascending");
            if step.adaptive.is_some() {
                assert!(chosen.iter().all(|t| stage.contains(t)), "inside the stage");
                differs += usize::from(chosen != step.tokens.as_slice());
            } else {
                assert_eq!(chosen, step.tokens.as_slice(), "planned steps as planned");
            }
        }
    }
    assert!(differs > 0, "the choice is not the provisional order");
    // The other selector chooses otherwise.
    let low = run(&schedule("low_freq"), &jobs, &SeededNoise);
    assert_ne!(low.reveal_orders, out.reveal_orders);
}

#[test]
fn batching_never_changes_an_adaptive_image() {
    let s = schedule("high_freq");
    let all = jobs(2, 3);
    let together = run(&s, &all, &SeededNoise);
    for (k, job) in all.iter().enumerate() {
        let alone = run(&s, std::slice::from_ref(job), &SeededNoise);
        assert_eq!(alone.reveal_orders[0], together.reveal_orders[k]);
        assert_eq!(
            alone.tokens.index_axis(ndarray::Axis(0), 0),
            together.tokens.index_axis(ndarray::Axis(0), k)
        );
    }
}

#[test]
fn a_replay_orders_adaptive_steps_too() {
    let s = schedule("high_freq");
    let jobs = jobs(0, 2);
    let plans = plans(&s, &jobs);
    // Each image's replayed order: the scaffold tokens descending, then the rest.
    let order: Vec<Vec<usize>> = plans
        .iter()
        .map(|p| {
            let mut scaffold = p.stage_sequence(0);
            scaffold.sort_unstable_by(|a, b| b.cmp(a));
            scaffold.extend(p.stage_sequence(1));
            scaffold
        })
        .collect();
    let replay = Replay {
        order: Array2::from_shape_fn((2, 256), |(b, k)| order[b][k] as i64),
        init_noise: Array3::from_shape_fn((2, 256, 4), |(b, t, c)| {
            ((b * 7 + t * 3 + c) as f32 * 0.1).sin()
        }),
        step_noise: Array4::from_shape_fn((2, 256, 12, 4), |(b, t, k, c)| {
            ((b + t * 5 + k * 3 + c) as f32 * 0.2).cos()
        }),
    };
    let out = run(&s, &jobs, &replay);
    for (img, plan) in plans.iter().enumerate() {
        for k in 0..plan.steps.len() {
            let step = &plan.steps[k];
            let mut want =
                order[img][step.known_before..step.known_before + step.tokens.len()].to_vec();
            want.sort_unstable();
            assert_eq!(step_tokens(plan, &out, img, k), want.as_slice(), "step {k}");
        }
    }
}

#[test]
fn the_cost_counts_every_masked_candidate_of_each_adaptive_step() {
    let adaptive = schedule("high_freq");
    let plan = Planner::new(&adaptive, Grid::MAR).unwrap().plan(0).unwrap();
    let spec = ModelSpec::builtin("mar-b").unwrap();
    let cost = plan_cost(&plan, &spec);
    // Steps of 3, 5, 8, 16, 32, 64: 128 candidates, then 125, 120, 112, 96, 64.
    assert_eq!(cost.adaptive_candidates, 128 + 125 + 120 + 112 + 96 + 64);
    assert_eq!(cost.scoring_flops, 645.0 * spec.score_flops());
    // D = 768: an FFT of 5·768·log2(768) plus 5 per frequency.
    let d = 768.0f64;
    assert!((spec.score_flops() - (5.0 * d * d.log2() + 5.0 * 384.0)).abs() < 1e-6);
    // The networks' work is that of the same plan without the adaptive order.
    let text = "partition checker(2)
         cfg constant 2
         diffusion 6
         stage scaffold { tokens S1  order random  steps [3, 5, 8, 16, 32, 64] }
         stage fill { tokens rest  order random  steps 4  fts top 10% by high_freq -> 12 }";
    let fixed = Schedule::from_source(Source::new("f.gtr", text), &BTreeMap::new()).unwrap();
    let base = plan_cost(
        &Planner::new(&fixed, Grid::MAR).unwrap().plan(0).unwrap(),
        &spec,
    );
    assert_eq!(base.adaptive_candidates, 0);
    assert_eq!(cost.encoder_flops, base.encoder_flops);
    assert_eq!(cost.decoder_flops, base.decoder_flops);
    assert_eq!(cost.diffusion_flops, base.diffusion_flops);
    assert_eq!(
        cost.total_flops(),
        base.total_flops() + cost.scoring_flops,
        "scoring is in the total"
    );
    // Plans without adaptive steps serialize as before: no new fields.
    let json = serde_json::to_value(&base).unwrap();
    assert!(json.get("adaptive_candidates").is_none() && json.get("scoring_flops").is_none());
}

#[test]
fn reports_say_a_step_is_adaptive() {
    let s = schedule("high_freq");
    let plan = Planner::new(&s, Grid::MAR).unwrap().plan(0).unwrap();
    let grid = gtr_run::report::text::step_grid(&plan);
    assert!(grid.contains(" ?"), "{grid}");
    assert!(grid.contains("order adaptive by high_freq"), "{grid}");
    let table = gtr_run::report::text::step_table(&plan);
    assert!(table.contains("     3*"), "{table}");
    let json = gtr_run::report::json::plan_json(&s, &plan, None);
    let first = &json["steps"][0];
    assert!(first["tokens"].is_null(), "{first}");
    assert_eq!(first["count"], 3);
    assert_eq!(first["adaptive"], "high_freq");
    let last = &json["steps"][6];
    assert!(last["tokens"].is_array() && last.get("adaptive").is_none());
}

/// The fake model's z at token t is `sin(t·(k+1)·0.37 + label/2)·0.8 +
/// context`; the context moves only the DC term, which eq. 5 leaves out, so
/// a token's score is fixed and the adaptive stage reveals its tokens in
/// descending score order (`high_freq`), step by step.
#[test]
fn adaptive_steps_reveal_the_top_scores() {
    let s = schedule("high_freq");
    let jobs = jobs(9, 2);
    let plans = plans(&s, &jobs);
    let out = run(&s, &jobs, &SeededNoise);
    let mut scorer = gtr_run::sampler::fts::FtsScorer::new(8);
    for (img, plan) in plans.iter().enumerate() {
        let label = jobs[img].label as f32;
        let score = |t: usize, scorer: &mut gtr_run::sampler::fts::FtsScorer| {
            let z: Vec<f32> = (0..8)
                .map(|k| ((t * (k + 1)) as f32 * 0.37 + label * 0.5).sin() * 0.8)
                .collect();
            scorer.score(&z)
        };
        let mut ranked = plan.stage_sequence(0);
        let scores: BTreeMap<usize, f64> =
            ranked.iter().map(|&t| (t, score(t, &mut scorer))).collect();
        ranked.sort_by(|a, b| scores[b].total_cmp(&scores[a]));
        let mut cursor = 0;
        for k in 0..6 {
            let n = plan.steps[k].tokens.len();
            let mut want = ranked[cursor..cursor + n].to_vec();
            want.sort_unstable();
            cursor += n;
            let got = step_tokens(plan, &out, img, k);
            // Scores within 1e-4 of the cut may fall either side (f32 z).
            let cut = scores[&ranked[cursor - 1]];
            for (&g, &w) in got.iter().zip(&want) {
                if g != w {
                    assert!((scores[&g] - cut).abs() < 1e-4, "image {img} step {k}");
                }
            }
        }
    }
}

//! The engine on ONNX Runtime against golden tensors from two independent
//! implementations of MAR's sampler, run on the same weights with injected
//! orders and noise: numpy (models/fixtures/reference_sampler.py, bundle
//! `tiny`) and PyTorch (models/torch/reference_sampler.py, bundle
//! `torch-small`, exported by models/export_mar.py). No Python runs here.

use std::path::{Path, PathBuf};

use gtr_run::backend::{ChainRunner, Device, HeadRunner, LoadOptions, OrtModel};
use gtr_run::bundle::Bundle;
use gtr_run::engine::{Engine, GraphStats, ImageJob, MarModel, Replay};
use gtr_run::grid::Grid;
use gtr_run::plan::{DetailRule, Plan, PlanStage, PlanStep, round_half_even};
use gtr_run::sampler::NoiseSchedule;
use gtr_run::schedule::Selector;
use ndarray::{Array1, Array2, Array3, Array4, ArrayD};
use ndarray_npy::NpzReader;

fn fixtures() -> PathBuf {
    bundle("tiny")
}

fn bundle(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/fixtures")
        .join(name)
}

struct Golden(NpzReader<std::fs::File>);

impl Golden {
    fn open(name: &str) -> Golden {
        Golden::open_in(&fixtures(), name)
    }

    fn open_in(dir: &Path, name: &str) -> Golden {
        let f = std::fs::File::open(dir.join("golden").join(name)).unwrap();
        Golden(NpzReader::new(f).unwrap())
    }
    fn get<A: ndarray_npy::ReadableElement, D: ndarray::Dimension>(
        &mut self,
        key: &str,
    ) -> ndarray::Array<A, D> {
        self.0.by_name(key).unwrap_or_else(|e| panic!("{key}: {e}"))
    }
}

/// One plan per image from the golden case's step table and orders.
fn plans(g: &mut Golden) -> (Vec<Plan>, Array2<i64>, Array1<i64>) {
    let order: Array2<i64> = g.get("order");
    let labels: Array1<i64> = g.get("labels");
    let sizes: Array1<i64> = g.get("step_sizes");
    let base: Array1<i64> = g.get("diffusion_steps");
    let frac: Array1<f64> = g.get("detail_fraction");
    let dsteps: Array1<i64> = g.get("detail_steps");
    let dsel: Array1<i64> = g.get("detail_selector");
    let cfg: Array1<f64> = g.get("cfg");
    let temp: Array1<f64> = g.get("temperature");
    let plans = (0..order.nrows())
        .map(|b| {
            let mut known = 0usize;
            let steps = (0..sizes.len())
                .map(|s| {
                    let n = sizes[s] as usize;
                    let mut tokens: Vec<usize> = order
                        .row(b)
                        .iter()
                        .skip(known)
                        .take(n)
                        .map(|&t| t as usize)
                        .collect();
                    tokens.sort_unstable();
                    let selector = match dsel[s] {
                        0 => None,
                        1 => Some(Selector::HighFreq),
                        2 => Some(Selector::LowFreq),
                        _ => Some(Selector::All),
                    };
                    let detail = selector.map(|selector| DetailRule {
                        fraction: if selector == Selector::All {
                            1.0
                        } else {
                            frac[s]
                        },
                        steps: dsteps[s] as u32,
                        selector,
                        count: if selector == Selector::All {
                            n
                        } else {
                            round_half_even(frac[s] * n as f64).clamp(1.0, n as f64) as usize
                        },
                    });
                    let step = PlanStep {
                        stage: 0,
                        tokens,
                        adaptive: None,
                        known_before: known,
                        diffusion_steps: base[s] as u32,
                        detail,
                        cfg: (!cfg[s].is_nan()).then_some(cfg[s]),
                        temperature: temp[s],
                        clip_timesteps: None,
                    };
                    known += n;
                    step
                })
                .collect();
            Plan {
                grid: Grid::MAR,
                seed: 0,
                stages: vec![PlanStage {
                    name: "golden".into(),
                    tokens: 256,
                    steps: sizes.len(),
                }],
                steps,
            }
        })
        .collect();
    (plans, order, labels)
}

/// The largest |a − b| of two arrays of one shape; NaN where either holds
/// a NaN (so no tolerance passes it).
fn max_abs_diff<D: ndarray::Dimension>(
    what: &str,
    a: &ndarray::Array<f32, D>,
    b: &ndarray::Array<f32, D>,
) -> f32 {
    assert_eq!(a.shape(), b.shape(), "{what}: shapes differ");
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| {
            if d.is_nan() || m.is_nan() {
                f32::NAN
            } else {
                m.max(d)
            }
        })
}

fn check_case(name: &str) {
    check_case_in(&fixtures(), name);
}

fn check_case_in(dir: &Path, name: &str) -> Vec<GraphStats> {
    let tol = Tolerance {
        values: 1e-4,
        off_by_one_per_mille: 1,
    };
    check_case_on(dir, dir, name, tol, None)
}

/// How far a run may be from a golden case.
struct Tolerance {
    /// Largest |Δ| of tokens and of VAE outputs.
    values: f32,
    /// Pixels may differ by one level (rounding), in at most this many per 1000.
    off_by_one_per_mille: usize,
}

/// Runs golden case `name` of `golden_dir` on the bundle in `dir`, its
/// chains where `runner` says (`None`: the model as loaded); pixels never
/// differ by more than one level. Returns the graphs' call counts.
fn check_case_on(
    dir: &Path,
    golden_dir: &Path,
    name: &str,
    tol: Tolerance,
    runner: Option<ChainRunner>,
) -> Vec<GraphStats> {
    let bundle = Bundle::open(dir).unwrap();
    let model = match runner {
        None => OrtModel::load(&bundle, Device::Cpu, Some(1)).unwrap(),
        Some(runner) => {
            let options = LoadOptions {
                tick_graph: runner == ChainRunner::Ticks,
                ..LoadOptions::new(&bundle, Device::Cpu, Some(1))
            };
            let model = OrtModel::load_with(&bundle, &options).unwrap();
            model.run_chains(runner, &bundle).unwrap().0
        }
    };
    check_case_with(model, golden_dir, name, tol)
}

/// [`check_case_on`] with a model loaded by the caller.
fn check_case_with(
    model: OrtModel,
    golden_dir: &Path,
    name: &str,
    tol: Tolerance,
) -> Vec<GraphStats> {
    let mut g = Golden::open_in(golden_dir, name);
    let (plans, order, labels) = plans(&mut g);
    let replay = Replay {
        order,
        init_noise: g.get("init_noise"),
        step_noise: g.get("step_noise"),
    };
    let jobs: Vec<ImageJob> = (0..labels.len())
        .map(|b| ImageJob {
            index: b as u64,
            seed: 7,
            label: labels[b],
        })
        .collect();
    let mut engine = Engine::new(model);
    let out = engine.generate(&plans, &jobs, &replay, |_, _| {}).unwrap();

    let want_tokens: Array3<f32> = g.get("tokens");
    let want_images: Array4<f32> = g.get("images");
    let want_pixels: Array4<u8> = g.get("pixels");
    let want_detail: Array2<bool> = g.get("detail_mask");
    assert_eq!(out.detail, want_detail, "{name}: FTS chose other tokens");
    let dt = max_abs_diff(&format!("{name} tokens"), &out.tokens, &want_tokens);
    let di = max_abs_diff(&format!("{name} images"), &out.images, &want_images);
    assert!(dt <= tol.values, "{name}: tokens differ by {dt}");
    assert!(di <= tol.values, "{name}: images differ by {di}");
    assert_eq!(out.pixels.shape(), want_pixels.shape(), "{name}: pixels");
    let off: Vec<i32> = out
        .pixels
        .iter()
        .zip(want_pixels.iter())
        .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
        .collect();
    assert!(
        off.iter().all(|&d| d <= 1),
        "{name}: pixels differ by more than 1"
    );
    let rounding = off.iter().filter(|&&d| d == 1).count();
    assert!(
        rounding * 1000 <= off.len() * tol.off_by_one_per_mille,
        "{name}: {rounding} of {} pixels differ by one",
        off.len()
    );
    eprintln!(
        "{name}: max |Δtokens| = {dt:.2e}, max |Δimages| = {di:.2e}, {rounding} pixels off by one"
    );
    engine.model.graph_stats()
}

/// Golden case `name` through bundle `tiny-sampler` (`tiny`'s graphs plus the
/// sampler graph of models/add_sampler.py): the same images, with one
/// sampler call per MAR step and no head call from the host.
fn check_sampler_case(name: &str) {
    let steps = Golden::open(name)
        .get::<i64, ndarray::Ix1>("step_sizes")
        .len() as u64;
    let stats = check_case_on(
        &bundle("tiny-sampler"),
        &fixtures(),
        name,
        SAMPLER_TOLERANCE,
        Some(ChainRunner::Graph),
    );
    let calls = |graph: &str| stats.iter().find(|g| g.graph == graph).map(|g| g.calls);
    assert_eq!(calls("sampler"), Some(steps), "{name}: sampler calls");
    assert_eq!(
        calls("diffusion"),
        Some(0),
        "{name}: head calls from the host"
    );
}

/// The sampler graph's update runs in f32 (the host's in f64): tokens drift
/// by up to ~8e-4 over a 50-tick chain; pixels stay within one level, and
/// under 1% of them move by one.
const SAMPLER_TOLERANCE: Tolerance = Tolerance {
    values: 2e-3,
    off_by_one_per_mille: 10,
};

#[test]
fn sampler_graph_gtr_schedule_with_cfg_and_high_freq_fts() {
    check_sampler_case("gtr_cfg.npz");
}

#[test]
fn sampler_graph_mar_schedule_without_cfg_with_low_freq_fts() {
    check_sampler_case("mar_nocfg.npz");
}

#[test]
fn sampler_graph_one_step_chains_and_fts_all_unconditional() {
    check_sampler_case("fts_all_t1.npz");
}

/// Golden case `name` through `tiny-sampler`'s tick graph (`--sampler
/// ticks`, on bound tensors, rows padded): the sampler graph's arithmetic
/// per tick, so its tolerance, with one tick-graph call per tick (as many
/// as the host path's head calls) and none of the head from the host.
fn check_tick_case(name: &str) {
    let host = check_case_on(
        &bundle("tiny-sampler"),
        &fixtures(),
        name,
        SAMPLER_TOLERANCE,
        Some(ChainRunner::Host),
    );
    let ticks = check_case_on(
        &bundle("tiny-sampler"),
        &fixtures(),
        name,
        SAMPLER_TOLERANCE,
        Some(ChainRunner::Ticks),
    );
    let calls = |stats: &[GraphStats], graph: &str| {
        stats.iter().find(|g| g.graph == graph).map(|g| g.calls)
    };
    let head_calls = calls(&host, "diffusion").unwrap();
    assert!(head_calls > 0, "{name}: the host path calls the head");
    assert_eq!(
        calls(&ticks, "tick"),
        Some(head_calls),
        "{name}: tick calls"
    );
    assert_eq!(calls(&ticks, "diffusion"), Some(0), "{name}: head calls");
    assert_eq!(calls(&ticks, "sampler"), None, "{name}: sampler loaded");
}

#[test]
fn tick_graph_gtr_schedule_with_cfg_and_high_freq_fts() {
    check_tick_case("gtr_cfg.npz");
}

#[test]
fn tick_graph_mar_schedule_without_cfg_with_low_freq_fts() {
    check_tick_case("mar_nocfg.npz");
}

#[test]
fn tick_graph_one_step_chains_and_fts_all_unconditional() {
    check_tick_case("fts_all_t1.npz");
}

/// Golden case `name` through bundle `tiny-split`: `tiny`'s graphs with its
/// diffusion head cut in two (models/split_head.py, fixture by
/// models/fixtures/make_tiny_split.py), run split in every step (`--head
/// split`). The same draws as the whole head, within the plain tolerance,
/// one state call per tick (as many as the whole head's calls), none of the
/// whole head, and the condition part in fewer calls (one per group of
/// ticks) where a step has more than one tick.
fn check_split_head_case(name: &str) {
    let whole = check_case_in(&fixtures(), name);
    let tol = Tolerance {
        values: 1e-4,
        off_by_one_per_mille: 1,
    };
    let dir = bundle("tiny-split");
    let b = Bundle::open(&dir).unwrap();
    let model = OrtModel::load(&b, Device::Cpu, Some(1))
        .unwrap()
        .run_head(HeadRunner::Split, &b)
        .unwrap();
    let split = check_case_with(model, &fixtures(), name, tol);
    let calls = |stats: &[GraphStats], graph: &str| {
        stats.iter().find(|g| g.graph == graph).map(|g| g.calls)
    };
    let ticks = calls(&whole, "diffusion").unwrap();
    let state = calls(&split, "diffusion_state").unwrap();
    assert_eq!(state, ticks, "{name}: state calls");
    assert_eq!(
        calls(&split, "diffusion"),
        Some(0),
        "{name}: whole head calls"
    );
    let condition = calls(&split, "diffusion_condition").unwrap();
    assert!(
        0 < condition && condition <= state,
        "{name}: {condition} condition calls for {state} state calls"
    );
}

#[test]
fn split_head_gtr_schedule_with_cfg_and_high_freq_fts() {
    check_split_head_case("gtr_cfg.npz");
}

#[test]
fn split_head_mar_schedule_without_cfg_with_low_freq_fts() {
    check_split_head_case("mar_nocfg.npz");
}

#[test]
fn split_head_one_step_chains_and_fts_all_unconditional() {
    check_split_head_case("fts_all_t1.npz");
}

/// Golden case `name` through bundle `tiny-mha`: `tiny`'s encoder and
/// decoder with their attention fused into ONNX Runtime's MultiHeadAttention
/// (models/fuse_attention.py, fixture by models/fixtures/make_tiny_mha.py),
/// its other graphs `tiny`'s. The draws agree to the plain graphs' tolerance.
fn check_fused_attention_case(name: &str) {
    let dir = bundle("tiny-mha");
    for graph in ["encoder.onnx", "decoder.onnx"] {
        let bytes = std::fs::read(dir.join(graph)).unwrap();
        assert!(
            bytes.windows(18).any(|w| w == b"MultiHeadAttention"),
            "{graph} of tiny-mha has no fused attention"
        );
    }
    let tol = Tolerance {
        values: 1e-4,
        off_by_one_per_mille: 1,
    };
    check_case_on(&dir, &fixtures(), name, tol, None);
}

#[test]
fn fused_attention_gtr_schedule_with_cfg_and_high_freq_fts() {
    check_fused_attention_case("gtr_cfg.npz");
}

#[test]
fn fused_attention_mar_schedule_without_cfg_with_low_freq_fts() {
    check_fused_attention_case("mar_nocfg.npz");
}

#[test]
fn gtr_schedule_with_cfg_and_high_freq_fts() {
    check_case("gtr_cfg.npz");
}

#[test]
fn mar_schedule_without_cfg_with_low_freq_fts() {
    check_case("mar_nocfg.npz");
}

#[test]
fn one_step_chains_and_fts_all_unconditional() {
    check_case("fts_all_t1.npz");
}

#[test]
fn torch_reference_gtr_schedule_with_cfg_and_high_freq_fts() {
    check_case_in(&bundle("torch-small"), "gtr_cfg.npz");
}

#[test]
fn torch_reference_mar_schedule_without_cfg() {
    check_case_in(&bundle("torch-small"), "mar_nocfg.npz");
}

#[test]
fn torch_reference_null_labels_and_one_step_chains() {
    check_case_in(&bundle("torch-small"), "null_t1.npz");
}

#[test]
fn respaced_chains_match_the_reference() {
    let mut g = Golden::open("chains.npz");
    let schedule = NoiseSchedule::cosine(1000);
    let acp: ArrayD<f64> = g.get("train_alphas_cumprod");
    for (a, b) in schedule.alphas_cumprod().iter().zip(acp.iter()) {
        assert!((a - b).abs() <= 1e-15 + 1e-12 * b.abs());
    }
    for t in [1usize, 2, 3, 4, 5, 6, 7, 8, 20, 50, 100] {
        let chain = schedule.respace(t, None);
        let map: ArrayD<i64> = g.get(&format!("T{t}_timestep_map"));
        assert_eq!(
            chain.timesteps,
            map.iter().copied().collect::<Vec<_>>(),
            "T={t}"
        );
        for (key, ours) in [
            ("betas", &chain.betas),
            ("alphas_cumprod", &chain.alphas_cumprod),
            ("posterior_variance", &chain.posterior_variance),
            ("coef1", &chain.coef1),
            ("coef2", &chain.coef2),
        ] {
            let theirs: ArrayD<f64> = g.get(&format!("T{t}_{key}"));
            for (a, b) in ours.iter().zip(theirs.iter()) {
                assert!(
                    (a - b).abs() <= 1e-12 * b.abs().max(1e-300),
                    "T={t} {key}: {a} vs {b}"
                );
            }
        }
        if t > 1 {
            let theirs: ArrayD<f64> = g.get(&format!("T{t}_posterior_log_variance_clipped"));
            for (a, b) in chain
                .posterior_log_variance_clipped
                .iter()
                .zip(theirs.iter())
            {
                assert!(
                    (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                    "T={t} plvc: {a} vs {b}"
                );
            }
        }
    }
}

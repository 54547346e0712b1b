//! Schedules compared side by side on one model: speed measured in one
//! interleaved run, analytic cost, and image quality on the bundle's
//! evaluator (a classifier with reference feature statistics).
//!
//! The engine talks to the generator through [`MarModel`]; quality is
//! measured through the separate, equally narrow [`Evaluator`] trait, so a
//! model without an evaluator still gets the speed columns.

pub mod report;
pub mod stats;
pub mod sweep;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;
use std::ops::Range;
use std::path::PathBuf;

use ndarray::{Array2, Axis, concatenate};
use serde::Serialize;

use crate::backend::VaeRunner;
use crate::bundle::Bundle;
use crate::cost::{ModelSpec, plan_cost};
use crate::engine::{Engine, ImageJob, MarModel, ModelError, ModelInfo, SeededNoise};
use crate::plan::{Plan, PlanOptions, Planner};
use crate::rng::image_seed;
use crate::run::pipeline::{self, Batch, BatchSeconds, Making, Receiver, make_batches};
use crate::run::{Classes, VaeDecode};
use crate::schedule::{Schedule, ScheduleError};

pub use stats::{FeatureStats, class_accuracy, classifier_score, frechet_distance, probabilities};

pub use crate::engine::{Evaluator, Scores};

/// One schedule to compare.
#[derive(Debug, Clone)]
pub struct Contender {
    /// How the schedule is named in the table (its file stem).
    pub name: String,
    pub schedule: Schedule,
}

/// Why [`contenders`] refused the schedules.
#[derive(Debug, thiserror::Error)]
pub enum ContenderError {
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// A parameter override that no schedule declares.
    #[error("--set {0}: no schedule given declares a parameter `{0}`")]
    Undeclared(String),
}

/// The schedule files at `paths` as contenders named by their file stems.
/// Each gets the `overrides` among those it declares (the same `--set`
/// applies to every schedule that has the parameter); one that no
/// schedule declares is an error.
pub fn contenders(
    paths: &[PathBuf],
    overrides: &BTreeMap<String, f64>,
) -> Result<Vec<Contender>, ContenderError> {
    let mut used = BTreeSet::new();
    let mut out = Vec::new();
    for path in paths {
        let declared: BTreeMap<String, f64> = {
            let plain = Schedule::from_file(path, &BTreeMap::new())?;
            overrides
                .iter()
                .filter(|(k, _)| plain.params.iter().any(|p| &p.name == *k))
                .map(|(k, v)| (k.clone(), *v))
                .collect()
        };
        used.extend(declared.keys().cloned());
        let schedule = Schedule::from_file(path, &declared)?;
        let stem = path.file_stem().map_or_else(
            || path.display().to_string(),
            |s| s.to_string_lossy().into(),
        );
        // Rows are told apart by name: a second `gtr-fast` is `gtr-fast#2`.
        let mut name = stem.clone();
        let mut k = 1;
        while out.iter().any(|c: &Contender| c.name == name) {
            k += 1;
            name = format!("{stem}#{k}");
        }
        out.push(Contender { name, schedule });
    }
    match overrides.keys().find(|k| !used.contains(*k)) {
        Some(k) => Err(ContenderError::Undeclared(k.clone())),
        None => Ok(out),
    }
}

/// The reference statistics of the bundle's evaluator (`None` when the
/// bundle ships no evaluator). `features` is the evaluator graph's
/// `features` output (its name, and its width where the graph fixes it):
/// a reference of another width is refused here, before any image is made.
pub fn reference_stats(
    bundle: &Bundle,
    features: Option<(&str, usize)>,
) -> Result<Option<FeatureStats>, stats::StatsError> {
    let Some(entry) = &bundle.manifest.evaluator else {
        return Ok(None);
    };
    let path = bundle.dir.join(&entry.reference);
    let stats = FeatureStats::load_npz(&path)?;
    match features {
        Some((tensor, width)) if width != stats.mu.len() => Err(stats::StatsError::Reference {
            path: path.display().to_string(),
            problem: format!(
                "`mu` has {} values, but the evaluator graph {} gives {width} per image in its output `{tensor}` (manifest evaluator.reference and evaluator.outputs.features must belong together)",
                stats.mu.len(),
                entry.file
            ),
        }),
        _ => Ok(Some(stats)),
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct CompareRequest {
    /// Images per schedule and repeat.
    pub num_images: usize,
    pub batch: usize,
    /// Repeat `r` uses seed `seed + r`; the spread over repeats is reported.
    pub seed: u64,
    pub repeats: usize,
    pub options: PlanOptions,
    /// Run one untimed batch of every schedule first.
    pub warm_up: bool,
    /// When each batch's VAE decode runs (`--vae`): with overlap, while
    /// the next batch (the next schedule's turn) samples, and a batch is
    /// timed by its sampling and the part of its decode that was waited
    /// for ([`Comparison::vae_decode`]).
    pub vae: VaeRunner,
}

/// Quality of one schedule's images in one repeat.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Quality {
    pub seed: u64,
    pub frechet_distance: f64,
    /// `None` for unconditional models.
    pub class_accuracy: Option<f64>,
    pub classifier_score: f64,
}

/// One schedule's row of the comparison.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleResult {
    pub name: String,
    pub mar_steps: usize,
    /// Backbone (encoder + decoder) passes per image, both CFG branches.
    pub backbone_passes: u64,
    /// Diffusion-head rows per image, both CFG branches.
    pub diffusion_evaluations: u64,
    pub flops_per_image: f64,
    pub images_timed: usize,
    /// Timed wall seconds (planning + generation, scoring excluded; with
    /// [`Comparison::vae_decode`] `overlap`, of each decode only the part
    /// waited for).
    pub wall_seconds: f64,
    /// Of which inside the runtime's run calls (where the model reports it).
    pub runtime_seconds: f64,
    /// Of which inside model calls as the engine sees them.
    pub model_seconds: f64,
    /// Wall seconds of each interleaved round (the same images for every
    /// schedule), for the spread of the speed-up.
    pub round_seconds: Vec<f64>,
    pub quality: Vec<Quality>,
}

impl ScheduleResult {
    /// Counts a timed batch of `images` that took `seconds`.
    fn add_batch(&mut self, images: usize, seconds: &BatchSeconds) {
        self.images_timed += images;
        self.wall_seconds += seconds.wall();
        self.model_seconds += seconds.model();
        self.runtime_seconds += seconds.runtime();
        self.round_seconds.push(seconds.wall());
    }

    /// Timed wall seconds per image; NaN before any image was timed.
    pub fn seconds_per_image(&self) -> f64 {
        if self.images_timed == 0 {
            return f64::NAN;
        }
        self.wall_seconds / self.images_timed as f64
    }

    /// Share of timed wall time spent outside the runtime's run calls; NaN
    /// before any image was timed.
    pub fn outside_runtime_share(&self) -> f64 {
        if self.images_timed == 0 {
            return f64::NAN;
        }
        (self.wall_seconds - self.runtime_seconds) / self.wall_seconds.max(f64::MIN_POSITIVE)
    }
}

/// Mean and sample standard deviation (0 for one value).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// The comparison of all schedules; row 0 is the baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub model: String,
    pub evaluator: Option<String>,
    pub num_images: usize,
    pub batch: usize,
    pub seed: u64,
    pub repeats: usize,
    pub execution_provider: String,
    /// [`crate::engine::Engine::chain_runner`].
    pub diffusion_chains: String,
    /// The numeric precision the model ran in (`--precision`).
    pub precision: String,
    /// How the batches decoded (`--vae`, decided for this model). With
    /// `overlap`, a row's time is its batches' sampling (planning
    /// included) and the part of their decodes that the next batch's
    /// sampling did not hide; the VAE call's seconds count in the model
    /// and runtime seconds by the same share.
    pub vae_decode: VaeDecode,
    /// Whether every batch of every repeat ran and was scored: false in
    /// what [`compare`] hands its progress function while it runs (rows
    /// not measured yet have `images_timed` 0, a repeat's quality comes
    /// once all its batches are scored).
    pub finished: bool,
    pub schedules: Vec<ScheduleResult>,
}

impl Comparison {
    /// Measured speed-up of row `k` over row 0: timed wall seconds per
    /// image (the same images in a finished comparison; one stopped
    /// partway may have timed a batch more of row 0).
    pub fn speedup(&self, k: usize) -> f64 {
        self.schedules[0].seconds_per_image() / self.schedules[k].seconds_per_image()
    }

    /// The (min, max) of the per-round speed-ups of row `k` over row 0.
    pub fn speedup_range(&self, k: usize) -> (f64, f64) {
        let base = &self.schedules[0].round_seconds;
        self.schedules[k]
            .round_seconds
            .iter()
            .zip(base)
            .map(|(s, b)| b / s)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
                (lo.min(r), hi.max(r))
            })
    }

    /// Analytic (FLOPs) speed-up of row `k` over row 0.
    pub fn flops_speedup(&self, k: usize) -> f64 {
        self.schedules[0].flops_per_image / self.schedules[k].flops_per_image
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("schedule `{name}`")]
    Schedule {
        name: String,
        #[source]
        source: ScheduleError,
    },
    #[error("schedule `{name}` does not fit the model: {problem}")]
    Unfit { name: String, problem: String },
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("evaluator")]
    Evaluator(#[from] ModelError),
    #[error(transparent)]
    Stats(#[from] stats::StatsError),
    #[error("{0}")]
    Invalid(String),
    /// The progress function asked to stop ([`compare`]).
    #[error("stopped before the comparison was finished")]
    Stopped,
    /// What failed while making or scoring one batch, and which batch.
    #[error("schedule `{schedule}`, images {images} of seed {seed}")]
    Batch {
        schedule: String,
        images: String,
        seed: u64,
        #[source]
        source: Box<CompareError>,
    },
}

/// The evaluator and the reference statistics its distances are taken to.
pub struct Scoring<'a> {
    pub evaluator: &'a mut dyn Evaluator,
    pub reference: &'a FeatureStats,
}

/// Per schedule and repeat: the scores of every image.
#[derive(Default)]
struct Collected {
    logits: Vec<Array2<f32>>,
    features: Vec<Array2<f32>>,
}

/// The contenders' planners, each checked against the model before any
/// work; errors name the schedule.
struct Planners<'c> {
    contenders: &'c [Contender],
    planners: Vec<Planner<'c>>,
    options: &'c PlanOptions,
}

impl<'c> Planners<'c> {
    fn new(
        contenders: &'c [Contender],
        info: &ModelInfo,
        req: &'c CompareRequest,
    ) -> Result<Self, CompareError> {
        let unfit = |k: usize| {
            let name = contenders[k].name.clone();
            move |problem| CompareError::Unfit { name, problem }
        };
        let mut planners = Vec::new();
        for c in contenders {
            let schedule_error = |source| CompareError::Schedule {
                name: c.name.clone(),
                source,
            };
            c.schedule
                .check_model_grid(info.grid, &info.name)
                .map_err(schedule_error)?;
            let planner = Planner::new(&c.schedule, info.grid)
                .map_err(|d| schedule_error(ScheduleError::Invalid(Box::new(d))))?;
            planners.push(planner);
        }
        let planners = Planners {
            contenders,
            planners,
            options: &req.options,
        };
        for k in 0..contenders.len() {
            let plan = planners.plan(k, req.seed)?;
            crate::engine::check_plan(info, &plan).map_err(unfit(k))?;
        }
        Ok(planners)
    }

    /// Contender `k`'s plan for an image `seed`.
    fn plan(&self, k: usize, seed: u64) -> Result<Plan, CompareError> {
        self.planners[k]
            .plan_with(seed, self.options)
            .map_err(|d| CompareError::Schedule {
                name: self.contenders[k].name.clone(),
                source: ScheduleError::Invalid(Box::new(d)),
            })
    }

    /// Contender `k`'s plans for `jobs`.
    fn plans(&self, k: usize, jobs: &[ImageJob]) -> Result<Vec<Plan>, CompareError> {
        jobs.iter().map(|j| self.plan(k, j.seed)).collect()
    }

    /// Contender `k`'s table row before any measurement: its plan's size
    /// and cost per image on `spec`.
    fn empty_result(
        &self,
        k: usize,
        seed: u64,
        spec: &ModelSpec,
    ) -> Result<ScheduleResult, CompareError> {
        let plan = self.plan(k, image_seed(seed, 0))?;
        let cost = plan_cost(&plan, spec);
        Ok(ScheduleResult {
            name: self.contenders[k].name.clone(),
            mar_steps: plan.steps.len(),
            backbone_passes: cost.encoder_passes,
            diffusion_evaluations: cost.diffusion_evaluations,
            flops_per_image: cost.total_flops(),
            images_timed: 0,
            wall_seconds: 0.0,
            runtime_seconds: 0.0,
            model_seconds: 0.0,
            round_seconds: Vec::new(),
            quality: Vec::new(),
        })
    }
}

/// How [`compare`] with `vae` on `model` decodes its batches, or why it
/// cannot ([`CompareError::Invalid`]): check it before anything is written,
/// as [`compare`] does again.
pub fn vae_decode<M: MarModel>(model: &M, vae: VaeRunner) -> Result<VaeDecode, CompareError> {
    pipeline::decide(model, vae).map_err(CompareError::Invalid)
}

/// Refuses comparisons that cannot give a table.
/// What `req` cannot do for `contenders` schedules (`scored`: with an
/// evaluator), [`CompareError::Invalid`]: check it before anything is
/// written, as [`compare`] does again. Counts under 1, repeats whose seeds
/// pass 2^64 - 1, a single image where a Fréchet distance is measured.
pub fn check_request(
    req: &CompareRequest,
    contenders: usize,
    scored: bool,
) -> Result<(), CompareError> {
    if contenders == 0 || req.num_images == 0 || req.batch == 0 || req.repeats == 0 {
        return Err(CompareError::Invalid(
            "need at least one schedule, and --num-images, --batch and --repeats of at least 1"
                .into(),
        ));
    }
    if req.seed.checked_add(req.repeats as u64 - 1).is_none() {
        return Err(CompareError::Invalid(format!(
            "seed {} with {} repeats: the repeats' seeds (seed, seed + 1, …) pass 2^64 - 1; give a smaller seed",
            req.seed, req.repeats
        )));
    }
    if scored && req.num_images < 2 {
        return Err(CompareError::Invalid(format!(
            "{} image(s) per schedule: the bundle's evaluator measures quality over the images, and a Fréchet distance needs at least 2",
            req.num_images
        )));
    }
    Ok(())
}

/// Runs every contender on the same images (same seeds and labels),
/// interleaving schedules batch by batch so that drift of a shared machine
/// hits all alike. `progress` sees the comparison so far
/// ([`Comparison::finished`] false), the timed batches done and their
/// total: once before the first, after each batch and after each repeat's
/// scoring (the same count again), and once more when a batch fails, with
/// what was measured before it (its answer then is not read). When it
/// returns [`ControlFlow::Break`] the comparison stops there with
/// [`CompareError::Stopped`]. A batch that fails is
/// [`CompareError::Batch`], naming the schedule and images; so is an
/// untimed one (the warm-up, or with overlapped decodes the batch after
/// the last timed one), which fails the comparison too.
pub fn compare<M: MarModel>(
    engine: &mut Engine<M>,
    mut scoring: Option<Scoring<'_>>,
    contenders: &[Contender],
    cost_spec: &ModelSpec,
    req: &CompareRequest,
    mut progress: impl FnMut(&Comparison, usize, usize) -> ControlFlow<()>,
) -> Result<Comparison, CompareError> {
    check_request(req, contenders.len(), scoring.is_some())?;
    let info = engine.model.info().clone();
    let planners = Planners::new(contenders, &info, req)?;
    let vae_decode = vae_decode(&engine.model, req.vae)?;
    let labels = crate::run::jobs::labels(&Classes::Balanced, req.num_images, &info)
        .map_err(|e| CompareError::Invalid(e.to_string()))?;
    let jobs_for = |seed: u64, indices: std::ops::Range<usize>| -> Vec<ImageJob> {
        ImageJob::for_images(seed, &indices.collect::<Vec<_>>(), &labels)
    };
    let mut comparison = Comparison {
        model: info.name.clone(),
        evaluator: scoring.as_ref().map(|s| s.evaluator.name().to_string()),
        num_images: req.num_images,
        batch: req.batch,
        seed: req.seed,
        repeats: req.repeats,
        execution_provider: engine.model.execution_provider(),
        diffusion_chains: engine.chain_runner(),
        precision: engine.model.precision(),
        vae_decode,
        finished: false,
        schedules: (0..contenders.len())
            .map(|k| planners.empty_result(k, req.seed, cost_spec))
            .collect::<Result<_, _>>()?,
    };
    let mut tell = |comparison: &Comparison, done: usize, total: usize| match progress(
        comparison, done, total,
    ) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(CompareError::Stopped),
    };

    let blame = |round: &Round, source| round.failed(contenders, source);
    let batch = |round: Round| {
        let jobs = jobs_for(round.seed, round.images.clone());
        match planners.plans(round.k, &jobs) {
            Ok(plans) => Ok(Batch {
                keep: (0..jobs.len()).collect(),
                jobs,
                plans,
                tag: round,
            }),
            Err(e) => Err(blame(&round, e)),
        }
    };
    let making = |model: &M| Making {
        noise: &SeededNoise,
        decoder: pipeline::decoder_for(model, vae_decode),
        receiver: Receiver::BeforeNextDecode,
    };

    if req.warm_up {
        let rounds = (0..contenders.len()).map(|k| Round::untimed(req, k, Turn::WarmUp));
        let making = making(&engine.model);
        make_batches(
            engine,
            rounds.map(batch),
            making,
            |_| (),
            |r, e| blame(r, e.into()),
            |_| Ok(()),
        )?;
    }

    let rounds_per_repeat = req.num_images.div_ceil(req.batch);
    let total = rounds_per_repeat * req.repeats * contenders.len();
    let mut done = 0;
    tell(&comparison, done, total)?;
    // With overlap, the last timed batch's decode hides behind the batch
    // that would come next in turn (the first schedule's), as every
    // other's does.
    let trailing =
        (vae_decode == VaeDecode::Overlap).then(|| Round::untimed(req, 0, Turn::Trailing));
    let rounds = Round::timed(req, contenders.len()).chain(trailing);
    let mut collected: Vec<Collected> = contenders.iter().map(|_| Collected::default()).collect();
    let making = making(&engine.model);
    let made = make_batches(
        engine,
        rounds.map(batch),
        making,
        |_| (),
        |r, e| blame(r, e.into()),
        |made| {
            let round = &made.tag;
            let Turn::Timed { closes_repeat } = round.turn else {
                return Ok(());
            };
            if let Some(s) = scoring.as_mut() {
                let scores = s
                    .evaluator
                    .score(made.output.pixels.view())
                    .map_err(|e| blame(round, e.into()))?;
                collected[round.k].logits.push(scores.logits);
                collected[round.k].features.push(scores.features);
            }
            comparison.schedules[round.k].add_batch(made.jobs.len(), &made.seconds);
            done += 1;
            tell(&comparison, done, total)?;
            if let (true, Some(s)) = (closes_repeat, scoring.as_ref()) {
                for (k, c) in collected.iter_mut().enumerate() {
                    let quality = c.quality(round.seed, s.reference, &labels, info.classes)?;
                    comparison.schedules[k].quality.push(quality);
                    *c = Collected::default();
                }
                tell(&comparison, done, total)?;
            }
            Ok(())
        },
    );
    if let Err(e) = made {
        if matches!(e, CompareError::Batch { .. }) {
            // What was measured before the failure, to the progress
            // function (which may keep it).
            let _ = progress(&comparison, done, total);
        }
        return Err(e);
    }
    comparison.finished = true;
    Ok(comparison)
}

/// One batch of the comparison: contender `k`'s `images` of `seed`.
struct Round {
    k: usize,
    seed: u64,
    images: Range<usize>,
    turn: Turn,
}

impl Round {
    /// Every repeat's timed batches of `contenders` schedules, the
    /// schedules taking turns batch by batch.
    fn timed(req: &CompareRequest, contenders: usize) -> impl Iterator<Item = Round> + '_ {
        (0..req.repeats).flat_map(move |r| {
            let seed = req.seed.wrapping_add(r as u64);
            (0..req.num_images)
                .step_by(req.batch)
                .flat_map(move |start| {
                    let end = (start + req.batch).min(req.num_images);
                    (0..contenders).map(move |k| Round {
                        k,
                        seed,
                        images: start..end,
                        turn: Turn::Timed {
                            closes_repeat: end == req.num_images && k + 1 == contenders,
                        },
                    })
                })
        })
    }

    /// An untimed batch of contender `k`: the first batch's images, of a
    /// seed no timed repeat has, so nothing is reused.
    fn untimed(req: &CompareRequest, k: usize, turn: Turn) -> Round {
        Round {
            k,
            seed: req.seed.wrapping_add(req.repeats as u64),
            images: 0..req.batch.min(req.num_images),
            turn,
        }
    }

    /// `source`, as the failure of this batch: its schedule, images and
    /// seed named.
    fn failed(&self, contenders: &[Contender], source: CompareError) -> CompareError {
        let n = self.images.len();
        CompareError::Batch {
            schedule: contenders[self.k].name.clone(),
            images: match self.turn {
                Turn::WarmUp => format!("0..{n} (the untimed warm-up)"),
                Turn::Timed { .. } => format!("{}..{}", self.images.start, self.images.end),
                Turn::Trailing => format!("0..{n} (untimed, after the last timed batch)"),
            },
            seed: self.seed,
            source: Box::new(source),
        }
    }
}

/// What a batch of the comparison is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// Untimed, before the timed batches.
    WarmUp,
    /// Timed and scored; `closes_repeat` for the last of its repeat.
    Timed { closes_repeat: bool },
    /// Untimed, after the last timed batch, for that batch's decode to
    /// overlap.
    Trailing,
}

impl Collected {
    /// The quality of one repeat's images (made with `seed`, labelled
    /// `labels`) against `reference`.
    fn quality(
        &self,
        seed: u64,
        reference: &FeatureStats,
        labels: &[i64],
        classes: usize,
    ) -> Result<Quality, CompareError> {
        let logits = stack(&self.logits)?;
        let features = stack(&self.features)?.mapv(f64::from);
        let stats = FeatureStats::from_features(features.view())?;
        Ok(Quality {
            seed,
            frechet_distance: frechet_distance(&stats, reference)?,
            class_accuracy: (classes > 0).then(|| class_accuracy(logits.view(), labels)),
            classifier_score: classifier_score(&probabilities(logits.view())),
        })
    }
}

fn stack(parts: &[Array2<f32>]) -> Result<Array2<f32>, CompareError> {
    let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
    concatenate(Axis(0), &views).map_err(|_| {
        CompareError::Evaluator(ModelError::Graph {
            graph: "evaluator",
            message: "outputs of different widths across batches".into(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fake::FakeModel;

    /// Two images of two schedules, one a batch, on the fake model, their
    /// decodes as `vae` says.
    fn setup(vae: VaeRunner) -> (Vec<Contender>, Engine<FakeModel>, CompareRequest) {
        let paths = ["schedules/mar-8.gtr", "schedules/gtr-fast.gtr"].map(PathBuf::from);
        let contenders = contenders(&paths, &BTreeMap::new()).unwrap();
        let engine = Engine::new(FakeModel::new());
        let request = CompareRequest {
            num_images: 2,
            batch: 1,
            seed: 0,
            repeats: 1,
            options: engine.model.info().defaults.plan_options(None, None),
            warm_up: false,
            vae,
        };
        (contenders, engine, request)
    }

    /// Reference statistics of two features: mean (a, b), unit covariance.
    fn reference_at(a: f64, b: f64) -> FeatureStats {
        FeatureStats {
            mu: ndarray::array![a, b],
            sigma: Array2::eye(2),
            count: 2,
        }
    }

    /// Scores of `b` images that do not depend on them: zero logits, two
    /// features.
    fn plain_scores(b: usize) -> Scores {
        Scores {
            logits: Array2::zeros((b, 10)),
            features: Array2::from_shape_fn((b, 2), |(i, j)| (i + j) as f32),
        }
    }

    /// An evaluator that fails at its `fail_at`-th call (from 1).
    struct FailingEvaluator {
        calls: usize,
        fail_at: usize,
    }

    impl Evaluator for FailingEvaluator {
        fn name(&self) -> &str {
            "failing"
        }

        fn score(&mut self, pixels: ndarray::ArrayView4<u8>) -> Result<Scores, ModelError> {
            self.calls += 1;
            if self.calls == self.fail_at {
                return Err(ModelError::Graph {
                    graph: "evaluator",
                    message: "broke".into(),
                });
            }
            Ok(plain_scores(pixels.dim().0))
        }
    }

    /// A batch that fails names its schedule and images, and the progress
    /// function sees what was measured before it (to keep it).
    #[test]
    fn a_failed_batch_is_named_and_what_came_before_is_reported() {
        for vae in [VaeRunner::Inline, VaeRunner::Overlap] {
            failed_batch_with(vae);
        }
    }

    fn failed_batch_with(vae: VaeRunner) {
        let (contenders, mut engine, request) = setup(vae);
        let spec = ModelSpec::builtin("mar-b").unwrap();
        let mut evaluator = FailingEvaluator {
            calls: 0,
            fail_at: 3,
        };
        let reference = reference_at(0.0, 1.0);
        let scoring = Scoring {
            evaluator: &mut evaluator,
            reference: &reference,
        };
        let mut last = None;
        let err = compare(
            &mut engine,
            Some(scoring),
            &contenders,
            &spec,
            &request,
            |so_far, done, _| {
                last = Some((
                    done,
                    so_far
                        .schedules
                        .iter()
                        .map(|s| s.images_timed)
                        .collect::<Vec<_>>(),
                ));
                ControlFlow::Continue(())
            },
        )
        .unwrap_err();
        assert!(matches!(err, CompareError::Batch { ref images, seed: 0, .. } if images == "1..2"));
        assert_eq!(err.to_string(), "schedule `mar-8`, images 1..2 of seed 0");
        assert_eq!(last, Some((2, vec![1, 1])), "{vae:?}");
    }

    #[test]
    fn progress_sees_the_rows_grow_batch_by_batch() {
        let (contenders, mut engine, request) = setup(VaeRunner::Auto);
        let spec = ModelSpec::builtin("mar-b").unwrap();
        let mut seen = Vec::new();
        let done = compare(
            &mut engine,
            None,
            &contenders,
            &spec,
            &request,
            |so_far, done, total| {
                let timed: Vec<usize> = so_far.schedules.iter().map(|s| s.images_timed).collect();
                let per_image = so_far.schedules[1].seconds_per_image();
                seen.push((done, total, so_far.finished, timed, per_image.is_nan()));
                ControlFlow::Continue(())
            },
        )
        .unwrap();
        assert!(done.finished);
        // Rows not timed yet have no seconds per image (NaN, null in JSON).
        assert_eq!(
            seen,
            [
                (0, 4, false, vec![0, 0], true),
                (1, 4, false, vec![1, 0], true),
                (2, 4, false, vec![1, 1], false),
                (3, 4, false, vec![2, 1], false),
                (4, 4, false, vec![2, 2], false),
            ]
        );
    }

    /// Asked before the first batch and after it, and nothing handed on
    /// after; with overlap the next batch has sampled by then.
    #[test]
    fn progress_can_stop_the_comparison_after_a_batch() {
        for (vae, steps) in [(VaeRunner::Inline, 8), (VaeRunner::Overlap, 16)] {
            stop_after_a_batch_with(vae, steps);
        }
    }

    fn stop_after_a_batch_with(vae: VaeRunner, backbone_calls: usize) {
        let (contenders, mut engine, request) = setup(vae);
        let spec = ModelSpec::builtin("mar-b").unwrap();
        let mut calls = 0;
        let stopped = compare(
            &mut engine,
            None,
            &contenders,
            &spec,
            &request,
            |_, done, _| {
                calls += 1;
                if done == 1 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        );
        assert!(matches!(stopped, Err(CompareError::Stopped)), "{stopped:?}");
        assert_eq!(calls, 2);
        // mar-8's 8 steps, and with overlap gtr-fast's 8.
        assert_eq!(engine.model.backbone_calls, backbone_calls, "{vae:?}");
    }

    /// An evaluator whose features are each image's mean pixel and first
    /// pixel, so its quality depends on the images.
    struct PixelEvaluator;

    impl Evaluator for PixelEvaluator {
        fn name(&self) -> &str {
            "pixels"
        }

        fn score(&mut self, pixels: ndarray::ArrayView4<u8>) -> Result<Scores, ModelError> {
            let b = pixels.dim().0;
            let image = |i: usize| pixels.index_axis(Axis(0), i);
            Ok(Scores {
                logits: Array2::from_shape_fn((b, 10), |(i, c)| {
                    f32::from(image(i).iter().nth(c).copied().unwrap_or(0))
                }),
                features: Array2::from_shape_fn((b, 2), |(i, j)| match j {
                    0 => image(i).iter().map(|&p| f32::from(p)).sum::<f32>() / 255.0,
                    _ => f32::from(image(i).iter().next().copied().unwrap_or(0)),
                }),
            })
        }
    }

    /// [`compare`] on the fake model, scored by `evaluator` against
    /// `reference`, priced as MAR-B.
    fn scored(
        engine: &mut Engine<FakeModel>,
        contenders: &[Contender],
        request: &CompareRequest,
        evaluator: &mut dyn Evaluator,
        reference: &FeatureStats,
    ) -> Result<Comparison, CompareError> {
        let scoring = Scoring {
            evaluator,
            reference,
        };
        let spec = ModelSpec::builtin("mar-b").unwrap();
        compare(
            engine,
            Some(scoring),
            contenders,
            &spec,
            request,
            |_, _, _| ControlFlow::Continue(()),
        )
    }

    /// An evaluator that, given time for a decode begun before it to show,
    /// notes how many decodes the model has made.
    struct DecodeCounter {
        decodes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        seen: Vec<usize>,
    }

    impl Evaluator for DecodeCounter {
        fn name(&self) -> &str {
            "decode counter"
        }

        fn score(&mut self, pixels: ndarray::ArrayView4<u8>) -> Result<Scores, ModelError> {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let decodes = self.decodes.load(std::sync::atomic::Ordering::SeqCst);
            self.seen.push(decodes);
            Ok(plain_scores(pixels.dim().0))
        }
    }

    /// With overlap, a batch is scored before the next batch's decode
    /// starts: no decode runs beside the untimed scoring.
    #[test]
    fn no_decode_runs_while_a_batch_is_scored() {
        let (contenders, mut engine, request) = setup(VaeRunner::Overlap);
        let mut evaluator = DecodeCounter {
            decodes: engine.model.decodes.clone(),
            seen: Vec::new(),
        };
        let reference = reference_at(0.0, 1.0);
        scored(
            &mut engine,
            &contenders,
            &request,
            &mut evaluator,
            &reference,
        )
        .unwrap();
        // Four timed batches, then the untimed one's decode.
        assert_eq!(evaluator.seen, [1, 2, 3, 4]);
        assert_eq!(
            engine
                .model
                .decodes
                .load(std::sync::atomic::Ordering::SeqCst),
            5
        );
    }

    /// Overlapped decodes give the inline images (the same quality, every
    /// image timed once), say how they ran, and have the last timed
    /// decode overlap an untimed batch.
    #[test]
    fn overlapped_decodes_score_the_inline_images() {
        let compared = |vae| {
            let (contenders, mut engine, mut request) = setup(vae);
            request.num_images = 4;
            request.repeats = 2;
            request.warm_up = true;
            let reference = reference_at(100.0, 50.0);
            let compared = scored(
                &mut engine,
                &contenders,
                &request,
                &mut PixelEvaluator,
                &reference,
            );
            (compared.unwrap(), engine.model.backbone_calls)
        };
        let (inline, inline_calls) = compared(VaeRunner::Inline);
        let (overlapped, overlapped_calls) = compared(VaeRunner::Overlap);
        // One untimed batch more, of mar-8's 8 steps (the first schedule,
        // next in turn), for the last timed decode to overlap.
        assert_eq!(overlapped_calls, inline_calls + 8);
        assert_eq!(inline.vae_decode, VaeDecode::Inline);
        assert_eq!(overlapped.vae_decode, VaeDecode::Overlap);
        for (a, b) in inline.schedules.iter().zip(&overlapped.schedules) {
            assert_eq!(a.quality.len(), 2);
            assert_eq!(a.quality, b.quality, "{}", a.name);
            assert_eq!((a.images_timed, b.images_timed), (8, 8));
            assert_eq!(b.round_seconds.len(), 8);
            assert!(b.wall_seconds > 0.0 && b.runtime_seconds <= b.wall_seconds);
        }
        // The two schedules' images differ, so the test can tell them apart.
        assert_ne!(inline.schedules[0].quality, inline.schedules[1].quality);
    }
}

//! The generation engine of gtr-run: executes plans ([`gtr_plan`]) on any
//! [`MarModel`], the one trait it knows models through.
//!
//! Per MAR step it asks the model for the conditioning vectors of the
//! tokens being predicted (the backbone once for the batch; CFG appends the
//! unconditional half), chooses FTS detail tokens, and advances every
//! token's respaced diffusion chain together: on the host with one
//! diffusion-head call per tick for all rows of the step (both CFG halves),
//! each row at its own timestep, or in the model's sampler graph in one call
//! ([`MarModel::runs_chains`]). Each token's noise is drawn from its own
//! stream on other threads while the backbone runs. Then the VAE decodes the
//! tokens.
//!
//! At an adaptive step ([`gtr_plan::plan::PlanStep::adaptive`]) the backbone
//! returns the conditioning vectors of all of the stage's still-masked
//! tokens; the step reveals the top count of them by FTS score and goes on
//! with their rows only. A [`Replay`] names its own tokens instead.
//!
//! This crate has no model runtime in its dependency tree: ONNX Runtime is
//! gtr-run's backend, one layer up, which re-exports this crate as
//! `gtr_run::engine` and `gtr_run::sampler`.

use gtr_plan::{grid, plan, rng, schedule};

mod adaptive;
mod chains;
mod checks;
pub mod fake;
pub mod model;
pub mod noise;
pub mod npz;
pub mod replay;
mod rows;
pub mod sampler;

use std::time::Instant;

use ndarray::{Array2, Array3, Array4, ArrayView4};

pub use chains::SPLIT_TICK_ROWS;
use chains::StepChains;
use checks::{check_batch, check_finite, shape_error};
pub use checks::{check_label, check_plan};
pub use model::{
    COEFFICIENTS, ChainInputs, ConditionRows, Evaluator, GraphStats, ImageDecoder, ImageSettings,
    KernelProfile, MarModel, ModelError, ModelInfo, OpKernels, ProviderKernels, SamplingDefaults,
    Scores, VAE_GRAPH, gather_rows,
};
pub use noise::{NoiseSource, SeededNoise, TokenDraws};
use rayon::prelude::*;
pub use replay::Replay;
use rows::{Canvas, RowSources, draw_ahead};

use crate::plan::{Plan, PlanOptions, Planner, round_half_even};
use crate::sampler::fts::FtsScorer;
use crate::sampler::{ChainCache, NoiseSchedule};
use crate::schedule::Diagnostic;

/// One image to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageJob {
    /// Index in the run (names the file, indexes replay arrays).
    pub index: u64,
    /// The image's own seed (see [`crate::rng::image_seed`]).
    pub seed: u64,
    /// Class label, or the model's null class for unconditional images.
    pub label: i64,
}

impl ImageJob {
    /// The jobs of images `indices` of a run with `seed`: image `i` gets
    /// the seed [`crate::rng::image_seed`]`(seed, i)` and the label
    /// `labels[i]`, whatever batch it is made in.
    pub fn for_images(seed: u64, indices: &[usize], labels: &[i64]) -> Vec<ImageJob> {
        indices
            .iter()
            .map(|&i| ImageJob {
                index: i as u64,
                seed: crate::rng::image_seed(seed, i as u64),
                label: labels[i],
            })
            .collect()
    }

    /// The jobs of images `indices` of a run with `seed`, each with its own
    /// plan: image `i` gets the seed [`crate::rng::image_seed`]`(seed, i)`,
    /// the label `labels[i]` and the plan of that seed, so it is the same
    /// image in whatever batch it is made.
    pub fn batch(
        planner: &Planner,
        options: &PlanOptions,
        seed: u64,
        indices: &[usize],
        labels: &[i64],
    ) -> Result<(Vec<ImageJob>, Vec<Plan>), Diagnostic> {
        let jobs = ImageJob::for_images(seed, indices, labels);
        let plans = jobs
            .iter()
            .map(|j| planner.plan_with(j.seed, options))
            .collect::<Result<_, _>>()?;
        Ok((jobs, plans))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("at MAR step {step}")]
    Model {
        step: usize,
        #[source]
        source: ModelError,
    },
    #[error("VAE decoding")]
    Vae(#[source] ModelError),
    #[error("graph `{graph}` returned {what} at MAR step {step}")]
    NonFinite {
        graph: &'static str,
        what: String,
        step: usize,
    },
    #[error("{0}")]
    Input(String),
}

/// Time and work of one MAR step, summed over a batch.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepStats {
    pub backbone_seconds: f64,
    pub diffusion_seconds: f64,
    pub diffusion_calls: u64,
    /// Diffusion-head rows summed over calls (both CFG halves).
    pub diffusion_rows: u64,
    pub other_seconds: f64,
}

impl StepStats {
    /// Adds `more`'s seconds and counters.
    pub fn add(&mut self, more: &StepStats) {
        self.backbone_seconds += more.backbone_seconds;
        self.diffusion_seconds += more.diffusion_seconds;
        self.diffusion_calls += more.diffusion_calls;
        self.diffusion_rows += more.diffusion_rows;
        self.other_seconds += more.other_seconds;
    }
}

/// Totals over everything the engine ran.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RunStats {
    pub steps: Vec<StepStats>,
    pub vae_seconds: f64,
    /// Wall time inside `generate`, VAE included.
    pub total_seconds: f64,
}

impl RunStats {
    /// Seconds spent inside model calls.
    pub fn model_seconds(&self) -> f64 {
        self.vae_seconds + self.sampling_model_seconds()
    }

    /// Seconds spent inside the model calls of MAR steps (all but the VAE).
    pub fn sampling_model_seconds(&self) -> f64 {
        self.steps
            .iter()
            .map(|s| s.backbone_seconds + s.diffusion_seconds)
            .sum()
    }
}

/// The outcome of one batch.
#[derive(Debug, Clone)]
pub struct BatchOutput {
    /// Final tokens [B, L, C] (before the latent scale).
    pub tokens: Array3<f32>,
    /// VAE output [B, channels, H, W].
    pub images: Array4<f32>,
    /// 8-bit pixels [B, H, W, channels].
    pub pixels: Array4<u8>,
    /// Which tokens got FTS detail steps [B, L].
    pub detail: Array2<bool>,
    /// Each image's tokens in the order they were revealed (step by step,
    /// ascending within a step): the plan's, a replay's, or at adaptive
    /// steps the engine's choice.
    pub reveal_orders: Vec<Vec<usize>>,
}

impl BatchOutput {
    /// The images at `positions` of the batch, in that order.
    pub fn select(&self, positions: &[usize]) -> BatchOutput {
        BatchOutput {
            tokens: self.tokens.select(ndarray::Axis(0), positions),
            images: self.images.select(ndarray::Axis(0), positions),
            pixels: self.pixels.select(ndarray::Axis(0), positions),
            detail: self.detail.select(ndarray::Axis(0), positions),
            reveal_orders: positions
                .iter()
                .map(|&k| self.reveal_orders[k].clone())
                .collect(),
        }
    }
}

/// A batch whose MAR steps are done, before its VAE decode
/// ([`Engine::sample`]).
#[derive(Debug, Clone)]
pub struct SampledBatch {
    /// The VAE's input [B, C, h, w] (tokens on the latent grid, scaled).
    pub latent: Array4<f32>,
    /// Final tokens [B, L, C] (before the latent scale).
    pub tokens: Array3<f32>,
    /// Which tokens got FTS detail steps [B, L].
    pub detail: Array2<bool>,
    /// As [`BatchOutput::reveal_orders`].
    pub reveal_orders: Vec<Vec<usize>>,
    /// The images the VAE must return.
    image: ImageSettings,
    /// MAR steps run (errors of the VAE name the step after the last).
    steps: usize,
}

impl SampledBatch {
    /// Decodes the batch with `vae` (the model's VAE decoder, called once
    /// on [`SampledBatch::latent`], on this thread or another): the images
    /// [B, channels, H, W] checked against the manifest's size and to be
    /// finite, and their 8-bit pixels. Returns the batch and its seconds,
    /// for [`Engine::count_decode`].
    pub fn decode_with(
        self,
        vae: impl FnOnce(ArrayView4<f32>) -> Result<Array4<f32>, ModelError>,
    ) -> Result<(BatchOutput, DecodeSeconds), EngineError> {
        let started = Instant::now();
        let images = vae(self.latent.view()).map_err(EngineError::Vae)?;
        let vae_seconds = started.elapsed().as_secs_f64();
        let image = self.image;
        let want = (
            self.tokens.dim().0,
            image.channels,
            image.height,
            image.width,
        );
        if images.dim() != want {
            return Err(EngineError::Vae(ModelError::Shape {
                graph: VAE_GRAPH,
                tensor: "image".into(),
                got: images.shape().to_vec(),
                expected: format!("{:?}", [want.0, want.1, want.2, want.3]),
            }));
        }
        check_finite(VAE_GRAPH, "image", images.iter(), self.steps)?;
        let pixels = to_pixels(&images);
        let output = BatchOutput {
            tokens: self.tokens,
            images,
            pixels,
            detail: self.detail,
            reveal_orders: self.reveal_orders,
        };
        let seconds = DecodeSeconds {
            vae: vae_seconds,
            total: started.elapsed().as_secs_f64(),
        };
        Ok((output, seconds))
    }
}

/// Seconds inside the runtime's run calls of `graphs`, or `model_seconds`
/// where the model reports no graphs.
fn runtime_or(graphs: &[GraphStats], model_seconds: f64) -> f64 {
    if graphs.is_empty() {
        model_seconds
    } else {
        graphs.iter().map(|g| g.seconds).sum()
    }
}

/// The time of one [`SampledBatch::decode_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DecodeSeconds {
    /// Inside the VAE call.
    pub vae: f64,
    /// All of it: the call, its checks and the pixels.
    pub total: f64,
}

pub struct Engine<M: MarModel> {
    pub model: M,
    chains: ChainCache,
    fts: FtsScorer,
    pub stats: RunStats,
    /// Ticks per sampler-graph call (`None`: a whole chain per call).
    pub ticks_per_call: Option<usize>,
}

impl<M: MarModel> Engine<M> {
    pub fn new(model: M) -> Self {
        let info = model.info();
        let chains = ChainCache::new(NoiseSchedule::cosine(info.train_steps));
        let fts = FtsScorer::new(info.width);
        Engine {
            model,
            chains,
            fts,
            stats: RunStats::default(),
            ticks_per_call: None,
        }
    }

    /// Where this engine runs diffusion chains: the model's
    /// [`MarModel::chain_graph`] (`sampler graph`: one call per MAR step),
    /// `host` (one head call per tick) or `host (split head)` (in steps
    /// narrow enough, the head's state part per tick and its condition part
    /// per group of ticks: [`MarModel::split_head_rows`]).
    pub fn chain_runner(&self) -> String {
        chain_runner(&self.model)
    }

    /// How this engine runs the backbone: `backbone graph` (the model's
    /// fused graph, only the predicted rows returned) or `encoder and
    /// decoder` (two calls, the rows gathered after).
    pub fn backbone_runner(&self) -> &'static str {
        if self.model.fuses_backbone() {
            "backbone graph"
        } else {
            "encoder and decoder"
        }
    }

    /// Seconds spent inside the runtime's own run calls so far, where the
    /// model reports them ([`MarModel::graph_stats`]); else inside model calls.
    pub fn runtime_seconds(&self) -> f64 {
        runtime_or(&self.model.graph_stats(), self.stats.model_seconds())
    }

    /// [`Engine::runtime_seconds`] of every graph but the VAE decoder
    /// ([`MarModel::sampling_graph_stats`]): the MAR steps' share, which a
    /// decode running on another thread meanwhile neither changes nor
    /// waits for.
    pub fn sampling_runtime_seconds(&self) -> f64 {
        runtime_or(
            &self.model.sampling_graph_stats(),
            self.stats.sampling_model_seconds(),
        )
    }

    /// Generates one image per (plan, job), drawing from `noise`: the MAR
    /// steps ([`Engine::sample`]), then the VAE on this thread. All plans
    /// must come from one schedule (same step sizes and settings; orders
    /// may differ). `on_step` sees (step done, steps).
    pub fn generate(
        &mut self,
        plans: &[Plan],
        jobs: &[ImageJob],
        noise: &dyn NoiseSource,
        on_step: impl FnMut(usize, usize),
    ) -> Result<BatchOutput, EngineError> {
        let sampled = self.sample(plans, jobs, noise, on_step)?;
        let model = &mut self.model;
        let (output, seconds) = sampled.decode_with(|latent| model.decode_image(latent))?;
        self.count_decode(seconds);
        Ok(output)
    }

    /// The MAR steps of [`Engine::generate`], without the VAE: the batch's
    /// tokens, for [`SampledBatch::decode_with`] on this thread or another
    /// ([`MarModel::image_decoder`]).
    pub fn sample(
        &mut self,
        plans: &[Plan],
        jobs: &[ImageJob],
        noise: &dyn NoiseSource,
        mut on_step: impl FnMut(usize, usize),
    ) -> Result<SampledBatch, EngineError> {
        let start = Instant::now();
        let info = self.model.info().clone();
        check_batch(&info, plans, jobs, noise)?;
        let steps = plans[0].steps.len();
        if self.stats.steps.len() < steps {
            self.stats.steps.resize(steps, StepStats::default());
        }
        let mut canvas = Canvas::new(jobs.len(), info.grid.len(), info.token_dim);
        let mut reveal_orders = vec![Vec::with_capacity(info.grid.len()); jobs.len()];
        for s in 0..steps {
            let (stats, predicted) = self.step(plans, jobs, noise, s, &mut canvas, &info)?;
            for (order, tokens) in reveal_orders.iter_mut().zip(predicted) {
                order.extend(tokens);
            }
            self.stats.steps[s].add(&stats);
            on_step(s, steps);
        }
        let latent = canvas.latent(info.grid, info.latent_scale);
        self.stats.total_seconds += start.elapsed().as_secs_f64();
        Ok(SampledBatch {
            latent,
            tokens: canvas.tokens,
            detail: canvas.detail,
            reveal_orders,
            image: info.image,
            steps,
        })
    }

    /// Counts a decode (made on this thread or another) in
    /// [`Engine::stats`]: its VAE call in `vae_seconds`, all of it in
    /// `total_seconds` (so with decodes overlapping the next batch's
    /// sampling, the total is the work's time, and may exceed the wall).
    pub fn count_decode(&mut self, seconds: DecodeSeconds) {
        self.stats.vae_seconds += seconds.vae;
        self.stats.total_seconds += seconds.total;
    }

    /// MAR step `s` of the batch: the backbone on the canvas (at an
    /// adaptive step, for all of the stage's masked tokens, of which the
    /// step's count is chosen), the step's rows laid out with their
    /// conditioning, their chains run (on the host or in the model's
    /// sampler graph), the sampled tokens written back. Returns the step's
    /// measurements and each image's revealed tokens (ascending).
    fn step(
        &mut self,
        plans: &[Plan],
        jobs: &[ImageJob],
        noise: &dyn NoiseSource,
        s: usize,
        canvas: &mut Canvas,
        info: &ModelInfo,
    ) -> Result<(StepStats, Vec<Vec<usize>>), EngineError> {
        let step_start = Instant::now();
        let template = &plans[0].steps[s];
        let guided = template.cfg.is_some();
        let (b, d) = (jobs.len(), info.width);
        let rows_b = if guided { 2 * b } else { b };

        let (fixed, asked) = asked_tokens(plans, jobs, noise, s, canvas)?;
        let n = asked[0].len();
        let inputs = canvas.backbone_inputs(jobs, guided, info.null_class, template.known_before);
        let predict = Array2::from_shape_fn((rows_b, n), |(r, k)| asked[r % b][k] as i64);
        // Each image's tokens draw their noise (the step's base ticks; FTS
        // detail tokens draw on once chosen) on other threads while the
        // backbone runs, where the tokens are known before it.
        let ticks: Vec<usize> = plans
            .iter()
            .map(|p| p.steps[s].chain_len(p.steps[s].diffusion_steps, info.train_steps))
            .collect();
        let c = info.token_dim;
        let model = &mut self.model;
        let (z, backbone_seconds, drawn) = std::thread::scope(|scope| {
            let ahead = fixed
                .as_ref()
                .map(|tokens| scope.spawn(|| draw_ahead(noise, jobs, tokens, &ticks, c)));
            let t0 = Instant::now();
            let z = model.backbone_rows(
                inputs.canvas.view(),
                inputs.known.view(),
                inputs.labels.view(),
                predict.view(),
            );
            let seconds = t0.elapsed().as_secs_f64();
            let drawn = ahead.map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            (z, seconds, drawn)
        });
        let z = z.map_err(|source| EngineError::Model { step: s, source })?;
        let z_graph = if self.model.fuses_backbone() {
            "backbone"
        } else {
            "decoder"
        };
        let z = checked_z(z, z_graph, s, (rows_b, n, d))?;
        let (predicted, z) = match (fixed, template.adaptive) {
            (Some(tokens), _) => (tokens, z),
            (None, Some(selector)) => {
                let count = template.tokens.len();
                let choice = adaptive::choose(&mut self.fts, z.view(), &asked, count, selector);
                (choice.tokens, gather_rows(&z, choice.slots.view()))
            }
            (None, None) => {
                return Err(EngineError::Input(format!(
                    "MAR step {s}: the noise source named no tokens for a step that is not adaptive"
                )));
            }
        };

        let drawn = drawn.unwrap_or_else(|| draw_ahead(noise, jobs, &predicted, &ticks, c));
        let (rows, mut x) = RowSources {
            jobs,
            chains: &mut self.chains,
            fts: &self.fts,
        }
        .step_rows(plans, s, &predicted, drawn, z.view(), &mut canvas.detail);
        let chains = StepChains {
            step: s,
            z: &z,
            images: b,
            guided,
            scale: template.cfg.unwrap_or(1.0),
            temperature: template.temperature,
            ticks_per_call: self.ticks_per_call,
        };
        let work = if self.model.runs_chains() {
            chains.run_in_graph(&mut self.model, &rows, &mut x, info)?
        } else {
            chains.run_on_host(&mut self.model, &rows, &mut x, info)?
        };
        check_finite("diffusion", "sampled tokens", x.iter(), s)?;
        canvas.write_back(&rows, &x);
        let stats = StepStats {
            backbone_seconds,
            diffusion_seconds: work.seconds,
            diffusion_calls: work.calls,
            diffusion_rows: work.rows,
            other_seconds: step_start.elapsed().as_secs_f64() - backbone_seconds - work.seconds,
        };
        Ok((stats, predicted))
    }
}

/// Where an engine on `model` runs diffusion chains
/// ([`Engine::chain_runner`]), known before any image is made.
pub fn chain_runner<M: MarModel + ?Sized>(model: &M) -> String {
    if model.runs_chains() {
        model.chain_graph()
    } else if model.split_head_rows() > 0 {
        "host (split head)".into()
    } else {
        "host".into()
    }
}

/// Sizes the thread pool of the engine's own parallel work (a step's
/// noise drawn while the backbone runs, tick layouts, pixels) to `threads`.
/// It is rayon's global pool, so the first call in a process decides;
/// without one it has `RAYON_NUM_THREADS` threads, else one per core. The
/// work's results do not depend on the threads.
pub fn set_host_threads(threads: usize) {
    // An error means the pool already exists: the earlier size stands.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
}

/// Images [B, channels, H, W] → pixels [B, H, W, channels] by MAR's
/// conversion: (x + 1)/2, clipped to [0, 1], × 255, rounded half to even.
pub fn to_pixels(images: &Array4<f32>) -> Array4<u8> {
    let (b, ch, h, w) = images.dim();
    if b * ch * h * w == 0 {
        return Array4::zeros((b, h, w, ch));
    }
    let images = images.as_standard_layout();
    let src = images.as_slice().expect("standard layout");
    let mut out = vec![0u8; b * h * w * ch];
    // One image's plane c holds h·w values; pixel p of it goes to p·ch + c.
    src.par_chunks_exact(ch * h * w)
        .zip(out.par_chunks_exact_mut(h * w * ch))
        .for_each(|(planes, pixels)| {
            for (c, plane) in planes.chunks_exact(h * w).enumerate() {
                for (p, &v) in plane.iter().enumerate() {
                    let v = ((f64::from(v) + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0;
                    pixels[p * ch + c] = round_half_even(v) as u8;
                }
            }
        });
    Array4::from_shape_vec((b, h, w, ch), out).expect("B·H·W·channels pixels")
}

/// Token indices per image of a batch.
type TokensPerImage = Vec<Vec<usize>>;

/// The tokens each image of the batch predicts at MAR step `s`: those the
/// noise source names (`Some`, also returned as the asked ones), or at an
/// adaptive step (a source without orders of its own) the stage's
/// still-masked tokens, of which the step's count is chosen after the
/// backbone. Every image asks for the same number.
fn asked_tokens(
    plans: &[Plan],
    jobs: &[ImageJob],
    noise: &dyn NoiseSource,
    s: usize,
    canvas: &Canvas,
) -> Result<(Option<TokensPerImage>, TokensPerImage), EngineError> {
    let fixed: Option<TokensPerImage> = plans
        .iter()
        .zip(jobs)
        .map(|(plan, &job)| noise.predicted_tokens(plan, s, job))
        .collect();
    let asked: TokensPerImage = match &fixed {
        Some(tokens) => tokens.clone(),
        None => (0..jobs.len())
            .map(|img| adaptive::candidates(&plans[img], s, canvas, img))
            .collect(),
    };
    let n = asked[0].len();
    if asked.iter().any(|a| a.len() != n) {
        return Err(EngineError::Input(format!(
            "MAR step {s}: the images of a batch predict different numbers of tokens"
        )));
    }
    Ok((fixed, asked))
}

/// The backbone's `z` of MAR step `s` (from `graph`, which errors name), checked to
/// be `want` [rows, N, D] and finite, in standard layout.
fn checked_z(
    z: Array3<f32>,
    graph: &'static str,
    s: usize,
    want: (usize, usize, usize),
) -> Result<Array3<f32>, EngineError> {
    if z.dim() != want {
        return Err(shape_error(
            s,
            graph,
            "z",
            z.shape(),
            &[want.0, want.1, want.2],
        ));
    }
    let z = if z.is_standard_layout() {
        z
    } else {
        z.as_standard_layout().into_owned()
    };
    check_finite(graph, "z", z.as_slice().expect("standard z").iter(), s)?;
    Ok(z)
}

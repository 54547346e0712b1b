//! The generation engine: executes plans on any [`MarModel`].
//!
//! Per MAR step it runs the backbone once for the batch (CFG appends the
//! unconditional half), gathers the conditioning vectors of the tokens being
//! predicted, chooses FTS detail tokens, and advances every token's respaced
//! diffusion chain together: one diffusion-head call per tick for all rows
//! of the step (both CFG halves), each row at its own timestep, so chains of
//! 50 and 20 steps cost 50 calls. Then the VAE decodes the tokens.

mod chains;
pub mod fake;
pub mod model;
pub mod replay;

use std::time::Instant;

use ndarray::{Array1, Array2, Array3, Array4, Axis};

use chains::{Row, StepChains};
pub use model::{ChainInputs, GraphStats, MarModel, ModelError, ModelInfo};
pub use replay::Replay;

use crate::plan::{Plan, PlanOptions, Planner, round_half_even};
use crate::rng::{Purpose, Stream, TokenNoise};
use crate::sampler::fts::{FtsScorer, select};
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
        let jobs: Vec<ImageJob> = indices
            .iter()
            .map(|&i| ImageJob {
                index: i as u64,
                seed: crate::rng::image_seed(seed, i as u64),
                label: labels[i],
            })
            .collect();
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
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct StepStats {
    pub backbone_seconds: f64,
    pub diffusion_seconds: f64,
    pub diffusion_calls: u64,
    /// Diffusion-head rows summed over calls (both CFG halves).
    pub diffusion_rows: u64,
    pub other_seconds: f64,
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
        self.vae_seconds
            + self
                .steps
                .iter()
                .map(|s| s.backbone_seconds + s.diffusion_seconds)
                .sum::<f64>()
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
}

/// Where diffusion noise comes from.
#[derive(Clone, Copy)]
pub enum Noise<'a> {
    /// Per-token ChaCha streams from each image's seed.
    Seeded,
    /// Recorded draws, indexed by [`ImageJob::index`].
    Replay(&'a Replay),
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

    /// Where this engine runs diffusion chains: `sampler graph` (the
    /// model's, one call per MAR step) or `host` (one head call per tick).
    pub fn chain_runner(&self) -> &'static str {
        if self.model.runs_chains() {
            "sampler graph"
        } else {
            "host"
        }
    }

    /// Seconds spent inside the runtime's own run calls so far, where the
    /// model reports them ([`MarModel::graph_stats`]); else inside model calls.
    pub fn runtime_seconds(&self) -> f64 {
        let graphs = self.model.graph_stats();
        if graphs.is_empty() {
            self.stats.model_seconds()
        } else {
            graphs.iter().map(|g| g.seconds).sum()
        }
    }

    /// Generates one image per (plan, job). All plans must come from one
    /// schedule (same step sizes and settings; orders may differ).
    pub fn generate(
        &mut self,
        plans: &[Plan],
        jobs: &[ImageJob],
        noise: Noise,
        mut on_step: impl FnMut(usize, usize),
    ) -> Result<BatchOutput, EngineError> {
        let start = Instant::now();
        let info = self.model.info().clone();
        check_batch(&info, plans, jobs, noise)?;
        let grid = info.grid;
        let (b, l, c, d) = (jobs.len(), grid.len(), info.token_dim, info.width);
        let steps = &plans[0].steps;
        if self.stats.steps.len() < steps.len() {
            self.stats.steps.resize(steps.len(), StepStats::default());
        }

        let mut tokens = Array3::<f32>::zeros((b, l, c));
        let mut detail_mask = Array2::<bool>::from_elem((b, l), false);
        let mut known: Vec<Vec<usize>> = vec![Vec::new(); b];

        for (s, template) in steps.iter().enumerate() {
            let step_start = Instant::now();
            let guided = template.cfg.is_some();
            let rows_b = if guided { 2 * b } else { b };
            let k = template.known_before;

            // Backbone: canvas, known indices, labels ([cond; uncond]).
            let mut canvas = Array3::<f32>::zeros((rows_b, l, c));
            let mut known_idx = Array2::<i64>::zeros((rows_b, k));
            let mut labels = Array1::<i64>::zeros(rows_b);
            for r in 0..rows_b {
                let img = r % b;
                canvas
                    .index_axis_mut(Axis(0), r)
                    .assign(&tokens.index_axis(Axis(0), img));
                for (slot, &t) in known[img].iter().enumerate() {
                    known_idx[[r, slot]] = t as i64;
                }
                labels[r] = if r < b {
                    jobs[img].label
                } else {
                    info.null_class
                };
            }
            let t0 = Instant::now();
            let z = self
                .model
                .backbone(canvas.view(), known_idx.view(), labels.view())
                .map_err(|source| EngineError::Model { step: s, source })?;
            let backbone_seconds = t0.elapsed().as_secs_f64();
            if z.dim() != (rows_b, l, d) {
                return Err(shape_error(s, "decoder", "z", z.shape(), &[rows_b, l, d]));
            }
            check_finite("decoder", "z", z.as_slice().expect("owned z").iter(), s)?;

            // Rows: every predicted token of every image, with its chain.
            let mut rows: Vec<Row> = Vec::new();
            for (img, plan) in plans.iter().enumerate() {
                let step = &plan.steps[s];
                let tokens_here = predicted_tokens(plan, s, jobs[img], noise);
                let chosen = match step.detail {
                    None => vec![false; tokens_here.len()],
                    Some(rule) => {
                        let scores: Vec<f64> = tokens_here
                            .iter()
                            .map(|&t| {
                                let row = z.slice(ndarray::s![img, t, ..]);
                                self.fts
                                    .score(row.as_slice().expect("z rows are contiguous"))
                            })
                            .collect();
                        let mut sel = Stream::new(jobs[img].seed, Purpose::Selection);
                        sel.seek_block(s as u64);
                        let draws: Vec<u64> =
                            (0..tokens_here.len()).map(|_| sel.next_u64()).collect();
                        select(&scores, rule.count, rule.selector, &draws)
                    }
                };
                for (&t, &is_detail) in tokens_here.iter().zip(&chosen) {
                    let n = match (is_detail, step.detail) {
                        (true, Some(rule)) => rule.steps,
                        _ => step.diffusion_steps,
                    } as usize;
                    detail_mask[[img, t]] = is_detail;
                    rows.push(Row {
                        image: img,
                        token: t,
                        steps: n,
                        chain: self.chains.get(n),
                        noise: match noise {
                            Noise::Seeded => Some(TokenNoise::new(jobs[img].seed, t)),
                            Noise::Replay(_) => None,
                        },
                    });
                }
            }

            // Longest chains first (stable: image and token order otherwise).
            rows.sort_by_key(|r| std::cmp::Reverse(r.steps));

            // Initial noise.
            let n_rows = rows.len();
            let mut x = vec![0f32; n_rows * c];
            for (r, row) in rows.iter_mut().enumerate() {
                row.draw(noise, jobs, None, &mut x[r * c..(r + 1) * c]);
            }

            let chains = StepChains {
                step: s,
                z: &z,
                images: b,
                guided,
                scale: template.cfg.unwrap_or(1.0),
                temperature: template.temperature,
                noise,
                jobs,
                ticks_per_call: self.ticks_per_call,
            };
            let work = if self.model.runs_chains() {
                chains.run_in_graph(&mut self.model, &mut rows, &mut x, &info)?
            } else {
                chains.run_on_host(&mut self.model, &mut rows, &mut x, &info)?
            };
            let (diffusion_seconds, calls, call_rows) = (work.seconds, work.calls, work.rows);

            // Write the sampled tokens back; they are known from now on.
            for (r, row) in rows.iter().enumerate() {
                for ch in 0..c {
                    tokens[[row.image, row.token, ch]] = x[r * c + ch];
                }
                known[row.image].push(row.token);
            }
            for list in &mut known {
                list.sort_unstable();
            }
            check_finite("diffusion", "sampled tokens", x.iter(), s)?;

            let st = &mut self.stats.steps[s];
            st.backbone_seconds += backbone_seconds;
            st.diffusion_seconds += diffusion_seconds;
            st.diffusion_calls += calls;
            st.diffusion_rows += call_rows;
            st.other_seconds +=
                step_start.elapsed().as_secs_f64() - backbone_seconds - diffusion_seconds;
            on_step(s, steps.len());
        }

        // VAE decode: tokens / latent scale, unpatchified to [B, C, h, w].
        let mut latent = Array4::<f32>::zeros((b, c, grid.height, grid.width));
        let inv = 1.0 / info.latent_scale;
        for img in 0..b {
            for t in 0..l {
                let (i, j) = grid.cell(t);
                for ch in 0..c {
                    latent[[img, ch, i, j]] = (f64::from(tokens[[img, t, ch]]) * inv) as f32;
                }
            }
        }
        let t2 = Instant::now();
        let images = self
            .model
            .decode_image(latent.view())
            .map_err(EngineError::Vae)?;
        self.stats.vae_seconds += t2.elapsed().as_secs_f64();
        let want = (b, info.image.channels, info.image.height, info.image.width);
        if images.dim() != want {
            return Err(EngineError::Vae(ModelError::Shape {
                graph: "vae_decoder",
                tensor: "image".into(),
                got: images.shape().to_vec(),
                expected: format!("{:?}", [want.0, want.1, want.2, want.3]),
            }));
        }
        check_finite("vae_decoder", "image", images.iter(), steps.len())?;
        let pixels = to_pixels(&images);
        self.stats.total_seconds += start.elapsed().as_secs_f64();
        Ok(BatchOutput {
            tokens,
            images,
            pixels,
            detail: detail_mask,
        })
    }
}

/// The tokens image `job` predicts at step `s`: the plan's, or the replay's.
fn predicted_tokens(plan: &Plan, s: usize, job: ImageJob, noise: Noise) -> Vec<usize> {
    match noise {
        Noise::Seeded => plan.steps[s].tokens.clone(),
        Noise::Replay(rep) => {
            let start = plan.steps[s].known_before;
            let n = plan.steps[s].tokens.len();
            let row = rep.order.row(job.index as usize);
            let mut v: Vec<usize> = row
                .iter()
                .skip(start)
                .take(n)
                .map(|&t| t as usize)
                .collect();
            v.sort_unstable();
            v
        }
    }
}

/// Checks that `plan` fits model `info`: its grid, and no chain longer than
/// the training chain.
pub fn check_plan(info: &ModelInfo, plan: &Plan) -> Result<(), String> {
    if plan.grid != info.grid {
        return Err(format!(
            "the plan is for a {} grid but model `{}` has a {} grid",
            plan.grid, info.name, info.grid
        ));
    }
    if let Some((k, step)) = plan
        .steps
        .iter()
        .enumerate()
        .find(|(_, st)| st.max_diffusion_steps() as usize > info.train_steps)
    {
        return Err(format!(
            "MAR step {k} (stage `{}`) asks for {} diffusion steps, but model `{}` was trained with {} (manifest diffusion.train_steps); a respaced chain cannot be longer than the training chain",
            plan.stages[step.stage].name,
            step.max_diffusion_steps(),
            info.name,
            info.train_steps
        ));
    }
    Ok(())
}

fn check_batch(
    info: &ModelInfo,
    plans: &[Plan],
    jobs: &[ImageJob],
    noise: Noise,
) -> Result<(), EngineError> {
    let bad = |m: String| Err(EngineError::Input(m));
    if plans.is_empty() || plans.len() != jobs.len() {
        return bad(format!("{} plans for {} images", plans.len(), jobs.len()));
    }
    let first = &plans[0];
    for p in plans {
        let same = p.steps.len() == first.steps.len()
            && p.steps.iter().zip(&first.steps).all(|(a, b)| {
                a.tokens.len() == b.tokens.len()
                    && a.diffusion_steps == b.diffusion_steps
                    && a.detail == b.detail
                    && a.cfg == b.cfg
                    && a.temperature == b.temperature
            });
        if !same {
            return bad("plans in one batch must share their step structure".into());
        }
    }
    check_plan(info, first).map_err(EngineError::Input)?;
    for job in jobs {
        let label_ok = job.label == info.null_class
            || (info.classes > 0 && (0..info.classes as i64).contains(&job.label));
        if !label_ok {
            return bad(format!(
                "class {} is out of range: model `{}` has {} classes (0..{}){}",
                job.label,
                info.name,
                info.classes,
                info.classes.saturating_sub(1),
                if info.classes == 0 {
                    "; it is unconditional"
                } else {
                    ""
                }
            ));
        }
    }
    if let Noise::Replay(rep) = noise {
        let (n, l) = rep.order.dim();
        let c = rep.init_noise.dim().2;
        if l != info.grid.len() || c != info.token_dim {
            return bad(format!(
                "replay is for {l} tokens of {c} channels; the model has {} of {}",
                info.grid.len(),
                info.token_dim
            ));
        }
        if let Some(job) = jobs.iter().find(|j| j.index as usize >= n) {
            return bad(format!(
                "replay holds {n} images; image {} was asked for",
                job.index
            ));
        }
        let longest = first
            .steps
            .iter()
            .map(|s| s.max_diffusion_steps() as usize)
            .max()
            .unwrap_or(0);
        if rep.step_noise.dim().2 < longest {
            return bad(format!(
                "replay step_noise holds {} iterations per token; the schedule needs {longest}",
                rep.step_noise.dim().2
            ));
        }
    }
    Ok(())
}

fn shape_error(
    step: usize,
    graph: &'static str,
    tensor: &str,
    got: &[usize],
    want: &[usize],
) -> EngineError {
    EngineError::Model {
        step,
        source: ModelError::Shape {
            graph,
            tensor: tensor.into(),
            got: got.to_vec(),
            expected: format!("{want:?}"),
        },
    }
}

fn check_finite<'a>(
    graph: &'static str,
    tensor: &str,
    values: impl Iterator<Item = &'a f32> + Clone,
    step: usize,
) -> Result<(), EngineError> {
    // Branch-free fast path (vectorizes); count only when something is wrong.
    if values.clone().fold(true, |ok, v| ok & v.is_finite()) {
        return Ok(());
    }
    let bad = values.clone().filter(|v| !v.is_finite()).count();
    let nan = values.clone().any(|v| v.is_nan());
    Err(EngineError::NonFinite {
        graph,
        what: format!(
            "{bad} non-finite value{} ({}) in `{tensor}`",
            if bad == 1 { "" } else { "s" },
            if nan { "NaN" } else { "Inf" }
        ),
        step,
    })
}

/// MAR's conversion: (x + 1)/2, clipped to [0, 1], × 255, rounded half to even.
pub fn to_pixels(images: &Array4<f32>) -> Array4<u8> {
    let (b, ch, h, w) = images.dim();
    Array4::from_shape_fn((b, h, w, ch), |(i, y, x, c)| {
        let v = ((f64::from(images[[i, c, y, x]]) + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0;
        round_half_even(v) as u8
    })
}

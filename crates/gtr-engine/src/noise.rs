//! Where a run's randomness for the diffusion chains comes from, and which
//! tokens each step predicts: [`SeededNoise`] (each token's ChaCha stream
//! from its image's seed; the plan's order) or a [`Replay`] (recorded
//! orders and draws of another implementation, `--replay`).

use super::model::ModelInfo;
use super::{ImageJob, Replay};
use crate::plan::Plan;
use crate::rng::TokenNoise;

/// A source of each token's draws and of each step's tokens. `Sync`, so
/// that a step's tokens draw ahead on other threads.
pub trait NoiseSource: Sync {
    /// Refuses jobs the source cannot serve on model `info` with chains of
    /// up to `longest` ticks; the message names what is missing.
    fn check(&self, info: &ModelInfo, jobs: &[ImageJob], longest: usize) -> Result<(), String>;

    /// The tokens image `job` predicts at step `step` of `plan`, ascending;
    /// `None` where the engine is to choose them (an adaptive step of a
    /// source that holds no orders of its own).
    fn predicted_tokens(&self, plan: &Plan, step: usize, job: ImageJob) -> Option<Vec<usize>>;

    /// The draws of token `token` of image `job`.
    fn token_draws(&self, job: ImageJob, token: usize) -> Box<dyn TokenDraws + '_>;
}

/// One token's draws: its initial noise, then one per chain tick. `Send`
/// and `Sync`, so that the rows of a step draw and are laid out in parallel
/// (each from its own stream).
pub trait TokenDraws: Send + Sync {
    /// Fills `out` with the initial noise when `tick` is `None`, else with
    /// that tick's draw. Callers draw the initial noise first, then in tick
    /// order (a stream gives its values in call order).
    fn draw(&mut self, tick: Option<usize>, out: &mut [f32]);
}

/// Each token's own ChaCha stream from its image's seed
/// ([`TokenNoise`]); tokens in the plan's order, chosen by the engine at
/// adaptive steps.
#[derive(Debug, Clone, Copy, Default)]
pub struct SeededNoise;

impl NoiseSource for SeededNoise {
    fn check(&self, _: &ModelInfo, _: &[ImageJob], _: usize) -> Result<(), String> {
        Ok(())
    }

    fn predicted_tokens(&self, plan: &Plan, step: usize, _: ImageJob) -> Option<Vec<usize>> {
        let step = &plan.steps[step];
        step.adaptive.is_none().then(|| step.tokens.clone())
    }

    fn token_draws(&self, job: ImageJob, token: usize) -> Box<dyn TokenDraws + '_> {
        Box::new(TokenNoise::new(job.seed, token))
    }
}

impl TokenDraws for TokenNoise {
    fn draw(&mut self, _: Option<usize>, out: &mut [f32]) {
        self.fill(out);
    }
}

/// Recorded orders and draws, indexed by [`ImageJob::index`]; the plan
/// still sets how many tokens each step reveals. The recorded order is
/// authoritative at adaptive steps too: a replay reveals its own order.
impl Replay {
    /// Refuses a replay recorded for another model (tokens, channels) or
    /// with draws for fewer than `longest` iterations per token; the
    /// message names what differs. A run checks this before it writes
    /// anything; [`NoiseSource::check`] again per batch.
    pub fn fits(&self, info: &ModelInfo, longest: usize) -> Result<(), String> {
        let l = self.order.dim().1;
        let c = self.init_noise.dim().2;
        if l != info.grid.len() || c != info.token_dim {
            return Err(format!(
                "replay is for {l} tokens of {c} channels; the model has {} of {}",
                info.grid.len(),
                info.token_dim
            ));
        }
        if self.step_noise.dim().2 < longest {
            return Err(format!(
                "replay step_noise holds {} iterations per token; the schedule needs {longest}",
                self.step_noise.dim().2
            ));
        }
        Ok(())
    }
}

impl NoiseSource for Replay {
    fn check(&self, info: &ModelInfo, jobs: &[ImageJob], longest: usize) -> Result<(), String> {
        self.fits(info, longest)?;
        let n = self.order.dim().0;
        if let Some(job) = jobs.iter().find(|j| j.index as usize >= n) {
            return Err(format!(
                "replay holds {n} images; image {} was asked for",
                job.index
            ));
        }
        Ok(())
    }

    fn predicted_tokens(&self, plan: &Plan, step: usize, job: ImageJob) -> Option<Vec<usize>> {
        let start = plan.steps[step].known_before;
        let n = plan.steps[step].tokens.len();
        let mut tokens: Vec<usize> = self
            .order
            .row(job.index as usize)
            .iter()
            .skip(start)
            .take(n)
            .map(|&t| t as usize)
            .collect();
        tokens.sort_unstable();
        Some(tokens)
    }

    fn token_draws(&self, job: ImageJob, token: usize) -> Box<dyn TokenDraws + '_> {
        Box::new(RecordedDraws {
            replay: self,
            image: job.index as usize,
            token,
        })
    }
}

/// One token's draws read from a [`Replay`].
struct RecordedDraws<'a> {
    replay: &'a Replay,
    image: usize,
    token: usize,
}

impl TokenDraws for RecordedDraws<'_> {
    fn draw(&mut self, tick: Option<usize>, out: &mut [f32]) {
        let (i, t) = (self.image, self.token);
        for (ch, v) in out.iter_mut().enumerate() {
            *v = match tick {
                None => self.replay.init_noise[[i, t, ch]],
                Some(k) => self.replay.step_noise[[i, t, k, ch]],
            };
        }
    }
}

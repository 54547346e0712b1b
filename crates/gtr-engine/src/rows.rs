//! Row layout: the batch's tokens so far (the canvas), the backbone's
//! inputs laid out from it, the draws of a step's predicted tokens (made
//! ahead, while the backbone runs), and the rows a step samples: each
//! predicted token of each image with its chain, detail choice and draws,
//! gathered with its conditioning vector.

use std::sync::Arc;

use ndarray::{Array1, Array2, Array3, Array4, ArrayView3, Axis};
use rayon::prelude::*;

use super::ImageJob;
use super::noise::{NoiseSource, TokenDraws};
use crate::grid::Grid;
use crate::plan::Plan;
use crate::rng::{Purpose, Stream};
use crate::sampler::fts::{FtsScorer, select};
use crate::sampler::{Chain, ChainCache};

/// One token being sampled in the current MAR step.
pub(super) struct Row<'a> {
    pub image: usize,
    pub token: usize,
    /// The token's place among its image's predicted tokens (its row of
    /// the step's z).
    pub slot: usize,
    pub steps: usize,
    pub chain: Arc<Chain>,
    pub draws: DrawnAhead<'a>,
}

/// One predicted token's draws, made ahead of its chain: its initial noise
/// and its first ticks' draws, with its stream kept to draw more.
pub(super) struct DrawnAhead<'a> {
    /// The initial noise, then one draw per tick: (1 + ticks) · C values.
    values: Vec<f32>,
    stream: Box<dyn TokenDraws + 'a>,
    channels: usize,
}

impl<'a> DrawnAhead<'a> {
    /// The initial noise and `ticks` ticks' draws from `stream`.
    fn new(mut stream: Box<dyn TokenDraws + 'a>, channels: usize, ticks: usize) -> Self {
        let mut values = vec![0f32; channels];
        stream.draw(None, &mut values);
        let mut drawn = DrawnAhead {
            values,
            stream,
            channels,
        };
        drawn.extend_to(ticks);
        drawn
    }

    /// Ticks whose draws are held.
    fn ticks(&self) -> usize {
        self.values.len() / self.channels - 1
    }

    /// Draws on from where the stream stopped until `ticks` ticks are held.
    pub fn extend_to(&mut self, ticks: usize) {
        let c = self.channels;
        for tick in self.ticks()..ticks {
            let start = self.values.len();
            self.values.resize(start + c, 0.0);
            self.stream.draw(Some(tick), &mut self.values[start..]);
        }
    }

    /// The initial noise.
    pub fn initial(&self) -> &[f32] {
        &self.values[..self.channels]
    }

    /// Tick `tick`'s draw; the tick must be held ([`DrawnAhead::extend_to`]).
    pub fn tick(&self, tick: usize) -> &[f32] {
        let c = self.channels;
        &self.values[(1 + tick) * c..(2 + tick) * c]
    }
}

/// The draws of each image's predicted tokens (`tokens[img]`, ascending),
/// `ticks[img]` ticks each, made in parallel: each token draws from its own
/// stream, so the values do not depend on the threads. Indexed [image][slot].
pub(super) fn draw_ahead<'a>(
    noise: &'a dyn NoiseSource,
    jobs: &[ImageJob],
    tokens: &[Vec<usize>],
    ticks: &[usize],
    channels: usize,
) -> Vec<Vec<DrawnAhead<'a>>> {
    jobs.par_iter()
        .zip(tokens)
        .zip(ticks)
        .map(|((&job, tokens), &ticks)| {
            tokens
                .par_iter()
                .map(|&t| DrawnAhead::new(noise.token_draws(job, t), channels, ticks))
                .collect()
        })
        .collect()
}

/// The batch's tokens as sampling fills them in.
pub(super) struct Canvas {
    /// [B, L, C], zero where not yet known.
    pub tokens: Array3<f32>,
    /// Each image's known tokens, ascending.
    known: Vec<Vec<usize>>,
    /// Which tokens got FTS detail steps [B, L].
    pub detail: Array2<bool>,
}

/// The backbone's inputs for one step: `rows_b` = B rows, or 2B with
/// guidance (conditional first, then unconditional with the null class).
pub(super) struct BackboneInputs {
    pub canvas: Array3<f32>,
    pub known: Array2<i64>,
    pub labels: Array1<i64>,
}

impl Canvas {
    pub fn new(images: usize, tokens: usize, channels: usize) -> Canvas {
        Canvas {
            tokens: Array3::zeros((images, tokens, channels)),
            known: vec![Vec::new(); images],
            detail: Array2::from_elem((images, tokens), false),
        }
    }

    /// The backbone's inputs when `known_before` tokens of each image are
    /// known, with an unconditional copy of the batch when `guided`.
    pub fn backbone_inputs(
        &self,
        jobs: &[ImageJob],
        guided: bool,
        null_class: i64,
        known_before: usize,
    ) -> BackboneInputs {
        let (b, l, c) = self.tokens.dim();
        let rows = if guided { 2 * b } else { b };
        let mut inputs = BackboneInputs {
            canvas: Array3::zeros((rows, l, c)),
            known: Array2::zeros((rows, known_before)),
            labels: Array1::zeros(rows),
        };
        for r in 0..rows {
            let img = r % b;
            inputs
                .canvas
                .index_axis_mut(Axis(0), r)
                .assign(&self.tokens.index_axis(Axis(0), img));
            for (slot, &t) in self.known[img].iter().enumerate() {
                inputs.known[[r, slot]] = t as i64;
            }
            inputs.labels[r] = if r < b { jobs[img].label } else { null_class };
        }
        inputs
    }

    /// Whether image `img` knows token `t`.
    pub fn is_known(&self, img: usize, t: usize) -> bool {
        self.known[img].binary_search(&t).is_ok()
    }

    /// Writes the sampled tokens `x` ([rows · C], in `rows`' order) into the
    /// canvas; they are known from now on.
    pub fn write_back(&mut self, rows: &[Row], x: &[f32]) {
        let c = self.tokens.dim().2;
        for (r, row) in rows.iter().enumerate() {
            for ch in 0..c {
                self.tokens[[row.image, row.token, ch]] = x[r * c + ch];
            }
            self.known[row.image].push(row.token);
        }
        for list in &mut self.known {
            list.sort_unstable();
        }
    }

    /// The VAE's input: tokens divided by the latent scale, unpatchified to
    /// [B, C, h, w].
    pub fn latent(&self, grid: Grid, latent_scale: f64) -> Array4<f32> {
        let (b, l, c) = self.tokens.dim();
        let mut latent = Array4::<f32>::zeros((b, c, grid.height, grid.width));
        let inv = 1.0 / latent_scale;
        for img in 0..b {
            for t in 0..l {
                let (i, j) = grid.cell(t);
                for ch in 0..c {
                    latent[[img, ch, i, j]] = (f64::from(self.tokens[[img, t, ch]]) * inv) as f32;
                }
            }
        }
        latent
    }
}

/// What laying out a step's rows needs besides the plans.
pub(super) struct RowSources<'a> {
    pub jobs: &'a [ImageJob],
    pub chains: &'a mut ChainCache,
    /// Cloned per thread for the detail choices.
    pub fts: &'a FtsScorer,
}

impl RowSources<'_> {
    /// The rows of step `s`: every token of `predicted` (per image,
    /// ascending) with its chain (FTS detail tokens chosen by their
    /// conditioning vectors in `z` [B.., N, D], one row per predicted
    /// token) and its draws from `drawn` (same layout as `predicted`,
    /// drawn on as far as the chain needs), marked in `detail`; longest
    /// chains first (stable: image and token order otherwise), each row's
    /// initial noise in `x` [rows · C].
    pub fn step_rows<'d>(
        &mut self,
        plans: &[Plan],
        s: usize,
        predicted: &[Vec<usize>],
        drawn: Vec<Vec<DrawnAhead<'d>>>,
        z: ArrayView3<f32>,
        detail: &mut Array2<bool>,
    ) -> (Vec<Row<'d>>, Vec<f32>) {
        // Each image's detail choice, images in parallel (an FFT scorer each).
        let jobs = self.jobs;
        let chosen: Vec<Vec<bool>> = plans
            .par_iter()
            .enumerate()
            .map_init(
                || self.fts.clone(),
                |fts, (img, plan)| {
                    detail_tokens(fts, jobs[img], plan, s, img, predicted[img].len(), z)
                },
            )
            .collect();
        let mut rows: Vec<Row<'d>> = Vec::new();
        for (((img, plan), drawn), chosen) in plans.iter().enumerate().zip(drawn).zip(chosen) {
            let step = &plan.steps[s];
            let tokens = &predicted[img];
            for (slot, ((&t, &is_detail), draws)) in
                tokens.iter().zip(&chosen).zip(drawn).enumerate()
            {
                let n = match (is_detail, step.detail) {
                    (true, Some(rule)) => rule.steps,
                    _ => step.diffusion_steps,
                } as usize;
                detail[[img, t]] = is_detail;
                let chain = self.chains.get(n, step.clip_timesteps);
                rows.push(Row {
                    image: img,
                    token: t,
                    slot,
                    steps: chain.len(),
                    chain,
                    draws,
                });
            }
        }
        rows.par_iter_mut()
            .for_each(|row| row.draws.extend_to(row.steps));
        rows.sort_by_key(|r| std::cmp::Reverse(r.steps));
        let x = rows
            .iter()
            .flat_map(|row| row.draws.initial())
            .copied()
            .collect();
        (rows, x)
    }
}

/// Which of image `img`'s `count` predicted tokens at step `s` get the
/// step's FTS detail steps: the rule's top `count` by their conditioning
/// vectors' scores (`z[img, slot]`, ties to the lower token), or for
/// `random` the lowest draws of the image's selection stream (from `job`'s
/// seed, one block per step).
fn detail_tokens(
    fts: &mut FtsScorer,
    job: ImageJob,
    plan: &Plan,
    s: usize,
    img: usize,
    count: usize,
    z: ArrayView3<f32>,
) -> Vec<bool> {
    let Some(rule) = plan.steps[s].detail else {
        return vec![false; count];
    };
    let scores: Vec<f64> = (0..count)
        .map(|slot| {
            let row = z.slice(ndarray::s![img, slot, ..]);
            fts.score(row.as_slice().expect("z rows are contiguous"))
        })
        .collect();
    let mut selection = Stream::new(job.seed, Purpose::Selection);
    selection.seek_block(s as u64);
    let draws: Vec<u64> = (0..count).map(|_| selection.next_u64()).collect();
    select(&scores, rule.count, rule.selector, &draws)
}

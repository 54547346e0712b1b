//! Adaptive steps (`order adaptive by high_freq|low_freq`): which of a
//! stage's still-masked tokens a step reveals is chosen from that step's
//! backbone pass, by the FTS score (GtR eq. 5) of their conditioning
//! vectors, with [`select`] (the ranking FTS detail tokens use).
//!
//! Candidates are listed in the plan's provisional order of the stage (its
//! steps' tokens, step by step, ascending within a step); `select`'s stable
//! ranking gives equal scores to the earlier candidate, so ties fall back to
//! that seeded random order, and a stage whose tokens all score alike is
//! revealed exactly as planned.

use ndarray::{Array2, ArrayView3};

use super::rows::Canvas;
use crate::plan::Plan;
use crate::sampler::fts::{FtsScorer, select};
use crate::schedule::Selector;

/// The tokens of `plan`'s step `s` stage that image `img` of `canvas` does
/// not know yet, in the stage's provisional order.
pub(super) fn candidates(plan: &Plan, s: usize, canvas: &Canvas, img: usize) -> Vec<usize> {
    plan.stage_sequence(plan.steps[s].stage)
        .into_iter()
        .filter(|&t| !canvas.is_known(img, t))
        .collect()
}

/// What an adaptive step chose for each image.
pub(super) struct Choice {
    /// Each image's chosen tokens, ascending.
    pub tokens: Vec<Vec<usize>>,
    /// For each backbone row (B, or 2B with guidance: row r is image
    /// r mod B), the slot in `candidates` of each chosen token, in the
    /// order of `tokens`: the rows of z to keep.
    pub slots: Array2<i64>,
}

/// The top `count` of each image's `candidates` by `selector` on the FTS
/// scores of their conditioning vectors `z` [rows, M, D] (row `img`: the
/// conditional half when guiding). Every image has M candidates.
pub(super) fn choose(
    fts: &mut FtsScorer,
    z: ArrayView3<f32>,
    candidates: &[Vec<usize>],
    count: usize,
    selector: Selector,
) -> Choice {
    let images = candidates.len();
    let mut tokens = Vec::with_capacity(images);
    let mut slots_of = Vec::with_capacity(images);
    for (img, cands) in candidates.iter().enumerate() {
        let scores: Vec<f64> = (0..cands.len())
            .map(|k| {
                let row = z.slice(ndarray::s![img, k, ..]);
                fts.score(row.as_slice().expect("z rows are contiguous"))
            })
            .collect();
        let mask = select(&scores, count, selector, &[]);
        let mut chosen: Vec<(usize, usize)> = cands
            .iter()
            .zip(&mask)
            .enumerate()
            .filter(|(_, (_, keep))| **keep)
            .map(|(slot, (&t, _))| (t, slot))
            .collect();
        chosen.sort_unstable();
        tokens.push(chosen.iter().map(|&(t, _)| t).collect::<Vec<_>>());
        slots_of.push(chosen.iter().map(|&(_, k)| k).collect::<Vec<_>>());
    }
    let rows = z.dim().0;
    let n = tokens.first().map_or(0, Vec::len);
    let slots = Array2::from_shape_fn((rows, n), |(r, j)| slots_of[r % images][j] as i64);
    Choice { tokens, slots }
}

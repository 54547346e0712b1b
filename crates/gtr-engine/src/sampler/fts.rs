//! Frequency-weighted token selection (GtR paper §3.3, eq. 5).
//!
//! A token's score is `s = Σ_{n=1}^{⌊D/2⌋} |DFT(z)(n)| · (1 + n/⌊D/2⌋)`
//! over its conditional conditioning vector z ∈ R^D: the DC term is left
//! out and higher frequencies weigh more.
//!
//! Ranking scope: the tokens one MAR step predicts for one image. The count
//! chosen is fixed by the plan (`clamp(round_half_even(β·n), 1, n)`). Ties
//! go to the lower token index.

use std::sync::Arc;

use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};

use crate::schedule::Selector;

/// Scores conditioning vectors of one width D, reusing one FFT plan (a
/// clone shares the plan and has buffers of its own).
#[derive(Clone)]
pub struct FtsScorer {
    fft: Arc<dyn Fft<f64>>,
    buffer: Vec<Complex<f64>>,
    scratch: Vec<Complex<f64>>,
}

impl FtsScorer {
    pub fn new(width: usize) -> Self {
        let fft = FftPlanner::new().plan_fft_forward(width);
        let scratch = vec![Complex::new(0.0, 0.0); fft.get_inplace_scratch_len()];
        FtsScorer {
            fft,
            buffer: vec![Complex::new(0.0, 0.0); width],
            scratch,
        }
    }

    /// Eq. 5 for one vector (its length must be the width given to `new`).
    pub fn score(&mut self, z: &[f32]) -> f64 {
        assert_eq!(z.len(), self.buffer.len(), "FTS width");
        for (b, &v) in self.buffer.iter_mut().zip(z) {
            *b = Complex::new(f64::from(v), 0.0);
        }
        self.fft
            .process_with_scratch(&mut self.buffer, &mut self.scratch);
        let half = z.len() / 2;
        if half == 0 {
            return 0.0;
        }
        (1..=half)
            .map(|n| self.buffer[n].norm() * (1.0 + n as f64 / half as f64))
            .sum()
    }
}

/// Which of `n` tokens get the detail steps: `scores[k]` belongs to the k-th
/// token in ascending token order; `random_draws` supplies one uniform u64
/// per token for the random selector. Returns a mask of length `n`.
pub fn select(scores: &[f64], count: usize, selector: Selector, random_draws: &[u64]) -> Vec<bool> {
    let n = scores.len();
    let count = count.min(n);
    let mut rank: Vec<usize> = (0..n).collect();
    match selector {
        Selector::All => return vec![true; n],
        // Stable sorts keep lower token indices first among equal keys.
        Selector::HighFreq => rank.sort_by(|&a, &b| scores[b].total_cmp(&scores[a])),
        Selector::LowFreq => rank.sort_by(|&a, &b| scores[a].total_cmp(&scores[b])),
        Selector::Random => rank.sort_by_key(|&k| random_draws[k]),
    }
    let mut mask = vec![false; n];
    for &k in &rank[..count] {
        mask[k] = true;
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Eq. 5 with a naive O(D²) DFT.
    fn naive(z: &[f32]) -> f64 {
        let d = z.len();
        let half = d / 2;
        (1..=half)
            .map(|n| {
                let (mut re, mut im) = (0.0f64, 0.0f64);
                for (k, &v) in z.iter().enumerate() {
                    let a = -2.0 * std::f64::consts::PI * (n * k) as f64 / d as f64;
                    re += f64::from(v) * a.cos();
                    im += f64::from(v) * a.sin();
                }
                (re * re + im * im).sqrt() * (1.0 + n as f64 / half as f64)
            })
            .sum()
    }

    #[test]
    fn fft_score_matches_naive_dft() {
        for d in [1, 2, 7, 16, 32, 768, 1280] {
            let z: Vec<f32> = (0..d)
                .map(|k| ((k * 37 % 11) as f32 - 5.0) * 0.3 + (k as f32 * 0.1).sin())
                .collect();
            let mut s = FtsScorer::new(d);
            let (a, b) = (s.score(&z), naive(&z));
            assert!(
                (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                "D={d}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn constant_vectors_score_zero_and_detail_scores_high() {
        let mut s = FtsScorer::new(8);
        assert!(s.score(&[1.0; 8]) < 1e-12);
        let smooth = s.score(&[1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0]);
        let sharp = s.score(&[1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0]);
        assert!(sharp > smooth);
    }

    #[test]
    fn selection_rules() {
        let scores = [0.5, 3.0, 1.0, 3.0, 0.1];
        // The lowest draws are neither the highest nor the lowest scores.
        let draws = [1, 5, 2, 4, 3];
        assert_eq!(
            select(&scores, 2, Selector::HighFreq, &draws),
            [false, true, false, true, false]
        );
        assert_eq!(
            select(&scores, 1, Selector::HighFreq, &draws),
            [false, true, false, false, false]
        );
        assert_eq!(
            select(&scores, 2, Selector::LowFreq, &draws),
            [true, false, false, false, true]
        );
        assert_eq!(
            select(&scores, 2, Selector::Random, &draws),
            [true, false, true, false, false]
        );
        assert_eq!(
            select(&scores, 1, Selector::Random, &[4, 3, 9, 0, 7]),
            [false, false, false, true, false]
        );
        assert_eq!(select(&scores, 1, Selector::All, &draws), [true; 5]);
    }
}

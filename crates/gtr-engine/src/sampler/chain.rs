//! MAR's diffusion arithmetic (mar.md §3): the cosine noise schedule, its
//! respacing to any number of steps, and one reverse (`p_sample`) update.
//!
//! Schedule tables are f64, as guided-diffusion computes them; tensors are
//! f32 and each update is computed in f64 and stored back as f32.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// How the reverse-process variance is chosen (guided-diffusion's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variance {
    /// The head predicts v in [-1, 1] interpolating, in log space, between
    /// β'ᵢ and the clipped posterior variance (MAR: `learn_sigma=True`).
    LearnedRange,
    /// The posterior variance (clipped log).
    FixedSmall,
    /// β'ᵢ (with the first entry replaced by the posterior variance of step 1).
    FixedLarge,
}

/// ᾱ of the training chain: the cosine schedule of Nichol & Dhariwal with
/// βᵢ = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), 0.999).
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    pub fn cosine(train_steps: usize) -> Self {
        let abar = |s: f64| {
            (((s + 0.008) / 1.008) * std::f64::consts::FRAC_PI_2)
                .cos()
                .powi(2)
        };
        let n = train_steps as f64;
        let mut acc = 1.0;
        let alphas_cumprod = (0..train_steps)
            .map(|i| {
                let beta = (1.0 - abar((i as f64 + 1.0) / n) / abar(i as f64 / n)).min(0.999);
                acc *= 1.0 - beta;
                acc
            })
            .collect();
        NoiseSchedule { alphas_cumprod }
    }

    pub fn train_steps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// The training-chain timesteps kept when respacing to `steps`,
    /// clipped to at most `clip` ([`crate::plan::respaced_timesteps`]).
    pub fn respaced_timesteps(&self, steps: usize, clip: Option<u32>) -> Vec<usize> {
        crate::plan::respaced_timesteps(self.train_steps(), steps, clip)
    }

    /// The respaced chain with `steps` steps, clipped to at most `clip`
    /// (then it may have fewer).
    pub fn respace(&self, steps: usize, clip: Option<u32>) -> Chain {
        Chain::new(self, &self.respaced_timesteps(steps, clip))
    }
}

/// A respaced reverse chain; index `i` runs from `len()−1` down to 0.
#[derive(Debug, Clone)]
pub struct Chain {
    /// Training-chain timestep τᵢ fed to the network at index i.
    pub timesteps: Vec<i64>,
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    pub posterior_variance: Vec<f64>,
    pub posterior_log_variance_clipped: Vec<f64>,
    pub coef1: Vec<f64>,
    pub coef2: Vec<f64>,
    /// √(1/ᾱ'ᵢ), √(1/ᾱ'ᵢ − 1) and log β'ᵢ, precomputed for [`Chain::step`].
    sqrt_recip_acp: Vec<f64>,
    sqrt_recipm1_acp: Vec<f64>,
    log_betas: Vec<f64>,
}

impl Chain {
    fn new(schedule: &NoiseSchedule, kept: &[usize]) -> Chain {
        let acp_full = schedule.alphas_cumprod();
        let mut betas = Vec::with_capacity(kept.len());
        let mut last = 1.0;
        for &t in kept {
            betas.push(1.0 - acp_full[t] / last);
            last = acp_full[t];
        }
        let mut acp = Vec::with_capacity(betas.len());
        let mut acc = 1.0;
        for b in &betas {
            acc *= 1.0 - b;
            acp.push(acc);
        }
        let n = betas.len();
        let prev = |i: usize| if i == 0 { 1.0 } else { acp[i - 1] };
        let posterior_variance: Vec<f64> = (0..n)
            .map(|i| betas[i] * (1.0 - prev(i)) / (1.0 - acp[i]))
            .collect();
        // Entry 0 is 0; guided-diffusion replaces it by entry 1. A one-step
        // chain has no entry 1; its index 0 adds no noise, so the value is
        // never used and we keep log β'₀ to stay finite.
        let posterior_log_variance_clipped = (0..n)
            .map(|i| match (i, n) {
                (0, 1) => betas[0].ln(),
                (0, _) => posterior_variance[1].ln(),
                _ => posterior_variance[i].ln(),
            })
            .collect();
        let coef1 = (0..n)
            .map(|i| betas[i] * prev(i).sqrt() / (1.0 - acp[i]))
            .collect();
        let coef2 = (0..n)
            .map(|i| (1.0 - prev(i)) * (1.0 - betas[i]).sqrt() / (1.0 - acp[i]))
            .collect();
        Chain {
            sqrt_recip_acp: acp.iter().map(|a| (1.0 / a).sqrt()).collect(),
            sqrt_recipm1_acp: acp.iter().map(|a| (1.0 / a - 1.0).sqrt()).collect(),
            log_betas: betas.iter().map(|b| b.ln()).collect(),
            timesteps: kept.iter().map(|&t| t as i64).collect(),
            betas,
            alphas_cumprod: acp,
            posterior_variance,
            posterior_log_variance_clipped,
            coef1,
            coef2,
        }
    }

    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// The update at index `i` as a sampler graph takes it (models/README.md,
    /// "sampler graph"): `[A, B, log β'ᵢ, log σ²ᵢ, scale]` with
    /// x ← A·x − B·ε + scale·exp(½·log σ²)·noise, where A·x − B·ε is
    /// [`Chain::step`]'s posterior mean folded into two coefficients, and
    /// log σ² is frac·log β'ᵢ + (1 − frac)·(fourth entry) under the learned
    /// range, the fourth entry alone under fixed variances. `scale` is the
    /// temperature, 0 at i = 0 (the last update adds no noise).
    pub fn tick_coefficients(&self, i: usize, variance: Variance, temperature: f64) -> [f64; 5] {
        let a = self.coef1[i] * self.sqrt_recip_acp[i] + self.coef2[i];
        let b = self.coef1[i] * self.sqrt_recipm1_acp[i];
        let log_var = match variance {
            Variance::LearnedRange | Variance::FixedSmall => self.posterior_log_variance_clipped[i],
            Variance::FixedLarge => self.log_betas[i],
        };
        let scale = if i == 0 { 0.0 } else { temperature };
        [a, b, self.log_betas[i], log_var, scale]
    }

    /// One reverse update at index `i` of one token, in place on `x`.
    ///
    /// `eps` is the (guided) noise prediction, `v` the variance output of the
    /// conditional pass (learned range only), `noise` the standard normal
    /// draw for this iteration (unused at i = 0, which adds no noise).
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        i: usize,
        variance: Variance,
        x: &mut [f32],
        eps: &[f64],
        v: &[f32],
        noise: &[f32],
        temperature: f64,
    ) {
        let recip = self.sqrt_recip_acp[i];
        let recipm1 = self.sqrt_recipm1_acp[i];
        let (c1, c2) = (self.coef1[i], self.coef2[i]);
        let log_beta = self.log_betas[i];
        let log_post = self.posterior_log_variance_clipped[i];
        for c in 0..x.len() {
            let xc = f64::from(x[c]);
            let x0 = recip * xc - recipm1 * eps[c];
            let mean = c1 * x0 + c2 * xc;
            let out = if i == 0 {
                mean
            } else {
                let log_var = match variance {
                    Variance::LearnedRange => {
                        let frac = (f64::from(v[c]) + 1.0) / 2.0;
                        frac * log_beta + (1.0 - frac) * log_post
                    }
                    Variance::FixedSmall => log_post,
                    Variance::FixedLarge => {
                        if i == 0 {
                            log_post
                        } else {
                            log_beta
                        }
                    }
                };
                mean + (0.5 * log_var).exp() * f64::from(noise[c]) * temperature
            };
            x[c] = out as f32;
        }
    }
}

/// Respaced chains by step count and clip, built once and shared.
#[derive(Debug)]
pub struct ChainCache {
    schedule: NoiseSchedule,
    chains: HashMap<(usize, Option<u32>), Arc<Chain>>,
}

impl ChainCache {
    pub fn new(schedule: NoiseSchedule) -> Self {
        ChainCache {
            schedule,
            chains: HashMap::new(),
        }
    }

    /// The chain of `steps` steps clipped to `clip` ([`NoiseSchedule::respace`]).
    pub fn get(&mut self, steps: usize, clip: Option<u32>) -> Arc<Chain> {
        let schedule = &self.schedule;
        Arc::clone(
            self.chains
                .entry((steps, clip))
                .or_insert_with(|| Arc::new(schedule.respace(steps, clip))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-300)
    }

    #[test]
    fn cosine_schedule_matches_mar_reference_values() {
        let s = NoiseSchedule::cosine(1000);
        let acp = s.alphas_cumprod();
        assert!(close(1.0 - acp[0], 4.1284e-5, 1e-4));
        assert!(close(acp[0], 0.99995872, 1e-8));
        assert!(close(acp[999], 2.4288e-9, 1e-3));
    }

    #[test]
    fn chain_100_matches_mar_reference_values() {
        let c = NoiseSchedule::cosine(1000).respace(100, None);
        assert!(close(c.betas[0], 4.1284e-5, 1e-4));
        assert!(close(c.betas[1], 6.7984e-4, 1e-4));
        assert!(close(c.betas[99], 0.99998999, 1e-7));
        assert!(close(c.posterior_variance[1], 3.8922e-5, 1e-4));
        assert!(close(c.posterior_log_variance_clipped[0], -10.153945, 1e-6));
        assert!((c.posterior_log_variance_clipped[99] - -0.000253).abs() < 1e-6);
    }

    /// The folded coefficients give [`Chain::step`]'s update.
    #[test]
    fn tick_coefficients_reproduce_the_step() {
        let chain = NoiseSchedule::cosine(1000).respace(50, None);
        for variance in [
            Variance::LearnedRange,
            Variance::FixedSmall,
            Variance::FixedLarge,
        ] {
            for i in [0, 1, 17, 49] {
                let (x0, eps, v, noise) =
                    ([0.7f32, -1.3], [0.2, -0.4], [0.3f32, -0.9], [1.1f32, -0.6]);
                let mut want = x0;
                chain.step(i, variance, &mut want, &eps, &v, &noise, 0.8);
                let [a, b, log_beta, log_var, scale] = chain.tick_coefficients(i, variance, 0.8);
                for c in 0..2 {
                    let lv = match variance {
                        Variance::LearnedRange => {
                            let frac = (f64::from(v[c]) + 1.0) / 2.0;
                            frac * log_beta + (1.0 - frac) * log_var
                        }
                        _ => log_var,
                    };
                    let got = a * f64::from(x0[c]) - b * eps[c]
                        + scale * (0.5 * lv).exp() * f64::from(noise[c]);
                    let w = f64::from(want[c]);
                    assert!(
                        (got - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "{variance:?} i={i} c={c}: {got} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn last_step_adds_no_noise_and_one_step_chains_are_finite() {
        let c = NoiseSchedule::cosine(1000).respace(1, None);
        let mut x = [0.5f32, -1.0];
        c.step(
            0,
            Variance::LearnedRange,
            &mut x,
            &[0.1, 0.2],
            &[1.0, 1.0],
            &[9.0, 9.0],
            1.0,
        );
        assert!(x.iter().all(|v| v.is_finite()));
        let mut y = [0.5f32, -1.0];
        c.step(
            0,
            Variance::LearnedRange,
            &mut y,
            &[0.1, 0.2],
            &[1.0, 1.0],
            &[-9.0, 3.0],
            1.0,
        );
        assert_eq!(x, y, "noise must not matter at i = 0");
    }
}

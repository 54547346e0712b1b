//! Analytic cost of a plan: network evaluations and FLOPs, following
//! mar.md §7 (FLOPs = 2 × multiply-accumulates; LayerNorm, softmax and
//! activations ignored; VAE decoding not included, as in the GtR paper).
//!
//! Adaptive steps (`order adaptive`) add work outside the networks: the
//! backbone computes z for every token anyway, but it returns the rows of
//! all of the stage's still-masked tokens (both CFG branches) instead of
//! the step's, and the host scores the conditional row of each with eq. 5
//! (an FFT of width D). [`Cost::adaptive_candidates`] counts those scores
//! and [`Cost::scoring_flops`] estimates their FLOPs. FTS detail scores
//! (a step's own tokens) are not counted.

use serde::{Deserialize, Serialize};

use crate::plan::Plan;

/// The shape of a MAR model, as far as cost is concerned.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSpec {
    pub name: String,
    /// Encoder and decoder width D.
    pub width: u64,
    /// Encoder depth (= decoder depth in MAR).
    pub encoder_depth: u64,
    pub decoder_depth: u64,
    /// Diffusion MLP width W and number of residual blocks d.
    pub diffusion_width: u64,
    pub diffusion_depth: u64,
    /// Token (latent) dimension: 16 for KL-16.
    pub token_dim: u64,
    /// Class-embedding buffer slots prepended to the sequence: 64 in MAR.
    pub buffer: u64,
    /// Steps of the training diffusion chain (1000 in MAR): what a
    /// `clip_timesteps` chain's length depends on.
    pub train_steps: usize,
}

impl ModelSpec {
    fn mar(name: &str, width: u64, depth: u64, dw: u64, dd: u64) -> Self {
        ModelSpec {
            name: name.into(),
            width,
            encoder_depth: depth,
            decoder_depth: depth,
            diffusion_width: dw,
            diffusion_depth: dd,
            token_dim: 16,
            buffer: 64,
            train_steps: 1000,
        }
    }

    /// The built-in specs `mar-b`, `mar-l`, `mar-h` (mar.md §1.1).
    pub fn builtin(name: &str) -> Option<ModelSpec> {
        match name.to_ascii_lowercase().as_str() {
            "mar-b" | "mar_base" => Some(Self::mar("mar-b", 768, 12, 1024, 6)),
            "mar-l" | "mar_large" => Some(Self::mar("mar-l", 1024, 16, 1280, 8)),
            "mar-h" | "mar_huge" => Some(Self::mar("mar-h", 1280, 20, 1536, 12)),
            _ => None,
        }
    }

    pub const BUILTIN_NAMES: [&'static str; 3] = ["mar-b", "mar-l", "mar-h"];

    /// MACs of one pre-norm transformer block over `n` tokens.
    fn block_macs(&self, n: u64) -> u64 {
        let d = self.width;
        12 * d * d * n + 2 * n * n * d
    }

    /// MACs of one encoder pass (one CFG branch) with `known` tokens known,
    /// on a grid of `seq` tokens: blocks over buffer + known tokens, the token
    /// projection over the whole grid, and the encoder→decoder projection.
    pub fn encoder_macs(&self, known: u64, seq: u64) -> u64 {
        let n = self.buffer + known;
        self.encoder_depth * self.block_macs(n)
            + seq * self.token_dim * self.width
            + n * self.width * self.width
    }

    /// MACs of one decoder pass: always the full buffer + grid sequence.
    pub fn decoder_macs(&self, seq: u64) -> u64 {
        self.decoder_depth * self.block_macs(self.buffer + seq)
    }

    /// FLOPs of one eq. 5 score of a conditioning vector, estimated as a
    /// complex FFT of width D (5·D·log2 D) plus the weighted magnitudes of
    /// its D/2 frequencies (5 each).
    pub fn score_flops(&self) -> f64 {
        let d = self.width as f64;
        5.0 * d * d.log2().max(0.0) + 5.0 * (self.width / 2) as f64
    }

    /// MACs of one diffusion-MLP evaluation of one token.
    pub fn diffusion_row_macs(&self) -> u64 {
        let (w, d) = (self.diffusion_width, self.diffusion_depth);
        self.token_dim * w
            + (256 * w + w * w)
            + self.width * w
            + d * 5 * w * w
            + (2 * w * w + 2 * self.token_dim * w)
    }
}

/// What a plan costs per image on a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    pub model: String,
    pub mar_steps: usize,
    /// Encoder and decoder passes, counting each CFG branch.
    pub encoder_passes: u64,
    pub decoder_passes: u64,
    /// Diffusion-MLP rows × steps, counting each CFG branch.
    pub diffusion_evaluations: u64,
    pub encoder_flops: f64,
    pub decoder_flops: f64,
    pub diffusion_flops: f64,
    /// Conditioning vectors scored to choose adaptive steps' tokens: at
    /// each adaptive step, every still-masked token of its stage (absent,
    /// i.e. 0, without adaptive steps).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub adaptive_candidates: u64,
    /// FLOPs of those scores, [`ModelSpec::score_flops`] each.
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub scoring_flops: f64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

impl Cost {
    /// Network FLOPs plus the adaptive steps' scoring.
    pub fn total_flops(&self) -> f64 {
        self.encoder_flops + self.decoder_flops + self.diffusion_flops + self.scoring_flops
    }
}

/// A [`Cost`] with its total, as `plan --json` and `run.json` write it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PricedCost {
    #[serde(flatten)]
    pub cost: Cost,
    /// [`Cost::total_flops`].
    pub total_flops: f64,
}

impl From<Cost> for PricedCost {
    fn from(cost: Cost) -> Self {
        let total_flops = cost.total_flops();
        PricedCost { cost, total_flops }
    }
}

/// The cost of `plan` on `spec`, per image. CFG doubles every network
/// evaluation of a guided step (both branches run); adaptive steps score
/// the conditional branch only.
pub fn plan_cost(plan: &Plan, spec: &ModelSpec) -> Cost {
    let seq = plan.grid.len() as u64;
    let mut cost = Cost {
        model: spec.name.clone(),
        mar_steps: plan.steps.len(),
        encoder_passes: 0,
        decoder_passes: 0,
        diffusion_evaluations: 0,
        encoder_flops: 0.0,
        decoder_flops: 0.0,
        diffusion_flops: 0.0,
        adaptive_candidates: 0,
        scoring_flops: 0.0,
    };
    let row = spec.diffusion_row_macs() as f64;
    for (s, step) in plan.steps.iter().enumerate() {
        if step.adaptive.is_some() {
            let masked: usize = plan.steps[s..]
                .iter()
                .take_while(|later| later.stage == step.stage)
                .map(|later| later.tokens.len())
                .sum();
            cost.adaptive_candidates += masked as u64;
            cost.scoring_flops += masked as f64 * spec.score_flops();
        }
        let branches = if step.cfg.is_some() { 2 } else { 1 };
        cost.encoder_passes += branches;
        cost.decoder_passes += branches;
        let evals = branches * step.diffusion_rows(spec.train_steps);
        cost.diffusion_evaluations += evals;
        let b = branches as f64;
        cost.encoder_flops += 2.0 * b * spec.encoder_macs(step.known_before as u64, seq) as f64;
        cost.decoder_flops += 2.0 * b * spec.decoder_macs(seq) as f64;
        cost.diffusion_flops += 2.0 * evals as f64 * row;
    }
    cost
}

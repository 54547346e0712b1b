//! Analytic cost of a plan: network evaluations and FLOPs, following
//! mar.md §7 (FLOPs = 2 × multiply-accumulates; LayerNorm, softmax and
//! activations ignored; VAE decoding not included, as in the GtR paper).

use serde::Serialize;

use crate::plan::Plan;

/// Why [`ModelSpec::named`] found no spec.
#[derive(Debug, thiserror::Error)]
pub enum NamedSpecError {
    #[error(
        "{name}: no such model spec or bundle; the built-in specs are {list}, or give a model bundle",
        name = .0,
        list = ModelSpec::BUILTIN_NAMES.join(", ")
    )]
    Unknown(String),
    #[error(transparent)]
    Bundle(#[from] crate::bundle::BundleError),
}

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

    /// A built-in spec by name (see [`ModelSpec::builtin`]), else the cost
    /// shape of the model bundle at the path `name` (`gtr-run plan --cost`).
    pub fn named(name: &str) -> Result<ModelSpec, NamedSpecError> {
        match Self::builtin(name) {
            Some(spec) => Ok(spec),
            None if std::path::Path::new(name).exists() => {
                Ok(crate::bundle::Bundle::open(std::path::Path::new(name))?.cost_spec())
            }
            None => Err(NamedSpecError::Unknown(name.to_string())),
        }
    }

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
#[derive(Debug, Clone, PartialEq, Serialize)]
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
}

impl Cost {
    pub fn total_flops(&self) -> f64 {
        self.encoder_flops + self.decoder_flops + self.diffusion_flops
    }
}

/// The cost of `plan` on `spec`, per image. CFG doubles every network
/// evaluation of a guided step (both branches run).
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
    };
    let row = spec.diffusion_row_macs() as f64;
    for step in &plan.steps {
        let branches = if step.cfg.is_some() { 2 } else { 1 };
        cost.encoder_passes += branches;
        cost.decoder_passes += branches;
        let evals = branches * step.diffusion_rows();
        cost.diffusion_evaluations += evals;
        let b = branches as f64;
        cost.encoder_flops += 2.0 * b * spec.encoder_macs(step.known_before as u64, seq) as f64;
        cost.decoder_flops += 2.0 * b * spec.decoder_macs(seq) as f64;
        cost.diffusion_flops += 2.0 * evals as f64 * row;
    }
    cost
}

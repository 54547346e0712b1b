//! The narrow interface between the engine and a MAR model.

use ndarray::{Array2, Array3, Array4, ArrayView1, ArrayView2, ArrayView3, ArrayView4};
use serde::{Deserialize, Serialize};

use crate::grid::Grid;
use crate::sampler::Variance;
use gtr_plan::plan::PlanOptions;

/// The images a model's VAE decodes to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSettings {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

/// Guidance and temperature a model samples with unless told otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingDefaults {
    pub cfg: f64,
    pub temperature: f64,
}

impl SamplingDefaults {
    /// How a run on a model with these defaults plans: stages without
    /// `cfg` get `cfg` with MAR's linear schedule, stages without a
    /// temperature get `temperature`; `cfg` and `temperature` given (the
    /// flags) replace every stage's.
    pub fn plan_options(self, cfg: Option<f64>, temperature: Option<f64>) -> PlanOptions {
        PlanOptions {
            default_cfg: Some(self.cfg),
            default_temperature: Some(self.temperature),
            cfg,
            temperature,
        }
    }
}

/// What the engine needs to know about a model; a bundle's is
/// gtr-ort's `Bundle::model_info`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub grid: Grid,
    /// C: channels of one token.
    pub token_dim: usize,
    /// D: width of the conditioning vectors z.
    pub width: usize,
    /// Number of classes (0: unconditional).
    pub classes: usize,
    /// The label value that selects the null (unconditional) embedding.
    pub null_class: i64,
    pub latent_scale: f64,
    pub train_steps: usize,
    pub variance: Variance,
    pub image: ImageSettings,
    pub defaults: SamplingDefaults,
}

impl ModelInfo {
    /// Channels of the diffusion head's output: ε, plus v when learned.
    pub fn head_channels(&self) -> usize {
        match self.variance {
            Variance::LearnedRange => 2 * self.token_dim,
            _ => self.token_dim,
        }
    }
}

/// A model failure, named by graph (and tensor where it applies).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("graph `{graph}`: {message}")]
    Graph {
        graph: &'static str,
        message: String,
    },
    #[error("graph `{graph}`, output `{tensor}`: shape {got:?}, expected {expected}")]
    Shape {
        graph: &'static str,
        tensor: String,
        got: Vec<usize>,
        expected: String,
    },
    /// An output that breaks the graph's contract otherwise than by its
    /// shape (models/README.md).
    #[error("graph `{graph}`, output `{tensor}`: {problem}")]
    Contract {
        graph: &'static str,
        tensor: String,
        problem: String,
    },
}

impl ModelError {
    /// Whether the model's graph broke its contract (a wrong input, the
    /// bundle's), rather than failing to run.
    pub fn is_contract(&self) -> bool {
        matches!(self, ModelError::Shape { .. } | ModelError::Contract { .. })
    }
}

/// A MAR model as three calls. Batch layouts are the caller's: the engine
/// stacks conditional rows before unconditional ones when guiding.
pub trait MarModel {
    fn info(&self) -> &ModelInfo;

    /// Encoder then decoder: `canvas` [B, L, C] (zeros where unknown),
    /// `known` [B, K] ascending token indices, `labels` `[B]` → z [B, L, D].
    fn backbone(
        &mut self,
        canvas: ArrayView3<f32>,
        known: ArrayView2<i64>,
        labels: ArrayView1<i64>,
    ) -> Result<Array3<f32>, ModelError>;

    /// The backbone's z at the tokens each row predicts: `predict` [B, N]
    /// token indices → [B, N, D] with row `[b, n]` = z[b, predict[b, n]].
    /// The engine calls only this; a model that can gather where z is made
    /// (a fused backbone graph) overrides it, so that only these rows leave
    /// its device.
    fn backbone_rows(
        &mut self,
        canvas: ArrayView3<f32>,
        known: ArrayView2<i64>,
        labels: ArrayView1<i64>,
        predict: ArrayView2<i64>,
    ) -> Result<Array3<f32>, ModelError> {
        let z = self.backbone(canvas, known, labels)?;
        Ok(gather_rows(&z, predict))
    }

    /// One diffusion-head evaluation: `x` [N, C], `t` `[N]` (training-chain
    /// timesteps), `z` [N, D] → [N, head_channels].
    fn diffusion(
        &mut self,
        x: ArrayView2<f32>,
        t: ArrayView1<i64>,
        z: ArrayView2<f32>,
    ) -> Result<Array2<f32>, ModelError>;

    /// The widest MAR step, in head rows at its first tick, whose host
    /// chains run the model's diffusion head in two parts
    /// ([`MarModel::head_condition`] once for the rows of many ticks, then
    /// [`MarModel::head_state`] per tick); 0: the head always runs whole.
    /// [`crate::SPLIT_TICK_ROWS`] is where the split was measured to pay.
    fn split_head_rows(&self) -> usize {
        0
    }

    /// The head's part that reads only `t` `[N]` and `z` [N, D] → `cond`
    /// [N, S] (S is the model's). A row's `cond` does not depend on the
    /// other rows of the call. Only called where
    /// [`MarModel::split_head_rows`] says so.
    fn head_condition(
        &mut self,
        t: ArrayView1<i64>,
        z: ArrayView2<f32>,
    ) -> Result<ConditionRows, ModelError> {
        let _ = (t, z);
        Err(ModelError::Graph {
            graph: "diffusion_condition",
            message: "this model does not split its diffusion head".into(),
        })
    }

    /// The head's part that reads the chain's state: `x` [N, C] and rows of
    /// [`MarModel::head_condition`]'s output → [N, head_channels], what
    /// [`MarModel::diffusion`] gives for the same rows' `x`, `t` and `z`.
    fn head_state(
        &mut self,
        x: ArrayView2<f32>,
        cond: ArrayView2<f32>,
    ) -> Result<Array2<f32>, ModelError> {
        let _ = (x, cond);
        Err(ModelError::Graph {
            graph: "diffusion_state",
            message: "this model does not split its diffusion head".into(),
        })
    }

    /// Whether [`MarModel::backbone_rows`] runs in one fused call that
    /// returns only the predicted rows (else: the backbone, then a gather).
    fn fuses_backbone(&self) -> bool {
        false
    }

    /// Whether the model runs whole diffusion chains ([`MarModel::sample_chain`]).
    fn runs_chains(&self) -> bool {
        false
    }

    /// What runs whole chains when [`MarModel::runs_chains`] says so, for
    /// run records: `sampler graph` unless the model says otherwise.
    fn chain_graph(&self) -> String {
        "sampler graph".into()
    }

    /// The bundle role of the graph [`MarModel::sample_chain`] runs and of
    /// its output of the sampled tokens, which errors name: (`sampler`,
    /// `x_out`) unless the model says otherwise (`tick`, `x_next`).
    fn chain_graph_output(&self) -> (&'static str, &'static str) {
        ("sampler", "x_out")
    }

    /// Every tick of one MAR step's diffusion chains in one call (the
    /// contract of models/README.md, "sampler graph") → the sampled tokens
    /// [N, C]. Only called when [`MarModel::runs_chains`] says so.
    fn sample_chain(&mut self, inputs: ChainInputs<'_>) -> Result<Array2<f32>, ModelError> {
        let _ = inputs;
        Err(ModelError::Graph {
            graph: "sampler",
            message: "this model has no sampler graph".into(),
        })
    }

    /// VAE decoder: `latent` [B, C, h, w] → image [B, channels, H, W].
    fn decode_image(&mut self, latent: ArrayView4<f32>) -> Result<Array4<f32>, ModelError>;

    /// A handle on this model's VAE decoder that another thread can call
    /// while the model samples (for a batch's decode to overlap the next
    /// batch's MAR steps), giving what [`MarModel::decode_image`] gives;
    /// else why the model cannot decode beside sampling (the default: it
    /// has no such handle).
    fn image_decoder(&self) -> Result<Box<dyn ImageDecoder>, String> {
        Err("the model decodes only on the thread that samples".into())
    }

    /// Per-graph call counts and seconds, if the model measures them.
    fn graph_stats(&self) -> Vec<GraphStats> {
        Vec::new()
    }

    /// [`MarModel::graph_stats`] of every graph but the VAE decoder
    /// ([`VAE_GRAPH`]), read while a decode may run on another thread
    /// ([`MarModel::image_decoder`]): a model whose VAE statistics wait
    /// for a running decode must not wait here.
    fn sampling_graph_stats(&self) -> Vec<GraphStats> {
        let mut stats = self.graph_stats();
        stats.retain(|g| g.graph != VAE_GRAPH);
        stats
    }

    /// Starts [`MarModel::graph_stats`] afresh (calls, seconds, first-call
    /// and loading seconds at 0), for a model that makes several runs
    /// whose records each measure their own.
    fn reset_graph_stats(&mut self) {}

    /// The execution provider that really runs the graphs.
    fn execution_provider(&self) -> String {
        "none".into()
    }

    /// The numeric precision the graphs run in (`--precision`).
    fn precision(&self) -> String {
        "fp32".into()
    }

    /// Ends the runtime's profiling, where it was asked for, and puts each
    /// graph's [`KernelProfile`] into its [`GraphStats`] (a profile that
    /// cannot be read says why in [`KernelProfile::problem`]). Calls made
    /// after this are not profiled.
    fn end_profiling(&mut self) {}
}

/// A model's VAE decoder, callable on another thread
/// ([`MarModel::image_decoder`]).
pub trait ImageDecoder: Send {
    /// As [`MarModel::decode_image`].
    fn decode_image(&mut self, latent: ArrayView4<f32>) -> Result<Array4<f32>, ModelError>;
}

/// Rows of `z` [B, L, D] at `predict` [B, N] → [B, N, D]. An index
/// outside `0..L` (a model's bug, not an input's) is a panic.
pub fn gather_rows(z: &Array3<f32>, predict: ArrayView2<i64>) -> Array3<f32> {
    let (b, n) = predict.dim();
    let d = z.dim().2;
    let mut out = Array3::<f32>::zeros((b, n, d));
    for ((i, k), &t) in predict.indexed_iter() {
        out.slice_mut(ndarray::s![i, k, ..])
            .assign(&z.slice(ndarray::s![i, t as usize, ..]));
    }
    out
}

/// Columns of [`ChainInputs::coefficients`]: A, B, log β′, log σ²_post and
/// the noise scale.
pub const COEFFICIENTS: usize = 5;

/// One MAR step's chains for [`MarModel::sample_chain`]: N rows (running
/// longest first), T ticks, G = 2 halves with guidance (conditional first),
/// else 1.
#[derive(Debug, Clone, Copy)]
pub struct ChainInputs<'a> {
    /// Initial noise [N, C].
    pub x: ArrayView2<'a, f32>,
    /// Conditioning [G, N, D].
    pub z: ArrayView3<'a, f32>,
    /// Training-chain timestep of each row at each tick [T, N].
    pub timesteps: ArrayView2<'a, i64>,
    /// [`crate::sampler::Chain::tick_coefficients`] of each row at each tick [T, N, 5].
    pub coefficients: ArrayView3<'a, f32>,
    /// Standard normal draws of each row at each tick [T, N, C].
    pub noise: ArrayView3<'a, f32>,
    /// Rows still running at each tick (a prefix) `[T]`.
    pub active: ArrayView1<'a, i64>,
    /// CFG scale (unused when G = 1).
    pub guidance: f32,
}

/// A split head's condition rows `[N, S]`, what
/// [`MarModel::head_condition`] made, kept in the memory the model made
/// them in (on MAR-B a call's rows are 20 MiB: copying them out of the
/// runtime cost more than a second an image).
pub struct ConditionRows {
    rows: usize,
    width: usize,
    values: Box<dyn AsRef<[f32]> + Send + Sync>,
}

impl ConditionRows {
    /// `values`: `rows` rows of `width` floats, row after row; else `None`.
    /// `values.as_ref()` must give the same slice every time it is called.
    pub fn new(
        values: impl AsRef<[f32]> + Send + Sync + 'static,
        rows: usize,
        width: usize,
    ) -> Option<Self> {
        let whole = rows.checked_mul(width)?;
        (values.as_ref().len() == whole).then(|| ConditionRows {
            rows,
            width,
            values: Box::new(values),
        })
    }

    /// N.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// S.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Rows `at..at + m` as `[m, S]`; `None` past the end.
    pub fn slice(&self, at: usize, m: usize) -> Option<ArrayView2<'_, f32>> {
        let end = at.checked_add(m).filter(|&end| end <= self.rows)?;
        let values: &[f32] = (*self.values).as_ref();
        let part = values.get(at * self.width..end * self.width)?;
        ArrayView2::from_shape((m, self.width), part).ok()
    }
}

/// The name of the VAE decoder in errors and in [`GraphStats::graph`]: a
/// model's [`MarModel::graph_stats`] must name its VAE's entry so, since
/// that graph may run on another thread ([`MarModel::image_decoder`]).
pub const VAE_GRAPH: &str = "vae_decoder";

/// Calls of one graph and the seconds spent inside the runtime's run call.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GraphStats {
    pub graph: String,
    pub calls: u64,
    pub seconds: f64,
    /// Seconds to create the graph's session (with TensorRT, where engines
    /// are built or read from the cache).
    pub load_seconds: f64,
    /// Seconds of the first call alone (included in `seconds`).
    pub first_call_seconds: f64,
    /// The runtime's own per-kernel profile of this graph, where one was
    /// asked for (`--ort-profile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernels: Option<KernelProfile>,
}

/// What the runtime's profiler saw of one graph's calls: which execution
/// provider ran its nodes, and where the time went by op type.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KernelProfile {
    /// The profiler's own file (every kernel call, as the runtime wrote it).
    pub file: String,
    /// Why the profile could not be ended or read, if so: the counts below
    /// are then empty (the run itself is not failed for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Events the file holds.
    pub events: u64,
    /// True when the runtime stopped recording at its cap on events: the
    /// counts and seconds below then cover only the start of the run.
    pub truncated: bool,
    /// Per execution provider, by seconds (most first). Control-flow
    /// kernels are not counted here: their bodies' kernels are.
    pub providers: Vec<ProviderKernels>,
    /// Per op type and provider, by seconds (most first).
    pub ops: Vec<OpKernels>,
}

/// The kernels one execution provider ran for a graph.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProviderKernels {
    pub provider: String,
    /// Distinct nodes, by name (subgraph nodes included; same-named nodes
    /// of two subgraphs count once).
    pub nodes: u64,
    /// Kernel calls.
    pub calls: u64,
    pub seconds: f64,
}

/// The kernels of one op type on one execution provider.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OpKernels {
    pub op: String,
    pub provider: String,
    /// Distinct nodes of this op type, by name.
    pub nodes: u64,
    /// Kernel calls.
    pub calls: u64,
    pub seconds: f64,
    /// Share of the graph's kernel seconds (0 to 1); `None` for
    /// control-flow ops (Loop, If, Scan), whose seconds include their
    /// bodies' kernels, counted under their own ops.
    pub share: Option<f64>,
}

/// What an evaluator returns for a batch of images.
#[derive(Debug, Clone)]
pub struct Scores {
    /// Class logits [B, classes].
    pub logits: Array2<f32>,
    /// Feature vectors [B, F] for the Fréchet distance.
    pub features: Array2<f32>,
}

/// An image classifier used to score generated images (`gtr-run eval`).
pub trait Evaluator {
    /// The feature extractor's name; Fréchet distances are comparable only
    /// between runs on the same one.
    fn name(&self) -> &str;

    /// Scores 8-bit pixels [B, H, W, channels], as written to PNG.
    fn score(&mut self, pixels: ArrayView4<u8>) -> Result<Scores, ModelError>;
}

#[cfg(test)]
mod tests {
    use super::ConditionRows;

    #[test]
    fn condition_rows_hold_exactly_their_values() {
        assert!(ConditionRows::new(vec![0f32; 6], 2, 4).is_none());
        assert!(ConditionRows::new(vec![0f32; 6], usize::MAX, 2).is_none());
        let rows = ConditionRows::new((0..12).map(|v| v as f32).collect::<Vec<_>>(), 4, 3)
            .expect("4 rows of 3");
        assert_eq!((rows.rows(), rows.width()), (4, 3));
        let middle = rows.slice(1, 2).expect("rows 1 and 2");
        assert_eq!(middle.shape(), &[2, 3]);
        assert_eq!(middle.row(0).to_vec(), vec![3.0, 4.0, 5.0]);
        assert_eq!(middle.row(1).to_vec(), vec![6.0, 7.0, 8.0]);
        assert_eq!(rows.slice(4, 0).map(|v| v.nrows()), Some(0));
        assert!(rows.slice(3, 2).is_none());
        assert!(rows.slice(usize::MAX, 2).is_none());
    }
}

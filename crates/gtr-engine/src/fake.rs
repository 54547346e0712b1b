//! A deterministic stand-in for a MAR model, for engine tests that need no
//! ONNX Runtime. Its outputs are smooth functions of its inputs, so the
//! engine's plumbing (gathers, CFG halves, batching) shows in the results.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ndarray::{Array2, Array3, Array4, ArrayView1, ArrayView2, ArrayView3, ArrayView4};

use super::model::{ConditionRows, ImageDecoder, MarModel, ModelError, ModelInfo};
use super::model::{ImageSettings, SamplingDefaults};
use crate::grid::Grid;
use crate::sampler::Variance;

pub struct FakeModel {
    info: ModelInfo,
    /// Backbone and diffusion calls made, for tests.
    pub backbone_calls: usize,
    pub diffusion_calls: usize,
    /// Rows of every diffusion call, in order.
    pub diffusion_rows: Vec<usize>,
    /// [`MarModel::split_head_rows`] ([`FakeModel::with_split_head`]).
    split_head_rows: usize,
    /// Rows of every [`MarModel::head_condition`] call, in order.
    pub condition_rows: Vec<usize>,
    /// [`MarModel::head_condition`] gives one row fewer than asked (a model
    /// that breaks its contract).
    pub short_condition: bool,
    /// [`MarModel::head_condition`] gives NaN rows (a model whose condition
    /// part fails numerically).
    pub nan_condition: bool,
    /// Outputs of [`MarModel::head_condition`] alive now and at most.
    pub condition_outputs: Arc<Alive>,
    /// Rows of every [`MarModel::head_state`] call, in order.
    pub state_rows: Vec<usize>,
    /// VAE decodes made, on any thread: by the model and its decoders.
    pub decodes: Arc<AtomicUsize>,
}

impl FakeModel {
    /// Its VAE, counting into [`FakeModel::decodes`].
    fn vae(&self) -> FakeVae {
        FakeVae {
            image: self.info.image,
            decodes: self.decodes.clone(),
        }
    }

    /// A 16×16, C = 4, D = 8 model with 10 classes, 32×32 RGB images.
    pub fn new() -> Self {
        Self::with_grid(Grid::MAR)
    }

    pub fn with_grid(grid: Grid) -> Self {
        FakeModel {
            info: ModelInfo {
                name: "fake".into(),
                grid,
                token_dim: 4,
                width: 8,
                classes: 10,
                null_class: 10,
                latent_scale: 0.5,
                train_steps: 1000,
                variance: Variance::LearnedRange,
                image: ImageSettings {
                    height: grid.height * 2,
                    width: grid.width * 2,
                    channels: 3,
                },
                defaults: SamplingDefaults {
                    cfg: 2.0,
                    temperature: 1.0,
                },
            },
            backbone_calls: 0,
            diffusion_calls: 0,
            diffusion_rows: Vec::new(),
            split_head_rows: 0,
            condition_rows: Vec::new(),
            short_condition: false,
            nan_condition: false,
            condition_outputs: Arc::default(),
            state_rows: Vec::new(),
            decodes: Arc::default(),
        }
    }

    /// The same model with its head in two parts, run split in steps of up
    /// to `rows` head rows a tick: the condition part keeps the timestep's
    /// fraction and z, the state part computes [`MarModel::diffusion`]'s
    /// output from them, bit for bit. State calls count as diffusion calls
    /// and their rows are also in `state_rows`.
    pub fn with_split_head(mut self, rows: usize) -> Self {
        self.split_head_rows = rows;
        self
    }

    /// The head's output for rows given `x`, each row's time fraction and
    /// its z: the one formula both head forms share.
    fn head(
        &self,
        x: ArrayView2<f32>,
        time: impl Fn(usize) -> f32,
        z: ArrayView2<f32>,
    ) -> Array2<f32> {
        let c = self.info.token_dim;
        let mut out = Array2::<f32>::zeros((x.nrows(), self.info.head_channels()));
        for r in 0..x.nrows() {
            let time = time(r);
            for ch in 0..c {
                out[[r, ch]] = (0.6 * x[[r, ch]] + z[[r, ch]] * (1.0 - time)).tanh();
                out[[r, c + ch]] = (z[[r, ch + c]] * 0.5 - time).tanh();
            }
        }
        out
    }
}

impl Default for FakeModel {
    fn default() -> Self {
        Self::new()
    }
}

impl MarModel for FakeModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn backbone(
        &mut self,
        canvas: ArrayView3<f32>,
        known: ArrayView2<i64>,
        labels: ArrayView1<i64>,
    ) -> Result<Array3<f32>, ModelError> {
        self.backbone_calls += 1;
        let (b, l, c) = canvas.dim();
        let d = self.info.width;
        let mut z = Array3::<f32>::zeros((b, l, d));
        for r in 0..b {
            // Mean of the known tokens: what the "encoder" saw.
            let mut context = 0.0f32;
            for &t in known.row(r) {
                for ch in 0..c {
                    context += canvas[[r, t as usize, ch]];
                }
            }
            context /= (known.ncols().max(1) * c) as f32;
            let label = labels[r] as f32;
            for t in 0..l {
                for k in 0..d {
                    z[[r, t, k]] =
                        ((t * (k + 1)) as f32 * 0.37 + label * 0.5).sin() * 0.8 + context;
                }
            }
        }
        Ok(z)
    }

    fn diffusion(
        &mut self,
        x: ArrayView2<f32>,
        t: ArrayView1<i64>,
        z: ArrayView2<f32>,
    ) -> Result<Array2<f32>, ModelError> {
        self.diffusion_calls += 1;
        self.diffusion_rows.push(x.nrows());
        Ok(self.head(x, |r| t[r] as f32 / 1000.0, z))
    }

    fn split_head_rows(&self) -> usize {
        self.split_head_rows
    }

    /// `cond` [N, 1 + D]: the time fraction, then z.
    fn head_condition(
        &mut self,
        t: ArrayView1<i64>,
        z: ArrayView2<f32>,
    ) -> Result<ConditionRows, ModelError> {
        self.condition_rows.push(t.len());
        let d = self.info.width;
        let n = t.len() - usize::from(self.short_condition && !t.is_empty());
        let mut cond = Array2::<f32>::zeros((n, 1 + d));
        for (r, mut row) in cond.rows_mut().into_iter().enumerate() {
            row[0] = t[r] as f32 / 1000.0;
            row.slice_mut(ndarray::s![1..]).assign(&z.row(r));
        }
        if self.nan_condition {
            cond.fill(f32::NAN);
        }
        let (values, _) = cond.into_raw_vec_and_offset();
        let values = Counted::new(values, &self.condition_outputs);
        Ok(ConditionRows::new(values, n, 1 + d).expect("rows × (1 + D) values"))
    }

    fn head_state(
        &mut self,
        x: ArrayView2<f32>,
        cond: ArrayView2<f32>,
    ) -> Result<Array2<f32>, ModelError> {
        self.diffusion_calls += 1;
        self.diffusion_rows.push(x.nrows());
        self.state_rows.push(x.nrows());
        Ok(self.head(x, |r| cond[[r, 0]], cond.slice(ndarray::s![.., 1..])))
    }

    fn decode_image(&mut self, latent: ArrayView4<f32>) -> Result<Array4<f32>, ModelError> {
        self.vae().decode_image(latent)
    }

    fn image_decoder(&self) -> Result<Box<dyn ImageDecoder>, String> {
        Ok(Box::new(self.vae()))
    }
}

/// How many values of a kind are alive now, and the most at once.
#[derive(Debug, Default)]
pub struct Alive {
    now: AtomicUsize,
    most: AtomicUsize,
}

impl Alive {
    /// The most alive at once so far.
    pub fn most(&self) -> usize {
        self.most.load(Ordering::SeqCst)
    }
}

/// Values counted in an [`Alive`] while they live.
struct Counted {
    values: Vec<f32>,
    alive: Arc<Alive>,
}

impl Counted {
    fn new(values: Vec<f32>, alive: &Arc<Alive>) -> Self {
        let now = alive.now.fetch_add(1, Ordering::SeqCst) + 1;
        alive.most.fetch_max(now, Ordering::SeqCst);
        Counted {
            values,
            alive: alive.clone(),
        }
    }
}

impl AsRef<[f32]> for Counted {
    fn as_ref(&self) -> &[f32] {
        &self.values
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.alive.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// [`FakeModel`]'s VAE: each image channel is the latent's channel
/// `ch % C`, upsampled by repetition, through tanh(v / 2); each decode
/// counted in `decodes`.
struct FakeVae {
    image: ImageSettings,
    decodes: Arc<AtomicUsize>,
}

impl ImageDecoder for FakeVae {
    fn decode_image(&mut self, latent: ArrayView4<f32>) -> Result<Array4<f32>, ModelError> {
        self.decodes.fetch_add(1, Ordering::SeqCst);
        let (b, c, h, w) = latent.dim();
        let img = &self.image;
        let (sy, sx) = (img.height / h, img.width / w);
        let mut out = Array4::<f32>::zeros((b, img.channels, img.height, img.width));
        for r in 0..b {
            for ch in 0..img.channels {
                for y in 0..img.height {
                    for x in 0..img.width {
                        let v = latent[[r, ch % c, (y / sy).min(h - 1), (x / sx).min(w - 1)]];
                        out[[r, ch, y, x]] = (v * 0.5).tanh();
                    }
                }
            }
        }
        Ok(out)
    }
}

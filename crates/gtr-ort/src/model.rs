//! A model bundle's graphs as ONNX Runtime sessions, checked against the
//! manifest at load ([`crate::contract`]), behind [`MarModel`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ndarray::{
    Array2, Array3, Array4, ArrayView1, ArrayView2, ArrayView3, ArrayView4, Ix2, Ix3, Ix4,
};

use crate::bundle::{Bundle, Role, shell_word};
use crate::contract::{check_contract, expectations};
use crate::device::Device;
pub use crate::error::OrtError;
use crate::precision::Precision;
use crate::precision_choice::PrecisionChoice;
use crate::runners::{BackboneRunner, ChainRunner, HeadRunner};
use crate::session::{Graph, SessionSettings, shaped, view};
use crate::tensorrt::{self, ShapeRanges, TensorRtOptions};
use crate::ticks::TickRunner;
use gtr_engine::{
    ChainInputs, ConditionRows, GraphStats, ImageDecoder, ImageSettings, MarModel, ModelError,
    ModelInfo, VAE_GRAPH, gather_rows,
};

/// How to load a bundle: the device, threads, precision and TensorRT's
/// settings.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Intra-op threads per graph (`None`: ONNX Runtime's choice).
    pub threads: Option<usize>,
    /// Graph files and provider switches (see [`crate::precision_choice::choose`]).
    pub precision: PrecisionChoice,
    /// TensorRT's engine and timing cache folder (`None`: the default,
    /// [`tensorrt::default_cache_dir`]).
    pub tensorrt_cache: Option<std::path::PathBuf>,
    /// The shapes the run will use, for TensorRT's optimisation profiles
    /// (`None`: no profiles).
    pub shape_ranges: Option<ShapeRanges>,
    /// Where ONNX Runtime writes each graph's per-kernel profile
    /// (`<graph>_<timestamp>.json`, opened with the session; `None`: no
    /// profiling). The folder must exist and be writable: ONNX Runtime does
    /// not say when it cannot open the file, which then shows only as a
    /// [`KernelProfile::problem`](gtr_engine::KernelProfile::problem) from [`MarModel::end_profiling`].
    pub profile_dir: Option<std::path::PathBuf>,
    /// Open the bundle's tick graph, for [`ChainRunner::Ticks`] (with CUDA
    /// graphs on the CUDA provider unless profiling).
    pub tick_graph: bool,
}

impl LoadOptions {
    /// fp32 graphs, no TensorRT settings.
    pub fn new(bundle: &Bundle, device: Device, threads: Option<usize>) -> LoadOptions {
        LoadOptions {
            device,
            threads,
            precision: PrecisionChoice::fp32(bundle),
            tensorrt_cache: None,
            shape_ranges: None,
            profile_dir: None,
            tick_graph: false,
        }
    }
}

/// A bundle's graphs loaded into ONNX Runtime.
pub struct OrtModel {
    info: ModelInfo,
    /// The class-embedding slots the encoder prepends (the manifest's
    /// `buffer`): its output has buffer + K rows.
    buffer: usize,
    encoder: Graph,
    decoder: Graph,
    diffusion: Graph,
    vae: VaeDecoder,
    /// Whole chains per call, when the bundle has a sampler graph.
    sampler: Option<Graph>,
    /// One call per tick on bound tensors, when asked for
    /// ([`LoadOptions::tick_graph`]) and the bundle has a tick graph.
    ticks: Option<TickRunner>,
    /// Why the tick graph runs without CUDA graphs on CUDA, if it does.
    capture_refused: Option<String>,
    /// Encoder and decoder in one call returning the predicted tokens' z,
    /// when the bundle has a backbone graph.
    backbone: Option<Graph>,
    /// The diffusion head's (t, z) part and its x part, when the bundle has
    /// them in the run's precision.
    split_head: Option<SplitHead>,
    provider: String,
    precision: PrecisionChoice,
    tensorrt: BTreeMap<String, TensorRtOptions>,
}

/// The VAE decoder's graph, shared with the [`ImageDecoder`] handles that
/// decode on other threads ([`MarModel::image_decoder`]); one call at a
/// time.
#[derive(Clone)]
struct VaeDecoder {
    graph: Arc<Mutex<Graph>>,
    image: ImageSettings,
}

impl VaeDecoder {
    /// The graph, held until the guard is dropped. A thread that panicked
    /// holding it left nothing half-written that a call reads.
    fn graph(&self) -> MutexGuard<'_, Graph> {
        self.graph.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// [`MarModel::decode_image`].
    fn decode(&self, latent: ArrayView4<f32>) -> Result<Array4<f32>, ModelError> {
        let b = latent.dim().0;
        let img = self.image;
        let out = self
            .graph()
            .run(vec![("latent", view(VAE_GRAPH, latent)?)], "image", false)?;
        let dims = [
            Some(b),
            Some(img.channels),
            Some(img.height),
            Some(img.width),
        ];
        shaped::<Ix4>(VAE_GRAPH, "image", out, &dims, || {
            format!("[{b}, {}, {}, {}]", img.channels, img.height, img.width)
        })
    }
}

impl ImageDecoder for VaeDecoder {
    fn decode_image(&mut self, latent: ArrayView4<f32>) -> Result<Array4<f32>, ModelError> {
        self.decode(latent)
    }
}

/// The diffusion head in two graphs (models/split_head.py).
struct SplitHead {
    condition: Graph,
    state: Graph,
    /// [`MarModel::split_head_rows`] (`--head`).
    rows: usize,
}

/// An f32 output left in the runtime's host memory ([`Graph::run_kept`]),
/// read as its values.
struct HostTensor(ort::value::Tensor<f32>);

impl AsRef<[f32]> for HostTensor {
    fn as_ref(&self) -> &[f32] {
        // `run_kept` checked that the values can be read.
        self.0
            .try_extract_tensor()
            .map_or(&[], |(_, values)| values)
    }
}

impl OrtModel {
    /// Loads and checks the bundle's fp32 graphs on `device` with `threads`
    /// intra-op threads per graph (`None`: ORT's default).
    pub fn load(bundle: &Bundle, device: Device, threads: Option<usize>) -> Result<Self, OrtError> {
        Self::load_with(bundle, &LoadOptions::new(bundle, device, threads))
    }

    /// Loads and checks the graphs that `options.precision` chose, on
    /// `options.device`, with the provider settings of that precision.
    pub fn load_with(bundle: &Bundle, options: &LoadOptions) -> Result<Self, OrtError> {
        let info = bundle.model_info();
        let choice = &options.precision;
        let tensorrt = tensorrt_options(bundle, &info, options)?;
        let mut provider = String::new();
        // Opens `role`'s graph (the precision's file) and checks its
        // contract; `cuda_graph` asks the CUDA provider to capture it.
        let open_with = |role: Role, entry: &crate::bundle::GraphEntry, cuda_graph: bool| {
            let file = choice.graph_files.get(role.key()).unwrap_or(&entry.file);
            let settings = SessionSettings {
                cuda_tf32: choice.cuda_tf32,
                tensorrt: tensorrt.get(role.key()).cloned(),
                profile_prefix: options.profile_dir.as_ref().map(|d| d.join(role.key())),
                cuda_graph,
            };
            let (graph, ran) = Graph::open(
                role.key(),
                &bundle.dir.join(file),
                &entry.inputs,
                &entry.outputs,
                options.device,
                options.threads,
                &settings,
            )
            .map_err(|e| explain_precision_failure(e, choice.precision, options.device))?;
            check_contract(&graph, expectations(role, &info))?;
            Ok::<_, OrtError>((graph, ran))
        };
        let open = |role: Role, entry: &crate::bundle::GraphEntry| open_with(role, entry, false);
        // The four graphs every bundle has; the provider is the one that
        // runs them (the last to open says).
        let mut required = |role: Role| {
            let (graph, ran) = open(role, bundle.graph(role))?;
            provider = ran;
            Ok::<_, OrtError>(graph)
        };
        let encoder = required(Role::Encoder)?;
        let decoder = required(Role::Decoder)?;
        let diffusion = required(Role::Diffusion)?;
        let vae = VaeDecoder {
            graph: Arc::new(Mutex::new(required(Role::VaeDecoder)?)),
            image: info.image,
        };
        if choice.precision == Precision::Tf32 && !provider.starts_with("cuda") {
            return Err(OrtError::Device {
                device: provider,
                problem: "--precision tf32 is a math mode of the CUDA provider, which does not run these graphs; use --device cuda".into(),
            });
        }
        // A graph the model tools derive from others is opened only in the
        // precision of those (`runs_alike`).
        let derived = |role: Role| {
            bundle
                .optional_graph(role)
                .filter(|_| choice.runs_alike(bundle, role))
        };
        let (sampler, backbone, split_head) =
            open_derived(&open_with, &derived, options.device == Device::TensorRt)?;
        // The tick graph, asked for by `--sampler ticks` (not under TensorRT,
        // which would get no profiles for it).
        let mut capture_refused = None;
        let ticks = match derived(Role::Tick) {
            Some(entry) if options.tick_graph && provider != "tensorrt" => {
                let capture = provider == "cuda" && options.profile_dir.is_none();
                let (runner, refused) = open_ticks(&open_with, entry, capture, &info, bundle)?;
                capture_refused = refused;
                Some(runner)
            }
            _ => None,
        };
        let mut model = OrtModel {
            info,
            buffer: bundle.manifest.buffer,
            encoder,
            decoder,
            diffusion,
            vae,
            sampler,
            ticks,
            capture_refused,
            backbone,
            split_head,
            provider,
            precision: choice.clone(),
            tensorrt,
        };
        // TensorRT engines are built for the run's shapes, not a probe's.
        if options.device != Device::TensorRt {
            model.probe_labels()?;
            model.probe_timesteps()?;
        }
        Ok(model)
    }

    /// Runs the diffusion head once on one row at the last training
    /// timestep (`diffusion.train_steps` − 1), so that a manifest whose
    /// `train_steps` lies beyond the head's timestep embedding is refused at
    /// load, naming that field, rather than failing inside ONNX Runtime at
    /// the first tick. Counted as the head's loading time, like
    /// [`Self::probe_labels`].
    fn probe_timesteps(&mut self) -> Result<(), OrtError> {
        let last = self.info.train_steps as i64 - 1;
        let x = Array2::<f32>::zeros((1, self.info.token_dim));
        let z = Array2::<f32>::zeros((1, self.info.width));
        let t = ndarray::Array1::from_elem(1, last);
        let to_contract = |problem: String| OrtError::Contract {
            graph: "diffusion",
            tensor: "t".into(),
            problem,
        };
        let input = |e: ModelError| to_contract(e.to_string());
        let inputs = vec![
            ("x", view("diffusion", x.view()).map_err(input)?),
            ("t", view("diffusion", t.view()).map_err(input)?),
            ("z", view("diffusion", z.view()).map_err(input)?),
        ];
        self.diffusion.probe(inputs, |_, _| ()).map_err(|e| {
            to_contract(format!(
                "timestep {last} (the last of the manifest's `diffusion.train_steps: {}`) does not run through the head's timestep embedding: {e}; the manifest's train_steps does not match the graph",
                self.info.train_steps
            ))
        })
    }

    /// Runs the encoder once on the largest real class and the null class,
    /// so that a manifest whose `classes` or `null_class` lie beyond the
    /// graph's class embedding is refused at load, naming those fields,
    /// rather than failing inside ONNX Runtime at the first step. The
    /// probe's time is counted as the encoder's loading time.
    fn probe_labels(&mut self) -> Result<(), OrtError> {
        let info = &self.info;
        let (l, c) = (info.grid.len(), info.token_dim);
        let labels = ndarray::Array1::from_iter(
            (info.classes > 0)
                .then(|| info.classes as i64 - 1)
                .into_iter()
                .chain([info.null_class]),
        );
        let b = labels.len();
        let tokens = Array3::<f32>::zeros((b, l, c));
        let known = Array2::<i64>::zeros((b, 0));
        let to_contract = |problem: String| OrtError::Contract {
            graph: "encoder",
            tensor: "label".into(),
            problem,
        };
        let input = |e: ModelError| to_contract(e.to_string());
        let inputs = vec![
            ("tokens", view("encoder", tokens.view()).map_err(input)?),
            ("known", view("encoder", known.view()).map_err(input)?),
            ("label", view("encoder", labels.view()).map_err(input)?),
        ];
        self.encoder.probe(inputs, |_, _| ()).map_err(|e| {
            to_contract(format!(
                "labels {labels} (the last of the manifest's `classes: {}`, and its `null_class: {}`) do not run through the encoder's class embedding: {e}; the manifest's classes or null_class do not match the graph",
                self.info.classes, self.info.null_class
            ))
        })
    }

    /// Whether the bundle's fused backbone graph was loaded.
    pub fn has_backbone(&self) -> bool {
        self.backbone.is_some()
    }

    /// Drops the fused backbone graph: the encoder and decoder run apart and
    /// the predicted rows are gathered on the host.
    pub fn without_backbone(mut self) -> Self {
        self.backbone = None;
        self
    }

    /// Whether the bundle's sampler graph was loaded.
    pub fn has_sampler(&self) -> bool {
        self.sampler.is_some()
    }

    /// Drops the sampler graph: diffusion chains run on the host.
    pub fn without_sampler(mut self) -> Self {
        self.sampler = None;
        self
    }

    /// Whether the bundle's tick graph was loaded ([`LoadOptions::tick_graph`]).
    pub fn has_tick_graph(&self) -> bool {
        self.ticks.is_some()
    }

    /// [`Self::load_with`], then the choices of where the chains, the
    /// backbone and the head run ([`Self::run_chains`],
    /// [`Self::run_backbone`], [`Self::run_head`]): how the command line and
    /// Python load a model alike. Returns the model and the note
    /// `run_chains` may give, to show the user once.
    pub fn load_running(
        bundle: &Bundle,
        options: &LoadOptions,
        (chains, backbone, head): (ChainRunner, BackboneRunner, HeadRunner),
    ) -> Result<(Self, Option<String>), OrtError> {
        let (model, note) = Self::load_with(bundle, options)?.run_chains(chains, bundle)?;
        let model = model
            .run_backbone(backbone, bundle)?
            .run_head(head, bundle)?;
        Ok((model, note))
    }

    /// Applies the `--sampler` choice: where the diffusion chains will run.
    /// Returns the model and, when the bundle has no sampler graph and
    /// `Auto` was asked, or the tick graph runs without the CUDA graphs it
    /// was opened for, a note to show the user once; `Graph` without a
    /// sampler graph, or `Ticks` without a loaded tick graph, is an error
    /// naming the bundle and the fix.
    pub fn run_chains(
        self,
        runner: ChainRunner,
        bundle: &Bundle,
    ) -> Result<(Self, Option<String>), OrtError> {
        if runner == ChainRunner::Ticks {
            if !self.has_tick_graph() {
                return Err(OrtError::Sampler(
                    match bundle.optional_graph(Role::Tick) {
                        Some(_) if self.provider == "tensorrt" => "--sampler ticks: the tick graph is not used under TensorRT (it would get no optimisation profiles); use --device cuda".into(),
                        Some(_) if self.precision.runs_alike(bundle, Role::Tick) => "--sampler ticks: the model was loaded without its tick graph (LoadOptions::tick_graph)".into(),
                        _ => format!("--sampler ticks: {}", self.lacks(bundle, Role::Tick, "a tick graph", "add_sampler.py")),
                    },
                ));
            }
            let note = self.capture_refused.clone();
            return Ok((self.without_sampler(), note));
        }
        let mut model = self;
        model.ticks = None;
        Ok(match (runner, model.has_sampler()) {
            (ChainRunner::Graph, false) => {
                return Err(OrtError::Sampler(format!(
                    "--sampler graph: {}",
                    model.lacks(bundle, Role::Sampler, "a sampler graph", "add_sampler.py")
                )));
            }
            (ChainRunner::Auto, false) => {
                let note = format!(
                    "diffusion chains run on the host, one head call per tick: {}",
                    model.lacks(bundle, Role::Sampler, "a sampler graph", "add_sampler.py")
                );
                (model, Some(note))
            }
            (ChainRunner::Host, true) => (model.without_sampler(), None),
            // On the CPU provider the host path measured faster (README, "Speed").
            (ChainRunner::Auto, true) if model.provider == "cpu" => (model.without_sampler(), None),
            _ => (model, None),
        })
    }

    /// The model with its backbone run as `runner` asks; `Fused` without a
    /// backbone graph is an error naming the bundle and the fix.
    pub fn run_backbone(self, runner: BackboneRunner, bundle: &Bundle) -> Result<Self, OrtError> {
        Ok(match (runner, self.has_backbone()) {
            (BackboneRunner::Fused, false) if self.provider == "tensorrt" => {
                return Err(OrtError::Sampler(
                    "--backbone fused: the backbone graph is not used under --device tensorrt (it would get no optimisation profiles); use --device cuda".into(),
                ));
            }
            (BackboneRunner::Fused, false) => {
                return Err(OrtError::Sampler(format!(
                    "--backbone fused: {}",
                    self.lacks(
                        bundle,
                        Role::Backbone,
                        "a backbone graph",
                        "add_backbone.py"
                    )
                )));
            }
            (BackboneRunner::Split, true) => self.without_backbone(),
            // On the CPU provider the fused graph has not been shown faster
            // (models/README.md).
            (BackboneRunner::Auto, true) if self.provider == "cpu" => self.without_backbone(),
            _ => self,
        })
    }

    /// Why the optional graph `role` (`what`, e.g. "a sampler graph", which
    /// `models/<tool>` adds) was not loaded: the bundle has none, or has it
    /// only in other precisions than the run's ([`PrecisionChoice::runs_alike`]).
    fn lacks(&self, bundle: &Bundle, role: Role, what: &str, tool: &str) -> String {
        let (name, dir) = (&bundle.manifest.name, shell_word(&bundle.dir));
        let key = role.key();
        // The split head is two graphs; the bundle has it only with both.
        let missing = match role {
            Role::DiffusionCondition | Role::DiffusionState => {
                [Role::DiffusionCondition, Role::DiffusionState]
                    .iter()
                    .any(|&part| bundle.optional_graph(part).is_none())
            }
            _ => bundle.optional_graph(role).is_none(),
        };
        if missing {
            return format!(
                "bundle `{name}` has no {} (graphs.{key} in its manifest); add one with `python3 models/{tool} {dir}`",
                what.trim_start_matches("a ")
            );
        }
        let p = self.precision.precision;
        format!(
            "bundle `{name}` has {what}, but not in {p}: its manifest's precisions.{p} entry must list `{key}` together with the graphs it is made from, else an fp32 graph would be mixed into the {p} run; write the {p} variants again with `python3 models/convert_precision.py {dir} --precision {p}` (it rebuilds the graphs the bundle has), or run in fp32"
        )
    }

    /// Calls `f` on every loaded graph, in the order of
    /// [`MarModel::graph_stats`].
    fn for_each_graph(&mut self, mut f: impl FnMut(&mut Graph)) {
        [&mut self.encoder, &mut self.decoder, &mut self.diffusion]
            .into_iter()
            .for_each(&mut f);
        f(&mut self.vae.graph());
        self.sampler
            .as_mut()
            .into_iter()
            .chain(self.ticks.as_mut().map(|t| &mut t.graph))
            .chain(self.backbone.as_mut())
            .chain(
                self.split_head
                    .iter_mut()
                    .flat_map(|s| [&mut s.condition, &mut s.state]),
            )
            .for_each(f);
    }

    /// Whether the bundle's split head was loaded (it has both parts in the
    /// run's precision).
    pub fn has_split_head(&self) -> bool {
        self.split_head.is_some()
    }

    /// The model with its head run as `runner` asks; `Split` without the
    /// parts in the run's precision is an error naming the bundle and the
    /// fix.
    pub fn run_head(mut self, runner: HeadRunner, bundle: &Bundle) -> Result<Self, OrtError> {
        match (runner, self.has_split_head()) {
            (HeadRunner::Split, false) => {
                let problem = if self.provider == "tensorrt"
                    && bundle.optional_graph(Role::DiffusionCondition).is_some()
                {
                    "the split head is not used under TensorRT (it would get no optimisation profiles); use --device cuda".into()
                } else {
                    self.lacks(
                        bundle,
                        Role::DiffusionCondition,
                        "a split head",
                        "split_head.py",
                    )
                };
                return Err(OrtError::Sampler(format!("--head split: {problem}")));
            }
            (HeadRunner::Whole, true) => self.split_head = None,
            (HeadRunner::Split, true) => {
                if let Some(split) = self.split_head.as_mut() {
                    split.rows = usize::MAX;
                }
            }
            _ => {}
        }
        Ok(self)
    }

    /// The precision, graph files and provider settings this model was
    /// loaded with, for run records.
    pub fn settings(&self) -> serde_json::Value {
        serde_json::json!({
            "precision": self.precision.precision,
            "precision_source": self.precision.source,
            "graph_files": self.precision.graph_files,
            "cuda_tf32": self.precision.cuda_tf32,
            // Part of a run's identity: providers' kernels differ in the
            // last bits, and so may the images.
            "execution_provider": self.provider,
            // Part of a run's identity: the host path and a chain graph may
            // differ by a pixel level, and int8 images with the batch.
            "diffusion_chains": gtr_engine::chain_runner(self),
            "tensorrt": if self.provider == "tensorrt" {
                serde_json::to_value(&self.tensorrt).unwrap_or_default()
            } else {
                serde_json::Value::Null
            },
        })
    }
}

/// TensorRT's options per role, when TensorRT may run (`--device tensorrt`
/// or `auto` in a build with the `tensorrt` feature); else none.
fn tensorrt_options(
    bundle: &Bundle,
    info: &ModelInfo,
    options: &LoadOptions,
) -> Result<BTreeMap<String, TensorRtOptions>, OrtError> {
    let mut all = BTreeMap::new();
    if !cfg!(feature = "tensorrt") || !matches!(options.device, Device::TensorRt | Device::Auto) {
        return Ok(all);
    }
    let cache = match (&options.tensorrt_cache, tensorrt::default_cache_dir()) {
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) => dir,
        (None, None) => {
            return Err(OrtError::Device {
                device: "tensorrt".into(),
                problem: "no folder for TensorRT's engine cache: give --trt-cache DIR, or set GTR_RUN_CACHE or HOME".into(),
            });
        }
    };
    let choice = &options.precision;
    for role in Role::ALL {
        // The file the session opens: the precision's variant, if it has one.
        let entry = bundle.graph(role);
        let file = choice.graph_files.get(role.key()).unwrap_or(&entry.file);
        let settings = tensorrt::BundleSettings {
            info,
            buffer: bundle.manifest.buffer,
            model_name: &bundle.manifest.name,
            precision: choice.precision.name(),
            fp16: choice.tensorrt_fp16,
            bf16: choice.tensorrt_bf16,
            ranges: options.shape_ranges.as_ref(),
            cache: &cache,
            graph_stamp: tensorrt::graph_stamp(&bundle.dir.join(file)),
        };
        let o = tensorrt::graph_options(role, entry, &settings)?;
        all.insert(role.key().to_string(), o);
    }
    std::fs::create_dir_all(&cache).map_err(|e| OrtError::Device {
        device: "tensorrt".into(),
        problem: format!(
            "cannot create the engine cache folder {} (--trt-cache): {e}",
            cache.display()
        ),
    })?;
    Ok(all)
}

/// Adds what is known about a precision that ONNX Runtime could not load.
fn explain_precision_failure(e: OrtError, precision: Precision, device: Device) -> OrtError {
    match e {
        OrtError::Session {
            graph,
            path,
            message,
        } if precision == Precision::Bf16 && matches!(device, Device::Cpu | Device::Auto) => {
            OrtError::Session {
                graph,
                path,
                message: format!(
                    "{message}\n  (--precision bf16: ONNX Runtime's CPU provider has no bfloat16 MatMul/Gemm kernels \
                     (measured with ONNX Runtime 1.32), so bf16 variants run only on --device cuda; on the CPU use \
                     --precision int8 or fp32)"
                ),
            }
        }
        e => e,
    }
}

impl MarModel for OrtModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn backbone(
        &mut self,
        canvas: ArrayView3<f32>,
        known: ArrayView2<i64>,
        labels: ArrayView1<i64>,
    ) -> Result<Array3<f32>, ModelError> {
        let (b, l, _) = canvas.dim();
        let enc = self.encoder.run(
            vec![
                ("tokens", view("encoder", canvas)?),
                ("known", view("encoder", known)?),
                ("label", view("encoder", labels)?),
            ],
            "encoded",
            true,
        )?;
        let d = self.info.width;
        let rows = self.buffer + known.ncols();
        let enc: Array3<f32> = shaped(
            "encoder",
            "encoded",
            enc,
            &[Some(b), Some(rows), Some(d)],
            || format!("[{b}, buffer + {} = {rows}, {d}]", known.ncols()),
        )?;
        let z = self.decoder.run(
            vec![
                ("encoded", view("decoder", enc.view())?),
                ("known", view("decoder", known)?),
            ],
            "z",
            false,
        )?;
        shaped::<Ix3>("decoder", "z", z, &[Some(b), Some(l), Some(d)], || {
            format!("[{b}, {l}, {d}]")
        })
    }

    fn backbone_rows(
        &mut self,
        canvas: ArrayView3<f32>,
        known: ArrayView2<i64>,
        labels: ArrayView1<i64>,
        predict: ArrayView2<i64>,
    ) -> Result<Array3<f32>, ModelError> {
        let Some(backbone) = self.backbone.as_mut() else {
            let z = self.backbone(canvas, known, labels)?;
            return Ok(gather_rows(&z, predict));
        };
        let graph = "backbone";
        let z = backbone.run(
            vec![
                ("tokens", view(graph, canvas)?),
                ("known", view(graph, known)?),
                ("label", view(graph, labels)?),
                ("predict", view(graph, predict)?),
            ],
            "z",
            false,
        )?;
        let (b, n, d) = (predict.nrows(), predict.ncols(), self.info.width);
        shaped::<Ix3>(graph, "z", z, &[Some(b), Some(n), Some(d)], || {
            format!("[{b}, {n}, {d}]")
        })
    }

    fn diffusion(
        &mut self,
        x: ArrayView2<f32>,
        t: ArrayView1<i64>,
        z: ArrayView2<f32>,
    ) -> Result<Array2<f32>, ModelError> {
        let n = x.nrows();
        let out = self.diffusion.run(
            vec![
                ("x", view("diffusion", x)?),
                ("t", view("diffusion", t)?),
                ("z", view("diffusion", z)?),
            ],
            "out",
            false,
        )?;
        let channels = self.info.head_channels();
        shaped::<Ix2>("diffusion", "out", out, &[Some(n), Some(channels)], || {
            format!("[{n}, {channels}]")
        })
    }

    fn split_head_rows(&self) -> usize {
        self.split_head.as_ref().map_or(0, |s| s.rows)
    }

    fn head_condition(
        &mut self,
        t: ArrayView1<i64>,
        z: ArrayView2<f32>,
    ) -> Result<ConditionRows, ModelError> {
        let graph = "diffusion_condition";
        let Some(split) = self.split_head.as_mut() else {
            return Err(ModelError::Graph {
                graph,
                message: "the bundle has no split head".into(),
            });
        };
        let n = t.len();
        let out = split
            .condition
            .run_kept(vec![("t", view(graph, t)?), ("z", view(graph, z)?)], "cond")?;
        let got: Vec<usize> = out.shape().iter().map(|&d| d.max(0) as usize).collect();
        let rows = match got[..] {
            [rows, width] if rows == n => ConditionRows::new(HostTensor(out), n, width),
            _ => None,
        };
        rows.ok_or_else(|| ModelError::Shape {
            graph,
            tensor: "cond".into(),
            got,
            expected: format!("[{n}, S]"),
        })
    }

    fn head_state(
        &mut self,
        x: ArrayView2<f32>,
        cond: ArrayView2<f32>,
    ) -> Result<Array2<f32>, ModelError> {
        let graph = "diffusion_state";
        let Some(split) = self.split_head.as_mut() else {
            return Err(ModelError::Graph {
                graph,
                message: "the bundle has no split head".into(),
            });
        };
        let n = x.nrows();
        let out = split.state.run(
            vec![("x", view(graph, x)?), ("cond", view(graph, cond)?)],
            "out",
            false,
        )?;
        let channels = self.info.head_channels();
        shaped::<Ix2>(graph, "out", out, &[Some(n), Some(channels)], || {
            format!("[{n}, {channels}]")
        })
    }

    fn fuses_backbone(&self) -> bool {
        self.backbone.is_some()
    }

    fn runs_chains(&self) -> bool {
        self.sampler.is_some() || self.ticks.is_some()
    }

    fn chain_graph(&self) -> String {
        match &self.ticks {
            Some(t) if t.captures() => "tick graph (CUDA graphs)".into(),
            Some(_) => "tick graph".into(),
            None => "sampler graph".into(),
        }
    }

    fn chain_graph_output(&self) -> (&'static str, &'static str) {
        if self.ticks.is_some() {
            ("tick", "x_next")
        } else {
            ("sampler", "x_out")
        }
    }

    fn sample_chain(&mut self, inputs: ChainInputs<'_>) -> Result<Array2<f32>, ModelError> {
        if let Some(ticks) = self.ticks.as_mut() {
            return ticks.run(inputs);
        }
        let graph = "sampler";
        let Some(sampler) = self.sampler.as_mut() else {
            return Err(ModelError::Graph {
                graph,
                message: "the bundle has no sampler graph".into(),
            });
        };
        let n = inputs.x.nrows();
        let guidance = ndarray::arr1(&[inputs.guidance]);
        let out = sampler.run(
            vec![
                ("x", view(graph, inputs.x)?),
                ("z", view(graph, inputs.z)?),
                ("t", view(graph, inputs.timesteps)?),
                ("coef", view(graph, inputs.coefficients)?),
                ("noise", view(graph, inputs.noise)?),
                ("active", view(graph, inputs.active)?),
                ("guidance", view(graph, guidance.view())?),
            ],
            "x_out",
            false,
        )?;
        let c = self.info.token_dim;
        shaped::<Ix2>(graph, "x_out", out, &[Some(n), Some(c)], || {
            format!("[{n}, {c}]")
        })
    }

    fn decode_image(&mut self, latent: ArrayView4<f32>) -> Result<Array4<f32>, ModelError> {
        self.vae.decode(latent)
    }

    /// Refused while the tick graph captures CUDA graphs: ONNX Runtime
    /// captures in CUDA's global mode, in which a CUDA call of another
    /// thread (the decode's allocations and copies) breaks the capture.
    fn image_decoder(&self) -> Result<Box<dyn ImageDecoder>, String> {
        match &self.ticks {
            Some(t) if t.captures() => Err("the tick graph captures CUDA graphs (`--sampler ticks` on the CUDA provider), which another thread's CUDA calls would break: ONNX Runtime captures in CUDA's global mode".into()),
            _ => Ok(Box::new(self.vae.clone())),
        }
    }

    fn reset_graph_stats(&mut self) {
        self.for_each_graph(|g| {
            g.stats = GraphStats {
                graph: g.stats.graph.clone(),
                ..GraphStats::default()
            }
        });
    }

    fn graph_stats(&self) -> Vec<GraphStats> {
        let mut stats = self.sampling_graph_stats();
        // After the encoder, decoder and head, as records have listed it.
        stats.insert(3, self.vae.graph().stats.clone());
        stats
    }

    /// Without taking the VAE's lock, which a decode on another thread
    /// holds for its whole call.
    fn sampling_graph_stats(&self) -> Vec<GraphStats> {
        [&self.encoder, &self.decoder, &self.diffusion]
            .into_iter()
            .chain(self.sampler.as_ref())
            .chain(self.ticks.as_ref().map(|t| &t.graph))
            .chain(self.backbone.as_ref())
            .chain(
                self.split_head
                    .iter()
                    .flat_map(|s| [&s.condition, &s.state]),
            )
            .map(|g| g.stats.clone())
            .collect()
    }

    fn end_profiling(&mut self) {
        self.for_each_graph(Graph::end_profiling)
    }

    fn execution_provider(&self) -> String {
        self.provider.clone()
    }

    fn precision(&self) -> String {
        self.precision.precision.to_string()
    }
}

/// The sampler graph, the backbone graph and the split head, where opened.
type DerivedGraphs = (Option<Graph>, Option<Graph>, Option<SplitHead>);

/// The derived graphs a bundle has in the run's precision (`derived`):
/// the sampler graph; under anything but TensorRT (whose engines get
/// profiles for the four graphs only) the backbone graph, and the split
/// head's two parts.
fn open_derived<'a>(
    open_with: &OpenGraph<'_>,
    derived: &dyn Fn(Role) -> Option<&'a crate::bundle::GraphEntry>,
    tensorrt: bool,
) -> Result<DerivedGraphs, OrtError> {
    let open = |role, entry| open_with(role, entry, false);
    let sampler = match derived(Role::Sampler) {
        Some(entry) => Some(open(Role::Sampler, entry)?.0),
        None => None,
    };
    let backbone = match derived(Role::Backbone) {
        Some(entry) if !tensorrt => Some(open(Role::Backbone, entry)?.0),
        _ => None,
    };
    let split_head = match (
        derived(Role::DiffusionCondition),
        derived(Role::DiffusionState),
    ) {
        (Some(condition), Some(state)) if !tensorrt => {
            let condition = open(Role::DiffusionCondition, condition)?.0;
            let state = open(Role::DiffusionState, state)?.0;
            check_condition_width(&condition, &state)?;
            Some(SplitHead {
                condition,
                state,
                rows: gtr_engine::SPLIT_TICK_ROWS,
            })
        }
        _ => None,
    };
    Ok((sampler, backbone, split_head))
}

/// The split head's two parts agree on the width of the condition rows
/// where both graphs fix it: the condition part's `cond` output and the
/// state part's `cond` input. Refused at load, naming both, rather than by
/// ONNX Runtime at the first tick.
fn check_condition_width(condition: &Graph, state: &Graph) -> Result<(), OrtError> {
    let made = crate::contract::fixed_dim(condition, "cond", 1);
    let taken = crate::contract::fixed_input_dim(state, "cond", 1);
    match (made, taken) {
        (Some(made), Some(taken)) if made != taken => Err(OrtError::Contract {
            graph: "diffusion_state",
            tensor: state.inputs["cond"].clone(),
            problem: format!(
                "takes condition rows {taken} wide, but diffusion_condition ({}) makes them {made} wide (in {})",
                condition.path.display(),
                state.path.display()
            ),
        }),
        _ => Ok(()),
    }
}

/// How [`OrtModel::load_with`] opens a graph: its role, its manifest entry,
/// whether CUDA graphs capture it; the graph and the provider that runs it.
type OpenGraph<'a> =
    dyn Fn(Role, &crate::bundle::GraphEntry, bool) -> Result<(Graph, String), OrtError> + 'a;

/// The tick graph at `entry` behind its runner, with CUDA graphs where
/// `capture` asks for them (CUDA runs it, and no profiling: a replayed
/// graph's kernels are not profiled one by one). ONNX Runtime refuses to
/// capture a graph whose nodes are not all on the CUDA provider: the graph
/// then runs without, and the returned note says why.
fn open_ticks(
    open_with: &OpenGraph<'_>,
    entry: &crate::bundle::GraphEntry,
    capture: bool,
    info: &ModelInfo,
    bundle: &Bundle,
) -> Result<(TickRunner, Option<String>), OrtError> {
    let mut capture = capture;
    let mut refused = None;
    let (mut graph, ran) = match open_with(Role::Tick, entry, capture) {
        Err(e) if capture => {
            capture = false;
            refused = Some(format!(
                "the tick graph runs without CUDA graphs: ONNX Runtime would not capture it ({e})"
            ));
            open_with(Role::Tick, entry, false)?
        }
        opened => opened?,
    };
    // A captured graph's first calls are its capture: it is checked by its
    // runner's count instead.
    if !capture {
        probe_tick(&mut graph, info)?;
    }
    let runner =
        TickRunner::new(graph, &ran, capture, info.token_dim, info.width).map_err(|message| {
            OrtError::Session {
                graph: "tick",
                path: bundle.entry_path(entry).display().to_string(),
                message: format!("device memory for the bound tensors: {message}"),
            }
        })?;
    Ok((runner, refused))
}

/// Runs the tick graph once at load on two rows, two ticks and both
/// halves from tick 0, so that a graph whose `x_next` holds other rows than
/// it was given, or whose `k_next` does not count to 1, is refused naming
/// its output, rather than by ONNX Runtime inside a later call (whose
/// outputs are bound to the rows asked for).
fn probe_tick(graph: &mut Graph, info: &ModelInfo) -> Result<(), OrtError> {
    let (n, ticks, c, d) = (2, 2, info.token_dim, info.width);
    let x = Array2::<f32>::zeros((n, c));
    let k = ndarray::arr0(0i64);
    let z = Array3::<f32>::zeros((2, n, d));
    let t = Array2::<i64>::zeros((ticks, n));
    let coef = Array3::<f32>::zeros((ticks, n, gtr_engine::COEFFICIENTS));
    let noise = Array3::<f32>::zeros((ticks, n, c));
    let running = Array2::from_elem((ticks, n), true);
    let guidance = ndarray::arr1(&[1f32]);
    let path = graph.path.display().to_string();
    let contract = |tensor: &str, problem: String| OrtError::Contract {
        graph: "tick",
        tensor: tensor.to_string(),
        problem: format!("{problem} (in {path})"),
    };
    let input = |e: ModelError| contract("x", e.to_string());
    let inputs = vec![
        ("x", view("tick", x.view()).map_err(input)?),
        ("k", view("tick", k.view()).map_err(input)?),
        ("z", view("tick", z.view()).map_err(input)?),
        ("t", view("tick", t.view()).map_err(input)?),
        ("coef", view("tick", coef.view()).map_err(input)?),
        ("noise", view("tick", noise.view()).map_err(input)?),
        ("running", view("tick", running.view()).map_err(input)?),
        ("guidance", view("tick", guidance.view()).map_err(input)?),
    ];
    let read = graph
        .probe(inputs, |values, names| {
            let rows = values[names["x_next"].as_str()]
                .try_extract_array::<f32>()
                .map(|a| a.shape().to_vec());
            let next = values[names["k_next"].as_str()]
                .try_extract_array::<i64>()
                .map(|a| a.iter().copied().collect::<Vec<_>>());
            (rows, next)
        })
        .map_err(|e| {
            contract(
                "x",
                format!("the graph does not run on {n} rows of {ticks} ticks: {e}"),
            )
        })?;
    match read {
        (Ok(shape), _) if shape != [n, c] => Err(contract(
            "x_next",
            format!("shape {shape:?} for {n} rows of {c} channels, expected [{n}, {c}]"),
        )),
        (_, Ok(next)) if next != [1] => Err(contract(
            "k_next",
            format!("{next:?} after tick 0; it must be k + 1 = [1]"),
        )),
        (Err(e), _) => Err(contract("x_next", e.to_string())),
        (_, Err(e)) => Err(contract("k_next", e.to_string())),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;

    /// The MAR steps' statistics are read without the VAE's lock, which a
    /// decode on another thread holds for its whole call: held here, the
    /// read must still come back.
    #[test]
    fn sampling_statistics_do_not_wait_for_a_running_decode() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures/tiny");
        let bundle = Bundle::open(&dir).unwrap();
        let model = OrtModel::load(&bundle, Device::Cpu, Some(1)).unwrap();
        let (sent, read) = std::sync::mpsc::channel();
        let stats = std::thread::scope(|scope| {
            let decoding = model.vae.graph();
            scope.spawn(|| sent.send(model.sampling_graph_stats()));
            let stats = read.recv_timeout(Duration::from_secs(20));
            drop(decoding);
            stats
        });
        let stats = stats.expect("the MAR steps' statistics waited for the VAE's lock");
        let names: Vec<&str> = stats.iter().map(|g| g.graph.as_str()).collect();
        assert_eq!(names, ["encoder", "decoder", "diffusion"]);
        assert_eq!(model.graph_stats()[3].graph, VAE_GRAPH);
    }
}

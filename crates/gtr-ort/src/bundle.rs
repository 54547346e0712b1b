//! Model bundles: a folder with `manifest.yaml` and four ONNX graphs.
//! The manifest format and the graphs' I/O contract are in models/README.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::precision::Precision;
use gtr_engine::ModelInfo;
use gtr_engine::sampler::Variance;
pub use gtr_engine::{ImageSettings, SamplingDefaults};
use gtr_plan::cost::ModelSpec;
use gtr_plan::grid::Grid;

pub const MANIFEST_FILE: &str = "manifest.yaml";

/// Upper bounds of manifest sizes (far above any MAR; they keep arithmetic
/// and allocations sane on hostile input).
const MAX_SIDE: usize = 1024;
const MAX_WIDTH: usize = 65_536;
const MAX_IMAGE_SIDE: usize = 16_384;
const MAX_TRAIN_STEPS: usize = 100_000;
/// The most values one image's tensor may hold (its tokens, its z rows,
/// the encoder's rows, its pixels): 2^26 f32, 256 MiB. Each size above is
/// in range alone; their products are held to this, so that a manifest
/// cannot ask for memory no machine has.
const MAX_IMAGE_VALUES: u64 = 1 << 26;
/// The longest model `name`, in bytes: it is printed, recorded and made
/// part of default folder names.
const MAX_NAME_BYTES: usize = 256;
/// The most blocks a cost shape may give a network (MAR-H's encoder and
/// decoder have 20 each).
const MAX_DEPTH: u64 = 1024;
pub const FORMAT: &str = "gtr-run/mar-bundle@1";

/// The graphs of a bundle, by role: four required, the sampler, the tick
/// graph, the fused backbone and the split head optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Encoder,
    Decoder,
    Diffusion,
    VaeDecoder,
    /// Whole diffusion chains in one call (models/add_sampler.py).
    Sampler,
    /// One tick of the chains without control flow, on fixed shapes
    /// (models/add_sampler.py; `--sampler ticks`).
    Tick,
    /// Encoder and decoder in one call, returning only the predicted
    /// tokens' z (models/add_backbone.py).
    Backbone,
    /// The diffusion head's part that reads only t and z (models/split_head.py;
    /// `--head split`).
    DiffusionCondition,
    /// The diffusion head's part that reads the chain's state x and the
    /// condition part's rows (models/split_head.py).
    DiffusionState,
}

impl Role {
    /// The roles every bundle has.
    pub const ALL: [Role; 4] = [
        Role::Encoder,
        Role::Decoder,
        Role::Diffusion,
        Role::VaeDecoder,
    ];
    /// The roles a bundle may have.
    pub const OPTIONAL: [Role; 5] = [
        Role::Sampler,
        Role::Tick,
        Role::Backbone,
        Role::DiffusionCondition,
        Role::DiffusionState,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Role::Encoder => "encoder",
            Role::Decoder => "decoder",
            Role::Diffusion => "diffusion",
            Role::VaeDecoder => gtr_engine::VAE_GRAPH,
            Role::Sampler => "sampler",
            Role::Tick => "tick",
            Role::Backbone => "backbone",
            Role::DiffusionCondition => "diffusion_condition",
            Role::DiffusionState => "diffusion_state",
        }
    }

    /// Input roles the graph must have.
    pub fn inputs(self) -> &'static [&'static str] {
        match self {
            Role::Encoder => &["tokens", "known", "label"],
            Role::Decoder => &["encoded", "known"],
            Role::Diffusion => &["x", "t", "z"],
            Role::VaeDecoder => &["latent"],
            Role::Sampler => &["x", "z", "t", "coef", "noise", "active", "guidance"],
            Role::Tick => &["x", "k", "z", "t", "coef", "noise", "running", "guidance"],
            Role::Backbone => &["tokens", "known", "label", "predict"],
            Role::DiffusionCondition => &["t", "z"],
            Role::DiffusionState => &["x", "cond"],
        }
    }

    /// Output roles the graph must have.
    pub fn outputs(self) -> &'static [&'static str] {
        match self {
            Role::Encoder => &["encoded"],
            Role::Decoder => &["z"],
            Role::Diffusion => &["out"],
            Role::VaeDecoder => &["image"],
            Role::Sampler => &["x_out"],
            Role::Tick => &["x_next", "k_next"],
            Role::Backbone => &["z"],
            Role::DiffusionCondition => &["cond"],
            Role::DiffusionState => &["out"],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphEntry {
    pub file: String,
    /// Role → tensor name in the graph.
    #[serde(deserialize_with = "unique_keys")]
    pub inputs: BTreeMap<String, String>,
    #[serde(deserialize_with = "unique_keys")]
    pub outputs: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionSettings {
    pub schedule: String,
    pub train_steps: usize,
    pub variance: Variance,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostShape {
    pub encoder_depth: u64,
    pub decoder_depth: u64,
    pub diffusion_width: u64,
    pub diffusion_depth: u64,
}

/// `manifest.yaml`, as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub name: String,
    pub grid: [usize; 2],
    pub token_dim: usize,
    pub width: usize,
    pub buffer: usize,
    pub classes: usize,
    pub null_class: i64,
    pub latent_scale: f64,
    pub diffusion: DiffusionSettings,
    pub image: ImageSettings,
    pub sampling: SamplingDefaults,
    pub cost: CostShape,
    #[serde(deserialize_with = "unique_keys")]
    pub graphs: BTreeMap<String, GraphEntry>,
    /// Optional image classifier that `gtr-run eval` scores images with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluator: Option<EvaluatorEntry>,
    /// Optional default precision (`--precision` wins; fp32 without either):
    /// fp32, tf32, fp16, bf16 or int8 (see [`crate::precision`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    /// Optional variant graphs: precision (fp16, bf16, int8) → role → file.
    /// A role a variant does not list runs its fp32 graph.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "unique_nested_keys"
    )]
    pub precisions: BTreeMap<String, BTreeMap<String, String>>,
}

/// A mapping whose keys all differ: YAML lets a second `diffusion:` under
/// `graphs` win silently, which would run another graph than the first
/// names; here it is an error naming the key.
struct UniqueKeys<V>(BTreeMap<String, V>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueKeys<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Keys<V> {
            type Value = BTreeMap<String, V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    if out.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!("`{key}` is given twice")));
                    }
                    let value = map.next_value()?;
                    out.insert(key, value);
                }
                Ok(out)
            }
        }
        d.deserialize_map(Keys(std::marker::PhantomData))
            .map(UniqueKeys)
    }
}

fn unique_keys<'de, D: serde::Deserializer<'de>, V: Deserialize<'de>>(
    d: D,
) -> Result<BTreeMap<String, V>, D::Error> {
    UniqueKeys::deserialize(d).map(|m| m.0)
}

fn unique_nested_keys<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, BTreeMap<String, String>>, D::Error> {
    let outer: UniqueKeys<UniqueKeys<String>> = UniqueKeys::deserialize(d)?;
    Ok(outer.0.into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// The input and output roles of an evaluator graph.
pub const EVALUATOR_INPUTS: [&str; 1] = ["pixels"];
pub const EVALUATOR_OUTPUTS: [&str; 2] = ["logits", "features"];

/// An image classifier shipped with a bundle: `pixels` f32 [B, H, W,
/// channels] holding 8-bit values 0..255 → `logits` [B, classes] and
/// `features` [B, F]; `reference` is an npz with `mu` f64 `[F]` and `sigma`
/// f64 [F, F], the feature statistics of real images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluatorEntry {
    /// Names the feature extractor in reports (a Fréchet distance is only
    /// comparable with others on the same features).
    pub name: String,
    pub file: String,
    #[serde(deserialize_with = "unique_keys")]
    pub inputs: BTreeMap<String, String>,
    #[serde(deserialize_with = "unique_keys")]
    pub outputs: BTreeMap<String, String>,
    pub reference: String,
}

/// `path` as one word of a command a message suggests, to be pasted into a
/// POSIX shell: as it is when it holds only letters, digits and
/// `_-./+:,@%=`, else in single quotes (a `'` in it written `'\''`).
pub fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./+:,@%=".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// The folder of the bundle named by `path`: the folder itself, or the
/// folder of its manifest or of one of its graphs.
fn bundle_dir(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    }
}

/// Why a bundle could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {problem}")]
    Manifest { path: PathBuf, problem: String },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A model tool holds the folder's lock: it is changing the bundle.
    #[error(
        "{dir}: a model tool (models/*.py) is changing this bundle; run again once it has finished"
    )]
    Busy { dir: PathBuf },
    /// A model tool was killed while replacing the bundle's files: some may
    /// be new and others old.
    #[error(
        "{plan}: a model tool's commit was interrupted, so some of the bundle's files may be replaced and others not; finish it with `python3 models/onnx_save.py {}` (or any model tool run on the bundle)",
        shell_word(dir)
    )]
    InterruptedCommit { dir: PathBuf, plan: PathBuf },
}

/// Where the model tools stage a commit inside a bundle (models/onnx_save.py):
/// `.gtr-tmp.<pid>.<random>/`, holding `commit.json` once the commit is decided.
const TOOL_STAGING_PREFIX: &str = ".gtr-tmp.";
const TOOL_COMMIT_PLAN: &str = "commit.json";

/// A shared lock on a bundle's folder, held while its manifest and graphs
/// are read ([`Bundle::open_locked`]); released when dropped, or by the
/// kernel when the process ends.
///
/// The model tools (models/onnx_save.py) hold the folder's exclusive lock
/// for their whole run, so a bundle is not read halfway through a tool's
/// commit, and a tool started while a gtr-run reads it refuses at once.
/// Like every lock here it is advisory (`flock` on the folder itself, on
/// Unix; elsewhere, where the tools do not lock either, it is nothing).
#[derive(Debug)]
pub struct BundleReadLock {
    _file: Option<std::fs::File>,
}

impl BundleReadLock {
    /// The shared lock on the bundle folder `dir`, without waiting: refused
    /// while a model tool holds the folder ([`BundleError::Busy`]) and where
    /// a tool's commit was interrupted ([`BundleError::InterruptedCommit`]).
    /// A folder that cannot be opened or listed, or a file system that
    /// refuses locks (ENOLCK on some network mounts; the tools cannot lock
    /// it either), is read unlocked: reading the manifest names the problem.
    pub fn acquire(dir: &Path) -> Result<BundleReadLock, BundleError> {
        #[cfg(unix)]
        let file = match std::fs::File::open(dir) {
            Ok(file) => match file.try_lock_shared() {
                Ok(()) => Some(file),
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(BundleError::Busy {
                        dir: dir.to_path_buf(),
                    });
                }
                Err(std::fs::TryLockError::Error(_)) => None,
            },
            Err(_) => None,
        };
        #[cfg(not(unix))]
        let file = None;
        let staging_plans = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            // The tools' own staging folders, never a link (which their
            // recovery does not follow either).
            .filter(|entry| {
                entry.file_type().is_ok_and(|t| t.is_dir())
                    && entry
                        .file_name()
                        .to_string_lossy()
                        .starts_with(TOOL_STAGING_PREFIX)
            })
            .map(|entry| entry.path().join(TOOL_COMMIT_PLAN));
        for plan in staging_plans {
            if plan.is_file() {
                return Err(BundleError::InterruptedCommit {
                    dir: dir.to_path_buf(),
                    plan,
                });
            }
        }
        Ok(BundleReadLock { _file: file })
    }
}

/// A checked manifest and where its graphs are.
#[derive(Debug, Clone, PartialEq)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Bundle {
    /// What the engine needs to know about the bundle's model.
    pub fn model_info(&self) -> ModelInfo {
        let m = &self.manifest;
        ModelInfo {
            name: m.name.clone(),
            grid: self.grid(),
            token_dim: m.token_dim,
            width: m.width,
            classes: m.classes,
            null_class: m.null_class,
            latent_scale: m.latent_scale,
            train_steps: m.diffusion.train_steps,
            variance: m.diffusion.variance,
            image: m.image,
            defaults: m.sampling,
        }
    }

    /// [`Bundle::open`] under the folder's [`BundleReadLock`]; hold the lock
    /// until every file the run needs from the bundle (graphs, evaluator,
    /// its reference) has been read.
    pub fn open_locked(path: &Path) -> Result<(Bundle, BundleReadLock), BundleError> {
        let dir = bundle_dir(path);
        // A missing path is `open`'s error to name (its parent folder is
        // not this bundle's).
        let lock = if path.exists() && dir.is_dir() {
            BundleReadLock::acquire(&dir)?
        } else {
            BundleReadLock { _file: None }
        };
        Ok((Bundle::open(path)?, lock))
    }

    /// Opens a bundle from its folder, its manifest, or any `.onnx` in it.
    pub fn open(path: &Path) -> Result<Bundle, BundleError> {
        let dir = bundle_dir(path);
        let manifest_path =
            if path.is_file() && path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                path.to_path_buf()
            } else {
                dir.join(MANIFEST_FILE)
            };
        if !path.exists() {
            return Err(BundleError::Manifest {
                path: path.to_path_buf(),
                problem: "no such file or folder; give a model bundle folder, its manifest.yaml or one of its .onnx files".into(),
            });
        }
        let text = read_manifest_text(&manifest_path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                BundleError::Manifest {
                    path: manifest_path.clone(),
                    problem: "not found: a model bundle is a folder holding manifest.yaml and its ONNX graphs (models/README.md); give the folder, its manifest or one of its graphs, or export one with models/export_mar.py".into(),
                }
            } else {
                BundleError::Read {
                    path: manifest_path.clone(),
                    source,
                }
            }
        })?;
        if let Some(problem) = text_problem(&text) {
            return Err(BundleError::Manifest {
                path: manifest_path,
                problem,
            });
        }
        let manifest: Manifest =
            serde_norway::from_str(&text).map_err(|e| BundleError::Manifest {
                path: manifest_path.clone(),
                problem: e.to_string(),
            })?;
        let bundle = Bundle { dir, manifest };
        bundle.validate().map_err(|problem| BundleError::Manifest {
            path: manifest_path,
            problem,
        })?;
        Ok(bundle)
    }

    /// The manifest's numbers ([`Self::check_numbers`]), then its graphs,
    /// evaluator and precisions.
    fn validate(&self) -> Result<(), String> {
        self.check_numbers()?;
        self.check_graphs()?;
        check_precisions(self)
    }

    /// The format, every size and number of the manifest in range.
    fn check_numbers(&self) -> Result<(), String> {
        let m = &self.manifest;
        if m.format != FORMAT {
            return Err(format!(
                "format is `{}`; this gtr-run reads `{FORMAT}`",
                m.format
            ));
        }
        if m.name.is_empty()
            || m.name.len() > MAX_NAME_BYTES
            || m.name.chars().any(char::is_control)
        {
            return Err(format!(
                "`name` {:?} must be 1 to {MAX_NAME_BYTES} bytes of printable text (no control characters: it is printed and part of folder names)",
                m.name.chars().take(60).collect::<String>()
            ));
        }
        // Sizes: at least 1, and small enough that no product of them
        // overflows or asks for absurd memory.
        let sizes = [
            ("grid[0]", m.grid[0], MAX_SIDE),
            ("grid[1]", m.grid[1], MAX_SIDE),
            ("token_dim", m.token_dim, MAX_WIDTH),
            ("width", m.width, MAX_WIDTH),
            ("buffer", m.buffer, MAX_WIDTH),
            ("image.height", m.image.height, MAX_IMAGE_SIDE),
            ("image.width", m.image.width, MAX_IMAGE_SIDE),
            ("image.channels", m.image.channels, 3),
            (
                "diffusion.train_steps",
                m.diffusion.train_steps,
                MAX_TRAIN_STEPS,
            ),
        ];
        let cost = [
            ("cost.encoder_depth", m.cost.encoder_depth, MAX_DEPTH),
            ("cost.decoder_depth", m.cost.decoder_depth, MAX_DEPTH),
            (
                "cost.diffusion_width",
                m.cost.diffusion_width,
                MAX_WIDTH as u64,
            ),
            ("cost.diffusion_depth", m.cost.diffusion_depth, MAX_DEPTH),
        ];
        let sizes = sizes.map(|(key, v, max)| (key, v as u64, max as u64));
        for (key, v, max) in sizes.into_iter().chain(cost) {
            if v == 0 || v > max {
                return Err(format!("`{key}` is {v}; it must be from 1 to {max}"));
            }
        }
        if m.grid[0] * m.grid[1] > gtr_plan::grid::MAX_TOKENS {
            return Err(format!(
                "grid {}x{} is too large (at most {} tokens)",
                m.grid[0],
                m.grid[1],
                gtr_plan::grid::MAX_TOKENS
            ));
        }
        let tokens = (m.grid[0] * m.grid[1]) as u64;
        let products = [
            (
                "grid × token_dim (an image's tokens)",
                tokens * m.token_dim as u64,
            ),
            ("grid × width (an image's z)", tokens * m.width as u64),
            (
                "(buffer + grid) × width (the encoder's rows)",
                (m.buffer as u64 + tokens) * m.width as u64,
            ),
            (
                "image.height × image.width × image.channels (an image's pixels)",
                (m.image.height * m.image.width * m.image.channels) as u64,
            ),
        ];
        for (what, values) in products {
            if values > MAX_IMAGE_VALUES {
                return Err(format!(
                    "{what} is {values} values; at most {MAX_IMAGE_VALUES} are supported (grid {}x{}, token_dim {}, width {}, buffer {}, image {}x{}x{})",
                    m.grid[0],
                    m.grid[1],
                    m.token_dim,
                    m.width,
                    m.buffer,
                    m.image.height,
                    m.image.width,
                    m.image.channels
                ));
            }
        }
        if m.diffusion.schedule != "cosine" {
            return Err(format!(
                "diffusion.schedule `{}` is not supported; only `cosine` (MAR's) is",
                m.diffusion.schedule
            ));
        }
        if !(m.latent_scale.is_finite() && (1e-6..=1e6).contains(&m.latent_scale)) {
            return Err(format!(
                "latent_scale is {:e}; it must be a finite number from 1e-6 to 1e6 (MAR's KL-16: 0.2325)",
                m.latent_scale
            ));
        }
        if m.null_class < 0 {
            return Err("null_class must be >= 0".into());
        }
        if m.classes > 0 && (m.null_class as u64) < m.classes as u64 {
            return Err(format!(
                "null_class is {}, one of the {} real classes (0..{}); MAR's null class is the one after them ({})",
                m.null_class,
                m.classes,
                m.classes - 1,
                m.classes
            ));
        }
        for (key, v) in [
            ("sampling.cfg", m.sampling.cfg),
            ("sampling.temperature", m.sampling.temperature),
        ] {
            if !gtr_plan::plan::is_sampler_scale(v) {
                return Err(format!(
                    "`{key}` is {}; it must be {}",
                    gtr_plan::schedule::fmt_num(v),
                    gtr_plan::plan::SAMPLER_SCALE_RULE
                ));
            }
        }
        if ![1, 3].contains(&m.image.channels) {
            return Err(format!(
                "image.channels must be 1 or 3, not {}",
                m.image.channels
            ));
        }
        Ok(())
    }

    /// Every required graph listed, with the roles of its tensors and a
    /// file inside the bundle; optional graphs likewise where listed, the
    /// split head's parts together, the evaluator's entries, no unknown role.
    fn check_graphs(&self) -> Result<(), String> {
        let m = &self.manifest;
        for role in Role::ALL.into_iter().chain(Role::OPTIONAL) {
            let Some(entry) = m.graphs.get(role.key()) else {
                if Role::OPTIONAL.contains(&role) {
                    continue;
                }
                return Err(format!("graphs.{} is missing", role.key()));
            };
            let key = format!("graphs.{}", role.key());
            check_roles(&key, "inputs", role.inputs(), &entry.inputs)?;
            check_roles(&key, "outputs", role.outputs(), &entry.outputs)?;
            self.check_file(&format!("{key}.file"), &entry.file)?;
        }
        let split = [Role::DiffusionCondition, Role::DiffusionState]
            .map(|r| m.graphs.contains_key(r.key()));
        if split[0] != split[1] {
            return Err("graphs.diffusion_condition and graphs.diffusion_state come together (the diffusion head's two parts; models/split_head.py writes both)".into());
        }
        if let Some(e) = &m.evaluator {
            check_roles("evaluator", "inputs", &EVALUATOR_INPUTS, &e.inputs)?;
            check_roles("evaluator", "outputs", &EVALUATOR_OUTPUTS, &e.outputs)?;
            self.check_file("evaluator.file", &e.file)?;
            self.check_file("evaluator.reference", &e.reference)?;
        }
        let known: Vec<&str> = Role::ALL
            .iter()
            .chain(&Role::OPTIONAL)
            .map(|r| r.key())
            .collect();
        if let Some(extra) = m.graphs.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!(
                "graphs has an unknown role `{extra}` (known: {})",
                known.join(", ")
            ));
        }
        Ok(())
    }

    /// `schedule` planned with `seed` as a run on this bundle plans it: on
    /// the bundle's grid (a schedule stating another is refused at its
    /// `grid` line), with the bundle's guidance and temperature defaults,
    /// so that guided steps cost both branches (`gtr-run plan --cost
    /// BUNDLE`, `Plan.cost(bundle)` in Python). A plan the bundle cannot
    /// run (a chain longer than its training chain) is refused, as a run
    /// refuses it.
    pub fn plan(
        &self,
        schedule: &gtr_plan::schedule::Schedule,
        seed: u64,
    ) -> Result<gtr_plan::plan::Plan, gtr_plan::schedule::ScheduleError> {
        use gtr_plan::schedule::ScheduleError;
        schedule.check_model_grid(self.grid(), &self.manifest.name)?;
        let options = self.manifest.sampling.plan_options(None, None);
        let plan = gtr_plan::plan::Planner::new(schedule, self.grid())
            .and_then(|p| p.plan_with(seed, &options))
            .map_err(|d| ScheduleError::Invalid(Box::new(d)))?;
        gtr_engine::check_plan(&self.model_info(), &plan).map_err(|problem| {
            ScheduleError::Text {
                path: schedule.source.name.clone(),
                problem,
            }
        })?;
        Ok(plan)
    }

    /// The manifest's default precision, if it sets one (checked at open).
    pub fn default_precision(&self) -> Option<crate::precision::Precision> {
        self.manifest
            .precision
            .as_deref()
            .and_then(|p| p.parse().ok())
    }

    fn check_file(&self, key: &str, file: &str) -> Result<(), String> {
        let path = self.dir.join(file);
        if path.is_file() {
            Ok(())
        } else if path.exists() {
            Err(format!(
                "{key}: {} is not a regular file (a folder, device or pipe)",
                path.display()
            ))
        } else {
            Err(format!("{key}: {} does not exist", path.display()))
        }
    }

    /// A required graph's entry (checked at open).
    pub fn graph(&self, role: Role) -> &GraphEntry {
        &self.manifest.graphs[role.key()]
    }

    /// An optional graph's entry, if the bundle has it.
    pub fn optional_graph(&self, role: Role) -> Option<&GraphEntry> {
        self.manifest.graphs.get(role.key())
    }

    /// Where the graph of `entry` is.
    pub fn entry_path(&self, entry: &GraphEntry) -> PathBuf {
        self.dir.join(&entry.file)
    }

    /// What a run of the bundle reads, and so never writes: its folder, then
    /// every file it names, as paths under the folder (not resolved): the
    /// manifest, each graph, each precision variant, the evaluator and its
    /// reference (which may lie outside the folder).
    pub fn read_paths(&self) -> Vec<PathBuf> {
        let m = &self.manifest;
        let graphs = m.graphs.values().map(|g| g.file.as_str());
        let variants = m
            .precisions
            .values()
            .flat_map(|v| v.values().map(String::as_str));
        let evaluator = m
            .evaluator
            .iter()
            .flat_map(|e| [e.file.as_str(), e.reference.as_str()]);
        let files = std::iter::once(MANIFEST_FILE)
            .chain(graphs)
            .chain(variants)
            .chain(evaluator)
            .map(|file| self.dir.join(file));
        std::iter::once(self.dir.clone()).chain(files).collect()
    }

    pub fn graph_path(&self, role: Role) -> PathBuf {
        self.entry_path(self.graph(role))
    }

    pub fn grid(&self) -> Grid {
        Grid::new(self.manifest.grid[0], self.manifest.grid[1])
    }

    /// The model's shape for the FLOPs model.
    pub fn cost_spec(&self) -> gtr_plan::cost::ModelSpec {
        let m = &self.manifest;
        gtr_plan::cost::ModelSpec {
            name: m.name.clone(),
            width: m.width as u64,
            encoder_depth: m.cost.encoder_depth,
            decoder_depth: m.cost.decoder_depth,
            diffusion_width: m.cost.diffusion_width,
            diffusion_depth: m.cost.diffusion_depth,
            token_dim: m.token_dim as u64,
            buffer: m.buffer as u64,
            train_steps: m.diffusion.train_steps,
        }
    }
}

/// The largest manifest read (MAR's are under 2 KB).
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// The deepest bracket nesting a manifest may have (the format needs 2).
const MAX_NESTING: usize = 32;

/// The manifest's text, read through a bounded reader (one byte past the
/// limit tells it was exceeded; [`text_problem`] says so), without a
/// leading byte-order mark. Only a regular file is opened: a pipe would
/// block the read until something wrote to it.
fn read_manifest_text(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a folder, pipe or device)",
        ));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)?;
    let text = String::from_utf8(bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()))?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// Why a manifest's text is refused before parsing: too large, or nested
/// deeper than any manifest needs (deep nesting makes YAML parsing slow).
fn text_problem(text: &str) -> Option<String> {
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Some(format!(
            "larger than {} KiB; a manifest is a small text file",
            MAX_MANIFEST_BYTES / 1024
        ));
    }
    let mut depth = 0usize;
    for (k, c) in text.char_indices() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > MAX_NESTING {
            let line = text[..k].matches('\n').count() + 1;
            return Some(format!(
                "brackets nested more than {MAX_NESTING} deep (line {line}); a manifest needs 2"
            ));
        }
    }
    None
}

/// Checks that a graph entry names exactly the roles `want`.
fn check_roles(
    key: &str,
    kind: &str,
    want: &[&str],
    have: &BTreeMap<String, String>,
) -> Result<(), String> {
    if let Some(r) = want.iter().find(|r| !have.contains_key(**r)) {
        return Err(format!(
            "{key}.{kind} has no `{r}` (it needs {})",
            want.join(", ")
        ));
    }
    if let Some(extra) = have.keys().find(|k| !want.contains(&k.as_str())) {
        return Err(format!(
            "{key}.{kind} has an unknown role `{extra}` (known: {})",
            want.join(", ")
        ));
    }
    Ok(())
}

/// Checks a manifest's `precision` and `precisions` fields (called by
/// [`Bundle::open`]): known names, variants of existing roles only, and
/// a default that the bundle can honour.
fn check_precisions(bundle: &Bundle) -> Result<(), String> {
    let m = &bundle.manifest;
    for (name, roles) in &m.precisions {
        let key = format!("precisions.{name}");
        match name.parse::<Precision>() {
            Ok(p) if p.is_variant() => {}
            Ok(Precision::Fp32) => {
                return Err(format!(
                    "{key}: fp32 is the `graphs` section itself; `precisions` lists fp16, bf16 and int8 variants"
                ));
            }
            Ok(_) => {
                return Err(format!(
                    "{key}: tf32 is not a graph variant but the CUDA provider's TF32 switch (--precision tf32 with the fp32 graphs); remove this entry"
                ));
            }
            Err(_) => {
                return Err(format!(
                    "{key}: unknown precision `{name}`; variants can be fp16, bf16 or int8"
                ));
            }
        }
        if roles.is_empty() {
            return Err(format!(
                "{key} lists no graphs; remove it or give role: file entries"
            ));
        }
        for (role, file) in roles {
            if !m.graphs.contains_key(role) {
                let known: Vec<&str> = m.graphs.keys().map(String::as_str).collect();
                return Err(format!(
                    "{key}.{role}: the bundle has no graph of this role (its graphs: {})",
                    known.join(", ")
                ));
            }
            if !bundle.dir.join(file).exists() {
                return Err(format!(
                    "{key}.{role}: {} does not exist (make it with `python3 models/convert_precision.py {} --precision {name}`)",
                    bundle.dir.join(file).display(),
                    shell_word(&bundle.dir)
                ));
            }
            bundle.check_file(&format!("{key}.{role}"), file)?;
        }
    }
    if let Some(text) = &m.precision {
        let p: Precision = text
            .parse()
            .map_err(|e: String| format!("precision: {e}"))?;
        if p.is_variant() && !m.precisions.contains_key(p.name()) {
            return Err(format!(
                "precision: {p} is the default, but there is no `precisions: {p}:` entry with its graphs"
            ));
        }
    }
    Ok(())
}

/// Why [`cost_spec_named`] found no spec.
#[derive(Debug, thiserror::Error)]
pub enum NamedSpecError {
    #[error(
        "{name}: no such model spec or bundle; the built-in specs are {list}, or give a model bundle",
        name = .0,
        list = ModelSpec::BUILTIN_NAMES.join(", ")
    )]
    Unknown(String),
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

/// A built-in cost spec by name (see [`ModelSpec::builtin`]), else the cost
/// shape of the model bundle at the path `name` (`gtr-run plan --cost`).
pub fn cost_spec_named(name: &str) -> Result<ModelSpec, NamedSpecError> {
    match ModelSpec::builtin(name) {
        Some(spec) => Ok(spec),
        None if Path::new(name).exists() => Ok(Bundle::open(Path::new(name))?.cost_spec()),
        None => Err(NamedSpecError::Unknown(name.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggested_commands_quote_paths_a_shell_would_split() {
        assert_eq!(shell_word(Path::new("models/mar-tiny")), "models/mar-tiny");
        assert_eq!(shell_word(Path::new("my models/b")), "'my models/b'");
        assert_eq!(shell_word(Path::new("it's")), "'it'\\''s'");
        assert_eq!(shell_word(Path::new("$HOME;rm")), "'$HOME;rm'");
        assert_eq!(shell_word(Path::new("")), "''");
    }
}

//! `run.json`: the typed record of a generation run, the only way it is
//! written, read, compared for `--resume`, merged and summed.
//!
//! A record is written twice: before the first image, with what the run is
//! ([`RunRecord::measured`] `None`, `finished: false`), and at the end with
//! the measurements. The schema is documented in `docs/run-record.md`.
//! Records written by older versions lack some fields; each such field has
//! the default those versions implied.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::RunError;
use crate::cost::PricedCost;
use crate::engine::ModelInfo;
use crate::engine::{GraphStats, StepStats};
use crate::fsutil::{sha256_file, sha256_hex, write_atomic};
use crate::plan::DetailRule;

/// How [`RunRecord::disagreements`] names `model.sha256`.
const MODEL_DIGEST: &str = "model's settings and graphs (SHA-256)";
/// How [`RunRecord::disagreements`] names `replay_sha256`.
const REPLAY_DIGEST: &str = "replay file's contents (SHA-256)";
/// The identity entry of where the chains ran (`--sampler`, `--head`): absent
/// from records older than it.
const CHAINS: &str = "diffusion chains (--sampler, --head)";
const PROVIDER: &str = "execution provider (--device)";

/// The file name of the record in a run's folder.
pub const RECORD_FILE: &str = "run.json";

/// One run, or one shard of it, or (with [`RunRecord::parts`]) several
/// shards merged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The version of gtr-run that made the images; its presence marks a
    /// file as a gtr-run record.
    pub gtr_run_version: String,
    pub model: ModelRecord,
    pub schedule: ScheduleRecord,
    /// The run's seed; image `i` uses `rng::image_seed(seed, i)`.
    pub seed: u64,
    /// Images in the whole run (all shards).
    pub num_images: usize,
    /// The part of the images this folder holds; `None` for a whole run.
    pub shard: Option<ShardRecord>,
    /// Images per engine batch; `None` where merged parts differed.
    pub batch: Option<usize>,
    /// The class label of every image of the whole run, by index.
    pub labels: Vec<i64>,
    /// `--cfg`, replacing the schedule's guidance.
    pub cfg_override: Option<f64>,
    /// `--temperature`, replacing the schedule's.
    pub temperature_override: Option<f64>,
    /// The `--replay` file the noise came from (in a merged record, the
    /// first part's path: the parts' files have one SHA-256).
    pub replay: Option<String>,
    /// SHA-256 (hex) of the `--replay` file; absent without one and in
    /// records older than the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_sha256: Option<String>,
    /// `--device` as given; `None` where merged parts differed.
    pub device_requested: Option<String>,
    /// The precision the graphs ran in (records older than precisions ran
    /// fp32).
    #[serde(default = "fp32")]
    pub precision: String,
    /// How the backend loaded the graphs (precision source, graph files,
    /// provider options). Its shape is the backend's; the run layer only
    /// carries it, compares it between shards and never reads into it.
    #[serde(default)]
    pub runtime_settings: Value,
    /// MAR steps of the plan of image 0.
    pub mar_steps: usize,
    pub cost_per_image: PricedCost,
    /// False from the first image until the run ends; records older than
    /// the flag were written only at the end.
    #[serde(default = "yes")]
    pub finished: bool,
    /// SHA-256 (hex) of every image in the folder, by file name.
    #[serde(default)]
    pub images_sha256: BTreeMap<String, String>,
    /// Each image's tokens in the order they were revealed (step by step,
    /// ascending within a step), by file name; only for schedules with
    /// adaptive orders, whose tokens the engine chooses at run time.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reveal_orders: BTreeMap<String, Vec<usize>>,
    /// The process writing the folder, while it is unfinished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<Writer>,
    /// What the run measured; present once it finished.
    #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measurements>,
    /// The folders a merged record was made of, in index order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<PartRecord>,
}

fn fp32() -> String {
    "fp32".into()
}

fn yes() -> bool {
    true
}

/// A merged record's `diffusion_chains` or `backbone` where its parts ran
/// differently (its [`PartRecord`]s say how each ran; `vae_decode` has
/// [`VaeDecode::Mixed`]).
pub const MIXED: &str = "mixed";

/// When a run's batches were decoded (run.json's `vae_decode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VaeDecode {
    /// After the batch's MAR steps, before the next batch.
    #[default]
    Inline,
    /// On a thread of its own, beside the next batch's MAR steps.
    Overlap,
    /// A merged record whose parts decoded differently.
    Mixed,
}

impl std::fmt::Display for VaeDecode {
    /// As run.json writes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VaeDecode::Inline => "inline",
            VaeDecode::Overlap => "overlap",
            VaeDecode::Mixed => MIXED,
        })
    }
}

fn split_backbone() -> String {
    "encoder and decoder".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// The bundle manifest's `name`.
    pub name: String,
    /// The bundle's folder; `None` where merged parts differed.
    pub path: Option<String>,
    /// Classes of the model (0: unconditional).
    pub classes: usize,
    /// [`model_digest`] of the run's model: two bundles of one name with
    /// other weights or settings differ here. `None` for runs that wrote no
    /// folder (in memory) and records older than the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// SHA-256 (hex) of a model as a run uses it: the manifest's settings that
/// the engine reads (`info`, as its `Debug` text: compared only between
/// records of one gtr-run version) and the SHA-256 of each graph file
/// `files` ((role, path), in order) and of the external data files it
/// names (its weights kept beside it). Reads every file once.
pub fn model_digest(info: &ModelInfo, files: &[(String, PathBuf)]) -> std::io::Result<String> {
    let mut text = format!("{info:?}\n");
    for (role, path) in files {
        text += &format!("{role} {}\n", sha256_file(path)?);
        let folder = path.parent().unwrap_or(std::path::Path::new(""));
        for data in crate::backend::external_data::external_data_files(path)? {
            let name = data.strip_prefix(folder).unwrap_or(&data).display();
            let sha = sha256_file(&data).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("{} (weights of {}): {e}", data.display(), path.display()),
                )
            })?;
            text += &format!("{role} data {name} {sha}\n");
        }
    }
    Ok(sha256_hex(text.as_bytes()))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleRecord {
    /// The schedule file; `None` where merged parts differed.
    pub path: Option<String>,
    /// The schedule's whole text.
    pub source: String,
    /// Every declared parameter's value, overrides applied.
    pub params: BTreeMap<String, f64>,
}

/// Shard `k` of `n`, holding the image indices `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub k: usize,
    pub n: usize,
    pub start: usize,
    pub end: usize,
}

/// The process that holds an unfinished run's folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writer {
    pub pid: u32,
    pub host: String,
}

/// What a finished run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurements {
    /// Images made by this process (the rest were kept by `--resume`).
    pub generated_now: usize,
    /// The provider that ran the graphs; `None` where merged parts
    /// differed.
    pub execution_provider: Option<String>,
    /// Where the diffusion chains ran: [`crate::engine::Engine::chain_runner`].
    pub diffusion_chains: String,
    /// How the backbone ran: `encoder and decoder` or `backbone graph`
    /// (records older than the fused graph ran the former).
    #[serde(default = "split_backbone")]
    pub backbone: String,
    /// `--sampler-ticks`.
    pub sampler_ticks_per_call: Option<usize>,
    /// When each batch's VAE decode ran (`--vae`); records older than the
    /// choice ran inline.
    #[serde(default)]
    pub vae_decode: VaeDecode,
    /// The plan of image 0, step by step, with each step's measurements.
    pub steps: Vec<StepRecord>,
    /// Each graph's calls and seconds.
    pub graphs: Vec<GraphStats>,
    pub seconds: Seconds,
}

/// One MAR step of the plan of image 0 and what it cost over the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: usize,
    pub stage: String,
    pub tokens: usize,
    pub known_before: usize,
    pub diffusion_steps: u32,
    /// The step's `clip_timesteps` (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_timesteps: Option<u32>,
    pub detail: Option<DetailRule>,
    pub cfg: Option<f64>,
    pub temperature: f64,
    /// Summed over every image of the run (and over merged parts).
    #[serde(flatten)]
    pub measured: StepStats,
}

/// Seconds of a run; merged records hold the sum over parts (machine time).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Seconds {
    /// The whole generation loop, writing included.
    pub wall: f64,
    /// Inside the engine, VAE included (decodes that overlapped sampling
    /// too, so it may exceed `wall`).
    pub generation: f64,
    pub in_model_calls: f64,
    pub in_runtime_run_calls: f64,
    pub outside_runtime_run_calls: f64,
    pub vae: f64,
    /// Creating the sessions (not in `wall`).
    pub session_creation: f64,
    /// Each graph's first call (in `generation`); with TensorRT, engines
    /// are built in one of these two.
    pub first_calls: f64,
}

impl Seconds {
    fn add(&mut self, more: &Seconds) {
        self.wall += more.wall;
        self.generation += more.generation;
        self.in_model_calls += more.in_model_calls;
        self.in_runtime_run_calls += more.in_runtime_run_calls;
        self.outside_runtime_run_calls += more.outside_runtime_run_calls;
        self.vae += more.vae;
        self.session_creation += more.session_creation;
        self.first_calls += more.first_calls;
    }
}

/// One folder of a merged record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartRecord {
    pub dir: String,
    pub shard: Option<ShardRecord>,
    pub batch: Option<usize>,
    pub device_requested: Option<String>,
    pub execution_provider: Option<String>,
    /// How it ran, as its record's measurements say (`None` for a part
    /// that was not finished; absent from records older than these).
    #[serde(default)]
    pub diffusion_chains: Option<String>,
    #[serde(default)]
    pub backbone: Option<String>,
    #[serde(default)]
    pub vae_decode: Option<VaeDecode>,
    pub generated_now: Option<usize>,
    pub seconds: Option<Seconds>,
}

impl RunRecord {
    /// Writes the record as `out/run.json`, atomically.
    pub fn write(&self, out: &Path) -> Result<(), RunError> {
        let path = out.join(RECORD_FILE);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| RunError::Invalid(format!("cannot write {}: {e}", path.display())))?
            + "\n";
        write_atomic(&path, text.as_bytes()).map_err(|source| RunError::Write { path, source })
    }

    /// Reads `dir/run.json`; a file that is not a gtr-run record is an
    /// error naming it.
    pub fn read(dir: &Path) -> Result<RunRecord, RunError> {
        let path = dir.join(RECORD_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            RunError::Invalid(format!(
                "cannot read {}: {e}; a folder is a finished run only once its run.json is written (resume an interrupted one with --resume)",
                path.display()
            ))
        })?;
        serde_json::from_str(&text).map_err(|e| {
            RunError::Invalid(format!("{} is not a gtr-run record: {e}", path.display()))
        })
    }

    /// What makes two records parts of one run: what each value is called
    /// in messages, and the value. Not compared: batch size, device and
    /// paths (none changes an image), nor the measurements.
    fn identity(&self) -> [(&'static str, Value); 18] {
        [
            ("gtr-run version", json!(self.gtr_run_version)),
            ("model", json!(self.model.name)),
            ("model's number of classes", json!(self.model.classes)),
            (MODEL_DIGEST, json!(self.model.sha256)),
            ("schedule text", json!(self.schedule.source)),
            ("schedule parameters", json!(self.schedule.params)),
            ("MAR steps", json!(self.mar_steps)),
            ("seed", json!(self.seed)),
            ("number of images", json!(self.num_images)),
            ("class labels", json!(self.labels)),
            ("guidance (--cfg)", json!(self.cfg_override)),
            (
                "temperature (--temperature)",
                json!(self.temperature_override),
            ),
            // Replay paths differ between machines; whether one was used
            // may not.
            ("use of a replay file", json!(self.replay.is_some())),
            (REPLAY_DIGEST, json!(self.replay_sha256)),
            ("precision (--precision)", json!(self.precision)),
            // Chain graphs and the host path may differ by a pixel level.
            (CHAINS, self.runtime_settings["diffusion_chains"].clone()),
            // CPU and CUDA kernels differ in the last bits.
            (
                PROVIDER,
                self.runtime_settings["execution_provider"].clone(),
            ),
            // int8 (activations per tensor) images change with their batch.
            (
                "batch (--batch; int8 images depend on it)",
                if self.precision == "int8" {
                    json!(self.batch)
                } else {
                    Value::Null
                },
            ),
        ]
    }

    /// How this record (of folder `name`) and `other` (of `other_name`)
    /// differ in what makes a run, one phrase each, e.g. "the seed (0 in
    /// A, 1 in B)"; empty when they are parts of one run.
    pub fn disagreements(&self, name: &str, other: &RunRecord, other_name: &str) -> Vec<String> {
        self.identity()
            .into_iter()
            .zip(other.identity())
            // A record older than a digest (or the chains or provider entry) has none to compare.
            .filter(|((what, x), (_, y))| {
                let digest = [MODEL_DIGEST, REPLAY_DIGEST, CHAINS, PROVIDER].contains(what);
                x != y && !(digest && (x.is_null() || y.is_null()))
            })
            .map(|((what, x), (_, y))| {
                let (x, y) = (x.to_string(), y.to_string());
                if x.len() + y.len() <= 60 {
                    format!("the {what} ({x} in {name}, {y} in {other_name})")
                } else {
                    format!("the {what}")
                }
            })
            .collect()
    }

    /// The record of one run made of `parts` ((folder, record), in index
    /// order, checked with [`RunRecord::disagreements`]), as one machine
    /// would have written it: the first part's record with `shard` `None`;
    /// the image hashes and reveal orders of all parts together; `generated_now`, every
    /// `seconds` entry and each graph's and step's counters summed over the
    /// parts (machine time, not elapsed time); batch, device, execution
    /// provider, runtime settings and paths kept where all parts agree,
    /// else `None`; where the chains, the backbone and the VAE decode ran
    /// kept where all parts agree, else [`MIXED`] ([`VaeDecode::Mixed`]); and
    /// [`RunRecord::parts`]. `None` without parts.
    pub fn combine(parts: &[(String, RunRecord)]) -> Option<RunRecord> {
        let ((_, first), rest) = parts.split_first()?;
        let mut all = first.clone();
        all.shard = None;
        all.writer = None;
        for (_, part) in rest {
            all.images_sha256.extend(part.images_sha256.clone());
            all.reveal_orders.extend(part.reveal_orders.clone());
            if let (Some(total), Some(more)) = (all.measured.as_mut(), part.measured.as_ref()) {
                total.add(more);
            }
        }
        let agree = |field: &dyn Fn(&RunRecord) -> Value| {
            parts.iter().all(|(_, r)| field(r) == field(first))
        };
        if !agree(&|r| json!(r.batch)) {
            all.batch = None;
        }
        if !agree(&|r| json!(r.device_requested)) {
            all.device_requested = None;
        }
        if !agree(&|r| r.runtime_settings.clone()) {
            all.runtime_settings = Value::Null;
        }
        if !agree(&|r| json!(r.model.path)) {
            all.model.path = None;
        }
        if !agree(&|r| json!(r.schedule.path)) {
            all.schedule.path = None;
        }
        let provider = |r: &RunRecord| json!(r.measured.as_ref().map(|m| &m.execution_provider));
        if let (false, Some(m)) = (agree(&provider), all.measured.as_mut()) {
            m.execution_provider = None;
        }
        // How the parts ran, where they ran differently.
        if let Some(m) = all.measured.as_mut() {
            let ran =
                |how: fn(&Measurements) -> Value| agree(&|r| json!(r.measured.as_ref().map(how)));
            if !ran(|m| json!(m.diffusion_chains)) {
                m.diffusion_chains = MIXED.into();
            }
            if !ran(|m| json!(m.backbone)) {
                m.backbone = MIXED.into();
            }
            if !ran(|m| json!(m.vae_decode)) {
                m.vae_decode = VaeDecode::Mixed;
            }
        }
        all.parts = parts
            .iter()
            .map(|(dir, r)| {
                let m = r.measured.as_ref();
                PartRecord {
                    dir: dir.clone(),
                    shard: r.shard,
                    batch: r.batch,
                    device_requested: r.device_requested.clone(),
                    execution_provider: m.and_then(|m| m.execution_provider.clone()),
                    diffusion_chains: m.map(|m| m.diffusion_chains.clone()),
                    backbone: m.map(|m| m.backbone.clone()),
                    vae_decode: m.map(|m| m.vae_decode),
                    generated_now: m.map(|m| m.generated_now),
                    seconds: m.map(|m| m.seconds.clone()),
                }
            })
            .collect();
        Some(all)
    }
}

impl Measurements {
    /// Adds another part's counters and seconds: images made, seconds,
    /// each graph's calls, seconds, loading and first call (matched by
    /// name: machine time, as `seconds.session_creation` and
    /// `seconds.first_calls` sum; kernel profiles are dropped) and each
    /// step's counters (matched by index).
    fn add(&mut self, more: &Measurements) {
        self.generated_now += more.generated_now;
        self.seconds.add(&more.seconds);
        for graph in &mut self.graphs {
            if let Some(same) = more.graphs.iter().find(|g| g.graph == graph.graph) {
                graph.calls += same.calls;
                graph.seconds += same.seconds;
                graph.load_seconds += same.load_seconds;
                graph.first_call_seconds += same.first_call_seconds;
            }
            // A kernel profile is of one process's calls, not of the sum
            // (each part's file stays where that part wrote it).
            graph.kernels = None;
        }
        for (step, same) in self.steps.iter_mut().zip(&more.steps) {
            step.measured.add(&same.measured);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as written before the first image (no measurements) reads
    /// back equal; one without the fields older versions lacked gets their
    /// defaults.
    #[test]
    fn records_round_trip_and_old_records_get_defaults() {
        let text = r#"{
            "gtr_run_version": "0.1.0",
            "model": {"name": "m", "path": "models/m", "classes": 2},
            "schedule": {"path": "s.gtr", "source": "x", "params": {"k": 2.0}},
            "seed": 3, "num_images": 2, "shard": null, "batch": 2,
            "labels": [0, 1], "cfg_override": null, "temperature_override": 1.5,
            "replay": null, "device_requested": "cpu", "mar_steps": 4,
            "cost_per_image": {"model": "m", "mar_steps": 4, "encoder_passes": 4,
                "decoder_passes": 4, "diffusion_evaluations": 10, "encoder_flops": 1.0,
                "decoder_flops": 2.0, "diffusion_flops": 3.0, "total_flops": 6.0}
        }"#;
        let old: RunRecord = serde_json::from_str(text).unwrap();
        assert_eq!(old.precision, "fp32");
        assert!(old.finished);
        assert!(old.measured.is_none() && old.images_sha256.is_empty());
        let again: RunRecord = serde_json::from_str(&serde_json::to_string(&old).unwrap()).unwrap();
        assert_eq!(again, old);
        let mut other = old.clone();
        other.seed = 4;
        other.batch = Some(1);
        assert_eq!(
            old.disagreements("A", &other, "B"),
            ["the seed (3 in A, 4 in B)"]
        );
    }

    #[test]
    fn a_file_that_is_not_a_record_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RECORD_FILE), "{\"mine\": 1}").unwrap();
        let err = RunRecord::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("run.json is not a gtr-run record"), "{err}");
    }
}

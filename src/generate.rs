//! A generation run: images from a bundle and a schedule, written to an
//! output folder as `00000.png`…, a preview `grid.png` and `run.json`,
//! optionally an `.npz` of all images; a run may be split into shards
//! ([`Shard`]) that [`crate::merge`] joins again.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use image::{DynamicImage, GrayImage, RgbImage};
use ndarray::Axis;
use ndarray_npy::npy::header::{Header, Layout};
use ndarray_npy::{NpzWriter, WritableElement, WriteNpyError, WriteNpyExt};
use serde_json::{Value, json};

use crate::bundle::Bundle;
use crate::cost::plan_cost;
use crate::engine::{Engine, ImageJob, MarModel, Noise, Replay};
use crate::fsutil::{
    FolderLock, LOCK_FILE, LockError, host_name, is_temporary, sha256_file, sha256_hex,
    write_atomic, write_atomic_with,
};
use crate::plan::{Plan, PlanOptions, Planner};
use crate::rng::image_seed;
use crate::schedule::{Schedule, ScheduleError};

/// What to do with an output folder that holds a previous run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    Refuse,
    /// Skip images whose PNG is already there.
    Resume,
    /// Replace the previous run's files.
    Overwrite,
}

/// Which class each image asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Classes {
    /// Balanced over all classes, in blocks (MAR's `arange(classes).repeat`).
    Balanced,
    /// The same class for every image.
    One(i64),
    /// These classes, cycled.
    List(Vec<i64>),
}

/// One of `n` contiguous parts of a run's image indices (`--shard K/N`).
///
/// Shards count from 0, as Kubernetes indexed Jobs (`JOB_COMPLETION_INDEX`)
/// and `sbatch --array=0-(N-1)` (`SLURM_ARRAY_TASK_ID`) do. Shard `k` of a
/// run of `num` images holds the indices `k·num/n .. (k+1)·num/n`: the parts
/// differ in size by at most one and together hold every index once, in
/// order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub k: usize,
    pub n: usize,
}

impl Shard {
    /// The image indices this shard holds in a run of `num_images`.
    pub fn range(self, num_images: usize) -> Range<usize> {
        let at = |k: usize| (k as u128 * num_images as u128 / self.n as u128) as usize;
        at(self.k)..at(self.k + 1)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}/{}", self.k, self.n)
    }
}

impl FromStr for Shard {
    type Err = String;

    /// Parses `K/N`; K must be in `0..N`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (k, n) = s.split_once('/').ok_or_else(|| {
            format!("`{s}` is not K/N: give the shard's number K (from 0) and the number of shards N, e.g. 0/4")
        })?;
        let number = |t: &str| {
            t.trim().parse::<usize>().map_err(|_| {
                format!("`{s}`: K and N must be whole numbers, e.g. 0/4 for the first of 4 shards")
            })
        };
        let (k, n) = (number(k)?, number(n)?);
        if n == 0 {
            return Err(format!(
                "`{s}`: N is the number of shards and must be at least 1"
            ));
        }
        if k >= n {
            return Err(format!(
                "shard {k}/{n} does not exist: shards count from 0, so K is 0 to {last} \
                 (with `sbatch --array=0-{last}`, pass $SLURM_ARRAY_TASK_ID/{n})",
                last = n - 1
            ));
        }
        Ok(Shard { k, n })
    }
}

#[derive(Debug, Clone)]
pub struct RunRequest {
    pub schedule_path: PathBuf,
    pub overrides: BTreeMap<String, f64>,
    pub num_images: usize,
    pub batch: usize,
    pub seed: u64,
    pub classes: Classes,
    pub cfg: Option<f64>,
    pub temperature: Option<f64>,
    pub out: PathBuf,
    pub existing: Existing,
    pub replay: Option<PathBuf>,
    pub device_requested: String,
    /// How the model was loaded (precision, graph files, provider
    /// settings), recorded as `runtime_settings`; `Null` when unknown.
    pub runtime_settings: Value,
    /// Generate only this part of the images (seeds, labels and file names
    /// stay those of the whole run); no `grid.png` is written.
    pub shard: Option<Shard>,
    /// Also write all images as an `.npz` here (see [`write_npz`]).
    pub npz: Option<PathBuf>,
    /// Ticks per sampler-graph call ([`Engine::ticks_per_call`]).
    pub ticks_per_call: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Replay(#[from] crate::engine::replay::ReplayError),
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The label of image `index` of `n` under `classes` for a model with
/// `count` classes (`null` for unconditional models).
pub fn label_for(classes: &Classes, index: usize, n: usize, count: usize, null: i64) -> i64 {
    match classes {
        _ if count == 0 => null,
        Classes::Balanced => (index * count / n.max(1)) as i64,
        Classes::One(c) => *c,
        Classes::List(list) => list[index % list.len()],
    }
}

/// The default output folder: `runs/<model>-<schedule>-seed<seed>`, with
/// `-shard<k>of<n>` added for a shard so that shards sharing a disk do not
/// collide.
pub fn default_out_dir(
    model_name: &str,
    schedule: &Path,
    seed: u64,
    shard: Option<Shard>,
) -> PathBuf {
    let stem = schedule
        .file_stem()
        .map_or("schedule".into(), |s| s.to_string_lossy().into_owned());
    let clean = |s: &str| {
        s.chars()
            .map(|c| {
                if c.is_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect::<String>()
    };
    let part = shard.map_or(String::new(), |s| format!("-shard{}of{}", s.k, s.n));
    PathBuf::from("runs").join(format!(
        "{}-{}-seed{seed}{part}",
        clean(model_name),
        clean(&stem)
    ))
}

/// The file of image `index` in an output folder.
pub(crate) fn image_path(out: &Path, index: usize) -> PathBuf {
    out.join(image_name(index))
}

/// The file name of image `index`: `00000.png`, ….
pub(crate) fn image_name(index: usize) -> String {
    format!("{index:05}.png")
}

/// Whether an image is written at `path`: a file, not a symbolic link
/// (gtr-run writes none; a link there is replaced, never followed).
fn is_written(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file())
}

/// Runs the request on `model`; `progress` sees (images done, images in
/// this run or shard). Returns the record also written to `run.json`.
pub fn run<M: MarModel>(
    bundle: &Bundle,
    model: M,
    req: &RunRequest,
    mut progress: impl FnMut(usize, usize),
) -> Result<Value, RunError> {
    let schedule = Schedule::from_file(&req.schedule_path, &req.overrides)?;
    let info = model.info().clone();
    if req.num_images == 0 || req.batch == 0 {
        return Err(RunError::Invalid(
            "--num-images and --batch must be at least 1".into(),
        ));
    }
    let range = match req.shard {
        Some(shard) if shard.n > req.num_images => {
            return Err(RunError::Invalid(format!(
                "--shard {shard}: {} shards of {} images would leave shards empty; use at most {} shards",
                shard.n, req.num_images, req.num_images
            )));
        }
        Some(shard) => shard.range(req.num_images),
        None => 0..req.num_images,
    };
    if let Some(npz) = &req.npz {
        if req.shard.is_some() {
            return Err(RunError::Invalid(
                "--npz with --shard: a shard holds only part of the images; pass --npz to `gtr-run merge` instead".into(),
            ));
        }
        check_file_target(npz, "--npz")?;
    }
    let labels: Vec<i64> = (0..req.num_images)
        .map(|i| {
            label_for(
                &req.classes,
                i,
                req.num_images,
                info.classes,
                info.null_class,
            )
        })
        .collect();
    if let Some(bad) = labels
        .iter()
        .find(|&&c| c != info.null_class && !(0..info.classes as i64).contains(&c))
    {
        return Err(RunError::Invalid(format!(
            "class {bad} is out of range: model `{}` has {} classes (0..{})",
            info.name,
            info.classes,
            info.classes.saturating_sub(1)
        )));
    }
    let replay = match &req.replay {
        Some(p) => Some(Replay::load(p)?),
        None => None,
    };
    if let Some(r) = &replay
        && r.images() < req.num_images
    {
        return Err(RunError::Invalid(format!(
            "the replay file holds {} images; --num-images is {}",
            r.images(),
            req.num_images
        )));
    }

    schedule
        .check_model_grid(info.grid, &info.name)
        .map_err(RunError::Invalid)?;
    let planner =
        Planner::new(&schedule, info.grid).map_err(|d| ScheduleError::Invalid(Box::new(d)))?;
    let options = PlanOptions {
        default_cfg: Some(info.defaults.cfg),
        default_temperature: Some(info.defaults.temperature),
        cfg: req.cfg,
        temperature: req.temperature,
    };
    let reference_plan = planner
        .plan_with(req.seed, &options)
        .map_err(|d| ScheduleError::Invalid(Box::new(d)))?;
    crate::engine::check_plan(&info, &reference_plan).map_err(RunError::Invalid)?;
    let cost = plan_cost(&reference_plan, &bundle.cost_spec());

    // What the run is, known before any image is made; the measurements
    // are added at the end.
    let mut record = json!({
        "gtr_run_version": env!("CARGO_PKG_VERSION"),
        "model": {
            "name": info.name,
            "path": bundle.dir.display().to_string(),
            "classes": info.classes,
        },
        "schedule": {
            "path": req.schedule_path.display().to_string(),
            "source": schedule.source.text,
            "params": schedule.params.iter().map(|p| (p.name.clone(), json!(p.value))).collect::<serde_json::Map<_, _>>(),
        },
        "seed": req.seed,
        "num_images": req.num_images,
        "shard": req.shard.map(|s| json!({"k": s.k, "n": s.n, "start": range.start, "end": range.end})),
        "batch": req.batch,
        "labels": labels,
        "cfg_override": req.cfg,
        "temperature_override": req.temperature,
        "replay": req.replay.as_ref().map(|p| p.display().to_string()),
        "device_requested": req.device_requested,
        "precision": model.precision(),
        "runtime_settings": req.runtime_settings,
        "mar_steps": reference_plan.steps.len(),
        "cost_per_image": {
            "encoder_passes": cost.encoder_passes,
            "decoder_passes": cost.decoder_passes,
            "diffusion_evaluations": cost.diffusion_evaluations,
            "encoder_flops": cost.encoder_flops,
            "decoder_flops": cost.decoder_flops,
            "diffusion_flops": cost.diffusion_flops,
            "total_flops": cost.total_flops(),
        },
    });

    // The output folder: locked for this process, then a previous run in
    // it refused, resumed or overwritten.
    let (_lock, previous) = claim_out_dir(&req.out, req.existing)?;
    if req.existing == Existing::Resume {
        check_resumable(&req.out, previous.as_ref(), &record)?;
    }
    let (kept, todo): (Vec<usize>, Vec<usize>) = range
        .clone()
        .partition(|&i| req.existing == Existing::Resume && is_written(&image_path(&req.out, i)));
    // Images kept by --resume: where the folder's record has their hashes
    // (a finished run), each must still be the image it recorded.
    let mut hashes = BTreeMap::new();
    let recorded = previous
        .as_ref()
        .and_then(|r| r["images_sha256"].as_object());
    for i in kept {
        let (path, name) = (image_path(&req.out, i), image_name(i));
        let hash = sha256_file(&path)
            .map_err(|e| RunError::Invalid(format!("reading back {}: {e}", path.display())))?;
        if let Some(want) = recorded.and_then(|h| h.get(&name))
            && want.as_str() != Some(hash.as_str())
        {
            return Err(RunError::Invalid(format!(
                "{} is not the image the folder's run.json recorded (SHA-256 {hash}, recorded {}): it was changed or replaced after the run; remove it and --resume makes it again",
                path.display(),
                want.as_str().unwrap_or("?")
            )));
        }
        hashes.insert(name, hash);
    }
    // The folder is this run's from here on: its identity is on disk before
    // the first image, so that a later --resume, even after a kill, can
    // compare against it (and the kept images against their hashes).
    let mut started_record = record.clone();
    started_record["finished"] = json!(false);
    started_record["images_sha256"] = json!(hashes);
    started_record["writer"] = json!({"pid": std::process::id(), "host": host_name()});
    write_record(&req.out, &started_record)?;

    let mut engine = Engine::new(model);
    engine.ticks_per_call = req.ticks_per_call;
    let started = Instant::now();
    let mut done = range.len() - todo.len();
    progress(done, range.len());
    for chunk in todo.chunks(req.batch) {
        let jobs: Vec<ImageJob> = chunk
            .iter()
            .map(|&i| ImageJob {
                index: i as u64,
                seed: image_seed(req.seed, i as u64),
                label: labels[i],
            })
            .collect();
        let plans: Vec<Plan> = jobs
            .iter()
            .map(|j| planner.plan_with(j.seed, &options))
            .collect::<Result<_, _>>()
            .map_err(|d| ScheduleError::Invalid(Box::new(d)))?;
        let noise = replay.as_ref().map_or(Noise::Seeded, Noise::Replay);
        let out = engine.generate(&plans, &jobs, noise, |_, _| {})?;
        for (k, job) in jobs.iter().enumerate() {
            let png = encode_png(&out.pixels.index_axis(Axis(0), k).to_owned());
            let path = image_path(&req.out, job.index as usize);
            hashes.insert(image_name(job.index as usize), sha256_hex(&png));
            write_atomic(&path, &png).map_err(|source| RunError::Write { path, source })?;
        }
        done += jobs.len();
        progress(done, range.len());
    }
    let wall = started.elapsed().as_secs_f64();

    // A shard's preview would show a slice of the classes; merge makes the
    // grid of the whole run.
    if req.shard.is_none() {
        write_grid(&req.out, req.num_images, &labels, info.classes)?;
    }
    if let Some(npz) = &req.npz {
        write_npz(npz, &req.out, range.clone())?;
    }

    let stats = &engine.stats;
    let model_seconds = stats.model_seconds();
    // Time inside the runtime's own run calls, where the model reports it.
    let graph_stats = engine.model.graph_stats();
    let runtime_seconds = engine.runtime_seconds();
    let steps: Vec<Value> = reference_plan
        .steps
        .iter()
        .zip(stats.steps.iter().chain(std::iter::repeat(&Default::default())))
        .enumerate()
        .map(|(k, (p, s))| {
            json!({
                "step": k,
                "stage": reference_plan.stages[p.stage].name,
                "tokens": p.tokens.len(),
                "known_before": p.known_before,
                "diffusion_steps": p.diffusion_steps,
                "detail": p.detail.map(|d| json!({"fraction": d.fraction, "steps": d.steps, "selector": d.selector.name(), "count": d.count})),
                "cfg": p.cfg,
                "temperature": p.temperature,
                // The measurements, summed by `combine_records`: STEP_COUNTERS.
                "backbone_seconds": s.backbone_seconds,
                "diffusion_seconds": s.diffusion_seconds,
                "diffusion_calls": s.diffusion_calls,
                "diffusion_rows": s.diffusion_rows,
                "other_seconds": s.other_seconds,
            })
        })
        .collect();
    let measured = json!({
        "finished": true,
        "images_sha256": hashes,
        "generated_now": todo.len(),
        "execution_provider": engine.model.execution_provider(),
        "diffusion_chains": engine.chain_runner(),
        "sampler_ticks_per_call": req.ticks_per_call,
        "steps": steps,
        "graphs": graph_stats,
        "seconds": {
            "wall": wall,
            "generation": stats.total_seconds,
            "in_model_calls": model_seconds,
            "in_runtime_run_calls": runtime_seconds,
            "outside_runtime_run_calls": stats.total_seconds - runtime_seconds,
            "vae": stats.vae_seconds,
            // Before and at the start of sampling, apart: creating the
            // sessions (not in `wall`), and each graph's first call (in
            // `generation`); with TensorRT, engines are built in one of them.
            "session_creation": graph_stats.iter().map(|g| g.load_seconds).sum::<f64>(),
            "first_calls": graph_stats.iter().map(|g| g.first_call_seconds).sum::<f64>(),
        },
    });
    if let (Value::Object(all), Value::Object(more)) = (&mut record, measured) {
        all.extend(more);
    }
    write_record(&req.out, &record)?;
    Ok(record)
}

/// Writes `record` as `out/run.json`, atomically.
pub(crate) fn write_record(out: &Path, record: &Value) -> Result<(), RunError> {
    let path = out.join("run.json");
    let text = serde_json::to_string_pretty(record).unwrap_or_default() + "\n";
    write_atomic(&path, text.as_bytes()).map_err(|source| RunError::Write { path, source })
}

/// Reads `dir/run.json`.
pub(crate) fn read_record(dir: &Path) -> Result<Value, RunError> {
    let path = dir.join("run.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        RunError::Invalid(format!(
            "cannot read {}: {e}; a folder is a finished run only once its run.json is written (resume an interrupted one with --resume)",
            path.display()
        ))
    })?;
    serde_json::from_str(&text)
        .map_err(|e| RunError::Invalid(format!("{} is not a gtr-run record: {e}", path.display())))
}

/// What makes two records parts of one run: what they are called in
/// messages, and the values compared. Not compared: batch size, device and
/// paths (none changes an image), nor the measurements.
fn identity(record: &Value) -> Vec<(&'static str, Value)> {
    let r = |pointer: &str| record.pointer(pointer).cloned().unwrap_or(Value::Null);
    vec![
        ("gtr-run version", r("/gtr_run_version")),
        ("model", r("/model/name")),
        ("model's number of classes", r("/model/classes")),
        ("schedule text", r("/schedule/source")),
        ("schedule parameters", r("/schedule/params")),
        ("MAR steps", r("/mar_steps")),
        ("seed", r("/seed")),
        ("number of images", r("/num_images")),
        ("class labels", r("/labels")),
        ("guidance (--cfg)", r("/cfg_override")),
        ("temperature (--temperature)", r("/temperature_override")),
        // Replay paths differ between machines; whether one was used may not.
        ("use of a replay file", json!(!record["replay"].is_null())),
        // Records written before precisions existed ran fp32.
        (
            "precision (--precision)",
            record
                .get("precision")
                .cloned()
                .unwrap_or_else(|| json!("fp32")),
        ),
    ]
}

/// How the run records `a` (of folder `a_name`) and `b` differ in what
/// makes a run (see [`identity`]), one phrase each, e.g. "the seed (0 in
/// A, 1 in B)"; empty when they are parts of one run.
pub(crate) fn disagreements(a: &Value, a_name: &str, b: &Value, b_name: &str) -> Vec<String> {
    identity(a)
        .into_iter()
        .zip(identity(b))
        .filter(|((_, x), (_, y))| x != y)
        .map(|((what, x), (_, y))| {
            let (x, y) = (x.to_string(), y.to_string());
            if x.len() + y.len() <= 60 {
                format!("the {what} ({x} in {a_name}, {y} in {b_name})")
            } else {
                format!("the {what}")
            }
        })
        .collect()
}

/// The measurements of each step in a record, which add up over shards.
const STEP_COUNTERS: [&str; 5] = [
    "backbone_seconds",
    "diffusion_seconds",
    "diffusion_calls",
    "diffusion_rows",
    "other_seconds",
];

/// Fields a part may choose without changing an image; kept in a combined
/// record where all parts agree, else null.
const FREE_FIELDS: [&str; 7] = [
    "/batch",
    "/device_requested",
    "/execution_provider",
    "/runtime_settings",
    "/model/path",
    "/schedule/path",
    "/replay",
];

/// The record of one run made of `parts` ((folder, record), in index
/// order, checked with [`disagreements`]), as one machine would have
/// written it: the first part's record with `shard` null; the image hashes
/// (`images_sha256`) of all parts together; `generated_now`,
/// every `seconds` entry and each graph's and step's calls, rows and
/// seconds summed over the parts (machine time, not elapsed time); batch,
/// device, execution provider and paths kept where all parts agree, else
/// null; and `parts`, each part's folder, shard, batch, device, provider,
/// images generated and seconds.
pub(crate) fn combine_records(parts: &[(String, Value)]) -> Value {
    let Some(((_, first), rest)) = parts.split_first() else {
        return Value::Null;
    };
    let mut all = first.clone();
    all["shard"] = Value::Null;
    for (_, part) in rest {
        if let (Some(hashes), Some(more)) = (
            all["images_sha256"].as_object_mut(),
            part["images_sha256"].as_object(),
        ) {
            hashes.extend(more.clone());
        }
        add(&mut all["generated_now"], &part["generated_now"]);
        if let Some(seconds) = all["seconds"].as_object_mut() {
            for (key, total) in seconds {
                add(total, &part["seconds"][key]);
            }
        }
        for graph in all["graphs"].as_array_mut().into_iter().flatten() {
            let same = part["graphs"]
                .as_array()
                .and_then(|gs| gs.iter().find(|g| g["graph"] == graph["graph"]));
            if let Some(same) = same {
                add(&mut graph["calls"], &same["calls"]);
                add(&mut graph["seconds"], &same["seconds"]);
            }
        }
        for (k, step) in all["steps"]
            .as_array_mut()
            .into_iter()
            .flatten()
            .enumerate()
        {
            for key in STEP_COUNTERS {
                add(&mut step[key], &part["steps"][k][key]);
            }
        }
    }
    for pointer in FREE_FIELDS {
        let agree = parts
            .iter()
            .all(|(_, r)| r.pointer(pointer) == first.pointer(pointer));
        if let (false, Some(field)) = (agree, all.pointer_mut(pointer)) {
            *field = Value::Null;
        }
    }
    all["parts"] = parts
        .iter()
        .map(|(dir, r)| {
            json!({
                "dir": dir,
                "shard": r["shard"],
                "batch": r["batch"],
                "device_requested": r["device_requested"],
                "execution_provider": r["execution_provider"],
                "generated_now": r["generated_now"],
                "seconds": r["seconds"],
            })
        })
        .collect();
    all
}

/// `total += more` for JSON numbers, staying an integer where both are.
fn add(total: &mut Value, more: &Value) {
    *total = match (total.as_u64(), more.as_u64(), total.as_f64(), more.as_f64()) {
        (Some(a), Some(b), _, _) => json!(a + b),
        (_, _, Some(a), Some(b)) => json!(a + b),
        _ => return,
    };
}

/// On `--resume`, the record already in `out` (written before the first
/// image, so present even when that run was killed) must be of this run and
/// this shard; otherwise images of two runs would be mixed. A folder with
/// images but no record cannot be checked and is refused.
fn check_resumable(out: &Path, previous: Option<&Value>, record: &Value) -> Result<(), RunError> {
    let Some(previous) = previous else {
        let any_image = std::fs::read_dir(out)
            .map_err(|source| RunError::Write {
                path: out.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok())
            .any(|e| is_run_file(&e.file_name().to_string_lossy()));
        if any_image {
            return Err(RunError::Invalid(format!(
                "{} holds images but no run.json, so nothing says which run they belong to and resuming could mix two runs; pass --force to start over, or --out elsewhere",
                out.display()
            )));
        }
        return Ok(());
    };
    let mut differ = disagreements(previous, "the folder", record, "this run");
    if previous["shard"] != record["shard"] {
        let name = |r: &Value| match (r["shard"]["k"].as_u64(), r["shard"]["n"].as_u64()) {
            (Some(k), Some(n)) => format!("shard {k}/{n}"),
            _ => "no shard".to_string(),
        };
        differ.push(format!(
            "the shard ({} in the folder, {} in this run)",
            name(previous),
            name(record)
        ));
    }
    if differ.is_empty() {
        return Ok(());
    }
    Err(RunError::Invalid(format!(
        "{} holds a different run, so resuming would mix images of two runs: they differ in {}; use the same settings, --force to overwrite, or --out elsewhere",
        out.display(),
        differ.join(", ")
    )))
}

/// Refuses, before any work, a path a file cannot be written to: a folder,
/// or a file in a folder that does not exist. `what` names the option.
pub(crate) fn check_file_target(path: &Path, what: &str) -> Result<(), RunError> {
    if path.is_dir() {
        return Err(RunError::Invalid(format!(
            "{what} {}: this is a folder; give a file name",
            path.display()
        )));
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(RunError::Invalid(format!(
            "{what} {}: the folder {} does not exist",
            path.display(),
            dir.display()
        )));
    }
    // Found now, not after every image is made: can a file be made there?
    tempfile::NamedTempFile::new_in(dir).map(drop).map_err(|e| {
        RunError::Invalid(format!(
            "{what} {}: cannot write in the folder {}: {e}",
            path.display(),
            dir.display()
        ))
    })
}

/// Takes the output folder `out` for this run and returns the lock that
/// keeps other gtr-run processes out of it (hold it until the run ends)
/// with the record of the run already there, if any.
///
/// In order: `out` is created if missing; locked (another process holding
/// it is named and refused); refused, `--force` or not, if it holds
/// anything gtr-run does not write (a folder, an unknown name, a `run.json`
/// that is not gtr-run's, an `.npz` without a run); cleared of temporary
/// files a killed run left; and then a previous run in it is refused
/// ([`Existing::Refuse`]), kept ([`Existing::Resume`], checked by
/// [`check_resumable`]) or its files removed ([`Existing::Overwrite`]).
fn claim_out_dir(out: &Path, existing: Existing) -> Result<(FolderLock, Option<Value>), RunError> {
    let io = |path: &Path, source| RunError::Write {
        path: path.to_path_buf(),
        source,
    };
    if out.exists() && !out.is_dir() {
        return Err(RunError::Invalid(format!(
            "{} exists and is not a folder",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let lock = match FolderLock::try_new(out) {
        Ok(lock) => lock,
        Err(LockError::Busy) => {
            let holder = read_record(out)
                .ok()
                .and_then(|r| {
                    let pid = r["writer"]["pid"].as_u64()?;
                    let host = r["writer"]["host"].as_str().unwrap_or("");
                    Some(if host.is_empty() {
                        format!(" (pid {pid})")
                    } else {
                        format!(" (pid {pid} on {host})")
                    })
                })
                .unwrap_or_default();
            return Err(RunError::Invalid(format!(
                "{} is being written by another gtr-run process{holder}; two runs in one folder would overwrite each other's images: wait for it to end, or give --out another folder",
                out.display()
            )));
        }
        Err(LockError::Io(e)) => {
            return Err(RunError::Invalid(format!(
                "cannot lock {} for this run: {e}",
                out.display()
            )));
        }
    };

    let mut run_files = Vec::new();
    let mut temporaries = Vec::new();
    let mut npz = None;
    let mut has_record = false;
    for entry in std::fs::read_dir(out).map_err(|e| io(out, e))? {
        let entry = entry.map_err(|e| io(out, e))?;
        let kind = entry.file_type().map_err(|e| io(&entry.path(), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let plain = kind.is_file() || kind.is_symlink();
        if name == LOCK_FILE {
            continue;
        } else if plain && is_run_file(&name) {
            has_record |= name == "run.json";
            run_files.push(entry.path());
        } else if plain && is_temporary(&name) {
            temporaries.push(entry.path());
        } else if plain && name.ends_with(".npz") {
            npz = Some(name);
        } else {
            return Err(foreign(out, &name));
        }
    }
    let record = if has_record {
        let path = out.join("run.json");
        let ours = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
        match read_record(out) {
            Ok(r) if ours && r.get("gtr_run_version").is_some() => Some(r),
            _ => {
                return Err(RunError::Invalid(format!(
                    "{} holds a run.json that is not a gtr-run record; gtr-run writes only into a new or empty folder or one holding its own run, --force or not, so give --out a new folder",
                    out.display()
                )));
            }
        }
    } else {
        None
    };
    if let (Some(name), None) = (npz, &record) {
        return Err(foreign(out, &name));
    }
    // No other gtr-run process can be writing these: the lock is ours.
    for path in temporaries {
        std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
    }
    match existing {
        Existing::Refuse if !run_files.is_empty() => {
            let unfinished = record
                .as_ref()
                .is_some_and(|r| r["finished"] == json!(false));
            Err(RunError::Invalid(format!(
                "{} holds a previous run{}; pass --resume to skip the images already written, --force to overwrite, or --out elsewhere",
                out.display(),
                if unfinished {
                    " (unfinished: it was interrupted)"
                } else {
                    ""
                }
            )))
        }
        Existing::Overwrite => {
            for path in run_files {
                std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
            }
            Ok((lock, None))
        }
        _ => Ok((lock, record)),
    }
}

/// The refusal of a folder holding `name`, which gtr-run did not write.
fn foreign(out: &Path, name: &str) -> RunError {
    RunError::Invalid(format!(
        "{} holds `{name}`, which gtr-run does not write; gtr-run writes only into a new or empty folder or one holding its own run, --force or not, so give --out a new folder",
        out.display()
    ))
}

/// Whether a generation run writes files of this name: `run.json`,
/// `grid.png` and the images (`00000.png`, …).
pub(crate) fn is_run_file(name: &str) -> bool {
    let image = name
        .strip_suffix(".png")
        .is_some_and(|stem| stem.len() >= 5 && stem.bytes().all(|b| b.is_ascii_digit()));
    image || name == "run.json" || name == "grid.png"
}

/// PNG bytes of one image given as [H, W, channels] u8.
pub fn encode_png(pixels: &ndarray::Array3<u8>) -> Vec<u8> {
    let (h, w, ch) = pixels.dim();
    let data: Vec<u8> = pixels.iter().copied().collect();
    let img = if ch == 1 {
        DynamicImage::ImageLuma8(
            GrayImage::from_raw(w as u32, h as u32, data).expect("sized buffer"),
        )
    } else {
        DynamicImage::ImageRgb8(RgbImage::from_raw(w as u32, h as u32, data).expect("sized buffer"))
    };
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .expect("PNG encoding to memory");
    bytes
}

/// `grid.png`: the images tiled, one row per class when the classes are
/// balanced (a single row when there is one image per class), else in a
/// near-square grid.
pub(crate) fn write_grid(
    out: &Path,
    n: usize,
    labels: &[i64],
    classes: usize,
) -> Result<(), RunError> {
    let images = (0..n)
        .map(|i| read_back(&image_path(out, i)))
        .collect::<Result<Vec<_>, _>>()?;
    let Some(first) = images.first() else {
        return Ok(());
    };
    let (w, h) = first.dimensions();
    let per_class_rows = classes > 0
        && n.is_multiple_of(classes)
        && n >= classes
        && labels.windows(2).all(|p| p[0] <= p[1]);
    let cols = match (per_class_rows, n / classes.max(1)) {
        // One image per class: a single row, in class order.
        (true, 1) => n,
        (true, per_class) => per_class,
        (false, _) => (n as f64).sqrt().ceil() as usize,
    };
    let rows = n.div_ceil(cols);
    let gap = 2u32;
    let mut grid = RgbImage::from_pixel(
        cols as u32 * (w + gap) + gap,
        rows as u32 * (h + gap) + gap,
        image::Rgb([255, 255, 255]),
    );
    for (k, img) in images.iter().enumerate() {
        let (r, c) = (k / cols, k % cols);
        image::imageops::replace(
            &mut grid,
            img,
            (gap + c as u32 * (w + gap)) as i64,
            (gap + r as u32 * (h + gap)) as i64,
        );
    }
    let mut bytes = Vec::new();
    DynamicImage::ImageRgb8(grid)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .expect("PNG encoding to memory");
    let path = out.join("grid.png");
    write_atomic(&path, &bytes).map_err(|source| RunError::Write { path, source })
}

/// An image file as 8-bit RGB; grey images have their channel repeated.
fn read_back(path: &Path) -> Result<RgbImage, RunError> {
    image::open(path)
        .map(|img| img.to_rgb8())
        .map_err(|e| RunError::Invalid(format!("reading back {}: {e}", path.display())))
}

/// Writes the images `indices` of the output folder `dir`, in order, as
/// `path`: an `.npz` holding one array `arr_0`, uint8 [N, H, W, 3] (the
/// layout of the common FID evaluators; grey images are repeated to three
/// channels), with the pixels of the PNGs. The PNGs are read back one at a
/// time while the file is written (memory stays at one image), and the file
/// appears only once complete. The bytes depend only on the pixels.
pub fn write_npz(path: &Path, dir: &Path, indices: Range<usize>) -> Result<(), RunError> {
    let paths: Vec<PathBuf> = indices.map(|i| image_path(dir, i)).collect();
    let Some(first) = paths.first() else {
        return Err(RunError::Invalid(format!(
            "{}: no images to write",
            path.display()
        )));
    };
    let stack = PngStack {
        first: read_back(first)?,
        paths: &paths,
        failure: RefCell::new(None),
    };
    let (w, h) = stack.first.dimensions();
    let bytes = paths.len() as u64 * w as u64 * h as u64 * 3;
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        // A fixed date, so that the same images give the same bytes.
        .last_modified_time(zip::DateTime::default())
        .large_file(bytes > u32::MAX as u64 - (1 << 16));
    let written = write_atomic_with(path, |file| {
        let mut npz = NpzWriter::new_with_options(file, options);
        npz.add_array("arr_0", &stack)
            .and_then(|()| npz.finish().map(|_| ()))
            .map_err(std::io::Error::other)
    });
    match (written, stack.failure.into_inner()) {
        (_, Some(failure)) => Err(failure),
        (Err(source), None) => Err(RunError::Write {
            path: path.to_path_buf(),
            source,
        }),
        (Ok(()), None) => Ok(()),
    }
}

/// PNG files seen as one uint8 [N, H, W, 3] array, decoded one at a time
/// as it is written; a file that cannot be read, or whose size differs from
/// the first's, is kept in `failure`.
struct PngStack<'a> {
    first: RgbImage,
    paths: &'a [PathBuf],
    failure: RefCell<Option<RunError>>,
}

impl WriteNpyExt for PngStack<'_> {
    fn write_npy<W: Write>(&self, mut w: W) -> Result<(), WriteNpyError> {
        let (width, height) = self.first.dimensions();
        Header {
            type_descriptor: u8::type_descriptor(),
            layout: Layout::Standard,
            shape: vec![self.paths.len(), height as usize, width as usize, 3],
        }
        .write(&mut w)?;
        w.write_all(self.first.as_raw())?;
        for path in &self.paths[1..] {
            let img = read_back(path).and_then(|img| {
                if img.dimensions() == (width, height) {
                    Ok(img)
                } else {
                    Err(RunError::Invalid(format!(
                        "{} is {}x{}, but {} is {width}x{height}; the images of one array must have one size",
                        path.display(),
                        img.width(),
                        img.height(),
                        self.paths[0].display()
                    )))
                }
            });
            match img {
                Ok(img) => w.write_all(img.as_raw())?,
                Err(e) => {
                    let message = e.to_string();
                    *self.failure.borrow_mut() = Some(e);
                    return Err(std::io::Error::other(message).into());
                }
            }
        }
        w.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_balanced_in_blocks_and_unconditional_models_use_null() {
        let labels: Vec<i64> = (0..20)
            .map(|i| label_for(&Classes::Balanced, i, 20, 10, 10))
            .collect();
        assert_eq!(
            labels,
            [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
        );
        let few: Vec<i64> = (0..4)
            .map(|i| label_for(&Classes::Balanced, i, 4, 10, 10))
            .collect();
        assert_eq!(few, [0, 2, 5, 7]);
        assert_eq!(label_for(&Classes::List(vec![3, 5]), 3, 8, 10, 10), 5);
        assert_eq!(label_for(&Classes::One(4), 7, 8, 10, 10), 4);
        assert_eq!(label_for(&Classes::Balanced, 3, 8, 0, 0), 0);
        assert_eq!(label_for(&Classes::One(4), 3, 8, 0, 7), 7);
    }

    #[test]
    fn default_output_folder_names_model_schedule_and_seed() {
        let p = default_out_dir("tiny random", Path::new("schedules/gtr-3.7x.gtr"), 42, None);
        assert_eq!(p, PathBuf::from("runs/tiny_random-gtr-3.7x-seed42"));
        let shard = Some(Shard { k: 1, n: 8 });
        let p = default_out_dir("tiny", Path::new("schedules/gtr.gtr"), 0, shard);
        assert_eq!(p, PathBuf::from("runs/tiny-gtr-seed0-shard1of8"));
    }

    #[test]
    fn shards_split_the_indices_into_contiguous_near_equal_parts() {
        for num in 1..40 {
            for n in 1..=num {
                let mut next = 0;
                for k in 0..n {
                    let r = Shard { k, n }.range(num);
                    assert_eq!(r.start, next, "{k}/{n} of {num}");
                    assert!(r.len() == num / n || r.len() == num / n + 1);
                    next = r.end;
                }
                assert_eq!(next, num);
            }
        }
        assert_eq!("3/8".parse::<Shard>(), Ok(Shard { k: 3, n: 8 }));
        assert_eq!("0 / 1".parse::<Shard>(), Ok(Shard { k: 0, n: 1 }));
        assert_eq!(Shard { k: 3, n: 8 }.to_string(), "3/8");
        let err = "8/8".parse::<Shard>().unwrap_err();
        assert!(err.contains("shards count from 0, so K is 0 to 7"), "{err}");
        assert!("3".parse::<Shard>().unwrap_err().contains("is not K/N"));
        assert!("1/0".parse::<Shard>().unwrap_err().contains("at least 1"));
    }

    #[test]
    fn npz_repeats_grey_images_to_three_channels_and_refuses_mixed_sizes() {
        let dir = std::env::temp_dir().join(format!("gtr-run-unit-{}-npz", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let grey = ndarray::Array3::from_shape_fn((2, 3, 1), |(i, j, _)| (10 * i + j) as u8);
        let rgb =
            ndarray::Array3::from_shape_fn((2, 3, 3), |(i, j, c)| (100 + 10 * i + j + c) as u8);
        std::fs::write(image_path(&dir, 0), encode_png(&grey)).unwrap();
        std::fs::write(image_path(&dir, 1), encode_png(&rgb)).unwrap();
        let npz = dir.join("x.npz");
        write_npz(&npz, &dir, 0..2).unwrap();
        let mut r = ndarray_npy::NpzReader::new(std::fs::File::open(&npz).unwrap()).unwrap();
        let arr: ndarray::Array4<u8> = r.by_name("arr_0").unwrap();
        assert_eq!(arr.dim(), (2, 2, 3, 3));
        for c in 0..3 {
            assert_eq!(
                arr.slice(ndarray::s![0, .., .., c]),
                grey.slice(ndarray::s![.., .., 0])
            );
        }
        assert_eq!(arr.index_axis(Axis(0), 1), rgb);

        let small = ndarray::Array3::<u8>::zeros((1, 1, 3));
        std::fs::write(image_path(&dir, 2), encode_png(&small)).unwrap();
        let other = dir.join("y.npz");
        let err = write_npz(&other, &dir, 0..3).unwrap_err().to_string();
        assert!(err.contains("00002.png is 1x1, but"), "{err}");
        assert!(err.contains("00000.png is 3x2"), "{err}");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 4, "no partial file is left: {left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

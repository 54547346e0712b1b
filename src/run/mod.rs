//! What happens around generation: a run of images from a bundle and a
//! schedule, written to an output folder as `00000.png`…, a preview
//! `grid.png` and `run.json` ([`record::RunRecord`]), optionally an `.npz`
//! of all images; a run may be split into shards ([`Shard`]) that
//! [`merge`] joins again.
//!
//! Rooms: [`folder`] (the output folder: ownership, overwrite rules, file
//! names), [`outputs`] (PNG, grid, npz), [`jobs`] (labels, seeds, shards),
//! [`record`] (run.json), [`merge`] (shards joined), `pipeline` (batches
//! one after the other, each one's VAE decode inline or overlapping the
//! next one's sampling). This module only
//! orchestrates them around the engine.

pub mod folder;
pub mod jobs;
pub mod merge;
pub mod outputs;
pub(crate) mod pipeline;
pub mod record;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::{Array4, Axis};
use serde_json::Value;

pub use folder::{
    Existing, check_file_target, check_outside_inputs, check_outside_run, check_png_target,
    claim_report, default_out_dir, precision_suffix, report_files,
};
pub use jobs::{Classes, Shard, label_for};
pub use outputs::{encode_batch, encode_png, write_npz};
pub use record::{RunRecord, VaeDecode, model_digest};

use crate::backend::VaeRunner;
use crate::bundle::Bundle;
use crate::cost::plan_cost;
use crate::engine::{
    BatchOutput, Engine, ImageJob, ImageSettings, MarModel, ModelInfo, NoiseSource, Replay,
    SeededNoise,
};
use crate::fsutil::{host_name, sha256_file, sha256_hex, write_atomic};
use crate::plan::{Plan, PlanOptions, Planner};
use crate::schedule::{Schedule, ScheduleError};
use folder::{image_name, image_path};
use pipeline::{Batch, Made, Making, Receiver, make_batches};
use record::{Measurements, ModelRecord, ScheduleRecord, Seconds, ShardRecord, StepRecord, Writer};

/// A generation run as asked for.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// The checked schedule (overrides applied); its source's name is
    /// recorded as the schedule's path.
    pub schedule: Schedule,
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
    /// Whether a batch's VAE decode overlaps the next batch's sampling
    /// (`--vae`; run.json's `vae_decode`).
    pub vae: VaeRunner,
    /// [`record::model_digest`] of the model, recorded and compared by
    /// `--resume` and `merge`; `None` only for runs that write no folder.
    pub model_sha256: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("{0}")]
    Invalid(String),
    /// Choices of the request that cannot go together for this model.
    #[error("{0}")]
    Conflict(String),
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

/// The plans of a run: the planner for each image's seed, the options every
/// plan takes, and the plan of the run's own seed (recorded as the run's
/// step table and priced).
struct RunPlans<'s> {
    planner: Planner<'s>,
    options: PlanOptions,
    reference: Plan,
}

/// What a run knows before its first image: the model, the image indices
/// this process makes, every image's label, the replay, the plans, and the
/// record of what the run is (no measurements, no hashes).
struct Prepared<'s> {
    info: ModelInfo,
    range: Range<usize>,
    /// When each batch decodes (`req.vae`, decided for this model).
    vae_decode: VaeDecode,
    labels: Vec<i64>,
    replay: Option<Replay>,
    plans: RunPlans<'s>,
    record: RunRecord,
}

impl<'s> Prepared<'s> {
    /// Checks everything that can be checked before any work.
    fn new<M: MarModel>(bundle: &Bundle, model: &M, req: &'s RunRequest) -> Result<Self, RunError> {
        let info = model.info().clone();
        let range = check_request(req)?;
        check_outputs(
            bundle,
            &req.out,
            req.npz.as_deref(),
            req.replay.as_deref(),
            req.shard.is_some(),
            req.existing,
        )?;
        let vae_decode = pipeline::decide(model, req.vae).map_err(RunError::Conflict)?;
        let labels = jobs::labels(&req.classes, req.num_images, &info)?;
        let replay = load_replay(req)?;
        let plans = plan_run(req, &info)?;
        if let Some(replay) = &replay {
            replay
                .fits(&info, plans.reference.longest_chain(info.train_steps))
                .map_err(RunError::Invalid)?;
        }
        let mut record = describe_run(bundle, model, req, &labels, &range, &plans.reference);
        // The replay's contents, so that --resume and merge never join two.
        record.replay_sha256 = match &req.replay {
            Some(path) => Some(sha256_file(path).map_err(|source| RunError::Write {
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        Ok(Prepared {
            info,
            range,
            vae_decode,
            labels,
            replay,
            plans,
            record,
        })
    }

    /// Makes the images `todo` (indices in the run's range) in the batches
    /// a run of the whole range makes them in: the range in chunks of
    /// `req.batch`, each chunk holding an image of `todo` made whole. So a
    /// resumed run makes an image beside the same images as an
    /// uninterrupted one, which keeps it byte-identical where a result
    /// depends on its batch (int8's per-tensor activation scale). Each
    /// batch's `todo` images go to `on_batch` in order (which may stop the
    /// run with an error), their decode overlapping the next batch's
    /// sampling where `self.vae_decode` says so. Returns the seconds it took.
    fn make_images<M: MarModel>(
        &self,
        engine: &mut Engine<M>,
        req: &RunRequest,
        todo: &[usize],
        on_batch: impl FnMut(Made<(), Vec<Vec<u8>>>) -> Result<(), RunError>,
    ) -> Result<f64, RunError> {
        let started = Instant::now();
        let noise: &dyn NoiseSource = match &self.replay {
            Some(replay) => replay,
            None => &SeededNoise,
        };
        let wanted: BTreeSet<usize> = todo.iter().copied().collect();
        let range: Vec<usize> = self.range.clone().collect();
        let batches = range.chunks(req.batch).filter_map(|chunk| {
            // Positions in the batch of the images to make.
            let keep: Vec<usize> = (0..chunk.len())
                .filter(|&k| wanted.contains(&chunk[k]))
                .collect();
            if keep.is_empty() {
                return None;
            }
            Some(
                ImageJob::batch(
                    &self.plans.planner,
                    &self.plans.options,
                    req.seed,
                    chunk,
                    &self.labels,
                )
                .map(|(jobs, plans)| Batch {
                    jobs,
                    plans,
                    keep,
                    tag: (),
                })
                .map_err(|d| ScheduleError::Invalid(Box::new(d)).into()),
            )
        });
        // Decided in `Prepared::new`, where a model that cannot was refused.
        let making = Making {
            noise,
            decoder: pipeline::decoder_for(&engine.model, self.vae_decode),
            receiver: Receiver::BesideNextDecode,
        };
        let pngs = |output: &BatchOutput| encode_batch(output.pixels.view());
        make_batches(engine, batches, making, pngs, |_, e| e.into(), on_batch)?;
        Ok(started.elapsed().as_secs_f64())
    }
}

/// Runs the request on `model`; `progress` sees (images done, images in
/// this run or shard). Returns the record also written to `run.json`.
///
/// Everything that can be checked is checked before the output folder is
/// touched; the folder's record is written before the first image (so a
/// killed run can be resumed) and again, with the measurements, at the end.
pub fn generate<M: MarModel>(
    bundle: &Bundle,
    model: M,
    req: &RunRequest,
    mut progress: impl FnMut(usize, usize),
) -> Result<RunRecord, RunError> {
    let run = Prepared::new(bundle, &model, req)?;
    let range = run.range.clone();

    // The output folder: locked for this process, then a previous run in
    // it refused, resumed or overwritten.
    let (_lock, previous) = folder::claim(&req.out, req.existing)?;
    if req.existing == Existing::Resume {
        folder::check_resumable(&req.out, previous.as_ref(), &run.record)?;
        folder::check_images_in_range(&req.out, &range)?;
    }
    // With adaptive orders an image is kept only with its recorded order
    // (one made without it is made again, to the same bytes).
    let adaptive = run.plans.reference.is_adaptive();
    let recorded_orders = previous
        .as_ref()
        .map(|r| r.reveal_orders.clone())
        .unwrap_or_default();
    let (kept, todo): (Vec<usize>, Vec<usize>) = range.clone().partition(|&i| {
        req.existing == Existing::Resume
            && folder::is_written(&image_path(&req.out, i))
            && (!adaptive || recorded_orders.contains_key(&image_name(i)))
    });
    let image = model.info().image;
    let size = (image.width as u32, image.height as u32);
    let mut hashes = check_kept(&req.out, &kept, previous.as_ref(), size)?;
    let mut orders: BTreeMap<String, Vec<usize>> = recorded_orders
        .into_iter()
        .filter(|(name, _)| hashes.contains_key(name))
        .collect();
    // The folder is this run's from here on: its identity is on disk before
    // the first image, so that a later --resume, even after a kill, can
    // compare against it (and the kept images against their hashes).
    let unfinished = |hashes: &BTreeMap<String, String>, orders: &BTreeMap<String, Vec<usize>>| {
        RunRecord {
            finished: false,
            images_sha256: hashes.clone(),
            reveal_orders: orders.clone(),
            writer: Some(Writer {
                pid: std::process::id(),
                host: host_name(),
            }),
            ..run.record.clone()
        }
        .write(&req.out)
    };
    unfinished(&hashes, &orders)?;

    let mut engine = Engine::new(model);
    engine.ticks_per_call = req.ticks_per_call;
    progress(kept.len(), range.len());
    let mut done = kept.len();
    let wall = run.make_images(&mut engine, req, &todo, |made| {
        let Made {
            jobs,
            output,
            finished: pngs,
            ..
        } = made;
        for ((k, job), png) in jobs.iter().enumerate().zip(pngs) {
            let (path, name) = (
                image_path(&req.out, job.index as usize),
                image_name(job.index as usize),
            );
            hashes.insert(name.clone(), sha256_hex(&png));
            if adaptive {
                orders.insert(name, output.reveal_orders[k].clone());
            }
            write_atomic(&path, &png).map_err(|source| RunError::Write { path, source })?;
        }
        // The engine's choices exist nowhere else: on disk after each batch,
        // so that --resume after a kill keeps these images.
        if adaptive {
            unfinished(&hashes, &orders)?;
        }
        done += jobs.len();
        progress(done, range.len());
        Ok(())
    })?;

    // A shard's preview would show a slice of the classes; merge makes the
    // grid of the whole run.
    if req.shard.is_none() {
        outputs::write_grid(&req.out, req.num_images, &run.labels, run.info.classes)?;
    }
    if let Some(npz) = &req.npz {
        write_npz(npz, &req.out, range.clone())?;
    }
    engine.model.end_profiling();
    let mut record = run.record.clone();
    record.images_sha256 = hashes;
    record.reveal_orders = orders;
    record.measured = Some(measure(
        &engine,
        &run.plans.reference,
        todo.len(),
        wall,
        req,
        run.vae_decode,
    ));
    record.write(&req.out)?;
    Ok(record)
}

/// Runs the request on `engine` in memory: no folder is touched (`out`,
/// `existing` and `npz` are not used). Returns the pixels of the images of
/// the run (or of its shard) [N, H, W, channels] and the record a folder
/// would hold, each image's SHA-256 being that of its PNG. `progress` sees
/// (images done, images) after each batch; an error from it stops the run.
/// The engine's statistics are reset first, and the model's per-graph ones
/// where an earlier run used them, so the record measures this run alone
/// (the first run on a model also counts its loading).
pub fn generate_in_memory<M: MarModel>(
    bundle: &Bundle,
    engine: &mut Engine<M>,
    req: &RunRequest,
    mut progress: impl FnMut(usize, usize) -> Result<(), RunError>,
) -> Result<(Array4<u8>, RunRecord), RunError> {
    let run = Prepared::new(bundle, &engine.model, req)?;
    engine.stats = Default::default();
    if engine.model.graph_stats().iter().any(|g| g.calls > 0) {
        engine.model.reset_graph_stats();
    }
    engine.ticks_per_call = req.ticks_per_call;
    let image = run.info.image;
    let (start, n) = (run.range.start, run.range.len());
    let mut pixels = pixel_buffer(n, image)?;
    let mut hashes = BTreeMap::new();
    let todo: Vec<usize> = run.range.clone().collect();
    let adaptive = run.plans.reference.is_adaptive();
    let mut orders = BTreeMap::new();
    let mut done = 0;
    let wall = run.make_images(engine, req, &todo, |made| {
        let Made {
            jobs,
            output,
            finished: pngs,
            ..
        } = made;
        for ((k, job), png) in jobs.iter().enumerate().zip(pngs) {
            let (i, one) = (job.index as usize, output.pixels.index_axis(Axis(0), k));
            hashes.insert(image_name(i), sha256_hex(&png));
            if adaptive {
                orders.insert(image_name(i), output.reveal_orders[k].clone());
            }
            pixels.index_axis_mut(Axis(0), i - start).assign(&one);
        }
        done += jobs.len();
        progress(done, n)
    })?;
    let mut record = run.record.clone();
    record.images_sha256 = hashes;
    record.reveal_orders = orders;
    record.measured = Some(measure(
        engine,
        &run.plans.reference,
        n,
        wall,
        req,
        run.vae_decode,
    ));
    Ok((pixels, record))
}

/// Zeroed pixels for `n` images, allocated without aborting: a count whose
/// pixels do not fit in memory is refused, naming the count.
fn pixel_buffer(n: usize, image: ImageSettings) -> Result<Array4<u8>, RunError> {
    let shape = (n, image.height, image.width, image.channels);
    let bytes = [image.height, image.width, image.channels]
        .into_iter()
        .try_fold(n, usize::checked_mul);
    // A probe: the buffer itself is allocated zeroed (lazily, by pages).
    let mut probe = Vec::<u8>::new();
    match bytes.map(|b| probe.try_reserve_exact(b)) {
        Some(Ok(())) => {}
        _ => {
            return Err(RunError::Invalid(format!(
                "{n} images of {}x{}x{} pixels ({:.1} GB) do not fit in memory; make fewer images per call",
                image.height,
                image.width,
                image.channels,
                n as f64 * (image.height * image.width * image.channels) as f64 / 1e9
            )));
        }
    }
    drop(probe);
    Ok(Array4::zeros(shape))
}

/// The image indices this process makes; refuses counts and shards that
/// cannot work, before any work.
fn check_request(req: &RunRequest) -> Result<Range<usize>, RunError> {
    if req.num_images == 0 || req.batch == 0 {
        return Err(RunError::Invalid(
            "--num-images and --batch must be at least 1".into(),
        ));
    }
    match req.shard {
        Some(shard) => match shard.unfit(req.num_images) {
            Some(problem) => Err(RunError::Invalid(problem)),
            None => Ok(shard.range(req.num_images)),
        },
        None => Ok(0..req.num_images),
    }
}

/// Where a run of `bundle` writes, checked before any work (the command
/// line checks it before the model loads; [`generate`] again): the folder
/// `out` (none for a run in memory: empty) and the `.npz` target may not be
/// nor lie in what the run reads (the bundle's folder and every file it
/// names, the `replay` file) nor, the `.npz`, in another command's output
/// folder; a shard (`sharded`) writes no `.npz`; and `--force`
/// (`existing`) may not be asked where the folder holds a file the run
/// reads, which it would remove.
pub fn check_outputs(
    bundle: &Bundle,
    out: &Path,
    npz: Option<&Path>,
    replay: Option<&Path>,
    sharded: bool,
    existing: Existing,
) -> Result<(), RunError> {
    let mut inputs = bundle.read_paths();
    inputs.extend(replay.map(Path::to_path_buf));
    if let Some(npz) = npz {
        if sharded {
            return Err(RunError::Invalid(
                "--npz with --shard: a shard holds only part of the images; pass --npz to `gtr-run merge` instead".into(),
            ));
        }
        folder::check_npz_target(npz, out, &inputs)?;
    }
    if out.as_os_str().is_empty() {
        return Ok(());
    }
    folder::check_outside_inputs(out, "--out", &inputs)?;
    // --force removes the previous run's files in the folder, `.npz`
    // files included.
    let removed = |input: &&PathBuf| input.is_file() && folder::in_folder(input, out);
    match inputs.iter().find(removed) {
        Some(input) if existing == Existing::Overwrite => Err(RunError::Invalid(format!(
            "--force: {} holds {}, which this run reads, and --force would remove it: move it out of the folder",
            out.display(),
            input.display()
        ))),
        _ => Ok(()),
    }
}

/// The `--replay` file, checked to hold noise for every image.
fn load_replay(req: &RunRequest) -> Result<Option<Replay>, RunError> {
    let Some(path) = &req.replay else {
        return Ok(None);
    };
    let replay = Replay::load(path)?;
    if replay.images() < req.num_images {
        return Err(RunError::Invalid(format!(
            "the replay file holds {} images; --num-images is {}",
            replay.images(),
            req.num_images
        )));
    }
    Ok(Some(replay))
}

/// The run's plans on the model `info`, checked against the model (grid,
/// chain lengths) before any work.
fn plan_run<'s>(req: &'s RunRequest, info: &ModelInfo) -> Result<RunPlans<'s>, RunError> {
    let invalid = |d| RunError::from(ScheduleError::Invalid(Box::new(d)));
    req.schedule.check_model_grid(info.grid, &info.name)?;
    let planner = Planner::new(&req.schedule, info.grid).map_err(invalid)?;
    let options = info.defaults.plan_options(req.cfg, req.temperature);
    let reference = planner.plan_with(req.seed, &options).map_err(invalid)?;
    crate::engine::check_plan(info, &reference).map_err(RunError::Invalid)?;
    Ok(RunPlans {
        planner,
        options,
        reference,
    })
}

/// What the run is, known before any image is made (no measurements, no
/// hashes yet).
fn describe_run<M: MarModel>(
    bundle: &Bundle,
    model: &M,
    req: &RunRequest,
    labels: &[i64],
    range: &Range<usize>,
    reference: &Plan,
) -> RunRecord {
    let info = model.info();
    RunRecord {
        gtr_run_version: crate::VERSION.into(),
        model: ModelRecord {
            name: info.name.clone(),
            path: Some(bundle.dir.display().to_string()),
            classes: info.classes,
            sha256: req.model_sha256.clone(),
        },
        schedule: ScheduleRecord {
            path: Some(req.schedule.source.name.clone()),
            source: req.schedule.source.text.clone(),
            params: req
                .schedule
                .params
                .iter()
                .map(|p| (p.name.clone(), p.value))
                .collect(),
        },
        seed: req.seed,
        num_images: req.num_images,
        shard: req.shard.map(|s| ShardRecord {
            k: s.k,
            n: s.n,
            start: range.start,
            end: range.end,
        }),
        batch: Some(req.batch),
        labels: labels.to_vec(),
        cfg_override: req.cfg,
        temperature_override: req.temperature,
        replay: req.replay.as_ref().map(|p| p.display().to_string()),
        replay_sha256: None,
        device_requested: Some(req.device_requested.clone()),
        precision: model.precision(),
        runtime_settings: req.runtime_settings.clone(),
        mar_steps: reference.steps.len(),
        cost_per_image: plan_cost(reference, &bundle.cost_spec()).into(),
        finished: true,
        images_sha256: BTreeMap::new(),
        reveal_orders: BTreeMap::new(),
        writer: None,
        measured: None,
        parts: Vec::new(),
    }
}

/// The hashes of the images `--resume` keeps. Where the folder's record has
/// their hashes (a finished run), each must still be the image it recorded;
/// where it has none (an interrupted run), each must at least be a whole
/// PNG of the model's `size` (width, height), or it would be kept and fail
/// only when the grid reads it, on every retry.
fn check_kept(
    out: &Path,
    kept: &[usize],
    previous: Option<&RunRecord>,
    size: (u32, u32),
) -> Result<BTreeMap<String, String>, RunError> {
    let mut hashes = BTreeMap::new();
    for &i in kept {
        let (path, name) = (image_path(out, i), image_name(i));
        let hash = sha256_file(&path)
            .map_err(|e| RunError::Invalid(format!("reading back {}: {e}", path.display())))?;
        match previous.and_then(|r| r.images_sha256.get(&name)) {
            Some(want) if *want != hash => {
                return Err(RunError::Invalid(format!(
                    "{} is not the image the folder's run.json recorded (SHA-256 {hash}, recorded {want}): it was changed or replaced after the run; remove it and --resume makes it again",
                    path.display(),
                )));
            }
            Some(_) => {}
            None => {
                let whole = image::open(&path).map(|img| (img.width(), img.height()));
                if whole.as_ref().ok() != Some(&size) {
                    let what = match whole {
                        Ok((w, h)) => format!("is {w}x{h}, not this model's {}x{}", size.0, size.1),
                        Err(e) => format!("cannot be read as a PNG ({e})"),
                    };
                    return Err(RunError::Invalid(format!(
                        "{} {what}: it is not an image this run made; remove it and --resume makes it again",
                        path.display(),
                    )));
                }
            }
        }
        hashes.insert(name, hash);
    }
    Ok(hashes)
}

/// What the engine measured over the run: the reference plan's step table
/// with each step's counters, each graph's calls, and the seconds.
fn measure<M: MarModel>(
    engine: &Engine<M>,
    reference: &Plan,
    generated_now: usize,
    wall: f64,
    req: &RunRequest,
    vae_decode: VaeDecode,
) -> Measurements {
    let stats = &engine.stats;
    let graphs = engine.model.graph_stats();
    // Time inside the runtime's own run calls, where the model reports it.
    let runtime_seconds = engine.runtime_seconds();
    let steps = reference
        .steps
        .iter()
        .enumerate()
        .map(|(k, p)| StepRecord {
            step: k,
            stage: reference.stages[p.stage].name.clone(),
            tokens: p.tokens.len(),
            known_before: p.known_before,
            diffusion_steps: p.diffusion_steps,
            clip_timesteps: p.clip_timesteps,
            detail: p.detail,
            cfg: p.cfg,
            temperature: p.temperature,
            measured: stats.steps.get(k).cloned().unwrap_or_default(),
        })
        .collect();
    Measurements {
        generated_now,
        execution_provider: Some(engine.model.execution_provider()),
        diffusion_chains: engine.chain_runner(),
        backbone: engine.backbone_runner().into(),
        sampler_ticks_per_call: req.ticks_per_call,
        vae_decode,
        steps,
        seconds: Seconds {
            wall,
            generation: stats.total_seconds,
            in_model_calls: stats.model_seconds(),
            in_runtime_run_calls: runtime_seconds,
            outside_runtime_run_calls: stats.total_seconds - runtime_seconds,
            vae: stats.vae_seconds,
            session_creation: graphs.iter().map(|g| g.load_seconds).sum(),
            first_calls: graphs.iter().map(|g| g.first_call_seconds).sum(),
        },
        graphs,
    }
}

//! `gtr_run.Model`: a bundle loaded on a device; `generate` and `eval`.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::PathBuf;

use gtr_run::backend::{
    BackboneRunner, ChainRunner, Device, HeadRunner, LoadOptions, OrtEvaluator, OrtModel, VaeRunner,
};
use gtr_run::bundle::Bundle;
use gtr_run::engine::{Engine, MarModel, RunStats};
use gtr_run::eval::{CompareRequest, Scoring, compare};
use gtr_run::run::{Classes, Existing, RunError, RunRequest, generate_in_memory};
use ndarray::Array4;
use numpy::{IntoPyArray, PyArray4};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::{Value, json};

use crate::args::{
    ScheduleArg, Whole, classes_arg, in_range, non_negative, overrides, seed_arg, to_python,
};
use crate::errors::{Failure, run_failure};
use crate::progress::{Progress, ProgressArg};
use crate::{DEFAULT_BATCH, GtrRunError, MAX_BATCH, MAX_IMAGES, MAX_REPEATS, MAX_THREADS};

/// The columns of eval.csv that count things (ints); every other number is
/// a measurement (a float, `1.0` included, so that a column has one type).
const COUNT_COLUMNS: [&str; 3] = ["mar_steps", "backbone_passes", "diffusion_evaluations"];

/// The rows of a CSV table (`eval.csv`) as dicts keyed by its header,
/// counts ([`COUNT_COLUMNS`]) as int, other numbers as float and empty
/// cells as None.
pub(crate) fn csv_rows<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    let io = py.import("io")?.getattr("StringIO")?.call1((text,))?;
    let rows = py
        .import("csv")?
        .call_method1("reader", (io,))?
        .try_iter()?
        .map(|row| row?.extract::<Vec<String>>())
        .collect::<PyResult<Vec<_>>>()?;
    let Some((header, rows)) = rows.split_first() else {
        return Ok(pyo3::types::PyList::empty(py).into_any());
    };
    let out = pyo3::types::PyList::empty(py);
    for row in rows {
        let dict = PyDict::new(py);
        for (key, cell) in header.iter().zip(row) {
            if key == "schedule" {
                dict.set_item(key, cell)?;
            } else if cell.is_empty() {
                dict.set_item(key, py.None())?;
            } else if let (true, Ok(i)) =
                (COUNT_COLUMNS.contains(&key.as_str()), cell.parse::<i64>())
            {
                dict.set_item(key, i)?;
            } else if let Ok(x) = cell.parse::<f64>() {
                dict.set_item(key, x)?;
            } else {
                dict.set_item(key, cell)?;
            }
        }
        out.append(dict)?;
    }
    Ok(out.into_any())
}

/// A model bundle loaded on a device, ready to generate:
/// `Model(bundle, device="cpu", precision=None, threads=None,
/// sampler="auto", head="auto", backbone="auto", vae="auto")` opens the bundle (its folder, its
/// manifest.yaml or any .onnx in it) and loads its graphs on `device`
/// (`cpu`, `cuda`, `tensorrt` or `auto`) at `precision` (default: the
/// manifest's, else fp32) with `threads` intra-op threads per graph, with
/// its diffusion chains where `sampler` says (`--sampler`: auto, host,
/// graph or ticks), its diffusion head run as `head` says (`--head`:
/// auto, whole or split) and its backbone as `backbone` says
/// (`--backbone`: auto, fused or split), its batches' VAE decodes as `vae`
/// says (`--vae`: auto, overlap or inline). What the command line would
/// print once about the loaded model is a UserWarning.
///
/// It runs one `generate` or `eval` at a time: its engine is behind a lock
/// that a second call, from another thread or from the first call's
/// progress function, finds taken (GtrRunError: busy); what describes the
/// model is kept beside it and can be read at any time.
#[pyclass(module = "gtr_run")]
pub(crate) struct Model {
    bundle: Bundle,
    engine: std::sync::Mutex<Engine<OrtModel>>,
    info: gtr_run::engine::ModelInfo,
    provider: String,
    precision: String,
    settings: Value,
    device: String,
    /// The device and threads the graphs were loaded with (the evaluator's too).
    device_kind: Device,
    threads: Option<usize>,
    /// When each batch's VAE decode runs (`--vae`).
    vae: VaeRunner,
}

#[pymethods]
impl Model {
    /// Opens the bundle (its folder, its manifest.yaml or any .onnx in it)
    /// and loads its graphs on `device` (`cpu`, `cuda`, `tensorrt` or
    /// `auto`) at `precision` (default: the manifest's, else fp32) with
    /// `threads` intra-op threads per graph, and for gtr-run's own parallel
    /// work if it is the process's first model to say (default: ONNX
    /// Runtime's, and one per core), with its diffusion chains where
    /// `sampler` says (`--sampler`: auto, host, graph or ticks), its
    /// diffusion head run as `head` says (`--head`: auto, whole or split)
    /// its backbone as `backbone` says (`--backbone`: auto, fused or split)
    /// and its batches' VAE decodes as `vae` says (`--vae`: auto, overlap
    /// or inline).
    #[new]
    #[pyo3(signature = (bundle, device="cpu", precision=None, threads=None, sampler="auto", head="auto", backbone="auto", vae="auto"))]
    #[allow(clippy::too_many_arguments)] // Python's keyword arguments
    fn new(
        py: Python<'_>,
        bundle: PathBuf,
        device: &str,
        precision: Option<&str>,
        threads: Option<Whole>,
        sampler: &str,
        head: &str,
        backbone: &str,
        vae: &str,
    ) -> PyResult<Self> {
        let vae: VaeRunner = vae
            .parse()
            .map_err(|e: String| PyValueError::new_err(format!("vae: {e}")))?;
        let sampler: ChainRunner = sampler
            .parse()
            .map_err(|e: String| PyValueError::new_err(format!("sampler: {e}")))?;
        let backbone: BackboneRunner = backbone
            .parse()
            .map_err(|e: String| PyValueError::new_err(format!("backbone: {e}")))?;
        let head: HeadRunner = head
            .parse()
            .map_err(|e: String| PyValueError::new_err(format!("head: {e}")))?;
        // Named as the command line's flags, which these arguments are.
        if let Some(problem) = gtr_run::backend::runners_conflict(sampler, head, None) {
            return Err(PyValueError::new_err(format!("head: {problem}")));
        }
        let device_kind: Device = device
            .parse()
            .map_err(|e: String| PyValueError::new_err(format!("device: {e}")))?;
        let precision = precision
            .map(|p| p.parse())
            .transpose()
            .map_err(|e: String| PyValueError::new_err(format!("precision: {e}")))?;
        let threads = threads
            .map(|t| in_range("threads", t, 1, MAX_THREADS))
            .transpose()
            .map_err(PyErr::from)?;
        let device = device.to_string();
        if let Some(threads) = threads {
            gtr_run::engine::set_host_threads(threads);
        }
        py.detach(move || {
            // Held until the graphs are loaded: no model tool changes the
            // bundle meanwhile.
            let (bundle, bundle_lock) = Bundle::open_locked(&bundle).map_err(run_failure)?;
            let choice =
                gtr_run::backend::precision_choice::choose(&bundle, precision, device_kind)
                    .map_err(run_failure)?;
            let options = LoadOptions {
                precision: choice,
                tick_graph: sampler == ChainRunner::Ticks,
                ..LoadOptions::new(&bundle, device_kind, threads)
            };
            let (model, note) =
                OrtModel::load_running(&bundle, &options, (sampler, backbone, head))
                    .map_err(run_failure)?;
            drop(bundle_lock);
            let model = Model {
                bundle,
                info: model.info().clone(),
                provider: model.execution_provider(),
                precision: model.precision(),
                settings: model.settings(),
                engine: std::sync::Mutex::new(Engine::new(model)),
                device,
                device_kind,
                threads,
                vae,
            };
            Ok::<_, Failure>((model, note))
        })
        .map_err(PyErr::from)
        .and_then(|(model, note)| {
            // A warning, which notebooks show and `warnings` can filter.
            if let Some(note) = note {
                let message =
                    std::ffi::CString::new(format!("gtr-run: {note}")).unwrap_or_default();
                let category = py.get_type::<pyo3::exceptions::PyUserWarning>();
                PyErr::warn(py, &category, &message, 1)?;
            }
            Ok(model)
        })
    }

    /// The model's name (the manifest's `name`).
    #[getter]
    fn name(&self) -> String {
        self.info.name.clone()
    }

    /// Number of classes (0: unconditional).
    #[getter]
    fn classes(&self) -> usize {
        self.info.classes
    }

    /// (height, width) of the token grid.
    #[getter]
    fn grid(&self) -> (usize, usize) {
        let g = self.info.grid;
        (g.height, g.width)
    }

    /// (height, width, channels) of one image.
    #[getter]
    fn image_shape(&self) -> (usize, usize, usize) {
        let i = self.info.image;
        (i.height, i.width, i.channels)
    }

    /// The execution provider that runs the graphs (`cpu`, `cuda`, …).
    #[getter]
    fn execution_provider(&self) -> String {
        self.provider.clone()
    }

    /// Precision, graph files and provider settings (`runtime_settings`
    /// in run.json).
    #[getter]
    fn settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_python(py, &self.settings)
    }

    /// Generates `num_images` images with `schedule` (a .gtr path or its
    /// text); image i has the seed, class and bytes it has in
    /// `gtr-run MODEL SCHEDULE --seed seed`. Returns (uint8 [N, H, W, C],
    /// run record dict).
    #[pyo3(
        signature = (schedule, num_images, seed=Whole::from(0), classes=None, cfg=None, temperature=None, batch=None, params=None, progress=ProgressArg::Flag(true)),
        text_signature = "(self, schedule, num_images, seed=0, classes=None, cfg=None, temperature=None, batch=None, params=None, progress=True)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        schedule: &Bound<'py, PyAny>,
        num_images: Whole,
        seed: Whole,
        classes: Option<&Bound<'py, PyAny>>,
        cfg: Option<f64>,
        temperature: Option<f64>,
        batch: Option<Whole>,
        params: Option<&Bound<'py, PyAny>>,
        progress: ProgressArg,
    ) -> PyResult<(Bound<'py, PyArray4<u8>>, Bound<'py, PyAny>)> {
        let seed = seed_arg(&seed)?;
        let source = ScheduleArg::extract(schedule)?;
        let overrides = overrides(params)?;
        let classes = classes_arg(classes)?;
        let progress = Progress::new(py, progress, "images")?;
        let request = Request {
            source,
            overrides,
            num_images,
            seed,
            classes,
            cfg,
            temperature,
            batch,
        };
        let mut guard = self.engine()?;
        let engine: &mut Engine<OrtModel> = &mut guard;
        let (pixels, record) = py.detach(|| self.run(engine, &request, &progress))?;
        progress.finish();
        Ok((pixels.into_pyarray(py), to_python(py, &record)?))
    }

    /// Compares `schedules` (.gtr paths; the first is the baseline) on this
    /// model as `gtr-run eval` does: speed measured side by side, FLOPs,
    /// and quality on the bundle's evaluator. Returns the rows of eval.csv
    /// as dicts (counts as int, measurements as float, None where empty), or with
    /// `as_frame` a pandas DataFrame of them (pandas must be installed).
    #[pyo3(
        signature = (schedules, num_images=Whole::from(100), seed=Whole::from(0), batch=Whole::from(25), repeats=Whole::from(1), cfg=None, temperature=None, params=None, progress=ProgressArg::Flag(true), as_frame=false),
        text_signature = "(self, schedules, num_images=100, seed=0, batch=25, repeats=1, cfg=None, temperature=None, params=None, progress=True, as_frame=False)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn eval<'py>(
        &self,
        py: Python<'py>,
        schedules: &Bound<'py, PyAny>,
        num_images: Whole,
        seed: Whole,
        batch: Whole,
        repeats: Whole,
        cfg: Option<f64>,
        temperature: Option<f64>,
        params: Option<&Bound<'py, PyAny>>,
        progress: ProgressArg,
        as_frame: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let settings = Comparing::new(num_images, seed, batch, repeats, cfg, temperature)?;
        let schedules: Vec<PathBuf> = schedules.extract().map_err(|_| {
            PyValueError::new_err(
                "schedules: give a list of .gtr paths (str or os.PathLike), the first the baseline",
            )
        })?;
        if schedules.is_empty() {
            return Err(PyValueError::new_err(
                "schedules: give at least one .gtr path",
            ));
        }
        let overrides = overrides(params)?;
        let contenders =
            gtr_run::eval::contenders(&schedules, &overrides).map_err(|e| match e {
                gtr_run::eval::ContenderError::Schedule(e) => PyErr::from(Failure::Schedule(e)),
                gtr_run::eval::ContenderError::Undeclared(name) => PyValueError::new_err(format!(
                    "params: `{name}`: no schedule given declares a parameter `{name}`"
                )),
            })?;
        self.compare_rows(py, &contenders, settings, progress, as_frame)
    }

    /// Runs one schedule over a grid of parameter values as `gtr-run sweep`
    /// does: `axes` maps each parameter to its values (the first axis
    /// varies slowest; the first setting is the baseline), and each setting
    /// is a row named by its values (`beta=0.1 t_max=50`), compared as
    /// `eval` compares schedules. Returns the rows as `eval` does.
    #[pyo3(
        signature = (schedule, axes, num_images=Whole::from(100), seed=Whole::from(0), batch=Whole::from(25), repeats=Whole::from(1), cfg=None, temperature=None, progress=ProgressArg::Flag(true), as_frame=false),
        text_signature = "(self, schedule, axes, num_images=100, seed=0, batch=25, repeats=1, cfg=None, temperature=None, progress=True, as_frame=False)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn sweep<'py>(
        &self,
        py: Python<'py>,
        schedule: PathBuf,
        axes: &Bound<'py, PyAny>,
        num_images: Whole,
        seed: Whole,
        batch: Whole,
        repeats: Whole,
        cfg: Option<f64>,
        temperature: Option<f64>,
        progress: ProgressArg,
        as_frame: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let settings = Comparing::new(num_images, seed, batch, repeats, cfg, temperature)?;
        let axes = sweep_axes(axes)?;
        let contenders =
            gtr_run::eval::sweep::contenders(&schedule, &axes).map_err(|e| match e {
                gtr_run::eval::sweep::SweepError::Schedule(
                    gtr_run::schedule::ScheduleError::Override { name, problem },
                ) => PyValueError::new_err(format!("axes: `{name}`: {problem}")),
                gtr_run::eval::sweep::SweepError::Schedule(e) => PyErr::from(Failure::Schedule(e)),
                gtr_run::eval::sweep::SweepError::Axes(m) => {
                    PyValueError::new_err(format!("axes: {m}"))
                }
            })?;
        self.compare_rows(py, &contenders, settings, progress, as_frame)
    }

    fn __repr__(&self) -> String {
        let info = &self.info;
        format!(
            "Model(name={:?}, path={:?}, device={:?}, provider={:?}, precision={:?})",
            info.name,
            self.bundle.dir.display().to_string(),
            self.device,
            self.provider,
            self.precision
        )
    }
}

impl Model {
    /// `contenders` compared on this model (`eval`, `sweep`): the rows of
    /// the table as dicts, or a pandas DataFrame with `as_frame`.
    fn compare_rows<'py>(
        &self,
        py: Python<'py>,
        contenders: &[gtr_run::eval::Contender],
        settings: Comparing,
        progress: ProgressArg,
        as_frame: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        // Found missing before the comparison, not after it.
        let pandas = match as_frame {
            true => Some(py.import("pandas").map_err(|e| {
                pyo3::exceptions::PyImportError::new_err(format!(
                    "as_frame=True needs pandas ({e}); `pip install pandas`, or leave as_frame out for a list of dicts"
                ))
            })?),
            false => None,
        };
        let progress = Progress::new(py, progress, "batches")?;
        let mut guard = self.engine()?;
        let engine: &mut Engine<OrtModel> = &mut guard;
        let table = py.detach(|| {
            // The evaluator and its reference, read under the bundle's lock.
            let bundle_lock =
                gtr_run::bundle::BundleReadLock::acquire(&self.bundle.dir).map_err(run_failure)?;
            let mut evaluator = OrtEvaluator::load(&self.bundle, self.device_kind, self.threads)
                .map_err(run_failure)?;
            let features = evaluator.as_ref().and_then(gtr_run::backend::features_of);
            let reference =
                gtr_run::eval::reference_stats(&self.bundle, features).map_err(run_failure)?;
            drop(bundle_lock);
            let scoring = match (evaluator.as_mut(), reference.as_ref()) {
                (Some(evaluator), Some(reference)) => Some(Scoring {
                    evaluator,
                    reference,
                }),
                _ => None,
            };
            let request = settings.request(self.info.defaults, self.vae);
            // What the arguments cannot do is a ValueError, before any image.
            gtr_run::eval::check_request(&request, contenders.len(), scoring.is_some()).map_err(
                |e| match e {
                    gtr_run::eval::CompareError::Invalid(m) => Failure::Value(m),
                    other => run_failure(other),
                },
            )?;
            engine.stats = RunStats::default();
            // A signal or an error of the progress function stops the
            // comparison after the batch it came in, and is raised. The
            // function sees each count once (`compare` reports a repeat's
            // scoring again at the same count).
            let mut interrupted = None;
            let mut reported = None;
            let comparison = compare(
                engine,
                scoring,
                contenders,
                &self.bundle.cost_spec(),
                &request,
                |_, done, total| {
                    if reported.replace(done) == Some(done) {
                        return ControlFlow::Continue(());
                    }
                    match progress.report(done, total) {
                        Ok(()) => ControlFlow::Continue(()),
                        Err(e) => {
                            interrupted = Some(e);
                            ControlFlow::Break(())
                        }
                    }
                },
            );
            match (comparison, interrupted) {
                (_, Some(e)) => Err(Failure::Python(e)),
                (comparison, None) => Ok(gtr_run::eval::report::csv(
                    &comparison.map_err(run_failure)?,
                )),
            }
        })?;
        progress.finish();
        let rows = csv_rows(py, &table)?;
        match pandas {
            Some(pandas) => pandas.call_method1("DataFrame", (rows,)),
            None => Ok(rows),
        }
    }
}

/// The numbers of a comparison (`eval`, `sweep`), range-checked as the
/// command line's flags are.
struct Comparing {
    num_images: usize,
    seed: u64,
    batch: usize,
    repeats: usize,
    cfg: Option<f64>,
    temperature: Option<f64>,
}

impl Comparing {
    fn new(
        num_images: Whole,
        seed: Whole,
        batch: Whole,
        repeats: Whole,
        cfg: Option<f64>,
        temperature: Option<f64>,
    ) -> Result<Self, Failure> {
        Ok(Comparing {
            num_images: in_range("num_images", num_images, 1, MAX_IMAGES)?,
            seed: seed_arg(&seed)?,
            batch: in_range("batch", batch, 1, MAX_BATCH)?,
            repeats: in_range("repeats", repeats, 1, MAX_REPEATS)?,
            cfg: non_negative("cfg", cfg)?,
            temperature: non_negative("temperature", temperature)?,
        })
    }

    /// The request, planned with the model's guidance and temperature
    /// defaults where the schedules set none, its batches decoding as
    /// `vae` says.
    fn request(
        &self,
        defaults: gtr_run::engine::SamplingDefaults,
        vae: VaeRunner,
    ) -> CompareRequest {
        CompareRequest {
            num_images: self.num_images,
            batch: self.batch,
            seed: self.seed,
            repeats: self.repeats,
            options: defaults.plan_options(self.cfg, self.temperature),
            warm_up: true,
            vae,
        }
    }
}

/// `sweep`'s axes: a mapping of parameter names to sequences of numbers,
/// each checked as `--set name=v1,v2,...` is (`SweepAxis::new`).
fn sweep_axes(axes: &Bound<'_, PyAny>) -> PyResult<Vec<gtr_run::eval::sweep::SweepAxis>> {
    let bad = || {
        PyValueError::new_err(
            "axes: give a mapping of parameter names to lists of numbers, e.g. {\"beta\": [0.05, 0.1]}",
        )
    };
    let mapping = axes.cast::<pyo3::types::PyMapping>().map_err(|_| bad())?;
    let mut out = Vec::new();
    for item in mapping.items()?.iter() {
        let (name, values): (String, Vec<f64>) = item.extract().map_err(|_| bad())?;
        let axis = gtr_run::eval::sweep::SweepAxis::new(&name, values)
            .map_err(|e| PyValueError::new_err(format!("axes: {e}")))?;
        out.push(axis);
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// The arguments of one `generate` call.
pub(crate) struct Request {
    source: ScheduleArg,
    overrides: BTreeMap<String, f64>,
    num_images: Whole,
    seed: u64,
    classes: Classes,
    cfg: Option<f64>,
    temperature: Option<f64>,
    batch: Option<Whole>,
}

impl Model {
    /// The engine, for one call at a time; a second call while one runs
    /// (from another thread, or from the first's progress function) is
    /// refused rather than waiting, which from a progress function would
    /// never end.
    fn engine(&self) -> PyResult<std::sync::MutexGuard<'_, Engine<OrtModel>>> {
        use std::sync::TryLockError;
        match self.engine.try_lock() {
            Ok(engine) => Ok(engine),
            // A call that panicked left the engine as it was between
            // batches; its statistics are reset by the next call.
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) => Err(GtrRunError::new_err(
                "this Model is busy with another generate or eval call (from another thread, or from this call's progress function); a Model runs one call at a time: use one Model per thread",
            )),
        }
    }

    /// Generates without the GIL through the library's in-memory run
    /// ([`gtr_run::run::generate_in_memory`]); between batches it takes the
    /// GIL to let Python handle signals (Ctrl-C stops here with
    /// KeyboardInterrupt) and to report progress.
    fn run(
        &self,
        engine: &mut Engine<OrtModel>,
        req: &Request,
        progress: &Progress,
    ) -> Result<(Array4<u8>, Value), Failure> {
        let request = RunRequest {
            schedule: req.source.load(&req.overrides)?,
            num_images: in_range("num_images", req.num_images.clone(), 1, MAX_IMAGES)?,
            batch: in_range(
                "batch",
                req.batch.clone().unwrap_or(DEFAULT_BATCH.into()),
                1,
                MAX_BATCH,
            )?,
            seed: req.seed,
            classes: req.classes.clone(),
            cfg: non_negative("cfg", req.cfg)?,
            temperature: non_negative("temperature", req.temperature)?,
            out: std::path::PathBuf::new(),
            existing: Existing::Refuse,
            replay: None,
            device_requested: self.device.clone(),
            runtime_settings: self.settings.clone(),
            shard: None,
            npz: None,
            ticks_per_call: None,
            vae: self.vae,
            // In memory: no folder to resume or merge.
            model_sha256: None,
        };
        // A Python error from the progress report stops the run; it is kept
        // here to be raised as itself.
        let mut stopped = None;
        let result = generate_in_memory(&self.bundle, engine, &request, |done, n| {
            progress.report(done, n).map_err(|e| {
                stopped = Some(e);
                RunError::Invalid("stopped from Python".into())
            })
        });
        if let Some(e) = stopped {
            return Err(Failure::Python(e));
        }
        let (pixels, record) = result.map_err(|e| match e {
            RunError::Schedule(e) => Failure::Schedule(e),
            RunError::Invalid(m) => Failure::Value(m),
            other => run_failure(other),
        })?;
        let mut record = serde_json::to_value(&record).map_err(run_failure)?;
        // The schedule came from Python: its path when it was a file.
        record["schedule"]["path"] = json!(req.source.path());
        Ok((pixels, record))
    }
}

//! `gtr_run.Model`: a bundle loaded on a device; `generate` and `eval`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use gtr_run::backend::{ChainRunner, Device, HeadRunner, LoadOptions, OrtEvaluator, OrtModel};
use gtr_run::bundle::Bundle;
use gtr_run::engine::{Engine, MarModel, RunStats};
use gtr_run::eval::{CompareRequest, Scoring, compare};
use gtr_run::plan::PlanOptions;
use gtr_run::run::{Classes, Existing, RunError, RunRequest, generate_in_memory};
use ndarray::Array4;
use numpy::{IntoPyArray, PyArray4};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::{Value, json};

use crate::args::{ScheduleArg, classes_arg, in_range, non_negative, overrides, to_python};
use crate::errors::{Failure, chain, run_failure};
use crate::progress::{Progress, ProgressArg};
use crate::{DEFAULT_BATCH, MAX_BATCH, MAX_IMAGES, MAX_THREADS};

/// The rows of a CSV table (`eval.csv`) as dicts keyed by its header,
/// numbers as int or float and empty cells as None.
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
            } else if let Ok(i) = cell.parse::<i64>() {
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

/// A model bundle loaded on a device, ready to generate.
#[pyclass(module = "gtr_run")]
pub(crate) struct Model {
    bundle: Bundle,
    engine: Engine<OrtModel>,
    device: String,
    /// The device and threads the graphs were loaded with (the evaluator's too).
    device_kind: Device,
    threads: Option<usize>,
}

#[pymethods]
impl Model {
    /// Opens the bundle (its folder, its manifest.yaml or any .onnx in it)
    /// and loads its graphs on `device` (`cpu`, `cuda`, `tensorrt` or
    /// `auto`) at `precision` (default: the manifest's, else fp32) with
    /// `threads` intra-op threads per graph, and for gtr-run's own parallel
    /// work if it is the process's first model to say (default: ONNX
    /// Runtime's, and one per core), with its diffusion chains where
    /// `sampler` says (`--sampler`: auto, host, graph or ticks) and its
    /// diffusion head run as `head` says (`--head`: auto, whole or split).
    #[new]
    #[pyo3(signature = (bundle, device="cpu", precision=None, threads=None, sampler="auto", head="auto"))]
    fn new(
        py: Python<'_>,
        bundle: PathBuf,
        device: &str,
        precision: Option<&str>,
        threads: Option<usize>,
        sampler: &str,
        head: &str,
    ) -> PyResult<Self> {
        let sampler: ChainRunner = sampler
            .parse()
            .map_err(|e: String| PyValueError::new_err(format!("sampler: {e}")))?;
        let head: HeadRunner = head
            .parse()
            .map_err(|e: String| PyValueError::new_err(format!("head: {e}")))?;
        let device_kind: Device = device
            .parse()
            .map_err(|e: String| PyValueError::new_err(format!("device: {e}")))?;
        let precision = precision
            .map(|p| p.parse())
            .transpose()
            .map_err(|e: String| PyValueError::new_err(format!("precision: {e}")))?;
        let threads = threads
            .map(|t| in_range("threads", t, 1, MAX_THREADS))
            .transpose()?;
        let device = device.to_string();
        if let Some(threads) = threads {
            gtr_run::engine::set_host_threads(threads);
        }
        py.detach(move || {
            let bundle = Bundle::open(&bundle).map_err(run_failure)?;
            let choice =
                gtr_run::backend::precision_choice::choose(&bundle, precision, device_kind)
                    .map_err(run_failure)?;
            let options = LoadOptions {
                precision: choice,
                tick_graph: sampler == ChainRunner::Ticks,
                ..LoadOptions::new(&bundle, device_kind, threads)
            };
            let (model, note) = OrtModel::load_with(&bundle, &options)
                .and_then(|m| m.run_chains(sampler, &bundle))
                .and_then(|(m, note)| Ok((m.run_head(head, &bundle)?, note)))
                .map_err(run_failure)?;
            if let Some(note) = note {
                eprintln!("gtr-run: {note}");
            }
            Ok::<_, Failure>(Model {
                bundle,
                engine: Engine::new(model),
                device,
                device_kind,
                threads,
            })
        })
        .map_err(PyErr::from)
    }

    /// The model's name (the manifest's `name`).
    #[getter]
    fn name(&self) -> String {
        self.engine.model.info().name.clone()
    }

    /// Number of classes (0: unconditional).
    #[getter]
    fn classes(&self) -> usize {
        self.engine.model.info().classes
    }

    /// (height, width) of the token grid.
    #[getter]
    fn grid(&self) -> (usize, usize) {
        let g = self.engine.model.info().grid;
        (g.height, g.width)
    }

    /// (height, width, channels) of one image.
    #[getter]
    fn image_shape(&self) -> (usize, usize, usize) {
        let i = self.engine.model.info().image;
        (i.height, i.width, i.channels)
    }

    /// The execution provider that runs the graphs (`cpu`, `cuda`, …).
    #[getter]
    fn execution_provider(&self) -> String {
        self.engine.model.execution_provider()
    }

    /// Precision, graph files and provider settings (`runtime_settings`
    /// in run.json).
    #[getter]
    fn settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_python(py, &self.engine.model.settings())
    }

    /// Generates `num_images` images with `schedule` (a .gtr path or its
    /// text); image i has the seed, class and bytes it has in
    /// `gtr-run MODEL SCHEDULE --seed seed`. Returns (uint8 [N, H, W, C],
    /// run record dict).
    #[pyo3(signature = (schedule, num_images, seed=0, classes=None, cfg=None, temperature=None, batch=None, params=None, progress=ProgressArg::Flag(true)))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &mut self,
        py: Python<'py>,
        schedule: &Bound<'py, PyAny>,
        num_images: usize,
        seed: u64,
        classes: Option<&Bound<'py, PyAny>>,
        cfg: Option<f64>,
        temperature: Option<f64>,
        batch: Option<usize>,
        params: Option<&Bound<'py, PyDict>>,
        progress: ProgressArg,
    ) -> PyResult<(Bound<'py, PyArray4<u8>>, Bound<'py, PyAny>)> {
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
        let (pixels, record) = py.detach(|| self.run(&request, &progress))?;
        progress.finish();
        Ok((pixels.into_pyarray(py), to_python(py, &record)?))
    }

    /// Compares `schedules` (.gtr paths; the first is the baseline) on this
    /// model as `gtr-run eval` does: speed measured side by side, FLOPs,
    /// and quality on the bundle's evaluator. Returns the rows of eval.csv
    /// as dicts (numbers as int or float, None where empty), or with
    /// `as_frame` a pandas DataFrame of them (pandas must be installed).
    #[pyo3(signature = (schedules, num_images=100, seed=0, batch=25, repeats=1, cfg=None, temperature=None, params=None, progress=ProgressArg::Flag(true), as_frame=false))]
    #[allow(clippy::too_many_arguments)]
    fn eval<'py>(
        &mut self,
        py: Python<'py>,
        schedules: Vec<PathBuf>,
        num_images: usize,
        seed: u64,
        batch: usize,
        repeats: usize,
        cfg: Option<f64>,
        temperature: Option<f64>,
        params: Option<&Bound<'py, PyDict>>,
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
        let overrides = overrides(params)?;
        let progress = Progress::new(py, progress, "batches")?;
        let table = py.detach(|| {
            let n = in_range("num_images", num_images, 1, MAX_IMAGES)?;
            let batch = in_range("batch", batch, 1, MAX_BATCH)?;
            let repeats = in_range("repeats", repeats, 1, MAX_IMAGES)?;
            let (cfg, temperature) = (
                non_negative("cfg", cfg)?,
                non_negative("temperature", temperature)?,
            );
            if schedules.is_empty() {
                return Err(Failure::Value(
                    "schedules: give at least one .gtr path".into(),
                ));
            }
            let contenders =
                gtr_run::eval::contenders(&schedules, &overrides).map_err(|e| match e {
                    gtr_run::eval::ContenderError::Schedule(e) => Failure::Schedule(e),
                    other => Failure::Value(chain(&other)),
                })?;
            let mut evaluator = OrtEvaluator::load(&self.bundle, self.device_kind, self.threads)
                .map_err(run_failure)?;
            let features = evaluator.as_ref().and_then(gtr_run::backend::features_of);
            let reference =
                gtr_run::eval::reference_stats(&self.bundle, features).map_err(run_failure)?;
            let scoring = match (evaluator.as_mut(), reference.as_ref()) {
                (Some(evaluator), Some(reference)) => Some(Scoring {
                    evaluator,
                    reference,
                }),
                _ => None,
            };
            let defaults = self.engine.model.info().defaults;
            let request = CompareRequest {
                num_images: n,
                batch,
                seed,
                repeats,
                options: PlanOptions {
                    default_cfg: Some(defaults.cfg),
                    default_temperature: Some(defaults.temperature),
                    cfg,
                    temperature,
                },
                warm_up: true,
            };
            self.engine.stats = RunStats::default();
            // `compare` cannot be stopped halfway: a signal or an error of the
            // progress function is kept and raised when it returns.
            let mut interrupted = None;
            let comparison = compare(
                &mut self.engine,
                scoring,
                &contenders,
                &self.bundle.cost_spec(),
                &request,
                |done, total| {
                    if interrupted.is_none() {
                        interrupted = progress.report(done, total).err();
                    }
                },
            )
            .map_err(run_failure)?;
            match interrupted {
                Some(e) => Err(Failure::Python(e)),
                None => Ok(gtr_run::eval::report::csv(&comparison)),
            }
        })?;
        progress.finish();
        let rows = csv_rows(py, &table)?;
        match pandas {
            Some(pandas) => pandas.call_method1("DataFrame", (rows,)),
            None => Ok(rows),
        }
    }

    fn __repr__(&self) -> String {
        let info = self.engine.model.info();
        format!(
            "Model(name={:?}, path={:?}, device={:?}, provider={:?}, precision={:?})",
            info.name,
            self.bundle.dir.display().to_string(),
            self.device,
            self.engine.model.execution_provider(),
            self.engine.model.precision()
        )
    }
}

/// The arguments of one `generate` call.
pub(crate) struct Request {
    source: ScheduleArg,
    overrides: BTreeMap<String, f64>,
    num_images: usize,
    seed: u64,
    classes: Classes,
    cfg: Option<f64>,
    temperature: Option<f64>,
    batch: Option<usize>,
}

impl Model {
    /// Generates without the GIL through the library's in-memory run
    /// ([`gtr_run::run::generate_in_memory`]); between batches it takes the
    /// GIL to let Python handle signals (Ctrl-C stops here with
    /// KeyboardInterrupt) and to report progress.
    fn run(&mut self, req: &Request, progress: &Progress) -> Result<(Array4<u8>, Value), Failure> {
        let request = RunRequest {
            schedule: req.source.load(&req.overrides)?,
            num_images: in_range("num_images", req.num_images, 1, MAX_IMAGES)?,
            batch: in_range("batch", req.batch.unwrap_or(DEFAULT_BATCH), 1, MAX_BATCH)?,
            seed: req.seed,
            classes: req.classes.clone(),
            cfg: non_negative("cfg", req.cfg)?,
            temperature: non_negative("temperature", req.temperature)?,
            out: std::path::PathBuf::new(),
            existing: Existing::Refuse,
            replay: None,
            device_requested: self.device.clone(),
            runtime_settings: self.engine.model.settings(),
            shard: None,
            npz: None,
            ticks_per_call: None,
            // In memory: no folder to resume or merge.
            model_sha256: None,
        };
        // A Python error from the progress report stops the run; it is kept
        // here to be raised as itself.
        let mut stopped = None;
        let result = generate_in_memory(&self.bundle, &mut self.engine, &request, |done, n| {
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

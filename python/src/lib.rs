//! `gtr_run._native`: the Python bindings of gtr-run, thin over the Rust
//! library. Planning goes through the planner and `plan --json`'s own
//! builder ([`gtr_run::report::json::plan_json`]); generation through the
//! engine that `gtr-run MODEL SCHEDULE` runs, with the same per-image seeds
//! and plans, so the pixels are the bytes of the command line's PNGs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use gtr_run::backend::{ChainRunner, Device, LoadOptions, OrtEvaluator, OrtModel};
use gtr_run::bundle::Bundle;
use gtr_run::cost::plan_cost;
use gtr_run::engine::{Engine, MarModel, RunStats};
use gtr_run::eval::{CompareRequest, Scoring, compare};
use gtr_run::grid::Grid;
use gtr_run::plan::{PlanOptions, Planner};
use gtr_run::report;
use gtr_run::run::{Classes, Existing, RunError, RunRequest, generate_in_memory};
use gtr_run::schedule::{self, Schedule, Source};
use ndarray::{Array2, Array3, Array4};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArray3, PyArray4};
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::{Value, json};

create_exception!(
    gtr_run,
    GtrRunError,
    PyRuntimeError,
    "A failure of gtr-run (bundle, runtime, model); the message is the command line's."
);
create_exception!(
    gtr_run,
    ScheduleError,
    GtrRunError,
    "A schedule that cannot be read, parsed or planned; `line` and `column` (1-based) say where, when known."
);

/// The most images one call makes, and the batch and thread ranges: the
/// command line's limits.
const MAX_IMAGES: usize = 10_000_000;
const MAX_BATCH: usize = 4096;
const MAX_THREADS: usize = 1024;
/// The command line's default `--batch`.
const DEFAULT_BATCH: usize = 8;

/// Why a call failed, carried out of code that runs without the GIL.
enum Failure {
    Schedule(schedule::ScheduleError),
    Value(String),
    Run(String),
    Python(PyErr),
}

impl From<schedule::ScheduleError> for Failure {
    fn from(e: schedule::ScheduleError) -> Self {
        Failure::Schedule(e)
    }
}

impl From<schedule::Diagnostic> for Failure {
    fn from(d: schedule::Diagnostic) -> Self {
        Failure::Schedule(d.into())
    }
}

impl From<PyErr> for Failure {
    fn from(e: PyErr) -> Self {
        Failure::Python(e)
    }
}

/// `error` and its causes, as the command line prints them (`a: b: c`).
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text += ": ";
        text += &c.to_string();
        cause = c.source();
    }
    text
}

fn run_failure(e: impl std::error::Error + 'static) -> Failure {
    Failure::Run(chain(&e))
}

impl From<Failure> for PyErr {
    fn from(f: Failure) -> PyErr {
        match f {
            Failure::Schedule(e) => Python::attach(|py| schedule_error(py, &e)),
            Failure::Value(m) => PyValueError::new_err(m),
            Failure::Run(m) => GtrRunError::new_err(m),
            Failure::Python(e) => e,
        }
    }
}

/// A `ScheduleError` with the command line's message (for a diagnostic,
/// the whole rendering: message, `--> file:line:col`, the line, a caret
/// and any help) and, for a diagnostic, `line`, `column`, `file`, `help`.
fn schedule_error(py: Python<'_>, e: &schedule::ScheduleError) -> PyErr {
    let (message, place) = match e {
        schedule::ScheduleError::Invalid(d) => {
            let (line, column) = d.line_col();
            (
                d.to_string(),
                Some((line, column, d.source.name.clone(), d.help.clone())),
            )
        }
        other => (chain(other), None),
    };
    let err = ScheduleError::new_err(message);
    let value = err.value(py);
    let (line, column, file, help) = match place {
        Some((l, c, f, h)) => (Some(l), Some(c), Some(f), h),
        None => (None, None, None, None),
    };
    // Setting plain attributes on a fresh exception object cannot fail.
    let _ = value.setattr("line", line);
    let _ = value.setattr("column", column);
    let _ = value.setattr("file", file);
    let _ = value.setattr("help", help);
    err
}

/// A JSON value as the Python object `json.loads` makes of it.
fn to_python<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(value).map_err(|e| GtrRunError::new_err(e.to_string()))?;
    py.import("json")?.call_method1("loads", (text,))
}

/// Where a schedule comes from: a file, or the text itself.
enum ScheduleArg {
    Path(PathBuf),
    Text(String),
}

impl ScheduleArg {
    /// A `str` holding a newline or a `{` is schedule text (no schedule
    /// fits on one line without a stage's braces, and no sane file name
    /// holds either); any other `str` or `os.PathLike` is a file.
    fn extract(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        if let Ok(text) = obj.extract::<String>() {
            return Ok(if text.contains(['\n', '{']) {
                ScheduleArg::Text(text)
            } else {
                ScheduleArg::Path(PathBuf::from(text))
            });
        }
        obj.extract::<PathBuf>().map(ScheduleArg::Path).map_err(|_| {
            PyValueError::new_err(
                "schedule: give a path (str or os.PathLike) to a .gtr file, or the schedule's text",
            )
        })
    }

    fn load(&self, overrides: &BTreeMap<String, f64>) -> Result<Schedule, Failure> {
        Ok(match self {
            ScheduleArg::Path(path) => Schedule::from_file(path, overrides)?,
            ScheduleArg::Text(text) => {
                Schedule::from_source(Source::new("<string>", text.clone()), overrides)?
            }
        })
    }

    fn path(&self) -> Option<String> {
        match self {
            ScheduleArg::Path(p) => Some(p.display().to_string()),
            ScheduleArg::Text(_) => None,
        }
    }
}

/// Parameter overrides (`--set name=value`), which must be finite.
fn overrides(params: Option<&Bound<'_, PyDict>>) -> PyResult<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for (k, v) in params.into_iter().flat_map(|d| d.iter()) {
        let name: String = k.extract()?;
        let value: f64 = v.extract().map_err(|_| {
            PyValueError::new_err(format!("parameter `{name}`: {v} is not a number"))
        })?;
        if !value.is_finite() {
            return Err(PyValueError::new_err(format!(
                "parameter `{name}`: {value} is not a finite number"
            )));
        }
        out.insert(name, value);
    }
    Ok(out)
}

/// A guidance scale or temperature: finite and >= 0, as `--cfg` takes it.
fn non_negative(what: &str, v: Option<f64>) -> Result<Option<f64>, Failure> {
    match v {
        Some(x) if !(x.is_finite() && x >= 0.0) => Err(Failure::Value(format!(
            "{what}: {x} is not a finite number >= 0"
        ))),
        _ => Ok(v),
    }
}

/// A whole number in `min..=max`, named `what` in the error.
fn in_range(what: &str, v: usize, min: usize, max: usize) -> Result<usize, Failure> {
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(Failure::Value(format!(
            "{what}: {v} is not a whole number from {min} to {max}"
        )))
    }
}

/// A grid given as `(height, width)` or `"HxW"`, checked as `--grid` is.
fn grid_arg(obj: &Bound<'_, PyAny>) -> PyResult<Grid> {
    let text = match obj.extract::<(usize, usize)>() {
        Ok((h, w)) => format!("{h}x{w}"),
        Err(_) => obj.extract::<String>().map_err(|_| {
            PyValueError::new_err("grid: give (height, width) or a string such as \"16x16\"")
        })?,
    };
    text.parse::<Grid>()
        .map_err(|e| PyValueError::new_err(format!("grid: {e}")))
}

/// One MAR step of a plan.
#[pyclass(module = "gtr_run", frozen, get_all)]
struct Step {
    /// The stage's name.
    stage: String,
    /// Token indices predicted at this step (row-major: row * width + col), int64.
    tokens: Py<PyArray1<i64>>,
    /// Tokens known before this step.
    known_before: usize,
    /// Diffusion steps of each token (FTS detail tokens: see `detail`).
    diffusion_steps: u32,
    /// Guidance scale, None when the step runs no unconditional pass.
    cfg: Option<f64>,
    temperature: f64,
    /// The FTS detail rule (`fraction`, `steps`, `selector`, `count`), or None.
    detail: Py<PyAny>,
}

#[pymethods]
impl Step {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Step(stage={:?}, tokens={}, known_before={}, diffusion_steps={}, cfg={}, temperature={})",
            self.stage,
            numpy::PyUntypedArrayMethods::len(self.tokens.bind(py)),
            self.known_before,
            self.diffusion_steps,
            self.cfg.map_or("None".into(), |c| c.to_string()),
            self.temperature
        )
    }
}

/// A schedule planned on a grid with a seed: every MAR step's tokens and
/// settings, as `gtr-run plan` shows them.
#[pyclass(module = "gtr_run", frozen)]
struct Plan {
    schedule: Schedule,
    plan: gtr_run::plan::Plan,
}

impl Plan {
    fn json(&self, cost: Option<&gtr_run::cost::Cost>) -> Value {
        report::json::plan_json(&self.schedule, &self.plan, cost)
    }

    /// `values` (one per token) as a [height, width] int64 array.
    fn on_grid<'py>(&self, py: Python<'py>, values: Vec<usize>) -> Bound<'py, PyArray2<i64>> {
        let g = self.plan.grid;
        Array2::from_shape_fn((g.height, g.width), |(i, j)| values[g.index(i, j)] as i64)
            .into_pyarray(py)
    }
}

#[pymethods]
impl Plan {
    /// The MAR steps in execution order.
    #[getter]
    fn steps(&self, py: Python<'_>) -> PyResult<Vec<Step>> {
        let json = self.json(None);
        let empty = Vec::new();
        let steps = json["steps"].as_array().unwrap_or(&empty);
        steps
            .iter()
            .map(|s| {
                let tokens: Vec<i64> = s["tokens"]
                    .as_array()
                    .unwrap_or(&empty)
                    .iter()
                    .filter_map(Value::as_i64)
                    .collect();
                Ok(Step {
                    stage: s["stage"].as_str().unwrap_or_default().to_string(),
                    tokens: tokens.into_pyarray(py).unbind(),
                    known_before: s["known_before"].as_u64().unwrap_or(0) as usize,
                    diffusion_steps: s["diffusion_steps"].as_u64().unwrap_or(0) as u32,
                    cfg: s["cfg"].as_f64(),
                    temperature: s["temperature"].as_f64().unwrap_or(1.0),
                    detail: to_python(py, &s["detail"])?.unbind(),
                })
            })
            .collect()
    }

    /// The stages: name, number of steps and tokens, as in `plan --json`.
    #[getter]
    fn stages<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_python(py, &self.json(None)["stages"])
    }

    /// The schedule's parameters with the values used.
    #[getter]
    fn params<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_python(py, &self.json(None)["params"])
    }

    /// (height, width) of the token grid.
    #[getter]
    fn grid(&self) -> (usize, usize) {
        (self.plan.grid.height, self.plan.grid.width)
    }

    #[getter]
    fn seed(&self) -> u64 {
        self.plan.seed
    }

    /// The schedule's name: its path, or `<string>` for text.
    #[getter]
    fn schedule(&self) -> String {
        self.schedule.source.name.clone()
    }

    /// For each cell of the grid, the 0-based step that reveals it
    /// ([height, width] int64).
    #[getter]
    fn reveal<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<i64>> {
        self.on_grid(py, self.plan.reveal_step())
    }

    /// For each cell of the grid, the 0-based stage that reveals it.
    #[getter]
    fn stage_of_token<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<i64>> {
        self.on_grid(py, self.plan.stage_of_token())
    }

    /// The analytic cost per image on `model_spec` (`"mar-b"`, `"mar-l"`,
    /// `"mar-h"` or a model bundle's path), as `plan --json --cost` gives it.
    fn cost<'py>(
        &self,
        py: Python<'py>,
        model_spec: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let name = model_spec
            .extract::<PathBuf>()
            .map_err(|_| PyValueError::new_err("model_spec: give a spec name or a bundle path"))?;
        let spec =
            gtr_run::bundle::cost_spec_named(&name.to_string_lossy()).map_err(|e| match e {
                gtr_run::bundle::NamedSpecError::Unknown(_) => {
                    PyValueError::new_err(format!("model_spec {e}"))
                }
                e => GtrRunError::new_err(chain(&e)),
            })?;
        let cost = plan_cost(&self.plan, &spec);
        to_python(py, &self.json(Some(&cost))["cost"])
    }

    /// The plan as the object `gtr-run plan --json` prints.
    fn to_json<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_python(py, &self.json(None))
    }

    /// The picture of the order (`gtr-run plan --png`), uint8 [H, W, 3].
    fn picture<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray3<u8>> {
        let img = report::png::render(&self.plan);
        let (w, h) = (img.width() as usize, img.height() as usize);
        Array3::from_shape_vec((h, w, 3), img.into_raw())
            .expect("an RGB image holds h·w·3 bytes")
            .into_pyarray(py)
    }

    fn __len__(&self) -> usize {
        self.plan.steps.len()
    }

    /// The text report of `gtr-run plan`.
    fn __str__(&self) -> String {
        report::text::report(&self.schedule, &self.plan, None)
    }

    fn __repr__(&self) -> String {
        format!(
            "Plan(schedule={:?}, grid={}, seed={}, steps={})",
            self.schedule.source.name,
            self.plan.grid,
            self.plan.seed,
            self.plan.steps.len()
        )
    }
}

/// Plans `schedule` (a .gtr path or the text itself) on `grid` (default:
/// the schedule's `grid`, else 16x16) with `seed`; keyword arguments set
/// parameters, as `--set name=value` does.
#[pyfunction]
#[pyo3(signature = (schedule, grid=None, seed=0, **params))]
fn plan(
    schedule: &Bound<'_, PyAny>,
    grid: Option<&Bound<'_, PyAny>>,
    seed: u64,
    params: Option<&Bound<'_, PyDict>>,
) -> PyResult<Plan> {
    let source = ScheduleArg::extract(schedule)?;
    let grid = grid.map(grid_arg).transpose()?;
    let overrides = overrides(params)?;
    let schedule = source.load(&overrides)?;
    let grid = schedule.planning_grid(grid);
    let plan = Planner::new(&schedule, grid)
        .and_then(|p| p.plan(seed))
        .map_err(Failure::from)?;
    Ok(Plan { schedule, plan })
}

/// `progress=`: a flag or a function.
#[derive(FromPyObject)]
enum ProgressArg {
    Flag(bool),
    Call(Py<PyAny>),
}

/// How `generate` reports progress.
enum Progress {
    Quiet,
    Bar(indicatif::ProgressBar),
    Call(Py<PyAny>),
}

impl Progress {
    /// `progress=` as given: a bar counting `unit`, nothing, or a function.
    fn new(py: Python<'_>, arg: ProgressArg, unit: &str) -> PyResult<Self> {
        Ok(match arg {
            ProgressArg::Call(f) if f.bind(py).is_callable() => Progress::Call(f),
            ProgressArg::Call(_) => {
                return Err(PyValueError::new_err(
                    "progress: give True, False or a function f(done, total)",
                ));
            }
            ProgressArg::Flag(false) => Progress::Quiet,
            ProgressArg::Flag(true) => Progress::Bar(
                indicatif::ProgressBar::new(0).with_style(
                    indicatif::ProgressStyle::with_template(&format!(
                        "{{bar:40}} {{pos}}/{{len}} {unit}, {{elapsed}} elapsed, eta {{eta}}"
                    ))
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                ),
            ),
        })
    }

    /// Takes the GIL to let Python handle signals (Ctrl-C raises
    /// KeyboardInterrupt here), then reports `done` of `total`.
    fn report(&self, done: usize, total: usize) -> PyResult<()> {
        Python::attach(|py| {
            py.check_signals()?;
            match self {
                Progress::Quiet => {}
                Progress::Bar(bar) => {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                }
                Progress::Call(f) => {
                    f.call1(py, (done, total))?;
                }
            }
            Ok(())
        })
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// The rows of a CSV table (`eval.csv`) as dicts keyed by its header,
/// numbers as int or float and empty cells as None.
fn csv_rows<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
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
struct Model {
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
    /// Runtime's, and one per core).
    #[new]
    #[pyo3(signature = (bundle, device="cpu", precision=None, threads=None))]
    fn new(
        py: Python<'_>,
        bundle: PathBuf,
        device: &str,
        precision: Option<&str>,
        threads: Option<usize>,
    ) -> PyResult<Self> {
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
                ..LoadOptions::new(&bundle, device_kind, threads)
            };
            let (model, note) = OrtModel::load_with(&bundle, &options)
                .and_then(|m| m.run_chains(ChainRunner::Auto, &bundle))
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
            let reference = gtr_run::eval::reference_stats(&self.bundle).map_err(run_failure)?;
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

/// `classes=`: None (balanced over all classes), one class, or a list to
/// cycle through.
fn classes_arg(classes: Option<&Bound<'_, PyAny>>) -> PyResult<Classes> {
    let Some(obj) = classes else {
        return Ok(Classes::Balanced);
    };
    if let Ok(one) = obj.extract::<i64>() {
        return Ok(Classes::One(one));
    }
    match obj.extract::<Vec<i64>>() {
        Ok(list) if !list.is_empty() => Ok(Classes::List(list)),
        Ok(_) => Err(PyValueError::new_err(
            "classes: an empty list; give None for classes balanced over all",
        )),
        Err(_) => Err(PyValueError::new_err(
            "classes: give None, one class (int) or a list of ints",
        )),
    }
}

/// The arguments of one `generate` call.
struct Request {
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

/// gtr-run's Python module (see the package `gtr_run`).
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", gtr_run::VERSION)?;
    m.add("GtrRunError", py.get_type::<GtrRunError>())?;
    m.add("ScheduleError", py.get_type::<ScheduleError>())?;
    m.add_class::<Plan>()?;
    m.add_class::<Step>()?;
    m.add_class::<Model>()?;
    m.add_function(wrap_pyfunction!(plan, m)?)?;
    Ok(())
}

//! `gtr_run.plan()` and the `Plan` and `Step` it returns.

use std::path::{Path, PathBuf};

use gtr_run::cost::plan_cost;
use gtr_run::plan::Planner;
use gtr_run::report;
use gtr_run::schedule::Schedule;
use ndarray::{Array2, Array3};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArray3};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::Value;

use crate::GtrRunError;
use crate::args::{ScheduleArg, Whole, grid_arg, overrides, seed_arg, to_python};
use crate::errors::{Failure, chain};

/// One MAR step of a plan.
#[pyclass(module = "gtr_run", frozen, get_all)]
pub(crate) struct Step {
    /// The stage's name.
    stage: String,
    /// Token indices predicted at this step (row-major: row * width + col), int64.
    tokens: Py<PyArray1<i64>>,
    /// Tokens known before this step.
    known_before: usize,
    /// Diffusion steps of each token (FTS detail tokens: see `detail`).
    diffusion_steps: u32,
    /// The schedule's `clip_timesteps` (the largest timestep the step's
    /// chains keep), or None.
    clip_timesteps: Option<u32>,
    /// Guidance scale, None when the step runs no unconditional pass.
    cfg: Option<f64>,
    temperature: f64,
    /// The FTS detail rule (`fraction`, `steps`, `selector`, `count`), or None.
    detail: Py<PyAny>,
}

#[pymethods]
impl Step {
    fn __repr__(&self, py: Python<'_>) -> String {
        let clip = self
            .clip_timesteps
            .map_or(String::new(), |c| format!(", clip_timesteps={c}"));
        format!(
            "Step(stage={:?}, tokens={}, known_before={}, diffusion_steps={}{clip}, cfg={}, temperature={})",
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
pub(crate) struct Plan {
    schedule: Schedule,
    plan: gtr_run::plan::Plan,
    /// The `grid=` argument, if given (`cost` on a bundle of another grid
    /// refuses it, as `plan --grid` with `--cost BUNDLE` does).
    grid_asked: Option<gtr_run::grid::Grid>,
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
                    clip_timesteps: s["clip_timesteps"].as_u64().map(|c| c as u32),
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
    /// `"mar-h"` or a model bundle's path), as `plan --json --cost` gives
    /// it: on a bundle, of the schedule planned as a run on it plans it
    /// (the bundle's grid, its guidance and temperature defaults, this
    /// plan's seed).
    fn cost<'py>(
        &self,
        py: Python<'py>,
        model_spec: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let name = model_spec
            .extract::<PathBuf>()
            .map_err(|_| PyValueError::new_err("model_spec: give a spec name or a bundle path"))?;
        let name = name.to_string_lossy();
        if gtr_run::cost::ModelSpec::builtin(&name).is_none() && Path::new(&*name).exists() {
            let bundle = gtr_run::bundle::Bundle::open(Path::new(&*name))
                .map_err(|e| GtrRunError::new_err(chain(&e)))?;
            if let Some(g) = self.grid_asked.filter(|&g| g != bundle.grid()) {
                return Err(PyValueError::new_err(format!(
                    "model_spec: the bundle `{}` has a {} grid, which a run on it plans on; this plan was made with grid={g} (plan it without grid=)",
                    bundle.manifest.name,
                    bundle.grid(),
                )));
            }
            let plan = bundle
                .plan(&self.schedule, self.plan.seed)
                .map_err(|e| PyErr::from(Failure::Schedule(e)))?;
            let cost = plan_cost(&plan, &bundle.cost_spec());
            return to_python(py, &self.json(Some(&cost))["cost"]);
        }
        let spec = gtr_run::bundle::cost_spec_named(&name).map_err(|e| match e {
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
#[pyo3(signature = (schedule, grid=None, seed=Whole::from(0), **params), text_signature = "(schedule, grid=None, seed=0, **params)")]
pub(crate) fn plan(
    schedule: &Bound<'_, PyAny>,
    grid: Option<&Bound<'_, PyAny>>,
    seed: Whole,
    params: Option<&Bound<'_, PyDict>>,
) -> PyResult<Plan> {
    let seed = seed_arg(&seed)?;
    let source = ScheduleArg::extract(schedule)?;
    let grid_asked = grid.map(grid_arg).transpose()?;
    let overrides = overrides(params.map(|d| d.as_any()))?;
    let schedule = source.load(&overrides)?;
    let grid = schedule.planning_grid(grid_asked);
    let plan = Planner::new(&schedule, grid)
        .and_then(|p| p.plan(seed))
        .map_err(Failure::from)?;
    Ok(Plan {
        schedule,
        plan,
        grid_asked,
    })
}

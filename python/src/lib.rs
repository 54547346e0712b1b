//! `gtr_run._native`: the Python bindings of gtr-run, thin over the Rust
//! library. Planning goes through the planner and `plan --json`'s own
//! builder ([`gtr_run::report::json::plan_json`]); generation through the
//! engine that `gtr-run MODEL SCHEDULE` runs, with the same per-image seeds
//! and plans, so the pixels are the bytes of the command line's PNGs.

use pyo3::create_exception;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

mod args;
mod errors;
mod model;
mod planning;
mod progress;

use model::Model;
use planning::{Plan, Step, plan};

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

/// The command line's limits (the most images one call makes, the batch,
/// thread and repeat ranges).
use gtr_run::limits::{MAX_BATCH, MAX_IMAGES, MAX_REPEATS, MAX_THREADS};
/// The command line's default `--batch`.
const DEFAULT_BATCH: usize = 8;

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

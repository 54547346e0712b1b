//! Failures: how an error of the library becomes a Python exception with the
//! command line's message (`GtrRunError`, `ScheduleError` with line and column).

use gtr_run::schedule;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::{GtrRunError, ScheduleError};

/// Why a call failed, carried out of code that runs without the GIL.
pub(crate) enum Failure {
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
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text += ": ";
        text += &c.to_string();
        cause = c.source();
    }
    text
}

pub(crate) fn run_failure(e: impl std::error::Error + 'static) -> Failure {
    Failure::Run(chain(&e))
}

impl From<Failure> for PyErr {
    fn from(f: Failure) -> PyErr {
        match f {
            // A parameter the schedule lacks is a bad `params` argument, as
            // in `eval`, not a fault of the schedule.
            Failure::Schedule(schedule::ScheduleError::Override { name, problem }) => {
                PyValueError::new_err(format!("params: `{name}`: {problem}"))
            }
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
pub(crate) fn schedule_error(py: Python<'_>, e: &schedule::ScheduleError) -> PyErr {
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

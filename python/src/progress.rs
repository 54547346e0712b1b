//! How `Model.generate` reports progress (`progress=`).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// `progress=`: a flag or a function.
#[derive(FromPyObject)]
pub(crate) enum ProgressArg {
    Flag(bool),
    Call(Py<PyAny>),
}

/// How `generate` reports progress.
pub(crate) enum Progress {
    Quiet,
    Bar(indicatif::ProgressBar),
    Call(Py<PyAny>),
}

impl Progress {
    /// `progress=` as given: a bar counting `unit`, nothing, or a function.
    pub(crate) fn new(py: Python<'_>, arg: ProgressArg, unit: &str) -> PyResult<Self> {
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
    pub(crate) fn report(&self, done: usize, total: usize) -> PyResult<()> {
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

    pub(crate) fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

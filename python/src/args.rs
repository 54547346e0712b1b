//! Python arguments into the library's types: schedules given as a path or
//! text, parameter overrides, grids, classes, ranged numbers; JSON values
//! back into Python objects.

use std::collections::BTreeMap;
use std::path::PathBuf;

use gtr_run::grid::Grid;
use gtr_run::run::Classes;
use gtr_run::schedule::{Schedule, Source};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use serde_json::Value;

use crate::GtrRunError;
use crate::errors::Failure;

/// A JSON value as the Python object `json.loads` makes of it.
pub(crate) fn to_python<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(value).map_err(|e| GtrRunError::new_err(e.to_string()))?;
    py.import("json")?.call_method1("loads", (text,))
}

/// Where a schedule comes from: a file, or the text itself.
pub(crate) enum ScheduleArg {
    Path(PathBuf),
    Text(String),
}

impl ScheduleArg {
    /// A `str` holding a newline or a `{` is schedule text (no schedule
    /// fits on one line without a stage's braces, and no sane file name
    /// holds either); any other `str` or `os.PathLike` is a file.
    pub(crate) fn extract(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
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

    pub(crate) fn load(&self, overrides: &BTreeMap<String, f64>) -> Result<Schedule, Failure> {
        Ok(match self {
            ScheduleArg::Path(path) => Schedule::from_file(path, overrides)?,
            ScheduleArg::Text(text) => {
                Schedule::from_source(Source::new("<string>", text.clone()), overrides)?
            }
        })
    }

    pub(crate) fn path(&self) -> Option<String> {
        match self {
            ScheduleArg::Path(p) => Some(p.display().to_string()),
            ScheduleArg::Text(_) => None,
        }
    }
}

/// Parameter overrides (`--set name=value`) from a mapping of names to
/// numbers, which must be finite.
pub(crate) fn overrides(params: Option<&Bound<'_, PyAny>>) -> PyResult<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    let Some(params) = params else {
        return Ok(out);
    };
    let mapping = params.cast::<pyo3::types::PyMapping>().map_err(|_| {
        PyValueError::new_err("params: give a mapping (dict) of parameter names to numbers")
    })?;
    for item in mapping.items()?.iter() {
        let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item.extract()?;
        let name: String = k.extract().map_err(|_| {
            PyValueError::new_err(format!("params: the key {k} is not a parameter name (str)"))
        })?;
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

/// A guidance scale or temperature, as `--cfg` takes it
/// ([`gtr_run::plan::is_sampler_scale`]).
pub(crate) fn non_negative(what: &str, v: Option<f64>) -> Result<Option<f64>, Failure> {
    match v {
        Some(x) if !gtr_run::plan::is_sampler_scale(x) => Err(Failure::Value(format!(
            "{what}: {} is not {}",
            gtr_run::schedule::fmt_num(x),
            gtr_run::plan::SAMPLER_SCALE_RULE
        ))),
        _ => Ok(v),
    }
}

/// A Python int of any size, as given; [`in_range`] and [`seed_arg`] check
/// it, so that `-1` or `10**30` get the argument's range in a ValueError
/// rather than an OverflowError from the conversion.
#[derive(Debug, Clone)]
pub(crate) struct Whole {
    /// The value, where an i128 holds it.
    value: Option<i128>,
    /// As Python writes it.
    text: String,
}

impl From<usize> for Whole {
    fn from(v: usize) -> Self {
        Whole {
            value: Some(v as i128),
            text: v.to_string(),
        }
    }
}

impl<'py> FromPyObject<'_, 'py> for Whole {
    type Error = PyErr;

    /// Any object with `__index__` (numpy's ints included); too large for
    /// an i128 is kept as out of range.
    fn extract(obj: Borrowed<'_, 'py, PyAny>) -> PyResult<Self> {
        match obj.extract::<i128>() {
            Ok(v) => Ok(Whole {
                value: Some(v),
                text: v.to_string(),
            }),
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyOverflowError>(obj.py()) => {
                Ok(Whole {
                    value: None,
                    text: obj.str()?.to_string(),
                })
            }
            Err(_) => Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "expected an int, not {}",
                obj.get_type().name()?
            ))),
        }
    }
}

/// A whole number in `min..=max`, named `what` in the error.
pub(crate) fn in_range(
    what: &str,
    v: impl Into<Whole>,
    min: usize,
    max: usize,
) -> Result<usize, Failure> {
    let v = v.into();
    match v.value {
        Some(x) if (min as i128..=max as i128).contains(&x) => Ok(x as usize),
        _ => Err(Failure::Value(format!(
            "{what}: {} is not a whole number from {min} to {max}",
            v.text
        ))),
    }
}

/// A seed: a whole number from 0 to 2**64 - 1, as `--seed` takes it.
pub(crate) fn seed_arg(v: &Whole) -> Result<u64, Failure> {
    v.value.and_then(|x| u64::try_from(x).ok()).ok_or_else(|| {
        Failure::Value(format!(
            "seed: {} is not a whole number from 0 to {}",
            v.text,
            u64::MAX
        ))
    })
}

/// A grid given as `(height, width)` or `"HxW"`, checked as `--grid` is.
pub(crate) fn grid_arg(obj: &Bound<'_, PyAny>) -> PyResult<Grid> {
    let text = match obj.extract::<(usize, usize)>() {
        Ok((h, w)) => format!("{h}x{w}"),
        Err(_) => obj.extract::<String>().map_err(|_| {
            PyValueError::new_err("grid: give (height, width) or a string such as \"16x16\"")
        })?,
    };
    text.parse::<Grid>()
        .map_err(|e| PyValueError::new_err(format!("grid: {e}")))
}

/// `classes=`: None (balanced over all classes), one class, or a list to
/// cycle through.
pub(crate) fn classes_arg(classes: Option<&Bound<'_, PyAny>>) -> PyResult<Classes> {
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

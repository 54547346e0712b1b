//! The `.gtr` schedule language: grammar (`grammar/gtr.pest`), syntax tree,
//! type checking and the validated [`Schedule`].
//!
//! This module knows nothing of models or ONNX Runtime; the planner
//! ([`crate::plan`]) turns a schedule into a concrete [`crate::plan::Plan`].

pub mod ast;
pub mod compile;
pub mod diagnostic;
pub mod expr;
mod parser;

pub use ast::{Distribution, OrderKind, RampShape, Rounding, Selector, Vocabulary};
pub use compile::{
    Cfg, DiffusionRule, Fts, Param, Partition, Ramp, Schedule, ScheduleError, Stage, StepCount,
};
pub use diagnostic::{Diagnostic, Source, Span};
pub use parser::{KEYWORDS, parse};

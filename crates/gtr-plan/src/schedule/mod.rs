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
mod text;
mod validated;

pub use ast::{Distribution, OrderKind, RampShape, Rounding, Selector, Ties, Vocabulary};
pub use diagnostic::{Diagnostic, Source, Span, fmt_num, terminal_safe};
pub use parser::{KEYWORDS, parse};
pub use text::{MAX_SCHEDULE_BYTES, SmallTextError, read_small_text, read_small_text_file};
pub use validated::{
    Cfg, Defaults, DiffusionRule, Fts, NamedSet, Order, Param, Partition, Ramp, Schedule,
    ScheduleError, Stage, StepCount,
};

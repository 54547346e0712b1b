//! The validated [`Schedule`] and its parts, as [`super::compile`] builds
//! them from the syntax tree (`Schedule::from_file`, `Schedule::from_source`).

use std::collections::HashMap;
use std::sync::Arc;

use super::ast::*;
use super::diagnostic::{Diagnostic, Source, Span};
use crate::grid::Grid;

/// A parameter after overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub value: f64,
    /// The value the file gives, before any `--set` (not finite where
    /// `--set` replaced an expression that, with the other values, has no
    /// finite value).
    pub default: f64,
    pub overridden: bool,
    pub span: Span,
}

/// `partition checker(K) [as P]`: binds `P1..PK` (default `S1..SK`).
#[derive(Debug, Clone, PartialEq)]
pub struct Partition {
    pub levels: usize,
    pub prefix: String,
    pub span: Span,
}

impl Partition {
    /// The name of set `k` (1-based).
    pub fn set_name(&self, k: usize) -> String {
        format!("{}{k}", self.prefix)
    }

    /// The 1-based set index named by `name`, if it is one of ours.
    pub fn set_index(&self, name: &str) -> Option<usize> {
        let k: usize = name.strip_prefix(&self.prefix)?.parse().ok()?;
        ((1..=self.levels).contains(&k) && self.set_name(k) == name).then_some(k)
    }
}

/// A named token set from `set NAME = condition`.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedSet {
    pub name: String,
    pub cells: Expr,
}

/// How a stage orders its tokens.
#[derive(Debug, Clone, PartialEq)]
pub enum Order {
    /// `order random`, `order raster`, ...
    Named(OrderKind),
    /// `order by KEY`: ascending `key` (a number over `i`, `j`, `h`, `w`
    /// and parameters), equal keys in `ties` order.
    By { key: Expr, ties: Ties },
    /// `order list [...]`: token indices (numbers over parameters, `h` and
    /// `w`), first revealed first.
    List(Vec<Expr>),
    /// `order file "..."`: token indices read from `path` (as shown in
    /// errors), each with its 1-based line.
    File {
        path: String,
        tokens: Vec<(usize, usize)>,
    },
    /// `order adaptive by high_freq|low_freq`: the planner fixes only the
    /// step sizes (and a provisional random order); at run time each step
    /// reveals the stage's still-masked tokens with the highest (lowest)
    /// FTS score of their conditioning vectors.
    Adaptive(Selector),
}

/// How a stage's tokens are divided into steps.
#[derive(Debug, Clone, PartialEq)]
pub enum StepCount {
    Steps(Expr, Distribution),
    Rate(Expr, Distribution),
    List(Vec<Expr>),
}

/// Where a stage's diffusion step counts come from.
#[derive(Debug, Clone, PartialEq)]
pub enum DiffusionRule {
    Constant(Expr),
    /// One count per step of the stage.
    List(Vec<Expr>),
    /// An index into [`Schedule::ramps`].
    Ramp(usize),
}

/// A diffusion ramp over a run of consecutive stages (or one stage).
#[derive(Debug, Clone, PartialEq)]
pub struct Ramp {
    pub shape: RampShape,
    pub from: Expr,
    pub to: Expr,
    pub rounding: Rounding,
    /// First and last stage index, inclusive.
    pub stages: (usize, usize),
    pub span: Span,
}

/// FTS: the top `fraction` of a step's tokens by `selector` get `steps`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fts {
    pub fraction: Expr,
    pub selector: Selector,
    pub steps: Expr,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Cfg {
    /// The schedule does not say: the model's default guidance (linear, as
    /// MAR), or none when planning without a model.
    Unset,
    None,
    Constant(Expr),
    Linear(Expr),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub name: String,
    pub span: Span,
    pub name_span: Span,
    pub tokens: Expr,
    pub order: Order,
    /// The `order` clause, or the stage's name when it has none.
    pub order_span: Span,
    pub steps: StepCount,
    pub steps_span: Span,
    pub diffusion: DiffusionRule,
    pub diffusion_span: Span,
    pub fts: Option<Fts>,
    pub cfg: Cfg,
    /// `None`: the schedule does not say (the model's default, else 1).
    pub temperature: Option<Expr>,
    /// `None`: chains keep every respaced timestep.
    pub clip_timesteps: Option<Expr>,
}

/// The file's top-level settings: the defaults of the stages that give
/// none (each such stage holds a copy), kept so that the planner checks
/// their values even where every stage gives its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    /// A constant or a list (a top-level ramp is a [`Ramp`], not a default).
    pub diffusion: Option<DiffusionRule>,
    /// [`Cfg::Unset`] when the file gives none.
    pub cfg: Cfg,
    pub temperature: Option<Expr>,
    pub clip_timesteps: Option<Expr>,
}

/// A checked schedule, ready to plan on any grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub source: Arc<Source>,
    pub params: Vec<Param>,
    /// The grid the file declares (`grid HxW`), if any.
    pub grid: Option<Grid>,
    /// Where the file declares it.
    pub grid_span: Option<Span>,
    pub partition: Option<Partition>,
    pub sets: Vec<NamedSet>,
    pub stages: Vec<Stage>,
    pub ramps: Vec<Ramp>,
    pub defaults: Defaults,
}

/// Why a schedule could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("{0}")]
    Invalid(Box<Diagnostic>),
    #[error("--set {name}=...: {problem}")]
    Override { name: String, problem: String },
    #[error("cannot read schedule {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("schedule {path}: {problem}")]
    Text { path: String, problem: String },
}

impl From<Diagnostic> for ScheduleError {
    fn from(d: Diagnostic) -> Self {
        ScheduleError::Invalid(Box::new(d))
    }
}

impl Schedule {
    /// A schedule that states a grid runs only on a model of that grid;
    /// one that states none adapts to any (partitions and conditions are
    /// relative to the grid).
    pub fn check_model_grid(&self, model: Grid, model_name: &str) -> Result<(), ScheduleError> {
        match (self.grid, self.grid_span) {
            (Some(g), Some(span)) if g != model => Err(Diagnostic::new(
                &self.source,
                span,
                format!(
                    "the schedule states `grid {g}`, but model `{model_name}` has a {model} grid"
                ),
            )
            .with_help(
                "remove the `grid` line to let the schedule adapt, or use a model of that grid",
            )
            .into()),
            _ => Ok(()),
        }
    }

    /// The grid a plan without a model uses: `requested` if given, else the
    /// schedule's own `grid`, else MAR's 16×16.
    pub fn planning_grid(&self, requested: Option<Grid>) -> Grid {
        requested.or(self.grid).unwrap_or(Grid::MAR)
    }

    /// The value of parameter `name`.
    pub fn param(&self, name: &str) -> Option<f64> {
        self.params.iter().find(|p| p.name == name).map(|p| p.value)
    }

    /// Values of all parameters, for evaluating expressions.
    /// `d` with a note of the parameters `--set` gave, if any.
    pub fn note_set_params(&self, d: Diagnostic) -> Diagnostic {
        d.with_set_params(
            self.params
                .iter()
                .filter(|p| p.overridden)
                .map(|p| (p.name.as_str(), p.value)),
        )
    }

    pub fn param_values(&self) -> HashMap<String, f64> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.value))
            .collect()
    }
}

//! [`ScheduleAst`] → validated [`Schedule`]: names resolved, types checked,
//! clauses present once, parameter overrides applied.
//!
//! What depends on the grid (token counts, coverage) is checked by the
//! planner, which still has every span to point at.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::ast::*;
use super::diagnostic::{Diagnostic, Source, Span};
use super::expr::{self, Env, NameKind, Scope, Type};
use crate::grid::Grid;

/// A parameter after overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub value: f64,
    /// The value the file gives, before any `--set`.
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
    pub order: OrderKind,
    pub steps: StepCount,
    pub steps_span: Span,
    pub diffusion: DiffusionRule,
    pub diffusion_span: Span,
    pub fts: Option<Fts>,
    pub cfg: Cfg,
    /// `None`: the schedule does not say (the model's default, else 1).
    pub temperature: Option<Expr>,
}

/// A checked schedule, ready to plan on any grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub source: Arc<Source>,
    pub params: Vec<Param>,
    /// The grid the file declares (`grid HxW`), if any.
    pub grid: Option<Grid>,
    pub partition: Option<Partition>,
    pub sets: Vec<NamedSet>,
    pub stages: Vec<Stage>,
    pub ramps: Vec<Ramp>,
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

/// The largest schedule file read (the presets are under 3 KB).
pub const MAX_SCHEDULE_BYTES: u64 = 1 << 20;

impl From<Diagnostic> for ScheduleError {
    fn from(d: Diagnostic) -> Self {
        ScheduleError::Invalid(Box::new(d))
    }
}

impl Schedule {
    /// A schedule that states a grid runs only on a model of that grid;
    /// one that states none adapts to any (partitions and conditions are
    /// relative to the grid).
    pub fn check_model_grid(&self, model: Grid, model_name: &str) -> Result<(), String> {
        match self.grid {
            Some(g) if g != model => Err(format!(
                "schedule {} states `grid {g}`, but model `{model_name}` has a {model} grid; remove the `grid` line to let the schedule adapt, or use a model of that grid",
                self.source.name
            )),
            _ => Ok(()),
        }
    }

    /// Parses and checks `text`; `name` is used in error messages.
    /// `overrides` replace parameter values (as `--set name=value` does).
    pub fn from_source(
        source: Arc<Source>,
        overrides: &BTreeMap<String, f64>,
    ) -> Result<Schedule, ScheduleError> {
        let ast = super::parser::parse(&source)?;
        compile(source, &ast, overrides)
    }

    /// Reads, parses and checks the schedule file at `path`.
    pub fn from_file(
        path: &std::path::Path,
        overrides: &BTreeMap<String, f64>,
    ) -> Result<Schedule, ScheduleError> {
        use std::io::Read;
        let stdin = path.as_os_str() == "-";
        let name = if stdin {
            "<stdin>".to_string()
        } else {
            path.display().to_string()
        };
        let read_err = |source| ScheduleError::Read {
            path: name.clone(),
            source,
        };
        let reader: Box<dyn Read> = if stdin {
            Box::new(std::io::stdin())
        } else {
            Box::new(std::fs::File::open(path).map_err(read_err)?)
        };
        let mut bytes = Vec::new();
        reader
            .take(MAX_SCHEDULE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        let text_err = |problem: String| ScheduleError::Text {
            path: name.clone(),
            problem,
        };
        if bytes.len() as u64 > MAX_SCHEDULE_BYTES {
            return Err(text_err(format!(
                "larger than {} KiB; a schedule is a small text file",
                MAX_SCHEDULE_BYTES / 1024
            )));
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            let before = &e.as_bytes()[..at];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let col = at
                - before
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |p| p + 1)
                + 1;
            text_err(format!(
                "not UTF-8 text (line {line}, byte {col} of the line)"
            ))
        })?;
        Schedule::from_source(Source::new(name, text), overrides)
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
    pub fn param_values(&self) -> HashMap<String, f64> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.value))
            .collect()
    }
}

/// Names visible at some point in the file.
struct Names<'a> {
    params: &'a [Param],
    partition: Option<&'a Partition>,
    sets: &'a [NamedSet],
    cells: bool,
    grid: bool,
    rest: bool,
}

impl<'a> Names<'a> {
    /// Only parameters: what `param` values and `checker(K)` may use.
    fn params_only(params: &'a [Param]) -> Self {
        Names {
            params,
            partition: None,
            sets: &[],
            cells: false,
            grid: false,
            rest: false,
        }
    }
}

impl Scope for Names<'_> {
    fn lookup(&self, name: &str) -> Option<NameKind> {
        if self.params.iter().any(|p| p.name == name) {
            return Some(NameKind::Param);
        }
        if self.grid && (name == "h" || name == "w") {
            return Some(NameKind::GridSize);
        }
        if self.cells {
            if name == "i" || name == "j" {
                return Some(NameKind::Cell);
            }
            if self.partition.and_then(|p| p.set_index(name)).is_some()
                || self.sets.iter().any(|s| s.name == name)
            {
                return Some(NameKind::Set);
            }
        }
        None
    }

    fn allows_rest(&self) -> bool {
        self.rest
    }

    fn describe(&self) -> String {
        let mut known: Vec<String> = self
            .params
            .iter()
            .map(|p| format!("`{}`", p.name))
            .collect();
        if self.grid {
            known.push("`h`, `w` (grid size)".into());
        }
        if self.cells {
            known.insert(0, "`i`, `j` (row, column)".into());
            if let Some(p) = self.partition {
                known.push(format!("`{}`..`{}`", p.set_name(1), p.set_name(p.levels)));
            }
            known.extend(self.sets.iter().map(|s| format!("`{}`", s.name)));
        }
        if known.is_empty() {
            "no names are defined here yet; declare one with `param name = value`".into()
        } else {
            format!("names that can be used here: {}", known.join(", "))
        }
    }
}

struct ParamEnv<'a>(&'a [Param]);

impl Env for ParamEnv<'_> {
    fn number(&self, name: &str) -> f64 {
        self.0
            .iter()
            .find(|p| p.name == name)
            .map_or(f64::NAN, |p| p.value)
    }
    fn condition(&self, _: &str) -> bool {
        false
    }
    fn rest(&self) -> bool {
        false
    }
}

const RESERVED: [&str; 4] = ["i", "j", "h", "w"];

/// Settings that are defaults at top level and overrides in a stage.
#[derive(Default)]
struct Settings<'a> {
    diffusion: Option<&'a DiffusionAst>,
    cfg: Option<&'a CfgAst>,
    temperature: Option<&'a Expr>,
}

fn compile(
    source: Arc<Source>,
    ast: &ScheduleAst,
    overrides: &BTreeMap<String, f64>,
) -> Result<Schedule, ScheduleError> {
    let src = &source;
    let mut params: Vec<Param> = Vec::new();
    let mut grid = None;
    let mut grid_span = None;
    let mut partition: Option<Partition> = None;
    let mut sets: Vec<NamedSet> = Vec::new();
    let mut defaults = Settings::default();
    let mut top_ramps: Vec<&DiffusionAst> = Vec::new();
    let mut stage_asts: Vec<&StageAst> = Vec::new();
    // Every name declared so far and where, to refuse duplicates.
    let mut declared: HashMap<String, Span> = HashMap::new();

    let mut declare = |ident: &Ident, what: &str| -> Result<(), Diagnostic> {
        if RESERVED.contains(&ident.name.as_str()) {
            return Err(Diagnostic::new(
                src,
                ident.span,
                format!(
                    "`{}` is reserved (i, j = row, column; h, w = grid size)",
                    ident.name
                ),
            )
            .with_help(format!("give the {what} another name")));
        }
        if let Some(prev) = declared.get(&ident.name) {
            let (line, _) = src.line_col(prev.start);
            return Err(Diagnostic::new(
                src,
                ident.span,
                format!("`{}` is already defined on line {line}", ident.name),
            )
            .with_help(format!("give the {what} another name")));
        }
        declared.insert(ident.name.clone(), ident.span);
        Ok(())
    };

    for item in &ast.items {
        match item {
            Item::Param { name, value } => {
                declare(name, "parameter")?;
                let scope = Names::params_only(&params);
                expr::check(src, value, Type::Number, &scope)?;
                let default = expr::number(value, &ParamEnv(&params));
                let (value, overridden) = match overrides.get(&name.name) {
                    Some(v) => (*v, true),
                    None => (default, false),
                };
                params.push(Param {
                    name: name.name.clone(),
                    value,
                    default,
                    overridden,
                    span: name.span,
                });
            }
            Item::Grid {
                height,
                width,
                span,
            } => {
                if let Some(prev) = grid_span {
                    return Err(twice(src, *span, prev, "grid").into());
                }
                grid = Some(Grid::new(*height, *width));
                grid_span = Some(*span);
            }
            Item::Partition {
                levels,
                prefix,
                span,
            } => {
                if let Some(p) = &partition {
                    return Err(twice(src, *span, p.span, "partition").into());
                }
                let scope = Names::params_only(&params);
                expr::check(src, levels, Type::Number, &scope)?;
                let k = expr::number(levels, &ParamEnv(&params));
                if k.fract() != 0.0 || !(1.0..=16.0).contains(&k) {
                    return Err(Diagnostic::new(
                        src,
                        levels.span,
                        format!("checker({k}) needs a whole number of stages K from 1 to 16"),
                    )
                    .with_help("GtR uses K = 3 for 16×16 tokens and K = 4 for 32×32")
                    .into());
                }
                let prefix_name = prefix.as_ref().map_or("S".to_string(), |p| p.name.clone());
                let part = Partition {
                    levels: k as usize,
                    prefix: prefix_name.clone(),
                    span: *span,
                };
                for n in 1..=part.levels {
                    let ident = Ident {
                        name: part.set_name(n),
                        span: prefix.as_ref().map_or(*span, |p| p.span),
                    };
                    declare(&ident, "partition")?;
                }
                partition = Some(part);
            }
            Item::Set { name, cells } => {
                declare(name, "set")?;
                let scope = Names {
                    params: &params,
                    partition: partition.as_ref(),
                    sets: &sets,
                    cells: true,
                    grid: true,
                    rest: false,
                };
                expr::check(src, cells, Type::Condition, &scope)?;
                sets.push(NamedSet {
                    name: name.name.clone(),
                    cells: cells.clone(),
                });
            }
            Item::Setting(setting) => match setting {
                Setting::Diffusion(d) => {
                    if matches!(d.kind, DiffusionKind::Ramp { .. }) {
                        top_ramps.push(d);
                    } else if let Some(prev) = defaults.diffusion {
                        return Err(twice(src, d.span, prev.span, "diffusion").into());
                    } else {
                        defaults.diffusion = Some(d);
                    }
                }
                Setting::Cfg(c) => {
                    if let Some(prev) = defaults.cfg {
                        return Err(twice(src, c.span, prev.span, "cfg").into());
                    }
                    defaults.cfg = Some(c);
                }
                Setting::Temperature(t) => {
                    if let Some(prev) = defaults.temperature {
                        return Err(twice(src, t.span, prev.span, "temperature").into());
                    }
                    defaults.temperature = Some(t);
                }
            },
            Item::Stage(stage) => {
                declare(&stage.name, "stage")?;
                stage_asts.push(stage);
            }
        }
    }

    for name in overrides.keys() {
        if !params.iter().any(|p| &p.name == name) {
            let known: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
            return Err(ScheduleError::Override {
                name: name.clone(),
                problem: if known.is_empty() {
                    format!("{} declares no parameters", src.name)
                } else {
                    format!(
                        "{} has no parameter `{name}`; its parameters are {}",
                        src.name,
                        known.join(", ")
                    )
                },
            });
        }
    }

    if stage_asts.is_empty() {
        let end = src.text.len();
        return Err(Diagnostic::new(src, Span::new(end, end), "this schedule has no stages")
            .with_help("add one, e.g. `stage all_tokens { tokens all  order random  steps 64 cosine }`")
            .into());
    }

    let numbers = Names {
        params: &params,
        partition: None,
        sets: &[],
        cells: false,
        grid: true,
        rest: false,
    };
    let cells = Names {
        params: &params,
        partition: partition.as_ref(),
        sets: &sets,
        cells: true,
        grid: true,
        rest: true,
    };
    let stage_index = |ident: &Ident| -> Result<usize, Diagnostic> {
        stage_asts
            .iter()
            .position(|s| s.name.name == ident.name)
            .ok_or_else(|| {
                let names: Vec<String> = stage_asts
                    .iter()
                    .map(|s| format!("`{}`", s.name.name))
                    .collect();
                Diagnostic::new(
                    src,
                    ident.span,
                    format!("no stage is named `{}`", ident.name),
                )
                .with_help(format!("the stages are {}", names.join(", ")))
            })
    };

    // Ramps, each covering a run of stages; a stage may be under at most one.
    let mut ramps: Vec<Ramp> = Vec::new();
    let mut ramp_of_stage: Vec<Option<usize>> = vec![None; stage_asts.len()];
    let mut add_ramp = |d: &DiffusionAst, own: Option<usize>| -> Result<usize, Diagnostic> {
        let DiffusionKind::Ramp {
            shape,
            from,
            to,
            rounding,
            across,
        } = &d.kind
        else {
            unreachable!("only ramps are added");
        };
        expr::check(src, from, Type::Number, &numbers)?;
        expr::check(src, to, Type::Number, &numbers)?;
        let range = match (across, own) {
            (Some((a, b)), _) => {
                let (first, last) = (stage_index(a)?, stage_index(b)?);
                if first > last {
                    return Err(Diagnostic::new(
                        src,
                        a.span.to(b.span),
                        format!("`{}` comes after `{}`", a.name, b.name),
                    )
                    .with_help(format!(
                        "write the range in stage order: `across {}..{}`",
                        b.name, a.name
                    )));
                }
                if let Some(s) = own.filter(|s| !(first..=last).contains(s)) {
                    return Err(Diagnostic::new(
                        src,
                        a.span.to(b.span),
                        format!(
                            "stage `{}` is not in the range it gives",
                            stage_asts[s].name.name
                        ),
                    )
                    .with_help("a ramp written inside a stage must span that stage"));
                }
                (first, last)
            }
            (None, Some(s)) => (s, s),
            (None, None) => (0, stage_asts.len() - 1),
        };
        let id = ramps.len();
        for s in range.0..=range.1 {
            if let Some(other) = ramp_of_stage[s] {
                let (line, _) = src.line_col(ramps[other].span.start);
                return Err(Diagnostic::new(
                    src,
                    d.span,
                    format!(
                        "stage `{}` already gets its diffusion steps from the ramp on line {line}",
                        stage_asts[s].name.name
                    ),
                )
                .with_help(
                    "each stage follows one diffusion rule; narrow one of the `across` ranges",
                ));
            }
            ramp_of_stage[s] = Some(id);
        }
        ramps.push(Ramp {
            shape: *shape,
            from: from.clone(),
            to: to.clone(),
            rounding: *rounding,
            stages: range,
            span: d.span,
        });
        Ok(id)
    };
    for d in &top_ramps {
        add_ramp(d, None)?;
    }
    // Ramps written inside a stage (the first diffusion clause of each), so
    // that a ramp over later stages is known before those stages are read.
    for (index, stage) in stage_asts.iter().enumerate() {
        let first = stage.clauses.iter().find_map(|c| match c {
            StageClause::Setting(Setting::Diffusion(d)) => Some(d),
            _ => None,
        });
        if let Some(d) = first.filter(|d| matches!(d.kind, DiffusionKind::Ramp { .. })) {
            add_ramp(d, Some(index))?;
        }
    }

    let mut stages = Vec::new();
    for (index, ast) in stage_asts.iter().enumerate() {
        let mut tokens = None;
        let mut order = None;
        let mut steps: Option<&StepCountAst> = None;
        let mut fts = None;
        let mut own = Settings::default();
        let mut seen: HashMap<&'static str, Span> = HashMap::new();
        for clause in &ast.clauses {
            let key = match clause {
                StageClause::Steps(_) => "steps",
                c => c.keyword(),
            };
            let span = clause_span(clause);
            if let Some(prev) = seen.get(key) {
                let msg = if key == "steps" {
                    "a stage takes one `steps` or `rate` clause".to_string()
                } else {
                    format!("`{key}` is given twice in stage `{}`", ast.name.name)
                };
                let (line, _) = src.line_col(prev.start);
                return Err(Diagnostic::new(src, span, msg)
                    .with_help(format!("keep one; the other is on line {line}"))
                    .into());
            }
            seen.insert(key, span);
            match clause {
                StageClause::Tokens(e) => {
                    expr::check(src, e, Type::Condition, &cells)?;
                    tokens = Some(e.clone());
                }
                StageClause::Order(o) => order = Some(o.kind),
                StageClause::Steps(s) => steps = Some(s),
                StageClause::Fts(f) => {
                    if f.fraction.is_some() && f.selector == Selector::All {
                        return Err(Diagnostic::new(
                            src,
                            f.span,
                            "`by all` ranks nothing, so a fraction of the tokens cannot be chosen by it",
                        )
                        .with_help("write `fts all -> N` to enhance every token, or pick a selector: `high_freq`, `low_freq` or `random`")
                        .into());
                    }
                    if let Some(fr) = &f.fraction {
                        expr::check(src, fr, Type::Number, &numbers)?;
                    }
                    expr::check(src, &f.steps, Type::Number, &numbers)?;
                    fts = Some(Fts {
                        fraction: f.fraction.clone().unwrap_or(Expr {
                            kind: ExprKind::Number(1.0),
                            span: f.span,
                        }),
                        selector: f.selector,
                        steps: f.steps.clone(),
                        span: f.span,
                    });
                }
                StageClause::Setting(Setting::Diffusion(d)) => own.diffusion = Some(d),
                StageClause::Setting(Setting::Cfg(c)) => own.cfg = Some(c),
                StageClause::Setting(Setting::Temperature(t)) => own.temperature = Some(t),
            }
        }
        let tokens = tokens.ok_or_else(|| {
            Diagnostic::new(src, ast.name.span, format!("stage `{}` does not say which tokens it takes", ast.name.name))
                .with_help("add `tokens rest` (what earlier stages left), `tokens all`, or a condition such as `tokens S1`")
        })?;
        let steps_ast = steps.ok_or_else(|| {
            Diagnostic::new(src, ast.name.span, format!("stage `{}` does not say how many steps it takes", ast.name.name))
                .with_help("add `steps 8` (a count), `rate 4` (tokens per step) or `steps [1, 2, 5]` (tokens per step, listed)")
        })?;
        let step_count = match &steps_ast.count {
            StepCountKind::Steps(e, d) => {
                expr::check(src, e, Type::Number, &numbers)?;
                StepCount::Steps(e.clone(), *d)
            }
            StepCountKind::Rate(e, d) => {
                expr::check(src, e, Type::Number, &numbers)?;
                StepCount::Rate(e.clone(), *d)
            }
            StepCountKind::List(list) => {
                check_list(src, list, &numbers, steps_ast.span)?;
                StepCount::List(list.clone())
            }
        };

        let (diffusion, diffusion_span) = match (own.diffusion, ramp_of_stage[index]) {
            (Some(d), Some(r)) if matches!(d.kind, DiffusionKind::Ramp { .. }) => {
                (DiffusionRule::Ramp(r), d.span)
            }
            (Some(d), Some(r)) => {
                let (line, _) = src.line_col(ramps[r].span.start);
                return Err(Diagnostic::new(
                    src,
                    d.span,
                    format!(
                        "stage `{}` already gets its diffusion steps from the ramp on line {line}",
                        ast.name.name
                    ),
                )
                .with_help("remove this clause, or narrow the other ramp's `across` range")
                .into());
            }
            (Some(d), None) => (fixed_diffusion(src, d, &numbers)?, d.span),
            (None, Some(r)) => (DiffusionRule::Ramp(r), ramps[r].span),
            (None, None) => match defaults.diffusion {
                Some(d) => (fixed_diffusion(src, d, &numbers)?, d.span),
                None => (
                    DiffusionRule::Constant(Expr {
                        kind: ExprKind::Number(DEFAULT_DIFFUSION_STEPS),
                        span: ast.name.span,
                    }),
                    ast.name.span,
                ),
            },
        };

        let cfg = match own.cfg.or(defaults.cfg) {
            None => Cfg::Unset,
            Some(c) => match &c.kind {
                CfgKind::None => Cfg::None,
                CfgKind::Constant(e) => {
                    expr::check(src, e, Type::Number, &numbers)?;
                    Cfg::Constant(e.clone())
                }
                CfgKind::Linear(e) => {
                    expr::check(src, e, Type::Number, &numbers)?;
                    Cfg::Linear(e.clone())
                }
            },
        };
        let temperature = match own.temperature.or(defaults.temperature) {
            Some(t) => {
                expr::check(src, t, Type::Number, &numbers)?;
                Some(t.clone())
            }
            None => None,
        };

        stages.push(Stage {
            name: ast.name.name.clone(),
            span: ast.span,
            name_span: ast.name.span,
            tokens,
            order: order.unwrap_or(OrderKind::Random),
            steps: step_count,
            steps_span: steps_ast.span,
            diffusion,
            diffusion_span,
            fts,
            cfg,
            temperature,
        });
    }

    Ok(Schedule {
        source,
        params,
        grid,
        partition,
        sets,
        stages,
        ramps,
    })
}

/// A constant or per-step diffusion clause, checked (ramps are resolved
/// before the stages are read).
fn fixed_diffusion(
    src: &Arc<Source>,
    d: &DiffusionAst,
    numbers: &dyn Scope,
) -> Result<DiffusionRule, Diagnostic> {
    match &d.kind {
        DiffusionKind::Constant(e) => {
            expr::check(src, e, Type::Number, numbers)?;
            Ok(DiffusionRule::Constant(e.clone()))
        }
        DiffusionKind::List(list) => {
            check_list(src, list, numbers, d.span)?;
            Ok(DiffusionRule::List(list.clone()))
        }
        DiffusionKind::Ramp { .. } => unreachable!("ramps are resolved before the stages"),
    }
}

/// MAR's `num_sampling_steps` default, used when a schedule gives none.
pub const DEFAULT_DIFFUSION_STEPS: f64 = 100.0;

fn check_list(
    src: &Arc<Source>,
    list: &[Expr],
    scope: &dyn Scope,
    span: Span,
) -> Result<(), Diagnostic> {
    if list.is_empty() {
        return Err(
            Diagnostic::new(src, span, "this list is empty").with_help("give one number per step")
        );
    }
    list.iter()
        .try_for_each(|e| expr::check(src, e, Type::Number, scope))
}

fn twice(src: &Arc<Source>, span: Span, prev: Span, what: &str) -> Diagnostic {
    let (line, _) = src.line_col(prev.start);
    Diagnostic::new(src, span, format!("`{what}` is given twice at top level"))
        .with_help(format!("keep one; the other is on line {line}"))
}

fn clause_span(clause: &StageClause) -> Span {
    match clause {
        StageClause::Tokens(e) => e.span,
        StageClause::Order(o) => o.span,
        StageClause::Steps(s) => s.span,
        StageClause::Fts(f) => f.span,
        StageClause::Setting(Setting::Diffusion(d)) => d.span,
        StageClause::Setting(Setting::Cfg(c)) => c.span,
        StageClause::Setting(Setting::Temperature(t)) => t.span,
    }
}

//! Text or file → [`ScheduleAst`] → validated [`Schedule`]: names resolved, types checked,
//! clauses present once, parameter overrides applied.
//!
//! What depends on the grid (token counts, coverage) is checked by the
//! planner, which still has every span to point at.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::ast::*;
use super::diagnostic::{Diagnostic, Source, Span, quoted};
use super::expr::{self, Env, NameKind, Scope, Type};
use super::text::{SmallTextError, read_small_text, read_small_text_file};
use super::validated::*;
use crate::grid::Grid;

impl Schedule {
    /// Parses and checks `text` (at most [`super::MAX_SCHEDULE_BYTES`]);
    /// `name` is used in error messages.
    /// `overrides` replace parameter values (as `--set name=value` does).
    pub fn from_source(
        source: Arc<Source>,
        overrides: &BTreeMap<String, f64>,
    ) -> Result<Schedule, ScheduleError> {
        // Text given as text (the Python API) has the file's limit too.
        if let Some(problem) = super::text::too_large(source.text.len(), "a schedule") {
            return Err(ScheduleError::Text {
                path: source.name.clone(),
                problem,
            });
        }
        let ast = super::parser::parse(&source)?;
        compile(source, &ast, overrides)
    }

    /// Reads, parses and checks the schedule file at `path`; `-` reads
    /// standard input (named `<stdin>`, its relative paths read from the
    /// current directory).
    pub fn from_file(
        path: &std::path::Path,
        overrides: &BTreeMap<String, f64>,
    ) -> Result<Schedule, ScheduleError> {
        let stdin = path.as_os_str() == "-";
        let name = if stdin {
            "<stdin>".to_string()
        } else {
            path.display().to_string()
        };
        let text = if stdin {
            read_small_text(std::io::stdin(), "a schedule")
        } else {
            read_small_text_file(path, "a schedule")
        };
        let text = text.map_err(|e| match e {
            SmallTextError::Io(source) => ScheduleError::Read {
                path: name.clone(),
                source,
            },
            SmallTextError::Text(problem) => ScheduleError::Text {
                path: name.clone(),
                problem,
            },
        })?;
        Schedule::from_source(Source::new(name, text), overrides)
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
    /// Whether token sets may be used (a token condition), rather than
    /// numbers only.
    sets_usable: bool,
    /// Every name the file declares, to say why one cannot be used here.
    file: &'a FileNames,
}

impl<'a> Names<'a> {
    /// Only parameters: what `param` values and `checker(K)` may use.
    fn params_only(params: &'a [Param], file: &'a FileNames) -> Self {
        Names {
            params,
            partition: None,
            sets: &[],
            cells: false,
            grid: false,
            rest: false,
            sets_usable: false,
            file,
        }
    }
}

/// Every name a file declares, read before anything is checked: what it
/// is and where, and the partition's set prefix.
#[derive(Default)]
struct FileNames {
    declared: HashMap<String, (Declared, Span)>,
    /// The partition's set prefix (`S`, or its `as` name) and where it is.
    partition: Option<(String, Span)>,
}

/// What a name the file declares is.
#[derive(Clone, Copy)]
enum Declared {
    Parameter,
    TokenSet,
    /// `S1`…`SK` of `partition checker(K)` (or its `as` prefix).
    PartitionSet,
    Stage,
}

impl Declared {
    /// The kind with its article, for messages.
    fn a(self) -> &'static str {
        match self {
            Declared::Parameter => "a parameter",
            Declared::TokenSet => "a token set",
            Declared::PartitionSet => "a set of the partition",
            Declared::Stage => "a stage's name",
        }
    }
}

impl FileNames {
    fn read(ast: &ScheduleAst) -> Self {
        let mut file = FileNames::default();
        for item in &ast.items {
            let (ident, what) = match item {
                Item::Param { name, .. } => (name, Declared::Parameter),
                Item::Set { name, .. } => (name, Declared::TokenSet),
                Item::Stage(stage) => (&stage.name, Declared::Stage),
                Item::Partition { prefix, span, .. } => {
                    let prefix = prefix.as_ref().map_or("S".into(), |p| p.name.clone());
                    file.partition = Some((prefix, *span));
                    continue;
                }
                _ => continue,
            };
            // The first declaration (a second is refused on its own).
            file.declared
                .entry(ident.name.clone())
                .or_insert((what, ident.span));
        }
        file
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

    fn misuse(&self, source: &Source, name: &str, at: Span) -> Option<String> {
        let partition_set = self.file.partition.as_ref().filter(|(prefix, _)| {
            name.strip_prefix(prefix.as_str())
                .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
        });
        let (what, span) = match (partition_set, self.file.declared.get(name)) {
            (Some(&(_, span)), _) => (Declared::PartitionSet, span),
            (None, Some(&declared)) => declared,
            (None, None) => return None,
        };
        let (line, _) = source.line_col(span.start);
        let not_a_number = "it is used in a token condition (`tokens`, `set`), not as a number";
        Some(match what {
            Declared::Stage => {
                format!("`{name}` is a stage's name (line {line}), which is not a value")
            }
            Declared::TokenSet if !self.sets_usable => {
                format!("`{name}` is a token set (line {line}): {not_a_number}")
            }
            Declared::PartitionSet if !self.sets_usable => {
                format!("`{name}` is a set of the partition (line {line}): {not_a_number}")
            }
            // Of a kind usable here, yet not found: declared below (a
            // partition set above that is not found is out of its range).
            _ if span.start > at.start => format!(
                "`{name}` is {} declared on line {line}, below its use here: a declaration may use only the names declared above it",
                what.a()
            ),
            _ => return None,
        })
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
    clip_timesteps: Option<&'a Expr>,
}

/// Builds the schedule the syntax tree `ast` of `source` describes: checks
/// it and applies `overrides` (`--set`), one pass after another
/// (declarations, overrides, ramps, then each stage).
/// [`compile_with`], its errors noting the `overrides` given.
pub(super) fn compile(
    source: Arc<Source>,
    ast: &ScheduleAst,
    overrides: &BTreeMap<String, f64>,
) -> Result<Schedule, ScheduleError> {
    compile_with(source, ast, overrides).map_err(|e| match e {
        ScheduleError::Invalid(d) => ScheduleError::Invalid(Box::new(
            d.with_set_params(overrides.iter().map(|(k, &v)| (k.as_str(), v))),
        )),
        e => e,
    })
}

fn compile_with(
    source: Arc<Source>,
    ast: &ScheduleAst,
    overrides: &BTreeMap<String, f64>,
) -> Result<Schedule, ScheduleError> {
    let src = &source;
    let decls = Declarations::read(src, ast, overrides)?;
    check_overrides(src, &decls.params, overrides)?;
    let defaults = decls.compile_defaults(src)?;
    if decls.stages.is_empty() {
        let end = src.text.len();
        return Err(Diagnostic::new(src, Span::new(end, end), "this schedule has no stages")
            .with_help("add one, e.g. `stage all_tokens { tokens all  order random  steps 64 cosine }`")
            .into());
    }
    let ramps = RampTable::build(src, &decls)?;
    let stages = decls
        .stages
        .iter()
        .enumerate()
        .map(|(index, ast)| compile_stage(src, &decls, &ramps, index, ast))
        .collect::<Result<Vec<_>, _>>()?;
    let Declarations {
        params,
        grid,
        partition,
        sets,
        ..
    } = decls;
    Ok(Schedule {
        source,
        params,
        grid: grid.map(|(g, _)| g),
        grid_span: grid.map(|(_, span)| span),
        partition,
        sets,
        stages,
        ramps: ramps.ramps,
        defaults,
    })
}

/// Pass 1: the declarations, in file order (parameters with overrides
/// applied, grid, partition, sets, top-level settings), and the stages
/// collected for the later passes.
struct Declarations<'a> {
    params: Vec<Param>,
    grid: Option<(Grid, Span)>,
    partition: Option<Partition>,
    sets: Vec<NamedSet>,
    defaults: Settings<'a>,
    top_ramps: Vec<&'a DiffusionAst>,
    stages: Vec<&'a StageAst>,
    /// Every name declared so far and where, to refuse duplicates.
    declared: HashMap<String, Span>,
    /// Every name the file declares, above or below.
    file: FileNames,
}

impl<'a> Declarations<'a> {
    fn read(
        src: &Arc<Source>,
        ast: &'a ScheduleAst,
        overrides: &BTreeMap<String, f64>,
    ) -> Result<Self, Diagnostic> {
        let mut d = Declarations {
            params: Vec::new(),
            grid: None,
            partition: None,
            sets: Vec::new(),
            defaults: Settings::default(),
            top_ramps: Vec::new(),
            stages: Vec::new(),
            declared: HashMap::new(),
            file: FileNames::read(ast),
        };
        for item in &ast.items {
            match item {
                Item::Param { name, value } => d.param(src, name, value, overrides)?,
                Item::Grid {
                    height,
                    width,
                    span,
                } => {
                    if let Some((_, prev)) = d.grid {
                        return Err(twice(src, *span, prev, "grid"));
                    }
                    d.grid = Some((Grid::new(*height, *width), *span));
                }
                Item::Partition {
                    levels,
                    prefix,
                    span,
                } => d.partition(src, levels, prefix.as_ref(), *span)?,
                Item::Set { name, cells } => d.set(src, name, cells)?,
                Item::Setting(setting) => d.setting(src, setting)?,
                Item::Stage(stage) => {
                    d.declare(src, &stage.name, "stage")?;
                    d.stages.push(stage);
                }
            }
        }
        Ok(d)
    }

    /// Refuses reserved and already declared names.
    fn declare(&mut self, src: &Arc<Source>, ident: &Ident, what: &str) -> Result<(), Diagnostic> {
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
        if let Some(prev) = self.declared.get(&ident.name) {
            let (line, _) = src.line_col(prev.start);
            return Err(Diagnostic::new(
                src,
                ident.span,
                format!("`{}` is already defined on line {line}", ident.name),
            )
            .with_help(format!("give the {what} another name")));
        }
        self.declared.insert(ident.name.clone(), ident.span);
        Ok(())
    }

    fn param(
        &mut self,
        src: &Arc<Source>,
        name: &Ident,
        value: &Expr,
        overrides: &BTreeMap<String, f64>,
    ) -> Result<(), Diagnostic> {
        self.declare(src, name, "parameter")?;
        expr::check(
            src,
            value,
            Type::Number,
            &Names::params_only(&self.params, &self.file),
        )?;
        let default = expr::number(value, &ParamEnv(&self.params));
        // A parameter --set replaces keeps its value whatever the file's
        // expression gives with the other values (§4).
        if !default.is_finite() && !overrides.contains_key(&name.name) {
            // `5 % 0`, `1 // 0`: every later use would plan with NaN or inf.
            return Err(Diagnostic::new(
                src,
                value.span,
                format!(
                    "parameter `{}` comes out as {default}; a parameter must be a finite number",
                    name.name
                ),
            )
            .with_help(if overrides.is_empty() {
                "check for a division or remainder by zero, or a value too large"
            } else {
                "check for a division or remainder by zero (with the values --set gave), or a value too large"
            }));
        }
        let (value, overridden) = match overrides.get(&name.name) {
            Some(v) => (*v, true),
            None => (default, false),
        };
        self.params.push(Param {
            name: name.name.clone(),
            value,
            default,
            overridden,
            span: name.span,
        });
        Ok(())
    }

    fn partition(
        &mut self,
        src: &Arc<Source>,
        levels: &Expr,
        prefix: Option<&Ident>,
        span: Span,
    ) -> Result<(), Diagnostic> {
        if let Some(p) = &self.partition {
            return Err(twice(src, span, p.span, "partition"));
        }
        expr::check(
            src,
            levels,
            Type::Number,
            &Names::params_only(&self.params, &self.file),
        )?;
        let k = expr::number(levels, &ParamEnv(&self.params));
        if k.fract() != 0.0 || !(1.0..=16.0).contains(&k) {
            return Err(Diagnostic::new(
                src,
                levels.span,
                format!("checker({k}) needs a whole number of stages K from 1 to 16"),
            )
            .with_help("GtR uses K = 3 for 16×16 tokens and K = 4 for 32×32"));
        }
        let part = Partition {
            levels: k as usize,
            prefix: prefix.map_or("S".to_string(), |p| p.name.clone()),
            span,
        };
        for n in 1..=part.levels {
            let ident = Ident {
                name: part.set_name(n),
                span: prefix.map_or(span, |p| p.span),
            };
            self.declare(src, &ident, "partition").map_err(|d| {
                d.with_help(format!(
                    "the partition names its sets {}..{}: give them other names with `as`, e.g. `partition checker({}) as P` for P1..P{}, or rename the other",
                    part.set_name(1),
                    part.set_name(part.levels),
                    part.levels,
                    part.levels
                ))
            })?;
        }
        self.partition = Some(part);
        Ok(())
    }

    fn set(&mut self, src: &Arc<Source>, name: &Ident, cells: &Expr) -> Result<(), Diagnostic> {
        self.declare(src, name, "set")?;
        let scope = Names {
            rest: false,
            ..self.cells()
        };
        expr::check(src, cells, Type::Condition, &scope)?;
        self.sets.push(NamedSet {
            name: name.name.clone(),
            cells: cells.clone(),
        });
        Ok(())
    }

    /// A top-level setting: a default for every stage, or a ramp.
    fn setting(&mut self, src: &Arc<Source>, setting: &'a Setting) -> Result<(), Diagnostic> {
        match setting {
            Setting::Diffusion(d) if matches!(d.kind, DiffusionKind::Ramp { .. }) => {
                self.top_ramps.push(d);
            }
            Setting::Diffusion(d) => {
                if let Some(prev) = self.defaults.diffusion {
                    return Err(twice(src, d.span, prev.span, "diffusion"));
                }
                self.defaults.diffusion = Some(d);
            }
            Setting::Cfg(c) => {
                if let Some(prev) = self.defaults.cfg {
                    return Err(twice(src, c.span, prev.span, "cfg"));
                }
                self.defaults.cfg = Some(c);
            }
            Setting::Temperature(t) => {
                if let Some(prev) = self.defaults.temperature {
                    return Err(twice(src, t.span, prev.span, "temperature"));
                }
                self.defaults.temperature = Some(t);
            }
            Setting::ClipTimesteps(t) => {
                if let Some(prev) = self.defaults.clip_timesteps {
                    return Err(twice(src, t.span, prev.span, "clip_timesteps"));
                }
                self.defaults.clip_timesteps = Some(t);
            }
        }
        Ok(())
    }

    /// What numbers in stage and setting clauses may use: parameters and
    /// the grid size.
    fn numbers(&self) -> Names<'_> {
        Names {
            params: &self.params,
            partition: None,
            sets: &[],
            cells: false,
            grid: true,
            rest: false,
            sets_usable: false,
            file: &self.file,
        }
    }

    /// The top-level settings, their names and types checked once the
    /// whole file's parameters are known, whether or not a stage inherits
    /// them (every stage may override them all); the planner checks their
    /// values.
    fn compile_defaults(&self, src: &Arc<Source>) -> Result<Defaults, Diagnostic> {
        let numbers = self.numbers();
        let number = |e: Option<&Expr>| -> Result<Option<Expr>, Diagnostic> {
            e.map(|e| expr::check(src, e, Type::Number, &numbers).map(|()| e.clone()))
                .transpose()
        };
        Ok(Defaults {
            diffusion: self
                .defaults
                .diffusion
                .map(|d| fixed_diffusion(src, d, &numbers))
                .transpose()?,
            cfg: compile_cfg(src, self.defaults.cfg, &numbers)?,
            temperature: number(self.defaults.temperature)?,
            clip_timesteps: number(self.defaults.clip_timesteps)?,
        })
    }

    /// What an `order by` key may use: parameters, the grid size and the
    /// cell.
    fn cell_numbers(&self) -> Names<'_> {
        Names {
            cells: true,
            ..self.numbers()
        }
    }

    /// What a stage's `tokens` may use: everything declared, cells and `rest`.
    fn cells(&self) -> Names<'_> {
        Names {
            params: &self.params,
            partition: self.partition.as_ref(),
            sets: &self.sets,
            cells: true,
            grid: true,
            rest: true,
            sets_usable: true,
            file: &self.file,
        }
    }

    /// The index of the stage `ident` names.
    fn stage_index(&self, src: &Arc<Source>, ident: &Ident) -> Result<usize, Diagnostic> {
        self.stages
            .iter()
            .position(|s| s.name.name == ident.name)
            .ok_or_else(|| {
                let names: Vec<String> = self
                    .stages
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
    }
}

/// Pass 2: every `--set` names a parameter of the file.
fn check_overrides(
    src: &Arc<Source>,
    params: &[Param],
    overrides: &BTreeMap<String, f64>,
) -> Result<(), ScheduleError> {
    let Some(name) = overrides
        .keys()
        .find(|name| !params.iter().any(|p| &p.name == *name))
    else {
        return Ok(());
    };
    let known: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
    Err(ScheduleError::Override {
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
    })
}

/// Pass 3: the diffusion ramps, each covering a run of stages; a stage may
/// be under at most one.
struct RampTable {
    ramps: Vec<Ramp>,
    of_stage: Vec<Option<usize>>,
}

impl RampTable {
    /// Top-level ramps first, then those written inside a stage (the first
    /// diffusion clause of each), so that a ramp over later stages is known
    /// before those stages are read.
    fn build(src: &Arc<Source>, decls: &Declarations) -> Result<Self, Diagnostic> {
        let mut table = RampTable {
            ramps: Vec::new(),
            of_stage: vec![None; decls.stages.len()],
        };
        for d in &decls.top_ramps {
            table.add(src, decls, d, None)?;
        }
        for (index, stage) in decls.stages.iter().enumerate() {
            let first = stage.clauses.iter().find_map(|c| match c {
                StageClause::Setting(Setting::Diffusion(d)) => Some(d),
                _ => None,
            });
            if let Some(d) = first.filter(|d| matches!(d.kind, DiffusionKind::Ramp { .. })) {
                table.add(src, decls, d, Some(index))?;
            }
        }
        Ok(table)
    }

    fn add(
        &mut self,
        src: &Arc<Source>,
        decls: &Declarations,
        d: &DiffusionAst,
        own: Option<usize>,
    ) -> Result<usize, Diagnostic> {
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
        expr::check(src, from, Type::Number, &decls.numbers())?;
        expr::check(src, to, Type::Number, &decls.numbers())?;
        let range = match (across, own) {
            (Some((a, b)), _) => ramp_range(src, decls, a, b, own)?,
            (None, Some(s)) => (s, s),
            (None, None) => (0, decls.stages.len() - 1),
        };
        let id = self.ramps.len();
        for s in range.0..=range.1 {
            if let Some(other) = self.of_stage[s] {
                let stage = &decls.stages[s].name.name;
                return Err(
                    ramped_twice(src, &self.ramps[other], d.span, stage).with_help(
                        "each stage follows one diffusion rule; narrow one of the `across` ranges",
                    ),
                );
            }
            self.of_stage[s] = Some(id);
        }
        self.ramps.push(Ramp {
            shape: *shape,
            from: from.clone(),
            to: to.clone(),
            rounding: *rounding,
            stages: range,
            span: d.span,
        });
        Ok(id)
    }
}

/// A second diffusion rule (at `span`) for `stage`, which `ramp` covers.
fn ramped_twice(src: &Arc<Source>, ramp: &Ramp, span: Span, stage: &str) -> Diagnostic {
    let (line, _) = src.line_col(ramp.span.start);
    Diagnostic::new(
        src,
        span,
        format!("stage `{stage}` already gets its diffusion steps from the ramp on line {line}"),
    )
}

/// The stages `across a..b` covers; a ramp written in stage `own` must
/// cover it.
fn ramp_range(
    src: &Arc<Source>,
    decls: &Declarations,
    a: &Ident,
    b: &Ident,
    own: Option<usize>,
) -> Result<(usize, usize), Diagnostic> {
    let (first, last) = (decls.stage_index(src, a)?, decls.stage_index(src, b)?);
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
                decls.stages[s].name.name
            ),
        )
        .with_help("a ramp written inside a stage must span that stage"));
    }
    Ok((first, last))
}

/// A stage's clauses, each present at most once.
#[derive(Default)]
struct StageClauses<'a> {
    tokens: Option<&'a Expr>,
    order: Option<&'a OrderAst>,
    steps: Option<&'a StepCountAst>,
    fts: Option<Fts>,
    own: Settings<'a>,
}

impl<'a> StageClauses<'a> {
    /// Sorts the clauses of `ast`, refusing one written twice; `tokens` and
    /// `fts` are checked as they come.
    fn collect(
        src: &Arc<Source>,
        decls: &Declarations,
        ast: &'a StageAst,
    ) -> Result<Self, Diagnostic> {
        let mut c = StageClauses::default();
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
                    .with_help(format!("keep one; the other is on line {line}")));
            }
            seen.insert(key, span);
            match clause {
                StageClause::Tokens(e) => {
                    expr::check(src, e, Type::Condition, &decls.cells())?;
                    c.tokens = Some(e);
                }
                StageClause::Order(o) => c.order = Some(o),
                StageClause::Steps(s) => c.steps = Some(s),
                StageClause::Fts(f) => c.fts = Some(compile_fts(src, f, &decls.numbers())?),
                StageClause::Setting(Setting::Diffusion(d)) => c.own.diffusion = Some(d),
                StageClause::Setting(Setting::Cfg(g)) => c.own.cfg = Some(g),
                StageClause::Setting(Setting::Temperature(t)) => c.own.temperature = Some(t),
                StageClause::Setting(Setting::ClipTimesteps(t)) => c.own.clip_timesteps = Some(t),
            }
        }
        Ok(c)
    }
}

/// Pass 4: one stage, its clauses checked and the file's defaults applied.
fn compile_stage(
    src: &Arc<Source>,
    decls: &Declarations,
    ramps: &RampTable,
    index: usize,
    ast: &StageAst,
) -> Result<Stage, Diagnostic> {
    let clauses = StageClauses::collect(src, decls, ast)?;
    let numbers = decls.numbers();
    let tokens = clauses.tokens.ok_or_else(|| {
        Diagnostic::new(src, ast.name.span, format!("stage `{}` does not say which tokens it takes", ast.name.name))
            .with_help("add `tokens rest` (what earlier stages left), `tokens all`, or a condition such as `tokens S1`")
    })?;
    let steps_ast = clauses.steps.ok_or_else(|| {
        Diagnostic::new(src, ast.name.span, format!("stage `{}` does not say how many steps it takes", ast.name.name))
            .with_help("add `steps 8` (a count), `rate 4` (tokens per step) or `steps [1, 2, 5]` (tokens per step, listed)")
    })?;
    let steps = step_count(src, steps_ast, &numbers)?;
    let order = match clauses.order {
        None => Order::Named(OrderKind::Random),
        Some(o) => compile_order(src, decls, o)?,
    };
    let (diffusion, diffusion_span) =
        stage_diffusion(src, decls, ramps, index, ast, clauses.own.diffusion)?;
    let cfg = compile_cfg(src, clauses.own.cfg.or(decls.defaults.cfg), &numbers)?;
    let temperature = clauses.own.temperature.or(decls.defaults.temperature);
    if let Some(t) = temperature {
        expr::check(src, t, Type::Number, &numbers)?;
    }
    let clip_timesteps = clauses.own.clip_timesteps.or(decls.defaults.clip_timesteps);
    if let Some(t) = clip_timesteps {
        expr::check(src, t, Type::Number, &numbers)?;
    }
    Ok(Stage {
        name: ast.name.name.clone(),
        span: ast.span,
        name_span: ast.name.span,
        tokens: tokens.clone(),
        order,
        order_span: clauses.order.map_or(ast.name.span, |o| o.span),
        steps,
        steps_span: steps_ast.span,
        diffusion,
        diffusion_span,
        fts: clauses.fts,
        cfg,
        temperature: temperature.cloned(),
        clip_timesteps: clip_timesteps.cloned(),
    })
}

/// A `cfg` clause, checked; [`Cfg::Unset`] for none.
fn compile_cfg(
    src: &Arc<Source>,
    cfg: Option<&CfgAst>,
    numbers: &dyn Scope,
) -> Result<Cfg, Diagnostic> {
    Ok(match cfg.map(|c| &c.kind) {
        None => Cfg::Unset,
        Some(CfgKind::None) => Cfg::None,
        Some(CfgKind::Constant(e)) => {
            expr::check(src, e, Type::Number, numbers)?;
            Cfg::Constant(e.clone())
        }
        Some(CfgKind::Linear(e)) => {
            expr::check(src, e, Type::Number, numbers)?;
            Cfg::Linear(e.clone())
        }
    })
}

fn step_count(
    src: &Arc<Source>,
    steps: &StepCountAst,
    numbers: &dyn Scope,
) -> Result<StepCount, Diagnostic> {
    Ok(match &steps.count {
        StepCountKind::Steps(e, d) => {
            expr::check(src, e, Type::Number, numbers)?;
            StepCount::Steps(e.clone(), *d)
        }
        StepCountKind::Rate(e, d) => {
            expr::check(src, e, Type::Number, numbers)?;
            StepCount::Rate(e.clone(), *d)
        }
        StepCountKind::List(list) => {
            check_list(src, list, numbers, steps.span)?;
            StepCount::List(list.clone())
        }
    })
}

fn compile_fts(src: &Arc<Source>, f: &FtsAst, numbers: &dyn Scope) -> Result<Fts, Diagnostic> {
    if f.fraction.is_some() && f.selector == Selector::All {
        return Err(Diagnostic::new(
            src,
            f.span,
            "`by all` ranks nothing, so a fraction of the tokens cannot be chosen by it",
        )
        .with_help("write `fts all -> N` to enhance every token, or pick a selector: `high_freq`, `low_freq` or `random`"));
    }
    if let Some(fr) = &f.fraction {
        expr::check(src, fr, Type::Number, numbers)?;
    }
    expr::check(src, &f.steps, Type::Number, numbers)?;
    Ok(Fts {
        fraction: f.fraction.clone().unwrap_or(Expr {
            kind: ExprKind::Number(1.0),
            span: f.span,
        }),
        selector: f.selector,
        steps: f.steps.clone(),
        span: f.span,
    })
}

/// The diffusion rule of stage `index`: its ramp, its own clause, the
/// top-level default, or MAR's 100 steps.
fn stage_diffusion(
    src: &Arc<Source>,
    decls: &Declarations,
    ramps: &RampTable,
    index: usize,
    ast: &StageAst,
    own: Option<&DiffusionAst>,
) -> Result<(DiffusionRule, Span), Diagnostic> {
    let numbers = decls.numbers();
    Ok(match (own, ramps.of_stage[index]) {
        (Some(d), Some(r)) if matches!(d.kind, DiffusionKind::Ramp { .. }) => {
            (DiffusionRule::Ramp(r), d.span)
        }
        (Some(d), Some(r)) => {
            return Err(ramped_twice(src, &ramps.ramps[r], d.span, &ast.name.name)
                .with_help("remove this clause, or narrow the other ramp's `across` range"));
        }
        (Some(d), None) => (fixed_diffusion(src, d, &numbers)?, d.span),
        (None, Some(r)) => (DiffusionRule::Ramp(r), ramps.ramps[r].span),
        (None, None) => match decls.defaults.diffusion {
            Some(d) => (fixed_diffusion(src, d, &numbers)?, d.span),
            None => (
                DiffusionRule::Constant(Expr {
                    kind: ExprKind::Number(DEFAULT_DIFFUSION_STEPS),
                    span: ast.name.span,
                }),
                ast.name.span,
            ),
        },
    })
}

fn compile_order(
    src: &Arc<Source>,
    decls: &Declarations,
    order: &OrderAst,
) -> Result<Order, Diagnostic> {
    Ok(match &order.rule {
        OrderRule::Named(kind) => Order::Named(*kind),
        OrderRule::By { key, ties } => {
            expr::check(src, key, Type::Number, &decls.cell_numbers())?;
            Order::By {
                key: key.clone(),
                ties: *ties,
            }
        }
        OrderRule::List(list) => {
            check_list(src, list, &decls.numbers(), order.span)?;
            Order::List(list.clone())
        }
        OrderRule::File { path, span } => read_order_file(src, path, *span)?,
        OrderRule::Adaptive(selector @ (Selector::HighFreq | Selector::LowFreq)) => {
            Order::Adaptive(*selector)
        }
        OrderRule::Adaptive(other) => {
            return Err(Diagnostic::new(
                src,
                order.span,
                format!(
                    "an adaptive order ranks tokens by their FTS score, so it takes `high_freq` or `low_freq`, not `{}`",
                    other.name()
                ),
            )
            .with_help("for a seeded random order write `order random`"));
        }
    })
}

/// Reads `order file "path"`: token indices separated by spaces, commas or
/// newlines, `#` comments. The path is relative to the schedule's folder
/// ([`Source::folder`]).
fn read_order_file(src: &Arc<Source>, path: &str, span: Span) -> Result<Order, Diagnostic> {
    let full = match src.folder() {
        Some(dir) if std::path::Path::new(path).is_relative() => dir.join(path),
        _ => std::path::PathBuf::from(path),
    };
    let path_shown = full.display().to_string();
    let shown = quoted(&path_shown);
    let help =
        "a relative path is read from the schedule's folder (the current directory for `plan -`)";
    let text = read_small_text_file(&full, "an order file").map_err(|e| {
        let problem = match e {
            SmallTextError::Io(err) => format!("cannot read order file `{shown}`: {err}"),
            SmallTextError::Text(p) => format!("order file `{shown}`: {p}"),
        };
        Diagnostic::new(src, span, problem).with_help(help)
    })?;
    super::diagnostic::refuse_lone_carriage_return(src, &text, Some((&shown, span)))?;
    let mut tokens = Vec::new();
    for (k, line) in text.lines().enumerate() {
        let code = line.split('#').next().unwrap_or("");
        for word in code.split(|c: char| c.is_whitespace() || c == ',') {
            if word.is_empty() {
                continue;
            }
            let token = word.parse::<usize>().map_err(|_| {
                Diagnostic::new(
                    src,
                    span,
                    format!(
                        "order file `{shown}`, line {}: `{}` is not a token index",
                        k + 1,
                        quoted(word)
                    ),
                )
                .with_help("list token indices i·w + j (whole numbers from 0), separated by spaces, commas or newlines")
            })?;
            tokens.push((token, k + 1));
        }
    }
    Ok(Order::File {
        path: path_shown,
        tokens,
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
        StageClause::Setting(Setting::ClipTimesteps(t)) => t.span,
    }
}

//! The planner: (schedule, grid, seed) → an immutable [`Plan`] listing every
//! MAR step with the exact tokens it reveals, its diffusion steps, FTS rule,
//! guidance scale and temperature.
//!
//! Everything that depends on the grid is checked here (coverage, overlap,
//! counts), with errors pointing into the schedule's source.

pub mod allocation;
pub mod order;
pub mod partition;
mod respace;
mod stage_order;
mod steps;

use std::collections::HashMap;
use std::sync::Arc;

pub use respace::respaced_timesteps;
pub use steps::{DetailRule, MAX_DIFFUSION_STEPS, Plan, PlanStage, PlanStep};

use crate::grid::{Grid, MAX_TOKENS};
use crate::rng::{Purpose, Stream};
use crate::schedule::ast::{Expr, RampShape, Rounding, Selector};
use crate::schedule::expr::{self, Env};
use crate::schedule::{
    Cfg, Diagnostic, DiffusionRule, Order, Schedule, Source, Span, Stage, StepCount, fmt_num,
};

/// Model defaults and command-line overrides applied while planning.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PlanOptions {
    /// Guidance for stages whose schedule says nothing about `cfg` (a
    /// model's default), applied with MAR's linear schedule.
    pub default_cfg: Option<f64>,
    /// Temperature for stages whose schedule sets none (else 1).
    pub default_temperature: Option<f64>,
    /// Replaces every guidance scale; stages with `cfg none` stay unguided.
    pub cfg: Option<f64>,
    /// Replaces every temperature.
    pub temperature: Option<f64>,
}

/// Whether `v` can be a guidance scale or a temperature: a number >= 0
/// that the sampler's float32 arithmetic can hold (at most `f32::MAX`,
/// about 3.4e38). Every place that takes one (schedules, flags, manifests,
/// the Python API) checks it with this.
pub fn is_sampler_scale(v: f64) -> bool {
    (0.0..=f64::from(f32::MAX)).contains(&v)
}

/// Why a value failed [`is_sampler_scale`], for messages.
pub const SAMPLER_SCALE_RULE: &str = "a number >= 0 and at most 3.4e38 (float32's largest)";

/// Values of names while planning: parameters, grid size, and (for token
/// sets) the current cell, set memberships and what earlier stages took.
struct PlanEnv<'a> {
    params: &'a HashMap<String, f64>,
    grid: Grid,
    cell: (usize, usize),
    sets: &'a HashMap<String, Vec<bool>>,
    taken: &'a [bool],
}

impl<'a> PlanEnv<'a> {
    /// Values for numbers outside any cell: parameters and the grid size.
    fn numbers(params: &'a HashMap<String, f64>, grid: Grid) -> Self {
        static NO_SETS: std::sync::LazyLock<HashMap<String, Vec<bool>>> =
            std::sync::LazyLock::new(HashMap::new);
        PlanEnv {
            params,
            grid,
            cell: (0, 0),
            sets: &NO_SETS,
            taken: &[],
        }
    }

    fn token(&self) -> usize {
        self.grid.index(self.cell.0, self.cell.1)
    }
}

impl Env for PlanEnv<'_> {
    fn number(&self, name: &str) -> f64 {
        match name {
            "i" => self.cell.0 as f64,
            "j" => self.cell.1 as f64,
            "h" => self.grid.height as f64,
            "w" => self.grid.width as f64,
            _ => self.params.get(name).copied().unwrap_or(f64::NAN),
        }
    }

    fn condition(&self, name: &str) -> bool {
        self.sets.get(name).is_some_and(|m| m[self.token()])
    }

    fn rest(&self) -> bool {
        !self.taken[self.token()]
    }
}

/// Plans `schedule` on `grid` with `seed` (which drives random orders).
pub fn plan(schedule: &Schedule, grid: Grid, seed: u64) -> Result<Plan, Diagnostic> {
    Planner::new(schedule, grid)?.plan(seed)
}

/// Grid-dependent state that does not depend on the seed: set memberships,
/// each stage's tokens and step counts. Build once, plan many seeds.
pub struct Planner<'a> {
    schedule: &'a Schedule,
    grid: Grid,
    params: HashMap<String, f64>,
    /// Each stage's tokens, ascending.
    stage_tokens: Vec<Vec<usize>>,
    /// Each stage's tokens per step.
    stage_counts: Vec<Vec<usize>>,
    /// Each stage's order rule.
    stage_orders: Vec<Box<dyn order::TokenOrder>>,
}

impl<'a> Planner<'a> {
    pub fn new(schedule: &'a Schedule, grid: Grid) -> Result<Self, Diagnostic> {
        Self::build(schedule, grid).map_err(|d| schedule.note_set_params(d))
    }

    fn build(schedule: &'a Schedule, grid: Grid) -> Result<Self, Diagnostic> {
        let src = &schedule.source;
        let first = &schedule.stages[0];
        if grid.is_empty() || grid.len() > MAX_TOKENS {
            return Err(Diagnostic::new(
                src,
                first.name_span,
                format!("grid {grid} is not supported: it must have 1 to {MAX_TOKENS} tokens"),
            ));
        }
        check_condition_work(schedule, grid)?;
        let params = schedule.param_values();
        let mut sets: HashMap<String, Vec<bool>> = HashMap::new();
        if let Some(p) = &schedule.partition {
            let max = partition::max_levels(grid);
            if p.levels > max {
                return Err(Diagnostic::new(
                    src,
                    p.span,
                    format!(
                        "checker({}) does not fit a {grid} grid: set {} would be empty",
                        p.levels,
                        p.set_name(2)
                    ),
                )
                .with_help(format!(
                    "Algorithm 1 needs h + w - 2 >= 2^(K-2); on {grid} use at most checker({max})"
                )));
            }
            let set_of = partition::checker(grid, p.levels);
            for k in 1..=p.levels {
                sets.insert(p.set_name(k), set_of.iter().map(|&s| s == k).collect());
            }
        }
        let no_taken = vec![false; grid.len()];
        for named in &schedule.sets {
            let member = members(&named.cells, grid, &params, &sets, &no_taken);
            sets.insert(named.name.clone(), member);
        }

        let mut taken: Vec<Option<usize>> = vec![None; grid.len()];
        let mut taken_mask = vec![false; grid.len()];
        let mut stage_tokens = Vec::new();
        let mut stage_counts = Vec::new();
        let mut stage_orders = Vec::new();
        let named_orders = order::NamedRules::new(grid);
        for (s, stage) in schedule.stages.iter().enumerate() {
            let member = members(&stage.tokens, grid, &params, &sets, &taken_mask);
            let tokens: Vec<usize> = (0..grid.len()).filter(|&t| member[t]).collect();
            if tokens.is_empty() {
                return Err(Diagnostic::new(
                    src,
                    stage.tokens.span,
                    format!("stage `{}` takes no tokens on a {grid} grid", stage.name),
                )
                .with_help("every stage must reveal at least one token; check the condition, or remove the stage"));
            }
            let overlap: Vec<usize> = tokens.iter().copied().filter(|&t| taken_mask[t]).collect();
            if let Some(&t0) = overlap.first() {
                let earlier = &schedule.stages[taken[t0].unwrap_or(0)].name;
                let (i, j) = grid.cell(t0);
                return Err(Diagnostic::new(
                    src,
                    stage.tokens.span,
                    format!(
                        "stage `{}` takes {} token{} already taken by an earlier stage (e.g. row {i}, column {j}, taken by `{earlier}`)",
                        stage.name,
                        overlap.len(),
                        plural(overlap.len())
                    ),
                )
                .with_help("a token is revealed once; add `and rest` to take only what earlier stages left"));
            }
            for &t in &tokens {
                taken[t] = Some(s);
                taken_mask[t] = true;
            }
            let n = tokens.len();
            let counts = step_counts(src, stage, n, &params, grid)?;
            stage_orders.push(stage_order::resolve(
                src,
                stage,
                &tokens,
                grid,
                &params,
                &named_orders,
            )?);
            stage_tokens.push(tokens);
            stage_counts.push(counts);
        }
        let missing: Vec<usize> = (0..grid.len()).filter(|&t| !taken_mask[t]).collect();
        if let Some(&t0) = missing.first() {
            let (i, j) = grid.cell(t0);
            let last = schedule.stages.last().unwrap();
            return Err(Diagnostic::new(
                src,
                last.span,
                format!(
                    "the stages leave {} of {} tokens uncovered (e.g. row {i}, column {j})",
                    missing.len(),
                    grid.len()
                ),
            )
            .with_help(
                "every token must be revealed once; end with a stage that takes `tokens rest`",
            ));
        }
        check_defaults(schedule, &PlanEnv::numbers(&params, grid))?;
        Ok(Planner {
            schedule,
            grid,
            params,
            stage_tokens,
            stage_counts,
            stage_orders,
        })
    }

    /// The plan for one seed, with no model defaults or overrides.
    pub fn plan(&self, seed: u64) -> Result<Plan, Diagnostic> {
        self.plan_with(seed, &PlanOptions::default())
    }

    /// The plan for one seed, with model defaults and command-line overrides.
    pub fn plan_with(&self, seed: u64, options: &PlanOptions) -> Result<Plan, Diagnostic> {
        self.plan_unnoted(seed, options)
            .map_err(|d| self.schedule.note_set_params(d))
    }

    fn plan_unnoted(&self, seed: u64, options: &PlanOptions) -> Result<Plan, Diagnostic> {
        let schedule = self.schedule;
        let src = &schedule.source;
        let grid = self.grid;
        let total = grid.len();
        let mut rng = Stream::new(seed, Purpose::Order);
        let env = PlanEnv::numbers(&self.params, grid);
        let eval = |e: &Expr| expr::number(e, &env);

        // Where each stage's first step sits in its ramp, and ramp lengths.
        let mut ramp_offset = vec![0usize; schedule.stages.len()];
        let mut ramp_len = vec![0usize; schedule.ramps.len()];
        for (s, stage) in schedule.stages.iter().enumerate() {
            if let DiffusionRule::Ramp(r) = stage.diffusion {
                ramp_offset[s] = ramp_len[r];
                ramp_len[r] += self.stage_counts[s].len();
            }
        }

        let mut stages = Vec::new();
        let mut steps = Vec::new();
        let mut known = 0usize;
        for (s, stage) in schedule.stages.iter().enumerate() {
            let counts = &self.stage_counts[s];
            let adaptive = match stage.order {
                Order::Adaptive(selector) => Some(selector),
                _ => None,
            };
            let sequence = self.stage_orders[s].order(&self.stage_tokens[s], grid, &mut rng);
            let diffusion = diffusion_steps(
                src,
                schedule,
                s,
                counts.len(),
                &ramp_offset,
                &ramp_len,
                &eval,
            )?;
            let temperature = stage_temperature(src, stage, options, &eval)?;
            let clip_timesteps = stage_clip_timesteps(src, stage, &eval)?;
            let fts = stage_fts(src, stage, &eval)?;
            let guidance = stage_guidance(src, stage, options, &eval)?;
            let mut cursor = 0;
            for (k, &count) in counts.iter().enumerate() {
                let mut tokens = sequence[cursor..cursor + count].to_vec();
                tokens.sort_unstable();
                cursor += count;
                let masked_after = total - known - count;
                let cfg = match guidance {
                    // MAR runs no unconditional pass when cfg = 1.
                    None | Some((1.0, _)) => None,
                    Some((scale, true)) => {
                        // mar.md §2.2 step 9, with MAR's clamp of the masked
                        // count to at least 1 at the last step.
                        let masked = masked_after.max(1) as f64;
                        Some(1.0 + (scale - 1.0) * (total as f64 - masked) / total as f64)
                    }
                    Some((scale, false)) => Some(scale),
                };
                let detail = fts.map(|(fraction, steps, selector)| DetailRule {
                    fraction,
                    steps,
                    selector,
                    count: round_half_even(fraction * count as f64).clamp(1.0, count as f64)
                        as usize,
                });
                steps.push(PlanStep {
                    stage: s,
                    tokens,
                    adaptive,
                    known_before: known,
                    diffusion_steps: diffusion[k],
                    detail,
                    cfg,
                    temperature,
                    clip_timesteps,
                });
                known += count;
            }
            stages.push(PlanStage {
                name: stage.name.clone(),
                tokens: self.stage_tokens[s].len(),
                steps: counts.len(),
            });
        }
        let plan = Plan {
            grid,
            seed,
            stages,
            steps,
        };
        debug_assert_eq!(plan.check_invariants(), Ok(()));
        Ok(plan)
    }
}

/// A stage's sampler temperature: `--temperature`, else the stage's,
/// else the model's default, else 1. The stage's own value is checked
/// ([`temperature_value`]) even where `--temperature` replaces it.
fn stage_temperature(
    src: &Arc<Source>,
    stage: &Stage,
    options: &PlanOptions,
    eval: &impl Fn(&Expr) -> f64,
) -> Result<f64, Diagnostic> {
    let own = stage
        .temperature
        .as_ref()
        .map(|e| temperature_value(src, e, eval))
        .transpose()?;
    Ok(options
        .temperature
        .or(own)
        .or(options.default_temperature)
        .unwrap_or(1.0))
}

/// The value of a `temperature` clause: [`is_sampler_scale`], `-0` as 0
/// (printed without its sign); else an error at the clause's number.
fn temperature_value(
    src: &Arc<Source>,
    e: &Expr,
    eval: &impl Fn(&Expr) -> f64,
) -> Result<f64, Diagnostic> {
    let t = eval(e);
    if !is_sampler_scale(t) {
        return Err(Diagnostic::new(
            src,
            e.span,
            format!("temperature {} must be {SAMPLER_SCALE_RULE}", fmt_num(t)),
        )
        .with_help("1.0 is MAR's default; 0 removes the sampler's noise"));
    }
    Ok(if t == 0.0 { 0.0 } else { t })
}

/// A stage's `clip_timesteps` ([`clip_timesteps_value`]), if it has one.
fn stage_clip_timesteps(
    src: &Arc<Source>,
    stage: &Stage,
    eval: &impl Fn(&Expr) -> f64,
) -> Result<Option<u32>, Diagnostic> {
    stage
        .clip_timesteps
        .as_ref()
        .map(|e| clip_timesteps_value(src, e, eval))
        .transpose()
}

/// The value of a `clip_timesteps` clause: a whole number from 1 to
/// `MAX_DIFFUSION_STEPS − 1` (a timestep of the training chain).
fn clip_timesteps_value(
    src: &Arc<Source>,
    e: &Expr,
    eval: &impl Fn(&Expr) -> f64,
) -> Result<u32, Diagnostic> {
    let t = eval(e);
    let last = MAX_DIFFUSION_STEPS - 1;
    if t.is_finite() && t.fract() == 0.0 && (1.0..=f64::from(last)).contains(&t) {
        Ok(t as u32)
    } else {
        Err(Diagnostic::new(
            src,
            e.span,
            format!(
                "clip_timesteps must be a whole number from 1 to {last} (a timestep of the training chain), not {}",
                fmt_num(t)
            ),
        )
        .with_help("DiSA clips at 950: `clip_timesteps 950`"))
    }
}

/// A stage's FTS rule as (β in (0, 1], detail steps, selector), if it has one.
fn stage_fts(
    src: &Arc<Source>,
    stage: &Stage,
    eval: &impl Fn(&Expr) -> f64,
) -> Result<Option<(f64, u32, Selector)>, Diagnostic> {
    let Some(f) = &stage.fts else {
        return Ok(None);
    };
    let beta = eval(&f.fraction);
    if !(beta > 0.0 && beta <= 1.0) {
        return Err(Diagnostic::new(
            src,
            f.fraction.span,
            format!("the FTS fraction β = {} must be in (0, 1]", fmt_num(beta)),
        )
        .with_help("write it as a percentage (`top 10%`) or a fraction (`top 0.1`)"));
    }
    let steps = diffusion_count(src, eval(&f.steps), f.steps.span, "FTS detail steps")?;
    Ok(Some((beta, steps, f.selector)))
}

/// A stage's guidance as (scale, linear in the revealed share), with
/// `--cfg` replacing the scale; `None` when the stage runs none.
fn stage_guidance(
    src: &Arc<Source>,
    stage: &Stage,
    options: &PlanOptions,
    eval: &impl Fn(&Expr) -> f64,
) -> Result<Option<(f64, bool)>, Diagnostic> {
    let rule = match &stage.cfg {
        Cfg::None => None,
        Cfg::Unset => options.default_cfg.map(|c| (c, true)),
        Cfg::Constant(e) | Cfg::Linear(e) => Some((
            guidance_scale(src, e, eval)?,
            matches!(stage.cfg, Cfg::Linear(_)),
        )),
    };
    // `-0` is 0 (printed without its sign), as for the temperature.
    Ok(rule.map(|(scale, linear)| {
        let scale = options.cfg.unwrap_or(scale);
        (if scale == 0.0 { 0.0 } else { scale }, linear)
    }))
}

/// The scale of a `cfg` clause: [`is_sampler_scale`] (as `--cfg` checks),
/// else an error at the clause's number.
fn guidance_scale(
    src: &Arc<Source>,
    e: &Expr,
    eval: &impl Fn(&Expr) -> f64,
) -> Result<f64, Diagnostic> {
    let scale = eval(e);
    if is_sampler_scale(scale) {
        return Ok(scale);
    }
    Err(Diagnostic::new(
        src,
        e.span,
        format!(
            "the guidance scale must be {SAMPLER_SCALE_RULE}, not {}",
            fmt_num(scale)
        ),
    )
    .with_help("1 runs no unconditional pass; MAR-B's value is 2.9 (`cfg linear 2.9`)"))
}

/// Checks the values of the file's top-level settings on `grid`, as a
/// stage's own are checked, whether or not a stage inherits them: a
/// default that no stage uses is still a wrong schedule.
fn check_defaults(schedule: &Schedule, env: &PlanEnv) -> Result<(), Diagnostic> {
    let src = &schedule.source;
    let eval = |e: &Expr| expr::number(e, env);
    let defaults = &schedule.defaults;
    let diffusion: &[Expr] = match &defaults.diffusion {
        Some(DiffusionRule::Constant(e)) => std::slice::from_ref(e),
        Some(DiffusionRule::List(list)) => list,
        Some(DiffusionRule::Ramp(_)) | None => &[],
    };
    for e in diffusion {
        diffusion_count(src, eval(e), e.span, "diffusion steps")?;
    }
    if let Cfg::Constant(e) | Cfg::Linear(e) = &defaults.cfg {
        guidance_scale(src, e, &eval)?;
    }
    if let Some(e) = &defaults.temperature {
        temperature_value(src, e, &eval)?;
    }
    if let Some(e) = &defaults.clip_timesteps {
        clip_timesteps_value(src, e, &eval)?;
    }
    Ok(())
}

/// The most expression parts planning may evaluate over a grid's cells
/// (about seconds of work): the sets' and stages' token conditions.
pub const MAX_CONDITION_WORK: u64 = 1 << 30;

/// Refuses a schedule whose token conditions, evaluated at every cell of
/// `grid` (sets once, each stage's `tokens` once), are too much work:
/// thousands of stages with long conditions on a large grid took minutes.
fn check_condition_work(schedule: &Schedule, grid: Grid) -> Result<(), Diagnostic> {
    let parts: u64 = schedule
        .sets
        .iter()
        .map(|s| &s.cells)
        .chain(schedule.stages.iter().map(|s| &s.tokens))
        .map(|e| e.parts() as u64)
        .sum();
    let work = parts.saturating_mul(grid.len() as u64);
    if work <= MAX_CONDITION_WORK {
        return Ok(());
    }
    Err(Diagnostic::new(
        &schedule.source,
        schedule.stages[0].name_span,
        format!(
            "planning this schedule on a {grid} grid evaluates {parts} parts of token conditions at each of {} cells ({work}); at most {MAX_CONDITION_WORK} are allowed",
            grid.len()
        ),
    )
    .with_help("use fewer stages or shorter `tokens` conditions (a `set` is evaluated once), or a smaller grid"))
}

fn members(
    cond: &Expr,
    grid: Grid,
    params: &HashMap<String, f64>,
    sets: &HashMap<String, Vec<bool>>,
    taken: &[bool],
) -> Vec<bool> {
    per_token(0..grid.len(), grid, params, sets, taken, |env| {
        expr::condition(cond, env)
    })
}

/// `f` evaluated at each of `tokens` (cells of `grid`), in their order.
fn per_token<T>(
    tokens: impl Iterator<Item = usize>,
    grid: Grid,
    params: &HashMap<String, f64>,
    sets: &HashMap<String, Vec<bool>>,
    taken: &[bool],
    f: impl Fn(&PlanEnv) -> T,
) -> Vec<T> {
    let mut env = PlanEnv {
        params,
        grid,
        cell: (0, 0),
        sets,
        taken,
    };
    tokens
        .map(|t| {
            env.cell = grid.cell(t);
            f(&env)
        })
        .collect()
}

/// Tokens per step for a stage of `n` tokens.
fn step_counts(
    src: &Arc<Source>,
    stage: &crate::schedule::Stage,
    n: usize,
    params: &HashMap<String, f64>,
    grid: Grid,
) -> Result<Vec<usize>, Diagnostic> {
    let env = PlanEnv::numbers(params, grid);
    let too_many = |m: f64, span: Span| {
        Diagnostic::new(
            src,
            span,
            format!(
                "stage `{}` has {n} token{} but asks for {} steps",
                stage.name,
                plural(n),
                fmt_num(m)
            ),
        )
        .with_help(format!(
            "every step reveals at least one token: use at most {n} steps"
        ))
    };
    match &stage.steps {
        StepCount::Steps(e, dist) => {
            let m = expr::number(e, &env);
            if !(m.is_finite() && m.fract() == 0.0 && m >= 1.0) {
                return Err(Diagnostic::new(
                    src,
                    e.span,
                    format!(
                        "a stage needs a whole number of steps, at least 1, not {}",
                        fmt_num(m)
                    ),
                )
                .with_help("to give tokens per step instead, write `rate R`"));
            }
            if m > n as f64 {
                return Err(too_many(m, e.span));
            }
            Ok(allocation::allocate(n, m as usize, *dist))
        }
        StepCount::Rate(e, dist) => {
            let r = expr::number(e, &env);
            if !(r.is_finite() && r > 0.0) {
                return Err(Diagnostic::new(
                    src,
                    e.span,
                    format!(
                        "a rate is tokens per step and must be a finite number > 0, not {}",
                        fmt_num(r)
                    ),
                ));
            }
            let m = round_half_even(n as f64 / r).max(1.0);
            if m > n as f64 {
                return Err(too_many(m, e.span).with_help(format!(
                    "the steps are {n} / rate, rounded; every step reveals at least one token, so use a rate of at least 1"
                )));
            }
            Ok(allocation::allocate(n, m as usize, *dist))
        }
        StepCount::List(list) => {
            let mut counts = Vec::with_capacity(list.len());
            for e in list {
                let k = expr::number(e, &env);
                if !(k.is_finite() && k.fract() == 0.0 && k >= 1.0) {
                    return Err(Diagnostic::new(
                        src,
                        e.span,
                        format!(
                            "each step reveals a whole number of tokens, at least 1, not {}",
                            fmt_num(k)
                        ),
                    ));
                }
                // Each entry is at most n, so the sum below cannot overflow.
                if k > n as f64 {
                    return Err(Diagnostic::new(
                        src,
                        e.span,
                        format!(
                            "a step cannot reveal {} tokens: stage `{}` has {n}",
                            fmt_num(k),
                            stage.name
                        ),
                    )
                    .with_help(format!("make the list sum to {n}")));
                }
                counts.push(k as usize);
            }
            let sum: usize = counts.iter().sum();
            if sum != n {
                return Err(Diagnostic::new(
                    src,
                    stage.steps_span,
                    format!(
                        "these counts add up to {sum}, but stage `{}` has {n} tokens",
                        stage.name
                    ),
                )
                .with_help(format!("make the list sum to {n}")));
            }
            Ok(counts)
        }
    }
}

/// Base diffusion steps for each step of stage `s`.
fn diffusion_steps(
    src: &Arc<Source>,
    schedule: &Schedule,
    s: usize,
    n_steps: usize,
    ramp_offset: &[usize],
    ramp_len: &[usize],
    eval: &dyn Fn(&Expr) -> f64,
) -> Result<Vec<u32>, Diagnostic> {
    let stage = &schedule.stages[s];
    match &stage.diffusion {
        DiffusionRule::Constant(e) => {
            let t = diffusion_count(src, eval(e), e.span, "diffusion steps")?;
            Ok(vec![t; n_steps])
        }
        DiffusionRule::List(list) => {
            if list.len() != n_steps {
                return Err(Diagnostic::new(
                    src,
                    stage.diffusion_span,
                    format!(
                        "this list gives {} diffusion step count{}, but stage `{}` has {n_steps} step{}",
                        list.len(),
                        plural(list.len()),
                        stage.name,
                        plural(n_steps)
                    ),
                )
                .with_help("give one count per MAR step of the stage"));
            }
            list.iter()
                .map(|e| diffusion_count(src, eval(e), e.span, "diffusion steps"))
                .collect()
        }
        DiffusionRule::Ramp(r) => {
            let ramp = &schedule.ramps[*r];
            let from = diffusion_count(src, eval(&ramp.from), ramp.from.span, "diffusion steps")?;
            let to = diffusion_count(src, eval(&ramp.to), ramp.to.span, "diffusion steps")?;
            let len = ramp_len[*r];
            Ok((0..n_steps)
                .map(|k| ramp_value(ramp.shape, ramp.rounding, from, to, ramp_offset[s] + k, len))
                .collect())
        }
    }
}

/// Diffusion steps at step `g` of a ramp of `len` steps from `from` to `to`.
///
/// The weight on `from` is `(u − g)/u` (linear) or `(cos(π g/u) + 1)/2`
/// (cosine) with `u = len − 1`, computed in DiSA's order of operations, so
/// `floor` reproduces DiSA's chain choice exactly (mar.md §6.3); `round`
/// rounds the count half to even (mar.md §5.3's formula). A ramp of one
/// step gives `from`.
pub fn ramp_value(
    shape: RampShape,
    rounding: Rounding,
    from: u32,
    to: u32,
    g: usize,
    len: usize,
) -> u32 {
    if len <= 1 {
        return from;
    }
    let u = (len - 1) as f64;
    let g = g as f64;
    let weight = match shape {
        RampShape::Linear => (u - g) / u,
        RampShape::Cosine => ((std::f64::consts::PI * g / u).cos() + 1.0) / 2.0,
    };
    let span = f64::from(from) - f64::from(to);
    let offset = weight * span;
    // `round` rounds the count (mar.md §5.3: round(T_max − (T_max − T_min)·g/(G−1)),
    // ties to even); `floor` drops the offset's fraction, as DiSA's int().
    match rounding {
        Rounding::Round => round_half_even(f64::from(to) + offset) as u32,
        Rounding::Floor => (f64::from(to) + offset.floor()) as u32,
    }
}

fn diffusion_count(src: &Arc<Source>, v: f64, span: Span, what: &str) -> Result<u32, Diagnostic> {
    if v.is_finite() && v.fract() == 0.0 && (1.0..=f64::from(MAX_DIFFUSION_STEPS)).contains(&v) {
        Ok(v as u32)
    } else {
        Err(Diagnostic::new(
            src,
            span,
            format!(
                "{what} must be a whole number from 1 to {MAX_DIFFUSION_STEPS}, not {}",
                fmt_num(v)
            ),
        )
        .with_help("MAR samples with 100 diffusion steps; the training chain has 1000"))
    }
}

/// Round half to even, as Python's `round` and numpy do.
pub fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_half_to_even() {
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
        assert_eq!(round_half_even(-2.5), -2.0);
        assert_eq!(round_half_even(2.4), 2.0);
        assert_eq!(round_half_even(23.97), 24.0);
    }

    /// `cfg -0` and `temperature -0` plan as 0, printed without a sign.
    #[test]
    fn negative_zero_scales_are_zero() {
        let text = "grid 2x2\ncfg constant -0\ntemperature -0\nstage a { tokens all steps 1 }";
        let schedule =
            Schedule::from_source(Source::new("z.gtr", text), &Default::default()).unwrap();
        let step = &plan(&schedule, Grid::new(2, 2), 0).unwrap().steps[0];
        let (cfg, temperature) = (step.cfg.unwrap(), step.temperature);
        assert!(cfg == 0.0 && cfg.is_sign_positive(), "{cfg}");
        assert!(temperature == 0.0 && temperature.is_sign_positive());
    }

    #[test]
    fn disa_linear_and_cosine_ramps() {
        // DiSA: upper 50, lower 5, 64 steps: first 50, last 5.
        let lin: Vec<u32> = (0..64)
            .map(|g| ramp_value(RampShape::Linear, Rounding::Floor, 50, 5, g, 64))
            .collect();
        assert_eq!((lin[0], lin[63]), (50, 5));
        for (g, &t) in lin.iter().enumerate() {
            let want = 5 + (((63 - g) as f64 / 63.0) * 45.0) as u32;
            assert_eq!(t, want);
        }
        let cos: Vec<u32> = (0..64)
            .map(|g| ramp_value(RampShape::Cosine, Rounding::Floor, 50, 5, g, 64))
            .collect();
        assert_eq!((cos[0], cos[63]), (50, 5));
        // mar.md §6.3: lower + int((cos(π·s/u) + 1)/2 · (upper − lower)).
        for (g, &t) in cos.iter().enumerate() {
            let w = ((std::f64::consts::PI * g as f64 / 63.0).cos() + 1.0) / 2.0;
            assert_eq!(t, 5 + (w * 45.0) as u32, "step {g}");
        }
        // Above the linear ramp in the first half, below it in the second.
        assert!(cos[16] > lin[16] && cos[47] < lin[47], "{cos:?}");
    }

    #[test]
    fn gtr_linear_ramp_50_to_20_over_30_steps() {
        let v: Vec<u32> = (0..30)
            .map(|g| ramp_value(RampShape::Linear, Rounding::Round, 50, 20, g, 30))
            .collect();
        assert_eq!((v[0], v[29]), (50, 20));
        for (g, &t) in v.iter().enumerate() {
            let want = (50.0 - 30.0 * g as f64 / 29.0).round() as u32;
            assert_eq!(t, want, "g = {g}");
        }
    }

    /// Hundreds of stages with long conditions on a large grid are refused
    /// before they are evaluated (this one took half a minute).
    #[test]
    fn too_much_condition_work_is_refused_at_once() {
        let long = vec!["0"; 240].join("+");
        let text: String = (0..200)
            .map(|k| format!("stage q{k} {{ tokens rest and (i + {long}) * 0 + i * 256 + j == {k}  steps 1 }}\n"))
            .collect();
        let schedule =
            Schedule::from_source(Source::new("big.gtr", text), &Default::default()).unwrap();
        let err = Planner::new(&schedule, Grid::new(256, 256)).err().unwrap();
        assert!(
            err.message.contains("at most 1073741824 are allowed"),
            "{}",
            err.message
        );
        // The same schedule on a small grid is only planned (and fails on
        // its own terms: most tokens are left over).
        let err = Planner::new(&schedule, Grid::new(16, 16)).err().unwrap();
        assert!(!err.message.contains("at most"), "{}", err.message);
    }

    /// Many keyed stages, each a row of a grid in two steps: every stage's
    /// tokens come in its key's order (descending `j` here: the row's right
    /// half first), whatever the other stages.
    /// (Each key is evaluated at its own stage's tokens only: 256 stages
    /// with a key of 499 parts on a 256x256 grid took about a minute when
    /// every stage's key was evaluated at every cell; that speed is not
    /// timed here.)
    #[test]
    fn many_keyed_stages_order_each_stages_tokens_by_its_key() {
        let key = vec!["-j"; 20].join("+");
        let text: String = (0..64)
            .map(|k| format!("stage q{k} {{ tokens i == {k}  order by {key}  steps 2 }}\n"))
            .collect();
        let schedule =
            Schedule::from_source(Source::new("keys.gtr", text), &Default::default()).unwrap();
        let plan = plan(&schedule, Grid::new(64, 64), 0).unwrap();
        assert_eq!(plan.steps.len(), 128);
        for k in 0..64 {
            let (right, left) = (&plan.steps[2 * k].tokens, &plan.steps[2 * k + 1].tokens);
            assert_eq!(
                *right,
                (k * 64 + 32..(k + 1) * 64).collect::<Vec<_>>(),
                "stage {k}"
            );
            assert_eq!(
                *left,
                (k * 64..k * 64 + 32).collect::<Vec<_>>(),
                "stage {k}"
            );
        }
    }

    /// On a tie `round` rounds the count to even, as mar.md §5.3's
    /// round(T_max − (T_max − T_min)·g/(G−1)) does: 50 → 5 over 5 steps
    /// is 50, 39, 28 (27.5), 16, 5; increasing ramps too.
    #[test]
    fn ramps_round_the_count_half_to_even() {
        let ramp = |rounding, from, to| -> Vec<u32> {
            (0..5)
                .map(|g| ramp_value(RampShape::Linear, rounding, from, to, g, 5))
                .collect()
        };
        assert_eq!(ramp(Rounding::Round, 50, 5), [50, 39, 28, 16, 5]);
        assert_eq!(ramp(Rounding::Floor, 50, 5), [50, 38, 27, 16, 5]);
        assert_eq!(ramp(Rounding::Round, 5, 50), [5, 16, 28, 39, 50]);
        assert_eq!(ramp(Rounding::Floor, 5, 50), [5, 16, 27, 38, 50]);
    }
}

//! The plan as text: a grid of reveal steps, a grid of stage labels and a
//! per-step table. Integers where possible, so it snapshots well.

use std::fmt::Write;

use super::stage_label;
use crate::cost::Cost;
use crate::plan::{Plan, PlanStep};
use crate::schedule::{Schedule, fmt_num};

/// The grid of the 1-based step that reveals each token, fixed-width;
/// `?` for a token of an adaptive stage (its step is chosen at run time),
/// explained under the grid.
pub fn step_grid(plan: &Plan) -> String {
    let reveal = plan.reveal_step();
    let adaptive = adaptive_tokens(plan);
    let width = plan
        .steps
        .len()
        .to_string()
        .len()
        .max(plan.grid.width.saturating_sub(1).to_string().len());
    let row_label = plan.grid.height.saturating_sub(1).to_string().len();
    let mut out = String::new();
    let _ = write!(out, "{:row_label$} |", "");
    for j in 0..plan.grid.width {
        let _ = write!(out, " {j:>width$}");
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "{}-+{}",
        "-".repeat(row_label),
        "-".repeat((width + 1) * plan.grid.width)
    );
    for i in 0..plan.grid.height {
        let _ = write!(out, "{i:>row_label$} |");
        for j in 0..plan.grid.width {
            let t = plan.grid.index(i, j);
            let shown = if adaptive[t] {
                "?".to_string()
            } else {
                (reveal[t] + 1).to_string()
            };
            let _ = write!(out, " {shown:>width$}");
        }
        out.push('\n');
    }
    for (k, stage) in plan.stages.iter().enumerate() {
        let mut steps = (0..plan.steps.len()).filter(|&s| plan.steps[s].stage == k);
        let Some(first) = steps.next() else { continue };
        let Some(by) = plan.steps[first].adaptive else {
            continue;
        };
        let last = steps.next_back().unwrap_or(first);
        let _ = writeln!(
            out,
            "? stage `{}`: steps {}-{} each reveal their count of its masked tokens, chosen at run time (order adaptive by {})",
            stage.name,
            first + 1,
            last + 1,
            by.name()
        );
    }
    out
}

/// Whether each token belongs to a stage with an adaptive order.
fn adaptive_tokens(plan: &Plan) -> Vec<bool> {
    let mut out = vec![false; plan.grid.len()];
    for step in plan.steps.iter().filter(|s| s.adaptive.is_some()) {
        for &t in &step.tokens {
            out[t] = true;
        }
    }
    out
}

/// The grid of stage labels (A = first stage), one character per token.
pub fn stage_grid(plan: &Plan) -> String {
    let stage_of = plan.stage_of_token();
    let mut out = String::new();
    for i in 0..plan.grid.height {
        let row: Vec<String> = (0..plan.grid.width)
            .map(|j| stage_label(stage_of[plan.grid.index(i, j)]).to_string())
            .collect();
        let _ = writeln!(out, "{}", row.join(" "));
    }
    out
}

/// One line per MAR step: stage, tokens, known before, diffusion steps,
/// FTS, CFG scale and temperature.
pub fn step_table(plan: &Plan) -> String {
    let name_width = plan
        .stages
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    // `50 ≤950`: 50 steps, timesteps clipped to at most 950 (a step's
    // detail chains are clipped alike).
    let chain = |step: &PlanStep, steps: u32| match step.clip_timesteps {
        None => steps.to_string(),
        Some(clip) => format!("{steps} ≤{clip}"),
    };
    let fts: Vec<String> = plan
        .steps
        .iter()
        .map(|step| match step.detail {
            None => "-".to_string(),
            Some(d) => format!(
                "{} by {} -> {}",
                d.count,
                d.selector.name(),
                chain(step, d.steps)
            ),
        })
        .collect();
    let fts_width = fts
        .iter()
        .map(|f| f.chars().count())
        .max()
        .unwrap_or(0)
        .max(22);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>4}  {:<name_width$}  {:>6}  {:>5}  {:>9}  {:<fts_width$}  {:>6}  {:>5}",
        "step", "stage", "tokens", "known", "diffusion", "fts", "cfg", "temp"
    );
    for (k, (step, fts)) in plan.steps.iter().zip(&fts).enumerate() {
        // `*`: the count is planned, the tokens are chosen at run time.
        let tokens = match step.adaptive {
            Some(_) => format!("{}*", step.tokens.len()),
            None => step.tokens.len().to_string(),
        };
        let cfg = step.cfg.map_or("-".to_string(), |c| format!("{c:.4}"));
        let _ = writeln!(
            out,
            "{:>4}  {:<name_width$}  {:>6}  {:>5}  {:>9}  {:<fts_width$}  {:>6}  {:>5.2}",
            k + 1,
            plan.stages[step.stage].name,
            tokens,
            step.known_before,
            chain(step, step.diffusion_steps),
            fts,
            cfg,
            step.temperature
        );
    }
    if plan.is_adaptive() {
        out.push_str("* adaptive step: the engine picks which tokens from its backbone pass\n");
    }
    out
}

/// The full text report printed by `gtr-run plan`.
pub fn report(schedule: &Schedule, plan: &Plan, cost: Option<&Cost>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "schedule {}", schedule.source.name);
    let params: Vec<String> = schedule
        .params
        .iter()
        .map(|p| {
            let mark = if p.overridden { " (set)" } else { "" };
            format!("{} = {}{mark}", p.name, fmt_num(p.value))
        })
        .collect();
    let _ = writeln!(
        out,
        "grid {}, seed {}, {} MAR steps, {} stage{}{}",
        plan.grid,
        plan.seed,
        plan.steps.len(),
        plan.stages.len(),
        if plan.stages.len() == 1 { "" } else { "s" },
        if params.is_empty() {
            String::new()
        } else {
            format!("; params: {}", params.join(", "))
        }
    );
    out.push_str("\nstages:\n");
    for (k, s) in plan.stages.iter().enumerate() {
        let _ = writeln!(
            out,
            "  {} {:<16} {:>5} tokens in {:>3} steps",
            stage_label(k),
            s.name,
            s.tokens,
            s.steps
        );
    }
    out.push_str("\nreveal step of each token (row i, column j; 1 = first step):\n");
    out.push_str(&step_grid(plan));
    out.push_str("\nstage of each token:\n");
    out.push_str(&stage_grid(plan));
    out.push_str("\nsteps:\n");
    out.push_str(&step_table(plan));
    if let Some(c) = cost {
        out.push('\n');
        out.push_str(&cost_table(c));
    }
    out
}

/// The analytic cost as a short table (TFLOPs per image).
pub fn cost_table(c: &Cost) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "cost per image on {}:", c.model);
    let _ = writeln!(out, "  MAR steps              {}", c.mar_steps);
    let _ = writeln!(out, "  encoder passes         {}", c.encoder_passes);
    let _ = writeln!(out, "  decoder passes         {}", c.decoder_passes);
    let _ = writeln!(
        out,
        "  diffusion evaluations  {} (token rows x steps)",
        c.diffusion_evaluations
    );
    let _ = writeln!(out, "  encoder   {:>8.3} TFLOPs", c.encoder_flops / 1e12);
    let _ = writeln!(out, "  decoder   {:>8.3} TFLOPs", c.decoder_flops / 1e12);
    let _ = writeln!(out, "  diffusion {:>8.3} TFLOPs", c.diffusion_flops / 1e12);
    if c.adaptive_candidates > 0 {
        let _ = writeln!(
            out,
            "  scoring   {:>8.3} MFLOPs: {} FTS scores (eq. 5), one per masked token of each adaptive step, whose z rows the backbone returns",
            c.scoring_flops / 1e6,
            c.adaptive_candidates
        );
    }
    let _ = writeln!(out, "  total     {:>8.3} TFLOPs", c.total_flops() / 1e12);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::Grid;
    use crate::plan::plan;
    use crate::schedule::Source;

    /// A clipped stage shows its clip beside its chains' steps, FTS detail
    /// chains included; an unclipped one shows none.
    #[test]
    fn the_step_table_marks_clipped_chains() {
        let text = "grid 2x2
            stage a { tokens i < 1 steps 1 diffusion 50 clip_timesteps 950 fts top 50% by high_freq -> 40 }
            stage b { tokens rest steps 1 diffusion 30 fts top 50% by high_freq -> 20 }";
        let schedule =
            Schedule::from_source(Source::new("c.gtr", text), &Default::default()).unwrap();
        let table = step_table(&plan(&schedule, Grid::new(2, 2), 0).unwrap());
        let rows: Vec<&str> = table.lines().skip(1).collect();
        assert!(rows[0].contains("50 ≤950"), "{table}");
        assert!(rows[0].contains("by high_freq -> 40 ≤950"), "{table}");
        assert!(!rows[1].contains('≤'), "{table}");
        assert!(rows[1].contains("by high_freq -> 20 "), "{table}");
    }
}

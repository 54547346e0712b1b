//! The plan as one JSON object (`gtr-run plan --json`).

use serde::Serialize;
use serde_json::{Value, json};

use crate::cost::{Cost, PricedCost};
use crate::plan::{DetailRule, Plan};
use crate::schedule::{Schedule, Selector};

#[derive(Serialize)]
struct StepJson<'a> {
    stage: &'a str,
    /// `null` at an adaptive step: the engine chooses them.
    tokens: Option<&'a [usize]>,
    /// How many tokens an adaptive step reveals (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<usize>,
    /// The selector of an adaptive step (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    adaptive: Option<Selector>,
    known_before: usize,
    diffusion_steps: u32,
    /// `clip_timesteps` (absent when the chains keep every timestep).
    #[serde(skip_serializing_if = "Option::is_none")]
    clip_timesteps: Option<u32>,
    /// `null` when the step runs no unconditional pass.
    cfg: Option<f64>,
    temperature: f64,
    detail: Option<DetailRule>,
}

/// `{"schedule", "grid": [h, w], "seed", "params", "stages", "steps", "cost"?}`
/// with `steps` in execution order. An adaptive step has `"tokens": null`,
/// its `count` and its `adaptive` selector instead of a token list.
pub fn plan_json(schedule: &Schedule, plan: &Plan, cost: Option<&Cost>) -> Value {
    let steps: Vec<StepJson> = plan
        .steps
        .iter()
        .map(|s| StepJson {
            stage: &plan.stages[s.stage].name,
            tokens: s.adaptive.is_none().then_some(s.tokens.as_slice()),
            count: s.adaptive.map(|_| s.tokens.len()),
            adaptive: s.adaptive,
            known_before: s.known_before,
            diffusion_steps: s.diffusion_steps,
            clip_timesteps: s.clip_timesteps,
            cfg: s.cfg,
            temperature: s.temperature,
            detail: s.detail,
        })
        .collect();
    let params: serde_json::Map<String, Value> = schedule
        .params
        .iter()
        .map(|p| (p.name.clone(), json!(p.value)))
        .collect();
    let mut out = json!({
        "schedule": schedule.source.name,
        "grid": [plan.grid.height, plan.grid.width],
        "seed": plan.seed,
        "params": params,
        "stages": plan.stages,
        "steps": steps,
    });
    if let Some(c) = cost {
        out["cost"] = json!(PricedCost::from(c.clone()));
    }
    out
}

//! The plan as one JSON object (`gtr-run plan --json`).

use serde::Serialize;
use serde_json::{Value, json};

use crate::cost::Cost;
use crate::plan::Plan;
use crate::schedule::Schedule;

#[derive(Serialize)]
struct StepJson<'a> {
    stage: &'a str,
    tokens: &'a [usize],
    known_before: usize,
    diffusion_steps: u32,
    /// `null` when the step runs no unconditional pass.
    cfg: Option<f64>,
    temperature: f64,
    detail: Option<Value>,
}

/// `{"schedule", "grid": [h, w], "seed", "params", "stages", "steps", "cost"?}`
/// with `steps` in execution order.
pub fn plan_json(schedule: &Schedule, plan: &Plan, cost: Option<&Cost>) -> Value {
    let steps: Vec<StepJson> = plan
        .steps
        .iter()
        .map(|s| StepJson {
            stage: &plan.stages[s.stage].name,
            tokens: &s.tokens,
            known_before: s.known_before,
            diffusion_steps: s.diffusion_steps,
            cfg: s.cfg,
            temperature: s.temperature,
            detail: s.detail.map(|d| {
                json!({"fraction": d.fraction, "steps": d.steps, "selector": d.selector.name(), "count": d.count})
            }),
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
        out["cost"] = json!({
            "model": c.model,
            "mar_steps": c.mar_steps,
            "encoder_passes": c.encoder_passes,
            "decoder_passes": c.decoder_passes,
            "diffusion_evaluations": c.diffusion_evaluations,
            "encoder_flops": c.encoder_flops,
            "decoder_flops": c.decoder_flops,
            "diffusion_flops": c.diffusion_flops,
            "total_flops": c.total_flops(),
        });
    }
    out
}

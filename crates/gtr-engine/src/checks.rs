//! What the engine refuses and how it says so: a plan or batch the model
//! cannot run (before any call), a model output of the wrong shape or with
//! non-finite values (after each call).

use super::{EngineError, ImageJob, ModelError, ModelInfo, NoiseSource};
use crate::plan::Plan;

/// Checks that `plan` fits model `info`: its grid, and no chain longer than
/// the training chain.
pub fn check_plan(info: &ModelInfo, plan: &Plan) -> Result<(), String> {
    if plan.grid != info.grid {
        return Err(format!(
            "the plan is for a {} grid but model `{}` has a {} grid",
            plan.grid, info.name, info.grid
        ));
    }
    if let Some((k, step)) = plan
        .steps
        .iter()
        .enumerate()
        .find(|(_, st)| st.max_diffusion_steps() as usize > info.train_steps)
    {
        return Err(format!(
            "MAR step {k} (stage `{}`) asks for {} diffusion steps, but model `{}` was trained with {} (manifest diffusion.train_steps); a respaced chain cannot be longer than the training chain",
            plan.stages[step.stage].name,
            step.max_diffusion_steps(),
            info.name,
            info.train_steps
        ));
    }
    Ok(())
}

pub(crate) fn check_batch(
    info: &ModelInfo,
    plans: &[Plan],
    jobs: &[ImageJob],
    noise: &dyn NoiseSource,
) -> Result<(), EngineError> {
    let bad = |m: String| Err(EngineError::Input(m));
    if plans.is_empty() || plans.len() != jobs.len() {
        return bad(format!("{} plans for {} images", plans.len(), jobs.len()));
    }
    let first = &plans[0];
    for p in plans {
        let same = p.steps.len() == first.steps.len()
            && p.steps.iter().zip(&first.steps).all(|(a, b)| {
                a.tokens.len() == b.tokens.len()
                    && a.stage == b.stage
                    && a.adaptive == b.adaptive
                    && a.diffusion_steps == b.diffusion_steps
                    && a.detail == b.detail
                    && a.cfg == b.cfg
                    && a.temperature == b.temperature
            });
        if !same {
            return bad("plans in one batch must share their step structure".into());
        }
    }
    check_plan(info, first).map_err(EngineError::Input)?;
    for job in jobs {
        let label_ok = job.label == info.null_class
            || (info.classes > 0 && (0..info.classes as i64).contains(&job.label));
        if !label_ok {
            return bad(format!(
                "class {} is out of range: model `{}` has {} classes (0..{}){}",
                job.label,
                info.name,
                info.classes,
                info.classes.saturating_sub(1),
                if info.classes == 0 {
                    "; it is unconditional"
                } else {
                    ""
                }
            ));
        }
    }
    noise
        .check(info, jobs, first.longest_chain())
        .map_err(EngineError::Input)?;
    Ok(())
}

pub(crate) fn shape_error(
    step: usize,
    graph: &'static str,
    tensor: &str,
    got: &[usize],
    want: &[usize],
) -> EngineError {
    EngineError::Model {
        step,
        source: ModelError::Shape {
            graph,
            tensor: tensor.into(),
            got: got.to_vec(),
            expected: format!("{want:?}"),
        },
    }
}

pub(crate) fn check_finite<'a>(
    graph: &'static str,
    tensor: &str,
    values: impl Iterator<Item = &'a f32> + Clone,
    step: usize,
) -> Result<(), EngineError> {
    // Branch-free fast path (vectorizes); count only when something is wrong.
    if values.clone().fold(true, |ok, v| ok & v.is_finite()) {
        return Ok(());
    }
    let bad = values.clone().filter(|v| !v.is_finite()).count();
    let nan = values.clone().any(|v| v.is_nan());
    Err(EngineError::NonFinite {
        graph,
        what: format!(
            "{bad} non-finite value{} ({}) in `{tensor}`",
            if bad == 1 { "" } else { "s" },
            if nan { "NaN" } else { "Inf" }
        ),
        step,
    })
}

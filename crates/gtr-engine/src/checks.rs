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

/// Checks that model `info` has class `label`: one of its classes, or its
/// null class (unconditional images); the message names what it has.
pub fn check_label(info: &ModelInfo, label: i64) -> Result<(), String> {
    if label == info.null_class || (0..info.classes as i64).contains(&label) {
        return Ok(());
    }
    let allowed = match info.classes {
        0 => format!(
            "is unconditional: its only class is the null class {}",
            info.null_class
        ),
        n => format!(
            "has {n} classes (0..{}; its null class {} makes unconditional images)",
            n - 1,
            info.null_class
        ),
    };
    Err(format!(
        "class {label} is out of range: model `{}` {allowed}",
        info.name
    ))
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
                    && a.clip_timesteps == b.clip_timesteps
            });
        if !same {
            return bad("plans in one batch must share their step structure".into());
        }
    }
    check_plan(info, first).map_err(EngineError::Input)?;
    for job in jobs {
        check_label(info, job.label).map_err(EngineError::Input)?;
    }
    noise
        .check(info, jobs, first.longest_chain(info.train_steps))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MarModel;
    use crate::fake::FakeModel;

    #[test]
    fn labels_are_the_classes_and_the_null_class() {
        let model = FakeModel::new();
        let mut info = model.info().clone();
        for label in [0, 9, 10] {
            assert_eq!(check_label(&info, label), Ok(()), "class {label}");
        }
        let err = check_label(&info, 11).unwrap_err();
        assert!(
            err.contains("has 10 classes (0..9; its null class 10"),
            "{err}"
        );
        assert!(check_label(&info, -1).is_err());
        info.classes = 0;
        info.null_class = 0;
        assert_eq!(check_label(&info, 0), Ok(()));
        let err = check_label(&info, 1).unwrap_err();
        assert!(
            err.contains("is unconditional: its only class is the null class 0"),
            "{err}"
        );
    }
}

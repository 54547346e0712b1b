//! What a failed command's exit status is (README, "Exit status").

use gtr_run::schedule::ScheduleError;

use super::plan::SnapshotsDiffer;

/// How a command ended (README, "Exit status").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// `plan --snapshot DIR --check` found snapshots that differ.
    ChecksDiffer = 1,
    /// The command line asks for something that cannot be done (clap's own
    /// refusals exit with 2 too).
    Usage = 2,
    /// An input is wrong: a schedule, a bundle or its graphs' contracts, a
    /// replay file, a class, an output folder that is not this run's.
    Input = 3,
    /// A failure while running: ONNX Runtime, non-finite values, reading
    /// or writing files.
    Runtime = 4,
}

/// A schedule error's status: a `--set` naming no parameter of the file is
/// the command line's mistake; anything else is the schedule's.
fn schedule_status(e: &ScheduleError) -> ExitStatus {
    match e {
        ScheduleError::Override { .. } => ExitStatus::Usage,
        _ => ExitStatus::Input,
    }
}

/// An engine error's status: a wrong input (a class, a plan the model
/// cannot run, a replay that does not fit) or a failure while running.
fn engine_status(e: &gtr_run::engine::EngineError) -> ExitStatus {
    use gtr_run::engine::EngineError;
    match e {
        EngineError::Input(_) => ExitStatus::Input,
        EngineError::Model { source, .. } | EngineError::Vae(source) => model_status(source),
        EngineError::NonFinite { .. } => ExitStatus::Runtime,
    }
}

/// A graph's output that breaks its contract is a wrong input (the
/// bundle's); a graph that fails to run is a failure while running.
fn model_status(e: &gtr_run::engine::ModelError) -> ExitStatus {
    if e.is_contract() {
        ExitStatus::Input
    } else {
        ExitStatus::Runtime
    }
}

/// The status of a failure: the first cause in `e`'s chain whose type says
/// what went wrong; a message of the front end's own is a usage error.
pub fn exit_status(e: &anyhow::Error) -> ExitStatus {
    use ExitStatus::{Input, Runtime};
    use gtr_run::backend::{OrtError, library::LibraryError};
    use gtr_run::engine::{EngineError, replay::ReplayError};
    use gtr_run::eval::{CompareError, ContenderError};
    use gtr_run::run::RunError;
    for cause in e.chain() {
        let status = if let Some(e) = cause.downcast_ref::<ScheduleError>() {
            Some(schedule_status(e))
        } else if cause.is::<gtr_run::bundle::BundleError>()
            || cause.is::<ReplayError>()
            || cause.is::<gtr_run::backend::precision_choice::PrecisionError>()
            || cause.is::<gtr_run::bundle::NamedSpecError>()
            || matches!(
                cause.downcast_ref::<gtr_run::eval::stats::StatsError>(),
                Some(gtr_run::eval::stats::StatsError::Reference { .. })
            )
        {
            Some(Input)
        } else if let Some(e) = cause.downcast_ref::<ContenderError>() {
            match e {
                ContenderError::Schedule(e) => Some(schedule_status(e)),
                ContenderError::Undeclared(_) => Some(ExitStatus::Usage),
            }
        } else if let Some(e) = cause.downcast_ref::<gtr_run::engine::ModelError>() {
            Some(model_status(e))
        } else if cause.is::<LibraryError>()
            || cause.is::<std::io::Error>()
            || cause.is::<gtr_run::eval::stats::StatsError>()
        {
            Some(Runtime)
        } else if let Some(e) = cause.downcast_ref::<RunError>() {
            match e {
                RunError::Invalid(_) | RunError::Replay(_) => Some(Input),
                RunError::Conflict(_) => Some(ExitStatus::Usage),
                RunError::Schedule(e) => Some(schedule_status(e)),
                RunError::Write { .. } => Some(Runtime),
                // Transparent: the engine's error is not a cause of its own in the chain.
                RunError::Engine(e) => Some(engine_status(e)),
            }
        } else if let Some(e) = cause.downcast_ref::<EngineError>() {
            Some(engine_status(e))
        } else if let Some(e) = cause.downcast_ref::<OrtError>() {
            match e {
                OrtError::Runtime(_) | OrtError::Session { .. } | OrtError::Library(_) => {
                    Some(Runtime)
                }
                _ => Some(Input),
            }
        } else if let Some(e) = cause.downcast_ref::<CompareError>() {
            Some(compare_status(e))
        } else if cause.is::<SnapshotsDiffer>() {
            Some(ExitStatus::ChecksDiffer)
        } else {
            None
        };
        if let Some(status) = status {
            return status;
        }
    }
    ExitStatus::Usage
}

/// The status of a comparison's failure.
fn compare_status(e: &gtr_run::eval::CompareError) -> ExitStatus {
    use gtr_run::eval::CompareError;
    match e {
        CompareError::Schedule { source, .. } => schedule_status(source),
        CompareError::Unfit { .. } => ExitStatus::Input,
        CompareError::Invalid(_) => ExitStatus::Usage,
        // Transparent, like RunError::Engine: not causes of their own.
        CompareError::Engine(e) => engine_status(e),
        CompareError::Stats(_) => ExitStatus::Runtime,
        // The command stops it only for an error of its own, reported instead.
        CompareError::Stopped => ExitStatus::Runtime,
        CompareError::Evaluator(e) => model_status(e),
        // The batch's own failure says.
        CompareError::Batch { source, .. } => compare_status(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gtr_run::run::RunError;

    /// A request the input cannot serve is exit 3; choices that cannot go
    /// together for the model (`--vae overlap` beside CUDA graphs, only
    /// reachable on a GPU) are usage, exit 2, as other flag conflicts.
    #[test]
    fn run_errors_say_input_or_usage() {
        let status = |e: RunError| exit_status(&anyhow::Error::from(e).context("generating"));
        assert_eq!(status(RunError::Invalid("no".into())), ExitStatus::Input);
        assert_eq!(
            status(RunError::Conflict("--vae overlap: no".into())),
            ExitStatus::Usage
        );
    }
}

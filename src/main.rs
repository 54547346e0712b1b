//! The `gtr-run` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use gtr_run::schedule::{ScheduleError, terminal_safe};

mod cli;

use cli::compare::{EvalArgs, SweepArgs, run_eval, run_sweep};
use cli::generate::{GenerateArgs, MergeArgs, run_generate, run_merge};
use cli::plan::{PlanArgs, run_plan};
use cli::status::exit_status;

#[derive(Parser)]
#[command(
    name = "gtr-run",
    version,
    about = "Run Masked Autoregressive image generators with .gtr schedules",
    override_usage = "gtr-run MODEL SCHEDULE [OPTIONS]\n       gtr-run plan SCHEDULE [OPTIONS]\n       gtr-run merge OUT PART_DIR... [OPTIONS]\n       gtr-run eval MODEL SCHEDULE... [OPTIONS]\n       gtr-run sweep MODEL SCHEDULE --set NAME=V1,V2,... [OPTIONS]",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    generate: GenerateArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Show the token order and step table a schedule produces, without a model.
    Plan(PlanArgs),
    /// Join the folders of a run's shards (--shard K/N) into one run folder.
    Merge(MergeArgs),
    /// Compare schedules on one model: speed measured side by side, FLOPs, quality.
    Eval(EvalArgs),
    /// Run one schedule over a grid of parameter values as eval does, and draw
    /// speed against quality with the Pareto front.
    Sweep(SweepArgs),
}

fn main() -> ExitCode {
    // SAFETY: the first thing the process does: no other thread exists.
    unsafe { gtr_run::backend::library::disable_telemetry() };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    let result = match cli.command {
        Some(Command::Plan(args)) => run_plan(args),
        Some(Command::Merge(args)) => run_merge(args),
        Some(Command::Eval(args)) => run_eval(args),
        Some(Command::Sweep(args)) => run_sweep(args),
        None => run_generate(cli.generate),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<ScheduleError>() {
                Some(ScheduleError::Invalid(d)) => eprintln!("{d}"),
                _ => eprintln!("{}", terminal_safe(&format!("error: {e:#}"))),
            }
            ExitCode::from(exit_status(&e) as u8)
        }
    }
}

/// Clap's message for a command line it refused (or its help or version,
/// which clap hands over the same way), written as [`terminal_safe`] shows
/// it: the message repeats what was typed, escapes included.
fn usage_error(e: &clap::Error) -> ExitCode {
    let text = e.render().to_string();
    let shown = terminal_safe(&text);
    if e.use_stderr() {
        eprint!("{shown}");
    } else {
        print!("{shown}");
    }
    ExitCode::from(e.exit_code() as u8)
}

//! The `gtr-run` command line.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand};

use gtr_run::cost::{ModelSpec, plan_cost};
use gtr_run::grid::Grid;
use gtr_run::plan::Planner;
use gtr_run::report;
use gtr_run::schedule::{Schedule, ScheduleError};

#[derive(Parser)]
#[command(
    name = "gtr-run",
    version,
    about = "Run Masked Autoregressive image generators with .gtr schedules"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the token order and step table a schedule produces, without a model.
    Plan(PlanArgs),
}

#[derive(Args)]
struct PlanArgs {
    /// The schedule file (.gtr).
    schedule: PathBuf,
    /// Token grid HxW (default: the schedule's `grid`, else 16x16).
    #[arg(long)]
    grid: Option<Grid>,
    /// Seed for random orders.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Override a parameter: --set name=value (repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_override)]
    overrides: Vec<(String, f64)>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also write a picture of the order to this PNG file.
    #[arg(long, value_name = "PATH")]
    png: Option<PathBuf>,
    /// Add the analytic cost on a model: mar-b, mar-l or mar-h.
    #[arg(long, value_name = "MODEL")]
    cost: Option<String>,
}

fn parse_override(s: &str) -> Result<(String, f64), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not NAME=VALUE (e.g. --set gen_steps=10)"))?;
    let v: f64 = value
        .trim()
        .parse()
        .map_err(|_| format!("`{value}` is not a number (in --set {s})"))?;
    if !v.is_finite() {
        return Err(format!("`{value}` is not a finite number (in --set {s})"));
    }
    Ok((name.trim().to_string(), v))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(args) => run_plan(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<ScheduleError>() {
                Some(ScheduleError::Invalid(d)) => eprintln!("{d}"),
                _ => eprintln!("error: {e:#}"),
            }
            ExitCode::from(2)
        }
    }
}

fn run_plan(args: PlanArgs) -> anyhow::Result<()> {
    let overrides: BTreeMap<String, f64> = args.overrides.into_iter().collect();
    let schedule = Schedule::from_file(&args.schedule, &overrides)?;
    let grid = args.grid.or(schedule.grid).unwrap_or(Grid::MAR);
    let plan = Planner::new(&schedule, grid)
        .and_then(|p| p.plan(args.seed))
        .map_err(|d| ScheduleError::Invalid(Box::new(d)))?;
    let cost = match &args.cost {
        None => None,
        Some(name) => {
            let spec = ModelSpec::builtin(name).ok_or_else(|| {
                anyhow!(
                    "--cost {name}: no such model spec; the built-in specs are {}",
                    ModelSpec::BUILTIN_NAMES.join(", ")
                )
            })?;
            Some(plan_cost(&plan, &spec))
        }
    };
    if let Some(path) = &args.png {
        let img = report::png::render(&plan);
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
            .context("encoding the PNG")?;
        if path.is_dir() {
            bail!(
                "--png {}: this is a folder; give a file name",
                path.display()
            );
        }
        gtr_run::fsutil::write_atomic(path, &bytes)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let mut text = if args.json {
        let value = report::json::plan_json(&schedule, &plan, cost.as_ref());
        serde_json::to_string(&value)? + "\n"
    } else {
        report::text::report(&schedule, &plan, cost.as_ref())
    };
    if let (Some(path), false) = (&args.png, args.json) {
        text += &format!("\npicture written to {}\n", path.display());
    }
    write_stdout(&text)
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

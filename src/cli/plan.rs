//! `gtr-run plan`: a schedule's order and step table without a model, and
//! the snapshots of a folder of schedules.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;

use gtr_run::bundle::Bundle;
use gtr_run::cost::ModelSpec;
use gtr_run::cost::plan_cost;
use gtr_run::grid::Grid;
use gtr_run::plan::{PlanOptions, Planner};
use gtr_run::report;
use gtr_run::schedule::{Schedule, ScheduleError};

use super::runtime::parse_override;
use super::{say, write_stdout, write_stdout_raw};

#[derive(Args)]
pub struct PlanArgs {
    /// The schedule file (.gtr), or `-` for standard input (at most 1 MiB).
    #[arg(required_unless_present = "snapshot")]
    schedule: Option<PathBuf>,
    /// Write the order of every DIR/*.gtr (seed 0, its own grid) to DIR/snapshots/NAME.gtr.snap.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["schedule", "grid", "seed", "overrides", "json", "png", "cost"])]
    snapshot: Option<PathBuf>,
    /// With --snapshot: compare with the snapshots instead, and fail on a difference.
    #[arg(long)]
    check: bool,
    /// Token grid HxW (default: the schedule's `grid`, else 16x16).
    #[arg(long)]
    grid: Option<Grid>,
    /// Seed for random orders.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
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
    /// Add the analytic cost on a model: mar-b, mar-l, mar-h, or a model bundle (planned then on its grid with its cfg and temperature defaults, as a run on it).
    #[arg(long, value_name = "MODEL")]
    cost: Option<String>,
}

/// `plan --snapshot --check` found differences (the report, on standard
/// output, says which).
#[derive(Debug, thiserror::Error)]
#[error("{failures} of {total} snapshots fail the check (listed above)")]
pub struct SnapshotsDiffer {
    failures: usize,
    total: usize,
}

pub fn run_plan(args: PlanArgs) -> anyhow::Result<()> {
    if args.check && args.snapshot.is_none() {
        bail!("--check compares a folder's snapshots: use it with --snapshot DIR");
    }
    let Some(path) = &args.schedule else {
        let dir = args
            .snapshot
            .as_deref()
            .unwrap_or(std::path::Path::new("."));
        let outcomes = gtr_run::snapshot::snapshot_dir(dir, args.check)?;
        // The report goes to standard output whether or not the check
        // passes; a failing check adds one line on standard error.
        let summary = gtr_run::snapshot::summary(dir, &outcomes, args.check);
        write_stdout(&summary.text)?;
        return match summary.failures {
            0 => Ok(()),
            failures => Err(SnapshotsDiffer {
                failures,
                total: summary.total,
            }
            .into()),
        };
    };
    if let Some(png) = &args.png {
        // Before the work, and naming the flag (not the temporary file).
        gtr_run::run::check_png_target(png, "--png")?;
    }
    let overrides = super::runtime::overrides_map(args.overrides)?;
    let schedule = Schedule::from_file(path, &overrides)?;
    // `--cost BUNDLE` plans as a run on that bundle does: on its grid,
    // with its guidance and temperature defaults (guidance doubles the
    // backbone passes and head rows it costs).
    let bundle = match &args.cost {
        Some(name) if ModelSpec::builtin(name).is_none() && Path::new(name).exists() => {
            Some(Bundle::open(Path::new(name))?)
        }
        _ => None,
    };
    if let (Some(png), Some(bundle)) = (&args.png, &bundle) {
        gtr_run::run::check_outside_inputs(png, "--png", &bundle.read_paths())?;
    }
    let plan = match &bundle {
        None => Planner::new(&schedule, schedule.planning_grid(args.grid))
            .and_then(|p| p.plan_with(args.seed, &PlanOptions::default()))
            .map_err(|d| ScheduleError::Invalid(Box::new(d)))?,
        Some(bundle) => {
            if let Some(g) = args.grid.filter(|&g| g != bundle.grid()) {
                bail!(
                    "--grid {g}: the --cost bundle `{}` has a {} grid, which its plan uses; leave --grid out",
                    bundle.manifest.name,
                    bundle.grid()
                );
            }
            bundle.plan(&schedule, args.seed)?
        }
    };
    let cost = match (&args.cost, &bundle) {
        (None, _) => None,
        (Some(_), Some(bundle)) => Some(plan_cost(&plan, &bundle.cost_spec())),
        (Some(name), None) => {
            use gtr_run::bundle::{NamedSpecError, cost_spec_named};
            let spec = cost_spec_named(name).map_err(|e| match e {
                NamedSpecError::Unknown(_) => anyhow::anyhow!("--cost {e}"),
                NamedSpecError::Bundle(e) => e.into(),
            })?;
            Some(plan_cost(&plan, &spec))
        }
    };
    if let Some(path) = &args.png {
        if plan.stages.len() > 1 && !report::png::has_stage_panels(&plan) {
            say!(
                "gtr-run plan: --png {}: {} stages are too many panels; the picture shows the order only",
                path.display(),
                plan.stages.len()
            );
        }
        let img = report::png::render(&plan);
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
            .context("encoding the PNG")?;
        gtr_run::fsutil::write_atomic(path, &bytes)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        let value = report::json::plan_json(&schedule, &plan, cost.as_ref());
        return write_stdout_raw(&(serde_json::to_string(&value)? + "\n"));
    }
    let mut text = report::text::report(&schedule, &plan, cost.as_ref());
    if let Some(path) = &args.png {
        text += &format!("\npicture written to {}\n", path.display());
    }
    write_stdout(&text)
}

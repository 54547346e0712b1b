//! The `gtr-run` command line.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use gtr_run::cost::plan_cost;
use gtr_run::grid::Grid;
use gtr_run::plan::Planner;
use gtr_run::report;
use gtr_run::run::Shard;
use gtr_run::schedule::{Schedule, ScheduleError};

#[derive(Parser)]
#[command(
    name = "gtr-run",
    version,
    about = "Run Masked Autoregressive image generators with .gtr schedules",
    override_usage = "gtr-run MODEL SCHEDULE [OPTIONS]\n       gtr-run plan SCHEDULE [OPTIONS]\n       gtr-run merge OUT PART_DIR... [OPTIONS]\n       gtr-run eval MODEL SCHEDULE... [OPTIONS]",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    generate: GenerateArgs,
}

/// `gtr-run MODEL SCHEDULE`: generate images.
#[derive(Args)]
struct GenerateArgs {
    /// Model bundle: its folder, its manifest.yaml, or any .onnx in it.
    #[arg(required = true)]
    model: Option<PathBuf>,
    /// The schedule file (.gtr).
    #[arg(required = true)]
    schedule: Option<PathBuf>,
    /// Number of images (1 to 10,000,000).
    #[arg(long, default_value_t = 10, value_parser = parse_image_count)]
    num_images: usize,
    /// Images per batch (does not change any image; 1 to 4096).
    #[arg(long, default_value_t = 8, value_parser = parse_batch)]
    batch: usize,
    /// Run seed; image i uses a seed derived from (seed, i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Generate every image of this class.
    #[arg(long, conflicts_with = "classes")]
    class: Option<i64>,
    /// Classes to cycle through, e.g. --classes 1,3,5 (default: balanced over all).
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<i64>>,
    /// Override a schedule parameter: --set name=value (repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_override)]
    overrides: Vec<(String, f64)>,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Output folder (default: runs/<model>-<schedule>-seed<seed>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue a previous run in the output folder, skipping images already written.
    #[arg(long, conflicts_with = "force")]
    resume: bool,
    /// Overwrite a previous run in the output folder (only a folder gtr-run
    /// wrote: one holding anything else is refused even with --force).
    #[arg(long)]
    force: bool,
    /// Take every image's token order and noise from this .npz (see README).
    #[arg(long, value_name = "FILE.npz")]
    replay: Option<PathBuf>,
    /// Make only shard K of N (K from 0: 0/4 … 3/4): a contiguous part of
    /// the images, each with its own seed and class as in the whole run;
    /// join the shards with `gtr-run merge`.
    #[arg(long, value_name = "K/N")]
    shard: Option<Shard>,
    /// Also write all images as an .npz (`arr_0`, uint8 [N, H, W, 3]), as FID
    /// evaluators read.
    #[arg(long, value_name = "PATH", conflicts_with = "shard")]
    npz: Option<PathBuf>,
}

/// Sampling and runtime options of generation and eval.
#[derive(Args)]
struct RuntimeArgs {
    /// Guidance scale, replacing the schedule's and the model's (finite, >= 0).
    #[arg(long, value_parser = parse_non_negative)]
    cfg: Option<f64>,
    /// Temperature, replacing the schedule's and the model's (finite, >= 0).
    #[arg(long, value_parser = parse_non_negative)]
    temperature: Option<f64>,
    /// Execution provider: cpu, cuda, tensorrt (strict) or auto (falls back to cpu).
    #[arg(long, value_enum, default_value_t = gtr_run::backend::Device::Cpu)]
    device: gtr_run::backend::Device,
    /// Intra-op threads per graph, and threads of gtr-run's own parallel
    /// work (default: ONNX Runtime's choice, and one per core; 1 to 1024).
    #[arg(long, value_parser = parse_threads)]
    threads: Option<usize>,
    /// Where diffusion chains run: `graph` (the bundle's sampler graph, one
    /// call per MAR step, state on the device), `host` (one head call per
    /// tick, the update on the CPU) or `auto` (the graph when the bundle has
    /// one and a GPU provider runs it; the host path on the CPU provider).
    #[arg(long, value_enum, default_value_t = gtr_run::backend::ChainRunner::Auto)]
    sampler: gtr_run::backend::ChainRunner,
    /// Ticks per sampler-graph call (default: a whole chain per call; 1 is
    /// a per-tick call with the update still in the graph).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    sampler_ticks: Option<u32>,
    /// How the backbone runs: `fused` (the bundle's backbone graph: encoder
    /// and decoder in one call, only the predicted tokens' z returned),
    /// `split` (the two graphs, z gathered on the host) or `auto` (fused
    /// when the bundle has the graph and a GPU provider runs it; split on
    /// the CPU provider, where it has not been shown faster).
    #[arg(long, value_enum, default_value_t = gtr_run::backend::BackboneRunner::Auto)]
    backbone: gtr_run::backend::BackboneRunner,
    /// Numeric precision: fp32, tf32 (CUDA), fp16, bf16, int8 (CPU); fp16/bf16/int8
    /// need the bundle's variant graphs (models/convert_precision.py). Default:
    /// the manifest's `precision`, else fp32.
    #[arg(long, value_parser = parse_precision)]
    precision: Option<gtr_run::precision::Precision>,
    /// TensorRT's engine and timing cache folder (default: <cache>/tensorrt,
    /// the cache being $GTR_RUN_CACHE, $XDG_CACHE_HOME/gtr-run or ~/.cache/gtr-run).
    #[arg(long, value_name = "DIR")]
    trt_cache: Option<PathBuf>,
}

/// Loads the bundle's graphs as `runtime` asks, saying once where the
/// diffusion chains will run.
fn load_model(
    bundle: &gtr_run::bundle::Bundle,
    runtime: &RuntimeArgs,
    options: &gtr_run::backend::LoadOptions,
) -> anyhow::Result<gtr_run::backend::OrtModel> {
    if let Some(threads) = runtime.threads {
        gtr_run::engine::set_host_threads(threads);
    }
    let (model, note) = gtr_run::backend::OrtModel::load_with(bundle, options)?
        .run_chains(runtime.sampler, bundle)?;
    if let Some(note) = note {
        eprintln!("gtr-run: {note}");
    }
    let model = model.run_backbone(runtime.backbone, bundle)?;
    Ok(model)
}

impl RuntimeArgs {
    /// How to load `bundle`: device, threads, precision and TensorRT's
    /// settings, with TensorRT's profiles taken from `plans` at `batch`.
    fn load_options(
        &self,
        bundle: &gtr_run::bundle::Bundle,
        plans: &[&gtr_run::plan::Plan],
        batch: usize,
    ) -> anyhow::Result<gtr_run::backend::LoadOptions> {
        use gtr_run::backend::{Device, LoadOptions, tensorrt::ShapeRanges};
        let device = self.device;
        if self.trt_cache.is_some() && !matches!(device, Device::TensorRt | Device::Auto) {
            bail!(
                "--trt-cache is TensorRT's engine cache; it applies with --device tensorrt (or auto), not --device {}",
                self.device
            );
        }
        let precision = gtr_run::backend::precision_choice::choose(bundle, self.precision, device)?;
        Ok(LoadOptions {
            device,
            threads: self.threads,
            precision,
            tensorrt_cache: self.trt_cache.clone(),
            shape_ranges: matches!(device, Device::TensorRt | Device::Auto)
                .then(|| ShapeRanges::from_plans(plans, batch)),
        })
    }
}

/// The most images one command makes (the labels and file names of a run
/// are planned up front).
const MAX_IMAGES: usize = 10_000_000;

/// A whole number in `min..=max`, or an error saying the range.
fn parse_in_range(s: &str, min: usize, max: usize) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("`{s}` is not a whole number from {min} to {max}")),
    }
}

fn parse_image_count(s: &str) -> Result<usize, String> {
    parse_in_range(s, 1, MAX_IMAGES)
}

fn parse_batch(s: &str) -> Result<usize, String> {
    parse_in_range(s, 1, 4096)
}

fn parse_threads(s: &str) -> Result<usize, String> {
    parse_in_range(s, 1, 1024)
}

/// A finite number >= 0 (guidance scales and temperatures).
fn parse_non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not a finite number >= 0")),
        Err(_) => Err(format!("`{s}` is not a number")),
    }
}

fn parse_precision(s: &str) -> Result<gtr_run::precision::Precision, String> {
    s.parse()
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

#[derive(Args)]
struct EvalArgs {
    /// Model bundle: its folder, its manifest.yaml, or any .onnx in it.
    model: PathBuf,
    /// Schedule files; the first is the baseline of the speed-up columns.
    #[arg(required = true, value_name = "SCHEDULE")]
    schedules: Vec<PathBuf>,
    /// Override a parameter of every schedule that declares it: --set name=value.
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_override)]
    overrides: Vec<(String, f64)>,
    #[command(flatten)]
    compare: CompareArgs,
}

#[derive(Args)]
struct SweepArgs {
    /// Model bundle: its folder, its manifest.yaml, or any .onnx in it.
    model: PathBuf,
    /// The schedule file whose parameters are swept.
    schedule: PathBuf,
    /// A parameter and its values: --set name=v1,v2,... (repeat for a grid;
    /// the first setting is the baseline).
    #[arg(long = "set", value_name = "NAME=V1,V2,...", required = true)]
    axes: Vec<gtr_run::eval::sweep::SweepAxis>,
    #[command(flatten)]
    compare: CompareArgs,
}

/// How `eval` and `sweep` run their comparison.
#[derive(Args)]
struct CompareArgs {
    /// Images per schedule (and per repeat), balanced over the classes (1 to 10,000,000).
    #[arg(long, default_value_t = 100, value_parser = parse_image_count)]
    num_images: usize,
    /// Images per batch; schedules take turns batch by batch (1 to 4096).
    #[arg(long, default_value_t = 25, value_parser = parse_batch)]
    batch: usize,
    /// Run seed; repeat r uses seed + r, the same for every schedule.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Repeat the whole comparison with seeds seed, seed+1, … and report the spread.
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Folder for the table (NAME.md, NAME.csv, NAME.json; sweep also
    /// pareto.svg), NAME being eval or sweep (default: runs/NAME-<model>-seed<seed>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace the results of a previous evaluation in the folder.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct MergeArgs {
    /// The merged folder to create.
    out: PathBuf,
    /// The shards' output folders, in any order.
    #[arg(required = true, value_name = "PART_DIR")]
    parts: Vec<PathBuf>,
    /// Also write all images as an .npz (`arr_0`, uint8 [N, H, W, 3]).
    #[arg(long, value_name = "PATH")]
    npz: Option<PathBuf>,
    /// Replace OUT if it holds a previous run (and nothing else).
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct PlanArgs {
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
    /// Add the analytic cost on a model: mar-b, mar-l, mar-h, or a model bundle.
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
                _ => eprintln!("error: {e:#}"),
            }
            ExitCode::from(exit_status(&e) as u8)
        }
    }
}

/// How a command ended (README, "Exit status").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExitStatus {
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

/// The status of a failure: the first cause in `e`'s chain whose type says
/// what went wrong; a message of the front end's own is a usage error.
fn exit_status(e: &anyhow::Error) -> ExitStatus {
    use ExitStatus::{Input, Runtime};
    use gtr_run::backend::{OrtError, library::LibraryError};
    use gtr_run::engine::{EngineError, replay::ReplayError};
    use gtr_run::eval::{CompareError, ContenderError};
    use gtr_run::run::RunError;
    for cause in e.chain() {
        let status = if cause.is::<ScheduleError>()
            || cause.is::<gtr_run::bundle::BundleError>()
            || cause.is::<ReplayError>()
            || cause.is::<ContenderError>()
            || cause.is::<gtr_run::backend::precision_choice::PrecisionError>()
            || cause.is::<gtr_run::bundle::NamedSpecError>()
        {
            Some(Input)
        } else if cause.is::<LibraryError>()
            || cause.is::<std::io::Error>()
            || cause.is::<gtr_run::engine::ModelError>()
            || cause.is::<gtr_run::eval::stats::StatsError>()
        {
            Some(Runtime)
        } else if let Some(e) = cause.downcast_ref::<RunError>() {
            match e {
                RunError::Invalid(_) | RunError::Schedule(_) | RunError::Replay(_) => Some(Input),
                RunError::Write { .. } => Some(Runtime),
                RunError::Engine(_) => None,
            }
        } else if let Some(e) = cause.downcast_ref::<EngineError>() {
            Some(match e {
                EngineError::Input(_) => Input,
                _ => Runtime,
            })
        } else if let Some(e) = cause.downcast_ref::<OrtError>() {
            match e {
                OrtError::Runtime(_) | OrtError::Session { .. } | OrtError::Library(_) => {
                    Some(Runtime)
                }
                _ => Some(Input),
            }
        } else if let Some(e) = cause.downcast_ref::<CompareError>() {
            match e {
                CompareError::Schedule { .. } | CompareError::Unfit { .. } => Some(Input),
                CompareError::Invalid(_) => Some(ExitStatus::Usage),
                _ => None,
            }
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

/// `plan --snapshot --check` found differences (the report is the message).
#[derive(Debug, thiserror::Error)]
#[error("snapshots differ\n{0}")]
struct SnapshotsDiffer(String);

/// The schedules `eval` compares (see [`gtr_run::eval::contenders`]),
/// each checked against the bundle's grid.
fn eval_contenders(
    paths: &[PathBuf],
    overrides: Vec<(String, f64)>,
    bundle: &gtr_run::bundle::Bundle,
) -> anyhow::Result<Vec<gtr_run::eval::Contender>> {
    use gtr_run::eval::{ContenderError, contenders};
    if paths.iter().any(|p| p.as_os_str() == "-") {
        bail!(
            "SCHEDULE `-`: standard input is read by `gtr-run plan -`; eval takes schedule files"
        );
    }
    let overrides: BTreeMap<String, f64> = overrides.into_iter().collect();
    let contenders = contenders(paths, &overrides).map_err(|e| match e {
        // Kept as a ScheduleError so that a diagnostic prints as one.
        ContenderError::Schedule(e) => anyhow::Error::from(e),
        other => other.into(),
    })?;
    for c in &contenders {
        c.schedule
            .check_model_grid(bundle.grid(), &bundle.manifest.name)
            .map_err(|m| anyhow::anyhow!(m))?;
    }
    Ok(contenders)
}

impl RuntimeArgs {
    /// Plan options from the bundle's sampling defaults and `--cfg` /
    /// `--temperature`.
    fn plan_options(&self, bundle: &gtr_run::bundle::Bundle) -> gtr_run::plan::PlanOptions {
        gtr_run::plan::PlanOptions {
            default_cfg: Some(bundle.manifest.sampling.cfg),
            default_temperature: Some(bundle.manifest.sampling.temperature),
            cfg: self.cfg,
            temperature: self.temperature,
        }
    }

    /// How to load `bundle` for `schedules` planned with `seed`, at `batch`.
    fn load_options_for(
        &self,
        bundle: &gtr_run::bundle::Bundle,
        schedules: &[&Schedule],
        seed: u64,
        batch: usize,
    ) -> anyhow::Result<gtr_run::backend::LoadOptions> {
        let planning = self.plan_options(bundle);
        let plans = schedules
            .iter()
            .map(|s| {
                Planner::new(s, bundle.grid())
                    .and_then(|p| p.plan_with(seed, &planning))
                    .map_err(|d| ScheduleError::Invalid(Box::new(d)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let plans: Vec<&gtr_run::plan::Plan> = plans.iter().collect();
        self.load_options(bundle, &plans, batch)
    }
}

fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let bundle = gtr_run::bundle::Bundle::open(&args.model)?;
    let contenders = eval_contenders(&args.schedules, args.overrides, &bundle)?;
    run_comparison("eval", &bundle, &contenders, args.compare)?;
    Ok(())
}

fn run_sweep(args: SweepArgs) -> anyhow::Result<()> {
    use gtr_run::eval::sweep;
    let bundle = gtr_run::bundle::Bundle::open(&args.model)?;
    if args.schedule.as_os_str() == "-" {
        bail!(
            "SCHEDULE `-`: standard input is read by `gtr-run plan -`; sweep takes a schedule file"
        );
    }
    let contenders = sweep::contenders(&args.schedule, &args.axes)?;
    for c in &contenders {
        c.schedule
            .check_model_grid(bundle.grid(), &bundle.manifest.name)
            .map_err(|m| anyhow::anyhow!(m))?;
    }
    let (comparison, out) = run_comparison("sweep", &bundle, &contenders, args.compare)?;
    match sweep::pareto_svg(&comparison) {
        Some(svg) => {
            let path = out.join("pareto.svg");
            gtr_run::fsutil::write_atomic(&path, svg.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "gtr-run sweep: the trade-off is drawn in {}",
                path.display()
            );
        }
        None => eprintln!(
            "gtr-run sweep: bundle `{}` has no evaluator, so there is no quality to draw against speed (the table has speed and cost)",
            bundle.manifest.name
        ),
    }
    Ok(())
}

/// Runs `contenders` on `bundle` as `args` asks and writes the table as
/// `WHAT.md`, `WHAT.csv` and `WHAT.json` in the output folder (printing the
/// Markdown); returns the comparison and the folder.
fn run_comparison(
    what: &str,
    bundle: &gtr_run::bundle::Bundle,
    contenders: &[gtr_run::eval::Contender],
    args: CompareArgs,
) -> anyhow::Result<(gtr_run::eval::Comparison, PathBuf)> {
    use gtr_run::backend::OrtEvaluator;
    use gtr_run::engine::{Engine, MarModel};
    use gtr_run::eval::{CompareRequest, Scoring, compare, reference_stats, report};
    use gtr_run::fsutil::write_atomic;

    let device = args.runtime.device;
    let schedules: Vec<&Schedule> = contenders.iter().map(|c| &c.schedule).collect();
    let options = args
        .runtime
        .load_options_for(bundle, &schedules, args.seed, args.batch)?;
    let model = load_model(bundle, &args.runtime, &options)?;
    let settings = model.settings();
    let info = model.info().clone();
    // The evaluator measures quality: it always runs its fp32 graph.
    let mut evaluator = OrtEvaluator::load(bundle, device, args.runtime.threads)?;
    let reference = reference_stats(bundle)?;
    let out = args.out.unwrap_or_else(|| {
        PathBuf::from("runs").join(format!(
            "{what}-{}-seed{}",
            bundle.manifest.name.replace(['/', '\\', ' '], "_"),
            args.seed
        ))
    });
    let json_path = out.join(format!("{what}.json"));
    if json_path.exists() && !args.force {
        bail!(
            "{} holds a previous evaluation; give --force to replace it or --out for another folder",
            out.display()
        );
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!(
        "gtr-run {what}: model {} ({}), {} schedule(s), {} images each × {} repeat(s), seed {}{} -> {}",
        info.name,
        options.precision.precision,
        contenders.len(),
        args.num_images,
        args.repeats,
        args.seed,
        match &bundle.manifest.evaluator {
            Some(e) => format!(", evaluator {}", e.name),
            None => ", no evaluator (speed and cost only)".into(),
        },
        out.display()
    );
    let request = CompareRequest {
        num_images: args.num_images,
        batch: args.batch,
        seed: args.seed,
        repeats: args.repeats,
        options: args.runtime.plan_options(bundle),
        warm_up: true,
    };
    let scoring = match (evaluator.as_mut(), reference.as_ref()) {
        (Some(evaluator), Some(reference)) => Some(Scoring {
            evaluator,
            reference,
        }),
        _ => None,
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} batches ({eta} left)")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut engine = Engine::new(model);
    engine.ticks_per_call = args.runtime.sampler_ticks.map(|n| n as usize);
    let comparison = compare(
        &mut engine,
        scoring,
        contenders,
        &bundle.cost_spec(),
        &request,
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    let table = report::markdown(&comparison);
    for (extension, text) in [
        ("md", table.clone()),
        ("csv", report::csv(&comparison)),
        (
            "json",
            serde_json::to_string_pretty(&{
                let mut v = report::json(&comparison);
                v["runtime_settings"] = settings.clone();
                v
            })? + "\n",
        ),
    ] {
        let path = out.join(format!("{what}.{extension}"));
        write_atomic(&path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    write_stdout(&table)?;
    eprintln!(
        "gtr-run {what}: wrote {what}.md, {what}.csv and {what}.json to {}",
        out.display()
    );
    Ok((comparison, out))
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    use gtr_run::bundle::Bundle;
    use gtr_run::run::{Classes, Existing, RunRequest, default_out_dir, generate};

    let (Some(model_path), Some(schedule_path)) = (args.model, args.schedule) else {
        bail!("give a MODEL and a SCHEDULE (see --help)");
    };
    let bundle = Bundle::open(&model_path)?;
    // Check the schedule before loading any graph.
    let overrides: BTreeMap<String, f64> = args.overrides.into_iter().collect();
    if schedule_path.as_os_str() == "-" {
        bail!(
            "SCHEDULE `-`: standard input is read by `gtr-run plan -`; generation takes a schedule file"
        );
    }
    let schedule = Schedule::from_file(&schedule_path, &overrides)?;
    schedule
        .check_model_grid(bundle.grid(), &bundle.manifest.name)
        .map_err(|m| anyhow::anyhow!(m))?;
    let options = args.runtime.load_options_for(
        &bundle,
        &[&schedule],
        args.seed,
        args.batch.min(args.num_images).max(1),
    )?;
    let model = load_model(&bundle, &args.runtime, &options)?;
    let settings = model.settings();
    let out = args.out.unwrap_or_else(|| {
        default_out_dir(&bundle.manifest.name, &schedule_path, args.seed, args.shard)
    });
    let request = RunRequest {
        schedule,
        num_images: args.num_images,
        batch: args.batch,
        seed: args.seed,
        classes: match (args.class, args.classes) {
            (Some(c), _) => Classes::One(c),
            (None, Some(list)) if !list.is_empty() => Classes::List(list),
            _ => Classes::Balanced,
        },
        cfg: args.runtime.cfg,
        temperature: args.runtime.temperature,
        out: out.clone(),
        existing: if args.resume {
            Existing::Resume
        } else if args.force {
            Existing::Overwrite
        } else {
            Existing::Refuse
        },
        replay: args.replay,
        device_requested: args.runtime.device.name().into(),
        runtime_settings: settings,
        shard: args.shard,
        npz: args.npz,
        ticks_per_call: args.runtime.sampler_ticks.map(|n| n as usize),
    };
    let part = match request.shard {
        Some(s) => {
            let r = s.range(request.num_images);
            format!(
                ", shard {s}: images {}..{} of {}",
                r.start, r.end, request.num_images
            )
        }
        None => format!(", {} images", request.num_images),
    };
    eprintln!(
        "gtr-run: model {} ({}), schedule {}, seed {}{part} -> {}",
        bundle.manifest.name,
        options.precision.precision,
        request.schedule.source.name,
        request.seed,
        out.display()
    );
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} images, {elapsed} elapsed, eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut made = 0;
    let record = generate(&bundle, model, &request, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        made = total;
    })?;
    bar.finish_and_clear();
    let measured = record
        .measured
        .context("the run finished without measurements")?;
    let files = match (&request.shard, &request.npz) {
        (Some(_), _) => "run.json".to_string(),
        (None, Some(npz)) => format!("grid.png, run.json and {}", npz.display()),
        (None, None) => "grid.png and run.json".to_string(),
    };
    write_stdout(&format!(
        "wrote {made} images, {files} to {} (seed {}, {} MAR steps on {}, {:.2} s)\n",
        out.display(),
        request.seed,
        record.mar_steps,
        measured.execution_provider.as_deref().unwrap_or("?"),
        measured.seconds.wall
    ))
}

fn run_merge(args: MergeArgs) -> anyhow::Result<()> {
    use gtr_run::run::merge::{MergeRequest, merge};
    let request = MergeRequest {
        out: args.out,
        parts: args.parts,
        npz: args.npz,
        force: args.force,
    };
    let record = merge(&request)?;
    let npz = match &request.npz {
        Some(npz) => format!(" and {}", npz.display()),
        None => String::new(),
    };
    write_stdout(&format!(
        "merged {} parts: {} images, grid.png, run.json{npz} in {}\n",
        request.parts.len(),
        record.num_images,
        request.out.display()
    ))
}

fn run_plan(args: PlanArgs) -> anyhow::Result<()> {
    if args.check && args.snapshot.is_none() {
        bail!("--check compares a folder's snapshots: use it with --snapshot DIR");
    }
    let Some(path) = &args.schedule else {
        let dir = args
            .snapshot
            .as_deref()
            .unwrap_or(std::path::Path::new("."));
        let outcomes = gtr_run::snapshot::snapshot_dir(dir, args.check)?;
        return match gtr_run::snapshot::summary(dir, &outcomes) {
            Ok(text) => write_stdout(&text),
            Err(text) => Err(SnapshotsDiffer(text.trim_end().to_string()).into()),
        };
    };
    let overrides: BTreeMap<String, f64> = args.overrides.into_iter().collect();
    let schedule = Schedule::from_file(path, &overrides)?;
    let grid = schedule.planning_grid(args.grid);
    let plan = Planner::new(&schedule, grid)
        .and_then(|p| p.plan(args.seed))
        .map_err(|d| ScheduleError::Invalid(Box::new(d)))?;
    let cost = match &args.cost {
        None => None,
        Some(name) => {
            use gtr_run::bundle::{NamedSpecError, cost_spec_named};
            let spec = cost_spec_named(name).map_err(|e| match e {
                NamedSpecError::Unknown(_) => anyhow::anyhow!("--cost {e}"),
                NamedSpecError::Bundle(e) => e.into(),
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

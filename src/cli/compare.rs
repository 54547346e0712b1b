//! `gtr-run eval` and `gtr-run sweep`: schedules compared on one model, and
//! the table written.

use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use gtr_run::run::precision_suffix;
use gtr_run::schedule::Schedule;

use super::runtime::{
    RuntimeArgs, load_model, parse_batch, parse_image_count, parse_override, parse_repeats,
};
use super::{say, write_stdout};

#[derive(Args)]
pub struct EvalArgs {
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
pub struct SweepArgs {
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
    #[arg(long, default_value_t = 100, value_parser = parse_image_count, allow_negative_numbers = true)]
    num_images: usize,
    /// Images per batch; schedules take turns batch by batch (1 to 4096).
    #[arg(long, default_value_t = 25, value_parser = parse_batch, allow_negative_numbers = true)]
    batch: usize,
    /// Run seed; repeat r uses seed + r, the same for every schedule.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,
    /// Repeat the whole comparison with seeds seed, seed+1, … and report the spread (1 to 10,000).
    #[arg(long, default_value_t = 1, value_parser = parse_repeats, allow_negative_numbers = true)]
    repeats: usize,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Folder for the table (NAME.md, NAME.csv, NAME.json; sweep also
    /// pareto.svg), NAME being eval or sweep (default:
    /// runs/NAME-<model>-seed<seed>, with -<precision> for one other than fp32).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace the results of a previous evaluation in the folder.
    #[arg(long)]
    force: bool,
    /// When each batch's VAE decode runs, as for generation: `overlap`
    /// (while the next batch, the next schedule's turn, samples; a batch
    /// is then timed by its sampling and the part of its decode that was
    /// waited for), `inline` or `auto` (overlap on GPU providers). Same
    /// images either way.
    #[arg(long, value_enum, default_value_t = gtr_run::backend::VaeRunner::Auto)]
    vae: gtr_run::backend::VaeRunner,
}

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
    let overrides = super::runtime::overrides_map(overrides)?;
    let contenders = contenders(paths, &overrides).map_err(|e| match e {
        // Kept as a ScheduleError so that a diagnostic prints as one.
        ContenderError::Schedule(e) => anyhow::Error::from(e),
        other => other.into(),
    })?;
    for c in &contenders {
        c.schedule
            .check_model_grid(bundle.grid(), &bundle.manifest.name)?;
    }
    Ok(contenders)
}

pub fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let (bundle, bundle_lock) = gtr_run::bundle::Bundle::open_locked(&args.model)?;
    let contenders = eval_contenders(&args.schedules, args.overrides, &bundle)?;
    run_comparison("eval", (&bundle, bundle_lock), &contenders, args.compare)?;
    Ok(())
}

pub fn run_sweep(args: SweepArgs) -> anyhow::Result<()> {
    use gtr_run::eval::sweep;
    let (bundle, bundle_lock) = gtr_run::bundle::Bundle::open_locked(&args.model)?;
    if args.schedule.as_os_str() == "-" {
        bail!(
            "SCHEDULE `-`: standard input is read by `gtr-run plan -`; sweep takes a schedule file"
        );
    }
    let contenders = sweep::contenders(&args.schedule, &args.axes).map_err(|e| match e {
        // Kept as a ScheduleError (exit 3); the axes are the command line's (exit 2).
        sweep::SweepError::Schedule(e) => anyhow::Error::from(e),
        sweep::SweepError::Axes(m) => anyhow::anyhow!(m),
    })?;
    for c in &contenders {
        c.schedule
            .check_model_grid(bundle.grid(), &bundle.manifest.name)?;
    }
    let (comparison, out, _lock) =
        run_comparison("sweep", (&bundle, bundle_lock), &contenders, args.compare)?;
    match sweep::pareto_svg(&comparison) {
        Some(svg) => {
            let path = out.join("pareto.svg");
            gtr_run::fsutil::write_atomic(&path, svg.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            say!(
                "gtr-run sweep: the trade-off is drawn in {}",
                path.display()
            );
        }
        None => say!(
            "gtr-run sweep: bundle `{}` has no evaluator, so there is no quality to draw against speed (the table has speed and cost)",
            bundle.manifest.name
        ),
    }
    Ok(())
}

/// Runs `contenders` on `bundle` as `args` asks and writes the table as
/// `WHAT.md`, `WHAT.csv` and `WHAT.json` in the output folder (printing the
/// Markdown); returns the comparison, the folder and its lock (held until
/// every file is written). The folder is taken before any image is made
/// ([`claim_report`]). The bundle's read lock is released once the model,
/// the evaluator and its reference are read.
fn run_comparison(
    what: &str,
    (bundle, bundle_lock): (&gtr_run::bundle::Bundle, gtr_run::bundle::BundleReadLock),
    contenders: &[gtr_run::eval::Contender],
    args: CompareArgs,
) -> anyhow::Result<(
    gtr_run::eval::Comparison,
    PathBuf,
    gtr_run::fsutil::FolderLock,
)> {
    use gtr_run::backend::{OrtEvaluator, features_of};
    use gtr_run::engine::{Engine, MarModel};
    use gtr_run::eval::{CompareRequest, Scoring, reference_stats, report};
    use gtr_run::run::claim_report;

    let device = args.runtime.device;
    let schedules: Vec<&Schedule> = contenders.iter().map(|c| &c.schedule).collect();
    // TensorRT's profiles for the batches eval makes: none larger than the
    // images (as generation caps them).
    let batch = args.batch.min(args.num_images).max(1);
    let options = args
        .runtime
        .load_options_for(bundle, &schedules, args.seed, batch)?;
    let model = load_model(bundle, &args.runtime, &options)?;
    let settings = model.settings();
    let info = model.info().clone();
    // The evaluator measures quality: it always runs its fp32 graph.
    let mut evaluator = OrtEvaluator::load(bundle, device, args.runtime.threads)?;
    let reference = reference_stats(bundle, evaluator.as_ref().and_then(features_of))?;
    drop(bundle_lock);
    let request = CompareRequest {
        num_images: args.num_images,
        batch: args.batch,
        seed: args.seed,
        repeats: args.repeats,
        options: args.runtime.plan_options(bundle),
        warm_up: true,
        vae: args.vae,
    };
    // Before the folder is taken: a usage error changes nothing.
    gtr_run::eval::check_request(&request, contenders.len(), reference.is_some())?;
    gtr_run::eval::vae_decode(&model, args.vae)?;
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(format!(
            "{what}-{}-seed{}{}",
            bundle.manifest.name.replace(['/', '\\', ' '], "_"),
            args.seed,
            precision_suffix(options.precision.precision)
        ))
    });
    // What the folder holds: the table (below) and a sweep's drawing.
    let names = gtr_run::run::report_files(what);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    gtr_run::run::check_outside_inputs(&out, "--out", &bundle.read_paths())?;
    let lock = claim_report(&out, &names, &format!("gtr-run {what}"), args.force)?;
    say!(
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
    let scoring = match (evaluator.as_mut(), reference.as_ref()) {
        (Some(evaluator), Some(reference)) => Some(Scoring {
            evaluator,
            reference,
        }),
        _ => None,
    };
    let ticks_per_call = args.runtime.ticks_per_call(&model);
    let mut engine = Engine::new(model);
    engine.ticks_per_call = ticks_per_call;
    let json = |comparison: &gtr_run::eval::Comparison| {
        let mut json = report::json(comparison);
        json["runtime_settings"] = settings.clone();
        json["schedules"] = report::contenders_json(contenders);
        json["cfg_override"] = args.runtime.cfg.into();
        json["temperature_override"] = args.runtime.temperature.into();
        json
    };
    let comparison = compare_writing_json(
        &mut engine,
        scoring,
        contenders,
        (&bundle.cost_spec(), &request),
        &out.join(format!("{what}.json")),
        json,
    )?;
    write_report(&out, what, &comparison, &json(&comparison))?;
    Ok((comparison, out, lock))
}

/// [`gtr_run::eval::compare`] with a progress bar of the batches,
/// rewriting `json_path` with `json` of the comparison so far
/// (`finished: false`) after the first batch, then at most every
/// [`PARTIAL_JSON_SECONDS`], and after each repeat's quality and a failure
/// (the count reported again), so that a run stopped partway leaves what
/// it measured; a failed write stops the comparison and is the error.
fn compare_writing_json<M: gtr_run::engine::MarModel>(
    engine: &mut gtr_run::engine::Engine<M>,
    scoring: Option<gtr_run::eval::Scoring<'_>>,
    contenders: &[gtr_run::eval::Contender],
    (cost_spec, request): (&gtr_run::cost::ModelSpec, &gtr_run::eval::CompareRequest),
    json_path: &std::path::Path,
    json: impl Fn(&gtr_run::eval::Comparison) -> serde_json::Value,
) -> anyhow::Result<gtr_run::eval::Comparison> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} batches ({eta} left)")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut write_error = None;
    let mut written: Option<std::time::Instant> = None;
    let mut last_done = None;
    let comparison = gtr_run::eval::compare(
        engine,
        scoring,
        contenders,
        cost_spec,
        request,
        |so_far, done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            let due = written.is_none_or(|at| at.elapsed().as_secs_f64() >= PARTIAL_JSON_SECONDS);
            // The same count again: a repeat's quality, or the last state
            // before a failure; written whatever the time.
            let again = last_done.replace(done) == Some(done);
            if done == 0 || !(due || again) {
                return ControlFlow::Continue(());
            }
            match write_json(json_path, &json(so_far)) {
                Ok(()) => {
                    written = Some(std::time::Instant::now());
                    ControlFlow::Continue(())
                }
                Err(e) => {
                    write_error = Some(e);
                    ControlFlow::Break(())
                }
            }
        },
    );
    bar.finish_and_clear();
    match (comparison, write_error) {
        // The failed write stopped the comparison: it is the error.
        (Ok(_) | Err(gtr_run::eval::CompareError::Stopped), Some(e)) => Err(e),
        // A batch failed, and writing what came before it failed too: the
        // batch's error is the run's (its exit status), the write's said.
        (Err(e), Some(write)) => {
            say!("gtr-run: the results before the failure were not kept: {write:#}");
            Err(e.into())
        }
        (comparison, None) => Ok(comparison?),
    }
}

/// Seconds at least between two rewrites of a comparison's partial JSON
/// (each holds every batch's time so far: written after every batch, a
/// long run of small batches would spend its time writing).
const PARTIAL_JSON_SECONDS: f64 = 5.0;

/// Writes `json` to `path` (atomically, pretty-printed).
fn write_json(path: &std::path::Path, json: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(json)? + "\n";
    gtr_run::fsutil::write_atomic(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes `comparison` as `WHAT.md`, `WHAT.csv` and `json` as `WHAT.json`
/// into `out`, and prints the Markdown table.
fn write_report(
    out: &std::path::Path,
    what: &str,
    comparison: &gtr_run::eval::Comparison,
    json: &serde_json::Value,
) -> anyhow::Result<()> {
    use gtr_run::eval::report;
    let table = report::markdown(comparison);
    for (extension, text) in [("md", table.clone()), ("csv", report::csv(comparison))] {
        let path = out.join(format!("{what}.{extension}"));
        gtr_run::fsutil::write_atomic(&path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    write_json(&out.join(format!("{what}.json")), json)?;
    write_stdout(&table)?;
    say!(
        "gtr-run {what}: wrote {what}.md, {what}.csv and {what}.json to {}",
        out.display()
    );
    Ok(())
}

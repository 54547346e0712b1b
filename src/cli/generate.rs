//! `gtr-run MODEL SCHEDULE` (images into a run folder) and `gtr-run merge`
//! (a run's shards joined).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use gtr_run::run::{Shard, model_digest};
use gtr_run::schedule::Schedule;

use super::runtime::{RuntimeArgs, load_model, parse_batch, parse_image_count, parse_override};
use super::{say, write_stdout};

/// `gtr-run MODEL SCHEDULE`: generate images.
#[derive(Args)]
pub struct GenerateArgs {
    /// Model bundle: its folder, its manifest.yaml, or any .onnx in it.
    #[arg(required = true)]
    model: Option<PathBuf>,
    /// The schedule file (.gtr).
    #[arg(required = true)]
    schedule: Option<PathBuf>,
    /// Number of images (1 to 10,000,000).
    #[arg(long, default_value_t = 10, value_parser = parse_image_count, allow_negative_numbers = true)]
    num_images: usize,
    /// Images per batch (does not change any image; 1 to 4096).
    #[arg(long, default_value_t = 8, value_parser = parse_batch, allow_negative_numbers = true)]
    batch: usize,
    /// Run seed; image i uses a seed derived from (seed, i).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,
    /// Generate every image of this class (the model's null class: unconditional images).
    #[arg(long, conflicts_with = "classes", allow_negative_numbers = true)]
    class: Option<i64>,
    /// Classes to cycle through, e.g. --classes 1,3,5 (default: balanced over all).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    classes: Option<Vec<i64>>,
    /// Override a schedule parameter: --set name=value (repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_override)]
    overrides: Vec<(String, f64)>,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Output folder (default: runs/<model>-<schedule>-seed<seed>, with -<precision> for one other than fp32).
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
    /// Have ONNX Runtime profile every kernel call into DIR (created if
    /// missing; one `<graph>_<timestamp>.json` per graph) and summarise it
    /// in run.json (`graphs[].kernels`: the execution provider of each node,
    /// time by op type). Profiling slows the run; profile a few images.
    #[arg(long, value_name = "DIR")]
    ort_profile: Option<PathBuf>,
    /// When each batch's VAE decode (and its PNGs) runs: `overlap` (on a
    /// thread of its own while the next batch's MAR steps run), `inline`
    /// (after the batch's MAR steps) or `auto` (overlap on GPU providers,
    /// inline on the CPU provider, where both share its cores, and
    /// beside CUDA graphs' capture, `--sampler ticks` on cuda, which
    /// refuses `overlap`). Same images either way.
    #[arg(long, value_enum, default_value_t = gtr_run::backend::VaeRunner::Auto)]
    vae: gtr_run::backend::VaeRunner,
}

#[derive(Args)]
pub struct MergeArgs {
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

pub fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    use gtr_run::bundle::Bundle;
    use gtr_run::run::{Classes, Existing, RunRequest, default_out_dir, generate};

    let (Some(model_path), Some(schedule_path)) = (args.model, args.schedule) else {
        bail!("give a MODEL and a SCHEDULE (see --help)");
    };
    // Options that do not go together, before the model is opened.
    if let Some(problem) = args.shard.and_then(|s| s.unfit(args.num_images)) {
        bail!(problem);
    }
    // Held until the graphs are loaded and hashed: no model tool changes
    // the bundle meanwhile.
    let (bundle, bundle_lock) = Bundle::open_locked(&model_path)?;
    // Check the schedule before loading any graph.
    let overrides = super::runtime::overrides_map(args.overrides)?;
    if schedule_path.as_os_str() == "-" {
        bail!(
            "SCHEDULE `-`: standard input is read by `gtr-run plan -`; generation takes a schedule file"
        );
    }
    let schedule = Schedule::from_file(&schedule_path, &overrides)?;
    schedule.check_model_grid(bundle.grid(), &bundle.manifest.name)?;
    let mut options = args.runtime.load_options_for(
        &bundle,
        &[&schedule],
        args.seed,
        args.batch.min(args.num_images).max(1),
    )?;
    let classes = match (args.class, args.classes) {
        (Some(c), _) => Classes::One(c),
        (None, Some(list)) if !list.is_empty() => Classes::List(list),
        _ => Classes::Balanced,
    };
    // A class the model lacks, before the model is loaded.
    classes.check(&bundle.model_info())?;
    let out = args.out.unwrap_or_else(|| {
        default_out_dir(
            &bundle.manifest.name,
            &schedule_path,
            args.seed,
            options.precision.precision,
            args.shard,
        )
    });
    if let Some(dir) = &args.ort_profile {
        gtr_run::run::check_outside_run(dir, "--ort-profile", &out)?;
        gtr_run::run::check_outside_inputs(dir, "--ort-profile", &bundle.read_paths())?;
        options.profile_dir = Some(profile_dir(dir)?);
    }
    let existing = if args.resume {
        Existing::Resume
    } else if args.force {
        Existing::Overwrite
    } else {
        Existing::Refuse
    };
    // Before the model loads (minutes for a large one under TensorRT).
    gtr_run::run::check_outputs(
        &bundle,
        &out,
        args.npz.as_deref(),
        args.replay.as_deref(),
        args.shard.is_some(),
        existing,
    )?;
    let (model, model_sha256) = load_hashed(&bundle, &args.runtime, &options)?;
    drop(bundle_lock);
    let settings = model.settings();
    let request = RunRequest {
        schedule,
        num_images: args.num_images,
        batch: args.batch,
        seed: args.seed,
        classes,
        cfg: args.runtime.cfg,
        temperature: args.runtime.temperature,
        out: out.clone(),
        existing,
        replay: args.replay,
        device_requested: args.runtime.device.name().into(),
        runtime_settings: settings,
        shard: args.shard,
        npz: args.npz,
        ticks_per_call: args.runtime.ticks_per_call(&model),
        vae: args.vae,
        model_sha256: Some(model_sha256),
    };
    say!(
        "gtr-run: model {} ({}), schedule {}, seed {}{} -> {}",
        bundle.manifest.name,
        options.precision.precision,
        request.schedule.source.name,
        request.seed,
        images_part(&request),
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
    print_kernel_profiles(&measured.graphs);
    write_stdout(&format!(
        "wrote {}, {} to {} (seed {}, {} MAR steps on {}, {:.2} s)\n",
        images_written(made, measured.generated_now),
        files_written(&request),
        out.display(),
        request.seed,
        record.mar_steps,
        measured.execution_provider.as_deref().unwrap_or("?"),
        measured.seconds.wall
    ))
}

/// Which images a run makes, for its first line: all, or a shard's.
fn images_part(request: &gtr_run::run::RunRequest) -> String {
    match request.shard {
        Some(s) => {
            let r = s.range(request.num_images);
            format!(
                ", shard {s}: images {}..{} of {}",
                r.start, r.end, request.num_images
            )
        }
        None => format!(", {} images", request.num_images),
    }
}

/// The `made` images of a run, for its last line: with `--resume`, how
/// many this process wrote (`generated_now`) and how many it kept.
fn images_written(made: usize, generated_now: usize) -> String {
    let count = |n: usize| format!("{n} image{}", if n == 1 { "" } else { "s" });
    match made - generated_now.min(made) {
        0 => count(made),
        kept => format!("{} ({kept} kept from before)", count(generated_now)),
    }
}

/// The files a run writes beside its images, for its last line.
fn files_written(request: &gtr_run::run::RunRequest) -> String {
    match (&request.shard, &request.npz) {
        (Some(_), _) => "run.json".to_string(),
        (None, Some(npz)) => format!("grid.png, run.json and {}", npz.display()),
        (None, None) => "grid.png and run.json".to_string(),
    }
}

/// The model of `bundle` loaded as `options` say, and the SHA-256 of its
/// settings and graph files for run.json ([`model_digest`]), hashed in a
/// thread while the sessions load.
fn load_hashed(
    bundle: &gtr_run::bundle::Bundle,
    runtime: &super::runtime::RuntimeArgs,
    options: &gtr_run::backend::LoadOptions,
) -> anyhow::Result<(gtr_run::backend::OrtModel, String)> {
    let files = options.precision.model_files(bundle);
    let info = bundle.model_info();
    let digest = std::thread::spawn(move || model_digest(&info, &files));
    let model = load_model(bundle, runtime, options)?;
    let model_sha256 = digest
        .join()
        .map_err(|_| anyhow::anyhow!("hashing the model's graph files stopped"))?
        .context("hashing the model's graph files for run.json")?;
    Ok((model, model_sha256))
}

/// One line per graph that `--ort-profile` profiled: its kernels, or why
/// there is no profile.
fn print_kernel_profiles(graphs: &[gtr_run::engine::GraphStats]) {
    for graph in graphs {
        match &graph.kernels {
            Some(gtr_run::engine::KernelProfile {
                problem: Some(problem),
                ..
            }) => say!(
                "gtr-run: warning: no kernel profile of {}: {problem}",
                graph.graph
            ),
            Some(kernels) if graph.calls > 0 => say!(
                "gtr-run: kernel profile {}",
                gtr_run::backend::profile::describe(&graph.graph, kernels)
            ),
            _ => {}
        }
    }
}

/// The `--ort-profile` folder, created if missing, as an absolute path (so
/// that run.json's file names hold from anywhere); refused unless a file can
/// be written in it, since ONNX Runtime would fail to write there silently.
fn profile_dir(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    // As `--npz` and `--png` paths are checked before the run: a wrong input (exit 3).
    let refuse = |what: &str, e: std::io::Error| {
        gtr_run::run::RunError::Invalid(format!("--ort-profile {}: {what}: {e}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| refuse("cannot create the folder", e))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| refuse("cannot resolve the folder", e))?;
    tempfile::NamedTempFile::new_in(&dir).map_err(|e| refuse("cannot write in the folder", e))?;
    Ok(dir)
}

pub fn run_merge(args: MergeArgs) -> anyhow::Result<()> {
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

//! The sampling and runtime options that generation, eval and sweep share
//! (`RuntimeArgs`), how they load a model, and the parsers of numeric flags.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use gtr_run::plan::Planner;
use gtr_run::schedule::{Schedule, ScheduleError};

use super::say;

/// Sampling and runtime options of generation and eval.
#[derive(Args)]
pub struct RuntimeArgs {
    /// Guidance scale, replacing the schedule's and the model's (0 to 3.4e38).
    // Negative numbers are read as values (not flags), so that the range check names them.
    #[arg(long, value_parser = parse_non_negative, allow_negative_numbers = true)]
    pub cfg: Option<f64>,
    /// Temperature, replacing the schedule's and the model's (0 to 3.4e38).
    #[arg(long, value_parser = parse_non_negative, allow_negative_numbers = true)]
    pub temperature: Option<f64>,
    /// Execution provider: cpu, cuda, tensorrt (strict) or auto (falls back to cpu).
    #[arg(long, value_enum, default_value_t = gtr_run::backend::Device::Cpu)]
    pub device: gtr_run::backend::Device,
    /// Intra-op threads per graph, and threads of gtr-run's own parallel
    /// work (default: ONNX Runtime's choice, and one per core; 1 to 1024).
    #[arg(long, value_parser = parse_threads, allow_negative_numbers = true)]
    pub threads: Option<usize>,
    /// Where diffusion chains run: `graph` (the bundle's sampler graph, one
    /// call per MAR step, state on the device), `host` (one head call per
    /// tick, the update on the CPU), `ticks` (the bundle's tick graph, one
    /// call per tick on tensors bound once per shape; CUDA graphs replayed on
    /// --device cuda) or `auto` (the sampler graph when the bundle has one
    /// and a GPU provider runs it; the host path on the CPU provider).
    #[arg(long, value_enum, default_value_t = gtr_run::backend::ChainRunner::Auto)]
    sampler: gtr_run::backend::ChainRunner,
    /// Ticks per chain call (default: a whole chain per call; with the
    /// sampler graph, 1 is a per-tick call with the update still in the
    /// graph; with `--sampler ticks`, the ticks that share one upload).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), allow_negative_numbers = true)]
    pub sampler_ticks: Option<u32>,
    /// How the backbone runs: `fused` (the bundle's backbone graph: encoder
    /// and decoder in one call, only the predicted tokens' z returned),
    /// `split` (the two graphs, z gathered on the host) or `auto` (fused
    /// when the bundle has the graph and a GPU provider runs it; split on
    /// the CPU provider, where it has not been shown faster).
    #[arg(long, value_enum, default_value_t = gtr_run::backend::BackboneRunner::Auto)]
    backbone: gtr_run::backend::BackboneRunner,
    /// How the diffusion head runs on the host chains: `split` (the bundle's
    /// two parts, models/split_head.py, in every step: the part that reads
    /// only t and z once per group of ticks, the part that reads the chain's
    /// state per tick), `whole` (the head graph per tick) or `auto` (the
    /// parts where the bundle has them in the run's precision, in steps of
    /// at most 32 head rows a tick, where they were measured to pay). Same
    /// images either way in fp32 (README, "The split head").
    #[arg(long, value_enum, default_value_t = gtr_run::backend::HeadRunner::Auto)]
    head: gtr_run::backend::HeadRunner,
    /// Numeric precision: fp32, tf32 (CUDA), fp16, bf16, int8 (CPU); fp16/bf16/int8
    /// need the bundle's variant graphs (models/convert_precision.py); int8
    /// images depend on their batch unless the variants quantize activations
    /// per row. Default: the manifest's `precision`, else fp32.
    #[arg(long, value_parser = parse_precision)]
    precision: Option<gtr_run::precision::Precision>,
    /// TensorRT's engine and timing cache folder (default: <cache>/tensorrt,
    /// the cache being $GTR_RUN_CACHE, $XDG_CACHE_HOME/gtr-run or ~/.cache/gtr-run).
    #[arg(long, value_name = "DIR")]
    trt_cache: Option<PathBuf>,
}

/// Loads the bundle's graphs as `runtime` asks, saying once where the
/// diffusion chains will run.
pub fn load_model(
    bundle: &gtr_run::bundle::Bundle,
    runtime: &RuntimeArgs,
    options: &gtr_run::backend::LoadOptions,
) -> anyhow::Result<gtr_run::backend::OrtModel> {
    if let Some(threads) = runtime.threads {
        gtr_run::engine::set_host_threads(threads);
    }
    let runners = (runtime.sampler, runtime.backbone, runtime.head);
    let (model, note) = gtr_run::backend::OrtModel::load_running(bundle, options, runners)?;
    if let Some(note) = note {
        say!("gtr-run: {note}");
    }
    Ok(model)
}

impl RuntimeArgs {
    /// `--sampler-ticks` for the loaded `model`: none, said once, where its
    /// chains run on the host (`--sampler auto` on the CPU), which makes
    /// one head call per tick whatever the flag says.
    pub fn ticks_per_call(&self, model: &impl gtr_run::engine::MarModel) -> Option<usize> {
        let n = self.sampler_ticks?;
        if !model.runs_chains() {
            say!(
                "gtr-run: --sampler-ticks {n} has no effect: the diffusion chains run on the host, one head call per tick"
            );
            return None;
        }
        Some(n as usize)
    }

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
        if let Some(problem) =
            gtr_run::backend::runners_conflict(self.sampler, self.head, self.sampler_ticks)
        {
            bail!(problem);
        }
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
            shape_ranges: matches!(device, Device::TensorRt | Device::Auto).then(|| {
                ShapeRanges::from_plans(plans, batch, bundle.manifest.diffusion.train_steps)
            }),
            profile_dir: None,
            tick_graph: self.sampler == gtr_run::backend::ChainRunner::Ticks,
        })
    }
}

impl RuntimeArgs {
    /// Plan options from the bundle's sampling defaults and `--cfg` /
    /// `--temperature`.
    pub fn plan_options(&self, bundle: &gtr_run::bundle::Bundle) -> gtr_run::plan::PlanOptions {
        bundle
            .manifest
            .sampling
            .plan_options(self.cfg, self.temperature)
    }

    /// How to load `bundle` for `schedules` planned with `seed`, at `batch`.
    pub fn load_options_for(
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

use gtr_run::limits::{MAX_BATCH, MAX_IMAGES, MAX_REPEATS, MAX_THREADS};

/// A whole number in `min..=max`, or an error saying the range.
fn parse_in_range(s: &str, min: usize, max: usize) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("`{s}` is not a whole number from {min} to {max}")),
    }
}

pub fn parse_image_count(s: &str) -> Result<usize, String> {
    parse_in_range(s, 1, MAX_IMAGES)
}

pub fn parse_batch(s: &str) -> Result<usize, String> {
    parse_in_range(s, 1, MAX_BATCH)
}

/// Repeats of a comparison (`--repeats`).
pub fn parse_repeats(s: &str) -> Result<usize, String> {
    parse_in_range(s, 1, MAX_REPEATS)
}

fn parse_threads(s: &str) -> Result<usize, String> {
    parse_in_range(s, 1, MAX_THREADS)
}

/// A guidance scale or temperature ([`gtr_plan::plan::is_sampler_scale`]).
fn parse_non_negative(s: &str) -> Result<f64, String> {
    use gtr_plan::plan::{SAMPLER_SCALE_RULE, is_sampler_scale};
    use gtr_plan::schedule::fmt_num;
    match s.parse::<f64>() {
        Ok(v) if is_sampler_scale(v) => Ok(v),
        Ok(v) => Err(format!("{} is not {SAMPLER_SCALE_RULE}", fmt_num(v))),
        Err(_) => Err(format!("`{s}` is not a number")),
    }
}

fn parse_precision(s: &str) -> Result<gtr_run::precision::Precision, String> {
    s.parse()
}

/// The `--set` pairs as a map; a parameter given twice is refused (which
/// value was meant cannot be told).
pub fn overrides_map(
    pairs: Vec<(String, f64)>,
) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let mut map = std::collections::BTreeMap::new();
    for (name, value) in pairs {
        if let Some(first) = map.insert(name.clone(), value) {
            bail!(
                "--set {name}: given twice ({} and {}); keep one",
                gtr_run::schedule::fmt_num(first),
                gtr_run::schedule::fmt_num(value)
            );
        }
    }
    Ok(map)
}

pub fn parse_override(s: &str) -> Result<(String, f64), String> {
    let (name, value) = s
        .split_once('=')
        .filter(|(name, _)| !name.trim().is_empty())
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

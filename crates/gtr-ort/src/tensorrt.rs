//! What gtr-run gives ONNX Runtime's TensorRT provider, as plain data built
//! by pure functions (tested without TensorRT): optimisation profiles for the
//! dynamic dims, taken from the plans and the batch size; the engine and
//! timing cache folder; fp16/bf16 builder flags.
//!
//! The dynamic dims of the contract (models/README.md) are the backbone
//! batch (images, doubled when a step is guided), K (tokens known before a
//! step), N (diffusion rows of one call: every row of a step still in its
//! chain, both guidance halves) and the VAE batch (images).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::bundle::{GraphEntry, Role};
use gtr_engine::ModelInfo;
use gtr_plan::plan::Plan;

/// min / opt / max of one dynamic dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DimRange {
    pub min: usize,
    pub opt: usize,
    pub max: usize,
}

impl DimRange {
    fn fixed(n: usize) -> DimRange {
        DimRange {
            min: n,
            opt: n,
            max: n,
        }
    }

    /// The range of the sizes in `counts` (size → calls of that size),
    /// widened down to `floor`, optimised for the size that carries the
    /// most rows in total (calls × size; ties: the larger).
    fn of_counts(counts: &BTreeMap<usize, u64>, floor: usize) -> DimRange {
        let min = counts.keys().next().copied().unwrap_or(floor).min(floor);
        let max = counts.keys().next_back().copied().unwrap_or(floor).max(min);
        let opt = counts
            .iter()
            .max_by_key(|&(v, c)| (c.saturating_mul(*v as u64), *v))
            .map_or(max, |(v, _)| *v);
        DimRange { min, opt, max }
    }
}

/// The dynamic dims a run will give the graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ShapeRanges {
    /// Rows of an encoder/decoder call (2 × images on guided steps).
    pub backbone_batch: DimRange,
    /// K, tokens known before a step.
    pub known: DimRange,
    /// N, rows of one diffusion-head call.
    pub diffusion_rows: DimRange,
    /// Images of one VAE call.
    pub images: DimRange,
}

impl ShapeRanges {
    /// The shapes that running `plans` (one per schedule; counts do not
    /// depend on the image) in batches of `batch` images produces. Minimums
    /// cover a last, smaller batch of one image; the opt point is, at a full
    /// batch, the size that carries the most rows over the run (K: the
    /// middle step's). Chains are counted as they run on a model trained
    /// with `train_steps` (a clipped chain's own length).
    pub fn from_plans(plans: &[&Plan], batch: usize, train_steps: usize) -> ShapeRanges {
        let batch = batch.max(1);
        let mut backbone = BTreeMap::new();
        let mut known = Vec::new();
        let mut rows: BTreeMap<usize, u64> = BTreeMap::new();
        let mut min_rows = usize::MAX;
        for plan in plans {
            for step in &plan.steps {
                let halves = if step.cfg.is_some() { 2 } else { 1 };
                *backbone.entry(batch * halves).or_insert(0u64) += 1;
                known.push(step.known_before);
                let n = step.tokens.len();
                if n == 0 {
                    continue;
                }
                let base = step.chain_len(step.diffusion_steps, train_steps);
                let (detail_count, detail_steps) = step.detail.map_or((0, base), |d| {
                    (d.count.min(n), step.chain_len(d.steps, train_steps))
                });
                let longest = base.max(detail_steps);
                for tick in 0..longest {
                    let per_image = (n - detail_count) * usize::from(base > tick)
                        + detail_count * usize::from(detail_steps > tick);
                    if per_image == 0 {
                        continue;
                    }
                    min_rows = min_rows.min(per_image);
                    *rows.entry(per_image * halves * batch).or_insert(0) += 1;
                }
            }
        }
        known.sort_unstable();
        let known = match (known.first(), known.last()) {
            (Some(&min), Some(&max)) => DimRange {
                min,
                opt: known[known.len() / 2],
                max,
            },
            _ => DimRange::fixed(0),
        };
        ShapeRanges {
            backbone_batch: DimRange::of_counts(&backbone, 1),
            known,
            diffusion_rows: DimRange::of_counts(
                &rows,
                if min_rows == usize::MAX { 1 } else { min_rows },
            ),
            images: DimRange {
                min: 1,
                opt: batch,
                max: batch,
            },
        }
    }
}

/// The TensorRT provider options of one graph, as ONNX Runtime takes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorRtOptions {
    /// `trt_fp16_enable`.
    pub fp16: bool,
    /// `trt_bf16_enable`.
    pub bf16: bool,
    /// `trt_layer_norm_fp32_fallback`: keep normalisations in fp32 when
    /// fp16 is on (what autocast does).
    pub layer_norm_fp32_fallback: bool,
    /// `trt_engine_cache_enable` + `trt_engine_cache_path`.
    pub engine_cache: String,
    /// `trt_engine_cache_prefix`: bundle, role, precision, a hash of the
    /// profile shapes and the graph's [`graph_stamp`], so that one folder
    /// holds the engines of many graphs and an engine is reused only for
    /// the profile and the graph file it was built for.
    pub engine_cache_prefix: String,
    /// `trt_timing_cache_enable` + `trt_timing_cache_path`.
    pub timing_cache: String,
    /// `trt_profile_min_shapes` / `_opt_` / `_max_`: `name:AxB,name:C`.
    /// Empty for a graph gtr-run knows no shapes of.
    pub profile_min_shapes: String,
    pub profile_opt_shapes: String,
    pub profile_max_shapes: String,
}

/// The default engine cache: `<gtr-run cache>/tensorrt`.
pub fn default_cache_dir() -> Option<PathBuf> {
    super::library::cache_dir().map(|d| d.join("tensorrt"))
}

/// Dims of each input of `role` in terms of the ranges: (role of the
/// input, its dims as min/opt/max triples).
fn input_dims(
    role: Role,
    info: &ModelInfo,
    buffer: usize,
    r: &ShapeRanges,
) -> Vec<(&'static str, Vec<DimRange>)> {
    let f = DimRange::fixed;
    let (l, c, d) = (info.grid.len(), info.token_dim, info.width);
    let b = r.backbone_batch;
    let buffered = DimRange {
        min: buffer + r.known.min,
        opt: buffer + r.known.opt,
        max: buffer + r.known.max,
    };
    match role {
        Role::Encoder => vec![
            ("tokens", vec![b, f(l), f(c)]),
            ("known", vec![b, r.known]),
            ("label", vec![b]),
        ],
        Role::Decoder => vec![
            ("encoded", vec![b, buffered, f(d)]),
            ("known", vec![b, r.known]),
        ],
        Role::Diffusion => vec![
            ("x", vec![r.diffusion_rows, f(c)]),
            ("t", vec![r.diffusion_rows]),
            ("z", vec![r.diffusion_rows, f(d)]),
        ],
        Role::VaeDecoder => vec![(
            "latent",
            vec![r.images, f(c), f(info.grid.height), f(info.grid.width)],
        )],
        // The sampler's Loop is left to ONNX Runtime's CUDA provider (it
        // gets no TensorRT options), so it needs no profile.
        Role::Sampler
        | Role::Tick
        | Role::Backbone
        | Role::DiffusionCondition
        | Role::DiffusionState => Vec::new(),
    }
}

/// Why TensorRT options could not be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct TensorRtOptionsError(pub String);

/// Keeps `[A-Za-z0-9_-]`, replacing anything else with `_`.
fn file_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What the TensorRT options of one bundle's graphs share.
#[derive(Debug, Clone, Copy)]
pub struct BundleSettings<'a> {
    pub info: &'a ModelInfo,
    /// The manifest's `buffer`: class-embedding rows before the known ones.
    pub buffer: usize,
    /// The bundle's name, part of engine names.
    pub model_name: &'a str,
    /// The precision's name, part of engine names.
    pub precision: &'a str,
    /// TensorRT's fp16 and bf16 builder flags.
    pub fp16: bool,
    pub bf16: bool,
    /// The shapes the run will use (`None`: no profile; TensorRT builds for
    /// the shapes it meets).
    pub ranges: Option<&'a ShapeRanges>,
    /// Engine and timing cache folder.
    pub cache: &'a Path,
    /// [`graph_stamp`] of the graph these options are for.
    pub graph_stamp: u64,
}

/// The options of graph `role` (tensor names from `entry`) of a bundle.
pub fn graph_options(
    role: Role,
    entry: &GraphEntry,
    bundle: &BundleSettings<'_>,
) -> Result<TensorRtOptions, TensorRtOptionsError> {
    let BundleSettings {
        info,
        buffer,
        model_name,
        precision,
        fp16,
        bf16,
        ranges,
        cache,
        graph_stamp,
    } = *bundle;
    let cache_text = cache.to_str().ok_or_else(|| {
        TensorRtOptionsError(format!(
            "--trt-cache {}: ONNX Runtime takes the cache folder as UTF-8 text; choose a folder whose path is UTF-8",
            cache.display()
        ))
    })?;
    if cache_text.contains(['\0', ',']) {
        return Err(TensorRtOptionsError(format!(
            "--trt-cache {cache_text}: the path may not contain a comma or a NUL byte"
        )));
    }
    let (mut min, mut opt, mut max) = (Vec::new(), Vec::new(), Vec::new());
    if let Some(r) = ranges {
        for (input, dims) in input_dims(role, info, buffer, r) {
            let name = entry.inputs.get(input).ok_or_else(|| {
                TensorRtOptionsError(format!("graphs.{}.inputs has no `{input}`", role.key()))
            })?;
            if name.contains([',', ':', '\0']) {
                return Err(TensorRtOptionsError(format!(
                    "graphs.{}: TensorRT shape profiles cannot name the tensor `{name}` (it contains `,` or `:`)",
                    role.key()
                )));
            }
            let join = |pick: fn(&DimRange) -> usize| {
                let dims: Vec<String> = dims.iter().map(|d| pick(d).to_string()).collect();
                format!("{name}:{}", dims.join("x"))
            };
            min.push(join(|d| d.min));
            opt.push(join(|d| d.opt));
            max.push(join(|d| d.max));
        }
    }
    let (min, opt, max) = (min.join(","), opt.join(","), max.join(","));
    let profile = fnv1a(format!("{min};{opt};{max}").as_bytes());
    Ok(TensorRtOptions {
        fp16,
        bf16,
        layer_norm_fp32_fallback: fp16,
        engine_cache: cache_text.to_string(),
        engine_cache_prefix: file_safe(&format!(
            "{model_name}-{}-{precision}-{:08x}-{:08x}",
            role.key(),
            profile as u32,
            graph_stamp as u32
        )),
        timing_cache: cache_text.to_string(),
        profile_min_shapes: min,
        profile_opt_shapes: opt,
        profile_max_shapes: max,
    })
}

/// A stamp of the graph file at `path` and of its external data files:
/// their sizes and modification times, hashed. Part of engine names, so
/// that a graph exported again under the same name and shapes gets new
/// engines: ONNX Runtime's own engine key does not read the weights. A
/// file whose metadata cannot be read counts as absent (loading it fails
/// later, naming it).
pub fn graph_stamp(path: &Path) -> u64 {
    let mut files = vec![path.to_path_buf()];
    files.extend(crate::external_data::external_data_files(path).unwrap_or_default());
    let text: String = files
        .iter()
        .map(|f| match std::fs::metadata(f) {
            Ok(m) => {
                let modified = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                format!("{}:{modified};", m.len())
            }
            Err(_) => "-;".to_string(),
        })
        .collect();
    fnv1a(text.as_bytes())
}

/// 64-bit FNV-1a: a stable hash (the same on every machine and build).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The provider itself, from the options (only with the `tensorrt` feature).
#[cfg(feature = "tensorrt")]
pub(crate) fn provider(o: &TensorRtOptions) -> ort::ep::TensorRT {
    let mut ep = ort::ep::TensorRT::default().with_fp16(o.fp16);
    if o.bf16 {
        // Only set where asked: older providers do not know the key.
        ep = ep.with_bf16(true);
    }
    ep = ep
        .with_layer_norm_fp32_fallback(o.layer_norm_fp32_fallback)
        .with_engine_cache(true)
        .with_engine_cache_path(&o.engine_cache)
        .with_engine_cache_prefix(&o.engine_cache_prefix)
        .with_timing_cache(true)
        .with_timing_cache_path(&o.timing_cache);
    if !o.profile_min_shapes.is_empty() {
        ep = ep
            .with_profile_min_shapes(&o.profile_min_shapes)
            .with_profile_opt_shapes(&o.profile_opt_shapes)
            .with_profile_max_shapes(&o.profile_max_shapes);
    }
    ep
}

#[cfg(test)]
mod tests {
    use super::*;
    use gtr_engine::sampler::Variance;
    use gtr_engine::{ImageSettings, SamplingDefaults};
    use gtr_plan::grid::Grid;
    use gtr_plan::schedule::{Schedule, Source};

    /// 4x4 tokens: 8 unguided in one step (10 diffusion steps), then 8
    /// guided in two steps of 4, one token of each getting 30 steps (FTS).
    const SCHEDULE: &str = "
        grid 4x4
        diffusion 10
        stage a { tokens i < 2  order raster  steps 1  cfg none }
        stage b { tokens rest  order raster  steps 2  cfg 2.0  fts top 0.25 by high_freq -> 30 }
    ";

    fn plan() -> Plan {
        let s = Schedule::from_source(Source::new("<test>", SCHEDULE), &BTreeMap::new())
            .unwrap_or_else(|e| panic!("{e}"));
        gtr_plan::plan::plan(&s, Grid::new(4, 4), 0).unwrap_or_else(|d| panic!("{d}"))
    }

    fn info() -> ModelInfo {
        ModelInfo {
            name: "m".into(),
            grid: Grid::new(4, 4),
            token_dim: 4,
            width: 32,
            classes: 10,
            null_class: 10,
            latent_scale: 0.25,
            train_steps: 1000,
            variance: Variance::LearnedRange,
            image: ImageSettings {
                height: 16,
                width: 16,
                channels: 3,
            },
            defaults: SamplingDefaults {
                cfg: 3.0,
                temperature: 1.0,
            },
        }
    }

    fn entry(inputs: &[(&str, &str)]) -> GraphEntry {
        GraphEntry {
            file: "g.onnx".into(),
            inputs: inputs
                .iter()
                .map(|(r, n)| (r.to_string(), n.to_string()))
                .collect(),
            outputs: BTreeMap::new(),
        }
    }

    fn range(min: usize, opt: usize, max: usize) -> DimRange {
        DimRange { min, opt, max }
    }

    #[test]
    fn ranges_follow_the_plan_and_the_batch() {
        let p = plan();
        let r = ShapeRanges::from_plans(&[&p], 3, 1000);
        // One unguided step of 3 rows, two guided steps of 6.
        assert_eq!(r.backbone_batch, range(1, 6, 6));
        // K before the three steps: 0, 8, 12; opt is the middle one.
        assert_eq!(r.known, range(0, 8, 12));
        // Calls: 10 of 8 rows × 3 images; per guided step 10 of 4 × 2 × 3
        // and 20 of 1 × 2 × 3 (the FTS token): 30 calls of 24 rows (720
        // rows) and 40 of 6 (240), so opt is 24; one image's last rows: 1.
        assert_eq!(r.diffusion_rows, range(1, 24, 24));
        assert_eq!(r.images, range(1, 3, 3));
        // One image a batch narrows them.
        let r1 = ShapeRanges::from_plans(&[&p], 1, 1000);
        assert_eq!(r1.backbone_batch, range(1, 2, 2));
        assert_eq!(r1.diffusion_rows, range(1, 8, 8));
        // A second schedule widens them: all 16 tokens in one guided step
        // of 40 ticks, 16 × 2 × 3 = 96 rows a call, the most rows in all.
        let text = "grid 4x4\ndiffusion 40\nstage a { tokens all order raster steps 1 cfg 2.0 }";
        let s = Schedule::from_source(Source::new("<wide>", text), &BTreeMap::new()).unwrap();
        let q = gtr_plan::plan::plan(&s, Grid::new(4, 4), 0).unwrap();
        let both = ShapeRanges::from_plans(&[&p, &q], 3, 1000);
        assert_eq!(both.diffusion_rows, range(1, 96, 96));
        // K: 0, 8, 12 and the second plan's 0.
        assert_eq!(both.known, range(0, 8, 12));
        assert_eq!(both.backbone_batch, range(1, 6, 6));
        let q_only = ShapeRanges::from_plans(&[&q], 3, 1000);
        assert_eq!(q_only.diffusion_rows, range(16, 96, 96));
        assert_eq!(q_only.known, range(0, 0, 0));
    }

    /// A clipped chain is counted as it runs: 50 steps at clip 950 are 48
    /// ticks (a replay needs 48 draws; no profile is tuned for two ticks
    /// that never come), fewer over a longer training chain.
    #[test]
    fn clipped_chains_are_counted_as_they_run() {
        let text = "clip_timesteps 950\nstage a { tokens all  steps 1  diffusion 50 }";
        let s = Schedule::from_source(Source::new("<clip>", text), &BTreeMap::new()).unwrap();
        let p = gtr_plan::plan::plan(&s, Grid::new(4, 4), 0).unwrap();
        let r = ShapeRanges::from_plans(&[&p], 1, 1000);
        assert_eq!(r.diffusion_rows, range(16, 16, 16));
        assert_eq!(p.longest_chain(1000), 48);
        // Over a 4000-step chain the stride is 81.6: 12 timesteps under
        // 950, and 950.
        assert_eq!(p.longest_chain(4000), 13);
    }

    #[test]
    fn options_carry_shapes_caches_and_precision() {
        let p = plan();
        let r = ShapeRanges::from_plans(&[&p], 3, 1000);
        let cache = Path::new("/var/cache/gtr trt");
        let diffusion = entry(&[("x", "x_in"), ("t", "t"), ("z", "cond")]);
        let o = graph_options(
            Role::Diffusion,
            &diffusion,
            &BundleSettings {
                info: &info(),
                buffer: 16,
                model_name: "mar tiny/v1",
                precision: "fp16",
                fp16: true,
                bf16: false,
                ranges: Some(&r),
                cache,
                graph_stamp: 0,
            },
        )
        .unwrap();
        assert_eq!(o.profile_min_shapes, "x_in:1x4,t:1,cond:1x32");
        assert_eq!(o.profile_opt_shapes, "x_in:24x4,t:24,cond:24x32");
        assert_eq!(o.profile_max_shapes, "x_in:24x4,t:24,cond:24x32");
        assert_eq!(o.engine_cache, "/var/cache/gtr trt");
        assert_eq!(o.timing_cache, "/var/cache/gtr trt");
        assert!(
            o.engine_cache_prefix
                .starts_with("mar_tiny_v1-diffusion-fp16-"),
            "{}",
            o.engine_cache_prefix
        );
        assert_eq!(
            o.engine_cache_prefix.len(),
            "mar_tiny_v1-diffusion-fp16-".len() + 8 + 1 + 8
        );
        assert!(o.fp16 && o.layer_norm_fp32_fallback && !o.bf16);

        let encoder = entry(&[
            ("tokens", "tokens"),
            ("known", "known_index"),
            ("label", "class_label"),
        ]);
        let o = graph_options(Role::Encoder, &encoder, &fp32(&info(), Some(&r), cache)).unwrap();
        assert_eq!(
            o.profile_min_shapes,
            "tokens:1x16x4,known_index:1x0,class_label:1"
        );
        assert_eq!(
            o.profile_opt_shapes,
            "tokens:6x16x4,known_index:6x8,class_label:6"
        );
        assert_eq!(
            o.profile_max_shapes,
            "tokens:6x16x4,known_index:6x12,class_label:6"
        );
        assert!(!o.fp16 && !o.layer_norm_fp32_fallback);

        let decoder = entry(&[("encoded", "encoded"), ("known", "known_index")]);
        let o = graph_options(
            Role::Decoder,
            &decoder,
            &BundleSettings {
                info: &info(),
                buffer: 16,
                model_name: "m",
                precision: "bf16",
                fp16: false,
                bf16: true,
                ranges: Some(&r),
                cache,
                graph_stamp: 0,
            },
        )
        .unwrap();
        // The buffer (16 rows) comes before the K known rows.
        assert_eq!(o.profile_min_shapes, "encoded:1x16x32,known_index:1x0");
        assert_eq!(o.profile_max_shapes, "encoded:6x28x32,known_index:6x12");
        assert!(o.bf16 && !o.fp16);

        let vae = entry(&[("latent", "latent")]);
        let o = graph_options(Role::VaeDecoder, &vae, &fp32(&info(), Some(&r), cache)).unwrap();
        assert_eq!(o.profile_min_shapes, "latent:1x4x4x4");
        assert_eq!(o.profile_opt_shapes, "latent:3x4x4x4");

        // Without ranges there is no profile, only caches and flags.
        let o = graph_options(Role::VaeDecoder, &vae, &fp32(&info(), None, cache)).unwrap();
        assert_eq!(o.profile_min_shapes, "");
        assert_eq!(
            o.engine_cache_prefix,
            format!("m-vae_decoder-fp32-{:08x}-00000000", fnv1a(b";;") as u32)
        );
        // Engines for another profile get another name; the same profile
        // the same name.
        let named = |r: &ShapeRanges| {
            graph_options(Role::VaeDecoder, &vae, &fp32(&info(), Some(r), cache))
                .unwrap()
                .engine_cache_prefix
        };
        let r8 = ShapeRanges::from_plans(&[&p], 8, 1000);
        assert_ne!(named(&r), named(&r8));
        assert_eq!(named(&r), named(&ShapeRanges::from_plans(&[&p], 3, 1000)));
    }

    #[test]
    fn fnv1a_is_the_standard_one() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    /// A graph file written again (a re-export under the same name, of the
    /// same size) gets another stamp, so TensorRT builds new engines for it.
    #[test]
    fn a_rewritten_graph_gets_another_stamp() {
        let dir = std::env::temp_dir().join(format!("gtr-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let graph = dir.join("g.onnx");
        std::fs::write(&graph, b"first weights").unwrap();
        let first = graph_stamp(&graph);
        assert_eq!(first, graph_stamp(&graph));
        // The same size, written a minute later.
        std::fs::write(&graph, b"other weights").unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&graph)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_ne!(first, graph_stamp(&graph));
        assert_ne!(graph_stamp(&dir.join("missing.onnx")), first);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// fp32 settings of the test model `m` (buffer 16).
    fn fp32<'a>(
        info: &'a ModelInfo,
        ranges: Option<&'a ShapeRanges>,
        cache: &'a Path,
    ) -> BundleSettings<'a> {
        BundleSettings {
            info,
            buffer: 16,
            model_name: "m",
            precision: "fp32",
            fp16: false,
            bf16: false,
            ranges,
            cache,
            graph_stamp: 0,
        }
    }

    #[test]
    fn paths_and_names_ort_cannot_take_are_refused() {
        let r = ShapeRanges::from_plans(&[&plan()], 1, 1000);
        let info = info();
        let vae = entry(&[("latent", "latent")]);
        let e = graph_options(
            Role::VaeDecoder,
            &vae,
            &fp32(&info, Some(&r), Path::new("/tmp/a,b")),
        )
        .unwrap_err();
        assert!(
            e.0.contains("--trt-cache /tmp/a,b") && e.0.contains("comma"),
            "{e}"
        );
        let odd = entry(&[("latent", "lat:ent")]);
        let e = graph_options(
            Role::VaeDecoder,
            &odd,
            &fp32(&info, Some(&r), Path::new("/tmp/c")),
        )
        .unwrap_err();
        assert!(
            e.0.contains("graphs.vae_decoder") && e.0.contains("lat:ent"),
            "{e}"
        );
    }
}

//! A [`Comparison`] as a Markdown table (printed), CSV and JSON.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::{Comparison, mean_std};

/// Quality columns of row `k` as (mean, std over repeats), or `None`
/// without an evaluator. Order: Fréchet distance, class accuracy (NaN for
/// unconditional models), classifier score.
fn quality(c: &Comparison, k: usize) -> Option<[(f64, f64); 3]> {
    let q = &c.schedules[k].quality;
    if q.is_empty() {
        return None;
    }
    let of = |f: &dyn Fn(&super::Quality) -> f64| mean_std(&q.iter().map(f).collect::<Vec<_>>());
    Some([
        of(&|x| x.frechet_distance),
        of(&|x| x.class_accuracy.unwrap_or(f64::NAN)),
        of(&|x| x.classifier_score),
    ])
}

fn pm(mean: f64, std: f64, repeats: usize, digits: usize) -> String {
    if mean.is_nan() {
        "–".into()
    } else if repeats > 1 {
        format!("{mean:.digits$} ± {std:.digits$}")
    } else {
        format!("{mean:.digits$}")
    }
}

/// The table as Markdown, with a header line saying what was run.
pub fn markdown(c: &Comparison) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "model {}, {} images per schedule × {} repeat(s) (seeds {}..{}), batch {}, {}, diffusion chains: {}, VAE decode: {}; schedules interleaved batch by batch, one warm-up batch each excluded",
        c.model,
        c.num_images,
        c.repeats,
        c.seed,
        c.seed + (c.repeats as u64 - 1),
        c.batch,
        format_args!("{}, {}", c.execution_provider, c.precision),
        c.diffusion_chains,
        c.vae_decode
    );
    let fd = c
        .evaluator
        .as_ref()
        .map(|e| markdown_cell(&format!("FD ({e})")))
        .unwrap_or_default();
    let _ = writeln!(out);
    let mut header = vec![
        "schedule",
        "MAR steps",
        "backbone passes",
        "diffusion evals",
        "GFLOPs/image",
        "s/image",
        "speed-up (measured, per-batch range)",
        "speed-up (FLOPs)",
    ];
    if c.evaluator.is_some() {
        header.extend([fd.as_str(), "class accuracy", "classifier score"]);
    }
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(header.len()));
    for (k, s) in c.schedules.iter().enumerate() {
        let (lo, hi) = c.speedup_range(k);
        let mut cells = vec![
            markdown_cell(&s.name),
            s.mar_steps.to_string(),
            s.backbone_passes.to_string(),
            s.diffusion_evaluations.to_string(),
            format!("{:.3}", s.flops_per_image / 1e9),
            format!("{:.4}", s.seconds_per_image()),
            format!("{:.2}× ({lo:.2}–{hi:.2})", c.speedup(k)),
            format!("{:.2}×", c.flops_speedup(k)),
        ];
        if let Some([f, a, sc]) = quality(c, k) {
            cells.push(pm(f.0, f.1, c.repeats, 2));
            cells.push(if a.0.is_nan() {
                "–".into()
            } else {
                pm(100.0 * a.0, 100.0 * a.1, c.repeats, 1) + "%"
            });
            cells.push(pm(sc.0, sc.1, c.repeats, 2));
        }
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

/// `text` as one cell of a Markdown table: `|` escaped, line breaks made
/// spaces (a schedule's file name may hold either).
fn markdown_cell(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// One CSV line per schedule (quality as mean and std over repeats; the
/// std cells are empty with one repeat, where no spread was measured, as
/// every cell without a value is).
pub fn csv(c: &Comparison) -> String {
    let mut out = String::from(
        "schedule,mar_steps,backbone_passes,diffusion_evaluations,flops_per_image,seconds_per_image,speedup_measured,speedup_min,speedup_max,speedup_flops,outside_runtime_share,frechet_distance,frechet_distance_std,class_accuracy,class_accuracy_std,classifier_score,classifier_score_std\n",
    );
    for (k, s) in c.schedules.iter().enumerate() {
        let (lo, hi) = c.speedup_range(k);
        let q = quality(c, k)
            .map(|[f, a, sc]| {
                let spread = |std: f64| if c.repeats > 1 { std } else { f64::NAN };
                [f.0, spread(f.1), a.0, spread(a.1), sc.0, spread(sc.1)]
                    .iter()
                    .map(|v| {
                        if v.is_nan() {
                            String::new()
                        } else {
                            v.to_string()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_else(|| ",,,,,".into());
        let name = if s.name.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.name.replace('"', "\"\""))
        } else {
            s.name.clone()
        };
        let _ = writeln!(
            out,
            "{name},{},{},{},{},{},{},{lo},{hi},{},{},{q}",
            s.mar_steps,
            s.backbone_passes,
            s.diffusion_evaluations,
            s.flops_per_image,
            s.seconds_per_image(),
            c.speedup(k),
            c.flops_speedup(k),
            s.outside_runtime_share(),
        );
    }
    out
}

/// What each row of a comparison ran, as JSON: its name, its file, every
/// parameter's value and the names of those `--set` changed.
pub fn contenders_json(contenders: &[super::Contender]) -> Value {
    contenders
        .iter()
        .map(|c| {
            let params: serde_json::Map<String, Value> = c
                .schedule
                .params
                .iter()
                .map(|p| (p.name.clone(), p.value.into()))
                .collect();
            let set: Vec<&str> = c
                .schedule
                .params
                .iter()
                .filter(|p| p.overridden)
                .map(|p| p.name.as_str())
                .collect();
            json!({
                "name": c.name,
                "path": c.schedule.source.name,
                "params": params,
                "set": set,
            })
        })
        .collect()
}

/// The whole comparison with the derived columns, as JSON.
pub fn json(c: &Comparison) -> Value {
    let derived: Vec<Value> = (0..c.schedules.len())
        .map(|k| {
            let (lo, hi) = c.speedup_range(k);
            json!({
                "name": c.schedules[k].name,
                "seconds_per_image": c.schedules[k].seconds_per_image(),
                "speedup_measured": c.speedup(k),
                "speedup_range": [lo, hi],
                "speedup_flops": c.flops_speedup(k),
                "outside_runtime_share": c.schedules[k].outside_runtime_share(),
            })
        })
        .collect();
    json!({
        "gtr_run_version": env!("CARGO_PKG_VERSION"),
        "comparison": c,
        "derived": derived,
    })
}

#[cfg(test)]
mod tests {
    use super::markdown_cell;

    #[test]
    fn a_schedule_name_stays_one_markdown_cell() {
        assert_eq!(markdown_cell("a|b\nc.gtr"), "a\\|b c.gtr");
        assert_eq!(markdown_cell("gtr-3.7x"), "gtr-3.7x");
    }
}

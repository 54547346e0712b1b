//! `gtr-run sweep`: one schedule over a grid of parameter values, compared
//! as `gtr-run eval` compares schedules, and the speed/quality trade-off
//! drawn: each setting's seconds per image against its Fréchet distance,
//! the Pareto front (no other setting both faster and better), the
//! baseline (the first setting) marked.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{Comparison, Contender, mean_std};
use crate::schedule::{Schedule, ScheduleError, fmt_num};

/// One parameter of a sweep and its values (`--set name=v1,v2,...`).
#[derive(Debug, Clone, PartialEq)]
pub struct SweepAxis {
    pub name: String,
    pub values: Vec<f64>,
}

impl SweepAxis {
    /// The axis of parameter `name` over `values`: at least one, each
    /// finite, none twice (as `--set name=v1,v2,...` and Python's `axes`
    /// give them).
    pub fn new(name: &str, values: Vec<f64>) -> Result<Self, String> {
        let name = name.trim();
        if name.is_empty() {
            return Err("the parameter's name is missing".into());
        }
        if values.is_empty() {
            return Err(format!("{name} has no values"));
        }
        for (k, &x) in values.iter().enumerate() {
            if !x.is_finite() {
                return Err(format!("{name}: {x} is not a finite number"));
            }
            if values[..k].contains(&x) {
                return Err(format!("{name} lists {} twice", fmt_num(x)));
            }
        }
        Ok(SweepAxis {
            name: name.to_string(),
            values,
        })
    }
}

impl std::str::FromStr for SweepAxis {
    type Err = String;

    /// `name=v1,v2,...`, checked as [`SweepAxis::new`] checks it.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, list) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not NAME=V1,V2,...: e.g. beta=0.05,0.1,0.2"))?;
        let values = list
            .split(',')
            .map(|v| {
                v.trim()
                    .parse()
                    .map_err(|_| format!("`{v}` in `{s}` is not a number"))
            })
            .collect::<Result<Vec<f64>, String>>()?;
        SweepAxis::new(name, values).map_err(|e| format!("`{s}`: {e}"))
    }
}

/// Every combination of the axes' values, the first axis changing slowest.
pub fn settings(axes: &[SweepAxis]) -> Vec<BTreeMap<String, f64>> {
    axes.iter().fold(vec![BTreeMap::new()], |done, axis| {
        done.iter()
            .flat_map(|setting| {
                axis.values.iter().map(move |&v| {
                    let mut s = setting.clone();
                    s.insert(axis.name.clone(), v);
                    s
                })
            })
            .collect()
    })
}

/// The most settings one sweep runs.
pub const MAX_SETTINGS: usize = 64;

/// Why a sweep cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The axes themselves (a command line's mistake): a parameter given
    /// twice, or more than [`MAX_SETTINGS`] settings.
    #[error("{0}")]
    Axes(String),
    /// The schedule, or a parameter it does not declare.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
}

/// The schedule at `path` once per setting of `axes`, each named by its
/// values (`beta=0.1 t_max=50`, in the axes' order); the first is the
/// baseline. A parameter given twice, a grid of more than [`MAX_SETTINGS`]
/// settings, or a parameter the schedule does not declare is an error
/// naming it.
pub fn contenders(path: &Path, axes: &[SweepAxis]) -> Result<Vec<Contender>, SweepError> {
    for (k, axis) in axes.iter().enumerate() {
        if axes[..k].iter().any(|a| a.name == axis.name) {
            return Err(SweepError::Axes(format!(
                "--set {}=...: the parameter is given twice; list all its values in one --set (e.g. --set {}=1,2,3)",
                axis.name, axis.name
            )));
        }
    }
    // Counted before any setting is made: the grid of many axes is far
    // larger than memory.
    let count = axes
        .iter()
        .try_fold(1usize, |n, a| n.checked_mul(a.values.len()));
    if count.is_none_or(|n| n > MAX_SETTINGS) {
        let sizes: Vec<String> = axes.iter().map(|a| a.values.len().to_string()).collect();
        let count = count.map_or("more than 2^64".to_string(), |n| n.to_string());
        return Err(SweepError::Axes(format!(
            "the sweep's grid has {count} settings ({} values); at most {MAX_SETTINGS} are run at once: give fewer values",
            sizes.join(" x ")
        )));
    }
    settings(axes)
        .into_iter()
        .map(|setting| {
            let name = axes
                .iter()
                .map(|a| format!("{}={}", a.name, fmt_num(setting[&a.name])))
                .collect::<Vec<_>>()
                .join(" ");
            Ok(Contender {
                name,
                schedule: Schedule::from_file(path, &setting)?,
            })
        })
        .collect()
}

/// One setting as a point: seconds per image, and its Fréchet distance's
/// mean and standard deviation over the repeats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TradeOff {
    pub seconds: f64,
    pub fd: f64,
    pub fd_std: f64,
}

/// Each setting's point, or `None` when the comparison has no quality (a
/// bundle without an evaluator).
pub fn trade_offs(c: &Comparison) -> Option<Vec<TradeOff>> {
    c.schedules
        .iter()
        .map(|s| {
            if s.quality.is_empty() {
                return None;
            }
            let fds: Vec<f64> = s.quality.iter().map(|q| q.frechet_distance).collect();
            let (fd, fd_std) = mean_std(&fds);
            Some(TradeOff {
                seconds: s.seconds_per_image(),
                fd,
                fd_std,
            })
        })
        .collect()
}

/// The indices of the points no other point beats in both seconds and
/// Fréchet distance (lower is better in both), by increasing seconds.
pub fn pareto_front(points: &[TradeOff]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| {
        points[a]
            .seconds
            .total_cmp(&points[b].seconds)
            .then(points[a].fd.total_cmp(&points[b].fd))
    });
    let mut front = Vec::new();
    let mut best = f64::INFINITY;
    for k in order {
        if points[k].fd < best {
            best = points[k].fd;
            front.push(k);
        }
    }
    front
}

/// The trade-off of a sweep as an SVG picture: one point per setting with
/// its Fréchet distance's spread over repeats (± one standard deviation),
/// labelled with its values; the Pareto front as a line; the baseline as a
/// square. `None` when the comparison has no quality.
pub fn pareto_svg(c: &Comparison) -> Option<String> {
    let points = trade_offs(c)?;
    let front = pareto_front(&points);
    let span = |lo: f64, hi: f64| {
        let pad = ((hi - lo) * 0.15).max(hi.abs() * 0.05).max(1e-9);
        (lo - pad).max(0.0)..hi + pad
    };
    let fold = |f: &dyn Fn(&TradeOff) -> f64, g: fn(f64, f64) -> f64, start: f64| {
        points.iter().map(f).fold(start, g)
    };
    let xs = span(
        fold(&|p| p.seconds, f64::min, f64::INFINITY),
        fold(&|p| p.seconds, f64::max, 0.0),
    );
    let ys = span(
        fold(&|p| p.fd - p.fd_std, f64::min, f64::INFINITY),
        fold(&|p| p.fd + p.fd_std, f64::max, 0.0),
    );
    // Labels of points right of the middle are written to their left, so
    // that the picture's edge does not cut them.
    let middle = (xs.start + xs.end) / 2.0;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 560)).into_drawing_area();
        let drawn: Result<(), Box<dyn std::error::Error>> = (|| {
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    format!(
                        "{}: speed against quality ({} images × {} repeats)",
                        c.model, c.num_images, c.repeats
                    ),
                    ("sans-serif", 18),
                )
                .margin(16)
                .x_label_area_size(44)
                .y_label_area_size(56)
                .build_cartesian_2d(xs, ys)?;
            chart
                .configure_mesh()
                .x_desc("seconds per image (measured)")
                .y_desc(format!(
                    "Fréchet distance ({}), lower is better",
                    c.evaluator.as_deref().unwrap_or("evaluator")
                ))
                .draw()?;
            chart
                .draw_series(LineSeries::new(
                    front.iter().map(|&k| (points[k].seconds, points[k].fd)),
                    RED.stroke_width(2),
                ))?
                .label("Pareto front")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED.stroke_width(2)));
            chart.draw_series(points.iter().map(|p| {
                ErrorBar::new_vertical(p.seconds, p.fd - p.fd_std, p.fd, p.fd + p.fd_std, BLUE, 6)
            }))?;
            chart.draw_series(
                points
                    .iter()
                    .zip(&c.schedules)
                    .enumerate()
                    .map(|(k, (p, s))| {
                        let marker: DynElement<_, _> = if k == 0 {
                            Rectangle::new([(-5, -5), (5, 5)], BLACK.filled()).into_dyn()
                        } else {
                            Circle::new((0, 0), 4, BLUE.filled()).into_dyn()
                        };
                        let style = TextStyle::from(("sans-serif", 11).into_font());
                        let label = if p.seconds > middle {
                            let style = style.pos(Pos::new(HPos::Right, VPos::Top));
                            Text::new(s.name.clone(), (-7, -14), style)
                        } else {
                            Text::new(s.name.clone(), (7, -14), style)
                        };
                        EmptyElement::at((p.seconds, p.fd)) + marker + label
                    }),
            )?;
            chart
                .configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .draw()?;
            root.present()?;
            Ok(())
        })();
        drawn.ok()?;
    }
    Some(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A grid too large for memory (100^12 settings, past 2^64) is refused
    /// before any setting is made.
    #[test]
    fn a_huge_grid_is_refused_before_it_is_built() {
        let values: Vec<String> = (1..=100).map(|v| v.to_string()).collect();
        let axes: Vec<SweepAxis> = (0..12)
            .map(|k| format!("p{k}={}", values.join(",")).parse().unwrap())
            .collect();
        let err = contenders(Path::new("never-read.gtr"), &axes).unwrap_err();
        assert!(err.to_string().contains("more than 2^64 settings"), "{err}");
        let err = contenders(Path::new("never-read.gtr"), &axes[..2]).unwrap_err();
        assert!(
            err.to_string()
                .contains("has 10000 settings (100 x 100 values)"),
            "{err}"
        );
    }

    #[test]
    fn axes_parse_and_combine_first_axis_slowest() {
        let a: SweepAxis = "beta=0.05, 0.1".parse().unwrap();
        let b: SweepAxis = "t_max=20,50,80".parse().unwrap();
        let all = settings(&[a, b]);
        assert_eq!(all.len(), 6);
        assert_eq!(all[0]["beta"], 0.05);
        assert_eq!((all[1]["beta"], all[1]["t_max"]), (0.05, 50.0));
        assert_eq!(all[3]["beta"], 0.1);
        assert!(
            "beta"
                .parse::<SweepAxis>()
                .unwrap_err()
                .contains("NAME=V1,V2")
        );
        assert!("beta=1,x".parse::<SweepAxis>().unwrap_err().contains("`x`"));
        assert!(
            "beta=1,1"
                .parse::<SweepAxis>()
                .unwrap_err()
                .contains("twice")
        );
        assert!(
            "beta=nan"
                .parse::<SweepAxis>()
                .unwrap_err()
                .contains("finite")
        );
        assert!("=1".parse::<SweepAxis>().unwrap_err().contains("name"));
    }

    /// A setting is named as messages write numbers: `beta=1e-300`, not
    /// 300 zeros.
    #[test]
    fn settings_are_named_with_short_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.gtr");
        std::fs::write(
            &path,
            "param beta = 0.1\nstage a { tokens all  steps 2  fts top beta by high_freq -> 4 }\n",
        )
        .unwrap();
        let axis: SweepAxis = "beta=0.1,1e-300,1".parse().unwrap();
        let names: Vec<String> = contenders(&path, &[axis])
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["beta=0.1", "beta=1e-300", "beta=1"]);
    }

    #[test]
    fn the_front_keeps_what_nothing_beats_in_both() {
        let p = |seconds, fd| TradeOff {
            seconds,
            fd,
            fd_std: 0.0,
        };
        // 1 is beaten by 0 (slower and worse); 3 by 2.
        let points = [
            p(1.0, 40.0),
            p(1.5, 45.0),
            p(2.0, 30.0),
            p(2.5, 31.0),
            p(0.5, 60.0),
        ];
        assert_eq!(pareto_front(&points), [4, 0, 2]);
    }
}

//! One MAR step's diffusion chains: every predicted token of the batch is a
//! row with its own respaced chain; rows run longest chain first, so the
//! rows still running at a tick are a prefix.
//!
//! Two runners with one contract: [`StepChains::run_on_host`] calls the
//! diffusion head once per tick and applies the update here (f64 arithmetic,
//! the reference); [`StepChains::run_in_graph`] hands every tick to the
//! model's sampler graph in one call, so the chain's state stays on the
//! model's device. Both take each row's noise from the same draws.

use std::time::Instant;

use ndarray::{Array1, Array2, Array3, s};
use rayon::prelude::*;

use super::EngineError;
use super::checks::{check_finite, shape_error};
use super::model::{COEFFICIENTS, ChainInputs, ConditionRows, MarModel, ModelError, ModelInfo};
use super::rows::Row;

/// Head rows a split head's condition part gets per call at most: the
/// ticks of a group share one call (at least one tick per call). On MAR-B's
/// condition part (2 threads, timed alone through onnxruntime's Python API
/// on 2026-12-06) a row cost the same from 256 rows a call on (5.6 ms per
/// 32 rows, against 7.3 ms at 32); the call's output is rows × S floats (S
/// = 20,480 on MAR-B: up to 20 MiB here), read where the runtime made it
/// ([`ConditionRows`]), not copied; one group's rows are alive at a time.
pub(super) const CONDITION_ROWS: usize = 256;

/// The widest step (head rows at its first tick) where a split head was
/// measured to pay, for [`crate::MarModel::split_head_rows`]: at most this
/// many rows, at least 8 ticks share a condition call. On mar-tiny (mar-64,
/// 2 threads) 8 rows a tick ran the head 1.4× faster split and 64 rows (4
/// ticks a call) 0.8×; MAR-B at 32 rows about 1.1× on a CPU without AMX,
/// 1.15× (whole image, fp32) on one with it (README, "The split head").
pub const SPLIT_TICK_ROWS: usize = CONDITION_ROWS / 8;

/// What a step's chains cost.
pub(super) struct ChainWork {
    /// Seconds inside model calls.
    pub seconds: f64,
    pub calls: u64,
    /// Diffusion-head rows summed over ticks (both CFG halves).
    pub rows: u64,
}

/// The settings one MAR step's chains share.
pub(super) struct StepChains<'a> {
    pub step: usize,
    /// The backbone's output at the predicted tokens [rows_b, N, D]
    /// (conditional images, then unconditional; a row's `slot` indexes N).
    pub z: &'a Array3<f32>,
    /// Images in the batch.
    pub images: usize,
    pub guided: bool,
    pub scale: f64,
    pub temperature: f64,
    /// Ticks per sampler-graph call (`None`: all of them in one call).
    pub ticks_per_call: Option<usize>,
}

impl StepChains<'_> {
    /// CFG halves per row.
    fn halves(&self) -> usize {
        if self.guided { 2 } else { 1 }
    }

    /// Head rows of all ticks: Σₖ halves × rows running at tick k.
    fn head_rows(&self, rows: &[Row]) -> u64 {
        (self.halves() * rows.iter().map(|r| r.steps).sum::<usize>()) as u64
    }

    /// `out` of `graph` in standard layout, once its shape is `want` and its
    /// values are finite.
    fn checked(
        &self,
        out: Array2<f32>,
        graph: &'static str,
        tensor: &str,
        want: (usize, usize),
    ) -> Result<Array2<f32>, EngineError> {
        if out.dim() != want {
            return Err(shape_error(
                self.step,
                graph,
                tensor,
                out.shape(),
                &[want.0, want.1],
            ));
        }
        let out = if out.is_standard_layout() {
            out
        } else {
            out.as_standard_layout().into_owned()
        };
        check_finite(graph, tensor, out.iter(), self.step)?;
        Ok(out)
    }

    /// Conditioning vector of `row`'s half `h`.
    fn condition(&self, row: &Row, h: usize) -> ndarray::ArrayView1<'_, f32> {
        self.z.slice(s![row.image + h * self.images, row.slot, ..])
    }

    /// The conditioning of `rows`, half by half, in row order: [G, N, D]
    /// (`D` = `width`), copied in parallel.
    fn conditioning(&self, rows: &[Row], width: usize) -> Array3<f32> {
        let halves = self.halves();
        let mut z = vec![0f32; halves * rows.len() * width];
        z.par_chunks_mut(width).enumerate().for_each(|(k, out)| {
            let (h, r) = (k / rows.len(), k % rows.len());
            out.copy_from_slice(
                self.condition(&rows[r], h)
                    .as_slice()
                    .expect("z rows are contiguous"),
            );
        });
        Array3::from_shape_vec((halves, rows.len(), width), z).expect("G·N·D values")
    }

    /// One head call per tick, the update applied here in f64. `x` [N·C]
    /// holds each row's initial noise and receives the sampled tokens.
    /// In a step narrow enough for [`MarModel::split_head_rows`], the model
    /// gets its head's condition part once per group of ticks
    /// ([`CONDITION_ROWS`]) and its state part per tick.
    pub fn run_on_host<M: MarModel>(
        &self,
        model: &mut M,
        rows: &[Row],
        x: &mut [f32],
        info: &ModelInfo,
    ) -> Result<ChainWork, EngineError> {
        let (c, d, head) = (info.token_dim, info.width, info.head_channels());
        let per = self.halves();
        let n_rows = rows.len();
        let longest = rows.first().map_or(0, |r| r.steps);
        // With guidance each row's two halves sit side by side (2r:
        // conditional, 2r + 1: unconditional), so the conditioning rows are
        // laid out once per step and a tick's rows are a prefix.
        let mut xin = Array2::<f32>::zeros((per * n_rows, c));
        let mut tin = Array1::<i64>::zeros(per * n_rows);
        let mut zin = Array2::<f32>::zeros((per * n_rows, d));
        for (r, row) in rows.iter().enumerate() {
            for h in 0..per {
                zin.row_mut(per * r + h).assign(&self.condition(row, h));
            }
        }
        let mut work = ChainWork {
            seconds: 0.0,
            calls: 0,
            rows: 0,
        };
        let mut group: Option<ConditionGroup> = None;
        let split = self.running(rows, 0) <= model.split_head_rows();
        let mut eps = vec![0f64; c];
        for tick in 0..longest {
            let m = self.running(rows, tick);
            let n = m / per;
            {
                let xs = xin.as_slice_mut().expect("contiguous");
                for r in 0..n {
                    for h in 0..per {
                        let slot = per * r + h;
                        xs[slot * c..(slot + 1) * c].copy_from_slice(&x[r * c..(r + 1) * c]);
                    }
                }
            }
            let out = if split {
                // A group past its ticks is dropped before the next is made.
                let current = match group.take().filter(|g| g.ticks.contains(&tick)) {
                    Some(g) => g,
                    None => self.condition_group(model, rows, &zin, tick, longest, &mut work)?,
                };
                let cond = current.rows(tick, m).ok_or_else(|| {
                    shape_error(
                        self.step,
                        "diffusion_condition",
                        "cond",
                        &[current.cond.rows(), current.cond.width()],
                        &[m, current.cond.width()],
                    )
                })?;
                let out =
                    self.timed(&mut work, || model.head_state(xin.slice(s![..m, ..]), cond))?;
                // Non-finite state output from non-finite condition rows is
                // the condition part's (the rows are not checked as made: a
                // pass over up to 20 MiB a call).
                let out = self
                    .checked(out, "diffusion_state", "out", (m, head))
                    .map_err(|e| match e {
                        EngineError::NonFinite { .. } => {
                            check_finite("diffusion_condition", "cond", cond.iter(), self.step)
                                .err()
                                .unwrap_or(e)
                        }
                        e => e,
                    })?;
                group = Some(current);
                out
            } else {
                self.timesteps(rows, tick, tin.slice_mut(s![..m]));
                let out = self.timed(&mut work, || {
                    model.diffusion(
                        xin.slice(s![..m, ..]),
                        tin.slice(s![..m]),
                        zin.slice(s![..m, ..]),
                    )
                })?;
                self.checked(out, "diffusion", "out", (m, head))?
            };
            work.rows += m as u64;
            let os = out.as_slice().expect("standard layout");
            for (r, row) in rows[..n].iter().enumerate() {
                let i = row.steps - 1 - tick;
                let cond = &os[per * r * head..(per * r + 1) * head];
                for ch in 0..c {
                    let e = f64::from(cond[ch]);
                    eps[ch] = if self.guided {
                        let uncond = f64::from(os[(per * r + 1) * head + ch]);
                        uncond + self.scale * (e - uncond)
                    } else {
                        e
                    };
                }
                row.chain.step(
                    i,
                    info.variance,
                    &mut x[r * c..(r + 1) * c],
                    &eps,
                    &cond[c..],
                    row.draws.tick(tick),
                    self.temperature,
                );
            }
        }
        Ok(work)
    }

    /// One model call, its seconds and itself counted in `work`, a failure
    /// named with this step.
    fn timed<T>(
        &self,
        work: &mut ChainWork,
        call: impl FnOnce() -> Result<T, ModelError>,
    ) -> Result<T, EngineError> {
        let started = Instant::now();
        let out = call().map_err(|source| EngineError::Model {
            step: self.step,
            source,
        })?;
        work.seconds += started.elapsed().as_secs_f64();
        work.calls += 1;
        Ok(out)
    }

    /// Head rows running at `tick` (both halves of a row with guidance).
    fn running(&self, rows: &[Row], tick: usize) -> usize {
        self.halves() * rows.partition_point(|r| r.steps > tick)
    }

    /// The split head's condition part for the ticks from `first` on, as
    /// many as [`CONDITION_ROWS`] allows (at least one), in one call; `zin`
    /// holds the step's head rows of z (a tick's rows are a prefix).
    fn condition_group<M: MarModel>(
        &self,
        model: &mut M,
        rows: &[Row],
        zin: &Array2<f32>,
        first: usize,
        longest: usize,
        work: &mut ChainWork,
    ) -> Result<ConditionGroup, EngineError> {
        let mut ticks = first..first + 1;
        let mut total = self.running(rows, first);
        while ticks.end < longest && total + self.running(rows, ticks.end) <= CONDITION_ROWS {
            total += self.running(rows, ticks.end);
            ticks.end += 1;
        }
        let mut t = Array1::<i64>::zeros(total);
        let mut z = Array2::<f32>::zeros((total, zin.ncols()));
        let mut offsets = Vec::with_capacity(ticks.len());
        let mut at = 0;
        for tick in ticks.clone() {
            let m = self.running(rows, tick);
            offsets.push(at);
            self.timesteps(rows, tick, t.slice_mut(s![at..at + m]));
            z.slice_mut(s![at..at + m, ..])
                .assign(&zin.slice(s![..m, ..]));
            at += m;
        }
        let cond = self.timed(work, || model.head_condition(t.view(), z.view()))?;
        if cond.rows() != total {
            return Err(shape_error(
                self.step,
                "diffusion_condition",
                "cond",
                &[cond.rows(), cond.width()],
                &[total, cond.width()],
            ));
        }
        Ok(ConditionGroup {
            ticks,
            cond,
            offsets,
        })
    }

    /// The training-chain timestep of each head row running at `tick`
    /// (both halves of a row with guidance) into `out`, which holds
    /// exactly those rows.
    fn timesteps(&self, rows: &[Row], tick: usize, mut out: ndarray::ArrayViewMut1<'_, i64>) {
        let per = self.halves();
        for (r, row) in rows[..out.len() / per].iter().enumerate() {
            let t = row.chain.timesteps[row.steps - 1 - tick];
            for h in 0..per {
                out[per * r + h] = t;
            }
        }
    }

    /// Every tick in one call of the model's sampler graph; the update runs
    /// there in f32 with [`crate::sampler::Chain::tick_coefficients`].
    pub fn run_in_graph<M: MarModel>(
        &self,
        model: &mut M,
        rows: &[Row],
        x: &mut [f32],
        info: &ModelInfo,
    ) -> Result<ChainWork, EngineError> {
        let (c, d) = (info.token_dim, info.width);
        let n = rows.len();
        let ticks = rows.first().map_or(0, |r| r.steps);
        if ticks == 0 {
            return Ok(ChainWork {
                seconds: 0.0,
                calls: 0,
                rows: 0,
            });
        }
        let z = self.conditioning(rows, d);
        let active: Array1<i64> = (0..ticks)
            .map(|tick| rows.partition_point(|r| r.steps > tick) as i64)
            .collect();
        let TickInputs {
            timesteps,
            coefficients,
            noise,
        } = TickInputs::of_rows(rows, ticks, c, info, self.temperature);
        let per_call = self.ticks_per_call.unwrap_or(ticks).clamp(1, ticks);
        let mut work = ChainWork {
            seconds: 0.0,
            calls: 0,
            rows: self.head_rows(rows),
        };
        for first in (0..ticks).step_by(per_call) {
            let span = first..(first + per_call).min(ticks);
            let x0 = ndarray::ArrayView2::from_shape((n, c), &*x).expect("x holds N rows of C");
            let out = self.timed(&mut work, || {
                model.sample_chain(ChainInputs {
                    x: x0,
                    z: z.view(),
                    timesteps: timesteps.slice(s![span.clone(), ..]),
                    coefficients: coefficients.slice(s![span.clone(), .., ..]),
                    noise: noise.slice(s![span.clone(), .., ..]),
                    active: active.slice(s![span]),
                    guidance: self.scale as f32,
                })
            })?;
            let (graph, tensor) = model.chain_graph_output();
            let out = self.checked(out, graph, tensor, (n, c))?;
            x.copy_from_slice(out.as_slice().expect("standard layout"));
        }
        Ok(work)
    }
}

/// A split head's condition rows for a group of ticks (tick-major: each
/// tick's rows are a prefix of the step's head rows).
struct ConditionGroup {
    ticks: std::ops::Range<usize>,
    /// [Σ rows of the ticks, S].
    cond: ConditionRows,
    /// Where each tick's rows start in `cond`.
    offsets: Vec<usize>,
}

impl ConditionGroup {
    /// The `m` rows of `tick` (one of `ticks`); `None` where the condition
    /// part's output does not hold them.
    fn rows(&self, tick: usize, m: usize) -> Option<ndarray::ArrayView2<'_, f32>> {
        let at = *self.offsets.get(tick.checked_sub(self.ticks.start)?)?;
        self.cond.slice(at, m)
    }
}

/// Each row's timestep, coefficients and noise at each tick, in a sampler
/// graph's tick-major layout ([`ChainInputs`]); ticks past a row's chain
/// are zeros.
struct TickInputs {
    timesteps: Array2<i64>,
    coefficients: Array3<f32>,
    noise: Array3<f32>,
}

impl TickInputs {
    /// Filled tick by tick in parallel (each tick's slab is its own).
    fn of_rows(rows: &[Row], ticks: usize, c: usize, info: &ModelInfo, temperature: f64) -> Self {
        let n = rows.len();
        let mut timesteps = vec![0i64; ticks * n];
        let mut coefficients = vec![0f32; ticks * n * COEFFICIENTS];
        let mut noise = vec![0f32; ticks * n * c];
        timesteps
            .par_chunks_mut(n)
            .zip(coefficients.par_chunks_mut(n * COEFFICIENTS))
            .zip(noise.par_chunks_mut(n * c))
            .enumerate()
            .for_each(|(tick, ((t, k), e))| {
                // Rows run longest first: those still running are a prefix.
                let running = rows.partition_point(|r| r.steps > tick);
                for (r, row) in rows[..running].iter().enumerate() {
                    let i = row.steps - 1 - tick;
                    t[r] = row.chain.timesteps[i];
                    let values = row.chain.tick_coefficients(i, info.variance, temperature);
                    for (slot, v) in k[r * COEFFICIENTS..].iter_mut().zip(values) {
                        *slot = v as f32;
                    }
                    e[r * c..(r + 1) * c].copy_from_slice(row.draws.tick(tick));
                }
            });
        TickInputs {
            timesteps: Array2::from_shape_vec((ticks, n), timesteps).expect("T·N timesteps"),
            coefficients: Array3::from_shape_vec((ticks, n, COEFFICIENTS), coefficients)
                .expect("T·N·5 coefficients"),
            noise: Array3::from_shape_vec((ticks, n, c), noise).expect("T·N·C draws"),
        }
    }
}

//! `--sampler ticks`: the bundle's tick graph (models/add_sampler.py,
//! `graphs.tick`: one tick of every chain, no control flow) called once per
//! tick on tensors bound once per shape.
//!
//! A MAR step uploads its chains' inputs (initial noise, conditioning, every
//! tick's timesteps, coefficients, noise and running rows) once; then each
//! tick is one run of the graph on bound tensors, the state going from one
//! pair of tensors to the other and back, and only the finished tokens come
//! back. The rows are padded to a few sizes ([`bucket_rows`]) so that the
//! shapes of a run repeat. On the CUDA provider with CUDA graphs on, every
//! (shape, direction) is a graph id (`gpu_graph_id`): ONNX Runtime captures
//! the tick's kernels once and replays them, one launch per tick, which the
//! sampler graph's `Loop` cannot have (ONNX Runtime does not capture control
//! flow). A graph id keeps the addresses it was captured with, so the
//! tensors of a shape live as long as the model and ids are never reused.
//!
//! A run never writes a tensor it reads: ONNX Runtime (1.31) runs the first
//! call of each graph id three times (two warm-up runs, then the capture),
//! which gives the same result only because `x_next` and `k_next` are bound
//! to the other pair of tensors than `x` and `k`. And every use of a shape's
//! tensors first writes all of its inputs ([`BufferSet::upload`]): tensors
//! allocated later from the session's arena may lie in memory that an
//! earlier captured graph uses for its intermediates, which its replays
//! overwrite.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use ndarray::{Array2, s};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, RunOptions};
use ort::value::{PrimitiveTensorElementType, Tensor};

use gtr_engine::{COEFFICIENTS, ChainInputs, ModelError};

use crate::session::Graph;

const GRAPH: &str = "tick";

/// The row count a step of `n` rows runs on: the least of 8, 12, 16, 24,
/// 32, 48, ... (2^k and 3·2^(k−1)) that is at least `n`, so that a run's
/// steps share a few shapes; past 8 rows, padding adds less than half.
pub fn bucket_rows(n: usize) -> usize {
    let mut size = 8;
    loop {
        if size >= n {
            return size;
        }
        if size / 2 * 3 >= n {
            return size / 2 * 3;
        }
        size *= 2;
    }
}

/// Ticks over which the running rows keep one [`bucket_rows`] size, and
/// the rows running at the first of them (the later ticks run a prefix of
/// those).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Span {
    ticks: std::ops::Range<usize>,
    live: usize,
}

/// The spans of a step whose rows still running at each tick are `active`
/// (non-increasing, as rows run longest first) out of `n`.
fn spans(active: ndarray::ArrayView1<i64>, n: usize) -> Vec<Span> {
    let running = |tick: usize| (active[tick].clamp(0, n as i64) as usize).max(1);
    let mut out = Vec::new();
    let mut first = 0;
    while first < active.len() {
        let rows = bucket_rows(running(first));
        let end = (first + 1..active.len())
            .find(|&tick| bucket_rows(running(tick)) != rows)
            .unwrap_or(active.len());
        out.push(Span {
            ticks: first..end,
            live: running(first),
        });
        first = end;
    }
    out
}

/// What one set of bound tensors serves: G, the padded rows and the ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    groups: usize,
    rows: usize,
    ticks: usize,
}

/// Where bound tensors live: the device's memory and, when the host cannot
/// write it, host memory to stage copies in.
struct Memory {
    device: Allocator,
    staging: Option<Allocator>,
}

/// A tensor bound to the graph, with its host staging copy where the bound
/// one is device memory.
struct Buffer<T: PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static> {
    bound: Tensor<T>,
    staging: Option<Tensor<T>>,
}

impl<T: PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static> Buffer<T> {
    fn new(memory: &Memory, shape: Vec<usize>) -> ort::Result<Self> {
        Ok(Buffer {
            bound: Tensor::new(&memory.device, shape.clone())?,
            staging: match &memory.staging {
                Some(host) => Some(Tensor::new(host, shape)?),
                None => None,
            },
        })
    }

    /// Fills the tensor through `fill` (given every element, row-major).
    fn write(&mut self, fill: impl FnOnce(&mut [T])) -> ort::Result<()> {
        match &mut self.staging {
            None => fill(self.bound.extract_tensor_mut().1),
            Some(host) => {
                fill(host.extract_tensor_mut().1);
                host.copy_into(&mut self.bound)?;
            }
        }
        Ok(())
    }

    /// The tensor's elements, row-major.
    fn read(&mut self) -> ort::Result<&[T]> {
        match &mut self.staging {
            None => Ok(self.bound.extract_tensor().1),
            Some(host) => {
                self.bound.copy_into(&mut *host)?;
                Ok(host.extract_tensor().1)
            }
        }
    }
}

/// The bound tensors of one [`Shape`] and the two bindings that step the
/// state from `x[0]` to `x[1]` and back.
struct BufferSet {
    x: [Buffer<f32>; 2],
    k: [Buffer<i64>; 2],
    z: Buffer<f32>,
    t: Buffer<i64>,
    coef: Buffer<f32>,
    noise: Buffer<f32>,
    running: Buffer<bool>,
    guidance: Buffer<f32>,
    bindings: [IoBinding; 2],
    run_options: [RunOptions; 2],
}

impl BufferSet {
    /// Allocates and binds the tensors of `shape`; with `graph_ids`, the
    /// two directions run as CUDA graph ids `2·id` and `2·id + 1`.
    fn new(
        graph: &Graph,
        memory: &Memory,
        shape: Shape,
        (c, d): (usize, usize),
        graph_ids: Option<usize>,
    ) -> ort::Result<Self> {
        let Shape {
            groups,
            rows,
            ticks,
        } = shape;
        let mut set = BufferSet {
            x: [
                Buffer::new(memory, vec![rows, c])?,
                Buffer::new(memory, vec![rows, c])?,
            ],
            k: [Buffer::new(memory, vec![])?, Buffer::new(memory, vec![])?],
            z: Buffer::new(memory, vec![groups, rows, d])?,
            t: Buffer::new(memory, vec![ticks, rows])?,
            coef: Buffer::new(memory, vec![ticks, rows, COEFFICIENTS])?,
            noise: Buffer::new(memory, vec![ticks, rows, c])?,
            running: Buffer::new(memory, vec![ticks, rows])?,
            guidance: Buffer::new(memory, vec![1])?,
            bindings: [
                graph.session.create_binding()?,
                graph.session.create_binding()?,
            ],
            run_options: [RunOptions::new()?, RunOptions::new()?],
        };
        let name = |role: &str| graph.inputs[role].as_str();
        let out = |role: &str| graph.outputs[role].as_str();
        for (from, binding) in set.bindings.iter_mut().enumerate() {
            let to = 1 - from;
            binding.bind_input(name("x"), &set.x[from].bound)?;
            binding.bind_input(name("k"), &set.k[from].bound)?;
            binding.bind_input(name("z"), &set.z.bound)?;
            binding.bind_input(name("t"), &set.t.bound)?;
            binding.bind_input(name("coef"), &set.coef.bound)?;
            binding.bind_input(name("noise"), &set.noise.bound)?;
            binding.bind_input(name("running"), &set.running.bound)?;
            binding.bind_input(name("guidance"), &set.guidance.bound)?;
            binding.bind_output(out("x_next"), &mut set.x[to].bound)?;
            binding.bind_output(out("k_next"), &mut set.k[to].bound)?;
        }
        if let Some(id) = graph_ids {
            for (from, options) in set.run_options.iter_mut().enumerate() {
                options.set("gpu_graph_id", (2 * id + from).to_string())?;
            }
        }
        Ok(set)
    }

    /// Writes one step's chains into the bound tensors, rows past the step's
    /// padded with zeros that never run.
    fn upload(&mut self, inputs: &ChainInputs<'_>, c: usize) -> ort::Result<()> {
        let n = inputs.x.nrows();
        // `src`'s rows, then zeros, into `dst` (rows of `width`): each
        // element written once.
        let pad = |dst: &mut [f32], src: ndarray::ArrayView2<f32>, width: usize| {
            let (head, tail) = dst.split_at_mut(src.nrows() * width);
            for (row, values) in head.chunks_mut(width).zip(src.rows()) {
                row.iter_mut().zip(values).for_each(|(d, &v)| *d = v);
            }
            tail.fill(0.0);
        };
        self.x[0].write(|dst| pad(dst, inputs.x, c))?;
        self.k[0].write(|dst| dst[0] = 0)?;
        let rows = self.x[0].bound.shape()[0] as usize;
        self.z.write(|dst| {
            let width = inputs.z.dim().2;
            for (g, half) in dst.chunks_mut(rows * width).enumerate() {
                pad(half, inputs.z.index_axis(ndarray::Axis(0), g), width);
            }
        })?;
        let active = inputs.active;
        self.t.write(|dst| {
            for (row, values) in dst.chunks_mut(rows).zip(inputs.timesteps.rows()) {
                let (head, tail) = row.split_at_mut(n);
                head.iter_mut().zip(values).for_each(|(d, &v)| *d = v);
                tail.fill(0);
            }
        })?;
        self.coef.write(|dst| {
            let width = COEFFICIENTS;
            for (tick, slab) in dst.chunks_mut(rows * width).enumerate() {
                pad(
                    slab,
                    inputs.coefficients.index_axis(ndarray::Axis(0), tick),
                    width,
                );
            }
        })?;
        self.noise.write(|dst| {
            for (tick, slab) in dst.chunks_mut(rows * c).enumerate() {
                pad(slab, inputs.noise.index_axis(ndarray::Axis(0), tick), c);
            }
        })?;
        self.running.write(|dst| {
            for (tick, row) in dst.chunks_mut(rows).enumerate() {
                let running = active[tick].clamp(0, n as i64) as usize;
                row[..running].fill(true);
                row[running..].fill(false);
            }
        })?;
        self.guidance.write(|dst| dst[0] = inputs.guidance)
    }
}

/// The tick graph with the tensors of every shape it has run.
pub(crate) struct TickRunner {
    pub(crate) graph: Graph,
    /// CUDA graphs are captured and replayed (`gpu_graph_id` per shape and
    /// direction).
    captures: bool,
    /// C and D.
    widths: (usize, usize),
    /// Allocators and bindings are `Send` but not `Sync`; the mutex makes
    /// the model `Sync` (as a Python object must be). It is never locked:
    /// every use has `&mut self` ([`Mutex::get_mut`]).
    bound: Mutex<Bound>,
}

/// The memory the tensors come from, and the tensors of each shape.
struct Bound {
    memory: Memory,
    sets: HashMap<Shape, BufferSet>,
}

impl TickRunner {
    /// The runner of `graph` (opened on `provider`, with CUDA graphs on
    /// when `captures`), for tokens of C = `token_dim` and z of D = `width`.
    pub(crate) fn new(
        graph: Graph,
        provider: &str,
        captures: bool,
        token_dim: usize,
        width: usize,
    ) -> Result<Self, String> {
        let memory = if provider == "cpu" {
            Memory {
                device: Allocator::default(),
                staging: None,
            }
        } else {
            let info = MemoryInfo::new(
                AllocationDevice::CUDA,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            )
            .map_err(|e| e.to_string())?;
            Memory {
                device: Allocator::new(&graph.session, info).map_err(|e| e.to_string())?,
                staging: Some(Allocator::default()),
            }
        };
        Ok(TickRunner {
            graph,
            captures,
            widths: (token_dim, width),
            bound: Mutex::new(Bound {
                memory,
                sets: HashMap::new(),
            }),
        })
    }

    /// Whether ticks replay captured CUDA graphs.
    pub(crate) fn captures(&self) -> bool {
        self.captures
    }

    /// Runs every tick of `inputs` (the contract of
    /// [`gtr_engine::MarModel::sample_chain`]) → the sampled tokens [N, C].
    ///
    /// The ticks go in spans over which the running rows keep one padded
    /// size: as chains end (rows run longest first), the later spans run on
    /// the fewer rows still going, their state handed over through the host.
    pub(crate) fn run(&mut self, inputs: ChainInputs<'_>) -> Result<Array2<f32>, ModelError> {
        let mut state = inputs.x.to_owned();
        for Span { ticks, live } in spans(inputs.active, inputs.x.nrows()) {
            let out = self.run_span(ChainInputs {
                x: state.slice(s![..live, ..]),
                z: inputs.z.slice(s![.., ..live, ..]),
                timesteps: inputs.timesteps.slice(s![ticks.clone(), ..live]),
                coefficients: inputs.coefficients.slice(s![ticks.clone(), ..live, ..]),
                noise: inputs.noise.slice(s![ticks.clone(), ..live, ..]),
                active: inputs.active.slice(s![ticks]),
                guidance: inputs.guidance,
            })?;
            state.slice_mut(s![..live, ..]).assign(&out);
        }
        Ok(state)
    }

    /// [`TickRunner::run`] on one set of bound tensors: every tick of
    /// `inputs`, its rows padded to [`bucket_rows`].
    fn run_span(&mut self, inputs: ChainInputs<'_>) -> Result<Array2<f32>, ModelError> {
        let err = |message: String| ModelError::Graph {
            graph: GRAPH,
            message,
        };
        let (n, c) = inputs.x.dim();
        let ticks = inputs.timesteps.nrows();
        let shape = Shape {
            groups: inputs.z.dim().0,
            rows: bucket_rows(n),
            ticks,
        };
        let Bound { memory, sets } = self.bound.get_mut().unwrap_or_else(|e| e.into_inner());
        if !sets.contains_key(&shape) {
            let ids = self.captures.then_some(sets.len());
            let set = BufferSet::new(&self.graph, memory, shape, self.widths, ids)
                .map_err(|e| err(format!("binding tensors of {shape:?}: {e}")))?;
            sets.insert(shape, set);
        }
        let set = sets.get_mut(&shape).expect("inserted above");
        let started = Instant::now();
        set.upload(&inputs, c)
            .map_err(|e| err(format!("uploading a step's inputs: {e}")))?;
        let stats = &mut self.graph.stats;
        for tick in 0..ticks {
            let from = tick % 2;
            let call = Instant::now();
            self.graph
                .session
                .run_binding_with_options(&set.bindings[from], &set.run_options[from])
                .map_err(|e| err(e.to_string()))?;
            let seconds = call.elapsed().as_secs_f64();
            if stats.calls == 0 {
                stats.first_call_seconds = seconds;
            }
            stats.calls += 1;
        }
        let state = set.x[ticks % 2]
            .read()
            .map_err(|e| err(format!("reading the state back: {e}")))?;
        let out = Array2::from_shape_vec((n, c), state[..n * c].to_vec()).expect("N·C values");
        // Each tick reads its row of the step's tensors at k: a graph that
        // does not count k_next = k + 1 runs other ticks' inputs.
        let counted = set.k[ticks % 2]
            .read()
            .map_err(|e| err(format!("reading k back: {e}")))?;
        if counted.first() != Some(&(ticks as i64)) {
            return Err(ModelError::Contract {
                graph: GRAPH,
                tensor: "k_next".into(),
                problem: format!(
                    "counted to {counted:?} over {ticks} ticks from 0; the tick graph must return k_next = k + 1 (models/README.md, \"The optional tick graph\")"
                ),
            });
        }
        stats.seconds += started.elapsed().as_secs_f64();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::{Buffer, BufferSet, Memory, Shape, Span, bucket_rows, spans};
    use gtr_engine::{COEFFICIENTS, ChainInputs};
    use ndarray::{Array1, Array2, Array3};
    use ort::memory::Allocator;

    /// ONNX Runtime runs the first call of each CUDA graph id three
    /// times; that is right only if a tick never writes what it reads. So
    /// on the CPU: three runs of one direction leave what one run left, and
    /// the other direction reads what the first wrote.
    #[test]
    fn a_tick_run_again_gives_the_same_state() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/fixtures/tiny-sampler");
        let names = |list: &[&str]| {
            list.iter()
                .map(|n| (n.to_string(), n.to_string()))
                .collect()
        };
        let (mut graph, _) = crate::session::Graph::open(
            "tick",
            &dir.join("tick.onnx"),
            &names(&["x", "k", "z", "t", "coef", "noise", "running", "guidance"]),
            &names(&["x_next", "k_next"]),
            crate::Device::Cpu,
            Some(1),
            &crate::session::SessionSettings::default(),
        )
        .expect("the tiny-sampler fixture's tick graph");
        let memory = Memory {
            device: Allocator::default(),
            staging: None,
        };
        let (c, d, n, ticks) = (4, 32, 5, 3);
        let shape = Shape {
            groups: 2,
            rows: bucket_rows(n),
            ticks,
        };
        let mut set = BufferSet::new(&graph, &memory, shape, (c, d), None).unwrap();
        let wave = |i: usize| ((i * 37 % 17) as f32 - 8.0) / 8.0;
        let x = Array2::from_shape_fn((n, c), |(r, j)| wave(r * c + j));
        let z = Array3::from_shape_fn((2, n, d), |(g, r, j)| wave(g + r * d + j));
        let timesteps = Array2::from_shape_fn((ticks, n), |(k, r)| (900 - 300 * k - r) as i64);
        let coefficients = Array3::from_shape_fn((ticks, n, COEFFICIENTS), |(_, _, j)| {
            [0.98, 0.05, -3.0, -4.0, 1.0][j]
        });
        let noise = Array3::from_shape_fn((ticks, n, c), |(k, r, j)| wave(k + r + j));
        let active = Array1::from_elem(ticks, n as i64);
        let inputs = ChainInputs {
            x: x.view(),
            z: z.view(),
            timesteps: timesteps.view(),
            coefficients: coefficients.view(),
            noise: noise.view(),
            active: active.view(),
            guidance: 2.0,
        };
        set.upload(&inputs, c).unwrap();
        let run = |graph: &mut crate::session::Graph, set: &BufferSet, from: usize| {
            graph
                .session
                .run_binding(&set.bindings[from])
                .map(drop)
                .unwrap()
        };
        run(&mut graph, &set, 0);
        let once = (
            set.x[1].read().unwrap().to_vec(),
            set.k[1].read().unwrap().to_vec(),
        );
        run(&mut graph, &set, 0);
        run(&mut graph, &set, 0);
        let thrice = (
            set.x[1].read().unwrap().to_vec(),
            set.k[1].read().unwrap().to_vec(),
        );
        assert_eq!(once, thrice, "a repeated run moved the state");
        assert_eq!(once.1, [1], "k_next = k + 1");
        assert_eq!(
            (&set.x[0].read().unwrap()[..n * c], set.k[0].read().unwrap()),
            (x.as_slice().unwrap(), &[0][..]),
            "a run left its inputs as they were"
        );
        let moved = &once.0[..n * c];
        assert!(
            moved.iter().zip(x.iter()).any(|(a, b)| a != b) && moved.iter().all(|v| v.is_finite()),
            "the rows ran"
        );
        run(&mut graph, &set, 1);
        assert_eq!(
            set.k[0].read().unwrap(),
            [2],
            "the other direction reads what the first wrote"
        );
    }

    /// The staged path (host tensors copied into the bound ones and back,
    /// as on a GPU) on the CPU: what is written is what is read, for the
    /// element types and the 0-d shape the tick graph binds.
    #[test]
    fn staged_buffers_round_trip() {
        crate::session::environment().expect("the ONNX Runtime library");
        let memory = Memory {
            device: Allocator::default(),
            staging: Some(Allocator::default()),
        };
        let mut x = Buffer::<f32>::new(&memory, vec![3, 2]).unwrap();
        x.write(|d| {
            d.iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = i as f32 - 2.5)
        })
        .unwrap();
        assert_eq!(
            x.bound.extract_tensor().1,
            [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]
        );
        x.bound.extract_tensor_mut().1[0] = 7.0;
        assert_eq!(x.read().unwrap(), [7.0, -1.5, -0.5, 0.5, 1.5, 2.5]);
        let mut k = Buffer::<i64>::new(&memory, vec![]).unwrap();
        k.write(|d| d[0] = 41).unwrap();
        assert_eq!(k.read().unwrap(), [41]);
        let mut running = Buffer::<bool>::new(&memory, vec![2, 2]).unwrap();
        running
            .write(|d| d.copy_from_slice(&[true, false, false, true]))
            .unwrap();
        assert_eq!(running.read().unwrap(), [true, false, false, true]);
    }

    #[test]
    fn ticks_split_where_the_running_rows_change_size() {
        let active = ndarray::arr1(&[20i64, 20, 17, 10, 9, 5, 1]);
        let span = |ticks: std::ops::Range<usize>, live| Span { ticks, live };
        // 20 and 17 pad to 24, 10 and 9 to 12, 5 and 1 to 8.
        assert_eq!(
            spans(active.view(), 20),
            [span(0..3, 20), span(3..5, 10), span(5..7, 5)]
        );
        assert_eq!(spans(ndarray::arr1(&[3i64; 4]).view(), 3), [span(0..4, 3)]);
        assert!(spans(ndarray::Array1::<i64>::zeros(0).view(), 3).is_empty());
    }

    #[test]
    fn rows_pad_to_two_sizes_an_octave() {
        let sizes: Vec<usize> = [1, 8, 9, 12, 13, 16, 17, 24, 25, 100, 4096, 4097]
            .into_iter()
            .map(bucket_rows)
            .collect();
        assert_eq!(sizes, [8, 8, 12, 12, 16, 16, 24, 24, 32, 128, 4096, 6144]);
        for n in 1..5000 {
            let b = bucket_rows(n);
            assert!(b >= n && (n <= 8 || 2 * b < 3 * n), "{n} -> {b}");
        }
    }
}

//! gtr-run: an inference runtime for Masked Autoregressive (MAR) image
//! generators, driven by `.gtr` schedule files.
//!
//! The pipeline is: text → [`schedule::Schedule`] (parsed and checked) →
//! [`plan::Plan`] (every step's tokens, diffusion steps, guidance) for one
//! grid and seed → execution by the engine. [`cost`] prices a plan in FLOPs.
//! Those first layers are the `gtr-plan` crate, re-exported here under the
//! same names; it has no model runtime in its dependency tree. The map of
//! the layers is `docs/architecture.md`.
//!
//! ```
//! use std::collections::BTreeMap;
//! use gtr_run::{grid::Grid, plan::plan, schedule::{Schedule, Source}};
//!
//! let text = "partition checker(2)
//!             stage scaffold    { tokens S1  order random  steps 8 }
//!             stage reconstruct { tokens rest  steps 1  diffusion 20 }";
//! let schedule = Schedule::from_source(Source::new("<doc>", text), &BTreeMap::new()).unwrap();
//! let plan = plan(&schedule, Grid::new(4, 4), 0).unwrap();
//! assert_eq!(plan.steps.len(), 9);
//! assert_eq!(plan.steps[8].tokens.len(), 8);
//! ```
//!
//! Generating images: open a model bundle ([`bundle::Bundle::open`]), load
//! its ONNX graphs ([`backend::OrtModel::load`]; the ONNX Runtime
//! library is taken from `ORT_DYLIB_PATH` or fetched once into
//! `~/.cache/gtr-run`), and give an [`engine::Engine`] one plan and one
//! [`engine::ImageJob`] per image, each image's seed from
//! [`rng::image_seed`]; `examples/tiny.rs` does this on the tiny fixture
//! bundle. [`run`] adds what the command line does around it: output
//! folders, PNGs, `run.json` ([`run::RunRecord`]), shards
//! ([`run::generate`]), or the same run in memory
//! ([`run::generate_in_memory`], what the Python package uses). Images depend only on the run seed,
//! the image's index and the schedule: never on the batch, the thread
//! count or the machine.
//!
//! Features: `cuda` and `tensorrt` compile in the GPU execution providers
//! (they need the `onnxruntime-gpu` libraries at run time).

/// This crate's version (`gtr_run_version` in run records).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The engine (the `gtr-engine` crate) and its sampler.
pub use gtr_engine as engine;
pub use gtr_engine::sampler;
/// The ONNX Runtime backend and the bundle format (the `gtr-ort` crate).
pub use gtr_ort as backend;
pub use gtr_ort::{bundle, device, precision};
pub use gtr_plan::{cost, grid, plan, report, rng, schedule};

pub mod eval;
pub mod fsutil;
pub mod limits;
pub mod run;
pub mod snapshot;

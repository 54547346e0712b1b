//! The bottom layer of gtr-run: `.gtr` schedule text → [`schedule::Schedule`]
//! (parsed and checked) → [`plan::Plan`] (every MAR step's tokens,
//! diffusion steps, guidance) for one grid and seed, priced in FLOPs by
//! [`cost`] and shown by [`report`].
//!
//! Nothing here runs a model: this crate has no ONNX Runtime and no engine
//! in its dependency tree, so the compiler refuses an import from these
//! modules into either. The `gtr-run` crate re-exports every module under
//! the same name (`gtr_run::plan`, …).

pub mod cost;
pub mod grid;
pub mod plan;
pub mod report;
pub mod rng;
pub mod schedule;

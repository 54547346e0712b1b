//! The ONNX Runtime backend of gtr-run.
//!
//! A model bundle is a folder with a `manifest.yaml` ([`bundle`]) and the
//! ONNX graphs it names: encoder, decoder, diffusion head and VAE decoder,
//! optionally a fused backbone, a sampler graph, precision variants and an
//! evaluator. [`OrtModel::load`] opens them as ONNX Runtime sessions on an
//! execution provider ([`Device`]) at a [`precision`], checks every graph's
//! tensors against its contract, and implements gtr-engine's
//! [`MarModel`](gtr_engine::MarModel), which is all the engine sees of it.
//! [`OrtEvaluator`] runs a bundle's evaluator graph behind
//! [`Evaluator`](gtr_engine::Evaluator).
//!
//! The ONNX Runtime library is loaded at run time ([`library`]: from
//! `ORT_DYLIB_PATH`, else a cached copy, else fetched once from the PyPI
//! `onnxruntime` wheel). [`tensorrt`] turns a plan into TensorRT's
//! optimisation profiles and engine-cache options.
//!
//! This crate knows nothing of run folders, run records or evaluations
//! (gtr-run, one layer up); its dependency tree has no gtr-run.
//!
//! Features: `cuda` and `tensorrt` compile in the GPU execution providers
//! (they need the `onnxruntime-gpu` libraries at run time); `clap` makes
//! [`Device`] a `clap::ValueEnum`.

pub mod bundle;
mod contract;
pub mod device;
mod error;
mod evaluator;
pub mod external_data;
pub mod library;
mod model;
pub mod precision;
pub mod precision_choice;
pub mod profile;
mod runners;
mod session;
pub mod tensorrt;
mod ticks;

pub use device::Device;
pub use evaluator::{OrtEvaluator, features_of};
pub use model::{LoadOptions, OrtError, OrtModel};
pub use runners::{BackboneRunner, ChainRunner, HeadRunner, VaeRunner, runners_conflict};

//! What can go wrong in this crate, named by the graph, tensor, device or
//! flag it concerns.

/// A failure of loading or checking a bundle's graphs, or of the library.
#[derive(Debug, thiserror::Error)]
pub enum OrtError {
    #[error(transparent)]
    Library(#[from] crate::library::LibraryError),
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
    #[error("graph `{graph}` ({path}): {message}")]
    Session {
        graph: &'static str,
        path: String,
        message: String,
    },
    /// The bundle's file for a graph is not a model ONNX Runtime can read
    /// (truncated, not ONNX, an invalid graph): a wrong input, unlike a
    /// [`OrtError::Session`] failure of the runtime itself.
    #[error(
        "graph `{graph}` ({path}): not an ONNX model that ONNX Runtime can load: {message}; the bundle's manifest names this file for the graph: export it again, or correct the manifest"
    )]
    Model {
        graph: &'static str,
        path: String,
        message: String,
    },
    #[error("graph `{graph}`, tensor `{tensor}`: {problem}")]
    Contract {
        graph: &'static str,
        tensor: String,
        problem: String,
    },
    #[error("device `{device}`: {problem}")]
    Device { device: String, problem: String },
    #[error(transparent)]
    Precision(#[from] crate::precision_choice::PrecisionError),
    #[error(transparent)]
    TensorRt(#[from] crate::tensorrt::TensorRtOptionsError),
    /// A [`crate::ChainRunner`], [`crate::BackboneRunner`] or [`crate::HeadRunner`] the bundle cannot honour.
    #[error("{0}")]
    Sampler(String),
}

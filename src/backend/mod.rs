//! Model backends. ONNX Runtime ([`ort`]) is the one real backend; the
//! engine sees it only through [`crate::engine::MarModel`].

pub mod ort;

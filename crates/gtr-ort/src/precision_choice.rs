//! What the precision of a run (`--precision`, the manifest's `precision`)
//! means for one bundle on one device: which graph files a bundle opens and which execution-provider switches
//! are set. Everything here is decided before ONNX Runtime is touched, so
//! it is tested without it.
//!
//! - `fp32`: the bundle's `graphs` as exported.
//! - `tf32`: the fp32 graphs with the CUDA provider's TF32 switch on (matmuls
//!   and convolutions on tensor cores with 10-bit mantissas); CUDA only.
//! - `fp16`, `bf16`, `int8`: variant graphs listed in the manifest's
//!   `precisions` section (written by `models/convert_precision.py`); a role a
//!   variant does not list runs its fp32 graph. With `--device tensorrt`,
//!   fp16 and bf16 are TensorRT builder flags on the fp32 graphs instead.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::bundle::{Bundle, MANIFEST_FILE, Role};
use crate::device::Device;
use crate::precision::Precision;

/// Where the precision of a run came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrecisionSource {
    /// `--precision`.
    Flag,
    /// The manifest's `precision` field.
    Manifest,
    /// Neither: fp32.
    Default,
}

/// What a precision means for one bundle on one device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrecisionChoice {
    pub precision: Precision,
    pub source: PrecisionSource,
    /// Graph file (relative to the bundle folder) by role key: the
    /// precision's variant where the bundle has one, else the fp32 graph.
    pub graph_files: BTreeMap<String, String>,
    /// The CUDA provider's `use_tf32` (set explicitly either way).
    pub cuda_tf32: bool,
    /// TensorRT builder flags (used only when TensorRT runs).
    pub tensorrt_fp16: bool,
    pub tensorrt_bf16: bool,
}

impl PrecisionChoice {
    /// fp32 with the bundle's own graphs, as before precisions existed.
    pub fn fp32(bundle: &Bundle) -> PrecisionChoice {
        PrecisionChoice {
            precision: Precision::Fp32,
            source: PrecisionSource::Default,
            graph_files: base_files(bundle),
            cuda_tf32: false,
            tensorrt_fp16: false,
            tensorrt_bf16: false,
        }
    }

    /// Whether the graph of the optional role `derived` (one the model
    /// tools write from others: the sampler and tick graphs and the split
    /// head's parts from the head, the backbone graph from the encoder and
    /// decoder) runs in this precision as the graphs it is made of: the
    /// bundle's own files for all, or the precision's variants for all.
    /// Else (the bundle got the graph after its variants were written, or
    /// the variants lack it) the run would mix an fp32 graph into, say, an
    /// int8 one, so it is not used. False where the bundle lacks a role.
    pub fn runs_alike(&self, bundle: &Bundle, derived: Role) -> bool {
        let sources: &[Role] = match derived {
            Role::Backbone => &[Role::Encoder, Role::Decoder],
            _ => &[Role::Diffusion],
        };
        // Per role: whether it runs a variant file; None where it is missing.
        let variant = |role: &Role| {
            let key = role.key();
            match (self.graph_files.get(key), bundle.manifest.graphs.get(key)) {
                (Some(file), Some(entry)) => Some(*file != entry.file),
                _ => None,
            }
        };
        let own = variant(&derived);
        own.is_some() && sources.iter().all(|role| variant(role) == own)
    }
}

fn base_files(bundle: &Bundle) -> BTreeMap<String, String> {
    bundle
        .manifest
        .graphs
        .iter()
        .map(|(role, entry)| (role.clone(), entry.file.clone()))
        .collect()
}

impl PrecisionChoice {
    /// The files of the four graphs every bundle has (by role key), as this
    /// choice reads them: what, with the manifest's settings, makes the
    /// model's images. The optional graphs are written from these by the
    /// model tools and are left out.
    pub fn model_files(&self, bundle: &Bundle) -> Vec<(String, std::path::PathBuf)> {
        Role::ALL
            .iter()
            .map(|role| {
                let key = role.key();
                let file = self
                    .graph_files
                    .get(key)
                    .cloned()
                    .unwrap_or_else(|| bundle.graph(*role).file.clone());
                (key.to_string(), bundle.dir.join(file))
            })
            .collect()
    }
}

/// A precision that cannot be used as asked; the message names the flag or
/// the manifest field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct PrecisionError(pub String);

/// Decides the precision of a run: `flag` (`--precision`) wins over the
/// manifest's `precision`, which wins over fp32; then checks that it can
/// run on `device` and picks the graph files.
pub fn choose(
    bundle: &Bundle,
    flag: Option<Precision>,
    device: Device,
) -> Result<PrecisionChoice, PrecisionError> {
    let manifest_path = bundle.dir.join(MANIFEST_FILE);
    let (precision, source) = match (flag, bundle.default_precision()) {
        (Some(p), _) => (p, PrecisionSource::Flag),
        (None, Some(p)) => (p, PrecisionSource::Manifest),
        (None, None) => (Precision::Fp32, PrecisionSource::Default),
    };
    // How to name the request in messages.
    let asked = match source {
        PrecisionSource::Flag => format!("--precision {precision}"),
        _ => format!(
            "the manifest's default `precision: {precision}` ({})",
            manifest_path.display()
        ),
    };
    let device_name = device.name();
    let mut choice = PrecisionChoice {
        precision,
        source,
        graph_files: base_files(bundle),
        cuda_tf32: false,
        tensorrt_fp16: false,
        tensorrt_bf16: false,
    };
    match precision {
        Precision::Fp32 => {}
        Precision::Tf32 => match device {
            Device::Cuda | Device::Auto => choice.cuda_tf32 = true,
            Device::Cpu => {
                return Err(PrecisionError(format!(
                    "{asked}: TF32 is a math mode of NVIDIA GPUs (the CUDA provider's `use_tf32`), \
                     not a graph; it needs --device cuda. On the CPU use fp32, or the int8 or fp16 \
                     variant graphs"
                )));
            }
            Device::TensorRt => {
                return Err(PrecisionError(format!(
                    "{asked}: tf32 is offered with --device cuda; TensorRT decides on TF32 for fp32 \
                     layers itself, so ask for fp32 (or fp16/bf16) with --device tensorrt"
                )));
            }
        },
        Precision::Int8 if device != Device::Cpu => {
            return Err(PrecisionError(format!(
                "{asked} with --device {device_name}: int8 variants are dynamically quantized for \
                 ONNX Runtime's CPU provider (their quantized MatMuls have no GPU kernels, and \
                 TensorRT int8 would need a calibration table); use --device cpu, or fp16/bf16 \
                 on the GPU"
            )));
        }
        Precision::Fp16 | Precision::Bf16 if device == Device::TensorRt => {
            // TensorRT picks layer precisions itself from the fp32 graphs.
            choice.tensorrt_fp16 = precision == Precision::Fp16;
            choice.tensorrt_bf16 = precision == Precision::Bf16;
        }
        Precision::Fp16 | Precision::Bf16 | Precision::Int8 => {
            let Some(variant) = bundle.manifest.precisions.get(precision.name()) else {
                let have: Vec<&str> = bundle
                    .manifest
                    .precisions
                    .keys()
                    .map(String::as_str)
                    .collect();
                let have = if have.is_empty() {
                    "it has no `precisions` section".to_string()
                } else {
                    format!("it has variants for {} only", have.join(", "))
                };
                return Err(PrecisionError(format!(
                    "{asked}: the bundle {} has no {precision} graphs: its manifest ({}) has no \
                     `precisions: {precision}:` entry ({have}). Write them with \
                     `python3 models/convert_precision.py {} --precision {precision}`, or run \
                     with --precision fp32",
                    bundle.dir.display(),
                    manifest_path.display(),
                    crate::bundle::shell_word(&bundle.dir),
                )));
            };
            for (role, file) in variant {
                choice.graph_files.insert(role.clone(), file.clone());
            }
            if device == Device::Auto {
                choice.tensorrt_fp16 = precision == Precision::Fp16;
                choice.tensorrt_bf16 = precision == Precision::Bf16;
            }
        }
    }
    Ok(choice)
}

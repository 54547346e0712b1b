//! What each graph of a bundle must take and give: element types and
//! dims per manifest role, derived from the manifest's model description,
//! checked against a loaded session's tensors.

use ort::value::TensorElementType;

use crate::bundle::Role;
use crate::error::OrtError;
use crate::session::Graph;
use gtr_engine::ModelInfo;

/// One expected tensor: element type and dims (`None` = any; batch-like
/// dims must be dynamic).
pub(crate) struct Expect {
    role: &'static str,
    ty: TensorElementType,
    dims: Vec<Dim>,
}

#[derive(Clone, Copy)]
enum Dim {
    Dynamic,
    Any,
    Fixed(usize),
}

/// The graph of `role`'s contract: (inputs, outputs) by manifest role name.
pub(crate) fn expectations(role: Role, info: &ModelInfo) -> (Vec<Expect>, Vec<Expect>) {
    use Dim::*;
    use TensorElementType::{Float32 as F, Int64 as I};
    let (l, c, d) = (info.grid.len(), info.token_dim, info.width);
    let (h, w) = (info.grid.height, info.grid.width);
    let e = |role, ty, dims: Vec<Dim>| Expect { role, ty, dims };
    match role {
        Role::Encoder => (
            vec![
                e("tokens", F, vec![Dynamic, Fixed(l), Fixed(c)]),
                e("known", I, vec![Dynamic, Dynamic]),
                e("label", I, vec![Dynamic]),
            ],
            vec![e("encoded", F, vec![Any, Any, Fixed(d)])],
        ),
        Role::Decoder => (
            vec![
                e("encoded", F, vec![Dynamic, Dynamic, Fixed(d)]),
                e("known", I, vec![Dynamic, Dynamic]),
            ],
            vec![e("z", F, vec![Any, Fixed(l), Fixed(d)])],
        ),
        Role::Diffusion => (
            vec![
                e("x", F, vec![Dynamic, Fixed(c)]),
                e("t", I, vec![Dynamic]),
                e("z", F, vec![Dynamic, Fixed(d)]),
            ],
            vec![e("out", F, vec![Any, Fixed(info.head_channels())])],
        ),
        Role::Sampler => (
            vec![
                e("x", F, vec![Dynamic, Fixed(c)]),
                e("z", F, vec![Dynamic, Dynamic, Fixed(d)]),
                e("t", I, vec![Dynamic, Dynamic]),
                e("coef", F, vec![Dynamic, Dynamic, Fixed(5)]),
                e("noise", F, vec![Dynamic, Dynamic, Fixed(c)]),
                e("active", I, vec![Dynamic]),
                e("guidance", F, vec![Fixed(1)]),
            ],
            vec![e("x_out", F, vec![Any, Fixed(c)])],
        ),
        Role::Tick => (
            vec![
                e("x", F, vec![Dynamic, Fixed(c)]),
                e("k", I, vec![]),
                e("z", F, vec![Dynamic, Dynamic, Fixed(d)]),
                e("t", I, vec![Dynamic, Dynamic]),
                e("coef", F, vec![Dynamic, Dynamic, Fixed(5)]),
                e("noise", F, vec![Dynamic, Dynamic, Fixed(c)]),
                e("running", TensorElementType::Bool, vec![Dynamic, Dynamic]),
                e("guidance", F, vec![Fixed(1)]),
            ],
            vec![e("x_next", F, vec![Any, Fixed(c)]), e("k_next", I, vec![])],
        ),
        Role::Backbone => (
            vec![
                e("tokens", F, vec![Dynamic, Fixed(l), Fixed(c)]),
                e("known", I, vec![Dynamic, Dynamic]),
                e("label", I, vec![Dynamic]),
                e("predict", I, vec![Dynamic, Dynamic]),
            ],
            vec![e("z", F, vec![Any, Any, Fixed(d)])],
        ),
        Role::DiffusionCondition => (
            vec![e("t", I, vec![Dynamic]), e("z", F, vec![Dynamic, Fixed(d)])],
            vec![e("cond", F, vec![Any, Any])],
        ),
        Role::DiffusionState => (
            vec![
                e("x", F, vec![Dynamic, Fixed(c)]),
                e("cond", F, vec![Dynamic, Any]),
            ],
            vec![e("out", F, vec![Any, Fixed(info.head_channels())])],
        ),
        Role::VaeDecoder => (
            vec![e("latent", F, vec![Dynamic, Fixed(c), Fixed(h), Fixed(w)])],
            vec![e(
                "image",
                F,
                vec![
                    Any,
                    Fixed(info.image.channels),
                    Fixed(info.image.height),
                    Fixed(info.image.width),
                ],
            )],
        ),
    }
}

/// The evaluator's contract: `pixels` f32 [B, H, W, channels] →
/// `logits` [B, classes], `features` [B, F].
pub(crate) fn evaluator_expectations(info: &ModelInfo) -> (Vec<Expect>, Vec<Expect>) {
    use Dim::*;
    use TensorElementType::Float32 as F;
    let img = info.image;
    let classes = if info.classes > 0 {
        Fixed(info.classes)
    } else {
        Any
    };
    let e = |role, dims: Vec<Dim>| Expect { role, ty: F, dims };
    (
        vec![e(
            "pixels",
            vec![
                Dynamic,
                Fixed(img.height),
                Fixed(img.width),
                Fixed(img.channels),
            ],
        )],
        vec![
            e("logits", vec![Any, classes]),
            e("features", vec![Any, Any]),
        ],
    )
}

/// Dimension `axis` of the output of role `role`, where the graph fixes it.
pub(crate) fn fixed_dim(graph: &Graph, role: &str, axis: usize) -> Option<usize> {
    declared_dim(&graph.outputs, graph.session.outputs(), role, axis)
}

/// Dimension `axis` of the input of role `role`, where the graph fixes it.
pub(crate) fn fixed_input_dim(graph: &Graph, role: &str, axis: usize) -> Option<usize> {
    declared_dim(&graph.inputs, graph.session.inputs(), role, axis)
}

/// Dimension `axis` of the tensor that `names` gives role `role`, among
/// `outlets`, where it is fixed.
fn declared_dim(
    names: &std::collections::BTreeMap<String, String>,
    outlets: &[ort::value::Outlet],
    role: &str,
    axis: usize,
) -> Option<usize> {
    let tensor = names.get(role)?;
    let outlet = outlets.iter().find(|o| o.name() == tensor)?;
    let dim = *outlet.dtype().tensor_shape()?.get(axis)?;
    usize::try_from(dim).ok()
}

/// Checks the graph's tensors against the expected (inputs, outputs).
pub(crate) fn check_contract(
    graph: &Graph,
    (ins, outs): (Vec<Expect>, Vec<Expect>),
) -> Result<(), OrtError> {
    let name = graph.name;
    for (kind, list, names, outlets) in [
        ("input", ins, &graph.inputs, graph.session.inputs()),
        ("output", outs, &graph.outputs, graph.session.outputs()),
    ] {
        for exp in list {
            let tensor = &names[exp.role];
            let contract = |problem: String| OrtError::Contract {
                graph: name,
                tensor: tensor.clone(),
                problem: format!("{problem} (in {})", graph.path.display()),
            };
            let outlet = outlets.iter().find(|o| o.name() == tensor).ok_or_else(|| {
                let have: Vec<&str> = outlets.iter().map(|o| o.name()).collect();
                contract(format!(
                    "the graph has no {kind} of this name (manifest role `{}`); its {kind}s are {}",
                    exp.role,
                    have.join(", ")
                ))
            })?;
            let ty = outlet.dtype().tensor_type();
            if ty != Some(exp.ty) {
                let got = ty.map_or("not a tensor".to_string(), |ty| format!("{ty:?}"));
                return Err(contract(format!(
                    "element type {got}, expected {:?}",
                    exp.ty
                )));
            }
            let shape: Vec<i64> = outlet
                .dtype()
                .tensor_shape()
                .map(|s| s.to_vec())
                .unwrap_or_default();
            let want: Vec<String> = exp
                .dims
                .iter()
                .map(|d| match d {
                    Dim::Dynamic => "dynamic".into(),
                    Dim::Any => "?".into(),
                    Dim::Fixed(n) => n.to_string(),
                })
                .collect();
            let mismatch = || contract(format!("shape {shape:?}, expected [{}]", want.join(", ")));
            if shape.len() != exp.dims.len() {
                return Err(mismatch());
            }
            for (&got, want) in shape.iter().zip(&exp.dims) {
                let ok = match want {
                    Dim::Dynamic => got < 0,
                    Dim::Any => true,
                    Dim::Fixed(n) => got < 0 || got == *n as i64,
                };
                if !ok {
                    return Err(mismatch());
                }
            }
        }
        if kind == "input"
            && let Some(extra) = outlets
                .iter()
                .find(|o| !names.values().any(|n| n == o.name()))
        {
            return Err(OrtError::Contract {
                graph: name,
                tensor: extra.name().to_string(),
                problem: format!(
                    "the graph needs this input, but the manifest gives it no role (in {})",
                    graph.path.display()
                ),
            });
        }
    }
    Ok(())
}

//! One graph of a bundle as an ONNX Runtime session: the process-wide
//! environment, the execution provider registered as a run asks
//! ([`SessionSettings`]), the run call with its timing, and the tensor views
//! handed to it.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Instant;

use ndarray::Dimension;
use ort::environment::Environment;
use ort::session::{Session, SessionInputValue};
use ort::value::{Tensor, TensorRef, TensorValueType};

use crate::device::Device;
use crate::error::OrtError;
use crate::library;
use crate::tensorrt::TensorRtOptions;
use gtr_engine::{GraphStats, KernelProfile, ModelError};

/// What one session is opened with besides its device and threads: the
/// GPU providers' switches and where ONNX Runtime writes its profile.
#[derive(Debug, Clone, Default)]
pub(crate) struct SessionSettings {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) cuda_tf32: bool,
    #[cfg_attr(not(feature = "tensorrt"), allow(dead_code))]
    pub(crate) tensorrt: Option<TensorRtOptions>,
    /// Profile file prefix (ONNX Runtime appends a timestamp and `.json`).
    pub(crate) profile_prefix: Option<std::path::PathBuf>,
    /// The CUDA provider captures and replays CUDA graphs.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) cuda_graph: bool,
}

static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// The process-wide ORT environment, loading the library on first use.
pub(crate) fn environment() -> Result<&'static Environment, OrtError> {
    let env = ENVIRONMENT.get_or_init(|| {
        let path = library::locate().map_err(|e| e.to_string())?;
        let builder = ort::init_from(&path).map_err(|e| {
            library::LibraryError {
                problem: format!("{}: {e}", path.display()),
            }
            .to_string()
        })?;
        // No telemetry: the Microsoft builds of ONNX Runtime record events
        // (in a store under ~/.cache on Linux) unless told not to, and a
        // run writes nothing outside its output folder.
        builder
            .with_name("gtr-run")
            .with_telemetry(false)
            .build()
            .map_err(|e| e.to_string())
    });
    env.as_ref().map_err(|e| OrtError::Runtime(e.clone()))
}

/// One graph's session, its tensor names by role and what its calls cost.
pub(crate) struct Graph {
    pub(crate) name: &'static str,
    /// The file it was opened from, as given (a precision's variant, say).
    pub(crate) path: std::path::PathBuf,
    pub(crate) session: Session,
    pub(crate) inputs: BTreeMap<String, String>,
    pub(crate) outputs: BTreeMap<String, String>,
    pub(crate) stats: GraphStats,
    /// ONNX Runtime is profiling this session.
    profiling: bool,
}

impl Graph {
    /// Opens the graph at `path` on `device`; `inputs`/`outputs` map roles
    /// to tensor names. Returns the graph and the provider that will run it.
    pub(crate) fn open(
        name: &'static str,
        path: &std::path::Path,
        inputs: &BTreeMap<String, String>,
        outputs: &BTreeMap<String, String>,
        device: Device,
        threads: Option<usize>,
        settings: &SessionSettings,
    ) -> Result<(Graph, String), OrtError> {
        let env = environment()?;
        let started = Instant::now();
        let session_err = |message: String| OrtError::Session {
            graph: name,
            path: path.display().to_string(),
            message,
        };
        let mut builder = Session::builder(env).map_err(|e| session_err(e.to_string()))?;
        // A failing run's error comes back to us and is said once, with the
        // graph named; ONNX Runtime's own log line would say it again.
        builder = builder
            .with_intra_op_spinning(false)
            .map_err(|e| session_err(e.to_string()))?
            .with_log_level(ort::logging::LogLevel::Fatal)
            .map_err(|e| session_err(e.to_string()))?;
        if let Some(n) = threads {
            builder = builder
                .with_intra_threads(n)
                .map_err(|e| session_err(e.to_string()))?;
        }
        if let Some(prefix) = &settings.profile_prefix {
            builder = builder
                .with_profiling(prefix)
                .map_err(|e| session_err(format!("profiling into {}: {e}", prefix.display())))?;
        }
        let (mut builder, provider) = register_device(builder, device, settings)?;
        // ONNX Runtime calls an empty file a generic failure.
        if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
            return Err(OrtError::Model {
                graph: name,
                path: path.display().to_string(),
                message: "the file is empty".into(),
            });
        }
        check_external_data(path).map_err(|message| OrtError::Model {
            graph: name,
            path: path.display().to_string(),
            message,
        })?;
        let session = builder.commit_from_file(path).map_err(|e| {
            use ort::ErrorCode::{InvalidGraph, InvalidProtobuf, NoModel, NoSuchFile};
            // ONNX Runtime reports a graph it cannot read or resolve (an
            // opset or IR version it lacks, an op of an unknown domain, a
            // dangling input, shapes that cannot agree) as a generic failure
            // of "Load model from …": the file's content, a wrong input,
            // like the codes it gives such graphs elsewhere.
            let content = matches!(
                e.code(),
                InvalidProtobuf | InvalidGraph | NoModel | NoSuchFile
            ) || e.message().starts_with("Load model from");
            if content {
                OrtError::Model {
                    graph: name,
                    path: path.display().to_string(),
                    message: e.message().to_string(),
                }
            } else {
                session_err(e.to_string())
            }
        })?;
        let graph = Graph {
            name,
            path: path.to_path_buf(),
            session,
            inputs: inputs.clone(),
            outputs: outputs.clone(),
            stats: GraphStats {
                graph: name.into(),
                load_seconds: started.elapsed().as_secs_f64(),
                ..GraphStats::default()
            },
            profiling: settings.profile_prefix.is_some(),
        };
        Ok((graph, provider))
    }

    /// Ends ONNX Runtime's profiling of this session, if it was on, and
    /// records the profile's summary (or why there is none) in the graph's
    /// stats.
    pub(crate) fn end_profiling(&mut self) {
        if !std::mem::take(&mut self.profiling) {
            return;
        }
        self.stats.kernels = Some(match self.session.end_profiling() {
            Ok(file) => {
                crate::profile::read(std::path::Path::new(&file)).unwrap_or_else(|problem| {
                    KernelProfile {
                        file,
                        problem: Some(problem),
                        ..KernelProfile::default()
                    }
                })
            }
            Err(e) => KernelProfile {
                problem: Some(format!("ONNX Runtime could not end the profile: {e}")),
                ..KernelProfile::default()
            },
        });
    }

    /// Runs the graph on (role, tensor) inputs and returns the output `role`.
    /// With `check_finite`, a NaN or Inf in the output is an error naming
    /// this graph (the engine checks the outputs it consumes itself).
    pub(crate) fn run<'a>(
        &mut self,
        inputs: Vec<(&str, SessionInputValue<'a>)>,
        output: &str,
        check_finite: bool,
    ) -> Result<ndarray::ArrayD<f32>, ModelError> {
        let mut out = self.run_outputs(inputs, &[output], check_finite)?;
        Ok(out.remove(0))
    }

    /// [`Graph::run`] for several output roles, returned in that order.
    pub(crate) fn run_outputs<'a>(
        &mut self,
        inputs: Vec<(&str, SessionInputValue<'a>)>,
        outputs: &[&str],
        check_finite: bool,
    ) -> Result<Vec<ndarray::ArrayD<f32>>, ModelError> {
        let graph = self.name;
        let err = |message: String| ModelError::Graph { graph, message };
        let names: Vec<String> = outputs.iter().map(|o| self.outputs[*o].clone()).collect();
        let values = self.timed_run(inputs)?;
        let mut arrays = Vec::with_capacity(outputs.len());
        for out_name in &names {
            let value = values
                .get(out_name)
                .ok_or_else(|| err(format!("no output `{out_name}`")))?;
            let array = value
                .try_extract_array::<f32>()
                .map_err(|e| err(format!("output `{out_name}`: {e}")))?
                .to_owned();
            if check_finite && let Some(bad) = array.iter().find(|v| !v.is_finite()) {
                return Err(err(format!(
                    "output `{out_name}` holds a non-finite value ({bad})"
                )));
            }
            arrays.push(array);
        }
        Ok(arrays)
    }

    /// [`Graph::run`] without copying the output out of the runtime: the
    /// f32 tensor `output` as ONNX Runtime made it, in host memory.
    pub(crate) fn run_kept<'a>(
        &mut self,
        inputs: Vec<(&str, SessionInputValue<'a>)>,
        output: &str,
    ) -> Result<Tensor<f32>, ModelError> {
        let graph = self.name;
        let err = |message: String| ModelError::Graph { graph, message };
        let out_name = self.outputs[output].clone();
        // ONNX Runtime may hand back an input's own memory as an output of
        // the same name, which the caller frees after the call.
        if self.inputs.values().any(|input| *input == out_name) {
            return Err(err(format!(
                "output `{out_name}` is also an input of the graph; it must be a tensor the graph computes"
            )));
        }
        let mut values = self.timed_run(inputs)?;
        let value = values
            .remove(&out_name)
            .ok_or_else(|| err(format!("no output `{out_name}`")))?;
        let tensor = value
            .downcast::<TensorValueType<f32>>()
            .map_err(|e| err(format!("output `{out_name}`: {e}")))?;
        // A tensor outside host memory cannot be read here.
        tensor
            .try_extract_tensor::<f32>()
            .map_err(|e| err(format!("output `{out_name}`: {e}")))?;
        Ok(tensor)
    }

    /// One run call on (role, tensor) inputs, its seconds counted in the
    /// graph's stats.
    /// Runs the graph once as a check made while loading: `read` gets its
    /// outputs and the graph's output names by role. The call's time is
    /// counted as the graph's loading time, not as one of its calls.
    pub(crate) fn probe<'a, T>(
        &mut self,
        inputs: Vec<(&str, SessionInputValue<'a>)>,
        read: impl FnOnce(&ort::session::SessionOutputs<'_>, &BTreeMap<String, String>) -> T,
    ) -> Result<T, ModelError> {
        let outputs = self.outputs.clone();
        let result = self.timed_run(inputs).map(|values| read(&values, &outputs));
        let stats = &mut self.stats;
        stats.load_seconds += stats.seconds;
        (stats.calls, stats.seconds, stats.first_call_seconds) = (0, 0.0, 0.0);
        result
    }

    fn timed_run<'a>(
        &mut self,
        inputs: Vec<(&str, SessionInputValue<'a>)>,
    ) -> Result<ort::session::SessionOutputs<'_>, ModelError> {
        let Graph {
            name: graph,
            session,
            inputs: input_names,
            stats,
            ..
        } = self;
        let graph = *graph;
        let named: Vec<(Cow<'_, str>, SessionInputValue<'a>)> = inputs
            .into_iter()
            .map(|(r, v)| (Cow::Borrowed(input_names[r].as_str()), v))
            .collect();
        let start = Instant::now();
        let values = session.run(named).map_err(|e| ModelError::Graph {
            graph,
            message: e.to_string(),
        })?;
        let seconds = start.elapsed().as_secs_f64();
        if stats.calls == 0 {
            stats.first_call_seconds = seconds;
        }
        stats.calls += 1;
        stats.seconds += seconds;
        Ok(values)
    }
}

/// Refuses a graph whose weights kept beside it
/// ([`crate::external_data`]) are named outside its folder, are not there
/// or end before a tensor's bytes do; a graph protobuf cannot read is left
/// to ONNX Runtime to name.
fn check_external_data(path: &std::path::Path) -> Result<(), String> {
    let Ok(tensors) = crate::external_data::external_tensors(path) else {
        return Ok(());
    };
    let folder = path.parent().unwrap_or(std::path::Path::new(""));
    for tensor in tensors {
        let location = std::path::Path::new(&tensor.location);
        let inside = location
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !inside {
            return Err(format!(
                "its weights are named in `{}`, outside the graph's folder",
                tensor.location
            ));
        }
        let Some(meta) = std::fs::metadata(folder.join(location))
            .ok()
            .filter(|m| m.is_file())
        else {
            return Err(format!(
                "its weights file `{}` is not there ({} names it beside the graph)",
                tensor.location,
                path.display()
            ));
        };
        let end = tensor.offset.checked_add(tensor.length.unwrap_or(0));
        if end.is_none_or(|end| end > meta.len()) {
            return Err(format!(
                "its weights file `{}` holds {} bytes, but a tensor's data runs from byte {} for {} (cut short?)",
                tensor.location,
                meta.len(),
                tensor.offset,
                tensor.length.unwrap_or(0)
            ));
        }
    }
    Ok(())
}

pub(crate) fn view<
    'a,
    T: Clone + ort::value::PrimitiveTensorElementType + std::fmt::Debug + 'static,
    D: Dimension + 'static,
>(
    graph: &'static str,
    a: ndarray::ArrayView<'a, T, D>,
) -> Result<SessionInputValue<'a>, ModelError> {
    let t = TensorRef::from_array_view(a).map_err(|e| ModelError::Graph {
        graph,
        message: format!("input tensor: {e}"),
    })?;
    Ok(SessionInputValue::from(t))
}

/// `a`, an output of `graph`, as an array of rank D whose sizes are `dims`
/// (`None`: any size); else a shape error naming the graph and `tensor`,
/// `expected` saying what was due. An output of another size would be read
/// as other rows than it holds, or past them.
pub(crate) fn shaped<D: Dimension>(
    graph: &'static str,
    tensor: &str,
    a: ndarray::ArrayD<f32>,
    dims: &[Option<usize>],
    expected: impl FnOnce() -> String,
) -> Result<ndarray::Array<f32, D>, ModelError> {
    let fits = a.ndim() == dims.len()
        && D::NDIM.is_none_or(|rank| rank == dims.len())
        && a.shape()
            .iter()
            .zip(dims)
            .all(|(&got, want)| want.is_none_or(|want| want == got));
    if fits {
        return Ok(a.into_dimensionality::<D>().expect("rank checked"));
    }
    Err(ModelError::Shape {
        graph,
        tensor: tensor.into(),
        got: a.shape().to_vec(),
        expected: expected(),
    })
}

/// Registers `ep` so that failing to register it is an error (no silent
/// fallback to the CPU); returns what will run.
#[cfg(feature = "cuda")]
fn strict(
    builder: ort::session::builder::SessionBuilder,
    ep: ort::ep::ExecutionProviderDispatch,
    name: &str,
) -> Result<(ort::session::builder::SessionBuilder, String), OrtError> {
    let builder = builder
        .with_execution_providers([ep.error_on_failure()])
        .map_err(|e| OrtError::Device {
            device: name.into(),
            problem: e.to_string(),
        })?;
    Ok((builder, name.into()))
}

/// Adds the device's execution provider with `settings`; returns what
/// will run.
fn register_device(
    builder: ort::session::builder::SessionBuilder,
    device: Device,
    settings: &SessionSettings,
) -> Result<(ort::session::builder::SessionBuilder, String), OrtError> {
    let _ = settings;
    let unavailable = |name: &str, feature: &str| OrtError::Device {
        device: name.into(),
        problem: format!(
            "this gtr-run was built without the `{feature}` feature; rebuild with `cargo build --release --features {feature}`"
        ),
    };
    match device {
        Device::Cpu => Ok((builder, "cpu".into())),
        Device::Cuda => {
            #[cfg(feature = "cuda")]
            {
                strict(
                    builder,
                    ort::ep::CUDA::default()
                        .with_tf32(settings.cuda_tf32)
                        .with_cuda_graph(settings.cuda_graph)
                        .build(),
                    "cuda",
                )
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = builder;
                Err(unavailable("cuda", "cuda"))
            }
        }
        Device::TensorRt => {
            #[cfg(feature = "tensorrt")]
            {
                // TensorRT must register; with the `cuda` feature too, the
                // nodes TensorRT does not take run on CUDA, not the CPU.
                #[allow(unused_mut)]
                let mut eps = vec![tensorrt_provider(settings).build().error_on_failure()];
                #[cfg(feature = "cuda")]
                eps.push(
                    ort::ep::CUDA::default()
                        .with_tf32(settings.cuda_tf32)
                        .build(),
                );
                let builder =
                    builder
                        .with_execution_providers(eps)
                        .map_err(|e| OrtError::Device {
                            device: "tensorrt".into(),
                            problem: e.to_string(),
                        })?;
                Ok((builder, "tensorrt".into()))
            }
            #[cfg(not(feature = "tensorrt"))]
            {
                let _ = builder;
                Err(unavailable("tensorrt", "tensorrt"))
            }
        }
        Device::Auto => {
            #[allow(unused_mut)]
            let mut builder = builder;
            #[cfg(feature = "tensorrt")]
            {
                use ort::ep::ExecutionProvider;
                if tensorrt_provider(settings).register(&mut builder).is_ok() {
                    return Ok((builder, "tensorrt".into()));
                }
            }
            #[cfg(feature = "cuda")]
            {
                use ort::ep::ExecutionProvider;
                if ort::ep::CUDA::default()
                    .with_tf32(settings.cuda_tf32)
                    .with_cuda_graph(settings.cuda_graph)
                    .register(&mut builder)
                    .is_ok()
                {
                    return Ok((builder, "cuda".into()));
                }
            }
            let _ = unavailable;
            Ok((builder, "cpu".into()))
        }
    }
}

/// TensorRT with the graph's options (ORT's defaults without them).
#[cfg(feature = "tensorrt")]
fn tensorrt_provider(settings: &SessionSettings) -> ort::ep::TensorRT {
    settings
        .tensorrt
        .as_ref()
        .map_or_else(ort::ep::TensorRT::default, crate::tensorrt::provider)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;

    /// An output named as one of the graph's inputs is refused before the
    /// run: ONNX Runtime may return that input's memory, which the caller
    /// frees once the call is over.
    #[test]
    fn a_kept_output_that_is_also_an_input_is_refused() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/fixtures/tiny-split/diffusion_condition.onnx");
        let names = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(role, name)| (role.to_string(), name.to_string()))
                .collect()
        };
        let inputs = names(&[("t", "t"), ("z", "z")]);
        let open = |outputs: &BTreeMap<String, String>| {
            Graph::open(
                "diffusion_condition",
                &path,
                &inputs,
                outputs,
                Device::Cpu,
                Some(1),
                &SessionSettings::default(),
            )
            .unwrap()
            .0
        };
        let t = ndarray::Array1::<i64>::zeros(2);
        let z = ndarray::Array2::<f32>::zeros((2, 32));
        let run = |graph: &mut Graph| {
            graph
                .run_kept(
                    vec![
                        ("t", view("diffusion_condition", t.view()).unwrap()),
                        ("z", view("diffusion_condition", z.view()).unwrap()),
                    ],
                    "cond",
                )
                .map(|kept| kept.shape().to_vec())
        };
        let mut aliased = open(&names(&[("cond", "z")]));
        let err = run(&mut aliased).unwrap_err().to_string();
        assert!(
            err.contains("diffusion_condition") && err.contains("`z` is also an input"),
            "{err}"
        );
        assert_eq!(aliased.stats.calls, 0, "refused before the run");
        let mut graph = open(&names(&[("cond", "cond")]));
        let shape = run(&mut graph).unwrap();
        assert_eq!(shape[0], 2, "{shape:?}");
        assert_eq!(graph.stats.calls, 1);
    }
}

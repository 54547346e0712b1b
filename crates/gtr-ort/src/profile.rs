//! ONNX Runtime's per-kernel profile of a session, summarised: which
//! execution provider ran each node and where the kernel time went by op
//! type ([`KernelProfile`]).
//!
//! The profiler writes a JSON array of trace events. Each kernel call is a
//! `Node` event named `<node>_kernel_time`, with `dur` in microseconds and
//! `args.op_name` / `args.provider`; nodes inside a Loop's body are events of
//! their own, and the Loop's event spans its body. Other events (session
//! creation, whole runs) are counted but not summarised.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use gtr_engine::{KernelProfile, OpKernels, ProviderKernels};
use serde::Deserialize;

/// ONNX Runtime stops recording a session's events at this many (measured
/// with ONNX Runtime 1.32: it logs "Maximum number of events reached").
pub const EVENT_CAP: u64 = 1_000_000;

/// Ops whose kernel runs subgraphs: their time includes their bodies'.
const CONTROL_FLOW: [&str; 3] = ["Loop", "If", "Scan"];

#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    cat: String,
    #[serde(default)]
    name: String,
    /// Microseconds.
    #[serde(default)]
    dur: f64,
    #[serde(default)]
    args: EventArgs,
}

#[derive(Deserialize, Default)]
struct EventArgs {
    op_name: Option<String>,
    provider: Option<String>,
}

/// Calls, seconds and distinct nodes of one (op, provider) pair.
#[derive(Default)]
struct Tally {
    nodes: BTreeSet<String>,
    calls: u64,
    seconds: f64,
}

/// Reads the profile at `path`; an unreadable or malformed file is an error
/// naming it.
pub fn read(path: &Path) -> Result<KernelProfile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the profile {}: {e}", path.display()))?;
    summarize(&text, &path.display().to_string())
        .map_err(|e| format!("the profile {}: {e}", path.display()))
}

/// Summarises a profile's JSON `text`; `file` is recorded as its name.
pub fn summarize(text: &str, file: &str) -> Result<KernelProfile, String> {
    let events: Vec<Event> = serde_json::from_str(text)
        .map_err(|e| format!("not an ONNX Runtime profile (a JSON array of events): {e}"))?;
    let mut tallies: BTreeMap<(String, String), Tally> = BTreeMap::new();
    for event in &events {
        let Some(node) = event.name.strip_suffix("_kernel_time") else {
            continue;
        };
        if event.cat != "Node" {
            continue;
        }
        let op = event.args.op_name.clone().unwrap_or_else(|| "?".into());
        let provider = event.args.provider.clone().unwrap_or_else(|| "?".into());
        let tally = tallies.entry((op, provider)).or_default();
        tally.nodes.insert(node.to_string());
        tally.calls += 1;
        tally.seconds += event.dur * 1e-6;
    }
    let is_control_flow = |op: &str| CONTROL_FLOW.contains(&op);
    let kernel_seconds: f64 = tallies
        .iter()
        .filter(|((op, _), _)| !is_control_flow(op))
        .map(|(_, t)| t.seconds)
        .sum();
    let mut providers: BTreeMap<&str, ProviderKernels> = BTreeMap::new();
    let mut ops = Vec::with_capacity(tallies.len());
    for ((op, provider), tally) in &tallies {
        let control_flow = is_control_flow(op);
        if !control_flow {
            let p = providers
                .entry(provider.as_str())
                .or_insert_with(|| ProviderKernels {
                    provider: provider.clone(),
                    ..ProviderKernels::default()
                });
            p.nodes += tally.nodes.len() as u64;
            p.calls += tally.calls;
            p.seconds += tally.seconds;
        }
        ops.push(OpKernels {
            op: op.clone(),
            provider: provider.clone(),
            nodes: tally.nodes.len() as u64,
            calls: tally.calls,
            seconds: tally.seconds,
            share: (!control_flow && kernel_seconds > 0.0).then(|| tally.seconds / kernel_seconds),
        });
    }
    let mut providers: Vec<ProviderKernels> = providers.into_values().collect();
    providers.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    ops.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    Ok(KernelProfile {
        file: file.to_string(),
        events: events.len() as u64,
        truncated: events.len() as u64 >= EVENT_CAP,
        providers,
        ops,
    })
}

/// One line about a graph's profile: each provider's nodes and seconds and
/// the ops with the largest shares.
pub fn describe(graph: &str, profile: &KernelProfile) -> String {
    let providers = profile
        .providers
        .iter()
        .map(|p| {
            format!(
                "{} nodes on {} ({} calls, {:.3} s)",
                p.nodes, p.provider, p.calls, p.seconds
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let top = profile
        .ops
        .iter()
        .filter_map(|o| o.share.map(|s| (o, s)))
        .take(4)
        .map(|(o, s)| format!("{} {:.0}%", o.op, 100.0 * s))
        .collect::<Vec<_>>()
        .join(", ");
    let truncated = if profile.truncated {
        " (the profiler's event cap was reached: the run's start only)"
    } else {
        ""
    };
    format!("{graph}: {providers}; most time in {top}{truncated}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two MatMul nodes on CUDA, a Shape node on the CPU, a Loop holding a
    /// MatMul body node, and events that are not kernels.
    const PROFILE: &str = r#"[
      {"cat":"Session","name":"session_initialization","dur":900,"args":{}},
      {"cat":"Node","name":"mm1_fence_before","dur":0,"args":{"op_name":"MatMul"}},
      {"cat":"Node","name":"mm1_kernel_time","dur":300,"args":{"op_name":"MatMul","provider":"CUDAExecutionProvider"}},
      {"cat":"Node","name":"mm1_kernel_time","dur":300,"args":{"op_name":"MatMul","provider":"CUDAExecutionProvider"}},
      {"cat":"Node","name":"mm2_kernel_time","dur":200,"args":{"op_name":"MatMul","provider":"CUDAExecutionProvider"}},
      {"cat":"Node","name":"shape_kernel_time","dur":200,"args":{"op_name":"Shape","provider":"CPUExecutionProvider"}},
      {"cat":"Node","name":"body_mm_kernel_time","dur":1000,"args":{"op_name":"MatMul","provider":"CUDAExecutionProvider"}},
      {"cat":"Node","name":"loop_kernel_time","dur":1500,"args":{"op_name":"Loop","provider":"CUDAExecutionProvider"}},
      {"cat":"Session","name":"model_run","dur":4000,"args":{}}
    ]"#;

    #[test]
    fn counts_nodes_calls_and_seconds_per_provider_and_op() {
        let p = summarize(PROFILE, "x.json").unwrap();
        assert_eq!(p.file, "x.json");
        assert_eq!(p.events, 9);
        assert!(!p.truncated);
        // The Loop's 1.5 ms holds its body's 1 ms: not counted twice.
        assert_eq!(p.providers.len(), 2);
        let cuda = &p.providers[0];
        assert_eq!(cuda.provider, "CUDAExecutionProvider");
        assert_eq!((cuda.nodes, cuda.calls), (3, 4));
        assert!((cuda.seconds - 1.8e-3).abs() < 1e-12);
        let cpu = &p.providers[1];
        assert_eq!(
            (cpu.provider.as_str(), cpu.nodes, cpu.calls),
            ("CPUExecutionProvider", 1, 1)
        );
        let ops: Vec<(&str, u64, Option<f64>)> = p
            .ops
            .iter()
            .map(|o| (o.op.as_str(), o.nodes, o.share))
            .collect();
        assert_eq!(ops[0].0, "MatMul");
        assert_eq!(ops[0].1, 3);
        assert!((ops[0].2.unwrap() - 0.9).abs() < 1e-12);
        assert_eq!(ops[1], ("Loop", 1, None));
        assert_eq!(ops[2].0, "Shape");
        assert!((ops[2].2.unwrap() - 0.1).abs() < 1e-12);
        let line = describe("sampler", &p);
        assert!(
            line.starts_with("sampler: 3 nodes on CUDAExecutionProvider (4 calls, 0.002 s), 1 nodes on CPUExecutionProvider"),
            "{line}"
        );
        assert!(
            line.ends_with("most time in MatMul 90%, Shape 10%"),
            "{line}"
        );
    }

    #[test]
    fn a_file_at_the_event_cap_is_marked_truncated() {
        let event = r#"{"cat":"Node","name":"n_kernel_time","dur":1,"args":{"op_name":"Neg","provider":"CPUExecutionProvider"}}"#;
        let text = format!("[{}]", vec![event; EVENT_CAP as usize].join(","));
        let p = summarize(&text, "cap.json").unwrap();
        assert!(p.truncated);
        assert!(describe("g", &p).contains("event cap"));
    }

    #[test]
    fn a_file_that_is_not_a_profile_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(&path, "{\"not\": \"a list\"}").unwrap();
        let e = read(&path).unwrap_err();
        assert!(
            e.contains("p.json") && e.contains("not an ONNX Runtime profile"),
            "{e}"
        );
        let e = read(&dir.path().join("missing.json")).unwrap_err();
        assert!(e.contains("missing.json"), "{e}");
    }
}

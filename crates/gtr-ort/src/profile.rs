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

/// The kernel events of a profile, tallied by (op, provider) as they are
/// read, and the number of events.
#[derive(Default)]
struct Tallies {
    events: u64,
    by_op: BTreeMap<(String, String), Tally>,
}

impl Tallies {
    fn add(&mut self, event: Event) {
        self.events += 1;
        let Some(node) = event.name.strip_suffix("_kernel_time") else {
            return;
        };
        if event.cat != "Node" {
            return;
        }
        let op = event.args.op_name.unwrap_or_else(|| "?".into());
        let provider = event.args.provider.unwrap_or_else(|| "?".into());
        let tally = self.by_op.entry((op, provider)).or_default();
        tally.nodes.insert(node.to_string());
        tally.calls += 1;
        tally.seconds += event.dur * 1e-6;
    }
}

/// Reads a JSON array of events one event at a time, so that a profile of
/// a million events (about a gigabyte) is never held whole.
impl<'de> serde::de::Visitor<'de> for Tallies {
    type Value = Tallies;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of trace events")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<Tallies, A::Error> {
        while let Some(event) = seq.next_element::<Event>()? {
            self.add(event);
        }
        Ok(self)
    }
}

/// Reads the profile at `path`, streaming; an unreadable or malformed file
/// is an error naming it.
pub fn read(path: &Path) -> Result<KernelProfile, String> {
    let file = std::fs::File::open(path)
        .map_err(|e| format!("reading the profile {}: {e}", path.display()))?;
    summarize(std::io::BufReader::new(file), &path.display().to_string())
        .map_err(|e| format!("the profile {}: {e}", path.display()))
}

/// Summarises a profile read from `reader`; `file` is recorded as its name.
pub fn summarize(reader: impl std::io::Read, file: &str) -> Result<KernelProfile, String> {
    use serde::Deserializer as _;
    let mut de = serde_json::Deserializer::from_reader(reader);
    let tallies = de
        .deserialize_seq(Tallies::default())
        .and_then(|t| de.end().map(|()| t))
        .map_err(|e| format!("not an ONNX Runtime profile (a JSON array of events): {e}"))?;
    let is_control_flow = |op: &str| CONTROL_FLOW.contains(&op);
    let kernel_seconds: f64 = tallies
        .by_op
        .iter()
        .filter(|((op, _), _)| !is_control_flow(op))
        .map(|(_, t)| t.seconds)
        .sum();
    let mut providers: BTreeMap<&str, ProviderKernels> = BTreeMap::new();
    let mut ops = Vec::with_capacity(tallies.by_op.len());
    for ((op, provider), tally) in &tallies.by_op {
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
        problem: None,
        events: tallies.events,
        truncated: tallies.events >= EVENT_CAP,
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
        let p = summarize(PROFILE.as_bytes(), "x.json").unwrap();
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
        let p = summarize(text.as_bytes(), "cap.json").unwrap();
        assert!(p.truncated);
        assert!(describe("g", &p).contains("event cap"));
    }

    #[test]
    fn a_file_that_is_not_a_profile_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        // Not a list; a list with something after it; an event of the wrong shape.
        for text in [
            r#"{"not": "a list"}"#,
            r#"[{"cat": "Node"}] x"#,
            r#"[{"dur": "x"}]"#,
        ] {
            std::fs::write(&path, text).unwrap();
            let e = read(&path).unwrap_err();
            assert!(
                e.contains("p.json") && e.contains("not an ONNX Runtime profile"),
                "{text}: {e}"
            );
        }
        let e = read(&dir.path().join("missing.json")).unwrap_err();
        assert!(e.contains("missing.json"), "{e}");
    }
}

//! A bundle's evaluator graph (the classifier `gtr-run eval` scores
//! images with) behind [`Evaluator`].

use ndarray::{Array2, ArrayView4};

use crate::bundle::Bundle;
use crate::contract;
use crate::device::Device;
use crate::error::OrtError;
use crate::session::{Graph, SessionSettings, shaped, view};
use gtr_engine::{Evaluator, ModelError, Scores};

/// A bundle's evaluator graph (see [`crate::bundle::EvaluatorEntry`]).
pub struct OrtEvaluator {
    name: String,
    graph: Graph,
    classes: usize,
    feature_width: Option<usize>,
}

impl OrtEvaluator {
    /// Loads the bundle's evaluator, or `None` when it ships none.
    pub fn load(
        bundle: &Bundle,
        device: Device,
        threads: Option<usize>,
    ) -> Result<Option<Self>, OrtError> {
        let Some(entry) = &bundle.manifest.evaluator else {
            return Ok(None);
        };
        let info = bundle.model_info();
        let (graph, _) = Graph::open(
            "evaluator",
            &bundle.dir.join(&entry.file),
            &entry.inputs,
            &entry.outputs,
            device,
            threads,
            &SessionSettings::default(),
        )?;
        contract::check_contract(&graph, contract::evaluator_expectations(&info))?;
        let feature_width = contract::fixed_dim(&graph, "features", 1);
        Ok(Some(OrtEvaluator {
            name: entry.name.clone(),
            graph,
            classes: info.classes,
            feature_width,
        }))
    }
}

/// The evaluator's `features` output: its tensor name and its values per
/// image, where the graph fixes them (`None` where it leaves them
/// dynamic), for checking the reference statistics before any image is
/// made.
pub fn features_of(evaluator: &OrtEvaluator) -> Option<(&str, usize)> {
    let width = evaluator.feature_width?;
    Some((evaluator.graph.outputs["features"].as_str(), width))
}

impl Evaluator for OrtEvaluator {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&mut self, pixels: ArrayView4<u8>) -> Result<Scores, ModelError> {
        let b = pixels.dim().0;
        let input = pixels.mapv(f32::from);
        let mut out = self.graph.run_outputs(
            vec![("pixels", view("evaluator", input.view())?)],
            &["logits", "features"],
            true,
        )?;
        let features: Array2<f32> = shaped(
            "evaluator",
            "features",
            out.remove(1),
            &[Some(b), None],
            || format!("[{b}, F]"),
        )?;
        let classes = self.classes;
        let logits: Array2<f32> = shaped(
            "evaluator",
            "logits",
            out.remove(0),
            &[Some(b), Some(classes)],
            || format!("[{b}, {classes}]"),
        )?;
        Ok(Scores { logits, features })
    }
}

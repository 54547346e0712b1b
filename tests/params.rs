//! Parameters: declared in the file, used anywhere a number goes, overridden
//! from the command line without editing the file.

use std::collections::BTreeMap;

use gtr_run::grid::Grid;
use gtr_run::plan::plan;
use gtr_run::schedule::{Schedule, ScheduleError, Source};

const TEXT: &str = "
param gen_steps = 24
param half = gen_steps / 2      # params may use earlier params
partition checker(2)
stage scaffold    { tokens S1  steps half }
stage reconstruct { tokens S2  steps 2  diffusion gen_steps }
";

fn build(overrides: &[(&str, f64)]) -> Result<Schedule, ScheduleError> {
    let o: BTreeMap<String, f64> = overrides.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    Schedule::from_source(Source::new("p.gtr", TEXT), &o)
}

#[test]
fn defaults_and_dependent_params() {
    let s = build(&[]).unwrap();
    assert_eq!(s.param("gen_steps"), Some(24.0));
    assert_eq!(s.param("half"), Some(12.0));
    let p = plan(&s, Grid::MAR, 0).unwrap();
    assert_eq!(p.stages[0].steps, 12);
    assert_eq!(p.steps.last().unwrap().diffusion_steps, 24);
}

#[test]
fn an_override_flows_into_dependent_params() {
    let s = build(&[("gen_steps", 40.0)]).unwrap();
    assert_eq!(s.param("half"), Some(20.0));
    let p = plan(&s, Grid::MAR, 0).unwrap();
    assert_eq!(p.stages[0].steps, 20);
    assert_eq!(p.steps.last().unwrap().diffusion_steps, 40);
    let gen_steps = s.params.iter().find(|p| p.name == "gen_steps").unwrap();
    assert!(gen_steps.overridden);
    assert_eq!(gen_steps.default, 24.0);
}

#[test]
fn overriding_a_derived_param_wins_over_its_formula() {
    let s = build(&[("half", 5.0)]).unwrap();
    assert_eq!(plan(&s, Grid::MAR, 0).unwrap().stages[0].steps, 5);
}

#[test]
fn unknown_and_invalid_overrides_are_errors() {
    assert!(matches!(
        build(&[("gen_step", 3.0)]),
        Err(ScheduleError::Override { .. })
    ));
    // A valid name with a value the plan cannot use is reported at plan time.
    let s = build(&[("half", 1000.0)]).unwrap();
    let err = plan(&s, Grid::MAR, 0).unwrap_err().to_string();
    assert!(err.contains("asks for 1000 steps"), "{err}");
}

#[test]
fn grid_sizes_are_usable_in_numbers() {
    let text = "stage all_tokens { tokens all  steps h * w / 32 }";
    let s = Schedule::from_source(Source::new("g.gtr", text), &BTreeMap::new()).unwrap();
    assert_eq!(plan(&s, Grid::new(16, 16), 0).unwrap().steps.len(), 8);
    assert_eq!(plan(&s, Grid::new(32, 32), 0).unwrap().steps.len(), 32);
}

/// A parameter --set replaces keeps the command line's value even where
/// its file expression has none with the other values (`16 / a` at a = 0).
#[test]
fn an_overridden_parameter_ignores_its_file_expression() {
    let text = "param a = 4\nparam b = 16 / a\ngrid 4x4\nstage s { tokens all steps b }";
    let set = |pairs: &[(&str, f64)]| -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    };
    let s =
        Schedule::from_source(Source::new("p.gtr", text), &set(&[("a", 0.0), ("b", 4.0)])).unwrap();
    assert_eq!(s.param("b"), Some(4.0));
    assert_eq!(plan(&s, Grid::new(4, 4), 0).unwrap().steps.len(), 4);
    // Without its own --set, b is still refused.
    let err = Schedule::from_source(Source::new("p.gtr", text), &set(&[("a", 0.0)])).unwrap_err();
    assert!(
        err.to_string().contains("parameter `b` comes out as inf"),
        "{err}"
    );
}

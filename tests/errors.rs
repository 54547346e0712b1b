//! Invalid schedules give compiler-style errors (file, line, column, caret,
//! and a sentence saying what is wrong and what would be right), snapshotted
//! one per file in tests/invalid/.

mod common;

use std::collections::BTreeMap;

use gtr_run::grid::Grid;
use gtr_run::plan::plan;
use gtr_run::schedule::ScheduleError;

fn error_text(path: &std::path::Path) -> String {
    match common::load(path, &BTreeMap::new()) {
        Err(e) => e.to_string(),
        Ok(schedule) => match plan(&schedule, schedule.grid.unwrap_or(Grid::MAR), 0) {
            Err(d) => d.to_string(),
            Ok(_) => panic!("{} should be rejected", path.display()),
        },
    }
}

#[test]
fn invalid_schedules() {
    insta::glob!("invalid", "*.gtr", |path| {
        let text = error_text(path);
        assert!(text.starts_with("error: "), "{text}");
        assert!(text.contains("tests/invalid/"), "names the file: {text}");
        insta::assert_snapshot!(text);
    });
}

#[test]
fn errors_give_line_and_column() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid/unknown-param.gtr");
    let text = error_text(&path);
    assert!(
        text.contains("tests/invalid/unknown-param.gtr:2:36"),
        "{text}"
    );
    assert!(text.contains("unknown name `gen_step`"), "{text}");
    assert!(
        text.contains("`gen_steps`"),
        "suggests the known names: {text}"
    );
}

#[test]
fn unknown_override_is_refused_with_the_known_names() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schedules/gtr-3.7x.gtr");
    let overrides = BTreeMap::from([("gen_steps".to_string(), 10.0)]);
    let err = common::load(&path, &overrides).unwrap_err();
    assert!(matches!(err, ScheduleError::Override { .. }));
    let text = err.to_string();
    assert!(text.contains("no parameter `gen_steps`"), "{text}");
    assert!(text.contains("scaffold_steps"), "{text}");
}

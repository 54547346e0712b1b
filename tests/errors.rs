//! Invalid schedules give compiler-style errors (file, line, column, caret,
//! and a sentence saying what is wrong and what would be right), snapshotted
//! one per file in tests/invalid/.

mod common;

use std::collections::BTreeMap;

use gtr_run::grid::Grid;
use gtr_run::plan::{PlanOptions, Planner, plan};
use gtr_run::schedule::{Schedule, ScheduleError, Source};

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

/// The error planning `text` (named `t.gtr`) on its own grid gives.
fn plan_error(text: &str) -> String {
    let schedule = Schedule::from_source(Source::new("t.gtr", text), &BTreeMap::new())
        .unwrap_or_else(|e| panic!("{text}: {e}"));
    plan(&schedule, schedule.grid.unwrap_or(Grid::MAR), 0)
        .err()
        .unwrap_or_else(|| panic!("{text}: should be refused"))
        .to_string()
}

/// Top-level defaults out of range are refused where they stand, as a
/// stage's own value is, even where every stage gives its own.
#[test]
fn out_of_range_defaults_are_refused_where_every_stage_overrides_them() {
    let stage =
        "stage a { tokens all steps 2 diffusion 10 cfg 1 temperature 1 clip_timesteps 900 }";
    for (default, at, message) in [
        (
            "diffusion 0",
            "2:11",
            "diffusion steps must be a whole number from 1 to 1000, not 0",
        ),
        (
            "diffusion [5, 0]",
            "2:15",
            "diffusion steps must be a whole number from 1 to 1000, not 0",
        ),
        ("diffusion 1001", "2:11", "not 1001"),
        ("cfg -1", "2:5", "the guidance scale must be a number >= 0"),
        (
            "cfg linear -1",
            "2:12",
            "the guidance scale must be a number >= 0",
        ),
        (
            "temperature -1",
            "2:13",
            "temperature -1 must be a number >= 0",
        ),
        (
            "temperature w - 3",
            "2:13",
            "temperature -1 must be a number >= 0",
        ),
        (
            "clip_timesteps 0",
            "2:16",
            "clip_timesteps must be a whole number from 1 to 999",
        ),
    ] {
        let err = plan_error(&format!("grid 2x2\n{default}\n{stage}\n"));
        assert!(err.contains(&format!("t.gtr:{at}\n")), "{default}: {err}");
        assert!(err.contains(message), "{default}: {err}");
    }
    // In range, or in range on the grid planned (`w - 3` on 4x4), they plan.
    for default in [
        "diffusion [5, 1]",
        "cfg 0",
        "temperature w - 3",
        "clip_timesteps 999",
    ] {
        let text = format!("grid 4x4\n{default}\n{stage}\n");
        let s = Schedule::from_source(Source::new("t.gtr", text), &BTreeMap::new()).unwrap();
        plan(&s, Grid::new(4, 4), 0).unwrap_or_else(|e| panic!("{default}: {e}"));
    }
}

/// A stage's temperature is checked even where `--temperature` replaces
/// it, as its `cfg` is where `--cfg` does.
#[test]
fn a_stage_value_is_checked_under_a_command_line_override() {
    let text = "grid 2x2\nstage a { tokens all steps 2 temperature -1 cfg -2 }\n";
    let s = Schedule::from_source(Source::new("t.gtr", text), &BTreeMap::new()).unwrap();
    let options = PlanOptions {
        temperature: Some(0.5),
        cfg: Some(3.0),
        ..Default::default()
    };
    let err = Planner::new(&s, Grid::new(2, 2))
        .unwrap()
        .plan_with(0, &options)
        .unwrap_err()
        .to_string();
    assert!(err.contains("t.gtr:2:42\n"), "{err}");
    assert!(err.contains("temperature -1 must be"), "{err}");
}

/// A carriage return that no line feed follows is refused where it is,
/// in a schedule and in an order file: read as a space it hid the rest of
/// a comment's line (here `temperature 0.5` and `cfg 3`).
#[test]
fn a_lone_carriage_return_is_refused() {
    let text = "grid 2x2 stage a { tokens all steps 2 } # main stage\rtemperature 0.5\rcfg 3\r";
    let err = Schedule::from_source(Source::new("t.gtr", text), &BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("t.gtr:1:53\n"), "{err}");
    assert!(
        err.contains("carriage return (CR) that no line feed follows"),
        "{err}"
    );
    assert!(
        err.contains("# main stage\\rtemperature 0.5\\rcfg 3"),
        "shown escaped: {err}"
    );
    // CRLF line ends are fine, and count as one line end.
    let crlf = "grid 2x2\r\n# a comment\r\nstage a { tokens all steps 0 }\r\n";
    let s = Schedule::from_source(Source::new("t.gtr", crlf), &BTreeMap::new()).unwrap();
    let err = plan(&s, Grid::new(2, 2), 0).unwrap_err().to_string();
    assert!(err.contains("t.gtr:3:28\n"), "{err}");
    // In an order file, the error names the file's line and column.
    let dir = common::tmp("lone-cr");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("order.txt"), "0\n1 # two\r2\n3\n").unwrap();
    let name = dir.join("s.gtr").display().to_string();
    let text = "grid 2x2\nstage a { tokens all order file \"order.txt\" steps 2 }\n";
    let err = Schedule::from_source(Source::new(name, text), &BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("s.gtr:2:"), "{err}");
    assert!(
        err.contains("order.txt`, line 2, column 8: a carriage return"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An error's excerpt shows control characters escaped and a long line
/// cut around the error: a 1 MiB line was printed whole.
#[test]
fn excerpts_are_escaped_and_cut() {
    let text = format!(
        "stage a {{ tokens all steps 1 }}{}oops # \u{1b}[2J",
        " ".repeat(1 << 19)
    );
    let err = Schedule::from_source(Source::new("t.gtr", text), &BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.len() < 1000, "{} bytes", err.len());
    assert!(!err.contains('\u{1b}'), "{err}");
    assert!(err.contains("oops # \\u{1b}[2J"), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    let (shown, caret) = (lines[3], lines[4]);
    assert_eq!(
        caret.chars().position(|c| c == '^'),
        shown.find("oops").map(|k| shown[..k].chars().count()),
        "{err}"
    );
}

/// File text quoted in a message (the text found where a parse failed, an
/// order file's word and path) is escaped and cut: it was printed raw and
/// whole (an ESC reached the terminal; 200,000 `é` gave a 400 KB error).
#[test]
fn quoted_file_text_is_escaped_and_cut() {
    let check = |err: &str, want: &str| {
        assert!(err.len() < 1000, "{} bytes", err.len());
        assert!(!err.contains(['\u{1b}', '\u{7}']), "{err}");
        assert!(err.contains(want), "{err}");
    };
    let text = format!("stage a {{ tokens all steps 4 }}\n{}", "é".repeat(200_000));
    let err = Schedule::from_source(Source::new("t.gtr", text), &BTreeMap::new())
        .unwrap_err()
        .to_string();
    check(&err, &format!("found `{0}…{0}`", "é".repeat(20)));
    let dir = common::tmp("quoted");
    std::fs::create_dir_all(&dir).unwrap();
    let name = dir.join("s.gtr").display().to_string();
    let refused = |file: &str, body: &str| {
        std::fs::write(dir.join(file), body).unwrap();
        let text = format!("grid 2x2\nstage a {{ tokens all  order file \"{file}\"  steps 4 }}\n");
        let s = Schedule::from_source(Source::new(name.as_str(), text), &BTreeMap::new());
        match s {
            Err(e) => e.to_string(),
            Ok(s) => plan(&s, Grid::new(2, 2), 0).unwrap_err().to_string(),
        }
    };
    check(
        &refused("oe.txt", "0 1\n\u{1b}[2J\n"),
        "line 2: `\\u{1b}[2J` is not a token index",
    );
    check(
        &refused("big.txt", &"9".repeat(300_000)),
        &format!("line 1: `{0}…{0}` is not a token index", "9".repeat(20)),
    );
    let err = Schedule::from_source(
        Source::new(
            name.as_str(),
            "grid 2x2\nstage a { tokens all  order file \"x\u{1b}[2J\u{7}.txt\"  steps 4 }\n",
        ),
        &BTreeMap::new(),
    )
    .unwrap_err()
    .to_string();
    check(&err, "x\\u{1b}[2J\\u{7}.txt`: ");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Only the CR of a CRLF is left out of an excerpt: a lone CR before it
/// was dropped too, with the caret past the end of the shown line.
#[test]
fn a_lone_cr_before_a_crlf_is_shown() {
    let text = "stage a { tokens all  steps 4 }\r\r\n";
    let err = Schedule::from_source(Source::new("t.gtr", text), &BTreeMap::new())
        .unwrap_err()
        .to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines[3], "1 | stage a { tokens all  steps 4 }\\r", "{err}");
    assert_eq!(lines[4].find('^'), lines[3].find('\\'), "{err}");
}

/// Names are at most 64 characters, whatever they name: a stage of a
/// million characters was echoed whole by `gtr-run plan`.
#[test]
fn names_are_at_most_64_characters() {
    let schedule = |name: &str| {
        let text = format!(
            "param {name}_p = 2\nset {name}_s = all\nstage {name} {{ tokens {name}_s  steps {name}_p }}\n"
        );
        Schedule::from_source(Source::new("n.gtr", text), &BTreeMap::new())
    };
    let fits = "a".repeat(62);
    schedule(&fits).unwrap();
    let long = "b".repeat(63);
    let err = schedule(&long).unwrap_err().to_string();
    assert!(
        err.contains("this name has 65 characters; at most 64 are allowed"),
        "{err}"
    );
    assert!(err.contains("n.gtr:1:7"), "{err}");
    let err = schedule(&"c".repeat(1_000_000)).unwrap_err().to_string();
    assert!(err.len() < 1000, "{} bytes", err.len());
}

/// Schedule text given as text (the Python API) has the file's 1 MiB limit.
#[test]
fn schedule_text_has_the_files_size_limit() {
    let text = format!(
        "{}\nstage a {{ tokens all steps 2 }}\n",
        "#".repeat(2 << 20)
    );
    let err = Schedule::from_source(Source::new("<string>", text), &BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "schedule <string>: larger than 1024 KiB; a schedule is a small text file"
    );
}

//! Every schedule example in docs/schedule-language.md parses and plans
//! (with the command-line variants its `<!-- check: ... -->` comment lists),
//! and every error example prints exactly the message the doc shows.

use std::collections::{BTreeMap, BTreeSet};

use gtr_run::cost::{ModelSpec, plan_cost};
use gtr_run::grid::Grid;
use gtr_run::plan::plan;
use gtr_run::schedule::{
    Distribution, KEYWORDS, OrderKind, RampShape, Rounding, Schedule, Selector, Source, Ties,
    Vocabulary,
};

struct Example {
    line: usize,
    check: String,
    body: String,
    /// The ```text block right after, if any.
    output: Option<String>,
}

fn examples() -> Vec<Example> {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/schedule-language.md"
    ))
    .unwrap();
    let lines: Vec<&str> = doc.lines().collect();
    let fence = |from: usize| {
        (from..lines.len())
            .find(|&k| lines[k].starts_with("```"))
            .unwrap()
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].starts_with("```gtr") {
            let end = fence(i + 1);
            let body = lines[i + 1..end].join("\n") + "\n";
            let mut k = end + 1;
            while k < lines.len() && lines[k].trim().is_empty() {
                k += 1;
            }
            let output = (k < lines.len() && lines[k].starts_with("```text")).then(|| {
                let e = fence(k + 1);
                lines[k + 1..e].join("\n")
            });
            let check = if i > 0 {
                lines[i - 1].trim().to_string()
            } else {
                String::new()
            };
            out.push(Example {
                line: i + 1,
                check,
                body,
                output,
            });
            i = end;
        }
        i += 1;
    }
    out
}

/// Applies one variant's `--grid`/`--set` flags; other flags do not change the plan.
fn variant(args: &str) -> (Option<Grid>, BTreeMap<String, f64>) {
    let words: Vec<&str> = args.split_whitespace().collect();
    let mut grid = None;
    let mut sets = BTreeMap::new();
    for pair in words.windows(2) {
        match pair[0] {
            "--grid" => grid = Some(pair[1].parse().unwrap()),
            "--set" => {
                let (k, v) = pair[1].split_once('=').unwrap();
                sets.insert(k.to_string(), v.parse().unwrap());
            }
            _ => {}
        }
    }
    (grid, sets)
}

#[test]
fn every_doc_example_works() {
    let all = examples();
    assert!(all.len() >= 30, "found only {} examples", all.len());
    for ex in all {
        let spec = ex
            .check
            .strip_prefix("<!-- check")
            .and_then(|s| s.strip_suffix("-->"))
            .unwrap_or_else(|| {
                panic!(
                    "line {}: example without a `<!-- check -->` comment",
                    ex.line
                )
            })
            .trim_start_matches(':')
            .trim();
        if spec == "error" {
            let want = ex
                .output
                .unwrap_or_else(|| panic!("line {}: error example without output", ex.line));
            let name = want
                .lines()
                .find_map(|l| l.trim_start().strip_prefix("--> "))
                .and_then(|l| l.split(':').next())
                .unwrap();
            let got = match Schedule::from_source(
                Source::new(name, ex.body.as_str()),
                &BTreeMap::new(),
            ) {
                Err(e) => e.to_string(),
                Ok(s) => plan(&s, s.grid.unwrap_or(Grid::MAR), 0)
                    .err()
                    .unwrap_or_else(|| panic!("line {}: should fail", ex.line))
                    .to_string(),
            };
            assert_eq!(got.trim_end(), want.trim_end(), "line {}", ex.line);
            continue;
        }
        for args in spec.split('|') {
            let (grid, sets) = variant(args);
            let s = Schedule::from_source(Source::new("docs/example.gtr", ex.body.as_str()), &sets)
                .unwrap_or_else(|e| panic!("line {} [{args}]: {e}", ex.line));
            let grid = grid.or(s.grid).unwrap_or(Grid::MAR);
            plan(&s, grid, 0).unwrap_or_else(|d| panic!("line {} [{args}]: {d}", ex.line));
        }
    }
}

/// The words between the quotes of the grammar rule `name = @{ ... }`.
fn grammar_words(rule: &str) -> BTreeSet<String> {
    let grammar =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/grammar/gtr.pest")).unwrap();
    let start = grammar
        .find(&format!("\n{rule} "))
        .unwrap_or_else(|| panic!("no rule `{rule}` in grammar/gtr.pest"));
    let body = &grammar[start..];
    let body = &body[..body
        .find("\n}")
        .expect("the rule ends with `}` on its own line")];
    body.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[test]
fn keywords_are_the_grammars() {
    let listed: BTreeSet<String> = KEYWORDS.iter().map(|k| k.to_string()).collect();
    assert_eq!(
        listed,
        grammar_words("keyword"),
        "KEYWORDS and the `keyword` rule differ"
    );
    assert_eq!(listed.len(), KEYWORDS.len(), "a keyword is listed twice");
    // Each has its own `kw_` rule spelling it.
    let grammar =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/grammar/gtr.pest")).unwrap();
    for k in KEYWORDS {
        let rule = format!("kw_{k}");
        let line = grammar
            .lines()
            .find(|l| l.split_whitespace().next() == Some(rule.as_str()))
            .unwrap_or_else(|| panic!("no rule {rule}"));
        assert!(line.contains(&format!("\"{k}\"")), "{line}");
    }
    // The docs' keyword table lists the same words.
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/schedule-language.md"
    ))
    .unwrap();
    let at = doc
        .find("are keywords and cannot be used as names")
        .unwrap();
    let table = &doc[at..];
    let table = &table[table.find("```text\n").unwrap() + 8..];
    let table = &table[..table.find("```").unwrap()];
    let documented: BTreeSet<String> = table.split_whitespace().map(str::to_string).collect();
    assert_eq!(documented, listed, "the docs' keyword table");
}

/// Every word of every vocabulary enum is a keyword (so the grammar can
/// spell it and no name can shadow it).
#[test]
fn vocabularies_are_keywords() {
    fn check<V: Vocabulary>() {
        for v in V::ALL {
            for word in v.name().split(' ') {
                assert!(KEYWORDS.contains(&word), "`{word}` of {}", V::prose());
            }
            assert_eq!(V::from_name(v.name()), Some(*v));
        }
    }
    check::<OrderKind>();
    check::<Distribution>();
    check::<Selector>();
    check::<RampShape>();
    check::<Rounding>();
    check::<Ties>();
}

/// Per-image TFLOPs of preset `file` on built-in model `model`, as
/// `gtr-run plan schedules/FILE --cost MODEL` prints them, and its MAR steps.
fn preset_cost(file: &str, model: &str) -> (f64, usize) {
    let path = format!("{}/schedules/{file}", env!("CARGO_MANIFEST_DIR"));
    let s = Schedule::from_file(std::path::Path::new(&path), &BTreeMap::new())
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    let p = plan(&s, s.planning_grid(None), 0).unwrap_or_else(|e| panic!("{file}: {e}"));
    let spec = ModelSpec::builtin(model).unwrap();
    (plan_cost(&p, &spec).total_flops() / 1e12, p.steps.len())
}

/// The rows of the markdown table that follows `heading` in `doc`, as cells.
fn table_rows(doc: &str, heading: &str) -> Vec<Vec<String>> {
    let at = doc
        .find(heading)
        .unwrap_or_else(|| panic!("no `{heading}`"));
    doc[at..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

/// The first `name.gtr` in backquotes of a table cell.
fn preset_name(cell: &str) -> &str {
    cell.split('`').nth(1).unwrap()
}

/// §15's preset table states each preset's MAR steps and MAR-H TFLOPs as
/// the cost model gives them (disa.gtr's figure was stale).
#[test]
fn preset_table_matches_the_cost_model() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/schedule-language.md"
    ))
    .unwrap();
    let rows = table_rows(&doc, "## 15. Presets");
    assert!(rows.len() >= 20, "{} rows", rows.len());
    for row in rows {
        let file = preset_name(&row[0]);
        let (tflops, steps) = preset_cost(file, "mar-h");
        assert_eq!(row[1], steps.to_string(), "{file}: MAR steps");
        assert_eq!(row[2], format!("{tflops:.2}"), "{file}: MAR-H TFLOPs");
    }
}

/// The README's cost table states the cost model's TFLOPs on MAR-B, MAR-L
/// and MAR-H, and its percentages against the paper's figures follow.
#[test]
fn readme_cost_table_matches_the_cost_model() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let rows = table_rows(&readme, "## The cost model against the paper's Table 1");
    assert!(rows.len() >= 9, "{} rows", rows.len());
    for row in rows {
        let file = preset_name(&row[0]);
        for (cell, model) in row[1..].iter().zip(["mar-b", "mar-l", "mar-h"]) {
            let (tflops, _) = preset_cost(file, model);
            let (ours, paper) = match cell.split_once(" (") {
                Some((ours, paper)) => (ours, Some(paper.trim_end_matches(')'))),
                None => (cell.as_str(), None),
            };
            assert_eq!(ours, format!("{tflops:.2}"), "{file} on {model}");
            let Some((figure, share)) = paper.and_then(|p| p.split_once(", ")) else {
                continue;
            };
            let figure: f64 = figure.parse().unwrap();
            let pct = (tflops / figure - 1.0) * 100.0;
            let want = format!("{}{:.1}%", if pct < 0.0 { "−" } else { "+" }, pct.abs());
            assert_eq!(
                share, want,
                "{file} on {model}: against the paper's {figure}"
            );
        }
    }
}

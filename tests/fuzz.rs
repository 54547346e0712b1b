//! Arbitrary input never panics: random text, and random edits of the
//! presets, either parse (and then plan or fail with a diagnostic) or fail
//! with a diagnostic; random edits of a bundle manifest either open or are
//! refused with a message.
//!
//! Each property tries 400 inputs in `cargo test`; a longer fuzzing run
//! sets the count (README, "Fuzzing"):
//! `GTR_RUN_FUZZ_CASES=100000 cargo test --release --test fuzz`.

mod common;

use std::collections::BTreeMap;

use gtr_run::grid::Grid;
use gtr_run::plan::plan;
use gtr_run::schedule::{Schedule, Source};
use proptest::prelude::*;

/// Parses, and if that works plans on a few grids; any panic fails the test.
fn exercise(text: &str) {
    let source = Source::new("fuzz.gtr", text);
    if let Ok(s) = Schedule::from_source(source, &BTreeMap::new()) {
        for grid in [Grid::new(1, 1), Grid::new(3, 5), Grid::new(16, 16)] {
            if let Ok(p) = plan(&s, grid, 7) {
                p.check_invariants().unwrap();
            }
        }
    } else if let Err(e) = Schedule::from_source(Source::new("fuzz.gtr", text), &BTreeMap::new()) {
        // Rendering the error must not panic either (spans at odd places).
        let _ = e.to_string();
    }
}

fn presets() -> Vec<String> {
    common::preset_paths()
        .into_iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

/// Punctuation, names and literals; with the grammar's keywords they make
/// token soup that gets deep into the parser.
const PIECES: &[&str] = &[
    "s",
    "{",
    "}",
    "S1",
    "S2",
    "->",
    "s..s",
    "10%",
    "x",
    "=",
    "checker(3)",
    "(",
    ")",
    "i",
    "j",
    "h",
    "w",
    "+",
    "-",
    "*",
    "/",
    "%",
    "==",
    "<",
    "0",
    "1",
    "2.5",
    "1e400",
    "[",
    "]",
    ",",
    "\n",
    "#",
    "4x4",
    "é",
    "\t",
];

fn pieces() -> Vec<&'static str> {
    PIECES
        .iter()
        .chain(gtr_run::schedule::KEYWORDS.iter())
        .copied()
        .collect()
}

/// Inputs per property: `GTR_RUN_FUZZ_CASES`, else 400.
fn cases() -> u32 {
    std::env::var("GTR_RUN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

/// Applies `edits` (position, kind: insert / delete / replace, piece) to
/// `text`, keeping it valid UTF-8.
fn edit(text: &mut String, edits: &[(prop::sample::Index, u8, &str)]) {
    for (at, kind, piece) in edits {
        let mut pos = at.index(text.len() + 1);
        while !text.is_char_boundary(pos) {
            pos -= 1;
        }
        let span = |len: usize| {
            let mut end = (pos + len).min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            pos..end
        };
        match kind {
            0 => text.insert_str(pos, piece),
            1 => {
                let r = span(piece.len());
                text.replace_range(r, "");
            }
            _ => {
                let r = span(3);
                text.replace_range(r, piece);
            }
        }
    }
}

/// Pieces of YAML and of the manifest's vocabulary, and numbers at the
/// edges of every type.
const MANIFEST_PIECES: &[&str] = &[
    ":",
    "{",
    "}",
    "[",
    "]",
    "-",
    ",",
    "\n",
    "\n  ",
    "  ",
    "#",
    "\"",
    "'",
    "&a",
    "*a",
    "!!str",
    "null",
    "~",
    "true",
    "0",
    "-1",
    "1e309",
    ".nan",
    "-.inf",
    "18446744073709551616",
    "4294967296",
    "65536",
    "grid",
    "graphs",
    "encoder",
    "decoder",
    "backbone",
    "sampler",
    "file",
    "inputs",
    "outputs",
    "precisions",
    "fp16",
    "../",
    "/dev/null",
    "classes",
    "null_class",
    "train_steps",
    "latent_scale",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        exercise(&text);
    }

    #[test]
    fn token_soup_never_panics(pieces in prop::collection::vec(prop::sample::select(pieces()), 0..60)) {
        exercise(&pieces.join(" "));
    }

    #[test]
    fn edited_presets_never_panic(
        which in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, prop::sample::select(pieces())), 1..4),
    ) {
        let all = presets();
        let mut text = all[which.index(all.len())].clone();
        edit(&mut text, &edits);
        exercise(&text);
    }

    #[test]
    fn edited_manifests_open_or_are_refused(
        edits in prop::collection::vec(
            (any::<prop::sample::Index>(), 0u8..3, prop::sample::select(MANIFEST_PIECES)),
            1..5,
        ),
    ) {
        let mut text = manifest();
        edit(&mut text, &edits);
        static CASE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let case = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = common::tmp(&format!("fuzz-manifest-{case}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("manifest.yaml"), &text).unwrap();
        let opened = gtr_run::bundle::Bundle::open(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        if let Err(e) = opened {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

/// The tiny fixture's manifest with its graph files named by absolute
/// paths, so that an unedited copy opens from any folder.
fn manifest() -> String {
    let tiny = common::root().join("models/fixtures/tiny");
    let text = std::fs::read_to_string(tiny.join("manifest.yaml")).unwrap();
    text.replace("file: ", &format!("file: {}/", tiny.display()))
}

#[test]
fn the_unedited_manifest_opens() {
    let dir = common::tmp("fuzz-manifest-plain");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("manifest.yaml"), manifest()).unwrap();
    let opened = gtr_run::bundle::Bundle::open(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    opened.unwrap();
}

#[test]
fn presets_with_overrides_to_extremes_never_panic() {
    for path in common::preset_paths() {
        let s = common::load(&path, &BTreeMap::new()).unwrap();
        for p in &s.params {
            for v in [0.0, -1.0, 0.5, 1e9, 1e300] {
                let o = BTreeMap::from([(p.name.clone(), v)]);
                if let Ok(s2) = common::load(&path, &o) {
                    let _ = plan(&s2, s2.grid.unwrap_or(Grid::MAR), 0).map_err(|d| d.to_string());
                }
            }
        }
    }
}

/// Deep nesting and long operator chains are refused with a diagnostic,
/// on a test thread's small stack, instead of overflowing it.
#[test]
fn deep_and_long_expressions_are_refused_not_crashed() {
    let cases = [
        format!(
            "stage a {{ tokens {}all{} steps 1 }}",
            "(".repeat(5000),
            ")".repeat(5000)
        ),
        format!("stage a {{ tokens {}all steps 1 }}", "not ".repeat(20000)),
        format!("stage a {{ tokens all steps 1{} }}", "+1".repeat(100_000)),
        format!(
            "stage a {{ tokens all steps {}1{} }}",
            "(- ".repeat(65),
            ")".repeat(65)
        ),
    ];
    for text in &cases {
        let err = Schedule::from_source(Source::new("deep.gtr", text.as_str()), &BTreeMap::new());
        assert!(err.is_err(), "should be refused: {}", &text[..60]);
    }
    // Just under the limits still works.
    let ok = format!(
        "stage a {{ tokens {}all{} steps 1 }}",
        "(not not ".repeat(60),
        ")".repeat(60)
    );
    let s = Schedule::from_source(Source::new("deep.gtr", ok), &BTreeMap::new()).unwrap();
    plan(&s, Grid::new(4, 4), 0).unwrap();
    let ok = format!("stage a {{ tokens all steps 1{} }}", "+0".repeat(200));
    Schedule::from_source(Source::new("long.gtr", ok), &BTreeMap::new()).unwrap();
    // A `#` or brackets inside an order file's name are not code: the
    // limit still holds after it, and the name's brackets do not count.
    let deep = format!(
        "grid 2x2 stage a {{ tokens all order file \"a#b.txt\" steps {}1{} }}",
        "(".repeat(100),
        ")".repeat(100)
    );
    let err = Schedule::from_source(Source::new("deep.gtr", deep), &BTreeMap::new()).unwrap_err();
    assert!(
        err.to_string().contains("nested more than 64 deep"),
        "{err}"
    );
    let named = format!(
        "grid 2x2 stage a {{ tokens all order file \"{}.txt\" steps 1 }}",
        "(".repeat(70)
    );
    let err = Schedule::from_source(Source::new("named.gtr", named), &BTreeMap::new()).unwrap_err();
    assert!(!err.to_string().contains("nested"), "{err}");
}

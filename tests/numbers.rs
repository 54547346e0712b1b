//! Every number that comes from outside (command line, manifest, the
//! schedule against the model) is range-checked before it is used or
//! allocated: a clear error naming the flag or field, never a panic or an
//! abort (issue 10, cases 6, 7, 9, 10 and 11).

mod common;
use common::{fails, tiny_bundle_with, tmp};

const TINY: &str = "models/fixtures/tiny";

#[test]
fn command_line_numbers_out_of_range_are_refused() {
    let out = tmp("numbers-cli");
    let out = out.to_str().unwrap();
    for (args, want) in [
        (
            &["--cfg", "nan"][..],
            "'--cfg <CFG>': NaN is not a number >= 0 and at most 3.4e38 (float32's largest)",
        ),
        (
            &["--cfg", "inf"],
            "'--cfg <CFG>': inf is not a number >= 0 and at most 3.4e38 (float32's largest)",
        ),
        (
            &["--temperature=-1"],
            "--temperature <TEMPERATURE>': -1 is not a number >= 0 and at most 3.4e38 (float32's largest)",
        ),
        // A negative number as its own argument is the flag's value, not a flag.
        (
            &["--temperature", "-0.5"],
            "--temperature <TEMPERATURE>': -0.5 is not a number >= 0 and at most 3.4e38 (float32's largest)",
        ),
        (
            &["--cfg", "-1"],
            "'--cfg <CFG>': -1 is not a number >= 0 and at most 3.4e38 (float32's largest)",
        ),
        // Past float32's range: the sampler could not hold it.
        (
            &["--temperature", "1e39"],
            "--temperature <TEMPERATURE>': 1e39 is not a number >= 0",
        ),
        (&["--temperature", "x"], "`x` is not a number"),
        (
            &["--num-images", "18446744073709551615"],
            "'--num-images <NUM_IMAGES>': `18446744073709551615` is not a whole number from 1 to 10000000",
        ),
        (&["--num-images", "1000000000"], "from 1 to 10000000"),
        (&["--num-images", "0"], "from 1 to 10000000"),
        (
            &["--batch", "0"],
            "'--batch <BATCH>': `0` is not a whole number from 1 to 4096",
        ),
        (
            &["--threads", "100000"],
            "'--threads <THREADS>': `100000` is not a whole number from 1 to 1024",
        ),
    ] {
        let all = [&[TINY, "schedules/mar-8.gtr", "--out", out][..], args].concat();
        fails(&all, want);
        // eval takes the same flags through the same parsers.
        let all = [
            &["eval", TINY, "schedules/mar-8.gtr", "--out", out][..],
            args,
        ]
        .concat();
        fails(&all, want);
    }
    assert!(!std::path::Path::new(out).exists(), "nothing was written");
}

/// The tiny bundle with `more` added to its manifest and `edit` applied is
/// refused with `want`, before any output folder is made.
fn refused_manifest(name: &str, more: &str, want: &str, edit: impl Fn(String) -> String) {
    let dir = tiny_bundle_with(name, "", more, edit);
    let out = tmp(&format!("{name}-out"));
    let args = [
        dir.to_str().unwrap(),
        "schedules/mar-8.gtr",
        "--out",
        out.to_str().unwrap(),
    ];
    fails(&args, want);
    assert!(!out.exists(), "{name}: nothing was written");
}

#[test]
fn manifest_numbers_out_of_range_are_refused() {
    let cases: [(&str, &str, &str); 10] = [
        (
            "train_steps: 1000 ",
            "train_steps: 18446744073709551615 ",
            "`diffusion.train_steps` is 18446744073709551615; it must be from 1 to 100000",
        ),
        (
            "grid: [16, 16]",
            "grid: [4294967296, 4294967296]",
            "`grid[0]` is 4294967296; it must be from 1 to 1024",
        ),
        (
            "buffer: 64 ",
            "buffer: 0 ",
            "`buffer` is 0; it must be from 1 to 65536",
        ),
        (
            "null_class: 10 ",
            "null_class: 3 ",
            "null_class is 3, one of the 10 real classes (0..9)",
        ),
        (
            "latent_scale: 0.2325 ",
            "latent_scale: 1e-300 ",
            "latent_scale is 1e-300; it must be a finite number from 1e-6 to 1e6",
        ),
        (
            "cfg: 3.0",
            "cfg: -1.0",
            "`sampling.cfg` is -1; it must be a number >= 0 and at most 3.4e38 (float32's largest)",
        ),
        (
            "temperature: 1.0",
            "temperature: .nan",
            "`sampling.temperature` is NaN; it must be a number >= 0 and at most 3.4e38 (float32's largest)",
        ),
        (
            "temperature: 1.0",
            "temperature: 1.0e300",
            "`sampling.temperature` is 1e300; it must be a number >= 0 and at most 3.4e38",
        ),
        (
            "width: 32 ",
            "width: 100000000 ",
            "`width` is 100000000; it must be from 1 to 65536",
        ),
        (
            "height: 64",
            "height: 0",
            "`image.height` is 0; it must be from 1 to 16384",
        ),
    ];
    for (k, (from, to, want)) in cases.into_iter().enumerate() {
        refused_manifest(&format!("numbers-manifest-{k}"), "", want, |m| {
            assert!(m.contains(from), "fixture manifest lacks `{from}`");
            m.replacen(from, to, 1)
        });
    }
}

/// A model `name` that is empty, too long for folder names, or carries
/// control characters (it is printed: terminal escapes) is refused,
/// naming the field.
#[test]
fn manifest_names_are_printable_and_short() {
    let long = format!("name: \"{}\"", "a".repeat(5000));
    let cases = [
        (
            "name: \"evil\\e[31mRED\\u0007\"",
            "`name` \"evil\\u{1b}[31mRED\\u{7}\" must be 1 to 256 bytes of printable text",
        ),
        ("name: \"\"", "`name` \"\" must be 1 to 256 bytes"),
        (long.as_str(), "must be 1 to 256 bytes of printable text"),
    ];
    for (k, (to, want)) in cases.into_iter().enumerate() {
        refused_manifest(&format!("numbers-name-{k}"), "", want, |m| {
            let line = m
                .lines()
                .find(|l| l.starts_with("name:"))
                .expect("a name line")
                .to_string();
            m.replacen(&line, to, 1)
        });
    }
}

/// Sizes each in range whose product is not are refused (a 256x256 grid
/// of 65,536 channels once asked 34 GB of the load's probe, and aborted).
#[test]
fn manifest_sizes_whose_products_are_too_large_are_refused() {
    let cases: [(&[(&str, &str)], &str); 3] = [
        (
            &[
                ("grid: [16, 16]", "grid: [256, 256]"),
                ("token_dim: 4 ", "token_dim: 65536 "),
            ],
            "grid × token_dim (an image's tokens) is 4294967296 values; at most 67108864 are supported (grid 256x256, token_dim 65536",
        ),
        (
            &[
                ("grid: [16, 16]", "grid: [256, 256]"),
                ("width: 32 ", "width: 2048 "),
            ],
            "grid × width (an image's z) is 134217728 values",
        ),
        (
            &[("height: 64, width: 64", "height: 16384, width: 16384")],
            "image.height × image.width × image.channels (an image's pixels) is 805306368 values",
        ),
    ];
    for (k, (edits, want)) in cases.into_iter().enumerate() {
        refused_manifest(&format!("numbers-products-{k}"), "", want, |mut m| {
            for (from, to) in edits {
                assert!(m.contains(from), "fixture manifest lacks `{from}`");
                m = m.replacen(from, to, 1);
            }
            m
        });
    }
}

/// A schedule whose chains are longer than the model's training chain is
/// refused before any folder is made (it used to index out of bounds).
/// `classes` and `null_class` beyond the encoder's class embedding (the
/// tiny graphs have 11 rows: 10 classes and the null class) are refused when
/// the graphs load, naming the manifest's fields, not by ONNX Runtime at the
/// first step; with exit status 3, a wrong input.
#[test]
fn classes_beyond_the_class_embedding_are_refused_at_load() {
    let edit = |m: String| {
        m.replace("classes: 10 ", "classes: 20 ")
            .replace("null_class: 10 ", "null_class: 20 ")
    };
    let dir = tiny_bundle_with("numbers-classes", "", "", edit);
    let manifest = std::fs::read_to_string(dir.join("manifest.yaml")).unwrap();
    assert!(manifest.contains("classes: 20 ") && manifest.contains("null_class: 20 "));
    refused_at_load(
        &dir,
        "(the last of the manifest's `classes: 20`, and its `null_class: 20`) do not run through the encoder's class embedding",
    );
}

/// The run of bundle `dir` is a wrong input (exit status 3) said once with
/// `want`, and makes no output folder.
fn refused_at_load(dir: &std::path::Path, want: &str) {
    let out = dir.with_extension("out");
    let o = common::gtr_run(&[
        dir.to_str().unwrap(),
        "schedules/mar-8.gtr",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains(want), "{err}");
    assert_eq!(err.lines().count(), 1, "said once: {err}");
    assert!(!out.exists());
}

/// `diffusion.train_steps` beyond the head's timestep tables (the tiny
/// head has 1,000 rows) is refused when the graphs load, naming the field,
/// not by ONNX Runtime at the first tick (it was exit 4, a Gather index).
#[test]
fn train_steps_beyond_the_heads_tables_are_refused_at_load() {
    let dir = tiny_bundle_with("numbers-train-steps-beyond", "", "", |m| {
        m.replacen("train_steps: 1000 ", "train_steps: 1001 ", 1)
    });
    refused_at_load(
        &dir,
        "timestep 1000 (the last of the manifest's `diffusion.train_steps: 1001`) does not run through the head's timestep embedding",
    );
}

#[test]
fn chains_longer_than_the_training_chain_are_refused_up_front() {
    let dir = tiny_bundle_with("numbers-train-steps", "", "", |m| {
        m.replacen("train_steps: 1000 ", "train_steps: 10 ", 1)
    });
    let b = dir.to_str().unwrap();
    let out = tmp("numbers-train-steps-out");
    let o = out.to_str().unwrap();
    let want = "MAR step 0 (stage `scaffold`) asks for 50 diffusion steps, but model `tiny-random` was trained with 10 (manifest diffusion.train_steps)";
    fails(&[b, "schedules/gtr.gtr", "--out", o], want);
    assert!(!out.exists(), "no folder before the check");
    fails(
        &[
            "eval",
            b,
            "schedules/mar-8.gtr",
            "schedules/gtr.gtr",
            "--out",
            o,
        ],
        "schedule `mar-8` does not fit the model: MAR step 0 (stage `generate`) asks for 100 diffusion steps",
    );
    // `plan --cost BUNDLE` plans as a run on the bundle does: it does not
    // price a plan the run refuses.
    let o = common::gtr_run(&["plan", "schedules/gtr.gtr", "--cost", b]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains(&format!("schedule schedules/gtr.gtr: {want}")),
        "{err}"
    );
    assert!(o.stdout.is_empty());
}

/// A small replay file whose `.npy` header claims a huge shape is refused
/// before anything is allocated (it used to abort allocating 2 TB), and
/// non-finite noise is blamed on the replay file, not on a graph.
#[test]
fn replay_files_cannot_claim_more_than_they_hold() {
    let dir = tmp("numbers-replay");
    std::fs::create_dir_all(&dir).unwrap();
    let huge = dir.join("huge.npz");
    let claim = "{'descr': '<i8', 'fortran_order': False, 'shape': (1000000000, 256), }";
    common::write_npz_claiming(&huge, "order.npy", claim, 50_000);
    let out = dir.join("out");
    let replay = [
        TINY,
        "schedules/gtr-fast.gtr",
        "--replay",
        huge.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    fails(
        &replay,
        "`order`'s header claims shape [1000000000, 256], larger than its 50128 bytes of data",
    );
    // The same claim under the entry name `order` (no `.npy`, which the
    // reader also accepts), and as the second of two `shape` keys (the
    // reader takes the last): both were read unchecked and aborted.
    for (entry, dict) in [
        ("order", claim),
        (
            "order.npy",
            "{'descr': '<i8', 'fortran_order': False, 'shape': (2, 1), 'shape': (1000000000, 256), }",
        ),
    ] {
        common::write_npz_claiming(&huge, entry, dict, 4096);
        fails(&replay, "`order`'s header claims shape [1000000000, 256]");
    }

    use ndarray::{Array2, Array3, Array4};
    let nan = dir.join("nan.npz");
    let mut w = ndarray_npy::NpzWriter::new(std::fs::File::create(&nan).unwrap());
    w.add_array("order", &Array2::from_shape_fn((1, 256), |(_, t)| t as i64))
        .unwrap();
    let mut init = Array3::<f32>::zeros((1, 256, 4));
    init[[0, 7, 1]] = f32::NAN;
    w.add_array("init_noise", &init).unwrap();
    w.add_array("step_noise", &Array4::<f32>::zeros((1, 256, 50, 4)))
        .unwrap();
    w.finish().unwrap();
    fails(
        &[
            TINY,
            "schedules/gtr-fast.gtr",
            "--num-images",
            "1",
            "--replay",
            nan.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        "`init_noise` holds a non-finite value (at flat index 29); noise must be finite",
    );
}

/// A schedule comes from a file of at most 1 MiB of UTF-8 text, or from
/// standard input with `plan -` (issue 10 cases 9 and 12, issue 12).
#[test]
fn schedules_are_small_text_files_or_standard_input() {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gtr-run"))
        .args(["plan", "-"])
        .current_dir(common::root())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let text = std::fs::read(common::root().join("schedules/mar-8.gtr")).unwrap();
    child.stdin.take().unwrap().write_all(&text).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with("schedule <stdin>") && out.contains("8 MAR steps"),
        "{out}"
    );

    let dir = tmp("numbers-schedule-text");
    std::fs::create_dir_all(&dir).unwrap();
    let big = dir.join("big.gtr");
    std::fs::write(&big, vec![b'#'; (1 << 20) + 1]).unwrap();
    fails(&["plan", big.to_str().unwrap()], "larger than 1024 KiB");
    let bad = dir.join("bad.gtr");
    std::fs::write(&bad, b"stage a {\n  tokens all \xff\n}\n").unwrap();
    fails(
        &["plan", bad.to_str().unwrap()],
        "not UTF-8 text (line 2, byte 14 of the line)",
    );
    fails(
        &[TINY, "-", "--out", dir.join("out").to_str().unwrap()],
        "standard input is read by `gtr-run plan -`",
    );
}

/// A manifest is read through a bounded reader and refused when it is too
/// large or nested deeper than the format needs (100,000 nested brackets
/// used to take 49 s to parse).
#[test]
fn manifests_are_small_and_shallow() {
    for (k, (more, want)) in [
        (
            format!("x: {}{}\n", "[".repeat(100_000), "]".repeat(100_000)),
            "brackets nested more than 32 deep (line 26)",
        ),
        (
            format!("# {}\n", "x".repeat(1 << 20)),
            "larger than 1024 KiB",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        refused_manifest(&format!("numbers-manifest-text-{k}"), &more, want, |m| m);
    }
}

/// Manifests with random numbers (zero, huge, negative, NaN, infinite,
/// and ordinary values) either open with every value in range, and then
/// plan and check a preset against the model without panicking, or are
/// refused with a message naming a field; no input panics.
mod generated_manifests {
    use std::collections::BTreeMap;

    use gtr_run::bundle::Bundle;
    use gtr_run::engine::check_plan;
    use gtr_run::plan::Planner;
    use gtr_run::schedule::Schedule;
    use proptest::prelude::*;

    fn size() -> impl Strategy<Value = String> {
        prop_oneof![
            1 => Just("0".to_string()),
            1 => Just("18446744073709551615".to_string()),
            1 => Just("4294967296".to_string()),
            1 => Just("-1".to_string()),
            // Mostly ordinary values, so that many manifests open.
            12 => (1u64..1100).prop_map(|n| n.to_string()),
        ]
    }

    /// A grid side: mostly ordinary, sometimes out of range.
    fn side() -> impl Strategy<Value = String> {
        prop_oneof![
            1 => size(),
            4 => (1u64..64).prop_map(|n| n.to_string()),
        ]
    }

    fn real() -> impl Strategy<Value = String> {
        prop_oneof![
            1 => Just(".nan".to_string()),
            1 => Just(".inf".to_string()),
            1 => Just("-.inf".to_string()),
            1 => Just("1e-300".to_string()),
            1 => Just("-2.5".to_string()),
            10 => (0.01f64..10.0).prop_map(|v| format!("{v}")),
        ]
    }

    /// How many generated manifests opened (the property must see both kinds).
    static OPENED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    #[test]
    fn some_generated_manifests_open() {
        never_panic();
        assert!(OPENED.load(std::sync::atomic::Ordering::Relaxed) > 0);
    }

    proptest! {
        // A fixed seed: the same 200 manifests on every run, some of which
        // open (checked by `some_generated_manifests_open`).
        #![proptest_config(ProptestConfig {
            cases: 200,
            rng_seed: proptest::test_runner::RngSeed::Fixed(20261205),
            ..ProptestConfig::default()
        })]
        #[test]
        fn never_panic(
            sizes in proptest::collection::vec(size(), 7),
            reals in proptest::collection::vec(real(), 3),
            sides in proptest::collection::vec(side(), 2),
            null_is_next in proptest::bool::weighted(0.7),
        ) {
            // Mostly a small grid and MAR's null class (the one after the
            // real ones), so that a good share of manifests open.
            let (h, w) = (sides[0].clone(), sides[1].clone());
            let null_class = if null_is_next { sizes[5].clone() } else { sizes[6].clone() };
            let tiny = super::common::root().join("models/fixtures/tiny");
            let graph = |f: &str| tiny.join(f).display().to_string();
            let text = format!(
                "format: gtr-run/mar-bundle@1\nname: generated\ngrid: [{}, {}]\ntoken_dim: {}\nwidth: {}\nbuffer: {}\nclasses: {}\nnull_class: {}\nlatent_scale: {}\ndiffusion: {{ schedule: cosine, train_steps: {}, variance: learned_range }}\nimage: {{ height: 64, width: 64, channels: 3 }}\nsampling: {{ cfg: {}, temperature: {} }}\ncost: {{ encoder_depth: 1, decoder_depth: 1, diffusion_width: 64, diffusion_depth: 2 }}\ngraphs:\n  encoder: {{ file: {}, inputs: {{ tokens: tokens, known: known_index, label: class_label }}, outputs: {{ encoded: encoded }} }}\n  decoder: {{ file: {}, inputs: {{ encoded: encoded, known: known_index }}, outputs: {{ z: z }} }}\n  diffusion: {{ file: {}, inputs: {{ x: x, t: t, z: z }}, outputs: {{ out: out }} }}\n  vae_decoder: {{ file: {}, inputs: {{ latent: latent }}, outputs: {{ image: image }} }}\n",
                h, w, sizes[2], sizes[3], sizes[4], sizes[5], null_class,
                reals[0], sizes[6], reals[1], reals[2],
                graph("encoder.onnx"), graph("decoder.onnx"), graph("diffusion.onnx"), graph("vae_decoder.onnx"),
            );
            static CASE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let case = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = super::tmp(&format!("numbers-generated-{case}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("manifest.yaml"), &text).unwrap();
            let opened = Bundle::open(&dir);
            std::fs::remove_dir_all(&dir).unwrap();
            match opened {
                Err(e) => prop_assert!(!e.to_string().is_empty()),
                Ok(bundle) => {
                    OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let m = &bundle.manifest;
                    prop_assert!(m.latent_scale.is_finite() && m.latent_scale >= 1e-6);
                    prop_assert!(m.sampling.cfg.is_finite() && m.sampling.cfg >= 0.0);
                    prop_assert!(m.diffusion.train_steps >= 1 && m.diffusion.train_steps <= 100_000);
                    prop_assert!(m.classes == 0 || m.null_class as usize >= m.classes);
                    let info = bundle.model_info();
                    let path = super::common::root().join("schedules/gtr.gtr");
                    let schedule = Schedule::from_file(&path, &BTreeMap::new()).unwrap();
                    if let Ok(planner) = Planner::new(&schedule, info.grid)
                        && let Ok(plan) = planner.plan(3)
                    {
                        let _ = check_plan(&info, &plan);
                    }
                }
            }
        }
    }
}

/// A graph file that is not an ONNX model (cut short, empty, or another
/// file) is a wrong input, exit 3, naming the graph and its file; it was a
/// failure of ONNX Runtime, exit 4.
#[test]
fn broken_graph_files_are_wrong_inputs() {
    let dir = tiny_bundle_with("numbers-broken-graph", "", "", |m| m);
    let b = dir.to_str().unwrap();
    let out = tmp("numbers-broken-graph-out");
    let args = [b, "schedules/gtr-fast.gtr", "--out", out.to_str().unwrap()];
    let original = std::fs::read(dir.join("diffusion.onnx")).unwrap();
    // The graph with `ir_version: 99` appended (protobuf: the last value of
    // field 1 wins): it parses, and ONNX Runtime's loading refuses it with
    // a generic failure (once exit status 4).
    let ir_99 = [&original[..], &[0x08, 99]].concat();
    for (bytes, want) in [
        (&original[..5000], "Protobuf parsing failed"),
        (&ir_99[..], "Unsupported model IR version: 99"),
        (&[][..], "the file is empty"),
        (
            &b"not a model\n"[..],
            "not an ONNX model that ONNX Runtime can load",
        ),
    ] {
        std::fs::write(dir.join("diffusion.onnx"), bytes).unwrap();
        fails(&args, "graph `diffusion` (");
        fails(&args, want);
        assert_eq!(common::gtr_run(&args).status.code(), Some(3));
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

//! Generated command lines (issue 10): random subcommands, inputs and
//! flags, with values at the edges of every type, end with a documented
//! status (README, "Exit status"), a message when they fail, no panic, and
//! nothing written outside the folder they were given.

mod common;

use proptest::prelude::*;

const TINY: &str = "models/fixtures/tiny";

fn number() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "0",
        "1",
        "2",
        "-1",
        "18446744073709551615",
        "1000000000",
        "1e3",
        "abc",
        "",
    ])
    .prop_map(String::from)
}

fn real() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["0", "1.5", "-1", "nan", "inf", "-inf", "1e309", "x"])
        .prop_map(String::from)
}

/// Which flags a subcommand takes (`""`: generation); a few it does not
/// take are drawn too.
fn takes(sub: &str, name: &str) -> bool {
    const GENERATE: &[&str] = &[
        "--num-images",
        "--batch",
        "--seed",
        "--threads",
        "--cfg",
        "--temperature",
        "--class",
        "--classes",
        "--shard",
        "--set",
        "--device",
        "--precision",
        "--sampler",
        "--backbone",
        "--sampler-ticks",
        "--replay",
        "--npz",
        "--resume",
        "--force",
    ];
    match sub {
        "plan" => ["--seed", "--set", "--grid", "--cost", "--json"].contains(&name),
        "merge" => ["--npz", "--force"].contains(&name),
        "eval" => {
            GENERATE.contains(&name)
                && ![
                    "--class",
                    "--classes",
                    "--shard",
                    "--replay",
                    "--npz",
                    "--resume",
                ]
                .contains(&name)
                || name == "--repeats"
        }
        _ => GENERATE.contains(&name),
    }
}

/// One flag with a value (or none), drawn from every flag the subcommands
/// take.
fn flag() -> impl Strategy<Value = Vec<String>> {
    let with = |name: &'static str, values: BoxedStrategy<String>| {
        values.prop_map(move |v| vec![name.to_string(), v]).boxed()
    };
    let pick = |values: &[&'static str]| {
        prop::sample::select(values.to_vec())
            .prop_map(String::from)
            .boxed()
    };
    prop_oneof![
        with("--num-images", number().boxed()),
        with("--batch", number().boxed()),
        with("--seed", number().boxed()),
        with("--threads", number().boxed()),
        with("--cfg", real().boxed()),
        with("--temperature", real().boxed()),
        with("--class", number().boxed()),
        with("--classes", pick(&["1,2", "-1", "999", ",", "3"])),
        with("--shard", pick(&["0/2", "3/2", "1/0", "x"])),
        with(
            "--set",
            pick(&["k=1", "beta=nan", "=", "mar_steps=4", "beta=0.5"])
        ),
        with("--device", pick(&["cpu", "gpu", "auto"])),
        with("--precision", pick(&["fp32", "fp16", "int8", "tf32", "x"])),
        with("--sampler", pick(&["host", "graph", "x"])),
        with("--backbone", pick(&["fused", "split", "auto"])),
        with("--sampler-ticks", number().boxed()),
        with("--replay", pick(&["/dev/null", "tests", "missing.npz"])),
        with("--npz", pick(&["/", "missing-folder/x.npz"])),
        with("--grid", pick(&["16x16", "0x0", "99999x99999", "4"])),
        with("--cost", pick(&["mar-b", "x", TINY])),
        with("--repeats", number().boxed()),
        Just(vec!["--resume".to_string()]),
        Just(vec!["--force".to_string()]),
        Just(vec!["--json".to_string()]),
    ]
}

fn command() -> impl Strategy<Value = (Vec<String>, Vec<Vec<String>>)> {
    let subcommand = prop::sample::select(vec!["", "", "plan", "merge", "eval"]);
    let model = prop::sample::select(vec![TINY, TINY, TINY, "models/fixtures", "/dev/null"]);
    let schedule = prop::sample::select(vec![
        "schedules/gtr-fast.gtr",
        "schedules/mar-8.gtr",
        "schedules/mar-8.gtr",
        "-",
        "/tmp",
        "tests/invalid/beta-zero.gtr",
    ]);
    (
        subcommand,
        model,
        schedule,
        prop::collection::vec(flag(), 0..5),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(sub, model, schedule, flags, stray)| {
            let mut head: Vec<String> = Vec::new();
            if !sub.is_empty() {
                head.push(sub.to_string());
            }
            match sub {
                "plan" => head.push(schedule.to_string()),
                _ => {
                    head.push(model.to_string());
                    head.push(schedule.to_string());
                }
            }
            // Mostly flags the subcommand takes, sometimes one it does not.
            let (mut fit, other): (Vec<_>, Vec<_>) =
                flags.into_iter().partition(|f| takes(sub, &f[0]));
            if let Some(f) = other.into_iter().nth(stray.index(4)) {
                fit.push(f);
            }
            (head, fit)
        })
}

/// What the default output folder `runs/` holds (empty when it does not
/// exist: the README's first command makes it).
fn runs_folder() -> Vec<std::path::PathBuf> {
    let mut names: Vec<_> = std::fs::read_dir(common::root().join("runs"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

proptest! {
    // A fixed seed: the same command lines on every run.
    #![proptest_config(ProptestConfig {
        cases: 64,
        rng_seed: proptest::test_runner::RngSeed::Fixed(105),
        ..ProptestConfig::default()
    })]

    #[test]
    fn generated_command_lines_end_with_a_documented_status((head, flags) in command()) {
        static CASE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let case = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = common::tmp(&format!("arguments-{case}"));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let mut args: Vec<String> = head;
        // Generation writes only where it is told, and makes few images
        // unless a drawn flag says how many.
        if args[0] != "plan" && args[0] != "merge" {
            args.extend(["--out".to_string(), out.display().to_string()]);
            if !flags.iter().any(|f| f[0] == "--num-images") {
                args.extend(["--num-images".to_string(), "2".to_string()]);
            }
        }
        args.extend(flags.into_iter().flatten());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let runs_before = runs_folder();
        let o = common::gtr_run(&argv);
        let err = String::from_utf8_lossy(&o.stderr);
        prop_assert!(
            matches!(o.status.code(), Some(0..=4)),
            "{argv:?} ended with {:?}: {err}",
            o.status
        );
        prop_assert!(!err.contains("panicked"), "{argv:?}: {err}");
        if !o.status.success() {
            prop_assert!(!err.trim().is_empty(), "{argv:?} failed without a word");
        }
        prop_assert!(
            runs_folder() == runs_before,
            "{argv:?} wrote into runs/ although --out was given"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The shipped default model, `models/mar-tiny`: it loads, its graphs keep
//! the contract, and it makes clothing of the class asked for (scored by
//! its own Fashion-MNIST evaluator), measured through `gtr-run eval`.

mod common;
use common::{ok, tmp};

#[test]
fn mar_tiny_makes_the_requested_classes() {
    let out = tmp("mar-tiny");
    ok(&[
        "eval",
        "models/mar-tiny",
        "schedules/gtr-fast.gtr",
        "--num-images",
        "20",
        "--batch",
        "20",
        "--out",
        out.to_str().unwrap(),
        "--force",
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    let q = &v["comparison"]["schedules"][0]["quality"][0];
    let accuracy = q["class_accuracy"].as_f64().unwrap();
    let fd = q["frechet_distance"].as_f64().unwrap();
    // Two images per class; measured 0.90 and FD 34 (see models/mar-tiny/README.md).
    // An untrained MAR scores chance (0.10) and FD about 210.
    assert!(accuracy >= 0.7, "class accuracy {accuracy}");
    assert!(fd.is_finite() && fd < FD_BOUND, "Fréchet distance {fd}");
    let _ = std::fs::remove_dir_all(&out);
}

/// Clearly below the untrained model's distance on the same images (see
/// models/mar-tiny/README.md).
const FD_BOUND: f64 = 100.0;

/// The adaptive preset on the shipped model: the same bytes and choices
/// twice, and every image's reveal order recorded.
#[test]
fn mar_tiny_runs_the_adaptive_preset_deterministically() {
    let made: Vec<(Vec<Vec<u8>>, serde_json::Value)> = ["a", "b"]
        .iter()
        .map(|name| {
            let out = tmp(&format!("mar-tiny-adaptive-{name}"));
            ok(&[
                "models/mar-tiny",
                "schedules/gtr-adaptive.gtr",
                "--num-images",
                "2",
                "--seed",
                "3",
                "--out",
                out.to_str().unwrap(),
            ]);
            let pngs = ["00000.png", "00001.png"]
                .iter()
                .map(|f| std::fs::read(out.join(f)).unwrap())
                .collect();
            let run: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap())
                    .unwrap();
            let _ = std::fs::remove_dir_all(&out);
            (pngs, run["reveal_orders"].clone())
        })
        .collect();
    assert_eq!(made[0].0, made[1].0, "same seed, same bytes");
    assert_eq!(made[0].1, made[1].1, "same choices");
    let orders = made[0].1.as_object().unwrap();
    assert_eq!(orders.len(), 2);
    for order in orders.values() {
        let mut tokens: Vec<u64> = order
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect();
        tokens.sort_unstable();
        assert_eq!(tokens, (0..256).collect::<Vec<u64>>());
    }
}

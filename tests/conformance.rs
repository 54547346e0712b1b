//! One conformance suite every ordering rule, step allocation and preset
//! must pass: each token revealed exactly once, at least one token per step,
//! nothing revealed twice, the known set only grows.

mod common;

use std::collections::BTreeMap;

use gtr_run::grid::Grid;
use gtr_run::plan::order;
use gtr_run::plan::{Plan, Planner, allocation, partition, plan};
use gtr_run::rng::{Purpose, Stream};
use gtr_run::schedule::{Distribution, OrderKind, Schedule, Source, Ties, Vocabulary};

const GRIDS: [(usize, usize); 6] = [(1, 1), (2, 3), (5, 7), (8, 8), (16, 16), (32, 32)];

/// Orders written as expressions, beside the named ones of `OrderKind::ALL`.
const KEY_ORDERS: [&str; 5] = [
    "by i + j",
    "by abs(i - h // 2) + abs(j - w // 2) then raster",
    "by -hypot(i - (h - 1) / 2, j - (w - 1) / 2) then random",
    "by max(i, j) % 3 - min(i, j) // 2",
    "by sqrt(i * w + j)",
];

/// Adaptive orders: planned with a provisional order (checked here), chosen
/// at run time (see `adaptive_orders_reveal_every_token_once_when_run`).
const ADAPTIVE_ORDERS: [&str; 2] = ["adaptive by high_freq", "adaptive by low_freq"];

/// Every `order` clause the conformance suite plans: the named orders, the
/// expression orders and the adaptive ones (explicit lists are
/// grid-specific; see `explicit_orders_conform`).
fn order_clauses() -> Vec<String> {
    OrderKind::ALL
        .iter()
        .map(|k| k.name().to_string())
        .chain(KEY_ORDERS.iter().map(|k| k.to_string()))
        .chain(ADAPTIVE_ORDERS.iter().map(|k| k.to_string()))
        .collect()
}

fn assert_plan_conforms(plan: &Plan, what: &str) {
    plan.check_invariants()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut known = vec![false; plan.grid.len()];
    for (k, step) in plan.steps.iter().enumerate() {
        assert!(!step.tokens.is_empty(), "{what}: step {k} is empty");
        assert!(
            step.tokens.windows(2).all(|w| w[0] < w[1]),
            "{what}: step {k} not ascending"
        );
        for &t in &step.tokens {
            assert!(!known[t], "{what}: token {t} revealed twice");
            known[t] = true;
        }
    }
    assert!(
        known.iter().all(|&k| k),
        "{what}: a token is never revealed"
    );
}

#[test]
fn every_order_rule_is_a_permutation_of_its_tokens() {
    for (h, w) in GRIDS {
        let grid = Grid::new(h, w);
        let subsets: Vec<Vec<usize>> = vec![
            (0..grid.len()).collect(),
            (0..grid.len()).filter(|t| t % 3 == 1).collect(),
            (0..grid.len())
                .filter(|&t| partition::checker(grid, 2)[t] == 2)
                .collect(),
        ];
        // The named orders, and key and listed orders (a listed order may
        // list tokens outside the subset and miss some of it).
        let keys: Vec<(usize, f64)> = (0..grid.len()).map(|t| (t, (t % 5) as f64)).collect();
        let named = order::NamedRules::new(grid);
        let mut rules: Vec<(String, Box<dyn order::TokenOrder>)> = OrderKind::ALL
            .iter()
            .map(|&k| (format!("{k:?}"), named.rule(k)))
            .collect();
        for ties in [Ties::Random, Ties::Raster] {
            let keys = keys.clone();
            rules.push((
                format!("key, {ties:?} ties"),
                Box::new(order::KeyOrder::new(keys, ties)),
            ));
        }
        let listed = (0..grid.len()).rev().step_by(2).collect();
        rules.push(("listed".into(), Box::new(order::ListedOrder(listed))));
        for (what, rule) in &rules {
            for tokens in &subsets {
                let mut rng = Stream::new(3, Purpose::Order);
                let mut got = rule.order(tokens, grid, &mut rng);
                got.sort_unstable();
                assert_eq!(&got, tokens, "{what} on {h}x{w}");
            }
        }
    }
}

/// `order list` and `order file` plan conforming schedules, and refuse
/// sequences that are not a permutation of the stage's tokens.
#[test]
fn explicit_orders_conform() {
    let spiral = "0, 1, 2, 3, 7, 11, 15, 14, 13, 12, 8, 4, 5, 6, 10, 9";
    let dir = common::tmp("explicit-orders");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("spiral.txt"), spiral.replace(',', "\n")).unwrap();
    for order in [format!("list [{spiral}]"), "file \"spiral.txt\"".into()] {
        let text = format!("grid 4x4\nstage a {{ tokens all  order {order}  rate 3 }}\n");
        let name = dir.join("s.gtr").display().to_string();
        let s = Schedule::from_source(Source::new(name, text), &BTreeMap::new()).unwrap();
        let p = plan(&s, Grid::new(4, 4), 0).unwrap();
        assert_plan_conforms(&p, &order);
        assert_eq!(p.steps[0].tokens, vec![0, 1, 2], "{order}");
        assert_eq!(p.steps[4].tokens, vec![5, 6, 9, 10], "{order}");
    }
    for (list, problem) in [
        ("[0, 1, 2]", "misses 1 of stage `a`'s 4 tokens"),
        ("[0, 1, 2, 2]", "listed twice"),
        ("[0, 1, 2, 3, 4]", "4 is not a token of the 2x2 grid"),
        ("[0, 1, 2, 3.5]", "3.5 is not a token of the 2x2 grid"),
    ] {
        let text = format!("grid 2x2\nstage a {{ tokens all  order list {list}  steps 1 }}\n");
        let s = Schedule::from_source(Source::new("t", text), &BTreeMap::new()).unwrap();
        let err = plan(&s, Grid::new(2, 2), 0).unwrap_err().to_string();
        assert!(err.contains(problem), "{list}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_allocation_rule_reveals_at_least_one_token_per_step() {
    for &rule in Distribution::ALL {
        for n in [1, 2, 7, 64, 128, 256, 1024] {
            for m in [1, 2, 3, 8, 16, 24, 64, 256, 1024]
                .into_iter()
                .filter(|&m| m <= n)
            {
                let c = allocation::allocate(n, m, rule);
                assert_eq!(
                    (c.len(), c.iter().sum::<usize>()),
                    (m, n),
                    "{rule:?} {n}/{m}"
                );
                assert!(c.iter().all(|&k| k >= 1), "{rule:?} {n}/{m}");
            }
        }
    }
}

/// Every order × allocation, in a two-stage checkerboard schedule, on
/// several grids and seeds.
#[test]
fn every_rule_combination_plans_conforming_schedules() {
    for order in order_clauses() {
        for dist in Distribution::ALL.iter().map(|d| d.name()) {
            let text = format!(
                "partition checker(2)
                 stage a {{ tokens S1  order {order}  rate 3 {dist} }}
                 stage b {{ tokens rest  order {order}  steps 1 }}"
            );
            let s = Schedule::from_source(Source::new("t", text), &BTreeMap::new()).unwrap();
            for (h, w) in GRIDS.into_iter().filter(|&(h, w)| h + w > 2) {
                let planner = Planner::new(&s, Grid::new(h, w)).unwrap();
                for seed in 0..3 {
                    let p = planner.plan(seed).unwrap();
                    assert_plan_conforms(&p, &format!("{order}/{dist} {h}x{w} seed {seed}"));
                }
            }
        }
    }
}

#[test]
fn every_preset_conforms_on_many_seeds_and_grids() {
    for path in common::preset_paths() {
        let s = common::load(&path, &BTreeMap::new()).unwrap();
        let own = s.grid.unwrap_or(Grid::MAR);
        for grid in [own, Grid::new(32, 32)] {
            let planner = Planner::new(&s, grid).unwrap();
            for seed in [0, 1, 42, u64::MAX] {
                let p = planner.plan(seed).unwrap();
                assert_plan_conforms(&p, &format!("{} {grid} seed {seed}", path.display()));
            }
        }
    }
}

#[test]
fn random_orders_depend_on_the_seed_and_only_on_it() {
    let s = common::preset("mar-64.gtr");
    let a = plan(&s, Grid::MAR, 5).unwrap();
    let b = plan(&s, Grid::MAR, 5).unwrap();
    let c = plan(&s, Grid::MAR, 6).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.steps, c.steps);
    // Fixed orders do not depend on the seed.
    let r = common::preset("raster.gtr");
    assert_eq!(
        plan(&r, Grid::MAR, 1).unwrap().steps,
        plan(&r, Grid::MAR, 2).unwrap().steps
    );
    let h = common::preset("halton-16.gtr");
    assert_eq!(
        plan(&h, Grid::MAR, 1).unwrap().steps,
        plan(&h, Grid::MAR, 2).unwrap().steps
    );
}

#[test]
fn raster_reveals_top_left_first() {
    let p = common::plan_default(&common::preset("raster.gtr"), 0);
    assert_eq!(p.steps[0].tokens, vec![0]);
    assert_eq!(p.steps[63].tokens.last(), Some(&255));
}

/// What the engine reveals at adaptive steps conforms too: on several
/// grids, seeds and distributions, every token once, each step its planned
/// count of its stage's tokens.
#[test]
fn adaptive_orders_reveal_every_token_once_when_run() {
    use gtr_run::engine::fake::FakeModel;
    use gtr_run::engine::{Engine, ImageJob, SeededNoise};
    for order in ADAPTIVE_ORDERS {
        for dist in Distribution::ALL.iter().map(|d| d.name()) {
            let text = format!(
                "partition checker(2)
                 diffusion 2
                 stage a {{ tokens S1  order {order}  rate 3 {dist} }}
                 stage b {{ tokens rest  order {order}  rate 2 {dist} }}"
            );
            let s = Schedule::from_source(Source::new("t", text), &BTreeMap::new()).unwrap();
            for (h, w) in [(2, 3), (5, 7), (8, 8)] {
                let grid = Grid::new(h, w);
                let planner = Planner::new(&s, grid).unwrap();
                let jobs: Vec<ImageJob> = (0..2)
                    .map(|i| ImageJob {
                        index: i,
                        seed: i * 7 + 1,
                        label: i as i64,
                    })
                    .collect();
                let plans: Vec<Plan> = jobs.iter().map(|j| planner.plan(j.seed).unwrap()).collect();
                let mut engine = Engine::new(FakeModel::with_grid(grid));
                let out = engine
                    .generate(&plans, &jobs, &SeededNoise, |_, _| {})
                    .unwrap();
                for (img, plan) in plans.iter().enumerate() {
                    let what = format!("{order}/{dist} {h}x{w} image {img}");
                    let revealed = &out.reveal_orders[img];
                    let mut all = revealed.clone();
                    all.sort_unstable();
                    assert_eq!(all, (0..grid.len()).collect::<Vec<_>>(), "{what}");
                    let stage_of = plan.stage_of_token();
                    for step in &plan.steps {
                        let got = &revealed[step.known_before..][..step.tokens.len()];
                        assert!(got.iter().all(|&t| stage_of[t] == step.stage), "{what}");
                    }
                }
            }
        }
    }
}

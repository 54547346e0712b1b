//! Step allocation: how many of a stage's `n` tokens each of its `m` steps
//! reveals. Every rule returns `m` counts, each at least 1, summing to `n`
//! (callers guarantee `1 <= m <= n`).

use std::f64::consts::FRAC_PI_2;

use crate::schedule::Distribution;

/// Tokens per step for `n` tokens over `m` steps under `rule`.
pub fn allocate(n: usize, m: usize, rule: Distribution) -> Vec<usize> {
    assert!(
        m >= 1 && m <= n,
        "allocate({n}, {m}): need 1 <= steps <= tokens"
    );
    match rule {
        Distribution::Cosine => cosine(n, m),
        Distribution::Uniform => uniform(n, m),
        Distribution::Arccos => arccos(n, m),
    }
}

/// MAR's cosine rule (mar.md §2.2): after step s the number still masked is
/// `floor(n · cos(π/2 · (s+1)/m))` (f64), clamped to leave at least one
/// token per remaining step and to reveal at least one now; the last step
/// takes what is left. MAR's own clamp `max(1, min(masked-1, len))` is this
/// rule whenever MAR's steps are all non-empty.
pub fn cosine(n: usize, m: usize) -> Vec<usize> {
    let mut masked = n;
    let mut counts = Vec::with_capacity(m);
    for s in 0..m {
        if s == m - 1 {
            counts.push(masked);
            break;
        }
        let ratio = (FRAC_PI_2 * (s as f64 + 1.0) / m as f64).cos();
        let raw = (n as f64 * ratio).floor() as usize;
        let still_to_come = m - s - 1;
        let next = raw.min(masked - 1).max(still_to_come);
        counts.push(masked - next);
        masked = next;
    }
    counts
}

/// As equal as integers allow: step k reveals `⌊(k+1)n/m⌋ − ⌊kn/m⌋`.
pub fn uniform(n: usize, m: usize) -> Vec<usize> {
    (0..m).map(|k| (k + 1) * n / m - k * n / m).collect()
}

/// Halton-MaskGIT's arccos rule (mar.md §6.2): after step idx the number
/// revealed is `max(idx+1, int(n · (1 − arccos((idx+1)/m) / (π/2))))`,
/// clamped so every step reveals at least one token.
pub fn arccos(n: usize, m: usize) -> Vec<usize> {
    let mut counts = Vec::with_capacity(m);
    let mut revealed = 0;
    for idx in 0..m {
        let frac = 1.0 - ((idx as f64 + 1.0) / m as f64).acos() / FRAC_PI_2;
        let raw = ((n as f64 * frac) as usize).max(idx + 1);
        let after = if idx == m - 1 {
            n
        } else {
            raw.clamp(revealed + 1, n - (m - idx - 1))
        };
        counts.push(after - revealed);
        revealed = after;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_matches_mar_for_64_and_32_steps() {
        // mar.md §2.3
        let want64 = [
            1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 3, 2, 2, 3, 3, 3, 3, 3, 3, 4, 3, 4, 4, 4, 4,
            4, 4, 4, 5, 5, 4, 5, 5, 5, 5, 5, 6, 5, 5, 6, 5, 6, 6, 6, 5, 6, 6, 6, 6, 6, 6, 7, 6, 6,
            6, 6, 7, 6, 6, 6,
        ];
        assert_eq!(cosine(256, 64), want64);
        let want32 = [
            1, 1, 1, 2, 3, 4, 3, 5, 5, 6, 6, 7, 7, 8, 8, 8, 10, 9, 10, 10, 11, 11, 11, 12, 11, 12,
            12, 13, 12, 12, 13, 12,
        ];
        assert_eq!(cosine(256, 32), want32);
    }

    #[test]
    fn cosine_16_and_8_steps_follow_the_formula() {
        // Cumulative masked after each step: floor(256 cos(π/2 (s+1)/m)).
        // Values from numpy-style f64 cos and floor.
        assert_eq!(
            cosine(256, 16),
            vec![2, 3, 7, 8, 11, 13, 15, 16, 19, 20, 22, 23, 23, 25, 24, 25]
        );
        assert_eq!(cosine(256, 8), vec![5, 15, 24, 31, 39, 45, 48, 49]);
    }

    #[test]
    fn every_rule_is_a_valid_allocation() {
        for rule in [
            Distribution::Cosine,
            Distribution::Uniform,
            Distribution::Arccos,
        ] {
            for n in 1..70 {
                for m in 1..=n {
                    let c = allocate(n, m, rule);
                    assert_eq!(c.len(), m, "{rule:?} n={n} m={m}");
                    assert_eq!(c.iter().sum::<usize>(), n, "{rule:?} n={n} m={m}");
                    assert!(c.iter().all(|&k| k >= 1), "{rule:?} n={n} m={m}: {c:?}");
                }
            }
        }
    }

    #[test]
    fn uniform_spreads_evenly() {
        assert_eq!(uniform(64, 24).iter().max(), Some(&3));
        assert_eq!(uniform(64, 24).iter().min(), Some(&2));
        assert_eq!(uniform(128, 2), vec![64, 64]);
    }

    #[test]
    fn arccos_matches_halton_maskgit_for_16_steps() {
        let c = arccos(256, 16);
        let mut cum = 0;
        for (idx, k) in c.iter().enumerate() {
            cum += k;
            let frac = 1.0 - ((idx as f64 + 1.0) / 16.0).acos() / FRAC_PI_2;
            let want = ((256.0 * frac) as usize).max(idx + 1);
            assert_eq!(cum, want, "step {idx}");
        }
    }
}

//! GtR's hierarchical checkerboard partition (paper Algorithm 1).

use crate::grid::Grid;

/// Runs Algorithm 1 on `grid` with `levels` = K stages and returns, for each
/// token (row-major), the 1-based set S_k it belongs to.
///
/// For k = 1..K-1, the cells of the remaining set R with
/// `(i + j) mod 2^k == 2^(k-1)` are pushed on a stack and R keeps those with
/// `(i + j) mod 2^k == 0`; R is pushed last; popping (LIFO) gives S_1..S_K.
/// So S_1 is the sparsest lattice and S_K the odd checkerboard colour.
pub fn checker(grid: Grid, levels: usize) -> Vec<usize> {
    assert!(levels >= 1, "checker partition needs at least one level");
    let all: Vec<usize> = (0..grid.len()).collect();
    let diag = |t: &usize| {
        let (i, j) = grid.cell(*t);
        i + j
    };
    let mut stack: Vec<Vec<usize>> = Vec::new();
    let mut remaining = all;
    for k in 1..levels {
        let modulus = 1usize << k;
        let half = modulus / 2;
        let (taken, kept): (Vec<usize>, Vec<usize>) =
            remaining.iter().partition(|t| diag(t) % modulus == half);
        stack.push(taken);
        remaining = kept
            .into_iter()
            .filter(|t| diag(t) % modulus == 0)
            .collect();
    }
    stack.push(remaining);
    let mut set_of = vec![0usize; grid.len()];
    for (k, set) in stack.into_iter().rev().enumerate() {
        for t in set {
            set_of[t] = k + 1;
        }
    }
    set_of
}

/// The largest K for which every set of `checker(grid, K)` is non-empty:
/// S_2 = U_{K-1} needs some cell with `i + j == 2^(K-2)`, so
/// `2^(K-2) <= h + w - 2`.
pub fn max_levels(grid: Grid) -> usize {
    let span = grid.height + grid.width - 2;
    let mut k = 1;
    while k < 16 && (1usize << (k - 1)) <= span {
        k += 1;
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(grid: Grid, k: usize) -> Vec<usize> {
        let sets = checker(grid, k);
        (1..=k)
            .map(|s| sets.iter().filter(|&&x| x == s).count())
            .collect()
    }

    #[test]
    fn mar_k3_matches_the_closed_form() {
        let g = Grid::new(16, 16);
        let sets = checker(g, 3);
        for (t, &s) in sets.iter().enumerate() {
            let (i, j) = g.cell(t);
            let want = if (i + j) % 4 == 0 {
                1
            } else if (i + j) % 4 == 2 {
                2
            } else {
                3
            };
            assert_eq!(s, want, "cell ({i}, {j})");
        }
        assert_eq!(sizes(g, 3), vec![64, 64, 128]);
    }

    #[test]
    fn lightgen_k4_sizes() {
        assert_eq!(sizes(Grid::new(32, 32), 4), vec![128, 128, 256, 512]);
    }

    #[test]
    fn k1_and_k2_and_odd_grids() {
        assert_eq!(sizes(Grid::new(16, 16), 1), vec![256]);
        assert_eq!(sizes(Grid::new(16, 16), 2), vec![128, 128]);
        // 5×7: 35 cells; even diagonals 18, odd 17.
        assert_eq!(sizes(Grid::new(5, 7), 2), vec![18, 17]);
        let s = sizes(Grid::new(5, 7), 3);
        assert_eq!(s.iter().sum::<usize>(), 35);
        assert_eq!(s[2], 17);
        assert!(s.iter().all(|&n| n > 0));
        // 1×1 only fits K = 1.
        assert_eq!(max_levels(Grid::new(1, 1)), 1);
    }

    #[test]
    fn max_levels_is_exactly_where_sets_stay_non_empty() {
        for (h, w) in [(2, 2), (3, 5), (4, 4), (16, 16), (32, 32), (7, 1)] {
            let g = Grid::new(h, w);
            let m = max_levels(g);
            assert!(sizes(g, m).iter().all(|&n| n > 0), "{h}x{w} K={m}");
            assert!(sizes(g, m + 1).contains(&0), "{h}x{w} K={}", m + 1);
        }
    }
}

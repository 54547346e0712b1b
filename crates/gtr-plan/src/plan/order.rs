//! Intra-stage token orders: every rule turns a stage's set of tokens into
//! the sequence in which they are revealed (first revealed first).

use std::sync::{Arc, OnceLock};

use crate::grid::Grid;
use crate::rng::Stream;
use crate::schedule::{OrderKind, Ties};

/// An ordering rule. Contract: the result is a permutation of `tokens`.
pub trait TokenOrder: Send + Sync {
    fn order(&self, tokens: &[usize], grid: Grid, rng: &mut Stream) -> Vec<usize>;
}

/// A uniformly random permutation, drawn per image (MAR's `sample_orders`).
pub struct RandomOrder;

/// Row-major: top-left first.
pub struct RasterOrder;

/// The 2-D Halton (bases 2, 3) low-discrepancy order of Halton-MaskGIT,
/// optionally rolled cyclically by a random offset.
pub struct HaltonOrder {
    pub roll: bool,
    /// The grid's Halton order, shared by every stage that uses it.
    pub ranks: HaltonRanks,
}

/// Each cell's place in a grid's Halton order ([`halton_permutation`]):
/// built once per grid and shared, so that a stage's Halton order costs
/// O(n log n) in its own tokens, not a walk of the whole grid.
#[derive(Debug, Clone)]
pub struct HaltonRanks(Arc<[u32]>);

impl HaltonRanks {
    pub fn new(grid: Grid) -> Self {
        let mut ranks = vec![u32::MAX; grid.len()];
        for (rank, t) in halton_permutation(grid).into_iter().enumerate() {
            ranks[t] = u32::try_from(rank).unwrap_or(u32::MAX);
        }
        HaltonRanks(ranks.into())
    }

    /// The place of token `t` (`u32::MAX` outside the grid it was built for).
    fn rank(&self, t: usize) -> u32 {
        self.0.get(t).copied().unwrap_or(u32::MAX)
    }
}

/// Quadrant-interleaved raster: the grid is cut into four quadrants
/// (top-left, top-right, bottom-left, bottom-right; the first row/column
/// half takes the extra line of an odd side) and the k-th token of each
/// quadrant, in raster order within it, is taken in turn.
pub struct SubsampleOrder;

impl TokenOrder for RandomOrder {
    fn order(&self, tokens: &[usize], _: Grid, rng: &mut Stream) -> Vec<usize> {
        let mut v = tokens.to_vec();
        rng.shuffle(&mut v);
        v
    }
}

impl TokenOrder for RasterOrder {
    fn order(&self, tokens: &[usize], _: Grid, _: &mut Stream) -> Vec<usize> {
        let mut v = tokens.to_vec();
        v.sort_unstable();
        v
    }
}

impl TokenOrder for HaltonOrder {
    /// `tokens` in the order of the grid's Halton sequence (the ranks must
    /// be those of `grid`), rolled when asked.
    fn order(&self, tokens: &[usize], _: Grid, rng: &mut Stream) -> Vec<usize> {
        let mut v = tokens.to_vec();
        // Stable, so tokens outside the ranks' grid (a misuse) keep their order.
        v.sort_by_key(|&t| self.ranks.rank(t));
        if self.roll && !v.is_empty() {
            let offset = rng.below(v.len() as u64) as usize;
            v.rotate_left(offset);
        }
        v
    }
}

impl TokenOrder for SubsampleOrder {
    fn order(&self, tokens: &[usize], grid: Grid, _: &mut Stream) -> Vec<usize> {
        let (h2, w2) = (grid.height.div_ceil(2), grid.width.div_ceil(2));
        let mut quadrants: [Vec<usize>; 4] = Default::default();
        let mut sorted = tokens.to_vec();
        sorted.sort_unstable();
        for t in sorted {
            let (i, j) = grid.cell(t);
            quadrants[usize::from(i >= h2) * 2 + usize::from(j >= w2)].push(t);
        }
        let longest = quadrants.iter().map(Vec::len).max().unwrap_or(0);
        (0..longest)
            .flat_map(|k| quadrants.iter().filter_map(move |q| q.get(k).copied()))
            .collect()
    }
}

/// `order by KEY`: ascending key; equal keys keep the order of `ties`
/// (the seeded random order, or raster).
pub struct KeyOrder {
    /// (token, key) for the stage's tokens only, ascending by token (the
    /// keys finite: the planner checks).
    keyed: Vec<(usize, f64)>,
    ties: Ties,
}

impl KeyOrder {
    /// The order of `keyed`'s (token, key) pairs, given in any order; a
    /// token listed twice keeps its first key.
    pub fn new(mut keyed: Vec<(usize, f64)>, ties: Ties) -> Self {
        keyed.sort_by_key(|&(t, _)| t);
        keyed.dedup_by_key(|&mut (t, _)| t);
        KeyOrder { keyed, ties }
    }

    /// The key of token `t`; tokens without one go last.
    fn key(&self, t: usize) -> f64 {
        self.keyed
            .binary_search_by_key(&t, |&(t, _)| t)
            .map_or(f64::INFINITY, |k| self.keyed[k].1)
    }
}

impl TokenOrder for KeyOrder {
    fn order(&self, tokens: &[usize], grid: Grid, rng: &mut Stream) -> Vec<usize> {
        let tied = match self.ties {
            Ties::Random => RandomOrder.order(tokens, grid, rng),
            Ties::Raster => RasterOrder.order(tokens, grid, rng),
        };
        let mut v: Vec<(f64, usize)> = tied.into_iter().map(|t| (self.key(t), t)).collect();
        // Stable: equal keys keep the ties' order.
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v.into_iter().map(|(_, t)| t).collect()
    }
}

/// An explicit sequence (`order list`, `order file`): its tokens in its
/// order, then any token it does not list in raster order (the planner
/// refuses sequences that are not a permutation of the stage's tokens, see
/// [`permutation`]).
pub struct ListedOrder(pub Vec<usize>);

impl TokenOrder for ListedOrder {
    /// O(n log n) in the list and the stage's tokens (no grid-sized table:
    /// a plan may have thousands of small stages).
    fn order(&self, tokens: &[usize], _: Grid, _: &mut Stream) -> Vec<usize> {
        let mut sorted = tokens.to_vec();
        sorted.sort_unstable();
        let mut unlisted = vec![true; sorted.len()];
        // Whether `t` is a token of the stage not yet placed (and marks it).
        let mut take = |t: &usize| {
            sorted
                .binary_search(t)
                .is_ok_and(|k| std::mem::take(&mut unlisted[k]))
        };
        let mut v: Vec<usize> = self.0.iter().copied().filter(&mut take).collect();
        v.extend(tokens.iter().copied().filter(take));
        v
    }
}

/// Why a listed sequence is not a permutation of a stage's tokens; entries
/// are 0-based positions in the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotAPermutation {
    /// Entry `entry` is not one of the stage's tokens.
    Foreign { entry: usize },
    /// Entry `entry` repeats entry `first`.
    Repeated { entry: usize, first: usize },
    /// `count` of the stage's tokens are not listed, `token` among them.
    Missing { count: usize, token: usize },
}

/// Checks that `listed` holds each of `tokens` exactly once and nothing else.
pub fn permutation(
    listed: &[usize],
    tokens: &[usize],
    grid: Grid,
) -> Result<Vec<usize>, NotAPermutation> {
    let mut member = vec![false; grid.len()];
    for &t in tokens {
        member[t] = true;
    }
    let mut at: Vec<Option<usize>> = vec![None; grid.len()];
    for (entry, &t) in listed.iter().enumerate() {
        if t >= grid.len() || !member[t] {
            return Err(NotAPermutation::Foreign { entry });
        }
        if let Some(first) = at[t] {
            return Err(NotAPermutation::Repeated { entry, first });
        }
        at[t] = Some(entry);
    }
    let mut missing = tokens.iter().filter(|&&t| at[t].is_none());
    match missing.next() {
        Some(&token) => Err(NotAPermutation::Missing {
            count: 1 + missing.count(),
            token,
        }),
        None => Ok(listed.to_vec()),
    }
}

/// The rule objects for the orders named in a schedule, on one grid: the
/// Halton order is computed at most once and shared by every stage.
pub struct NamedRules {
    grid: Grid,
    halton: OnceLock<HaltonRanks>,
}

impl NamedRules {
    pub fn new(grid: Grid) -> Self {
        NamedRules {
            grid,
            halton: OnceLock::new(),
        }
    }

    /// The rule for `kind` (its `order` takes tokens of this grid).
    pub fn rule(&self, kind: OrderKind) -> Box<dyn TokenOrder> {
        match kind {
            OrderKind::Random => Box::new(RandomOrder),
            OrderKind::Raster => Box::new(RasterOrder),
            OrderKind::Halton { roll } => Box::new(HaltonOrder {
                roll,
                ranks: self
                    .halton
                    .get_or_init(|| HaltonRanks::new(self.grid))
                    .clone(),
            }),
            OrderKind::Subsample => Box::new(SubsampleOrder),
        }
    }
}

/// Radical inverse of `n` in `base`: the digits of n mirrored after the point.
pub fn radical_inverse(mut n: u64, base: u64) -> f64 {
    let inv = 1.0 / base as f64;
    let mut x = 0.0;
    let mut scale = inv;
    while n > 0 {
        x += (n % base) as f64 * scale;
        n /= base;
        scale *= inv;
    }
    x
}

/// All cells of `grid` in Halton order: points n = 1, 2, ... with row
/// `floor(h · φ₂(n))` and column `floor(w · φ₃(n))`, keeping each cell's
/// first occurrence. (Halton-MaskGIT draws 10,000 points for 16×16; we draw
/// until every cell is hit, and append any never hit in raster order.)
pub fn halton_permutation(grid: Grid) -> Vec<usize> {
    let n = grid.len();
    let mut seen = vec![false; n];
    let mut out = Vec::with_capacity(n);
    let limit = 10_000u64.max(64 * n as u64);
    let mut k = 1u64;
    while out.len() < n && k <= limit {
        let row = ((grid.height as f64 * radical_inverse(k, 2)) as usize).min(grid.height - 1);
        let col = ((grid.width as f64 * radical_inverse(k, 3)) as usize).min(grid.width - 1);
        let t = grid.index(row, col);
        if !seen[t] {
            seen[t] = true;
            out.push(t);
        }
        k += 1;
    }
    out.extend((0..n).filter(|&t| !seen[t]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Purpose;

    #[test]
    fn radical_inverses() {
        let b2: Vec<f64> = (1..=4).map(|n| radical_inverse(n, 2)).collect();
        assert_eq!(b2, vec![0.5, 0.25, 0.75, 0.125]);
        let b3: Vec<f64> = (1..=3).map(|n| radical_inverse(n, 3)).collect();
        assert!((b3[0] - 1.0 / 3.0).abs() < 1e-15);
        assert!((b3[1] - 2.0 / 3.0).abs() < 1e-15);
        assert!((b3[2] - 1.0 / 9.0).abs() < 1e-15);
    }

    #[test]
    fn halton_16x16_starts_like_halton_maskgit() {
        let p = halton_permutation(Grid::new(16, 16));
        // n=1: (8, 5); n=2: (4, 10); n=3: (12, 1); n=4: (2, 7).
        assert_eq!(&p[..4], &[8 * 16 + 5, 4 * 16 + 10, 12 * 16 + 1, 2 * 16 + 7]);
        let mut sorted = p.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..256).collect::<Vec<_>>());
    }

    #[test]
    fn halton_covers_16x16_within_10000_points() {
        let g = Grid::new(16, 16);
        let mut seen = [false; 256];
        let mut count = 0;
        for k in 1..=10_000u64 {
            let r = (16.0 * radical_inverse(k, 2)) as usize;
            let c = (16.0 * radical_inverse(k, 3)) as usize;
            if !seen[g.index(r, c)] {
                seen[g.index(r, c)] = true;
                count += 1;
            }
        }
        assert_eq!(count, 256);
    }

    #[test]
    fn permutation_problems_are_named() {
        let g = Grid::new(2, 2);
        let stage = [0, 1, 3];
        assert_eq!(permutation(&[3, 0, 1], &stage, g), Ok(vec![3, 0, 1]));
        assert_eq!(
            permutation(&[3, 2], &stage, g),
            Err(NotAPermutation::Foreign { entry: 1 })
        );
        assert_eq!(
            permutation(&[3, 9], &stage, g),
            Err(NotAPermutation::Foreign { entry: 1 })
        );
        assert_eq!(
            permutation(&[3, 0, 3], &stage, g),
            Err(NotAPermutation::Repeated { entry: 2, first: 0 })
        );
        assert_eq!(
            permutation(&[3], &stage, g),
            Err(NotAPermutation::Missing { count: 2, token: 0 })
        );
    }

    /// The shared Halton ranks and per-stage keys give the orders the
    /// whole-grid definitions give: the grid's Halton order filtered to the
    /// stage, and a stable sort of the ties' order by a key of every cell.
    #[test]
    fn shared_halton_ranks_and_stage_keys_give_the_whole_grid_orders() {
        for grid in [
            Grid::new(16, 16),
            Grid::new(7, 13),
            Grid::new(1, 5),
            Grid::new(64, 3),
        ] {
            let named = NamedRules::new(grid);
            let key = |t: usize| ((t * 7919) % 11) as f64;
            let subsets: Vec<Vec<usize>> = vec![
                (0..grid.len()).collect(),
                (0..grid.len()).filter(|t| t % 3 == 1).collect(),
                (0..grid.len()).filter(|t| t % 5 < 2).collect(),
            ];
            for tokens in &subsets {
                for roll in [false, true] {
                    let mut member = vec![false; grid.len()];
                    tokens.iter().for_each(|&t| member[t] = true);
                    let mut want: Vec<usize> = halton_permutation(grid)
                        .into_iter()
                        .filter(|&t| member[t])
                        .collect();
                    let mut rng = Stream::new(5, Purpose::Order);
                    if roll {
                        let offset = rng.below(want.len() as u64) as usize;
                        want.rotate_left(offset);
                    }
                    let mut rng = Stream::new(5, Purpose::Order);
                    let got = named
                        .rule(OrderKind::Halton { roll })
                        .order(tokens, grid, &mut rng);
                    assert_eq!(got, want, "{grid} roll {roll}");
                }
                for ties in [Ties::Random, Ties::Raster] {
                    let mut rng = Stream::new(9, Purpose::Order);
                    let mut want = match ties {
                        Ties::Random => RandomOrder.order(tokens, grid, &mut rng),
                        Ties::Raster => RasterOrder.order(tokens, grid, &mut rng),
                    };
                    want.sort_by(|&a, &b| key(a).total_cmp(&key(b)));
                    let keyed = tokens.iter().rev().map(|&t| (t, key(t))).collect();
                    let mut rng = Stream::new(9, Purpose::Order);
                    let got = KeyOrder::new(keyed, ties).order(tokens, grid, &mut rng);
                    assert_eq!(got, want, "{grid} {ties:?}");
                }
            }
        }
    }

    #[test]
    fn subsample_interleaves_quadrants() {
        let g = Grid::new(4, 4);
        let all: Vec<usize> = (0..16).collect();
        let o = SubsampleOrder.order(&all, g, &mut Stream::new(0, Purpose::Order));
        assert_eq!(&o[..4], &[0, 2, 8, 10]);
        assert_eq!(&o[4..8], &[1, 3, 9, 11]);
    }
}

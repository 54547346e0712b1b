//! Intra-stage token orders: every rule turns a stage's set of tokens into
//! the sequence in which they are revealed (first revealed first).

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
    fn order(&self, tokens: &[usize], grid: Grid, rng: &mut Stream) -> Vec<usize> {
        let mut member = vec![false; grid.len()];
        for &t in tokens {
            member[t] = true;
        }
        let mut v: Vec<usize> = halton_permutation(grid)
            .into_iter()
            .filter(|&t| member[t])
            .collect();
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
    /// The key of every token of the grid (finite: the planner checks).
    pub keys: Vec<f64>,
    pub ties: Ties,
}

impl TokenOrder for KeyOrder {
    fn order(&self, tokens: &[usize], grid: Grid, rng: &mut Stream) -> Vec<usize> {
        let mut v = match self.ties {
            Ties::Random => RandomOrder.order(tokens, grid, rng),
            Ties::Raster => RasterOrder.order(tokens, grid, rng),
        };
        v.sort_by(|&a, &b| self.keys[a].total_cmp(&self.keys[b]));
        v
    }
}

/// An explicit sequence (`order list`, `order file`): its tokens in its
/// order, then any token it does not list in raster order (the planner
/// refuses sequences that are not a permutation of the stage's tokens, see
/// [`permutation`]).
pub struct ListedOrder(pub Vec<usize>);

impl TokenOrder for ListedOrder {
    fn order(&self, tokens: &[usize], grid: Grid, _: &mut Stream) -> Vec<usize> {
        let mut member = vec![false; grid.len()];
        for &t in tokens {
            member[t] = true;
        }
        let mut v: Vec<usize> = self
            .0
            .iter()
            .copied()
            .filter(|&t| t < member.len() && std::mem::take(&mut member[t]))
            .collect();
        v.extend(tokens.iter().copied().filter(|&t| member[t]));
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

/// The rule object for an order named in a schedule.
pub fn rule(kind: OrderKind) -> Box<dyn TokenOrder> {
    match kind {
        OrderKind::Random => Box::new(RandomOrder),
        OrderKind::Raster => Box::new(RasterOrder),
        OrderKind::Halton { roll } => Box::new(HaltonOrder { roll }),
        OrderKind::Subsample => Box::new(SubsampleOrder),
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

    #[test]
    fn subsample_interleaves_quadrants() {
        let g = Grid::new(4, 4);
        let all: Vec<usize> = (0..16).collect();
        let o = SubsampleOrder.order(&all, g, &mut Stream::new(0, Purpose::Order));
        assert_eq!(&o[..4], &[0, 2, 8, 10]);
        assert_eq!(&o[4..8], &[1, 3, 9, 11]);
    }
}

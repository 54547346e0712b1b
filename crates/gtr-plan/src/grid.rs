//! The token grid: `height` rows by `width` columns, tokens numbered
//! row-major (`index = row * width + col`), as MAR's `patchify` does.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Grid {
    pub height: usize,
    pub width: usize,
}

/// The largest number of tokens a plan may have.
pub const MAX_TOKENS: usize = 1 << 16;

impl Grid {
    pub const fn new(height: usize, width: usize) -> Self {
        Grid { height, width }
    }

    /// MAR's 16×16 latent grid (256 px images, KL-16 tokenizer).
    pub const MAR: Grid = Grid::new(16, 16);

    pub fn len(&self) -> usize {
        self.height * self.width
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn index(&self, row: usize, col: usize) -> usize {
        row * self.width + col
    }

    /// (row, column) of token `index`.
    pub fn cell(&self, index: usize) -> (usize, usize) {
        (index / self.width, index % self.width)
    }
}

impl fmt::Display for Grid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.height, self.width)
    }
}

impl FromStr for Grid {
    type Err = String;

    /// Parses `HxW` (e.g. `16x16`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a grid size; write it as HxW, e.g. 16x16");
        let (h, w) = s.split_once(['x', 'X']).ok_or_else(bad)?;
        let h: usize = h.trim().parse().map_err(|_| bad())?;
        let w: usize = w.trim().parse().map_err(|_| bad())?;
        if h == 0 || w == 0 {
            return Err(format!(
                "grid {s} has no tokens; both sides must be at least 1"
            ));
        }
        if h * w > MAX_TOKENS {
            return Err(format!(
                "grid {s} has {} tokens; at most {MAX_TOKENS} are supported",
                h * w
            ));
        }
        Ok(Grid::new(h, w))
    }
}

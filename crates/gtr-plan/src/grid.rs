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

    /// Parses `HxW` (e.g. `16x16`; `X` and `×` as in schedule files).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a grid size; write it as HxW, e.g. 16x16");
        let (h, w) = s.split_once(['x', 'X', '×']).ok_or_else(bad)?;
        let h: usize = h.trim().parse().map_err(|_| bad())?;
        let w: usize = w.trim().parse().map_err(|_| bad())?;
        if h == 0 || w == 0 {
            return Err(format!(
                "grid {s} has no tokens; both sides must be at least 1"
            ));
        }
        match h.checked_mul(w) {
            Some(n) if n <= MAX_TOKENS => {}
            n => {
                return Err(format!(
                    "grid {s} has {} tokens; at most {MAX_TOKENS} are supported",
                    n.map_or("too many".into(), |n| n.to_string())
                ));
            }
        }
        Ok(Grid::new(h, w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_sizes_parse_as_schedule_files_write_them() {
        for s in ["16x16", "16X16", "16×16", " 16 x 16 "] {
            assert_eq!(s.trim().parse::<Grid>(), Ok(Grid::new(16, 16)), "{s}");
        }
        assert!("16*16".parse::<Grid>().is_err());
        assert!("0x4".parse::<Grid>().unwrap_err().contains("no tokens"));
        // The product overflowed a usize and wrapped below the limit.
        let huge = "4294967296x4294967296".parse::<Grid>().unwrap_err();
        assert!(huge.contains("too many tokens"), "{huge}");
    }
}

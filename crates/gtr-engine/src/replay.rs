//! Injected orders and noise, so that any other MAR implementation can be
//! compared with ours draw for draw (`--replay FILE.npz`).
//!
//! Layout (numpy `.npz`, arrays indexed by image index 0..N):
//! - `order` int64 [N, L]: each image's tokens in reveal order; step s of
//!   the schedule reveals the next `n_s` of them (the schedule still sets
//!   the step sizes, diffusion steps, FTS and guidance; adaptive steps
//!   reveal the replay's tokens too);
//! - `init_noise` float32 [N, L, C]: each token's initial x_T;
//! - `step_noise` float32 [N, L, T, C]: the standard normal draw of each
//!   diffusion iteration of each token, iteration 0 first (index i = T−1 of
//!   the chain); T must cover the longest chain any token runs.

use std::path::Path;

use ndarray::{Array2, Array3, Array4};

#[derive(Debug, Clone)]
pub struct Replay {
    pub order: Array2<i64>,
    pub init_noise: Array3<f32>,
    pub step_noise: Array4<f32>,
}

#[derive(Debug, thiserror::Error)]
#[error("replay file {path}: {problem}")]
pub struct ReplayError {
    pub path: String,
    pub problem: String,
}

impl Replay {
    pub fn load(path: &Path) -> Result<Replay, ReplayError> {
        let err = |problem: String| ReplayError {
            path: path.display().to_string(),
            problem,
        };
        let mut npz = crate::npz::open_checked(path, &ARRAYS).map_err(err)?;
        let order: Array2<i64> = npz
            .by_name("order")
            .map_err(|e| err(format!("`order` (int64 [N, L]): {e}")))?;
        let init_noise: Array3<f32> = npz
            .by_name("init_noise")
            .map_err(|e| err(format!("`init_noise` (float32 [N, L, C]): {e}")))?;
        let step_noise: Array4<f32> = npz
            .by_name("step_noise")
            .map_err(|e| err(format!("`step_noise` (float32 [N, L, T, C]): {e}")))?;
        let replay = Replay {
            order,
            init_noise,
            step_noise,
        };
        replay.check().map_err(err)?;
        Ok(replay)
    }

    /// Checks the arrays agree with each other, each order is a permutation
    /// and every noise value is finite.
    pub fn check(&self) -> Result<(), String> {
        for (name, values) in [
            ("init_noise", self.init_noise.as_slice_memory_order()),
            ("step_noise", self.step_noise.as_slice_memory_order()),
        ] {
            if let Some(bad) = values.into_iter().flatten().position(|v| !v.is_finite()) {
                return Err(format!(
                    "`{name}` holds a non-finite value (at flat index {bad}); noise must be finite"
                ));
            }
        }
        let (n, l) = self.order.dim();
        let (n2, l2, c) = self.init_noise.dim();
        let (n3, l3, _, c3) = self.step_noise.dim();
        if (n2, l2) != (n, l) || (n3, l3, c3) != (n, l, c) {
            return Err(format!(
                "shapes disagree: order {:?}, init_noise {:?}, step_noise {:?}",
                self.order.shape(),
                self.init_noise.shape(),
                self.step_noise.shape()
            ));
        }
        for (b, row) in self.order.rows().into_iter().enumerate() {
            let mut seen = vec![false; l];
            for &t in row {
                if t < 0 || t as usize >= l || std::mem::replace(&mut seen[t as usize], true) {
                    return Err(format!("order[{b}] is not a permutation of 0..{l}"));
                }
            }
        }
        Ok(())
    }

    pub fn images(&self) -> usize {
        self.order.nrows()
    }
}

/// The arrays a replay file must hold, with their element sizes in bytes.
const ARRAYS: [(&str, u64); 3] = [("order", 8), ("init_noise", 4), ("step_noise", 4)];

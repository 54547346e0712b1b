//! Which training-chain timesteps a respaced diffusion chain keeps: what
//! sets both a chain's coefficients (the engine) and its length (the
//! number of head evaluations a token costs).

/// The timesteps (ascending, distinct) of the chain respaced from
/// `train_steps` to `steps`: guided-diffusion's `space_timesteps` with one
/// section (start at 0.0, add (T−1)/(steps−1) repeatedly, round half to
/// even), then, with `clip`, every timestep above it made `clip` and the
/// duplicates merged, as DiSA's `clip_timesteps` does (mar.md §6.3). So a
/// clipped chain may have fewer than `steps` timesteps (50 → 48 at clip
/// 950 of 1000). `steps` ≥ 1 and ≤ `train_steps` (the engine checks).
pub fn respaced_timesteps(train_steps: usize, steps: usize, clip: Option<u32>) -> Vec<usize> {
    let stride = if steps > 1 {
        (train_steps - 1) as f64 / (steps - 1) as f64
    } else {
        1.0
    };
    let top = clip.map_or(usize::MAX, |c| c as usize);
    let mut cur = 0.0f64;
    let mut out = Vec::with_capacity(steps);
    for _ in 0..steps {
        out.push((super::round_half_even(cur) as usize).min(top));
        cur += stride;
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unclipped_chains_are_guided_diffusions() {
        let t100 = respaced_timesteps(1000, 100, None);
        assert_eq!(t100.len(), 100);
        assert_eq!(&t100[..3], &[0, 10, 20]);
        assert_eq!(&t100[97..], &[979, 989, 999]);
        let t50 = respaced_timesteps(1000, 50, None);
        assert_eq!(&t50[..5], &[0, 20, 41, 61, 82]);
        assert_eq!(&t50[47..], &[958, 979, 999]);
        assert_eq!(respaced_timesteps(1000, 1, None), vec![0]);
        // A clip at or above the last timestep changes nothing.
        assert_eq!(respaced_timesteps(1000, 50, Some(999)), t50);
    }

    /// DiSA's chains (clip 950 of 1000, mar.md §6.3): sampling starts at
    /// 950, and 50 steps become 48, 25 become 24.
    #[test]
    fn clipped_chains_are_disas() {
        assert_eq!(
            respaced_timesteps(1000, 5, Some(950)),
            vec![0, 250, 500, 749, 950]
        );
        let t50 = respaced_timesteps(1000, 50, Some(950));
        assert_eq!(t50.len(), 48);
        assert_eq!(&t50[45..], &[917, 938, 950]);
        assert_eq!(respaced_timesteps(1000, 25, Some(950)).len(), 24);
        let lengths: Vec<usize> = (5..=50)
            .map(|n| respaced_timesteps(1000, n, Some(950)).len())
            .collect();
        assert!(
            lengths
                .iter()
                .zip(5..=50)
                .all(|(&l, n)| l <= n && l + 2 >= n)
        );
    }
}

//! Portable, seeded random streams.
//!
//! Every random choice draws from a ChaCha20 stream picked by (seed, purpose),
//! so orders and noise never share draws and the same seed gives the same
//! bytes on every platform and with every batch size.
//!
//! The streams are [`rand_core`] generators ([`Stream`] implements
//! [`TryRng`], hence [`Rng`]), so they plug into anything written against
//! those traits.

use std::convert::Infallible;

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng, TryCryptoRng, TryRng};

/// What a stream is used for; each purpose has its own ChaCha stream id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Purpose {
    /// Token orders and other planning choices.
    Order = 1,
    /// Per-image seeds derived from the run seed.
    ImageSeed = 2,
    /// Diffusion noise: initial noise and per-iteration noise of each token.
    TokenNoise = 3,
    /// FTS `random` selector draws.
    Selection = 4,
}

/// The seed of image `index` of a run with `seed`: independent of the batch
/// size and of which other images are generated.
pub fn image_seed(seed: u64, index: u64) -> u64 {
    let mut s = Stream::new(seed, Purpose::ImageSeed);
    s.seek_block(index);
    s.next_u64()
}

/// Standard normal draws for one token of one image: first its initial
/// noise, then the noise of each diffusion iteration, `dim` values each.
/// Token `t` reads its own region of the stream, so its draws do not depend
/// on which other tokens are sampled, in what order or batch.
pub struct TokenNoise(Stream);

impl TokenNoise {
    pub fn new(image_seed: u64, token: usize) -> Self {
        let mut s = Stream::new(image_seed, Purpose::TokenNoise);
        // 2^32 blocks of 16 words per token: far more than any chain needs.
        s.seek_block((token as u64) << 32);
        TokenNoise(s)
    }

    /// Fills `out` with independent standard normal values (Marsaglia's
    /// polar method on 53-bit uniforms; a pair per accepted point).
    pub fn fill(&mut self, out: &mut [f32]) {
        let mut k = 0;
        while k < out.len() {
            let (a, b) = loop {
                let u = 2.0 * self.0.unit() - 1.0;
                let v = 2.0 * self.0.unit() - 1.0;
                let s = u * u + v * v;
                if s > 0.0 && s < 1.0 {
                    let f = (-2.0 * s.ln() / s).sqrt();
                    break (u * f, v * f);
                }
            };
            out[k] = a as f32;
            if k + 1 < out.len() {
                out[k + 1] = b as f32;
            }
            k += 2;
        }
    }
}

/// A seeded random stream with the few draws the planner and the sampler
/// need.
///
/// Why the draws below (and [`TokenNoise::fill`]) are written out instead
/// of taken from `rand` (`random_range`, `shuffle`, `rand_distr`'s normal):
/// `rand` keeps the right to change which values those produce from one
/// release to the next, while a seed must give the same token order and
/// noise, hence byte-identical images, in every version of gtr-run
/// (tests/golden.rs and the byte-identity tests hold us to it); only the
/// ChaCha20 stream itself, fixed by its specification, comes from a crate.
pub struct Stream(ChaCha20Rng);

impl TryRng for Stream {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(self.0.next_u32())
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.0.next_u64())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.0.fill_bytes(dst);
        Ok(())
    }
}

impl TryCryptoRng for Stream {}

impl Stream {
    pub fn new(seed: u64, purpose: Purpose) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        rng.set_stream(purpose as u64);
        Stream(rng)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Moves to the start of 64-byte block `block` of this stream.
    pub fn seek_block(&mut self, block: u64) {
        self.0.set_word_pos(u128::from(block) * 16);
    }

    /// A uniform f64 in [0, 1) with 53 random bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform integer in `0..n` (Lemire's multiply-and-reject method).
    /// `n` must be at least 1.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0) has no values");
        let threshold = n.wrapping_neg() % n;
        loop {
            let product = u128::from(self.next_u64()) * u128::from(n);
            if (product as u64) >= threshold {
                return (product >> 64) as u64;
            }
        }
    }

    /// Shuffles `items` in place (Fisher–Yates, last element first).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_draws_and_purposes_differ() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut s = Stream::new(7, Purpose::Order);
                move |_| s.next_u64()
            })
            .collect();
        let mut again = Stream::new(7, Purpose::Order);
        assert_eq!(a, (0..4).map(|_| again.next_u64()).collect::<Vec<_>>());
        let mut other = Stream::new(8, Purpose::Order);
        assert_ne!(a[0], other.next_u64());
        // One seed, four purposes: four different streams.
        let purposes = [
            Purpose::Order,
            Purpose::ImageSeed,
            Purpose::TokenNoise,
            Purpose::Selection,
        ];
        let firsts: std::collections::BTreeSet<u64> = purposes
            .iter()
            .map(|&p| Stream::new(7, p).next_u64())
            .collect();
        assert_eq!(firsts.len(), purposes.len());
    }

    #[test]
    fn token_noise_is_standard_normal_and_per_token() {
        let mut n = TokenNoise::new(9, 3);
        let mut v = vec![0f32; 20000];
        n.fill(&mut v);
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / v.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
        let mut a = [0f32; 4];
        let mut b = [0f32; 4];
        TokenNoise::new(9, 3).fill(&mut a);
        TokenNoise::new(9, 4).fill(&mut b);
        assert_ne!(a, b);
        assert_eq!(a[..], v[..4]);
        assert_ne!(image_seed(1, 0), image_seed(1, 1));
        assert_eq!(image_seed(1, 5), image_seed(1, 5));
    }

    #[test]
    fn the_rand_core_view_is_the_same_stream() {
        let mut a = Stream::new(5, Purpose::Selection);
        let mut b = Stream::new(5, Purpose::Selection);
        assert_eq!(a.next_u64(), Rng::next_u64(&mut b));
        let mut bytes = [0u8; 8];
        b.fill_bytes(&mut bytes);
        assert_eq!(u64::from_le_bytes(bytes), a.next_u64());
    }

    #[test]
    fn below_stays_in_range_and_shuffle_is_a_permutation() {
        let mut s = Stream::new(1, Purpose::Order);
        for n in 1..50 {
            assert!(s.below(n) < n);
        }
        let mut v: Vec<u32> = (0..100).collect();
        s.shuffle(&mut v);
        assert_ne!(v, (0..100).collect::<Vec<_>>());
        v.sort_unstable();
        assert_eq!(v, (0..100).collect::<Vec<_>>());
    }
}

//! A small, portable, seedable generator.
//!
//! Written here rather than taken from `rand` because `rand`'s `StdRng` may
//! change its stream between versions, and shuffles, augmentations and the
//! Moving Fashion-MNIST cache must stay reproducible across upgrades.

/// SplitMix64 finaliser: a strong 64-bit mix, used to derive independent
/// seeds from (seed, epoch, index) tuples.
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Derives a seed from a parent seed and a list of integers (epoch, index, ...).
pub fn derive(seed: u64, parts: &[u64]) -> u64 {
    parts.iter().fold(mix(seed), |acc, &p| mix(acc ^ mix(p)))
}

/// SplitMix64 stream generator.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator whose stream depends only on `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: mix(seed) }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in `[0, n)`; `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift: the bias (n / 2^64) is far below anything measurable here.
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Fisher–Yates shuffle in place.
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
    fn shuffle_is_a_permutation_and_seed_dependent() {
        let mut a: Vec<u32> = (0..1000).collect();
        let mut b = a.clone();
        Rng::new(1).shuffle(&mut a);
        Rng::new(2).shuffle(&mut b);
        assert_ne!(a, b);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        let mut again: Vec<u32> = (0..1000).collect();
        Rng::new(1).shuffle(&mut again);
        assert_eq!(a, again);
    }

    #[test]
    fn below_and_uniform_stay_in_range_and_spread() {
        let mut r = Rng::new(7);
        let mut hist = [0usize; 10];
        for _ in 0..10_000 {
            let v = r.below(10) as usize;
            hist[v] += 1;
            let u = r.uniform();
            assert!((0.0..1.0).contains(&u));
        }
        // Each bucket expects 1000; 5 sigma is about 150.
        assert!(hist.iter().all(|&h| (850..1150).contains(&h)), "{hist:?}");
    }

    #[test]
    fn derive_separates_parts() {
        assert_ne!(derive(0, &[1, 2]), derive(0, &[2, 1]));
        assert_ne!(derive(0, &[1]), derive(1, &[1]));
        assert_eq!(derive(5, &[3, 4]), derive(5, &[3, 4]));
    }
}

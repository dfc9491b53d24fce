//! The seeded random streams of the workspace, in one place.
//!
//! Written here rather than taken from `rand`, whose generators may change
//! their streams between versions: shuffles, augmentations, the Moving
//! Fashion-MNIST cache, training noise and sampling noise must stay
//! reproducible across upgrades.
//!
//! - [`splitmix64`], [`mix`], [`derive`]: SplitMix64, to derive independent
//!   seeds from `(seed, epoch, index, ...)` tuples.
//! - [`Rng`]: a SplitMix64 stream (uniforms, integers, shuffles) for data.
//! - [`Xoshiro256pp`]: one xoshiro256++ stream per batch row, for noise
//!   (dim-diffusion's `NoiseRng`).

/// The golden-ratio increment of SplitMix64.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// One SplitMix64 step: advances `state` and returns 64 mixed bits.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A strong 64-bit mix of `x` (the first SplitMix64 output from state `x`).
pub fn mix(x: u64) -> u64 {
    let mut s = x;
    splitmix64(&mut s)
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
        splitmix64(&mut self.state)
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

/// One xoshiro256++ stream.
#[derive(Debug, Clone)]
pub struct Xoshiro256pp {
    s: [u64; 4],
}

impl Xoshiro256pp {
    /// The stream of row `row` of seed `seed`.
    pub fn new(seed: u64, row: u64) -> Self {
        // Hash (seed, row) into a SplitMix64 state, then expand to 256 bits.
        let mut h = seed;
        let a = splitmix64(&mut h);
        let mut st = a ^ row.wrapping_mul(0xD1B5_4A32_D192_ED03).rotate_left(17);
        let mut h2 = st;
        st = splitmix64(&mut h2);
        let mut sm = st;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Self { s }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Two independent standard normals (Box–Muller).
    pub fn next_normal_pair(&mut self) -> (f64, f64) {
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        (r * c, r * s)
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

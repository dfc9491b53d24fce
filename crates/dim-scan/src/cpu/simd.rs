//! SIMD lanes: a block of [`LANES`] channels as one value, with lane-wise
//! arithmetic written as short fixed-length loops that the compiler unrolls
//! and vectorises for whatever instruction set the caller is compiled for
//! (see `dispatch`). Uses no other part of `cpu`.

use std::ops::{Add, Deref, DerefMut, Div, Mul, Sub};

/// Channels scanned together, one per SIMD lane; also the channels of one
/// task and so the granularity of the `dB`/`dC` partial sums. 16 f32 fill one
/// AVX-512 register (two AVX2 ones).
pub(super) const LANES: usize = 16;

/// One f32 per lane (channel of the block). Aligned to a whole vector: a
/// misaligned one straddles cache lines, which costs on every load and store.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C, align(64))]
pub(super) struct Lanes(pub(super) [f32; LANES]);

pub(super) const ZERO: Lanes = Lanes([0.0; LANES]);

impl Deref for Lanes {
    type Target = [f32; LANES];
    #[inline(always)]
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Lanes {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Lanes {
    /// `f` on every lane. Every lane-wise operation goes through these short
    /// fixed-length loops: the compiler unrolls them, keeps the values in
    /// registers and vectorises the straight-line code (a longer loop body
    /// would be vectorised as a loop instead, through memory).
    #[inline(always)]
    pub(super) fn map(self, f: impl Fn(f32) -> f32) -> Self {
        let mut out = ZERO;
        for k in 0..LANES {
            out.0[k] = f(self.0[k]);
        }
        out
    }

    #[inline(always)]
    pub(super) fn zip(self, b: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        let mut out = ZERO;
        for k in 0..LANES {
            out.0[k] = f(self.0[k], b.0[k]);
        }
        out
    }

    #[inline(always)]
    pub(super) fn zip3(self, b: Self, c: Self, f: impl Fn(f32, f32, f32) -> f32) -> Self {
        let mut out = ZERO;
        for k in 0..LANES {
            out.0[k] = f(self.0[k], b.0[k], c.0[k]);
        }
        out
    }

    /// Σ of the lanes by a fixed tree of halves: deterministic, and shuffles
    /// plus adds in vector code (a running sum would be a serial chain).
    #[inline(always)]
    pub(super) fn sum(self) -> f32 {
        let mut t = self.0;
        let mut w = LANES;
        while w > 1 {
            w /= 2;
            for k in 0..w {
                t[k] += t[k + w];
            }
        }
        t[0]
    }
}

impl Add for Lanes {
    type Output = Self;
    #[inline(always)]
    fn add(self, b: Self) -> Self {
        self.zip(b, |x, y| x + y)
    }
}

impl Sub for Lanes {
    type Output = Self;
    #[inline(always)]
    fn sub(self, b: Self) -> Self {
        self.zip(b, |x, y| x - y)
    }
}

impl Mul for Lanes {
    type Output = Self;
    #[inline(always)]
    fn mul(self, b: Self) -> Self {
        self.zip(b, |x, y| x * y)
    }
}

/// Times one value on every lane.
impl Mul<f32> for Lanes {
    type Output = Self;
    #[inline(always)]
    fn mul(self, b: f32) -> Self {
        self.map(|x| x * b)
    }
}

impl Div for Lanes {
    type Output = Self;
    #[inline(always)]
    fn div(self, b: Self) -> Self {
        self.zip(b, |x, y| x / y)
    }
}

/// One f64 per lane, for sums over positions.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C, align(64))]
pub(super) struct Lanes64(pub(super) [f64; LANES]);

pub(super) const ZERO64: Lanes64 = Lanes64([0.0; LANES]);

impl Lanes64 {
    /// `self + v`, `v` widened to f64.
    #[inline(always)]
    pub(super) fn add_f32(self, v: Lanes) -> Self {
        let mut out = self;
        for k in 0..LANES {
            out.0[k] += f64::from(v.0[k]);
        }
        out
    }
}

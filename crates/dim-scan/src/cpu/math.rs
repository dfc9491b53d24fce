//! Scalar math written once for `f32` and for [`Lanes`]: the exponential,
//! softplus, sigmoid and SiLU as branch-free polynomials (no libm calls), and
//! how `a·b + c` is evaluated ([`MulAdd`]: fused or not, chosen per
//! instruction set by `dispatch`). Uses only `simd`.

use std::ops::{Add, Div, Mul, Sub};

use super::simd::{Lanes, LANES};

/// How the kernels evaluate `a·b + c`: fused (one rounding, and much faster)
/// where the CPU has FMA, else a product then a sum (a fused `mul_add`
/// without hardware support is a slow libm call). The kernels are generic
/// over it and instantiated per instruction set.
pub(super) trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

pub(super) struct Fused;
pub(super) struct Unfused;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// What the exponential, softplus and sigmoid need: implemented by `f32`
/// (the row-layout loops, and the tests) and by [`Lanes`], so each function
/// is written once.
pub(super) trait Real:
    Copy + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self>
{
    fn splat(v: f32) -> Self;
    /// `self·b + c`.
    fn mul_add<M: MulAdd>(self, b: Self, c: Self) -> Self;
    /// Clamped to `[lo, hi]`; NaN stays NaN.
    fn clamp_to(self, lo: f32, hi: f32) -> Self;
    /// `max(x, 0)` (NaN gives 0: the callers add a NaN term anyway).
    fn pos(self) -> Self;
    fn abs(self) -> Self;
    /// `2^i` for `self = i + 1.5·2^23`, `i + 127` in `1..=254` (see [`exp`]).
    fn pow2_shifted(self) -> Self;
    /// `a` where `self ≥ 0`, else `b`.
    fn select_nonneg(self, a: Self, b: Self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn splat(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn mul_add<M: MulAdd>(self, b: Self, c: Self) -> Self {
        M::mul_add(self, b, c)
    }
    #[inline(always)]
    fn clamp_to(self, lo: f32, hi: f32) -> Self {
        self.clamp(lo, hi)
    }
    #[inline(always)]
    fn pos(self) -> Self {
        if self > 0.0 {
            self
        } else {
            0.0
        }
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    fn pow2_shifted(self) -> Self {
        // The integer sits in the low mantissa bits: rebias it (0x4B40_0000 is
        // 1.5·2^23's pattern) and move it into the exponent field.
        f32::from_bits(self.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23)
    }
    #[inline(always)]
    fn select_nonneg(self, a: Self, b: Self) -> Self {
        if self >= 0.0 {
            a
        } else {
            b
        }
    }
}

impl Real for Lanes {
    #[inline(always)]
    fn splat(v: f32) -> Self {
        Lanes([v; LANES])
    }
    #[inline(always)]
    fn mul_add<M: MulAdd>(self, b: Self, c: Self) -> Self {
        self.zip3(b, c, M::mul_add)
    }
    #[inline(always)]
    fn clamp_to(self, lo: f32, hi: f32) -> Self {
        self.map(|x| x.clamp_to(lo, hi))
    }
    #[inline(always)]
    fn pos(self) -> Self {
        self.map(Real::pos)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        self.map(f32::abs)
    }
    #[inline(always)]
    fn pow2_shifted(self) -> Self {
        self.map(Real::pow2_shifted)
    }
    #[inline(always)]
    fn select_nonneg(self, a: Self, b: Self) -> Self {
        self.zip3(a, b, Real::select_nonneg)
    }
}

/// `exp(x)` in f32 to about 2 ulp, branch-free (std's `exp` is a scalar libm
/// call). e^x = 2^i · e^r with i = round(x·log2 e) and r = x − i·ln 2 (ln 2
/// split in a high part exact in f32 and a low part, so r keeps full
/// precision for large |x|); e^r, |r| ≤ 0.35, from its Taylor series to
/// degree 7 (error below 6e-9). NaN propagates through every step.
#[inline(always)]
pub(super) fn exp<M: MulAdd, V: Real>(x: V) -> V {
    // 0.693145751953125 exactly (few mantissa bits, so i·LN2_HI is exact) and ln 2 − LN2_HI.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5·2^23: adding it rounds to an integer, which then sits in the low
    // mantissa bits (exact for |t| < 2^22). No float-to-int conversion.
    const SHIFTER: f32 = 12_582_912.0;
    let s = V::splat;
    let xc = x.clamp_to(-87.0, 88.0);
    let t = xc.mul_add::<M>(s(std::f32::consts::LOG2_E), s(SHIFTER));
    let i = t - s(SHIFTER);
    let r = i.mul_add::<M>(s(-LN2_HI), xc);
    let r = i.mul_add::<M>(s(-LN2_LO), r);
    let mut p = s(1.0 / 5040.0);
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p.mul_add::<M>(r, s(c));
    }
    p * t.pow2_shifted()
}

/// `ln(1 + t)` for t in [0, 1], branch-free: 2·atanh(s) with s = t / (2 + t)
/// ≤ 1/3, from the odd series to s^13 (truncation below 2e-8 relative). No
/// cancellation for tiny t. The rounding error r of w = 2 + t is exact
/// (Fast2Sum) and folded into s = t / (w + r) ≈ q − q·r/w, q = t / w; r/w
/// ≤ 2^-24, so 1/w ∈ [1/3, 1/2] taken as 0.4 leaves under 2e-8 of it.
#[inline(always)]
fn log1p_unit<M: MulAdd, V: Real>(t: V) -> V {
    let c = V::splat;
    let w = c(2.0) + t;
    let r = t - (w - c(2.0));
    let q = t / w;
    let s = (q * r).mul_add::<M>(c(-0.4), q);
    let s2 = s * s;
    let mut p = c(1.0 / 13.0);
    for k in [1.0 / 11.0, 1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0] {
        p = p.mul_add::<M>(s2, c(k));
    }
    let two_s = s + s;
    two_s.mul_add::<M>(s2 * p, two_s)
}

/// `(softplus(x), sigmoid(x))` from one exponential, e^{−|x|} ∈ (0, 1]
/// (no overflow either side): softplus = max(x, 0) + ln(1 + e^{−|x|}).
#[inline(always)]
pub(super) fn softplus_sigmoid<M: MulAdd, V: Real>(x: V) -> (V, V) {
    let t = exp::<M, V>(V::splat(0.0) - x.abs());
    let r = V::splat(1.0) / (V::splat(1.0) + t);
    (x.pos() + log1p_unit::<M, V>(t), x.select_nonneg(r, t * r))
}

/// The sigmoid `1 / (1 + e^{−x})`, without the softplus part.
#[inline(always)]
pub(super) fn logistic<M: MulAdd, V: Real>(x: V) -> V {
    let t = exp::<M, V>(V::splat(0.0) - x.abs());
    let r = V::splat(1.0) / (V::splat(1.0) + t);
    x.select_nonneg(r, t * r)
}

#[inline(always)]
pub(super) fn silu<M: MulAdd, V: Real>(z: V) -> V {
    z * logistic::<M, V>(z)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Handles on the functions above, on one value, unfused.
    fn fast_exp(x: f32) -> f32 {
        exp::<Unfused, f32>(x)
    }

    fn softplus(x: f32) -> f32 {
        softplus_sigmoid::<Unfused, f32>(x).0
    }

    fn sigmoid(x: f32) -> f32 {
        logistic::<Unfused, f32>(x)
    }

    #[test]
    fn fast_exp_matches_std_across_the_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = fast_exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
        assert!(fast_exp(f32::NAN).is_nan());
        assert!(fast_exp(-1000.0) < 1e-37); // clamped, tiny
        assert!(fast_exp(0.0) == 1.0);
    }

    #[test]
    fn softplus_and_sigmoid_agree_with_f64() {
        for &x in &[-30.0f32, -5.0, -0.3, 0.0, 0.7, 4.0, 19.9, 20.1, 50.0] {
            let want = (1.0 + (x as f64).exp()).ln();
            assert!((softplus(x) as f64 - want).abs() <= 1e-6 * want.max(1e-30) + 1e-12);
            let sw = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!((sigmoid(x) as f64 - sw).abs() < 1e-7);
        }
    }

    #[test]
    fn lane_functions_match_f64() {
        fn check<M: MulAdd>() {
            let mut x = -30.0f32;
            let (mut e_worst, mut sp_worst, mut sg_worst) = (0f64, 0f64, 0f64);
            while x < 30.0 {
                let v = Lanes(std::array::from_fn(|k| x + k as f32 * 0.0011));
                let e = exp::<M, Lanes>(v);
                let (sp, sg) = softplus_sigmoid::<M, Lanes>(v);
                for k in 0..LANES {
                    let xf = f64::from(v[k]);
                    let rel = |got: f32, want: f64| ((f64::from(got) - want) / want).abs();
                    e_worst = e_worst.max(rel(e[k], xf.exp()));
                    sp_worst = sp_worst.max(rel(sp[k], xf.exp().ln_1p()));
                    sg_worst = sg_worst.max((f64::from(sg[k]) - 1.0 / (1.0 + (-xf).exp())).abs());
                }
                x += 0.0173;
            }
            assert!(e_worst < 5e-7, "exp: {e_worst:e}");
            assert!(sp_worst < 1e-6, "softplus: {sp_worst:e}");
            assert!(sg_worst < 1e-7, "sigmoid: {sg_worst:e}");
        }
        check::<Unfused>();
        check::<Fused>(); // a software fma where the CPU lacks one: slow, still right
    }
}

//! The multi-threaded CPU implementation of the selective scan, forward and
//! backward, on plain slices (no libtorch). The autograd op calls it for CPU
//! tensors through the C-ABI adapter in `ffi.rs`.
//!
//! The SIMD lanes run over channels: a block of up to 16 (`LANES`)
//! consecutive channels of one group and one batch element shares `B_l` and
//! `C_l`, so the state update `h[n] = exp(Δ·A[n])·h[n] + Δ·u·B_l[n]` and
//! `y += C_l[n]·h[n]` are lane-wise operations on `[f32; 16]` values
//! (`Lanes`), with no horizontal reduction in the forward and the `N`
//! independent recurrences giving instruction-level parallelism. The
//! lane-wise operations are tiny fixed-length loops that the compiler unrolls,
//! keeps in registers and vectorises; the exponential, softplus and sigmoid
//! are polynomials written once for `f32` and for `Lanes` (no libm calls). Δ
//! and `u` are prepared per chunk of positions and moved from the row layout
//! of the tensors to the lane layout once. The task kernels are compiled once
//! per instruction set (AVX-512, AVX2 + FMA, baseline) from the same code and
//! picked at run time.
//!
//! Work is split over (batch, channel block) with rayon. The backward
//! recomputes the states: a first pass stores the state every [`SEGMENT`]
//! positions, then each segment is recomputed (keeping its states and decays)
//! and walked backwards. Reductions (over batch for `dA`, `dD`, `delta_bias`;
//! over the channels of a group for `dB`, `dC`) go through per-task partial
//! sums added in a fixed order (within a block, a fixed tree over the lanes),
//! so results do not depend on the thread count: the CPU backward is always
//! deterministic.

use std::ops::{Add, Deref, DerefMut, Div, Mul, Sub};

use half::{bf16, f16};
use rayon::prelude::*;

/// Positions between stored states in the backward's first pass.
pub const SEGMENT: usize = 128;
/// Positions whose Δ and `u` are prepared at once (a multiple of
/// [`SEGMENT`]): long contiguous reads of the input rows, and up to this
/// length one preparation serves both the backward's forward pass and its walk.
const CHUNK: usize = 8 * SEGMENT;
/// Channels scanned together, one per SIMD lane; also the channels of one
/// task and so the granularity of the `dB`/`dC` partial sums. 16 f32 fill one
/// AVX-512 register (two AVX2 ones).
const LANES: usize = 16;

/// An element type of `u`, `delta`, `z`, `B`, `C` and `y`; math is in f32.
pub trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Sizes of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub batch: usize,
    pub dim: usize,
    pub len: usize,
    pub dstate: usize,
    pub groups: usize,
}

impl Shape {
    fn per_group(&self) -> usize {
        self.dim / self.groups
    }
}

/// One direction's inputs, contiguous, with the layouts of the crate docs:
/// `u`, `delta`: `(batch, D, L)`; `a`: `(D, N)`; `b`, `c`: `(batch, G, N, L)`;
/// `d`, `delta_bias`: `(D)`.
#[derive(Clone, Copy, Debug)]
pub struct DirInputs<'a, E> {
    pub u: &'a [E],
    pub delta: &'a [E],
    pub a: &'a [f32],
    pub b: &'a [E],
    pub c: &'a [E],
    pub d: Option<&'a [f32]>,
    pub delta_bias: Option<&'a [f32]>,
    pub reverse: bool,
}

/// One direction's gradients, each written in full: shapes as the inputs.
#[derive(Debug)]
pub struct DirGrads<'a, E> {
    pub du: &'a mut [E],
    pub ddelta: &'a mut [E],
    pub da: &'a mut [f32],
    pub db: &'a mut [f32],
    pub dc: &'a mut [f32],
    pub dd: Option<&'a mut [f32]>,
    pub ddelta_bias: Option<&'a mut [f32]>,
}

// ---- Lane-wise arithmetic ----

/// One f32 per lane (channel of the block). Aligned to a whole vector: a
/// misaligned one straddles cache lines, which costs on every load and store.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C, align(64))]
struct Lanes([f32; LANES]);

const ZERO: Lanes = Lanes([0.0; LANES]);

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
    fn map(self, f: impl Fn(f32) -> f32) -> Self {
        let mut out = ZERO;
        for k in 0..LANES {
            out.0[k] = f(self.0[k]);
        }
        out
    }

    #[inline(always)]
    fn zip(self, b: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        let mut out = ZERO;
        for k in 0..LANES {
            out.0[k] = f(self.0[k], b.0[k]);
        }
        out
    }

    #[inline(always)]
    fn zip3(self, b: Self, c: Self, f: impl Fn(f32, f32, f32) -> f32) -> Self {
        let mut out = ZERO;
        for k in 0..LANES {
            out.0[k] = f(self.0[k], b.0[k], c.0[k]);
        }
        out
    }

    /// Σ of the lanes by a fixed tree of halves: deterministic, and shuffles
    /// plus adds in vector code (a running sum would be a serial chain).
    #[inline(always)]
    fn sum(self) -> f32 {
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
struct Lanes64([f64; LANES]);

const ZERO64: Lanes64 = Lanes64([0.0; LANES]);

impl Lanes64 {
    /// `self + v`, `v` widened to f64.
    #[inline(always)]
    fn add_f32(self, v: Lanes) -> Self {
        let mut out = self;
        for k in 0..LANES {
            out.0[k] += f64::from(v.0[k]);
        }
        out
    }
}

/// How the kernels evaluate `a·b + c`: fused (one rounding, and much faster)
/// where the CPU has FMA, else a product then a sum (a fused `mul_add`
/// without hardware support is a slow libm call). The kernels are generic
/// over it and instantiated per instruction set.
trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

struct Fused;
struct Unfused;

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
trait Real:
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
fn exp<M: MulAdd, V: Real>(x: V) -> V {
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
fn softplus_sigmoid<M: MulAdd, V: Real>(x: V) -> (V, V) {
    let t = exp::<M, V>(V::splat(0.0) - x.abs());
    let r = V::splat(1.0) / (V::splat(1.0) + t);
    (x.pos() + log1p_unit::<M, V>(t), x.select_nonneg(r, t * r))
}

/// The sigmoid `1 / (1 + e^{−x})`, without the softplus part.
#[inline(always)]
fn logistic<M: MulAdd, V: Real>(x: V) -> V {
    let t = exp::<M, V>(V::splat(0.0) - x.abs());
    let r = V::splat(1.0) / (V::splat(1.0) + t);
    x.select_nonneg(r, t * r)
}

#[inline(always)]
fn silu<M: MulAdd, V: Real>(z: V) -> V {
    z * logistic::<M, V>(z)
}

// The tests' handles on the functions above, on one value, unfused.
#[cfg(test)]
fn fast_exp(x: f32) -> f32 {
    exp::<Unfused, f32>(x)
}

#[cfg(test)]
fn softplus(x: f32) -> f32 {
    softplus_sigmoid::<Unfused, f32>(x).0
}

#[cfg(test)]
fn sigmoid(x: f32) -> f32 {
    logistic::<Unfused, f32>(x)
}

// ---- The scan ----

/// `(batch, G, N, L)` -> f32 `(batch, G, L, N)`, so that a position's `B_l`, `C_l` are contiguous.
fn transpose_bc<E: Elem>(x: &[E], s: Shape) -> Vec<f32> {
    let (n, l) = (s.dstate, s.len);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(n * l)
        .zip(x.par_chunks(n * l))
        .for_each(|(dst, src)| {
            for ni in 0..n {
                for li in 0..l {
                    dst[li * n + ni] = src[ni * l + li].to_f32();
                }
            }
        });
    out
}

/// One task: channels `d0..d1` (at most [`LANES`], one group) of batch `b`.
#[derive(Clone, Copy)]
struct Task {
    b: usize,
    d0: usize,
    d1: usize,
}

impl Task {
    fn width(&self) -> usize {
        self.d1 - self.d0
    }
}

/// The tasks of a call in memory order of `(batch, D, ·)` rows.
fn tasks(s: Shape) -> Vec<Task> {
    let pg = s.per_group();
    let mut tasks = Vec::new();
    for b in 0..s.batch {
        for g in 0..s.groups {
            for d0 in (g * pg..(g + 1) * pg).step_by(LANES) {
                tasks.push(Task {
                    b,
                    d0,
                    d1: (d0 + LANES).min((g + 1) * pg),
                });
            }
        }
    }
    tasks
}

/// What every task of a call reads.
struct Ctx<'a, E> {
    s: Shape,
    dirs: &'a [DirInputs<'a, E>],
    /// Per direction, `B` and `C` as `(batch, G, L, N)` f32.
    bcs: &'a [(Vec<f32>, Vec<f32>)],
    z: Option<&'a [E]>,
    softplus: bool,
}

/// One chunk's inputs in lane layout, by position from the chunk's first.
struct Prep {
    /// Δ, dΔ/d(delta) (for the backward) and `u`.
    dt: Vec<Lanes>,
    dsp: Vec<Lanes>,
    u: Vec<Lanes>,
    /// The chunk held (scan order), and whether `dsp` is filled.
    held: Option<(usize, bool)>,
}

impl Prep {
    fn new(len: usize) -> Self {
        let k = len.min(CHUNK);
        Self {
            dt: vec![ZERO; k],
            dsp: vec![ZERO; k],
            u: vec![ZERO; k],
            held: None,
        }
    }
}

/// `delta + bias` and `u` of a chunk as f32 rows `(LANES, CHUNK)`: converted
/// by contiguous loops, then gathered into lanes. Rows are padded by a cache
/// line: 4 KiB apart, the sixteen loads of a gather would all fall in one
/// cache set.
struct Rows {
    x: Box<[[f32; ROW]; LANES]>,
    u: Box<[[f32; ROW]; LANES]>,
}

impl Rows {
    fn new() -> Self {
        // Through a Vec: no 66 KB temporary on the stack.
        let rows = || -> Box<[[f32; ROW]; LANES]> {
            vec![[0.0; ROW]; LANES]
                .into_boxed_slice()
                .try_into()
                .expect("LANES rows")
        };
        Self {
            x: rows(),
            u: rows(),
        }
    }
}

/// A [`Rows`] row: a chunk plus a cache line.
const ROW: usize = CHUNK + 16;

/// A segment's slices of a [`Prep`].
#[derive(Clone, Copy)]
struct Seg<'a> {
    dt: &'a [Lanes],
    dsp: &'a [Lanes],
    u: &'a [Lanes],
}

/// Scratch of one thread, reused across its tasks.
struct Scratch {
    /// One per direction in the backward (each keeps its last chunk for the
    /// walk), one in the forward.
    preps: Vec<Prep>,
    rows: Rows,
    /// The running state, `N` lane-vectors.
    h: Vec<Lanes>,
    /// Per position: y summed over the directions; in the backward, then
    /// dL/dy of that sum.
    acc: Vec<Lanes>,
    /// One channel's row of `L`.
    row: Vec<f32>,
    // Backward only (empty in the forward):
    /// Per direction: the state before every segment, `(dirs, segments, N)`,
    /// and one segment's states and decays, `(dirs, SEGMENT, N)`.
    ckpt: Vec<Lanes>,
    hs: Vec<Lanes>,
    decay: Vec<Lanes>,
    walk: Walk,
}

/// The backward walk's running sums and staged outputs.
struct Walk {
    /// dL/dh flowing back from the next position.
    carry: Vec<Lanes>,
    /// dA of the block, accumulated in f64: sums run over up to millions of positions.
    da: Vec<Lanes64>,
    /// du and d(delta) of the segment, in lane layout, for the row-layout outputs.
    du: Vec<Lanes>,
    dd: Vec<Lanes>,
    /// One position's per-lane terms of dB and dC, to be summed over the lanes.
    pb: Vec<Lanes>,
    pc: Vec<Lanes>,
}

impl Scratch {
    fn new(s: Shape, ndirs: usize, backward: bool) -> Self {
        let (n, len) = (s.dstate, s.len);
        let bw = |k: usize| if backward { vec![ZERO; k] } else { Vec::new() };
        Self {
            preps: (0..if backward { ndirs } else { 1 })
                .map(|_| Prep::new(len))
                .collect(),
            rows: Rows::new(),
            h: vec![ZERO; n],
            acc: vec![ZERO; len],
            row: vec![0.0; len],
            ckpt: bw(ndirs * len.div_ceil(SEGMENT) * n),
            hs: bw(ndirs * SEGMENT * n),
            decay: bw(ndirs * SEGMENT * n),
            walk: Walk {
                carry: bw(n),
                da: if backward {
                    vec![ZERO64; n]
                } else {
                    Vec::new()
                },
                du: bw(SEGMENT),
                dd: bw(SEGMENT),
                pb: bw(n),
                pc: bw(n),
            },
        }
    }
}

/// One direction over one task's block of channels. Lanes past `width` are
/// padding: zero `u`, `A`, `D`, so their state, output and gradients stay zero.
struct Block<'a, E> {
    /// The block's rows `(width, L)`.
    u: &'a [E],
    delta: &'a [E],
    /// `A[d, n]` as `N` lane-vectors.
    a: Vec<Lanes>,
    d: Lanes,
    bias: Lanes,
    /// The group's `B`, `C` as `(L, N)`.
    bt: &'a [f32],
    ct: &'a [f32],
    width: usize,
    len: usize,
    softplus: bool,
    reverse: bool,
}

impl<'a, E: Elem> Block<'a, E> {
    fn new(cx: &Ctx<'a, E>, k: usize, t: Task) -> Self {
        let (x, s) = (&cx.dirs[k], cx.s);
        let (bt, ct) = (&cx.bcs[k].0, &cx.bcs[k].1);
        let (n, len, width) = (s.dstate, s.len, t.width());
        let rows = (t.b * s.dim + t.d0) * len..(t.b * s.dim + t.d1) * len;
        let slab = (t.b * s.groups + t.d0 / s.per_group()) * len * n;
        let lanes = |v: Option<&[f32]>| {
            let mut out = ZERO;
            if let Some(v) = v {
                out[..width].copy_from_slice(&v[t.d0..t.d1]);
            }
            out
        };
        let mut a = vec![ZERO; n];
        for (k, arow) in x.a[t.d0 * n..t.d1 * n].chunks_exact(n).enumerate() {
            for (an, &v) in a.iter_mut().zip(arow) {
                an[k] = v;
            }
        }
        Self {
            u: &x.u[rows.clone()],
            delta: &x.delta[rows],
            a,
            d: lanes(x.d),
            bias: lanes(x.delta_bias),
            bt: &bt[slab..slab + len * n],
            ct: &ct[slab..slab + len * n],
            width,
            len,
            softplus: cx.softplus,
            reverse: x.reverse,
        }
    }

    fn segments(&self) -> usize {
        self.len.div_ceil(SEGMENT)
    }

    /// The `seg`-th stretch of `size` steps in scan order: its first
    /// position and length.
    #[inline(always)]
    fn stretch(&self, seg: usize, size: usize) -> (usize, usize) {
        let i0 = seg * size;
        let m = size.min(self.len - i0);
        (if self.reverse { self.len - i0 - m } else { i0 }, m)
    }

    /// The `seg`-th segment in scan order: its first position and length.
    #[inline(always)]
    fn segment(&self, seg: usize) -> (usize, usize) {
        self.stretch(seg, SEGMENT)
    }

    /// Offset from the segment's first position of its `j`-th step in scan order.
    #[inline(always)]
    fn step(&self, j: usize, m: usize) -> usize {
        if self.reverse {
            m - 1 - j
        } else {
            j
        }
    }

    /// Segment `seg`'s Δ, dΔ/d(delta) and `u`, preparing its chunk into `p`
    /// unless `p` holds it already (`dsp` only if `with_dsp`).
    #[inline(always)]
    fn prep<'p, M: MulAdd>(
        &self,
        seg: usize,
        p: &'p mut Prep,
        rows: &mut Rows,
        with_dsp: bool,
    ) -> Seg<'p> {
        let c = seg / (CHUNK / SEGMENT);
        let (c0, cm) = self.stretch(c, CHUNK);
        if !matches!(p.held, Some((held, dsp)) if held == c && (dsp || !with_dsp)) {
            self.prep_chunk::<M>(c0, cm, p, rows, with_dsp);
            p.held = Some((c, with_dsp));
        }
        let (l0, m) = self.segment(seg);
        let r = l0 - c0..l0 - c0 + m;
        Seg {
            dt: &p.dt[r.clone()],
            dsp: &p.dsp[r.clone()],
            u: &p.u[r],
        }
    }

    /// Fills `p` for positions `l0..l0 + m`, `m ≤ CHUNK` (`p.dsp` only if `with_dsp`).
    #[inline(always)]
    fn prep_chunk<M: MulAdd>(
        &self,
        l0: usize,
        m: usize,
        p: &mut Prep,
        rows: &mut Rows,
        with_dsp: bool,
    ) {
        let m = m.min(CHUNK); // lets the compiler drop the bounds checks below
        for k in 0..LANES {
            let (xr, ur) = (&mut rows.x[k][..m], &mut rows.u[k][..m]);
            if k >= self.width {
                xr.fill(0.0);
                ur.fill(0.0);
                continue;
            }
            let row = k * self.len + l0;
            let (delta, u) = (&self.delta[row..row + m], &self.u[row..row + m]);
            let bias = self.bias[k];
            for i in 0..m {
                xr[i] = delta[i].to_f32() + bias;
                ur[i] = u[i].to_f32();
            }
        }
        for i in 0..m {
            // An opaque use of `i` keeps the compiler from vectorising this
            // loop across positions (sixteen vectors of positions, then
            // scattered stores): the lanes are what should be vectorised.
            let i = std::hint::black_box(i);
            let (mut x, mut u) = (ZERO, ZERO);
            for k in 0..LANES {
                x[k] = rows.x[k][i];
                u[k] = rows.u[k][i];
            }
            // Padding lanes: Δ = softplus(0), harmless with A = u = 0 there.
            (p.dt[i], p.dsp[i]) = match (self.softplus, with_dsp) {
                (true, true) => softplus_sigmoid::<M, _>(x),
                (true, false) => (softplus_sigmoid::<M, _>(x).0, ZERO),
                (false, _) => (x, Lanes::splat(1.0)),
            };
            p.u[i] = u;
        }
    }

    /// Runs the `m` steps of the segment at positions `l0..l0 + m` from the
    /// state `h` (updated in place), with `p` its inputs. `Y`: adds y
    /// (skip term included) to `acc`. `KEEP`: stores every step's state and
    /// decays into `hs`, `decay` (`(m, N)`, in scan order).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn run<M: MulAdd, const Y: bool, const KEEP: bool>(
        &self,
        l0: usize,
        m: usize,
        p: Seg<'_>,
        h: &mut [Lanes],
        acc: &mut [Lanes],
        hs: &mut [Lanes],
        decay: &mut [Lanes],
    ) {
        let n = self.a.len();
        let (a, h) = (&self.a[..n], &mut h[..n]);
        for j in 0..m {
            let i = self.step(j, m);
            let l = l0 + i;
            let (dt, u) = (p.dt[i], p.u[i]);
            let dtu = dt * u;
            let b = &self.bt[l * n..(l + 1) * n];
            let c = &self.ct[l * n..(l + 1) * n];
            let mut keep = KEEP.then(|| (&mut hs[j * n..][..n], &mut decay[j * n..][..n]));
            // The N recurrences are independent and lane-wise: no reduction.
            let mut y = self.d * u;
            for q in 0..n {
                // Without the sum over q (Y off) the compiler would vectorise
                // across states, scattering to `hs`; an opaque use of `q`
                // keeps the vectors on the lanes (see `prep`).
                let q = if Y { q } else { std::hint::black_box(q) };
                let e = exp::<M, _>(dt * a[q]);
                let hq = e.mul_add::<M>(h[q], dtu * b[q]);
                h[q] = hq;
                if Y {
                    y = hq.mul_add::<M>(Lanes::splat(c[q]), y);
                }
                if let Some((hs, decay)) = keep.as_mut() {
                    (hs[q], decay[q]) = (hq, e);
                }
            }
            if Y {
                acc[l] = acc[l] + y;
            }
        }
    }

    /// The whole scan: adds this direction's y (skip term included) to
    /// `acc`. For the backward, `keep` gets the state before every segment
    /// and the states and decays of the last one, which the backward walks
    /// first and so need not recompute; `p` is left holding the last chunk.
    #[inline(always)]
    fn forward<M: MulAdd>(
        &self,
        acc: &mut [Lanes],
        mut keep: Option<Keep<'_>>,
        h: &mut [Lanes],
        p: &mut Prep,
        rows: &mut Rows,
    ) {
        let n = self.a.len();
        let h = &mut h[..n];
        h.fill(ZERO);
        p.held = None; // another task's
        let last = self.segments() - 1;
        for seg in 0..=last {
            let (l0, m) = self.segment(seg);
            let p = self.prep::<M>(seg, p, rows, keep.is_some());
            let Some(k) = keep.as_mut() else {
                self.run::<M, true, false>(l0, m, p, h, acc, &mut [], &mut []);
                continue;
            };
            k.ckpt[seg * n..(seg + 1) * n].copy_from_slice(h);
            // y only where the backward needs it (for dz).
            match (k.y, seg == last) {
                (true, false) => self.run::<M, true, false>(l0, m, p, h, acc, &mut [], &mut []),
                (false, false) => self.run::<M, false, false>(l0, m, p, h, acc, &mut [], &mut []),
                (true, true) => self.run::<M, true, true>(l0, m, p, h, acc, k.hs, k.decay),
                (false, true) => self.run::<M, false, true>(l0, m, p, h, acc, k.hs, k.decay),
            }
        }
    }

    /// Walks the scan backwards given `ybar = dL/dy` (by position) and
    /// what [`Block::forward`] kept; writes this block's share of the
    /// gradients into `o`.
    #[inline(always)]
    fn backward<M: MulAdd>(
        &self,
        ybar: &[Lanes],
        k: Keep<'_>,
        o: &mut TaskDir<'_, E>,
        w: &mut Walk,
        h: &mut [Lanes],
        p: &mut Prep,
        rows: &mut Rows,
    ) {
        let n = self.a.len();
        let len = self.len;
        let ybar = &ybar[..len];
        let (a, h) = (&self.a[..n], &mut h[..n]);
        let (hs, decay) = (k.hs, k.decay);
        let (carry, da) = (&mut w.carry[..n], &mut w.da[..n]);
        let (pb, pc) = (&mut w.pb[..n], &mut w.pc[..n]);
        carry.fill(ZERO);
        da.fill(ZERO64);
        let (mut dd_sum, mut dbias_sum) = (ZERO64, ZERO64);
        let last = self.segments() - 1;
        for seg in (0..=last).rev() {
            let (l0, m) = self.segment(seg);
            let p = self.prep::<M>(seg, p, rows, true);
            let ck = &k.ckpt[seg * n..(seg + 1) * n];
            if seg != last {
                // Recompute the segment's states and decays from its stored start.
                h.copy_from_slice(ck);
                self.run::<M, false, true>(l0, m, p, h, &mut [], hs, decay);
            }
            for j in (0..m).rev() {
                let i = self.step(j, m);
                let l = l0 + i;
                let (dt, u) = (p.dt[i], p.u[i]);
                let dtu = dt * u;
                let yb = ybar[l];
                let b = &self.bt[l * n..(l + 1) * n];
                let c = &self.ct[l * n..(l + 1) * n];
                let hprev = if j == 0 { ck } else { &hs[(j - 1) * n..j * n] };
                let hj = &hs[j * n..(j + 1) * n];
                let dec = &decay[j * n..(j + 1) * n];
                let db = &mut o.db[l * n..(l + 1) * n];
                let dc = &mut o.dc[l * n..(l + 1) * n];
                let (mut ddt, mut dus) = (ZERO, ZERO);
                for q in 0..n {
                    // dL/dh_l: from y_l, plus what flows back from h_{l+1}.
                    let g = yb.mul_add::<M>(Lanes::splat(c[q]), carry[q]);
                    let gdecay = g * hprev[q] * dec[q]; // dL/d(Δ·A)
                    let gb = g * b[q];
                    ddt = gdecay.mul_add::<M>(a[q], gb.mul_add::<M>(u, ddt));
                    dus = dus + gb;
                    da[q] = da[q].add_f32(gdecay * dt);
                    (pb[q], pc[q]) = (g * dtu, yb * hj[q]);
                    carry[q] = dec[q] * g;
                }
                // dB, dC are shared by the block's channels: lane sums, taken
                // in a loop of their own (inside the loop above the compiler
                // splits them into many narrow pieces). The opaque `q` keeps
                // it from vectorising across states with gathers.
                for q in 0..n {
                    let q = std::hint::black_box(q);
                    (db[q], dc[q]) = (pb[q].sum(), pc[q].sum());
                }
                let dd = ddt * p.dsp[i];
                w.du[i] = dt.mul_add::<M>(dus, self.d * yb);
                w.dd[i] = dd;
                dd_sum = dd_sum.add_f32(yb * u);
                dbias_sum = dbias_sum.add_f32(dd);
            }
            for k in 0..self.width {
                let row = k * len + l0;
                let (du, dd) = (&mut o.du[row..row + m], &mut o.ddelta[row..row + m]);
                for i in 0..m {
                    du[i] = E::from_f32(w.du[i][k]);
                    dd[i] = E::from_f32(w.dd[i][k]);
                }
            }
        }
        for k in 0..self.width {
            for q in 0..n {
                o.da[k * n + q] = da[q].0[k] as f32;
            }
            o.dd[k] = dd_sum.0[k] as f32;
            o.dbias[k] = dbias_sum.0[k] as f32;
        }
    }
}

/// What the forward leaves for the backward, for one direction of a task.
struct Keep<'a> {
    /// The state before every segment: `(segments, N)`.
    ckpt: &'a mut [Lanes],
    /// States and decays of one segment, `(SEGMENT, N)`: the last one from
    /// the forward, then each recomputed in turn.
    hs: &'a mut [Lanes],
    decay: &'a mut [Lanes],
    /// Whether the forward must still add y (needed for dz only).
    y: bool,
}

impl<'a> Keep<'a> {
    /// One per direction, from the scratch's buffers.
    fn per_dir(
        ckpt: &'a mut [Lanes],
        hs: &'a mut [Lanes],
        decay: &'a mut [Lanes],
        ckpt_len: usize,
        seg_len: usize,
        y: bool,
    ) -> Vec<Self> {
        ckpt.chunks_exact_mut(ckpt_len)
            .zip(hs.chunks_exact_mut(seg_len))
            .zip(decay.chunks_exact_mut(seg_len))
            .map(|((ckpt, hs), decay)| Keep { ckpt, hs, decay, y })
            .collect()
    }
}

/// The instruction set the task kernels run with, detected once per call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Isa {
    Baseline,
    Avx2,
    Avx512,
}

impl Isa {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2 && is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if avx2 {
                return Self::Avx2;
            }
        }
        Self::Baseline
    }

    /// The ones this CPU can run (the tests compare them).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut out = vec![Self::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                out.push(Self::Avx2);
                if is_x86_feature_detected!("avx512f") {
                    out.push(Self::Avx512);
                }
            }
        }
        out
    }
}

/// The forward of one task: its rows of `y`.
#[inline(always)]
fn forward_task<E: Elem, M: MulAdd>(cx: &Ctx<'_, E>, t: Task, y: &mut [E], s: &mut Scratch) {
    let len = cx.s.len;
    let acc = &mut s.acc[..len];
    acc.fill(ZERO);
    for k in 0..cx.dirs.len() {
        Block::new(cx, k, t).forward::<M>(acc, None, &mut s.h, &mut s.preps[0], &mut s.rows);
    }
    for k in 0..t.width() {
        let row = &mut s.row[..len];
        for (r, v) in row.iter_mut().zip(acc.iter()) {
            *r = v[k];
        }
        let y = &mut y[k * len..(k + 1) * len];
        match cx.z {
            Some(z) => {
                let zrow = &z[(t.b * cx.s.dim + t.d0 + k) * len..][..len];
                for l in 0..len {
                    y[l] = E::from_f32(row[l] * silu::<M, f32>(zrow[l].to_f32()));
                }
            }
            None => {
                for l in 0..len {
                    y[l] = E::from_f32(row[l]);
                }
            }
        }
    }
}

/// The backward of one task: its share of every direction's gradients, and
/// its rows of `dz`.
#[inline(always)]
fn backward_task<E: Elem, M: MulAdd>(
    cx: &Ctx<'_, E>,
    t: Task,
    dy: &[E],
    outs: &mut [TaskDir<'_, E>],
    mut dz: Option<&mut [E]>,
    s: &mut Scratch,
) {
    let (len, n) = (cx.s.len, cx.s.dstate);
    let Scratch {
        preps,
        rows,
        h,
        acc,
        row,
        ckpt,
        hs,
        decay,
        walk,
    } = s;
    let blocks: Vec<Block<'_, E>> = (0..cx.dirs.len()).map(|k| Block::new(cx, k, t)).collect();
    let (ckpt_len, y) = (len.div_ceil(SEGMENT) * n, cx.z.is_some());
    let acc = &mut acc[..len];
    acc.fill(ZERO);
    let keeps = Keep::per_dir(ckpt, hs, decay, ckpt_len, SEGMENT * n, y);
    for ((bl, keep), p) in blocks.iter().zip(keeps).zip(preps.iter_mut()) {
        bl.forward::<M>(acc, Some(keep), h, p, rows);
    }
    // dL/dy of the ungated sum (and dz from that sum), lane by lane in place
    // of that sum; computed over contiguous positions.
    for k in 0..LANES {
        let r = &mut row[..len];
        let rowi = (t.b * cx.s.dim + t.d0 + k) * len;
        match cx.z {
            _ if k >= t.width() => r.fill(0.0),
            Some(z) => {
                for (r, v) in r.iter_mut().zip(acc.iter()) {
                    *r = v[k];
                }
                let (zrow, dyrow) = (&z[rowi..rowi + len], &dy[rowi..rowi + len]);
                let dz = &mut dz.as_deref_mut().expect("dz given with z")[k * len..(k + 1) * len];
                for l in 0..len {
                    let (zl, g, ysum) = (zrow[l].to_f32(), dyrow[l].to_f32(), r[l]);
                    let sg = logistic::<M, f32>(zl);
                    r[l] = g * zl * sg;
                    dz[l] = E::from_f32(g * ysum * sg * (1.0 + zl * (1.0 - sg)));
                }
            }
            None => {
                for (r, g) in r.iter_mut().zip(&dy[rowi..rowi + len]) {
                    *r = g.to_f32();
                }
            }
        }
        for (v, &r) in acc.iter_mut().zip(r.iter()) {
            v[k] = r;
        }
    }
    let keeps = Keep::per_dir(ckpt, hs, decay, ckpt_len, SEGMENT * n, y);
    let dirs = blocks
        .iter()
        .zip(keeps)
        .zip(outs.iter_mut())
        .zip(preps.iter_mut());
    for (((bl, keep), out), p) in dirs {
        bl.backward::<M>(acc, keep, out, walk, h, p, rows);
    }
}

// The task kernels once per instruction set: the same code, inlined into a
// function compiled with wider registers (AVX-512: 16 lanes per register) and
// fused multiply-adds where the CPU has them (so the last bits of the results
// depend on the instruction set, never on the thread count).

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn forward_task_avx512<E: Elem>(cx: &Ctx<'_, E>, t: Task, y: &mut [E], s: &mut Scratch) {
    forward_task::<E, Fused>(cx, t, y, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_task_avx2<E: Elem>(cx: &Ctx<'_, E>, t: Task, y: &mut [E], s: &mut Scratch) {
    forward_task::<E, Fused>(cx, t, y, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn backward_task_avx512<E: Elem>(
    cx: &Ctx<'_, E>,
    t: Task,
    dy: &[E],
    outs: &mut [TaskDir<'_, E>],
    dz: Option<&mut [E]>,
    s: &mut Scratch,
) {
    backward_task::<E, Fused>(cx, t, dy, outs, dz, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_task_avx2<E: Elem>(
    cx: &Ctx<'_, E>,
    t: Task,
    dy: &[E],
    outs: &mut [TaskDir<'_, E>],
    dz: Option<&mut [E]>,
    s: &mut Scratch,
) {
    backward_task::<E, Fused>(cx, t, dy, outs, dz, s)
}

impl Isa {
    fn forward_task<E: Elem>(self, cx: &Ctx<'_, E>, t: Task, y: &mut [E], s: &mut Scratch) {
        match self {
            // SAFETY: only `detect` (or the tests' `available`) makes an
            // `Isa` other than `Baseline`, having seen the CPU support it.
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => unsafe { forward_task_avx512(cx, t, y, s) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { forward_task_avx2(cx, t, y, s) },
            _ => forward_task::<E, Unfused>(cx, t, y, s),
        }
    }

    fn backward_task<E: Elem>(
        self,
        cx: &Ctx<'_, E>,
        t: Task,
        dy: &[E],
        outs: &mut [TaskDir<'_, E>],
        dz: Option<&mut [E]>,
        s: &mut Scratch,
    ) {
        match self {
            // SAFETY: only `detect` (or the tests' `available`) makes an
            // `Isa` other than `Baseline`, having seen the CPU support it.
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => unsafe { backward_task_avx512(cx, t, dy, outs, dz, s) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { backward_task_avx2(cx, t, dy, outs, dz, s) },
            _ => backward_task::<E, Unfused>(cx, t, dy, outs, dz, s),
        }
    }
}

/// Per direction, `B` and `C` transposed to `(batch, G, L, N)` f32.
fn transposed_bcs<E: Elem>(s: Shape, dirs: &[DirInputs<'_, E>]) -> Vec<(Vec<f32>, Vec<f32>)> {
    dirs.iter()
        .map(|x| (transpose_bc(x.b, s), transpose_bc(x.c, s)))
        .collect()
}

/// Forward: `y` `(batch, D, L)` = Σ_dirs scan(dir), gated by `silu(z)` if given.
pub fn forward<E: Elem>(
    s: Shape,
    dirs: &[DirInputs<'_, E>],
    z: Option<&[E]>,
    y: &mut [E],
    delta_softplus: bool,
) {
    forward_with(Isa::detect(), s, dirs, z, y, delta_softplus)
}

fn forward_with<E: Elem>(
    isa: Isa,
    s: Shape,
    dirs: &[DirInputs<'_, E>],
    z: Option<&[E]>,
    y: &mut [E],
    delta_softplus: bool,
) {
    let bcs = transposed_bcs(s, dirs);
    let cx = Ctx {
        s,
        dirs,
        bcs: &bcs,
        z,
        softplus: delta_softplus,
    };
    let tasks = tasks(s);
    let ys = split_mut(y, tasks.iter().map(|t| t.width() * s.len));
    tasks
        .par_iter()
        .zip(ys)
        .with_min_len(min_len(tasks.len()))
        .for_each_init(
            || Scratch::new(s, dirs.len(), false),
            |scratch, (&t, y)| isa.forward_task(&cx, t, y, scratch),
        );
}

/// Tasks per rayon job: few enough jobs that the scratch (allocated per job)
/// is not rebuilt for every few tasks, enough for the threads to balance.
fn min_len(tasks: usize) -> usize {
    tasks.div_ceil(4 * rayon::current_num_threads()).max(1)
}

/// Splits `s` into consecutive pieces of the given lengths.
fn split_mut<T>(mut s: &mut [T], lens: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    let mut out = Vec::new();
    for n in lens {
        let (head, tail) = s.split_at_mut(n);
        out.push(head);
        s = tail;
    }
    out
}

/// Backward: writes every gradient of every direction (and `dz` when `z` is given).
pub fn backward<E: Elem>(
    s: Shape,
    dirs: &[DirInputs<'_, E>],
    z: Option<&[E]>,
    dy: &[E],
    grads: &mut [DirGrads<'_, E>],
    dz: Option<&mut [E]>,
    delta_softplus: bool,
) {
    backward_with(Isa::detect(), s, dirs, z, dy, grads, dz, delta_softplus)
}

#[allow(clippy::too_many_arguments)]
fn backward_with<E: Elem>(
    isa: Isa,
    s: Shape,
    dirs: &[DirInputs<'_, E>],
    z: Option<&[E]>,
    dy: &[E],
    grads: &mut [DirGrads<'_, E>],
    dz: Option<&mut [E]>,
    delta_softplus: bool,
) {
    let (n, len) = (s.dstate, s.len);
    let tasks = tasks(s);
    let chunks = s.per_group().div_ceil(LANES);
    let bcs = transposed_bcs(s, dirs);
    let cx = Ctx {
        s,
        dirs,
        bcs: &bcs,
        z,
        softplus: delta_softplus,
    };
    let ndirs = dirs.len();
    // Per-task partial sums, in task order: (batch, D, N) for dA, (batch, D)
    // for dD and delta_bias, (batch, G, chunks, L, N) for dB and dC.
    let mut part_a = vec![0f32; ndirs * s.batch * s.dim * n];
    let mut part_d = vec![0f32; ndirs * s.batch * s.dim];
    let mut part_bias = vec![0f32; ndirs * s.batch * s.dim];
    let slab = len * n;
    let mut part_b = vec![0f32; ndirs * tasks.len() * slab];
    let mut part_c = vec![0f32; ndirs * tasks.len() * slab];

    // Carve every output into per-task pieces (tasks cover memory in order).
    let widths: Vec<usize> = tasks.iter().map(Task::width).collect();
    let mut per_task: Vec<Vec<TaskDir<'_, E>>> = tasks.iter().map(|_| Vec::new()).collect();
    {
        let mut pa = part_a.chunks_mut(s.batch * s.dim * n);
        let mut pd = part_d.chunks_mut(s.batch * s.dim);
        let mut pbias = part_bias.chunks_mut(s.batch * s.dim);
        let mut pb = part_b.chunks_mut(tasks.len() * slab);
        let mut pc = part_c.chunks_mut(tasks.len() * slab);
        for gr in grads.iter_mut() {
            let du = split_mut(&mut gr.du[..], widths.iter().map(|w| w * len));
            let ddelta = split_mut(&mut gr.ddelta[..], widths.iter().map(|w| w * len));
            let da = split_mut(pa.next().unwrap(), widths.iter().map(|w| w * n));
            let dd = split_mut(pd.next().unwrap(), widths.iter().copied());
            let dbias = split_mut(pbias.next().unwrap(), widths.iter().copied());
            let db = split_mut(pb.next().unwrap(), widths.iter().map(|_| slab));
            let dc = split_mut(pc.next().unwrap(), widths.iter().map(|_| slab));
            let pieces = du
                .into_iter()
                .zip(ddelta)
                .zip(da)
                .zip(dd)
                .zip(dbias)
                .zip(db)
                .zip(dc);
            for (t, ((((((du, ddelta), da), dd), dbias), db), dc)) in pieces.enumerate() {
                per_task[t].push(TaskDir {
                    du,
                    ddelta,
                    da,
                    dd,
                    dbias,
                    db,
                    dc,
                });
            }
        }
    }
    let dz_pieces: Vec<Option<&mut [E]>> = match dz {
        Some(dz) => split_mut(dz, widths.iter().map(|w| w * len))
            .into_iter()
            .map(Some)
            .collect(),
        None => tasks.iter().map(|_| None).collect(),
    };

    tasks
        .par_iter()
        .zip(per_task.par_iter_mut())
        .zip(dz_pieces)
        .with_min_len(min_len(tasks.len()))
        .for_each_init(
            || Scratch::new(s, ndirs, true),
            |scratch, ((&t, outs), dz)| isa.backward_task(&cx, t, dy, outs, dz, scratch),
        );
    drop(per_task);

    // Fixed-order reductions into the outputs.
    for (k, gr) in grads.iter_mut().enumerate() {
        let pa = &part_a[k * s.batch * s.dim * n..(k + 1) * s.batch * s.dim * n];
        for (i, v) in gr.da.iter_mut().enumerate() {
            *v = (0..s.batch).map(|b| pa[b * s.dim * n + i]).sum();
        }
        let sum_batch = |part: &[f32], out: &mut [f32]| {
            let part = &part[k * s.batch * s.dim..(k + 1) * s.batch * s.dim];
            for (d, v) in out.iter_mut().enumerate() {
                *v = (0..s.batch).map(|b| part[b * s.dim + d]).sum();
            }
        };
        if let Some(dd) = gr.dd.as_deref_mut() {
            sum_batch(&part_d, dd);
        }
        if let Some(dbias) = gr.ddelta_bias.as_deref_mut() {
            sum_batch(&part_bias, dbias);
        }
        let ntasks = tasks.len();
        for (part, out) in [(&part_b, &mut *gr.db), (&part_c, &mut *gr.dc)] {
            let part = &part[k * ntasks * slab..(k + 1) * ntasks * slab];
            // out (batch, G, N, L); part (batch, G, chunks, L, N).
            out.par_chunks_mut(n * len)
                .enumerate()
                .for_each(|(bg, out)| {
                    let first = bg * chunks;
                    for c in 0..chunks {
                        let src = &part[(first + c) * slab..(first + c + 1) * slab];
                        for l in 0..len {
                            for j in 0..n {
                                if c == 0 {
                                    out[j * len + l] = src[l * n + j];
                                } else {
                                    out[j * len + l] += src[l * n + j];
                                }
                            }
                        }
                    }
                });
        }
    }
}

/// A task's slices of one direction's outputs and partial sums.
struct TaskDir<'a, E> {
    du: &'a mut [E],
    ddelta: &'a mut [E],
    da: &'a mut [f32],
    dd: &'a mut [f32],
    dbias: &'a mut [f32],
    /// `(L, N)`: this task's share of dB and dC.
    db: &'a mut [f32],
    dc: &'a mut [f32],
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

/// The instruction sets against each other and the thread count (the
/// integration tests check values against an f64 reference, on the best one).
#[cfg(test)]
mod isa_tests {
    use super::*;

    /// A deterministic pseudo-random stream (no rand dependency).
    struct Lcg(u64);

    impl Lcg {
        /// Uniform in [-1, 1).
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        }

        fn vec(&mut self, n: usize, scale: f32, shift: f32) -> Vec<f32> {
            (0..n).map(|_| self.next() * scale + shift).collect()
        }
    }

    /// Two directions' inputs, `z`, `dy` for a shape.
    struct Problem {
        s: Shape,
        t: Vec<Vec<f32>>,
        z: Vec<f32>,
        dy: Vec<f32>,
    }

    impl Problem {
        fn new(s: Shape, seed: u64) -> Self {
            let mut r = Lcg(seed);
            let (bdl, bgnl) = (
                s.batch * s.dim * s.len,
                s.batch * s.groups * s.dstate * s.len,
            );
            let mut t = Vec::new();
            for _ in 0..2 {
                t.push(r.vec(bdl, 1.0, 0.0)); // u
                t.push(r.vec(bdl, 1.0, -0.5)); // delta
                t.push(r.vec(s.dim * s.dstate, 0.4, -0.7)); // A
                t.push(r.vec(bgnl, 1.0, 0.0)); // B
                t.push(r.vec(bgnl, 1.0, 0.0)); // C
                t.push(r.vec(s.dim, 1.0, 0.0)); // D
                t.push(r.vec(s.dim, 0.2, 0.0)); // delta_bias
            }
            Self {
                s,
                t,
                z: r.vec(bdl, 2.0, 0.0),
                dy: r.vec(bdl, 1.0, 0.0),
            }
        }

        fn dirs(&self) -> Vec<DirInputs<'_, f32>> {
            (0..2)
                .map(|k| {
                    let t = &self.t[7 * k..7 * k + 7];
                    DirInputs {
                        u: &t[0],
                        delta: &t[1],
                        a: &t[2],
                        b: &t[3],
                        c: &t[4],
                        d: Some(&t[5]),
                        delta_bias: Some(&t[6]),
                        reverse: k == 1,
                    }
                })
                .collect()
        }

        /// y, then every gradient of both directions and dz, flattened.
        fn run(&self, isa: Isa) -> (Vec<f32>, Vec<f32>) {
            let (s, dirs) = (self.s, self.dirs());
            let (bdl, bgnl) = (
                s.batch * s.dim * s.len,
                s.batch * s.groups * s.dstate * s.len,
            );
            let mut y = vec![0f32; bdl];
            forward_with(isa, s, &dirs, Some(&self.z), &mut y, true);
            let mut bufs: Vec<Vec<f32>> = [bdl, bdl, s.dim * s.dstate, bgnl, bgnl, s.dim, s.dim]
                .iter()
                .cycle()
                .take(14)
                .map(|&n| vec![f32::NAN; n])
                .collect();
            let mut dz = vec![f32::NAN; bdl];
            {
                let mut it = bufs.iter_mut();
                let mut grads: Vec<DirGrads<'_, f32>> = (0..2)
                    .map(|_| DirGrads {
                        du: it.next().unwrap(),
                        ddelta: it.next().unwrap(),
                        da: it.next().unwrap(),
                        db: it.next().unwrap(),
                        dc: it.next().unwrap(),
                        dd: Some(it.next().unwrap()),
                        ddelta_bias: Some(it.next().unwrap()),
                    })
                    .collect();
                let z = Some(&self.z[..]);
                backward_with(isa, s, &dirs, z, &self.dy, &mut grads, Some(&mut dz), true);
            }
            bufs.push(dz);
            (y, bufs.concat())
        }
    }

    fn shape() -> Shape {
        // 10 channels per group (a padded block), three segments and a bit.
        Shape {
            batch: 2,
            dim: 20,
            len: 3 * SEGMENT + 37,
            dstate: 5,
            groups: 2,
        }
    }

    #[test]
    fn instruction_sets_agree() {
        let p = Problem::new(shape(), 7);
        let (y0, g0) = p.run(Isa::Baseline);
        assert!(g0.iter().all(|v| v.is_finite()), "every gradient written");
        for isa in Isa::available() {
            let (y, g) = p.run(isa);
            for (name, got, want) in [("y", &y, &y0), ("grads", &g, &g0)] {
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let worst = got
                    .iter()
                    .zip(want.iter())
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    worst <= 1e-5 * scale,
                    "{isa:?} {name}: {worst:e} of {scale:e}"
                );
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let p = Problem::new(shape(), 11);
        let isa = Isa::detect();
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| p.run(isa))
        };
        let one = on(1);
        for threads in [2, 3] {
            let (y, g) = on(threads);
            assert!(y == one.0 && g == one.1, "{threads} threads differ from 1");
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

//! The CPU scan's vocabulary: element types and the sizes, inputs and
//! gradients of a call. The lowest layer: it uses no other part of `cpu`.

use half::{bf16, f16};

/// An element type of `u`, `delta`, `z`, `B`, `C` and `y`; math is in f32.
pub trait Elem: Copy + Send + Sync + 'static {
    /// Widened to f32 (exact).
    fn to_f32(self) -> f32;
    /// Rounded to nearest from f32.
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

/// The half types, through their own (inherent) f32 conversions.
macro_rules! half_elem {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            #[inline(always)]
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                <$t>::from_f32(v)
            }
        }
    )*};
}

half_elem!(bf16, f16);

/// Sizes of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub batch: usize,
    /// Channels `D`.
    pub dim: usize,
    /// Positions `L`.
    pub len: usize,
    /// State size `N`.
    pub dstate: usize,
    /// Groups `G` of `B` and `C` (dividing `D`).
    pub groups: usize,
}

impl Shape {
    pub(super) fn per_group(&self) -> usize {
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

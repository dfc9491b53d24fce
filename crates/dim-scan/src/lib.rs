//! The Mamba selective scan (S6) as a libtorch autograd op, one direction or
//! fused bidirectional, on CPU and CUDA tensors.
//!
//! For batch `b`, channel `d` (of `D`), state `n` (of `N`) and position `l` (of `L`):
//!
//! ```text
//! Δ_l    = softplus(delta_l + delta_bias[d])          (softplus and bias optional)
//! h_l[n] = exp(Δ_l · A[d,n]) · h_{l-1}[n] + Δ_l · B_l[n] · u_l,   h_{-1} = 0
//! y_l    = Σ_n C_l[n] · h_l[n] + D[d] · u_l,   then optionally y_l ← y_l · silu(z_l)
//! ```
//!
//! The reverse direction runs the same recurrence from `l = L-1` down to `0`
//! on the tensors in their original order. The fused bidirectional form is
//! `y = scan_forward(dir 0) + scan_reverse(dir 1)`, gated once by `silu(z)`,
//! with separate parameters per direction (Vision Mamba's "v2" block), in one
//! call that reads every input once.
//!
//! Shapes: `u`, `delta`, `z`: `(batch, D, L)`; `A`: `(D, N)`; `B`, `C`:
//! `(batch, G, N, L)` where the `G` groups divide `D`; `D`, `delta_bias`: `(D)`.
//! `u`, `delta`, `z`, `B`, `C` are f32, bf16 or f16 (all the same); `A`, `D`
//! and `delta_bias` are used in f32. The state and every accumulation are f32;
//! `y` has the input dtype.
//!
//! How it plugs into autograd: a C++ `torch::autograd::Function`
//! (`csrc/scan_op.cpp`, compiled by `cc` against the venv's libtorch headers)
//! dispatches to the CUDA kernels in `kernels/` on libtorch's current stream,
//! or to the multi-threaded Rust implementation in [`cpu`] for CPU tensors.
//! See `docs/scan.md`.

pub mod cpu;
pub mod device;
mod error;
mod ffi;
mod op;
pub mod profiler;
pub mod reference;
pub mod testing;

pub use error::ScanError;
pub use op::{
    backward_with_grad, cuda_kernels_built, selective_scan, selective_scan_bidirectional,
    CUDA_MAX_DSTATE,
};

use tch::Tensor;

/// One direction's inputs.
///
/// - `u`, `delta`: `(batch, D, L)`
/// - `a`: `(D, N)`, real (usually negative: `A = -exp(A_log)`)
/// - `b`, `c`: `(batch, G, N, L)`, `G` divides `D`
/// - `d`, `delta_bias`: `(D)`, optional
#[derive(Clone, Copy, Debug)]
pub struct ScanInputs<'a> {
    pub u: &'a Tensor,
    pub delta: &'a Tensor,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub c: &'a Tensor,
    pub d: Option<&'a Tensor>,
    pub delta_bias: Option<&'a Tensor>,
}

/// Which way a single-direction scan runs over `L`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Direction {
    /// `l = 0 .. L-1`.
    #[default]
    Forward,
    /// `l = L-1 .. 0`, on tensors in their original order (no flipped copies).
    Reverse,
}

/// Options of the op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanOptions {
    /// Apply `softplus` to `delta + delta_bias` (Mamba's default).
    pub delta_softplus: bool,
    /// Backward without floating-point atomics: bit-identical gradients from
    /// run to run, somewhat slower on CUDA.
    pub deterministic: bool,
}

impl Default for ScanOptions {
    fn default() -> Self {
        Self {
            delta_softplus: true,
            deterministic: false,
        }
    }
}

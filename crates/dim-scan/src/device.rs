//! Small CUDA utilities that tch does not expose, built into the same native
//! shim as the op: peak-memory statistics of libtorch's caching allocator and
//! the toolchain smoke kernel.

use tch::Tensor;

use crate::ScanError;

/// Resets the peak of bytes allocated by libtorch on CUDA device `index`.
pub fn reset_peak_memory(index: usize) -> Result<(), ScanError> {
    crate::ffi::cuda_peak_memory(index, true).map(|_| ())
}

/// Peak bytes allocated by libtorch on CUDA device `index` since the last reset.
pub fn peak_memory_bytes(index: usize) -> Result<u64, ScanError> {
    crate::ffi::cuda_peak_memory(index, false)
}

/// Runs the smoke kernel of `kernels/smoke.cu` on libtorch's current stream:
/// `out[i] = alpha * x[i] + i`. `x`, `out`: contiguous f32 CUDA tensors of
/// the same number of elements.
pub fn smoke_axpy_iota(out: &Tensor, x: &Tensor, alpha: f32) -> Result<(), ScanError> {
    crate::ffi::smoke_axpy_iota(out, x, alpha)
}

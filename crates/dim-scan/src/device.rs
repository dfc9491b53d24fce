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

/// Lets libtorch use TF32 tensor cores for f32 matmuls and convolutions on
/// CUDA (PyTorch's `torch.backends.cuda.matmul.allow_tf32` and
/// `torch.backends.cudnn.allow_tf32`; DiT trains with both on), or forbids
/// it. Process-wide. Returns the matmul setting read back.
pub fn set_allow_tf32(enable: bool) -> Result<bool, ScanError> {
    crate::ffi::set_allow_tf32(enable)
}

/// Runs the smoke kernel of `kernels/smoke.cu` on libtorch's current stream:
/// `out[i] = alpha * x[i] + i`. `x`, `out`: contiguous f32 CUDA tensors of
/// the same number of elements.
pub fn smoke_axpy_iota(out: &Tensor, x: &Tensor, alpha: f32) -> Result<(), ScanError> {
    crate::ffi::smoke_axpy_iota(out, x, alpha)
}

/// A CUDA event recorded on libtorch's current stream, for timing device work.
#[derive(Debug)]
pub struct CudaEvent(*mut std::ffi::c_void);

impl CudaEvent {
    /// Creates an event and records it now.
    pub fn record() -> Result<Self, ScanError> {
        let mut ev = std::ptr::null_mut();
        crate::ffi::cuda_event(0, &mut ev, std::ptr::null_mut())?;
        let mut event = Self(ev);
        crate::ffi::cuda_event(1, &mut event.0, std::ptr::null_mut())?;
        Ok(event)
    }

    /// Milliseconds from `self` to `later`; waits for `later` to complete.
    pub fn elapsed_ms(&mut self, later: &CudaEvent) -> Result<f32, ScanError> {
        crate::ffi::cuda_event(2, &mut self.0, later.0)
    }
}

impl Drop for CudaEvent {
    fn drop(&mut self) {
        let _ = crate::ffi::cuda_event(3, &mut self.0, std::ptr::null_mut());
    }
}

/// Milliseconds that `f` takes on the GPU: events around it, after a synchronize.
pub fn time_cuda_ms(mut f: impl FnMut()) -> Result<f32, ScanError> {
    let mut start = CudaEvent::record()?;
    f();
    let stop = CudaEvent::record()?;
    start.elapsed_ms(&stop)
}

/// The card's rate of `ex2.approx` (the special-function unit's exponential)
/// in operations per second, measured by a probe kernel on `device`.
pub fn exp2_rate(device: tch::Device) -> Result<f64, ScanError> {
    let threads = 132 * 2048 * 4;
    let out = Tensor::zeros([threads], (tch::Kind::Float, device));
    let iters = 2048;
    crate::ffi::probe_exp2(&out, iters)?; // warm-up
    let mut best = f32::INFINITY;
    for _ in 0..5 {
        best = best.min(time_cuda_ms(|| {
            crate::ffi::probe_exp2(&out, iters).expect("probe ran once already")
        })?);
    }
    Ok(threads as f64 * iters as f64 * 8.0 / (best as f64 * 1e-3))
}

/// Device-to-device copy bandwidth in bytes per second (read plus written).
pub fn copy_bandwidth(device: tch::Device) -> Result<f64, ScanError> {
    let n = 256 * 1024 * 1024; // 1 GiB of f32
    let src = Tensor::ones([n], (tch::Kind::Float, device));
    let mut dst = Tensor::empty([n], (tch::Kind::Float, device));
    dst.copy_(&src);
    let mut times: Vec<f32> = (0..10)
        .map(|_| time_cuda_ms(|| dst.copy_(&src)))
        .collect::<Result<_, _>>()?;
    times.sort_by(f32::total_cmp);
    Ok(2.0 * 4.0 * n as f64 / (times[times.len() / 2] as f64 * 1e-3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf32_switch_reads_back() {
        assert!(set_allow_tf32(true).unwrap());
        assert!(!set_allow_tf32(false).unwrap());
    }
}

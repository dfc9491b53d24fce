//! Small CUDA utilities that tch does not expose, built into the same native
//! shim as the op: CUDA autocast (bf16 mixed precision) and TF32 switches,
//! peak-memory statistics of libtorch's caching allocator, CUDA-event timing
//! and the toolchain smoke kernel.

use tch::{Kind, Tensor};

use crate::ffi::{cuda_autocast, AutocastOp};
use crate::ScanError;

/// Runs `f` with libtorch's CUDA autocast switched on (or off), restoring the
/// previous state afterwards, also when `f` panics. Ops on CUDA tensors inside
/// then compute in the dtype of [`set_cuda_autocast_dtype`] where autocast
/// allows it (matmuls, convolutions), f32 elsewhere. Replaces `tch::autocast`,
/// whose libtorch calls are deprecated and warn on every use. The state is
/// per thread; CPU tensors are not affected.
pub fn autocast<T>(enabled: bool, f: impl FnOnce() -> T) -> Result<T, ScanError> {
    /// Leaves the nesting level on drop.
    struct Level(bool);
    impl Drop for Level {
        fn drop(&mut self) {
            // Exit only resets libtorch's thread-local flags; it has no failure to report here.
            let _ = cuda_autocast(AutocastOp::Exit, i32::from(self.0));
        }
    }
    let before = cuda_autocast(AutocastOp::Enter, i32::from(enabled))? != 0;
    let _level = Level(before);
    Ok(f())
}

/// Whether CUDA autocast is on in this thread.
pub fn cuda_autocast_enabled() -> Result<bool, ScanError> {
    Ok(cuda_autocast(AutocastOp::Enabled, 0)? != 0)
}

// `c10::ScalarType` codes.
const SCALAR_HALF: i32 = 5;
const SCALAR_FLOAT: i32 = 6;
const SCALAR_BFLOAT16: i32 = 15;
const AUTOCAST_KINDS: [(Kind, i32); 3] = [
    (Kind::Half, SCALAR_HALF),
    (Kind::Float, SCALAR_FLOAT),
    (Kind::BFloat16, SCALAR_BFLOAT16),
];

/// Sets the dtype CUDA autocast computes in (`BFloat16`, `Half` or `Float`;
/// libtorch's default is `Half`) for this thread, and checks it by reading
/// it back.
pub fn set_cuda_autocast_dtype(kind: Kind) -> Result<(), ScanError> {
    let want = AUTOCAST_KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, code)| *code)
        .ok_or(ScanError::AutocastDtype(kind))?;
    let got = cuda_autocast(AutocastOp::SetDtype, want)?;
    if got != want {
        return Err(ScanError::Native(format!(
            "libtorch kept CUDA autocast dtype code {got} after setting {kind:?}"
        )));
    }
    Ok(())
}

/// The dtype CUDA autocast computes in (`None` for one other than `BFloat16`, `Half`, `Float`).
pub fn cuda_autocast_dtype() -> Result<Option<Kind>, ScanError> {
    let got = cuda_autocast(AutocastOp::Dtype, 0)?;
    Ok(AUTOCAST_KINDS
        .iter()
        .find(|(_, code)| *code == got)
        .map(|(k, _)| *k))
}

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

    /// libtorch keeps the autocast state even without a GPU, so these run on the CPU.
    #[test]
    fn autocast_dtype_round_trips() {
        set_cuda_autocast_dtype(Kind::BFloat16).unwrap();
        assert_eq!(cuda_autocast_dtype().unwrap(), Some(Kind::BFloat16));
        set_cuda_autocast_dtype(Kind::Half).unwrap();
        assert_eq!(cuda_autocast_dtype().unwrap(), Some(Kind::Half));
        let err = set_cuda_autocast_dtype(Kind::Int64).unwrap_err();
        assert!(err.to_string().contains("Int64"), "{err}");
        assert_eq!(cuda_autocast_dtype().unwrap(), Some(Kind::Half));
    }

    #[test]
    fn autocast_nests_and_restores() {
        assert!(!cuda_autocast_enabled().unwrap());
        let inner = autocast(true, || {
            let on = cuda_autocast_enabled().unwrap();
            let off = autocast(false, || cuda_autocast_enabled().unwrap()).unwrap();
            (on, off, cuda_autocast_enabled().unwrap())
        })
        .unwrap();
        assert_eq!(inner, (true, false, true));
        assert!(!cuda_autocast_enabled().unwrap());
        // A panic inside still leaves autocast as it was.
        let caught = std::panic::catch_unwind(|| autocast(true, || panic!("inside")));
        assert!(caught.is_err());
        assert!(!cuda_autocast_enabled().unwrap());
    }

    #[test]
    fn tf32_switch_reads_back() {
        assert!(set_allow_tf32(true).unwrap());
        assert!(!set_allow_tf32(false).unwrap());
    }
}

//! libtorch's Kineto profiler, as `torch.profiler` drives it from Python:
//! [`Profiler::start`] records the host's operators and (with CUDA) every
//! kernel, copy and collective on every stream; [`Profiler::finish`] writes a
//! Chrome trace (open in Perfetto or chrome://tracing; `scripts/trace_summary.py`
//! sums it per stream).

use std::ffi::{c_char, c_int, CString};
use std::path::Path;

use crate::ffi::checked;
use crate::ScanError;

extern "C" {
    fn dim_profiler_start(host: c_int, cuda: c_int, err: *mut c_char, errlen: usize) -> c_int;
    fn dim_profiler_stop(path: *const c_char, err: *mut c_char, errlen: usize) -> c_int;
}

/// A running profile of this thread (and the autograd threads it starts).
/// One at a time per thread; dropping it without [`Profiler::finish`] stops
/// it and discards the record.
#[derive(Debug)]
pub struct Profiler {
    running: bool,
}

impl Profiler {
    /// Starts recording: `host`, the host's operators (recording them slows
    /// the host, so a host-bound program looks more host-bound); `cuda`, the
    /// GPU's kernels, copies and collectives (CUPTI). At least one.
    pub fn start(host: bool, cuda: bool) -> Result<Self, ScanError> {
        // SAFETY: plain call; the error buffer is owned by `checked`.
        checked(|e, l| unsafe { dim_profiler_start(c_int::from(host), c_int::from(cuda), e, l) })?;
        Ok(Self { running: true })
    }

    /// Stops recording and writes the Chrome trace to `path`.
    pub fn finish(mut self, path: &Path) -> Result<(), ScanError> {
        self.running = false;
        let p = CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| ScanError::Native(format!("{}: a NUL in the path", path.display())))?;
        // SAFETY: `p` outlives the call.
        checked(|e, l| unsafe { dim_profiler_stop(p.as_ptr(), e, l) })
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        if self.running {
            // Discard: write to /dev/null; a failure here has nowhere to go.
            let p = CString::new("/dev/null").expect("no NUL");
            // SAFETY: `p` outlives the call.
            let _ = checked(|e, l| unsafe { dim_profiler_stop(p.as_ptr(), e, l) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    /// The trace names the operators that ran while recording and none of
    /// those that ran after.
    #[test]
    fn cpu_trace_names_recorded_ops() {
        let dir = std::env::temp_dir().join(format!("dim-prof-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("trace.json");
        let x = Tensor::randn([64, 64], (Kind::Float, tch::Device::Cpu));
        assert!(Profiler::start(false, false).is_err());
        let p = Profiler::start(true, false).unwrap();
        let _ = x.matmul(&x);
        p.finish(&path).unwrap();
        let _ = x.cumsum(0, Kind::Float);
        let trace = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&trace).unwrap();
        let names: Vec<&str> = v["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["name"].as_str())
            .collect();
        assert!(names.contains(&"aten::matmul"), "{names:?}");
        assert!(!names.contains(&"aten::cumsum"), "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The boundary between libtorch failures and the user: a panic raised by a
//! tch op (most often out of memory) becomes an error, and an out-of-memory
//! error names the knobs that shrink the run. Checkpoints are written
//! atomically, so the newest one on disk is intact whatever the failure.

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;

use anyhow::{anyhow, Result};

/// Whether a libtorch message reports an allocation failure (CUDA or CPU).
pub fn is_out_of_memory(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("out of memory")
        || m.contains("can't allocate memory")
        || m.contains("cannot allocate memory")
}

/// What to change when training runs out of memory.
pub const OOM_HINT: &str = "out of memory: lower train.batch_size (raise train.grad_accum to keep the effective batch), use train.precision = \"bf16\" on a GPU, or pick a smaller model (model.preset / width / depth; activation checkpointing is not available). The newest checkpoint in train.out_dir is intact: continue with --resume auto";

/// Runs `what` (e.g. a training run); a panic inside becomes an error
/// carrying its message, and an out-of-memory failure (panic or error)
/// gets [`OOM_HINT`]. The panic hook is silenced for this thread meanwhile
/// so the user sees one clear error instead of a backtrace (other threads'
/// panics are still reported).
pub fn libtorch_boundary<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    type Hook = dyn Fn(&panic::PanicHookInfo<'_>) + Send + Sync;
    let prev: Arc<Hook> = Arc::from(panic::take_hook());
    let me = std::thread::current().id();
    let others = prev.clone();
    panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() != me {
            others(info)
        }
    }));
    let out = panic::catch_unwind(AssertUnwindSafe(f));
    panic::set_hook(Box::new(move |info| prev(info)));
    let err = match out {
        Ok(Ok(v)) => return Ok(v),
        Ok(Err(e)) => e,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            // libtorch's messages carry a long C++ backtrace: keep the first lines.
            let short: Vec<&str> = msg.lines().take(3).collect();
            anyhow!("{what} failed inside libtorch: {}", short.join(" "))
        }
    };
    if is_out_of_memory(&format!("{err:#}")) {
        Err(err.context(format!("{what}: {OOM_HINT}")))
    } else {
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absurd_allocation_becomes_an_error_naming_the_knobs() {
        let e = libtorch_boundary("training", || {
            // 2^40 floats: far beyond any machine's memory; the panicking op is the point.
            let t = tch::Tensor::zeros([1 << 20, 1 << 20], (tch::Kind::Float, tch::Device::Cpu));
            Ok(t.numel())
        })
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("train.batch_size") && msg.contains("precision"),
            "{msg}"
        );
        assert!(msg.contains("--resume auto"), "{msg}");
    }

    #[test]
    fn other_panics_and_errors_pass_through_as_errors() {
        let e = libtorch_boundary("x", || -> Result<()> { panic!("boom") }).unwrap_err();
        assert!(format!("{e:#}").contains("boom"), "{e:#}");
        let e = libtorch_boundary("x", || -> Result<()> { Err(anyhow!("plain")) }).unwrap_err();
        assert_eq!(format!("{e:#}"), "plain");
        assert_eq!(libtorch_boundary("x", || Ok(3)).unwrap(), 3);
    }
}

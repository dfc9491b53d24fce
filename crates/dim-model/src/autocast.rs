//! The dtype of CUDA autocast. `tch::autocast` switches libtorch's autocast
//! on, but libtorch's CUDA autocast dtype defaults to f16 and tch does not
//! expose the setter; training here uses bf16. These call libtorch's exported
//! C++ functions `at::autocast::{set,get}_autocast_dtype` directly.

use tch::Kind;

use crate::error::{ModelError, Result};

// `c10::DeviceType` and `c10::ScalarType` are `int8_t` enums.
const DEVICE_CUDA: i8 = 1;
const SCALAR_HALF: i8 = 5;
const SCALAR_FLOAT: i8 = 6;
const SCALAR_BFLOAT16: i8 = 15;

extern "C" {
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn at_set_autocast_dtype(device_type: i8, dtype: i8);
    #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
    fn at_get_autocast_dtype(device_type: i8) -> i8;
}

fn code(kind: Kind) -> Option<i8> {
    match kind {
        Kind::Half => Some(SCALAR_HALF),
        Kind::Float => Some(SCALAR_FLOAT),
        Kind::BFloat16 => Some(SCALAR_BFLOAT16),
        _ => None,
    }
}

/// Sets the dtype CUDA autocast computes in (`BFloat16`, `Half` or `Float`)
/// for this thread, then reads it back to check.
pub fn set_cuda_autocast_dtype(kind: Kind) -> Result<()> {
    let want = code(kind).ok_or_else(|| {
        ModelError::config(format!(
            "autocast dtype {kind:?}: expected BFloat16, Half or Float"
        ))
    })?;
    // SAFETY: plain setter and getter of libtorch's autocast state, taking
    // and returning `int8_t` enums; no pointers cross.
    let got = unsafe {
        at_set_autocast_dtype(DEVICE_CUDA, want);
        at_get_autocast_dtype(DEVICE_CUDA)
    };
    if got != want {
        return Err(ModelError::config(format!(
            "libtorch kept CUDA autocast dtype code {got} after setting {kind:?}"
        )));
    }
    Ok(())
}

/// The dtype CUDA autocast computes in (`None` for a code this crate does not name).
pub fn cuda_autocast_dtype() -> Option<Kind> {
    // SAFETY: see `set_cuda_autocast_dtype`.
    let got = unsafe { at_get_autocast_dtype(DEVICE_CUDA) };
    [Kind::Half, Kind::Float, Kind::BFloat16]
        .into_iter()
        .find(|k| code(*k) == Some(got))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state lives in libtorch even without a GPU, so this runs on the CPU.
    #[test]
    fn autocast_dtype_round_trips() {
        set_cuda_autocast_dtype(Kind::BFloat16).unwrap();
        assert_eq!(cuda_autocast_dtype(), Some(Kind::BFloat16));
        set_cuda_autocast_dtype(Kind::Half).unwrap();
        assert_eq!(cuda_autocast_dtype(), Some(Kind::Half));
        assert!(set_cuda_autocast_dtype(Kind::Int64).is_err());
    }
}

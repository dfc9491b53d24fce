use thiserror::Error;

/// What can go wrong when calling the scan.
#[derive(Debug, Error)]
pub enum ScanError {
    /// A tensor has the wrong shape; names the tensor, what it has and what was expected.
    #[error("selective scan: `{name}` has shape {got:?}, expected {expected}")]
    Shape {
        name: String,
        got: Vec<i64>,
        expected: String,
    },
    /// A tensor has an unsupported or inconsistent dtype.
    #[error("selective scan: `{name}` has dtype {got:?}, expected {expected}")]
    Dtype {
        name: String,
        got: tch::Kind,
        expected: String,
    },
    /// A tensor is on another device than `u`.
    #[error("selective scan: `{name}` is on {got:?} but `u` is on {expected:?}")]
    Device {
        name: String,
        got: tch::Device,
        expected: tch::Device,
    },
    /// A size is outside what the CUDA kernels support; names the argument.
    #[error("selective scan: {name} = {got} is not supported on CUDA ({limit})")]
    Unsupported {
        name: String,
        got: i64,
        limit: String,
    },
    /// CUDA tensors were given, but this build has no CUDA kernels.
    #[error("selective scan: CUDA tensors given, but dim-scan was built without its CUDA kernels (nvcc was not found at build time: run `cargo xtask setup`, then rebuild with the `cuda` feature)")]
    NoCudaKernels,
    /// An autocast dtype other than `BFloat16`, `Half` or `Float` was asked for.
    #[error("autocast dtype {0:?}: expected BFloat16, Half or Float")]
    AutocastDtype(tch::Kind),
    /// The native op failed (CUDA launch error, libtorch error).
    #[error("selective scan: {0}")]
    Native(String),
    /// A libtorch call made from Rust failed.
    #[error("selective scan: {0}")]
    Torch(#[from] tch::TchError),
}

//! Errors of the VAE.

use std::path::PathBuf;

/// Everything that can go wrong while building, loading or running the VAE.
#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    /// A configuration value that cannot describe an `AutoencoderKL`.
    #[error("VAE config: {0}")]
    Config(String),
    /// A diffusers `config.json` that cannot be read.
    #[error("VAE config {path}: {detail}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Inputs with the wrong rank, channels or size.
    #[error("{what}: {detail}")]
    Shape {
        /// Which input.
        what: &'static str,
        /// What was expected and what came.
        detail: String,
    },
    /// A weights file whose tensors do not match the network (names them).
    #[error(transparent)]
    Weights(#[from] dim_io::IoError),
    /// An error raised by libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result alias of this crate.
pub type Result<T, E = VaeError> = std::result::Result<T, E>;

//! Errors of the metrics and feature networks.

use std::path::PathBuf;

/// Everything that can go wrong while computing metrics or loading a feature network.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Inputs with the wrong rank, size or dtype.
    #[error("{what}: {detail}")]
    Shape {
        /// Which input.
        what: &'static str,
        /// What was expected and what came.
        detail: String,
    },
    /// Too few samples for the statistic asked for.
    #[error("{what}: need at least {need} samples, got {got}")]
    TooFewSamples {
        /// Which statistic.
        what: &'static str,
        /// Minimum count.
        need: usize,
        /// Actual count.
        got: usize,
    },
    /// A weights or statistics file that cannot be read or whose tensors do
    /// not match what is loaded (the message names the file).
    #[error(transparent)]
    File(#[from] dim_io::IoError),
    /// A file whose content is malformed (the message says what is wrong).
    #[error("{path}: {detail}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An error raised by libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result alias of this crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;

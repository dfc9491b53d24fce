//! Errors of tensor files. Every variant names the file.

use std::path::PathBuf;

/// What can go wrong while reading or writing a tensor file.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The operating system refused a read or write (missing file, no
    /// permission, disk full, ...).
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a valid safetensors file (truncated, corrupt header,
    /// offsets that do not fit), or holds a dtype libtorch cannot take.
    #[error("{}: not a readable tensor file: {detail}", .path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The tensors of the file do not match what they are loaded into.
    #[error("{}: {detail}", .path.display())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// Every missing, unexpected or mis-shaped tensor (the first ones).
        detail: String,
    },
    /// libtorch failed (e.g. out of memory while copying a tensor).
    #[error("{}: libtorch: {source}", .path.display())]
    Torch {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: tch::TchError,
    },
}

/// Result alias of this crate.
pub type Result<T, E = IoError> = std::result::Result<T, E>;

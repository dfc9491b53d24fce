use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong in this crate. Each variant names the file,
/// tensor or key concerned and what is wrong with it.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A configuration value is missing, unknown or out of range.
    #[error("model config{}: {msg}", source_suffix(.source_name))]
    Config {
        /// The file (or preset) the config came from, if any.
        source_name: Option<String>,
        /// What is wrong, naming the key.
        msg: String,
    },
    /// A forward input has the wrong shape, dtype or values.
    #[error("model input `{name}`: {msg}")]
    Input {
        /// Name of the argument (`x`, `t`, `y`).
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// A checkpoint cannot be written or read, or does not match the model.
    #[error("checkpoint {}: {msg}", .path.display())]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong; for mismatches, every offending tensor.
        msg: String,
    },
    /// A tensor file could not be read or written, or does not match the
    /// network (the message names the file and every mismatch).
    #[error(transparent)]
    File(#[from] dim_io::IoError),
    /// Reading or writing a file failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The selective scan rejected its inputs or failed.
    #[error(transparent)]
    Scan(#[from] dim_scan::ScanError),
    /// A libtorch call failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

fn source_suffix(source: &Option<String>) -> String {
    match source {
        Some(s) => format!(" ({s})"),
        None => String::new(),
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn config(msg: impl Into<String>) -> Self {
        Self::Config {
            source_name: None,
            msg: msg.into(),
        }
    }

    pub(crate) fn input(name: &str, msg: impl Into<String>) -> Self {
        Self::Input {
            name: name.into(),
            msg: msg.into(),
        }
    }
}

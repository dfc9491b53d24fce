//! The one error type of the crate: every failure names the file (or config
//! key) and what is wrong with it.

use std::path::{Path, PathBuf};

/// Result alias used throughout `dim-data`.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Everything that can go wrong while opening, decoding or loading data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read at all (missing, permissions, I/O error).
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but its contents are not a valid image, video, array
    /// or cache (corrupt, truncated, garbage, unexpected layout).
    #[error("{path}: corrupt or unsupported file: {reason}")]
    Corrupt {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A folder that should hold samples holds none.
    #[error("{path}: no {what} found (empty folder or wrong layout)")]
    Empty {
        /// The folder.
        path: PathBuf,
        /// What was looked for, e.g. "JPEG/PNG images".
        what: String,
    },
    /// A video has fewer frames than one clip needs.
    #[error("{path}: video too short: {frames} frames, one clip needs {needed}")]
    VideoTooShort {
        /// The video file or frame folder.
        path: PathBuf,
        /// Frames it has.
        frames: usize,
        /// Frames a clip needs (count and stride).
        needed: usize,
    },
    /// A video file met by a build without FFmpeg (the `video` feature).
    #[error("{path}: this build cannot decode video files (built without the `video` feature, i.e. without FFmpeg): rebuild with default features, or use folders of frame images")]
    NoVideoSupport {
        /// The video file.
        path: PathBuf,
    },
    /// A configuration value is missing or invalid.
    #[error("config key `{key}`: {message}")]
    Config {
        /// The full key, e.g. `data.image_size`.
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// A sample index outside the dataset.
    #[error("index {index} out of range for a dataset of {len} samples")]
    IndexOutOfRange {
        /// The requested index.
        index: usize,
        /// The dataset length.
        len: usize,
    },
    /// A saved loader position does not fit this loader.
    #[error("cannot resume: {0}")]
    Resume(String),
    /// A loader worker thread died (a bug, not a data problem).
    #[error("loader worker failed: {0}")]
    Worker(String),
    /// An error from libtorch.
    #[error("libtorch: {0}")]
    Tch(#[from] tch::TchError),
    /// A tensor file (a cache shard) that cannot be read or written; names
    /// the file.
    #[error(transparent)]
    Tensors(#[from] dim_io::IoError),
}

impl DataError {
    /// An [`DataError::Io`] for `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A [`DataError::Corrupt`] for `path`.
    pub fn corrupt(path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            path: path.as_ref().to_path_buf(),
            reason: reason.into(),
        }
    }

    /// A [`DataError::Config`] for `key`.
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            key: key.into(),
            message: message.into(),
        }
    }

    /// A [`DataError::Config`] for the first of `counts` (`(key, value)`)
    /// that is 0, named `prefix.key`; `Ok` when all are at least 1.
    pub(crate) fn require_counts(prefix: &str, counts: &[(&str, usize)]) -> Result<()> {
        match counts.iter().find(|(_, v)| *v == 0) {
            Some((k, _)) => Err(Self::config(format!("{prefix}.{k}"), "must be at least 1")),
            None => Ok(()),
        }
    }

    /// Whether this error is about one sample's data (so the `skip` policy may
    /// drop that sample) rather than about the setup or a bug.
    pub fn is_sample_error(&self) -> bool {
        matches!(
            self,
            Self::Io { .. } | Self::Corrupt { .. } | Self::VideoTooShort { .. }
        )
    }
}

//! Stand-ins for [`crate::ffmpeg`] in a build without the `video` feature
//! (no FFmpeg libraries): every video file is an error that says so.

use std::path::Path;

use crate::decode::{DecodeOptions, VideoInfo};
use crate::error::{DataError, Result};

fn unsupported(path: &Path) -> DataError {
    DataError::NoVideoSupport {
        path: path.to_path_buf(),
    }
}

/// Always [`DataError::NoVideoSupport`] (this build has no FFmpeg).
pub fn probe(path: &Path) -> Result<VideoInfo> {
    Err(unsupported(path))
}

/// Always [`DataError::NoVideoSupport`] (this build has no FFmpeg).
pub fn decode_each(
    path: &Path,
    _wanted: &[usize],
    _options: DecodeOptions,
    _sink: impl FnMut(&[u8], usize, usize),
) -> Result<()> {
    Err(unsupported(path))
}

/// Always [`DataError::NoVideoSupport`] (this build has no FFmpeg).
pub fn write_mp4(
    path: &Path,
    _rgb: &[u8],
    _frames: usize,
    _height: usize,
    _width: usize,
    _fps: u32,
) -> Result<()> {
    Err(unsupported(path))
}

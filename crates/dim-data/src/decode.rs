//! What a video decoder takes and reports, shared by the FFmpeg backend and
//! its stand-in for builds without the `video` feature.

/// Stream facts of a video file.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoInfo {
    /// Frame count: the container's, or counted from the packets when the
    /// container does not declare one (Matroska, WebM).
    pub frames: usize,
    /// Average frame rate (frames per second).
    pub fps: f64,
    /// Frame width in pixels.
    pub width: usize,
    /// Frame height in pixels.
    pub height: usize,
}

/// Decoder settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// FFmpeg decoder threads per clip; 1 by default because the loader
    /// already decodes one clip per worker thread.
    pub threads: usize,
    /// Fail on damaged data (FFmpeg's `err_recognition = explode`) instead of
    /// concealing it, so a corrupt clip is reported rather than trained on.
    pub strict: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            threads: 1,
            strict: true,
        }
    }
}

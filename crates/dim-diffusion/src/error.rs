//! The crate's error type.

/// Errors from configuration, shapes and the denoising model.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    /// A configuration value is invalid or inconsistent (see `validate()`).
    #[error("invalid diffusion config: {0}")]
    Config(String),
    /// A configuration file could not be parsed.
    #[error("could not parse config: {0}")]
    Parse(#[from] toml::de::Error),
    /// A tensor has the wrong shape, dtype or device.
    #[error("shape error: {0}")]
    Shape(String),
    /// The denoising model failed.
    #[error("model error: {0}")]
    Model(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A libtorch call failed.
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

/// Shorthand for results of this crate.
pub type Result<T, E = DiffusionError> = std::result::Result<T, E>;

pub(crate) fn config_err<T>(msg: impl Into<String>) -> Result<T> {
    Err(DiffusionError::Config(msg.into()))
}

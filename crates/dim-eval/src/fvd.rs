//! Fréchet video distance: the Fréchet distance of [`frechet`](crate::frechet)
//! between Gaussians fitted to clip features, with a pluggable video
//! feature network ([`VideoFeatureExtractor`]): I3D (Kinetics-400, weights
//! converted by the user, [`crate::i3d`]) or the project's own Moving
//! Fashion-MNIST classifier ([`crate::video_classifier`]).
//!
//! Clips everywhere are `(N, C, T, H, W)` floats in `[-1, 1]`.

use tch::{Device, Tensor};

use crate::frechet::{frechet_distance, GaussianStats};
use crate::Result;

/// A network mapping clips to feature vectors for FVD.
pub trait VideoFeatureExtractor {
    /// Short name, used in logs and reports.
    fn name(&self) -> &str;
    /// Feature width `F`.
    fn dim(&self) -> i64;
    /// The device the network runs on.
    fn device(&self) -> Device;
    /// Features `(N, F)` f32 of clips `(N, C, T, H, W)` in `[-1, 1]`, on the
    /// network's device. Called under `no_grad`.
    fn features(&self, clips: &Tensor) -> Result<Tensor>;
}

/// Runs `extractor` over batches of clips `(B, C, T, H, W)` in `[-1, 1]`
/// (any device) and returns all features `(N, F)` f32 on the CPU.
pub fn extract_video_features<I>(
    extractor: &dyn VideoFeatureExtractor,
    batches: I,
) -> Result<Tensor>
where
    I: IntoIterator<Item = Tensor>,
{
    crate::features::extract_with(
        extractor.device(),
        &|x| extractor.features(x),
        batches,
        "video feature extraction",
    )
}

/// FVD between two clip feature sets `(N₁, F)` and `(N₂, F)`: the squared
/// Fréchet distance of their Gaussian fits (the same computation as FID).
pub fn fvd(a: &Tensor, b: &Tensor) -> Result<f64> {
    frechet_distance(
        &GaussianStats::from_features(a)?,
        &GaussianStats::from_features(b)?,
    )
}

/// Checks that `clips` is `(N, C, T, H, W)` with `C` in `allowed_channels`.
pub(crate) fn check_clips(clips: &Tensor, allowed_channels: &[i64]) -> Result<()> {
    crate::features::check_layout(clips, "clips", "(N, C, T, H, W)", allowed_channels)
}

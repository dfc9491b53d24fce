//! The pluggable feature network.

use tch::{Device, Kind, Tensor};

use crate::{EvalError, Result};

/// A network mapping images to feature vectors for FID and precision/recall.
pub trait FeatureExtractor {
    /// Short name, used in logs and in the names of cached statistics.
    fn name(&self) -> &str;
    /// Feature width `F`.
    fn dim(&self) -> i64;
    /// The device the network runs on.
    fn device(&self) -> Device;
    /// Features `(N, F)` f32 of images `(N, C, H, W)` in `[-1, 1]`, on the
    /// network's device. Called under `no_grad`.
    fn features(&self, images: &Tensor) -> Result<Tensor>;
}

/// Runs `extractor` over batches of images `(B, C, H, W)` in `[-1, 1]`
/// (any device) and returns all features `(N, F)` f32 on the CPU.
pub fn extract_features<I>(extractor: &dyn FeatureExtractor, batches: I) -> Result<Tensor>
where
    I: IntoIterator<Item = Tensor>,
{
    extract_with(
        extractor.device(),
        &|x| extractor.features(x),
        batches,
        "feature extraction",
    )
}

/// The batch loop of [`extract_features`] and `fvd::extract_video_features`:
/// each batch goes to `device` as f32 through `features`, the results come
/// back to the CPU and are concatenated `(N, F)`; `what` names the caller in
/// the error for no batches.
pub(crate) fn extract_with<I>(
    device: Device,
    features: &dyn Fn(&Tensor) -> Result<Tensor>,
    batches: I,
    what: &'static str,
) -> Result<Tensor>
where
    I: IntoIterator<Item = Tensor>,
{
    let _guard = tch::no_grad_guard();
    let mut out = Vec::new();
    for b in batches {
        let f = features(&b.to_device(device).to_kind(Kind::Float))?;
        out.push(f.to_device(Device::Cpu));
    }
    if out.is_empty() {
        return Err(EvalError::TooFewSamples {
            what,
            need: 1,
            got: 0,
        });
    }
    Ok(Tensor::cat(&out, 0))
}

/// Checks that `images` is `(N, C, H, W)` with `C` in `allowed_channels`.
pub(crate) fn check_images(images: &Tensor, allowed_channels: &[i64]) -> Result<()> {
    check_layout(images, "images", "(N, C, H, W)", allowed_channels)
}

/// Checks that `t` has the rank of `layout` (`"(N, C, ...)"`, naming the
/// axes for the error) and a channel count (axis 1) in `allowed_channels`;
/// `what` names the tensor.
pub(crate) fn check_layout(
    t: &Tensor,
    what: &'static str,
    layout: &str,
    allowed_channels: &[i64],
) -> Result<()> {
    let s = t.size();
    if s.len() != layout.split(',').count() || !allowed_channels.contains(&s[1]) {
        return Err(EvalError::Shape {
            what,
            detail: format!("expected {layout} with C in {allowed_channels:?}, got {s:?}"),
        });
    }
    Ok(())
}

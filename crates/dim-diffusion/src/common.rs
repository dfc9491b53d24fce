//! Helpers shared by the Gaussian and flow code.

use tch::{Device, Kind, Tensor};

use crate::denoiser::{guided_forward, Denoiser};
use crate::error::{DiffusionError, Result};

/// Where a sampler is; passed to the progress callback before each model step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// 0-based step.
    pub step: usize,
    /// Number of steps.
    pub total: usize,
    /// Model-facing time of this step.
    pub t: f64,
}

/// Device, dtype and seed of a `sample` call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleOptions {
    /// Where the samples are computed.
    pub device: Device,
    /// Dtype of the sampler state (the model sees this dtype).
    pub kind: Kind,
    /// Seed of the [`crate::NoiseRng`].
    pub seed: u64,
    /// Global index of this batch's first sample: with the same seed, sample
    /// `first_row + b` gets the same noise whatever the batch split.
    pub first_row: u64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            kind: Kind::Float,
            seed: 0,
            first_row: 0,
        }
    }
}

impl SampleOptions {
    /// CPU, f32, the given seed.
    pub fn seeded(seed: u64) -> Self {
        Self {
            seed,
            ..Self::default()
        }
    }
}

/// Per-sample losses, each of shape `(B)`; the trainer takes `loss.mean()`.
#[derive(Debug)]
pub struct Losses {
    /// The training objective (`mse + vlb` for learned variance).
    pub loss: Tensor,
    /// Mean-squared error of the prediction, averaged over non-batch dims.
    pub mse: Tensor,
    /// Weighted VLB term (bits/dim times `vlb_weight * T`), when `learn_sigma`.
    pub vlb: Option<Tensor>,
    /// The time each sample was trained at (Gaussian: Int64 index; flow: t in [0, 1]).
    pub t: Tensor,
}

/// Dtype of the model-facing time: f64 when the state is f64, else f32.
pub(crate) fn time_kind(x: &Tensor) -> Kind {
    if x.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Mean over all dimensions but the first.
pub fn mean_flat(x: &Tensor) -> Tensor {
    if x.dim() <= 1 {
        return x.shallow_clone();
    }
    x.flatten(1, -1).mean_dim(1, false, x.kind())
}

/// Reshapes a `(B)` tensor to `(B, 1, 1, ...)` matching `x`'s rank, dtype and device.
pub fn per_sample(v: &Tensor, x: &Tensor) -> Tensor {
    let mut shape = vec![v.size()[0]];
    shape.extend(std::iter::repeat_n(1, x.dim() - 1));
    v.to_kind(x.kind())
        .to_device(x.device())
        .view(shape.as_slice())
}

/// Calls the model (with classifier-free guidance when `guidance` is set) at a
/// time shared by the whole batch, and checks the output shape.
pub(crate) fn call_model<M: Denoiser + ?Sized>(
    model: &M,
    x: &Tensor,
    t: f64,
    y: Option<&Tensor>,
    guidance: Option<(f64, i64)>,
    out_channels: i64,
) -> Result<Tensor> {
    let b = x.size()[0];
    let tt = Tensor::full([b], t, (time_kind(x), x.device()));
    let out = match guidance {
        Some((scale, null)) => {
            let y = y.ok_or_else(|| {
                DiffusionError::Config("classifier-free guidance needs class labels y".into())
            })?;
            guided_forward(model, x, &tt, y, scale, null)?
        }
        None => model.denoise(x, &tt, y)?,
    };
    check_output(&out, x, out_channels)?;
    Ok(out)
}

pub(crate) fn check_output(out: &Tensor, x: &Tensor, out_channels: i64) -> Result<()> {
    let mut want = x.size();
    want[1] = out_channels;
    if out.size() != want {
        return Err(DiffusionError::Shape(format!(
            "model output has shape {:?}, expected {:?} for input {:?}",
            out.size(),
            want,
            x.size()
        )));
    }
    Ok(())
}

pub(crate) fn check_input(x: &Tensor, what: &str) -> Result<()> {
    if x.dim() < 2 {
        return Err(DiffusionError::Shape(format!(
            "{what} must be (B, C, ...) with at least 2 dims, got {:?}",
            x.size()
        )));
    }
    if !matches!(
        x.kind(),
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    ) {
        return Err(DiffusionError::Shape(format!(
            "{what} must be floating point, got {:?}",
            x.kind()
        )));
    }
    Ok(())
}

/// Checks the inputs of a `training_losses_at`: `x0` `(B, C, ...)`, labels
/// `(B)`, `t` `(B)` and `noise` shaped as `x0`.
pub(crate) fn check_training_inputs(
    x0: &Tensor,
    y: Option<&Tensor>,
    t: &Tensor,
    noise: &Tensor,
) -> Result<()> {
    check_input(x0, "x0")?;
    let b = x0.size()[0];
    check_labels(y, b)?;
    if noise.size() != x0.size() || t.size() != [b] {
        return Err(DiffusionError::Shape(format!(
            "noise {:?} / t {:?} do not match x0 {:?}",
            noise.size(),
            t.size(),
            x0.size()
        )));
    }
    Ok(())
}

pub(crate) fn check_labels(y: Option<&Tensor>, b: i64) -> Result<()> {
    if let Some(y) = y {
        if y.size() != [b] {
            return Err(DiffusionError::Shape(format!(
                "labels y must have shape [{b}], got {:?}",
                y.size()
            )));
        }
    }
    Ok(())
}

//! The model interface samplers and losses call, and classifier-free guidance.

use tch::{Kind, Tensor};

use crate::error::{DiffusionError, Result};

/// A denoising network as the diffusion code sees it.
///
/// * `x_t`: the noisy input, `(B, C, ...)` (any number of trailing dims).
/// * `t`: the model-facing time, a tensor of shape `(B)` on `x_t`'s device,
///   `Kind::Float` (`Kind::Double` when `x_t` is f64). Gaussian diffusion: the original training timestep index
///   in `[0, T-1]` (fractional only for euler/heun with `linspace` spacing).
///   Flow matching: `t * time_scale` (default `[0, 1000]`).
/// * `y`: optional class labels, `Kind::Int64`, shape `(B)`.
///
/// Returns `(B, C, ...)`, or `(B, 2C, ...)` when the diffusion has
/// `learn_sigma` (first C channels the prediction, last C the variance
/// interpolation `v` in [-1, 1]).
///
/// Closures `Fn(&Tensor, &Tensor, Option<&Tensor>) -> Tensor` implement it.
pub trait Denoiser {
    /// One forward pass.
    fn denoise(&self, x_t: &Tensor, t: &Tensor, y: Option<&Tensor>) -> Result<Tensor>;
}

impl<F> Denoiser for F
where
    F: Fn(&Tensor, &Tensor, Option<&Tensor>) -> Tensor,
{
    fn denoise(&self, x_t: &Tensor, t: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        Ok(self(x_t, t, y))
    }
}

/// Adapts a fallible closure `Fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor, E>`.
#[derive(Debug, Clone, Copy)]
pub struct FallibleFn<F>(pub F);

impl<F, E> Denoiser for FallibleFn<F>
where
    F: Fn(&Tensor, &Tensor, Option<&Tensor>) -> std::result::Result<Tensor, E>,
    E: std::error::Error + Send + Sync + 'static,
{
    fn denoise(&self, x_t: &Tensor, t: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        (self.0)(x_t, t, y).map_err(|e| DiffusionError::Model(Box::new(e)))
    }
}

/// Classifier-free guidance around a class-conditional denoiser.
///
/// Each call runs **one** forward on the batch `[x; x]` with labels
/// `[y; null_class]` and returns `uncond + scale * (cond - uncond)` on the
/// first `C` output channels (`C` = `x_t`'s channels: the eps / v / x0 /
/// velocity prediction). Any further channels (learned variance) are taken
/// from the conditional half unguided, as DiT's `forward_with_cfg` does.
#[derive(Debug, Clone)]
pub struct ClassifierFreeGuidance<D> {
    /// The conditional model (it must understand `null_class` as "no label").
    pub inner: D,
    /// Guidance scale `s` (1 = the conditional model alone).
    pub scale: f64,
    /// The "no class" label, DiT: `num_classes`.
    pub null_class: i64,
}

impl<D: Denoiser> ClassifierFreeGuidance<D> {
    /// Wraps `inner`.
    pub fn new(inner: D, scale: f64, null_class: i64) -> Self {
        Self {
            inner,
            scale,
            null_class,
        }
    }
}

impl<D: Denoiser> Denoiser for ClassifierFreeGuidance<D> {
    fn denoise(&self, x_t: &Tensor, t: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        let y = y.ok_or_else(|| {
            DiffusionError::Config("classifier-free guidance needs class labels y".into())
        })?;
        guided_forward(&self.inner, x_t, t, y, self.scale, self.null_class)
    }
}

/// The guided forward of [`ClassifierFreeGuidance`] for a borrowed model.
pub fn guided_forward<D: Denoiser + ?Sized>(
    model: &D,
    x_t: &Tensor,
    t: &Tensor,
    y: &Tensor,
    scale: f64,
    null_class: i64,
) -> Result<Tensor> {
    let b = x_t.size()[0];
    let c = x_t.size()[1];
    if y.size() != [b] {
        return Err(DiffusionError::Shape(format!(
            "labels y must have shape [{b}], got {:?}",
            y.size()
        )));
    }
    let x_in = Tensor::cat(&[x_t, x_t], 0);
    let t_in = Tensor::cat(&[t, t], 0);
    let y_null = y.full_like(null_class);
    let y_in = Tensor::cat(&[y, &y_null], 0).to_kind(Kind::Int64);
    let out = model.denoise(&x_in, &t_in, Some(&y_in))?;
    if out.size()[0] != 2 * b || out.size()[1] < c {
        return Err(DiffusionError::Shape(format!(
            "guided model output {:?} does not match input {:?}",
            out.size(),
            x_in.size()
        )));
    }
    let cond = out.narrow(0, 0, b);
    let uncond = out.narrow(0, b, b);
    let (cp, up) = (cond.narrow(1, 0, c), uncond.narrow(1, 0, c));
    let guided = &up + (&cp - &up) * scale;
    let rest = cond.size()[1] - c;
    Ok(if rest > 0 {
        Tensor::cat(&[guided, cond.narrow(1, c, rest)], 1)
    } else {
        guided
    })
}

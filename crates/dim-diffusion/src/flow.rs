//! Flow matching (rectified flow).
//!
//! Convention: `x_t = (1 - t) x0 + t eps` with `t` in [0, 1] (`t = 0` data,
//! `t = 1` noise); the network predicts the velocity `v = dx_t/dt = eps - x0`
//! and sees `t * time_scale`. Sampling integrates `dx/dt = v` from `t = 1`
//! down to `t = 0` (diffusers FlowMatchEulerDiscreteScheduler's convention,
//! with its `sigma` = our `t`).

use tch::{Kind, Tensor};

use crate::common::{
    call_model, check_input, check_labels, check_output, check_training_inputs, mean_flat,
    per_sample, time_kind, Losses, Progress,
};
use crate::config::{DiffusionConfig, ProcessKind, SamplerConfig, SamplerKind, TimeSampling};
use crate::denoiser::Denoiser;
use crate::error::{config_err, Result};
use crate::rng::NoiseRng;
use crate::schedule::flow_grid;

/// A flow-matching process (see the module docs).
#[derive(Debug, Clone)]
pub struct FlowMatching {
    cfg: DiffusionConfig,
}

impl FlowMatching {
    /// Validates `cfg` (which must have `kind = "flow"`).
    pub fn new(cfg: &DiffusionConfig) -> Result<Self> {
        cfg.validate()?;
        if cfg.kind != ProcessKind::Flow {
            return config_err("FlowMatching needs kind = \"flow\"");
        }
        Ok(Self { cfg: cfg.clone() })
    }

    /// The config.
    pub fn config(&self) -> &DiffusionConfig {
        &self.cfg
    }

    /// `x_t = (1 - t) x0 + t noise` with `t` of shape `(B)` in [0, 1].
    pub fn interpolate(&self, x0: &Tensor, t: &Tensor, noise: &Tensor) -> Tensor {
        let tt = per_sample(t, x0);
        (tt.neg() + 1.0) * x0 + &tt * noise
    }

    /// Draws training times `t` in [0, 1], shape `(B)`, `Kind::Double`.
    pub fn sample_t(&self, rng: &mut NoiseRng, b: i64, device: tch::Device) -> Tensor {
        match self.cfg.time_sampling {
            TimeSampling::Uniform => rng.rand(&[b], Kind::Double, device),
            TimeSampling::LogitNormal => {
                let n = rng.randn(&[b], Kind::Double, device);
                (n * self.cfg.logit_normal_std + self.cfg.logit_normal_mean).sigmoid()
            }
        }
    }

    /// Training losses at given `t` (`(B)`, in [0, 1]) and noise:
    /// `loss = mse = mean_flat((v_pred - (noise - x0))^2)`.
    pub fn training_losses_at<M: Denoiser + ?Sized>(
        &self,
        model: &M,
        x0: &Tensor,
        y: Option<&Tensor>,
        t: &Tensor,
        noise: &Tensor,
    ) -> Result<Losses> {
        check_training_inputs(x0, y, t, noise)?;
        let x_t = self.interpolate(x0, t, noise);
        let t_model = (t.to_kind(Kind::Double) * self.cfg.time_scale)
            .to_kind(time_kind(x0))
            .to_device(x0.device());
        let out = model.denoise(&x_t, &t_model, y)?;
        check_output(&out, &x_t, x0.size()[1])?;
        let target = noise - x0;
        let mse = mean_flat(&(out - target).square());
        Ok(Losses {
            loss: mse.shallow_clone(),
            mse,
            vlb: None,
            t: t.shallow_clone(),
        })
    }

    /// The decreasing time grid (in [0, 1], ending with 0) `cfg` samples with.
    pub fn sampling_grid(&self, cfg: &SamplerConfig) -> Result<Vec<f64>> {
        cfg.validate(&self.cfg)?;
        flow_grid(
            cfg.steps,
            cfg.spacing(ProcessKind::Flow),
            self.cfg.timesteps,
            cfg.shift,
        )
    }

    /// One Euler step of `dx/dt = v` from `t` to `t_next` (diffusers
    /// `FlowMatchEulerDiscreteScheduler.step`): `x + v (t_next - t)`. `v` is
    /// the model output at `(x, t * time_scale)`; all tensors `(B, C, ...)`.
    pub fn euler_step(&self, v: &Tensor, x: &Tensor, t: f64, t_next: f64) -> Tensor {
        x + v * (t_next - t)
    }

    /// One Heun step from `t` to `t_next > 0` (diffusers
    /// `FlowMatchHeunDiscreteScheduler`, both stages): `v` is the model output
    /// at `(x, t)`, `v2` the one at `(euler_step(v, x, t, t_next), t_next)`.
    /// The step to `t = 0` is an Euler step.
    pub fn heun_step(&self, v: &Tensor, x: &Tensor, t: f64, t_next: f64, v2: &Tensor) -> Tensor {
        x + (v + v2) * (0.5 * (t_next - t))
    }

    /// Integrates from `x_1 = noise` to `t = 0` with Euler or Heun (the last
    /// step, to `t = 0`, is always Euler). Runs without gradients.
    pub fn sample_from_noise<M: Denoiser + ?Sized>(
        &self,
        model: &M,
        noise: &Tensor,
        y: Option<&Tensor>,
        cfg: &SamplerConfig,
        mut progress: impl FnMut(Progress),
    ) -> Result<Tensor> {
        check_input(noise, "noise")?;
        check_labels(y, noise.size()[0])?;
        let grid = self.sampling_grid(cfg)?;
        let _guard = tch::no_grad_guard();
        let guidance = cfg
            .guided()
            .then(|| (cfg.cfg_scale, cfg.null_class.unwrap_or(0)));
        let c = noise.size()[1];
        let scale = self.cfg.time_scale;
        let n = grid.len() - 1;
        let call = |x: &Tensor, t: f64| call_model(model, x, t * scale, y, guidance, c);
        let heun = cfg.sampler == SamplerKind::Heun;
        let mut x = noise.shallow_clone();
        for i in 0..n {
            progress(Progress {
                step: i,
                total: n,
                t: grid[i] * scale,
            });
            let (t, t_next) = (grid[i], grid[i + 1]);
            let v = call(&x, t)?;
            let euler = self.euler_step(&v, &x, t, t_next);
            x = if heun && t_next > 0.0 {
                let v2 = call(&euler, t_next)?;
                self.heun_step(&v, &x, t, t_next, &v2)
            } else {
                euler
            };
        }
        Ok(x)
    }
}

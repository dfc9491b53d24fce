//! Discrete-time Gaussian diffusion: training objectives (simple MSE, improved
//! DDPM / DiT hybrid with learned variance) and samplers (DDPM, DDIM,
//! DPM-Solver++(2M), Euler, Heun).
//!
//! Conventions (ADM / DiT): `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`,
//! `t` in `0..T` with `t = 0` the least noisy step; the model sees `t` as a float.

use std::f64::consts::LN_2;

use tch::{Kind, Tensor};

use crate::common::{
    call_model, check_input, check_labels, check_output, check_training_inputs, mean_flat,
    per_sample, time_kind, Losses, Progress, SampleOptions,
};
use crate::config::{
    DiffusionConfig, FixedVariance, Prediction, ProcessKind, SamplerConfig, SamplerKind,
};
use crate::denoiser::Denoiser;
use crate::error::{config_err, DiffusionError, Result};
use crate::rng::NoiseRng;
use crate::schedule::{betas, gaussian_grid, Tables};

/// Per-sample timestep indices into a table.
type At<'a> = &'a [usize];

/// The per-sample coefficient `f(index)` as `(B, 1, ...)` in `x`'s dtype and device
/// (computed in f64, then converted).
fn coef(at: At<'_>, x: &Tensor, f: impl Fn(usize) -> f64) -> Tensor {
    let v: Vec<f64> = at.iter().map(|&j| f(j)).collect();
    per_sample(&Tensor::from_slice(&v), x)
}

/// Improved-DDPM `normal_kl` (elementwise, nats).
pub fn normal_kl(mean1: &Tensor, logvar1: &Tensor, mean2: &Tensor, logvar2: &Tensor) -> Tensor {
    ((logvar2 - logvar1)
        + (logvar1 - logvar2).exp()
        + (mean1 - mean2).square() * logvar2.neg().exp()
        - 1.0)
        * 0.5
}

fn approx_standard_normal_cdf(x: &Tensor) -> Tensor {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    (((x + x.pow_tensor_scalar(3) * 0.044715) * k).tanh() + 1.0) * 0.5
}

/// Improved-DDPM `discretized_gaussian_log_likelihood`: log-likelihood (nats,
/// elementwise) of data `x` in [-1, 1] quantised to 256 bins of width 2/255,
/// under `N(means, exp(log_scales)^2)`, edge bins open-ended.
pub fn discretized_gaussian_log_likelihood(
    x: &Tensor,
    means: &Tensor,
    log_scales: &Tensor,
) -> Tensor {
    let centered = x - means;
    let inv_stdv = log_scales.neg().exp();
    let plus_in = &inv_stdv * (&centered + 1.0 / 255.0);
    let cdf_plus = approx_standard_normal_cdf(&plus_in);
    let min_in = &inv_stdv * (&centered - 1.0 / 255.0);
    let cdf_min = approx_standard_normal_cdf(&min_in);
    let log_cdf_plus = cdf_plus.clamp_min(1e-12).log();
    let log_one_minus_cdf_min = (cdf_min.neg() + 1.0).clamp_min(1e-12).log();
    let cdf_delta = &cdf_plus - &cdf_min;
    let mid = cdf_delta.clamp_min(1e-12).log();
    let hi = log_one_minus_cdf_min.where_self(&x.gt(0.999), &mid);
    log_cdf_plus.where_self(&x.lt(-0.999), &hi)
}

/// A Gaussian diffusion process (see the module docs).
#[derive(Debug, Clone)]
pub struct GaussianDiffusion {
    cfg: DiffusionConfig,
    tables: Tables,
}

/// The precomputed grid and tables of one sampling run.
#[derive(Debug, Clone)]
pub struct SamplingSchedule {
    /// Model-facing timesteps, decreasing (original indices; fractional only
    /// for euler/heun with `linspace`).
    pub timesteps: Vec<f64>,
    /// `alpha_bar` at each timestep (interpolated through sigma for fractional ones).
    pub alphas_cumprod: Vec<f64>,
    /// `sqrt((1 - abar) / abar)` at each timestep, then a final 0.
    pub sigmas: Vec<f64>,
    /// Tables of the respaced process over the grid in increasing order (the
    /// DDPM sampler's betas / posterior); `None` for fractional grids.
    pub respaced: Option<Tables>,
    prediction: Prediction,
    learn_sigma: bool,
    variance: FixedVariance,
    clip: bool,
}

impl SamplingSchedule {
    /// Number of steps.
    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    fn split(&self, out: &Tensor, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let c = x.size()[1];
        check_output(out, x, if self.learn_sigma { 2 * c } else { c })?;
        Ok(if self.learn_sigma {
            (out.narrow(1, 0, c), Some(out.narrow(1, c, c)))
        } else {
            (out.shallow_clone(), None)
        })
    }

    /// Predicted x0 from a model prediction at `alpha_bar = abar` (state `x` in VP scaling).
    fn x0_from(&self, pred: &Tensor, x: &Tensor, abar: f64) -> Tensor {
        let x0 = match self.prediction {
            Prediction::Eps => x * (1.0 / abar).sqrt() - pred * (1.0 / abar - 1.0).sqrt(),
            Prediction::X0 | Prediction::Velocity => pred.shallow_clone(),
            Prediction::V => x * abar.sqrt() - pred * (1.0 - abar).sqrt(),
        };
        if self.clip {
            x0.clamp(-1.0, 1.0)
        } else {
            x0
        }
    }

    fn table(&self) -> Result<&Tables> {
        self.respaced.as_ref().ok_or_else(|| {
            DiffusionError::Config(
                "this sampler needs integer timesteps (use another spacing)".into(),
            )
        })
    }

    /// One ancestral (DDPM) step from grid point `i` (0 = noisiest) given the
    /// raw model output; `noise` is the standard normal added (ignored at the
    /// last step). Matches improved-DDPM `p_sample` on the respaced process and
    /// diffusers `DDPMScheduler.step` (fixed_small / fixed_large / learned_range).
    pub fn ddpm_step(&self, out: &Tensor, x: &Tensor, i: usize, noise: &Tensor) -> Result<Tensor> {
        let tb = self.table()?;
        let n = self.len();
        let j = n - 1 - i;
        let (pred, var) = self.split(out, x)?;
        let x0 = self.x0_from(&pred, x, tb.alphas_cumprod[j]);
        let mean = x0 * tb.posterior_mean_coef1[j] + x * tb.posterior_mean_coef2[j];
        if j == 0 {
            return Ok(mean);
        }
        let log_var = match var {
            Some(v) => {
                let frac = (v + 1.0) * 0.5;
                &frac * tb.log_betas[j] + (frac.neg() + 1.0) * tb.posterior_log_variance_clipped[j]
            }
            None => {
                let lv = match self.variance {
                    FixedVariance::Small => tb.posterior_log_variance_clipped[j],
                    FixedVariance::Large => tb.fixed_large_log_variance[j],
                };
                Tensor::scalar_tensor(lv, (Kind::Double, tch::Device::Cpu))
            }
        };
        Ok(mean + (log_var * 0.5).exp() * noise)
    }

    /// One DDIM step from grid point `i` to the next (or to `abar = 1` after
    /// the last); `noise` is required when `eta > 0`. Matches improved-DDPM
    /// `ddim_sample` and diffusers `DDIMScheduler.step` (with
    /// `use_clipped_model_output = True` when clipping).
    pub fn ddim_step(
        &self,
        out: &Tensor,
        x: &Tensor,
        i: usize,
        eta: f64,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (pred, _) = self.split(out, x)?;
        let a = self.alphas_cumprod[i];
        let a_prev = if i + 1 < self.len() {
            self.alphas_cumprod[i + 1]
        } else {
            1.0
        };
        let x0 = self.x0_from(&pred, x, a);
        let eps = (x * (1.0 / a).sqrt() - &x0) / (1.0 / a - 1.0).sqrt();
        let sigma = eta * ((1.0 - a_prev) / (1.0 - a)).sqrt() * (1.0 - a / a_prev).sqrt();
        let mean = x0 * a_prev.sqrt() + eps * (1.0 - a_prev - sigma * sigma).max(0.0).sqrt();
        if sigma > 0.0 {
            let noise = noise
                .ok_or_else(|| DiffusionError::Config("ddim with eta > 0 needs noise".into()))?;
            Ok(mean + noise * sigma)
        } else {
            Ok(mean)
        }
    }

    /// One DPM-Solver++(2M) step from grid point `i` (diffusers
    /// `DPMSolverMultistepScheduler` defaults: data prediction, midpoint,
    /// first order at the first and last step, final sigma 0). `prev_x0` is the
    /// data prediction of the previous step. Returns `(x_next, x0)`.
    pub fn dpm_step(
        &self,
        out: &Tensor,
        x: &Tensor,
        i: usize,
        prev_x0: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (pred, _) = self.split(out, x)?;
        let n = self.len();
        let x0 = self.x0_from(&pred, x, self.alphas_cumprod[i]);
        let alpha_sigma = |s: f64| {
            let a = 1.0 / (s * s + 1.0).sqrt();
            (a, s * a)
        };
        let (a_t, s_t) = alpha_sigma(self.sigmas[i + 1]);
        let (a_s0, s_s0) = alpha_sigma(self.sigmas[i]);
        let lam = |a: f64, s: f64| a.ln() - s.ln();
        let h = lam(a_t, s_t) - lam(a_s0, s_s0);
        let em1 = (-h).exp() - 1.0;
        let first = x * (s_t / s_s0) - &x0 * (a_t * em1);
        let next = match prev_x0 {
            Some(m1) if i + 1 < n => {
                let (a_s1, s_s1) = alpha_sigma(self.sigmas[i - 1]);
                let h0 = lam(a_s0, s_s0) - lam(a_s1, s_s1);
                let r0 = h0 / h;
                let d1 = (&x0 - m1) * (1.0 / r0);
                first - d1 * (0.5 * a_t * em1)
            }
            _ => first,
        };
        Ok((next, x0))
    }

    /// Euler derivative pieces: for the variance-exploding state `x_ve` at grid
    /// point `i`, the model input `x_ve / sqrt(sigma^2 + 1)`.
    pub fn scale_model_input(&self, x_ve: &Tensor, i: usize) -> Tensor {
        let s = self.sigmas[i];
        x_ve / (s * s + 1.0).sqrt()
    }

    /// `d = (x_ve - x0) / sigma` at grid point `i` from the raw model output
    /// (which was computed on `scale_model_input(x_ve, i)`).
    pub fn ode_derivative(&self, out: &Tensor, x_ve: &Tensor, i: usize) -> Result<Tensor> {
        let x_in = self.scale_model_input(x_ve, i);
        let (pred, _) = self.split(out, &x_in)?;
        let x0 = self.x0_from(&pred, &x_in, self.alphas_cumprod[i]);
        Ok((x_ve - x0) / self.sigmas[i])
    }

    /// One Euler step (diffusers `EulerDiscreteScheduler.step`, no churn) in the
    /// variance-exploding state.
    pub fn euler_step(&self, out: &Tensor, x_ve: &Tensor, i: usize) -> Result<Tensor> {
        let d = self.ode_derivative(out, x_ve, i)?;
        Ok(x_ve + d * (self.sigmas[i + 1] - self.sigmas[i]))
    }
}

impl GaussianDiffusion {
    /// Validates `cfg` (which must have `kind = "gaussian"`) and computes the tables.
    pub fn new(cfg: &DiffusionConfig) -> Result<Self> {
        cfg.validate()?;
        if cfg.kind != ProcessKind::Gaussian {
            return config_err("GaussianDiffusion needs kind = \"gaussian\"");
        }
        Ok(Self {
            cfg: cfg.clone(),
            tables: Tables::from_betas(betas(cfg)),
        })
    }

    /// The config.
    pub fn config(&self) -> &DiffusionConfig {
        &self.cfg
    }

    /// The training-schedule tables.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// T.
    pub fn num_timesteps(&self) -> usize {
        self.tables.len()
    }

    fn out_channels(&self, c: i64) -> i64 {
        self.cfg.out_channels(c)
    }

    fn indices(&self, t: &Tensor) -> Result<Vec<usize>> {
        let v: Vec<i64> = Vec::try_from(
            t.to_device(tch::Device::Cpu)
                .to_kind(Kind::Int64)
                .flatten(0, -1),
        )?;
        let n = self.num_timesteps() as i64;
        v.into_iter()
            .map(|i| {
                if (0..n).contains(&i) {
                    Ok(i as usize)
                } else {
                    Err(DiffusionError::Shape(format!(
                        "timestep {i} outside 0..{n}"
                    )))
                }
            })
            .collect()
    }

    /// `q(x_t | x0)`: `sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`, `t` Int64 `(B)`.
    pub fn q_sample(&self, x0: &Tensor, t: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let idx = self.indices(t)?;
        let ac = &self.tables.alphas_cumprod;
        let at = &idx;
        Ok(coef(at, x0, |j| ac[j].sqrt()) * x0 + coef(at, x0, |j| (1.0 - ac[j]).sqrt()) * noise)
    }

    fn x0_from(&self, pred: &Tensor, x: &Tensor, at: At<'_>) -> Tensor {
        let ac = &self.tables.alphas_cumprod;
        match self.cfg.prediction() {
            Prediction::Eps => {
                coef(at, x, |j| (1.0 / ac[j]).sqrt()) * x
                    - coef(at, x, |j| (1.0 / ac[j] - 1.0).sqrt()) * pred
            }
            Prediction::X0 | Prediction::Velocity => pred.shallow_clone(),
            Prediction::V => {
                coef(at, x, |j| ac[j].sqrt()) * x - coef(at, x, |j| (1.0 - ac[j]).sqrt()) * pred
            }
        }
    }

    fn posterior_mean(&self, x0: &Tensor, x_t: &Tensor, at: At<'_>) -> Tensor {
        let tb = &self.tables;
        coef(at, x_t, |j| tb.posterior_mean_coef1[j]) * x0
            + coef(at, x_t, |j| tb.posterior_mean_coef2[j]) * x_t
    }

    /// Per-sample VLB term `L_t` in bits/dim (improved-DDPM `_vb_terms_bpd`,
    /// unweighted): `KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t))` for `t > 0` and
    /// the discretised decoder NLL for `t = 0`. `model_out` is the raw model
    /// output (`2C` channels with learned variance); gradients flow only into
    /// the variance channels (the mean is detached).
    pub fn vlb_terms(
        &self,
        model_out: &Tensor,
        x0: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
    ) -> Result<Tensor> {
        check_input(x_t, "x_t")?;
        let c = x_t.size()[1];
        check_output(model_out, x_t, self.out_channels(c))?;
        let idx = self.indices(t)?;
        let at = &idx;
        let tb = &self.tables;
        let pred = model_out.narrow(1, 0, c).detach();
        let model_log_var = if self.cfg.learn_sigma {
            let frac = (model_out.narrow(1, c, c) + 1.0) * 0.5;
            &frac * coef(at, x_t, |j| tb.log_betas[j])
                + (frac.neg() + 1.0) * coef(at, x_t, |j| tb.posterior_log_variance_clipped[j])
        } else {
            let lv = match self.cfg.variance {
                FixedVariance::Small => &tb.posterior_log_variance_clipped,
                FixedVariance::Large => &tb.fixed_large_log_variance,
            };
            coef(at, x_t, |j| lv[j]).expand_as(x_t)
        };
        let true_mean = self.posterior_mean(x0, x_t, at);
        let true_log_var = coef(at, x_t, |j| tb.posterior_log_variance_clipped[j]);
        let x0_pred = self.x0_from(&pred, x_t, at);
        let model_mean = self.posterior_mean(&x0_pred, x_t, at);
        let kl = mean_flat(&normal_kl(
            &true_mean,
            &true_log_var,
            &model_mean,
            &model_log_var,
        )) / LN_2;
        let nll = mean_flat(
            &discretized_gaussian_log_likelihood(x0, &model_mean, &(&model_log_var * 0.5)).neg(),
        ) / LN_2;
        let is_zero: Vec<bool> = idx.iter().map(|&j| j == 0).collect();
        let mask = Tensor::from_slice(&is_zero).to_device(x_t.device());
        Ok(nll.where_self(&mask, &kl))
    }

    /// Training losses with `t ~ U{0..T-1}` and noise drawn from `rng`.
    pub fn training_losses<M: Denoiser + ?Sized>(
        &self,
        model: &M,
        x0: &Tensor,
        y: Option<&Tensor>,
        rng: &mut NoiseRng,
    ) -> Result<Losses> {
        check_input(x0, "x0")?;
        let b = x0.size()[0];
        let t = rng.randint(self.num_timesteps() as i64, b, x0.device());
        let noise = rng.randn(&x0.size(), x0.kind(), x0.device());
        self.training_losses_at(model, x0, y, &t, &noise)
    }

    /// Training losses at given timesteps `t` (Int64 `(B)`) and noise.
    ///
    /// `mse = mean_flat((target - pred)^2)` with target eps / x0 / v; with
    /// `learn_sigma`, `vlb = vlb_weight * T * vlb_terms(...)` (mean detached)
    /// and `loss = mse + vlb` (improved DDPM `L_hybrid`; DiT for T = 1000).
    pub fn training_losses_at<M: Denoiser + ?Sized>(
        &self,
        model: &M,
        x0: &Tensor,
        y: Option<&Tensor>,
        t: &Tensor,
        noise: &Tensor,
    ) -> Result<Losses> {
        check_training_inputs(x0, y, t, noise)?;
        let x_t = self.q_sample(x0, t, noise)?;
        let t_model = t.to_kind(time_kind(x0)).to_device(x0.device());
        let out = model.denoise(&x_t, &t_model, y)?;
        let c = x0.size()[1];
        check_output(&out, &x_t, self.out_channels(c))?;
        let pred = out.narrow(1, 0, c);
        let idx = self.indices(t)?;
        let at = &idx;
        let ac = &self.tables.alphas_cumprod;
        let target = match self.cfg.prediction() {
            Prediction::Eps => noise.shallow_clone(),
            Prediction::X0 | Prediction::Velocity => x0.shallow_clone(),
            Prediction::V => {
                coef(at, x0, |j| ac[j].sqrt()) * noise - coef(at, x0, |j| (1.0 - ac[j]).sqrt()) * x0
            }
        };
        let mse = mean_flat(&(target - &pred).square());
        let vlb = if self.cfg.learn_sigma {
            let w = self.cfg.vlb_weight * self.num_timesteps() as f64;
            Some(self.vlb_terms(&out, x0, &x_t, t)? * w)
        } else {
            None
        };
        let loss = match &vlb {
            Some(v) => &mse + v,
            None => mse.shallow_clone(),
        };
        Ok(Losses {
            loss,
            mse,
            vlb,
            t: t.shallow_clone(),
        })
    }

    /// The timestep grid and tables `cfg` samples with.
    pub fn sampling_schedule(&self, cfg: &SamplerConfig) -> Result<SamplingSchedule> {
        cfg.validate(&self.cfg)?;
        let grid = gaussian_grid(
            self.num_timesteps(),
            cfg.sampler,
            cfg.spacing(ProcessKind::Gaussian),
            cfg.steps,
            cfg.respacing.as_deref(),
        )?;
        let integer = grid.iter().all(|t| t.fract() == 0.0);
        let alphas_cumprod: Vec<f64> = grid.iter().map(|&t| self.tables.alpha_bar_at(t)).collect();
        let mut sigmas: Vec<f64> = grid.iter().map(|&t| self.tables.sigma_at(t)).collect();
        sigmas.push(0.0);
        let respaced = integer.then(|| {
            let kept: Vec<usize> = grid.iter().rev().map(|&t| t as usize).collect();
            self.tables.respaced(&kept)
        });
        if !integer && !matches!(cfg.sampler, SamplerKind::Euler | SamplerKind::Heun) {
            return config_err("fractional timesteps are only supported by euler and heun");
        }
        Ok(SamplingSchedule {
            timesteps: grid,
            alphas_cumprod,
            sigmas,
            respaced,
            prediction: self.cfg.prediction(),
            learn_sigma: self.cfg.learn_sigma,
            variance: self.cfg.variance,
            clip: cfg.clip_denoised,
        })
    }

    /// Draws `shape` samples: noise from `NoiseRng::with_first_row(opts.seed,
    /// opts.first_row)`, then [`GaussianDiffusion::sample_from_noise`].
    pub fn sample<M: Denoiser + ?Sized>(
        &self,
        model: &M,
        shape: &[i64],
        y: Option<&Tensor>,
        cfg: &SamplerConfig,
        opts: &SampleOptions,
        progress: impl FnMut(Progress),
    ) -> Result<Tensor> {
        let mut rng = NoiseRng::with_first_row(opts.seed, opts.first_row);
        let noise = rng.randn(shape, opts.kind, opts.device);
        self.sample_from_noise(model, &noise, y, cfg, &mut rng, progress)
    }

    /// Runs the sampler from standard-normal `noise` (the initial state is
    /// `noise`, times `sqrt(sigma_max^2 + 1)` for euler/heun, whose state is
    /// variance-exploding). Further noise (ddpm, ddim with eta > 0) comes from
    /// `rng`. Runs without gradients.
    pub fn sample_from_noise<M: Denoiser + ?Sized>(
        &self,
        model: &M,
        noise: &Tensor,
        y: Option<&Tensor>,
        cfg: &SamplerConfig,
        rng: &mut NoiseRng,
        mut progress: impl FnMut(Progress),
    ) -> Result<Tensor> {
        check_input(noise, "noise")?;
        check_labels(y, noise.size()[0])?;
        let sched = self.sampling_schedule(cfg)?;
        let _guard = tch::no_grad_guard();
        let guidance = cfg
            .guided()
            .then(|| (cfg.cfg_scale, cfg.null_class.unwrap_or(0)));
        let oc = self.out_channels(noise.size()[1]);
        let n = sched.len();
        let shape = noise.size();
        let call = |x: &Tensor, i: usize| call_model(model, x, sched.timesteps[i], y, guidance, oc);
        let mut report = |i: usize| {
            progress(Progress {
                step: i,
                total: n,
                t: sched.timesteps[i],
            })
        };
        match cfg.sampler {
            SamplerKind::Ddpm => {
                let mut x = noise.shallow_clone();
                for i in 0..n {
                    report(i);
                    let out = call(&x, i)?;
                    let z = if i + 1 < n {
                        rng.randn(&shape, noise.kind(), noise.device())
                    } else {
                        x.zeros_like()
                    };
                    x = sched.ddpm_step(&out, &x, i, &z)?;
                }
                Ok(x)
            }
            SamplerKind::Ddim => {
                let mut x = noise.shallow_clone();
                for i in 0..n {
                    report(i);
                    let out = call(&x, i)?;
                    let z = (cfg.eta > 0.0 && i + 1 < n)
                        .then(|| rng.randn(&shape, noise.kind(), noise.device()));
                    x = sched.ddim_step(&out, &x, i, cfg.eta, z.as_ref())?;
                }
                Ok(x)
            }
            SamplerKind::DpmSolverPp2M => {
                let mut x = noise.shallow_clone();
                let mut prev: Option<Tensor> = None;
                for i in 0..n {
                    report(i);
                    let out = call(&x, i)?;
                    let (next, x0) = sched.dpm_step(&out, &x, i, prev.as_ref())?;
                    x = next;
                    prev = Some(x0);
                }
                Ok(x)
            }
            SamplerKind::Euler | SamplerKind::Heun => {
                let heun = cfg.sampler == SamplerKind::Heun;
                let s0 = sched.sigmas[0];
                let mut x = noise * (s0 * s0 + 1.0).sqrt();
                for i in 0..n {
                    report(i);
                    let out = call(&sched.scale_model_input(&x, i), i)?;
                    let d = sched.ode_derivative(&out, &x, i)?;
                    let dt = sched.sigmas[i + 1] - sched.sigmas[i];
                    if heun && i + 1 < n {
                        let x2 = &x + &d * dt;
                        let out2 = call(&sched.scale_model_input(&x2, i + 1), i + 1)?;
                        let d2 = sched.ode_derivative(&out2, &x2, i + 1)?;
                        x = &x + (d + d2) * (0.5 * dt);
                    } else {
                        x = &x + d * dt;
                    }
                }
                Ok(x)
            }
        }
    }
}

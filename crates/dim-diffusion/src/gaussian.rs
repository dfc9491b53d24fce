//! Discrete-time Gaussian diffusion: training objectives (simple MSE, improved
//! DDPM / DiT hybrid with learned variance) and samplers (DDPM, DDIM,
//! DPM-Solver++ 2M / 3M / 2M SDE, Euler, Euler ancestral, Heun).
//!
//! Conventions (ADM / DiT): `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`,
//! `t` in `0..T` with `t = 0` the least noisy step; the model sees `t` as a float.

use std::f64::consts::LN_2;
use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor};

use crate::common::{
    call_model, check_input, check_labels, check_output, check_training_inputs, mean_flat,
    time_kind, Losses, Progress,
};
use crate::config::{
    BetaSchedule, DiffusionConfig, FixedVariance, InitNoise, Prediction, PrevTimestep, ProcessKind,
    SamplerConfig, SamplerKind, SigmaSchedule, Spacing,
};
use crate::denoiser::Denoiser;
use crate::error::{DiffusionError, Result};
use crate::rng::{NoiseRng, NoiseSource};
use crate::schedule::{
    betas, exponential_sigmas, gaussian_grid, interp, karras_sigmas, sigma_to_t, Tables,
};

/// diffusers' stand-in for `alpha_bar_{T-1} = 0` in its sigma-space schedulers
/// under `rescale_betas_zero_snr` (the smallest positive f16 subnormal), so
/// that `sigma_max` is finite.
pub const ZERO_SNR_ALPHA_BAR: f64 = 1.0 / 16_777_216.0;

/// Rows of the stacked training coefficient table (see [`CoefCache`]).
#[derive(Debug, Clone, Copy)]
enum Row {
    SqrtAc,
    Sqrt1mAc,
    SqrtRecipAc,
    SqrtRecipm1Ac,
    PostCoef1,
    PostCoef2,
    LogBetas,
    PostLogVarClipped,
    FixedLargeLogVar,
}
const ROWS: i64 = 9;

/// Device copies of the training coefficient tables: one stacked `(ROWS, T)`
/// tensor per (device, dtype), so that a batch's coefficients are a single
/// `index_select` with `t` on the device, without a host round trip or
/// host-to-device copies per step. The values are computed in f64 on the host
/// and converted once, element for element as a per-call conversion would, so
/// results are bit-identical to building them per step.
#[derive(Debug, Default)]
struct CoefCache(Mutex<Vec<(Device, Kind, Tensor)>>);

/// The coefficients of one batch: `(ROWS, B)`, each row viewed as `(B, 1, ...)`.
struct Coefs {
    g: Tensor,
    shape: Vec<i64>,
}

impl Coefs {
    fn get(&self, r: Row) -> Tensor {
        self.g.get(r as i64).view(self.shape.as_slice())
    }
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
    cache: Arc<CoefCache>,
}

/// What happens to a predicted x0 before it is used.
#[derive(Debug, Clone, Copy, PartialEq)]
enum X0Processing {
    None,
    /// Clamp to [-1, 1] (`clip_denoised`).
    Clip,
    /// Dynamic thresholding (`thresholding`).
    Threshold {
        ratio: f64,
        max: f64,
    },
}

/// The precomputed grid and coefficients of one sampling run, and its
/// single-step functions (for custom loops). Step functions take the raw model
/// output `out` (`(B, C, ...)`, or `(B, 2C, ...)` with learned sigma) and the
/// state `x` (`(B, C, ...)`); `i` is the grid index, 0 = noisiest.
#[derive(Debug, Clone)]
pub struct SamplingSchedule {
    /// The sampler these coefficients are for.
    pub sampler: SamplerKind,
    /// Model-facing timesteps, `N` values, decreasing (original indices;
    /// fractional for euler/euler_a/heun with `linspace`, for Karras /
    /// exponential sigmas on those, and for custom sigmas).
    pub timesteps: Vec<f64>,
    /// `alpha_bar` at each step, `N` values (the training table at integer
    /// timesteps for ddpm/ddim, `1 / (1 + sigma^2)` for sigma-space samplers).
    pub alphas_cumprod: Vec<f64>,
    /// DDIM: the `alpha_bar` each step goes to, `N` values.
    pub prev_alphas_cumprod: Vec<f64>,
    /// `sqrt((1 - abar) / abar)` at each step, then the final sigma (0 unless
    /// custom sigmas end elsewhere): `N + 1` values.
    pub sigmas: Vec<f64>,
    /// Tables of the respaced process over the grid in increasing order (the
    /// DDPM sampler's betas / posterior); `Some` for ddpm only.
    pub respaced: Option<Tables>,
    /// `(sqrt(abar), sqrt(1 - abar))` at each step.
    alpha_sigma: Vec<(f64, f64)>,
    init_sigma: f64,
    prediction: Prediction,
    learn_sigma: bool,
    variance: FixedVariance,
    x0_processing: X0Processing,
}

impl SamplingSchedule {
    /// Number of steps N.
    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// The initial state is `noise * init_noise_sigma()`: 1 for the
    /// variance-preserving samplers; for euler/euler_a/heun (variance-exploding
    /// state) `sqrt(sigma_max^2 + 1)`, or diffusers' `init_noise_sigma` with
    /// `init_noise = "diffusers"`.
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
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

    /// Predicted x0 at step `i` from a model prediction (state `x` in VP
    /// scaling), before clipping / thresholding.
    fn raw_x0(&self, pred: &Tensor, x: &Tensor, i: usize) -> Tensor {
        let (a, s) = self.alpha_sigma[i];
        match self.prediction {
            Prediction::Eps => (x - pred * s) / a,
            Prediction::X0 | Prediction::Velocity => pred.shallow_clone(),
            Prediction::V => x * a - pred * s,
        }
    }

    /// Clipping or dynamic thresholding of a predicted x0 `(B, C, ...)`.
    fn process_x0(&self, x0: Tensor) -> Tensor {
        match self.x0_processing {
            X0Processing::None => x0,
            X0Processing::Clip => x0.clamp(-1.0, 1.0),
            X0Processing::Threshold { ratio, max } => threshold(&x0, ratio, max),
        }
    }

    fn x0_from(&self, pred: &Tensor, x: &Tensor, i: usize) -> Tensor {
        self.process_x0(self.raw_x0(pred, x, i))
    }

    fn table(&self) -> Result<&Tables> {
        self.respaced.as_ref().ok_or_else(|| {
            DiffusionError::Config("ddpm_step needs a ddpm sampling schedule".into())
        })
    }

    /// One ancestral (DDPM) step from grid point `i` given the raw model
    /// output; `noise` is the standard normal added (ignored at the last
    /// step). Matches improved-DDPM `p_sample` on the respaced process and
    /// diffusers `DDPMScheduler.step` (fixed_small / fixed_large / learned_range).
    pub fn ddpm_step(&self, out: &Tensor, x: &Tensor, i: usize, noise: &Tensor) -> Result<Tensor> {
        let tb = self.table()?;
        let n = self.len();
        let j = n - 1 - i;
        let (pred, var) = self.split(out, x)?;
        let x0 = self.x0_from(&pred, x, i);
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
                Tensor::scalar_tensor(lv, (Kind::Double, Device::Cpu))
            }
        };
        Ok(mean + (log_var * 0.5).exp() * noise)
    }

    /// One DDIM step from grid point `i` to `prev_alphas_cumprod[i]` (see
    /// `prev_timestep`); `noise` is required when `eta > 0`. Matches diffusers
    /// `DDIMScheduler.step` (with `use_clipped_model_output = True` when
    /// clipping or thresholding, as improved-DDPM's `ddim_sample`).
    pub fn ddim_step(
        &self,
        out: &Tensor,
        x: &Tensor,
        i: usize,
        eta: f64,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (pred, _) = self.split(out, x)?;
        let a_prev = self.prev_alphas_cumprod[i];
        let (sa, sb) = self.alpha_sigma[i];
        let raw = self.raw_x0(&pred, x, i);
        // eps straight from the prediction (well defined at zero SNR for v),
        // or from the processed x0 when x0 was changed.
        let eps = match (self.x0_processing, self.prediction) {
            (X0Processing::None, Prediction::Eps) => pred.shallow_clone(),
            (X0Processing::None, Prediction::V) => &pred * sa + x * sb,
            _ => Tensor::new(),
        };
        let x0 = self.process_x0(raw);
        let eps = if eps.defined() {
            eps
        } else {
            (x - &x0 * sa) / sb
        };
        let sigma = self.ddim_sigma(i, eta);
        let mean = x0 * a_prev.sqrt() + eps * (1.0 - a_prev - sigma * sigma).max(0.0).sqrt();
        if sigma > 0.0 {
            let noise = noise
                .ok_or_else(|| DiffusionError::Config("ddim with eta > 0 needs noise".into()))?;
            Ok(mean + noise * sigma)
        } else {
            Ok(mean)
        }
    }

    /// DDIM's noise scale at step `i`: `eta sqrt((1 - a_prev) / (1 - a) (1 - a / a_prev))`
    /// (non-zero on the last step only when `set_alpha_to_one = false`).
    pub fn ddim_sigma(&self, i: usize, eta: f64) -> f64 {
        let (a, a_prev) = (self.alphas_cumprod[i], self.prev_alphas_cumprod[i]);
        eta * ((1.0 - a_prev) / (1.0 - a)).sqrt() * (1.0 - a / a_prev).sqrt()
    }

    /// The order DPM-Solver++ uses at step `i` with `history` earlier data
    /// predictions (diffusers: first order at the first and last step, at most
    /// second order on the second-to-last when N < 15, otherwise the solver's order).
    pub fn dpm_order(&self, i: usize, history: usize) -> usize {
        let (order, _) = self.sampler.dpm_solver().unwrap_or((1, false));
        let n = self.len();
        if i + 1 >= n {
            return 1;
        }
        let cap = if i + 2 == n && n < 15 { 2 } else { 3 };
        order.min(history + 1).min(cap)
    }

    /// One DPM-Solver++ step (2M, 3M or 2M SDE: the schedule's sampler) from
    /// grid point `i`, as diffusers `DPMSolverMultistepScheduler` (data
    /// prediction, midpoint, `lower_order_final`, final sigma 0). `history`:
    /// the data predictions x0 of the previous steps, oldest first (at least
    /// the last `order - 1`). `noise` (standard normal, `(B, C, ...)`) is
    /// needed by dpm++2m_sde unless `sigmas[i + 1] = 0`. Returns `(x_next, x0)`.
    pub fn dpm_step(
        &self,
        out: &Tensor,
        x: &Tensor,
        i: usize,
        history: &[Tensor],
        noise: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (_, sde) = self.sampler.dpm_solver().ok_or_else(|| {
            DiffusionError::Config("dpm_step needs a dpm++ sampling schedule".into())
        })?;
        let (pred, _) = self.split(out, x)?;
        let x0 = self.x0_from(&pred, x, i);
        let alpha_sigma = |s: f64| {
            let a = 1.0 / (s * s + 1.0).sqrt();
            (a, s * a)
        };
        let lam = |s: f64| {
            let (a, sg) = alpha_sigma(s);
            a.ln() - sg.ln()
        };
        let (a_t, s_t) = alpha_sigma(self.sigmas[i + 1]);
        let (_, s_0) = alpha_sigma(self.sigmas[i]);
        let h = lam(self.sigmas[i + 1]) - lam(self.sigmas[i]);
        let order = self.dpm_order(i, history.len());
        // Coefficients of x, D0, D1, D2 (DPM-Solver++ / SDE-DPM-Solver++ in
        // diffusers' form; D1 and D2 are finite differences of x0 in lambda).
        let (cx, c0, c1, c2) = if sde {
            let e2 = (-2.0 * h).exp();
            let c0 = a_t * (1.0 - e2);
            let c1 = if order == 3 {
                a_t * ((1.0 - e2) / (-2.0 * h) + 1.0)
            } else {
                0.5 * c0
            };
            let c2 = a_t * ((1.0 - e2 - 2.0 * h) / (2.0 * h).powi(2) - 0.5);
            (s_t / s_0 * (-h).exp(), c0, c1, c2)
        } else {
            let em1 = (-h).exp() - 1.0;
            let c1 = if order == 3 {
                a_t * (em1 / h + 1.0)
            } else {
                -0.5 * a_t * em1
            };
            (
                s_t / s_0,
                -a_t * em1,
                c1,
                -a_t * ((em1 + h) / (h * h) - 0.5),
            )
        };
        let mut next = x * cx + &x0 * c0;
        if order >= 2 {
            let m1 = &history[history.len() - 1];
            let h0 = lam(self.sigmas[i]) - lam(self.sigmas[i - 1]);
            let r0 = h0 / h;
            let d1_0 = (&x0 - m1) * (1.0 / r0);
            if order == 2 {
                next += d1_0 * c1;
            } else {
                let m2 = &history[history.len() - 2];
                let r1 = (lam(self.sigmas[i - 1]) - lam(self.sigmas[i - 2])) / h;
                let d1_1 = (m1 - m2) * (1.0 / r1);
                let diff = &d1_0 - d1_1;
                let d1 = d1_0 + &diff * (r0 / (r0 + r1));
                let d2 = diff * (1.0 / (r0 + r1));
                next = next + d1 * c1 + d2 * c2;
            }
        }
        if sde && s_t > 0.0 {
            let noise =
                noise.ok_or_else(|| DiffusionError::Config("dpm++2m_sde needs noise".into()))?;
            next += noise * (s_t * (1.0 - (-2.0 * h).exp()).sqrt());
        }
        Ok((next, x0))
    }

    /// For the variance-exploding state `x_ve` at grid point `i`, the model
    /// input `x_ve / sqrt(sigma^2 + 1)`.
    pub fn scale_model_input(&self, x_ve: &Tensor, i: usize) -> Tensor {
        let s = self.sigmas[i];
        x_ve / (s * s + 1.0).sqrt()
    }

    /// `d = (x_ve - x0) / sigma` at grid point `i` from the raw model output
    /// (which was computed on `scale_model_input(x_ve, i)`).
    pub fn ode_derivative(&self, out: &Tensor, x_ve: &Tensor, i: usize) -> Result<Tensor> {
        let x_in = self.scale_model_input(x_ve, i);
        let (pred, _) = self.split(out, &x_in)?;
        let x0 = self.x0_from(&pred, &x_in, i);
        Ok((x_ve - x0) / self.sigmas[i])
    }

    /// One Euler step (diffusers `EulerDiscreteScheduler.step`, no churn) in the
    /// variance-exploding state. It is also Heun's predictor: the second model
    /// call of [`SamplingSchedule::heun_step`] is at its result.
    pub fn euler_step(&self, out: &Tensor, x_ve: &Tensor, i: usize) -> Result<Tensor> {
        let d = self.ode_derivative(out, x_ve, i)?;
        Ok(x_ve + d * (self.sigmas[i + 1] - self.sigmas[i]))
    }

    /// One Heun step from grid point `i < N - 1` (diffusers
    /// `HeunDiscreteScheduler`, both stages): `out` is the model output at
    /// `scale_model_input(x_ve, i)`, `out2` the one at
    /// `scale_model_input(euler_step(out, x_ve, i), i + 1)`. The last step is
    /// [`SamplingSchedule::euler_step`].
    pub fn heun_step(
        &self,
        out: &Tensor,
        x_ve: &Tensor,
        i: usize,
        out2: &Tensor,
    ) -> Result<Tensor> {
        if i + 1 >= self.len() {
            return Err(DiffusionError::Config(
                "heun_step: the last step is an Euler step (euler_step)".into(),
            ));
        }
        let d = self.ode_derivative(out, x_ve, i)?;
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        let x2 = x_ve + &d * dt;
        let d2 = self.ode_derivative(out2, &x2, i + 1)?;
        Ok(x_ve + (d + d2) * (0.5 * dt))
    }

    /// Euler ancestral's `(sigma_down, sigma_up)` for step `i` (eta = 1).
    pub fn ancestral_sigmas(&self, i: usize) -> (f64, f64) {
        let (from, to) = (self.sigmas[i], self.sigmas[i + 1]);
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        ((to * to - up * up).sqrt(), up)
    }

    /// One Euler-ancestral step (diffusers `EulerAncestralDiscreteScheduler.step`)
    /// in the variance-exploding state: Euler to `sigma_down`, then `noise`
    /// (standard normal; needed unless `sigma_up = 0`, i.e. on the last step)
    /// times `sigma_up`.
    pub fn euler_ancestral_step(
        &self,
        out: &Tensor,
        x_ve: &Tensor,
        i: usize,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let d = self.ode_derivative(out, x_ve, i)?;
        let (down, up) = self.ancestral_sigmas(i);
        let x = x_ve + d * (down - self.sigmas[i]);
        if up > 0.0 {
            let noise =
                noise.ok_or_else(|| DiffusionError::Config("euler_a needs noise".into()))?;
            Ok(x + noise * up)
        } else {
            Ok(x)
        }
    }
}

/// Dynamic thresholding (Imagen; diffusers `_threshold_sample`, same
/// operations): per sample, `s = clamp(quantile(|x0|, ratio), 1, max)`, then
/// `clamp(x0, -s, s) / s`. Half precision is upcast to f32 for the quantile.
fn threshold(x0: &Tensor, ratio: f64, max: f64) -> Tensor {
    let kind = x0.kind();
    let b = x0.size()[0];
    let flat = x0.reshape([b, -1]);
    let flat = if matches!(kind, Kind::Float | Kind::Double) {
        flat
    } else {
        flat.to_kind(Kind::Float)
    };
    let s = flat
        .abs()
        .quantile_scalar(ratio, 1, false, "linear")
        .clamp(1.0, max)
        .unsqueeze(1);
    (flat.clamp_tensor(Some(s.neg()), Some(s.shallow_clone())) / s)
        .reshape(x0.size())
        .to_kind(kind)
}

impl GaussianDiffusion {
    /// Validates `cfg` (which must have `kind = "gaussian"`) and computes the tables.
    pub fn new(cfg: &DiffusionConfig) -> Result<Self> {
        cfg.validate()?;
        if cfg.kind != ProcessKind::Gaussian {
            return Err(DiffusionError::Config(
                "GaussianDiffusion needs kind = \"gaussian\"".into(),
            ));
        }
        Ok(Self {
            cfg: cfg.clone(),
            tables: Tables::from_betas(betas(cfg)),
            cache: Arc::default(),
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

    /// The stacked `(ROWS, T)` coefficient table on `device` in `kind` (built
    /// on first use, then cached).
    fn coef_table(&self, device: Device, kind: Kind) -> Tensor {
        let mut cache = self.cache.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, t)) = cache.iter().find(|(d, k, _)| *d == device && *k == kind) {
            return t.shallow_clone();
        }
        let tb = &self.tables;
        let ac = &tb.alphas_cumprod;
        let n = tb.len() as i64;
        // Same f64 expressions as the per-sample coefficients always used.
        let mut v: Vec<f64> = Vec::with_capacity((ROWS * n) as usize);
        v.extend(ac.iter().map(|a| a.sqrt()));
        v.extend(ac.iter().map(|a| (1.0 - a).sqrt()));
        v.extend(ac.iter().map(|a| (1.0 / a).sqrt()));
        v.extend(ac.iter().map(|a| (1.0 / a - 1.0).sqrt()));
        v.extend_from_slice(&tb.posterior_mean_coef1);
        v.extend_from_slice(&tb.posterior_mean_coef2);
        v.extend_from_slice(&tb.log_betas);
        v.extend_from_slice(&tb.posterior_log_variance_clipped);
        v.extend_from_slice(&tb.fixed_large_log_variance);
        let t = Tensor::from_slice(&v)
            .view([ROWS, n])
            .to_kind(kind)
            .to_device(device);
        cache.push((device, kind, t.shallow_clone()));
        t
    }

    /// Every coefficient at the (checked, Int64, on `x`'s device) indices `idx`,
    /// shaped for broadcasting against `x`.
    fn coefs(&self, idx: &Tensor, x: &Tensor) -> Coefs {
        let g = self.coef_table(x.device(), x.kind()).index_select(1, idx);
        let mut shape = vec![idx.size()[0]];
        shape.extend(std::iter::repeat_n(1, x.dim() - 1));
        Coefs { g, shape }
    }

    /// `t` as an Int64 index tensor on `device`, checked to lie in `0..T` with
    /// one read of a single flag (the only host sync of a training step).
    fn checked_index(&self, t: &Tensor, device: Device) -> Result<Tensor> {
        let idx = t.to_kind(Kind::Int64).flatten(0, -1).to_device(device);
        let n = self.num_timesteps() as i64;
        let bad = idx.lt(0).logical_or(&idx.ge(n)).any();
        if bad.int64_value(&[]) != 0 {
            let v: Vec<i64> = Vec::try_from(idx.to_device(Device::Cpu))?;
            let i = v.into_iter().find(|i| !(0..n).contains(i)).unwrap_or(-1);
            return Err(DiffusionError::Shape(format!(
                "timestep {i} outside 0..{n}"
            )));
        }
        Ok(idx)
    }

    /// `q(x_t | x0)`: `sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`, `t` Int64 `(B)`.
    pub fn q_sample(&self, x0: &Tensor, t: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let idx = self.checked_index(t, x0.device())?;
        Ok(self.q_sample_at(x0, &self.coefs(&idx, x0), noise))
    }

    fn q_sample_at(&self, x0: &Tensor, c: &Coefs, noise: &Tensor) -> Tensor {
        c.get(Row::SqrtAc) * x0 + c.get(Row::Sqrt1mAc) * noise
    }

    fn x0_from(&self, pred: &Tensor, x: &Tensor, c: &Coefs) -> Tensor {
        match self.cfg.prediction() {
            Prediction::Eps => c.get(Row::SqrtRecipAc) * x - c.get(Row::SqrtRecipm1Ac) * pred,
            Prediction::X0 | Prediction::Velocity => pred.shallow_clone(),
            Prediction::V => c.get(Row::SqrtAc) * x - c.get(Row::Sqrt1mAc) * pred,
        }
    }

    fn posterior_mean(&self, x0: &Tensor, x_t: &Tensor, c: &Coefs) -> Tensor {
        c.get(Row::PostCoef1) * x0 + c.get(Row::PostCoef2) * x_t
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
        let idx = self.checked_index(t, x_t.device())?;
        Ok(self.vlb_terms_at(model_out, x0, x_t, &idx))
    }

    fn vlb_terms_at(&self, model_out: &Tensor, x0: &Tensor, x_t: &Tensor, idx: &Tensor) -> Tensor {
        let c = x_t.size()[1];
        let k = self.coefs(idx, x_t);
        let pred = model_out.narrow(1, 0, c).detach();
        let model_log_var = if self.cfg.learn_sigma {
            let frac = (model_out.narrow(1, c, c) + 1.0) * 0.5;
            &frac * k.get(Row::LogBetas) + (frac.neg() + 1.0) * k.get(Row::PostLogVarClipped)
        } else {
            let row = match self.cfg.variance {
                FixedVariance::Small => Row::PostLogVarClipped,
                FixedVariance::Large => Row::FixedLargeLogVar,
            };
            k.get(row).expand_as(x_t)
        };
        let true_mean = self.posterior_mean(x0, x_t, &k);
        let true_log_var = k.get(Row::PostLogVarClipped);
        let x0_pred = self.x0_from(&pred, x_t, &k);
        let model_mean = self.posterior_mean(&x0_pred, x_t, &k);
        let kl = mean_flat(&normal_kl(
            &true_mean,
            &true_log_var,
            &model_mean,
            &model_log_var,
        )) / LN_2;
        let nll = mean_flat(
            &discretized_gaussian_log_likelihood(x0, &model_mean, &(&model_log_var * 0.5)).neg(),
        ) / LN_2;
        nll.where_self(&idx.eq(0), &kl)
    }

    /// Draws training timesteps `t ~ U{0..T-1}`, Int64 `(B)`.
    pub fn sample_t(&self, rng: &mut NoiseRng, b: i64, device: tch::Device) -> Tensor {
        rng.randint(self.num_timesteps() as i64, b, device)
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
        let idx = self.checked_index(t, x0.device())?;
        self.losses_at(model, x0, y, t, &idx, noise)
    }

    /// The losses at timesteps `t` whose table index `idx` (Int64, on
    /// `x0`'s device) is known to be in range; inputs already checked.
    pub(crate) fn losses_at<M: Denoiser + ?Sized>(
        &self,
        model: &M,
        x0: &Tensor,
        y: Option<&Tensor>,
        t: &Tensor,
        idx: &Tensor,
        noise: &Tensor,
    ) -> Result<Losses> {
        let k = self.coefs(idx, x0);
        let x_t = self.q_sample_at(x0, &k, noise);
        let t_model = t.to_kind(time_kind(x0)).to_device(x0.device());
        let out = model.denoise(&x_t, &t_model, y)?;
        let c = x0.size()[1];
        check_output(&out, &x_t, self.out_channels(c))?;
        let pred = out.narrow(1, 0, c);
        let target = match self.cfg.prediction() {
            Prediction::Eps => noise.shallow_clone(),
            Prediction::X0 | Prediction::Velocity => x0.shallow_clone(),
            Prediction::V => k.get(Row::SqrtAc) * noise - k.get(Row::Sqrt1mAc) * x0,
        };
        let mse = mean_flat(&(target - &pred).square());
        let vlb = if self.cfg.learn_sigma {
            let w = self.cfg.vlb_weight * self.num_timesteps() as f64;
            Some(self.vlb_terms_at(&out, x0, &x_t, idx) * w)
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

    /// The timesteps, sigmas and coefficients `cfg` samples with (see
    /// docs/diffusion.md for how each option maps to diffusers).
    pub fn sampling_schedule(&self, cfg: &SamplerConfig) -> Result<SamplingSchedule> {
        cfg.validate(&self.cfg)?;
        let big_t = self.num_timesteps();
        let kind = cfg.sampler;
        let spacing = cfg.spacing(ProcessKind::Gaussian);
        let ac = &self.tables.alphas_cumprod;
        let dpm = kind.dpm_solver().is_some();
        // diffusers' sigma-space schedulers replace a zero terminal alpha_bar.
        let sigma_table: Vec<f64> = ac
            .iter()
            .enumerate()
            .map(|(j, &a)| {
                let a = if self.cfg.rescale_betas_zero_snr && j + 1 == big_t && kind.sigma_space() {
                    ZERO_SNR_ALPHA_BAR
                } else {
                    a
                };
                ((1.0 - a) / a).sqrt()
            })
            .collect();
        let log_sigmas: Vec<f64> = sigma_table.iter().map(|s| s.ln()).collect();
        let (timesteps, sigmas): (Vec<f64>, Vec<f64>) = if let Some(sig) = &cfg.sigmas {
            let n = sig.len() - 1;
            let ts = sig[..n]
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas))
                .collect();
            (ts, sig.clone())
        } else {
            let grid = match &cfg.timesteps {
                Some(ts) => ts.clone(),
                None => gaussian_grid(
                    big_t,
                    kind,
                    spacing,
                    cfg.steps,
                    cfg.respacing.as_deref(),
                    cfg.steps_offset,
                )?,
            };
            let base: Vec<f64> = grid.iter().map(|&t| interp(t, &sigma_table)).collect();
            // Karras / exponential end points: of the spaced grid for
            // euler/heun, of the whole table for dpm++ (as diffusers).
            let (hi, lo) = if dpm {
                (sigma_table[big_t - 1], sigma_table[0])
            } else {
                (base[0], base[base.len() - 1])
            };
            let custom = match cfg.sigma_schedule {
                SigmaSchedule::Default => None,
                SigmaSchedule::Karras => Some(karras_sigmas(hi, lo, cfg.steps)),
                SigmaSchedule::Exponential => Some(exponential_sigmas(hi, lo, cfg.steps)),
            };
            match custom {
                None => {
                    let mut s = base;
                    s.push(0.0);
                    (grid, s)
                }
                Some(mut s) => {
                    let round = cfg.sigma_schedule == SigmaSchedule::Karras
                        && self.cfg.schedule != BetaSchedule::Cosine;
                    let ts = s
                        .iter()
                        .map(|&v| {
                            let t = sigma_to_t(v, &log_sigmas);
                            // diffusers' DPM-Solver rounds (Karras, non-cosine
                            // schedules), then casts to int64 (truncation).
                            match (dpm, round) {
                                (false, _) => t,
                                (true, true) => t.round_ties_even().trunc(),
                                (true, false) => t.trunc(),
                            }
                        })
                        .collect();
                    s.push(0.0);
                    (ts, s)
                }
            }
        };
        let n = timesteps.len();
        let table_based = !kind.sigma_space();
        let alphas_cumprod: Vec<f64> = if table_based {
            timesteps.iter().map(|&t| ac[t as usize]).collect()
        } else {
            sigmas[..n].iter().map(|s| 1.0 / (1.0 + s * s)).collect()
        };
        let alpha_sigma: Vec<(f64, f64)> = if table_based {
            alphas_cumprod
                .iter()
                .map(|a| (a.sqrt(), (1.0 - a).sqrt()))
                .collect()
        } else {
            sigmas[..n]
                .iter()
                .map(|s| {
                    let a = 1.0 / (s * s + 1.0).sqrt();
                    (a, s * a)
                })
                .collect()
        };
        let final_ac = if cfg.set_alpha_to_one { 1.0 } else { ac[0] };
        let prev_alphas_cumprod: Vec<f64> = match cfg.prev_timestep() {
            PrevTimestep::Stride => {
                let stride = (big_t / cfg.num_steps()) as f64;
                timesteps
                    .iter()
                    .map(|&t| {
                        let p = t - stride;
                        if p >= 0.0 {
                            ac[p as usize]
                        } else {
                            final_ac
                        }
                    })
                    .collect()
            }
            PrevTimestep::Grid => (0..n)
                .map(|i| alphas_cumprod.get(i + 1).copied().unwrap_or(final_ac))
                .collect(),
        };
        let respaced = (kind == SamplerKind::Ddpm).then(|| {
            let kept: Vec<usize> = timesteps.iter().rev().map(|&t| t as usize).collect();
            self.tables.respaced(&kept)
        });
        let sigma_max = sigmas.iter().copied().fold(0.0, f64::max);
        let init_sigma = if !kind.variance_exploding() {
            1.0
        } else if cfg.init_noise == InitNoise::Diffusers
            && matches!(spacing, Spacing::Linspace | Spacing::Trailing)
        {
            sigma_max
        } else {
            (sigma_max * sigma_max + 1.0).sqrt()
        };
        let x0_processing = if cfg.thresholding {
            X0Processing::Threshold {
                ratio: cfg.dynamic_thresholding_ratio,
                max: cfg.sample_max_value,
            }
        } else if cfg.clip_denoised {
            X0Processing::Clip
        } else {
            X0Processing::None
        };
        Ok(SamplingSchedule {
            sampler: kind,
            timesteps,
            alphas_cumprod,
            prev_alphas_cumprod,
            sigmas,
            respaced,
            alpha_sigma,
            init_sigma,
            prediction: self.cfg.prediction(),
            learn_sigma: self.cfg.learn_sigma,
            variance: self.cfg.variance,
            x0_processing,
        })
    }

    /// Runs the sampler from standard-normal `noise` (the initial state is
    /// `noise * init_noise_sigma()`). Further noise (ddpm, ddim with eta > 0,
    /// euler_a, dpm++2m_sde) comes from `rng`, drawn only on steps that use
    /// it, in step order. Runs without gradients.
    pub fn sample_from_noise<M: Denoiser + ?Sized>(
        &self,
        model: &M,
        noise: &Tensor,
        y: Option<&Tensor>,
        cfg: &SamplerConfig,
        rng: &mut impl NoiseSource,
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
        let mut draw = |on: bool| on.then(|| rng.noise(&shape, noise.kind(), noise.device()));
        let call = |x: &Tensor, i: usize| call_model(model, x, sched.timesteps[i], y, guidance, oc);
        let mut x = noise * sched.init_noise_sigma();
        let mut history: Vec<Tensor> = Vec::new();
        for i in 0..n {
            progress(Progress {
                step: i,
                total: n,
                t: sched.timesteps[i],
            });
            let last = i + 1 == n;
            x = match cfg.sampler {
                SamplerKind::Ddpm => {
                    let out = call(&x, i)?;
                    let z = draw(!last).unwrap_or_else(|| x.zeros_like());
                    sched.ddpm_step(&out, &x, i, &z)?
                }
                SamplerKind::Ddim => {
                    let out = call(&x, i)?;
                    let z = draw(sched.ddim_sigma(i, cfg.eta) > 0.0);
                    sched.ddim_step(&out, &x, i, cfg.eta, z.as_ref())?
                }
                SamplerKind::DpmSolverPp2M
                | SamplerKind::DpmSolverPp3M
                | SamplerKind::DpmSolverPp2MSde => {
                    let out = call(&x, i)?;
                    let sde = kind_is_sde(cfg.sampler);
                    let z = draw(sde && sched.sigmas[i + 1] > 0.0);
                    let (next, x0) = sched.dpm_step(&out, &x, i, &history, z.as_ref())?;
                    history.push(x0);
                    if history.len() > 2 {
                        drop(history.remove(0));
                    }
                    next
                }
                SamplerKind::Euler | SamplerKind::EulerAncestral | SamplerKind::Heun => {
                    let out = call(&sched.scale_model_input(&x, i), i)?;
                    match cfg.sampler {
                        SamplerKind::EulerAncestral => {
                            let z = draw(sched.ancestral_sigmas(i).1 > 0.0);
                            sched.euler_ancestral_step(&out, &x, i, z.as_ref())?
                        }
                        SamplerKind::Heun if !last => {
                            let x2 = sched.euler_step(&out, &x, i)?;
                            let out2 = call(&sched.scale_model_input(&x2, i + 1), i + 1)?;
                            sched.heun_step(&out, &x, i, &out2)?
                        }
                        _ => sched.euler_step(&out, &x, i)?,
                    }
                }
            };
        }
        Ok(x)
    }
}

fn kind_is_sde(kind: SamplerKind) -> bool {
    kind.dpm_solver().is_some_and(|(_, sde)| sde)
}

//! Noise schedules, training objectives and samplers for Gaussian diffusion and
//! flow matching on `tch`, for tensors of any shape `(B, C, ...)`.
//!
//! * [`GaussianDiffusion`]: DDPM / improved DDPM / DiT. Beta schedules
//!   (linear, scaled linear, cosine) with tables in f64; eps / v / x0
//!   prediction; learned variance with the hybrid loss; zero-terminal-SNR
//!   rescaling; samplers DDPM, DDIM, DPM-Solver++(2M, 3M, 2M SDE), Euler,
//!   Euler ancestral and Heun, with Karras / exponential / custom sigmas;
//!   improved-DDPM timestep respacing and diffusers-compatible spacings.
//! * [`FlowMatching`]: `x_t = (1 - t) x0 + t eps`, velocity `eps - x0`,
//!   uniform or logit-normal `t`, Euler and Heun samplers.
//! * [`Diffusion`]: either of them, built from a [`DiffusionConfig`].
//! * [`Denoiser`]: the model interface (closures implement it) and
//!   [`ClassifierFreeGuidance`].
//! * [`NoiseRng`]: seeded, device-independent noise.
//!
//! See `docs/diffusion.md` for the config keys.

mod common;
pub mod config;
mod denoiser;
mod error;
pub mod flow;
pub mod gaussian;
pub mod respacing;
pub mod rng;
pub mod schedule;

pub use common::{mean_flat, per_sample, Losses, Progress, SampleOptions};
pub use config::{
    BetaSchedule, Config, DiffusionConfig, FixedVariance, InitNoise, Prediction, PrevTimestep,
    ProcessKind, SamplerConfig, SamplerKind, SigmaSchedule, Spacing, TimeSampling,
};
pub use denoiser::{guided_forward, ClassifierFreeGuidance, Denoiser, FallibleFn};
pub use error::{DiffusionError, Result};
pub use flow::FlowMatching;
pub use gaussian::{GaussianDiffusion, SamplingSchedule};
pub use rng::{NoiseRng, NoiseSource};

use tch::Tensor;

/// A Gaussian diffusion or a flow-matching process, chosen by `kind`.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // built once per run
pub enum Diffusion {
    /// `kind = "gaussian"`.
    Gaussian(GaussianDiffusion),
    /// `kind = "flow"`.
    Flow(FlowMatching),
}

impl Diffusion {
    /// Validates `cfg` and builds the process.
    pub fn new(cfg: &DiffusionConfig) -> Result<Self> {
        Ok(match cfg.kind {
            ProcessKind::Gaussian => Self::Gaussian(GaussianDiffusion::new(cfg)?),
            ProcessKind::Flow => Self::Flow(FlowMatching::new(cfg)?),
        })
    }

    /// The config.
    pub fn config(&self) -> &DiffusionConfig {
        match self {
            Self::Gaussian(g) => g.config(),
            Self::Flow(f) => f.config(),
        }
    }

    /// Output channels the network needs for `c` data channels (`2c` with learned sigma).
    pub fn out_channels(&self, c: i64) -> i64 {
        self.config().out_channels(c)
    }

    /// Per-sample training losses of one batch `x0` (`(B, C, ...)`), with
    /// times from the process's `sample_t` (Gaussian: `t ~ U{0..T-1}`; flow:
    /// the configured distribution) and noise, both from `rng`. Call `losses.loss.mean(kind)` and backprop.
    pub fn training_losses<M: Denoiser + ?Sized>(
        &self,
        model: &M,
        x0: &Tensor,
        y: Option<&Tensor>,
        rng: &mut NoiseRng,
    ) -> Result<Losses> {
        common::check_input(x0, "x0")?;
        let (b, device) = (x0.size()[0], x0.device());
        // Times first, then noise, from the one stream.
        let t = match self {
            Self::Gaussian(g) => g.sample_t(rng, b, device),
            Self::Flow(f) => f.sample_t(rng, b, device),
        };
        let noise = rng.randn(&x0.size(), x0.kind(), device);
        match self {
            Self::Gaussian(g) => {
                // `t` is in range by construction: no host-synchronising check.
                common::check_training_inputs(x0, y, &t, &noise)?;
                let idx = t.to_kind(tch::Kind::Int64).to_device(device);
                g.losses_at(model, x0, y, &t, &idx, &noise)
            }
            Self::Flow(f) => f.training_losses_at(model, x0, y, &t, &noise),
        }
    }

    /// Samples a batch of `shape` (`(B, C, ...)`) with `cfg`: noise from
    /// `NoiseRng::with_first_row(opts.seed, opts.first_row)`, then the
    /// process's `sample_from_noise`. Same seed, shape, device and dtype give
    /// the same samples. `progress` is called before each step.
    pub fn sample<M: Denoiser + ?Sized>(
        &self,
        model: &M,
        shape: &[i64],
        y: Option<&Tensor>,
        cfg: &SamplerConfig,
        opts: &SampleOptions,
        progress: impl FnMut(Progress),
    ) -> Result<Tensor> {
        // One noise stream: its first draw is the initial state, the rest
        // feeds the stochastic Gaussian samplers (flow sampling is deterministic).
        let mut rng = NoiseRng::with_first_row(opts.seed, opts.first_row);
        let noise = rng.randn(shape, opts.kind, opts.device);
        match self {
            Self::Gaussian(g) => g.sample_from_noise(model, &noise, y, cfg, &mut rng, progress),
            Self::Flow(f) => f.sample_from_noise(model, &noise, y, cfg, progress),
        }
    }
}

//! Typed configuration (serde; TOML keys are the field names).
//!
//! Another crate nests these as tables, e.g. `[diffusion]` and `[sampler]`;
//! [`Config`] does exactly that for convenience. Unknown keys are rejected so
//! that typos fail loudly; call `validate()` after parsing (the constructors
//! and `sample` functions call it too).

use serde::{Deserialize, Serialize};

use crate::error::{config_err, Result};
use crate::schedule::parse_respacing;

/// Which generative process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ProcessKind {
    /// Discrete-time Gaussian diffusion (DDPM / improved DDPM / DiT).
    #[default]
    Gaussian,
    /// Rectified-flow / flow matching: `x_t = (1 - t) x0 + t eps`, `t` in [0, 1].
    Flow,
}

/// Beta schedule of a Gaussian diffusion (tables are computed in f64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `betas = linspace(beta_start, beta_end, T)` (DDPM, ADM, DiT; diffusers "linear").
    #[default]
    Linear,
    /// `betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2` (latent diffusion; diffusers "scaled_linear").
    ScaledLinear,
    /// Improved-DDPM cosine schedule, `alpha_bar(t) = cos^2((t/T + 0.008)/1.008 * pi/2)`, betas
    /// clipped at 0.999 (diffusers "squaredcos_cap_v2"; `beta_start`/`beta_end` unused).
    #[serde(alias = "squaredcos_cap_v2")]
    Cosine,
}

/// What the network predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The noise `eps` (Gaussian).
    #[serde(alias = "epsilon")]
    Eps,
    /// `v = sqrt(abar) eps - sqrt(1 - abar) x0` (Gaussian; diffusers "v_prediction").
    #[serde(alias = "v_prediction")]
    V,
    /// The clean sample `x0` (Gaussian; diffusers "sample").
    #[serde(alias = "sample")]
    X0,
    /// The flow velocity `eps - x0` (flow matching only).
    Velocity,
}

/// Reverse-process variance of a Gaussian diffusion whose model does not learn it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FixedVariance {
    /// The posterior variance `beta_tilde_t` (ADM `sigma_small`; diffusers "fixed_small").
    #[default]
    Small,
    /// `beta_t` (ADM default; diffusers "fixed_large").
    Large,
}

/// How flow-matching training draws `t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimeSampling {
    /// `t ~ U(0, 1)`.
    #[default]
    Uniform,
    /// `t = sigmoid(m + s n)`, `n ~ N(0, 1)` (SD3), with `logit_normal_mean`/`logit_normal_std`.
    LogitNormal,
}

/// The diffusion process and training objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiffusionConfig {
    /// `gaussian` or `flow`.
    pub kind: ProcessKind,
    /// Number of training timesteps T (Gaussian). For flow matching it only sets
    /// the diffusers-compatible sampling grid (`spacing = "linspace"`).
    pub timesteps: usize,
    /// Beta schedule (Gaussian).
    pub schedule: BetaSchedule,
    /// First beta of the linear schedules.
    pub beta_start: f64,
    /// Last beta of the linear schedules.
    pub beta_end: f64,
    /// Network target; default `eps` for Gaussian and `velocity` for flow.
    pub prediction: Option<Prediction>,
    /// The network also outputs C channels of variance interpolation (improved DDPM / DiT).
    pub learn_sigma: bool,
    /// Reverse variance when `learn_sigma` is false.
    pub variance: FixedVariance,
    /// Improved-DDPM's lambda: the hybrid loss is `mse + vlb_weight * T * L_t`,
    /// where `L_t` is the per-timestep VLB term in bits/dim. The default 0.001
    /// gives a factor 1 for T = 1000 (DiT/ADM `MSE`, improved-DDPM `RESCALED_MSE`).
    pub vlb_weight: f64,
    /// Flow: how training draws `t`.
    pub time_sampling: TimeSampling,
    /// Flow: logit-normal location.
    pub logit_normal_mean: f64,
    /// Flow: logit-normal scale.
    pub logit_normal_std: f64,
    /// Flow: the model receives `t * time_scale` (default 1000, as in diffusers/SD3,
    /// so that the same timestep embedding suits both processes).
    pub time_scale: f64,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self {
            kind: ProcessKind::Gaussian,
            timesteps: 1000,
            schedule: BetaSchedule::Linear,
            beta_start: 1e-4,
            beta_end: 0.02,
            prediction: None,
            learn_sigma: false,
            variance: FixedVariance::Small,
            vlb_weight: 1e-3,
            time_sampling: TimeSampling::Uniform,
            logit_normal_mean: 0.0,
            logit_normal_std: 1.0,
            time_scale: 1000.0,
        }
    }
}

impl DiffusionConfig {
    /// DiT's diffusion: linear schedule, T = 1000, eps prediction, learned sigma, hybrid loss.
    pub fn dit() -> Self {
        Self {
            learn_sigma: true,
            ..Self::default()
        }
    }

    /// Flow matching with uniform `t` and velocity prediction.
    pub fn flow() -> Self {
        Self {
            kind: ProcessKind::Flow,
            ..Self::default()
        }
    }

    /// Parses a TOML document holding these keys at top level, and validates it.
    pub fn from_toml_str(s: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(s)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The prediction target after defaults.
    pub fn prediction(&self) -> Prediction {
        self.prediction.unwrap_or(match self.kind {
            ProcessKind::Gaussian => Prediction::Eps,
            ProcessKind::Flow => Prediction::Velocity,
        })
    }

    /// Number of output channels the network must produce for `c` input channels.
    pub fn out_channels(&self, c: i64) -> i64 {
        if self.learn_sigma {
            2 * c
        } else {
            c
        }
    }

    /// Checks every value and combination; errors say which key is wrong.
    pub fn validate(&self) -> Result<()> {
        if self.timesteps < 2 {
            return config_err(format!(
                "timesteps must be at least 2, got {}",
                self.timesteps
            ));
        }
        match self.kind {
            ProcessKind::Gaussian => {
                if self.prediction() == Prediction::Velocity {
                    return config_err(
                        "prediction = \"velocity\" is for kind = \"flow\"; Gaussian diffusion predicts eps, v or x0",
                    );
                }
                if self.schedule != BetaSchedule::Cosine {
                    let ok = |b: f64| b.is_finite() && b > 0.0 && b < 1.0;
                    if !ok(self.beta_start) || !ok(self.beta_end) || self.beta_start > self.beta_end
                    {
                        return config_err(format!(
                            "need 0 < beta_start <= beta_end < 1, got beta_start = {}, beta_end = {}",
                            self.beta_start, self.beta_end
                        ));
                    }
                }
                if !(self.vlb_weight.is_finite() && self.vlb_weight >= 0.0) {
                    return config_err(format!("vlb_weight must be >= 0, got {}", self.vlb_weight));
                }
            }
            ProcessKind::Flow => {
                if self.prediction() != Prediction::Velocity {
                    return config_err(format!(
                        "kind = \"flow\" predicts the velocity eps - x0; prediction = {:?} is not supported",
                        self.prediction()
                    ));
                }
                if self.learn_sigma {
                    return config_err("learn_sigma applies only to kind = \"gaussian\"");
                }
                if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
                    return config_err(format!("time_scale must be > 0, got {}", self.time_scale));
                }
                if !(self.logit_normal_std.is_finite()
                    && self.logit_normal_std > 0.0
                    && self.logit_normal_mean.is_finite())
                {
                    return config_err("logit_normal_std must be > 0 and logit_normal_mean finite");
                }
            }
        }
        Ok(())
    }
}

/// Sampling algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    /// Ancestral sampling (DDPM / improved DDPM, learned or fixed variance). Gaussian only.
    #[default]
    Ddpm,
    /// DDIM with `eta` (0 = deterministic). Gaussian only.
    Ddim,
    /// DPM-Solver++(2M), multistep, data prediction, midpoint (diffusers defaults). Gaussian only.
    #[serde(rename = "dpm++2m", alias = "dpmpp_2m", alias = "dpm_solver_pp_2m")]
    DpmSolverPp2M,
    /// Euler on the probability-flow ODE (Gaussian: in sigma space like
    /// diffusers' EulerDiscreteScheduler; flow: FlowMatchEulerDiscreteScheduler).
    Euler,
    /// Heun's second-order method (Karras et al. Algorithm 1 without churn; the
    /// last step, to sigma = 0 / t = 0, is an Euler step). `2N - 1` model calls.
    Heun,
}

/// How the sampling timesteps are chosen among the T training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Spacing {
    /// improved-DDPM `space_timesteps(T, "N")`: N evenly spaced (rounded) indices from 0 to T-1.
    Adm,
    /// diffusers "leading" (for each sampler, the matching diffusers scheduler's formula).
    Leading,
    /// diffusers "trailing".
    Trailing,
    /// diffusers "linspace" (flow: FlowMatchEuler's `linspace(1, 1/T, N)`).
    Linspace,
    /// Flow only: `t_i = 1 - i/N`.
    Uniform,
}

/// How to sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplerConfig {
    /// Algorithm.
    pub sampler: SamplerKind,
    /// Number of sampling steps (grid points); at most T for Gaussian diffusion.
    pub steps: usize,
    /// Timestep spacing; default `adm` for ddpm/ddim, `linspace` for
    /// dpm++2m/euler/heun, `uniform` for flow (see [`SamplerConfig::spacing`]).
    pub spacing: Option<Spacing>,
    /// improved-DDPM respacing string ("250", "ddim50", "10,15,20"); overrides
    /// `steps`/`spacing` (then `steps` must be left at its default or agree).
    pub respacing: Option<String>,
    /// DDIM stochasticity (0 = deterministic, 1 = DDPM-like variance).
    pub eta: f64,
    /// Classifier-free guidance scale `s`: `out = uncond + s (cond - uncond)`; 1 = off.
    pub cfg_scale: f64,
    /// The class index meaning "no class" (DiT: `num_classes`); required when `cfg_scale != 1`.
    pub null_class: Option<i64>,
    /// Clamp predicted `x0` to [-1, 1] (ADM `clip_denoised`, diffusers `clip_sample`).
    pub clip_denoised: bool,
    /// Flow only: SD3 time shift `t' = s t / (1 + (s - 1) t)` (1 = none).
    pub shift: f64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            sampler: SamplerKind::Ddpm,
            steps: 250,
            spacing: None,
            respacing: None,
            eta: 0.0,
            cfg_scale: 1.0,
            null_class: None,
            clip_denoised: false,
            shift: 1.0,
        }
    }
}

impl SamplerConfig {
    /// A config with `sampler` and `steps`, everything else default.
    pub fn new(sampler: SamplerKind, steps: usize) -> Self {
        Self {
            sampler,
            steps,
            ..Self::default()
        }
    }

    /// Parses a TOML document holding these keys at top level (not validated:
    /// validation needs the [`DiffusionConfig`]).
    pub fn from_toml_str(s: &str) -> Result<Self> {
        Ok(toml::from_str(s)?)
    }

    /// The spacing after defaults: flow `uniform`; ddpm/ddim `adm` (improved
    /// DDPM / DiT); dpm++2m, euler and heun `linspace` (their diffusers
    /// defaults). Grids that contain t = 0 (`adm`) make the last interval in
    /// log-SNR very long, which DPM-Solver++'s second-order extrapolation
    /// handles badly, hence its different default.
    pub fn spacing(&self, kind: ProcessKind) -> Spacing {
        self.spacing.unwrap_or(match (kind, self.sampler) {
            (ProcessKind::Flow, _) => Spacing::Uniform,
            (_, SamplerKind::Ddpm | SamplerKind::Ddim) => Spacing::Adm,
            _ => Spacing::Linspace,
        })
    }

    /// Whether classifier-free guidance is on.
    pub fn guided(&self) -> bool {
        self.cfg_scale != 1.0
    }

    /// Checks this sampler config against the diffusion it will sample.
    pub fn validate(&self, diffusion: &DiffusionConfig) -> Result<()> {
        diffusion.validate()?;
        let t = diffusion.timesteps;
        let name = format!("{:?}", self.sampler).to_lowercase();
        if self.steps == 0 {
            return config_err("steps must be at least 1");
        }
        if !(self.cfg_scale.is_finite() && self.cfg_scale >= 0.0) {
            return config_err(format!(
                "cfg_scale must be finite and >= 0, got {}",
                self.cfg_scale
            ));
        }
        if self.guided() && self.null_class.is_none() {
            return config_err(format!(
                "classifier-free guidance (cfg_scale = {}) needs null_class (the model's \"no class\" label, DiT: num_classes)",
                self.cfg_scale
            ));
        }
        if self.null_class.is_some_and(|n| n < 0) {
            return config_err("null_class must be >= 0");
        }
        if !(self.eta.is_finite() && self.eta >= 0.0) {
            return config_err(format!("eta must be >= 0, got {}", self.eta));
        }
        if self.eta != 0.0 && self.sampler != SamplerKind::Ddim {
            return config_err(format!(
                "eta applies only to sampler = \"ddim\", not {name}"
            ));
        }
        let spacing = self.spacing(diffusion.kind);
        match diffusion.kind {
            ProcessKind::Gaussian => {
                if spacing == Spacing::Uniform {
                    return config_err(
                        "spacing = \"uniform\" is for flow matching; use adm, leading, trailing or linspace",
                    );
                }
                if self.shift != 1.0 {
                    return config_err("shift applies only to flow matching");
                }
                if let Some(r) = &self.respacing {
                    let n = parse_respacing(t, r)?.len();
                    if self.steps != SamplerConfig::default().steps && self.steps != n {
                        return config_err(format!(
                            "respacing {r:?} gives {n} steps but steps = {}; leave steps out or make them agree",
                            self.steps
                        ));
                    }
                } else if self.steps > t {
                    return config_err(format!(
                        "steps = {} is more than the diffusion's {t} training timesteps",
                        self.steps
                    ));
                } else if spacing == Spacing::Leading
                    && self.sampler == SamplerKind::DpmSolverPp2M
                    && t / (self.steps + 1) == 0
                {
                    return config_err(format!(
                        "leading spacing needs steps < T for dpm++2m, got {}",
                        self.steps
                    ));
                }
            }
            ProcessKind::Flow => {
                if matches!(
                    self.sampler,
                    SamplerKind::Ddpm | SamplerKind::Ddim | SamplerKind::DpmSolverPp2M
                ) {
                    return config_err(format!(
                        "sampler {name} is for Gaussian diffusion; flow matching supports euler and heun"
                    ));
                }
                if self.respacing.is_some() {
                    return config_err("respacing applies only to Gaussian diffusion");
                }
                if !matches!(spacing, Spacing::Uniform | Spacing::Linspace) {
                    return config_err(format!(
                        "flow matching supports spacing = \"uniform\" or \"linspace\", not {spacing:?}"
                    ));
                }
                if !(self.shift.is_finite() && self.shift > 0.0) {
                    return config_err(format!("shift must be > 0, got {}", self.shift));
                }
                if self.clip_denoised {
                    return config_err("clip_denoised applies only to Gaussian diffusion");
                }
            }
        }
        Ok(())
    }
}

/// `[diffusion]` and `[sampler]` tables of one TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The process and objective.
    pub diffusion: DiffusionConfig,
    /// How to sample.
    pub sampler: SamplerConfig,
}

impl Config {
    /// Parses and validates both tables.
    pub fn from_toml_str(s: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(s)?;
        cfg.sampler.validate(&cfg.diffusion)?;
        Ok(cfg)
    }
}

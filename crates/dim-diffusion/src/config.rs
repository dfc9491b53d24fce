//! Typed configuration (serde; TOML keys are the field names).
//!
//! Another crate nests these as tables, e.g. `[diffusion]` and `[sampler]`;
//! [`Config`] does exactly that for convenience. Unknown keys are rejected so
//! that typos fail loudly; call `validate()` after parsing (the constructors
//! and `sample` functions call it too).

use serde::{Deserialize, Serialize};

use crate::error::{config_err, Result};
use crate::respacing::parse_respacing;

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
    /// Gaussian: rescale the betas to zero terminal SNR (`alpha_bar_{T-1} = 0`;
    /// Lin et al. 2023, diffusers `rescale_betas_zero_snr`). Pair it with `v`
    /// or `x0` prediction: eps cannot recover x0 at zero SNR.
    pub rescale_betas_zero_snr: bool,
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
            rescale_betas_zero_snr: false,
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
                if self.rescale_betas_zero_snr {
                    return config_err(
                        "rescale_betas_zero_snr applies only to kind = \"gaussian\"",
                    );
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
    #[serde(
        rename = "dpm++2m",
        alias = "dpm++",
        alias = "dpmpp_2m",
        alias = "dpm_solver_pp_2m"
    )]
    DpmSolverPp2M,
    /// DPM-Solver++(3M): third-order multistep (diffusers `solver_order = 3`). Gaussian only.
    #[serde(rename = "dpm++3m", alias = "dpmpp_3m")]
    DpmSolverPp3M,
    /// SDE-DPM-Solver++(2M) (diffusers `algorithm_type = "sde-dpmsolver++"`):
    /// stochastic, noise from the sampler's noise source. Gaussian only.
    #[serde(rename = "dpm++2m_sde", alias = "dpmpp_2m_sde", alias = "dpm++2m-sde")]
    DpmSolverPp2MSde,
    /// Euler on the probability-flow ODE (Gaussian: in sigma space like
    /// diffusers' EulerDiscreteScheduler; flow: FlowMatchEulerDiscreteScheduler).
    Euler,
    /// Euler ancestral (diffusers EulerAncestralDiscreteScheduler, k-diffusion
    /// `sample_euler_ancestral` with eta 1). Gaussian only.
    #[serde(rename = "euler_a", alias = "euler_ancestral")]
    EulerAncestral,
    /// Heun's second-order method (Karras et al. Algorithm 1 without churn; the
    /// last step, to sigma = 0 / t = 0, is an Euler step). `2N - 1` model calls.
    Heun,
}

impl SamplerKind {
    /// Every sampler, by its config / command-line name.
    pub const ALL: [(&'static str, SamplerKind); 8] = [
        ("ddpm", SamplerKind::Ddpm),
        ("ddim", SamplerKind::Ddim),
        ("dpm++2m", SamplerKind::DpmSolverPp2M),
        ("dpm++3m", SamplerKind::DpmSolverPp3M),
        ("dpm++2m_sde", SamplerKind::DpmSolverPp2MSde),
        ("euler", SamplerKind::Euler),
        ("euler_a", SamplerKind::EulerAncestral),
        ("heun", SamplerKind::Heun),
    ];

    /// The config name (`"dpm++2m"`, `"euler_a"`, ...).
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, k)| *k == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }

    /// `Some((order, sde))` for the DPM-Solver++ family.
    pub fn dpm_solver(self) -> Option<(usize, bool)> {
        match self {
            Self::DpmSolverPp2M => Some((2, false)),
            Self::DpmSolverPp3M => Some((3, false)),
            Self::DpmSolverPp2MSde => Some((2, true)),
            _ => None,
        }
    }

    /// Samplers that integrate in sigma space on a variance-exploding state
    /// (diffusers' Euler/Heun family): euler, euler_a, heun.
    pub fn variance_exploding(self) -> bool {
        matches!(self, Self::Euler | Self::EulerAncestral | Self::Heun)
    }

    /// Samplers whose steps are defined by sigmas alone (so Karras /
    /// exponential sigmas and custom sigmas apply): the DPM-Solver++ family
    /// and the variance-exploding ones.
    pub fn sigma_space(self) -> bool {
        self.variance_exploding() || self.dpm_solver().is_some()
    }
}

impl std::str::FromStr for SamplerKind {
    type Err = crate::DiffusionError;

    /// Parses a config name or alias (`"dpm++"`, `"euler_ancestral"`, ...), as in TOML.
    fn from_str(s: &str) -> Result<Self> {
        use serde::de::IntoDeserializer;
        let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            s.into_deserializer();
        Self::deserialize(de).map_err(|_| {
            let names: Vec<&str> = Self::ALL.iter().map(|(n, _)| *n).collect();
            crate::DiffusionError::Config(format!(
                "unknown sampler `{s}`: use {}",
                names.join(", ")
            ))
        })
    }
}

/// The noise levels a sigma-space sampler walks (diffusers `use_karras_sigmas`
/// / `use_exponential_sigmas`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SigmaSchedule {
    /// The sigmas of the spaced timesteps.
    #[default]
    Default,
    /// Karras et al. (2022), rho = 7, between the largest and smallest sigma
    /// (euler/heun: of the spaced grid; dpm++: of the whole training table, as diffusers).
    Karras,
    /// Geometric between the same end points.
    Exponential,
}

/// Where a DDIM step goes from timestep `t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrevTimestep {
    /// `t - T / N` (integer division; diffusers' DDIMScheduler). Off the grid for
    /// `linspace`, and for `trailing` when N does not divide T.
    Stride,
    /// The next grid point (improved-DDPM's respaced DDIM).
    Grid,
}

/// Scale of the initial state of the variance-exploding samplers (euler, euler_a, heun).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InitNoise {
    /// `noise * sqrt(sigma_max^2 + 1)`: the exact prior of the VE state.
    #[default]
    Exact,
    /// diffusers' `init_noise_sigma`: `noise * sigma_max` for `linspace` and
    /// `trailing` spacing, `noise * sqrt(sigma_max^2 + 1)` otherwise.
    Diffusers,
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
    /// Karras or exponential sigmas (euler, heun, dpm++ family).
    pub sigma_schedule: SigmaSchedule,
    /// Custom decreasing model timesteps (original indices, fractional allowed
    /// for sigma-space samplers); overrides `steps`/`spacing`.
    pub timesteps: Option<Vec<f64>>,
    /// Custom decreasing sigmas, `N + 1` values including the final one
    /// (usually 0); sigma-space samplers only. Overrides `steps`/`spacing`.
    pub sigmas: Option<Vec<f64>>,
    /// DDIM: where a step goes; default `stride` for the diffusers spacings
    /// (leading/trailing/linspace), `grid` for `adm`, respacing and custom timesteps.
    pub prev_timestep: Option<PrevTimestep>,
    /// DDIM: the last step goes to `alpha_bar = 1` (true) or to `alpha_bar_0`
    /// (false; diffusers `set_alpha_to_one`).
    pub set_alpha_to_one: bool,
    /// Added to `leading` timesteps (diffusers `steps_offset`; Stable Diffusion uses 1).
    pub steps_offset: usize,
    /// euler / euler_a / heun: scale of the initial state.
    pub init_noise: InitNoise,
    /// Dynamic thresholding of predicted x0 (Imagen; diffusers `thresholding`):
    /// per sample, `s = clamp(quantile(|x0|, ratio), 1, sample_max_value)`,
    /// `x0 = clamp(x0, -s, s) / s`. Gaussian only; replaces `clip_denoised`.
    pub thresholding: bool,
    /// Quantile of the dynamic threshold.
    pub dynamic_thresholding_ratio: f64,
    /// Upper bound of the dynamic threshold.
    pub sample_max_value: f64,
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
            sigma_schedule: SigmaSchedule::Default,
            timesteps: None,
            sigmas: None,
            prev_timestep: None,
            set_alpha_to_one: true,
            steps_offset: 0,
            init_noise: InitNoise::Exact,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
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

    /// DDIM's step target after defaults (see [`SamplerConfig::prev_timestep`]).
    pub fn prev_timestep(&self) -> PrevTimestep {
        self.prev_timestep.unwrap_or(
            if self.respacing.is_some()
                || self.timesteps.is_some()
                || self.spacing(ProcessKind::Gaussian) == Spacing::Adm
            {
                PrevTimestep::Grid
            } else {
                PrevTimestep::Stride
            },
        )
    }

    /// Number of sampling steps after custom timesteps / sigmas.
    pub fn num_steps(&self) -> usize {
        match (&self.timesteps, &self.sigmas) {
            (Some(t), _) => t.len(),
            (None, Some(s)) => s.len().saturating_sub(1),
            _ => self.steps,
        }
    }

    /// Whether classifier-free guidance is on.
    pub fn guided(&self) -> bool {
        self.cfg_scale != 1.0
    }

    /// Checks this sampler config against the diffusion it will sample.
    pub fn validate(&self, diffusion: &DiffusionConfig) -> Result<()> {
        diffusion.validate()?;
        let t = diffusion.timesteps;
        let name = self.sampler.name();
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
        if self.prev_timestep.is_some() && self.sampler != SamplerKind::Ddim {
            return config_err(format!(
                "prev_timestep applies only to sampler = \"ddim\", not {name}"
            ));
        }
        if self.sigma_schedule != SigmaSchedule::Default && !self.sampler.sigma_space() {
            return config_err(format!(
                "sigma_schedule = {:?} needs a sigma-space sampler (euler, euler_a, heun, dpm++*), not {name}",
                self.sigma_schedule
            ));
        }
        if self.thresholding {
            let ratio_ok =
                self.dynamic_thresholding_ratio > 0.0 && self.dynamic_thresholding_ratio <= 1.0;
            if !(ratio_ok && self.sample_max_value.is_finite() && self.sample_max_value > 0.0) {
                return config_err(
                    "thresholding needs 0 < dynamic_thresholding_ratio <= 1 and sample_max_value > 0",
                );
            }
            if self.clip_denoised {
                return config_err("thresholding and clip_denoised are exclusive");
            }
        }
        let custom = [
            ("timesteps", self.timesteps.is_some()),
            ("sigmas", self.sigmas.is_some()),
            ("respacing", self.respacing.is_some()),
        ];
        let overrides: Vec<&str> = custom.iter().filter(|c| c.1).map(|c| c.0).collect();
        if overrides.len() > 1 {
            return config_err(format!("set only one of {}", overrides.join(", ")));
        }
        if !overrides.is_empty() && self.sigma_schedule != SigmaSchedule::Default {
            return config_err(format!(
                "{} cannot be combined with sigma_schedule = {:?}",
                overrides[0], self.sigma_schedule
            ));
        }
        if let Some(ts) = &self.timesteps {
            let ok = !ts.is_empty()
                && ts
                    .iter()
                    .all(|v| v.is_finite() && *v >= 0.0 && *v <= (t - 1) as f64)
                && ts.windows(2).all(|w| w[1] < w[0]);
            if !ok {
                return config_err(format!(
                    "timesteps must be a non-empty strictly decreasing list in [0, {}]",
                    t - 1
                ));
            }
            let integer = ts.iter().all(|v| v.fract() == 0.0);
            if !integer && !self.sampler.sigma_space() {
                return config_err(format!(
                    "fractional timesteps need a sigma-space sampler, not {name}"
                ));
            }
        }
        if let Some(sig) = &self.sigmas {
            let ok = sig.len() >= 2
                && sig.iter().all(|v| v.is_finite() && *v >= 0.0)
                && sig.windows(2).all(|w| w[1] < w[0]);
            if !ok {
                return config_err(
                    "sigmas must be N + 1 >= 2 finite, strictly decreasing values >= 0 (the last usually 0)",
                );
            }
            if !self.sampler.sigma_space() {
                return config_err(format!(
                    "custom sigmas need a sigma-space sampler (euler, euler_a, heun, dpm++*), not {name}"
                ));
            }
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
                if diffusion.rescale_betas_zero_snr
                    && diffusion.prediction() == Prediction::Eps
                    && matches!(self.sampler, SamplerKind::Ddpm | SamplerKind::Ddim)
                {
                    return config_err(format!(
                        "rescale_betas_zero_snr with eps prediction cannot sample with {name} (x0 is undefined at zero SNR); use v or x0 prediction"
                    ));
                }
                if let Some(r) = &self.respacing {
                    let n = parse_respacing(t, r)?.len();
                    if self.steps != SamplerConfig::default().steps && self.steps != n {
                        return config_err(format!(
                            "respacing {r:?} gives {n} steps but steps = {}; leave steps out or make them agree",
                            self.steps
                        ));
                    }
                } else if self.timesteps.is_none() && self.sigmas.is_none() {
                    if self.steps > t {
                        return config_err(format!(
                            "steps = {} is more than the diffusion's {t} training timesteps",
                            self.steps
                        ));
                    }
                    if spacing == Spacing::Leading
                        && self.sampler.dpm_solver().is_some()
                        && t / (self.steps + 1) == 0
                    {
                        return config_err(format!(
                            "leading spacing needs steps < T for {name}, got {}",
                            self.steps
                        ));
                    }
                }
            }
            ProcessKind::Flow => {
                if !matches!(self.sampler, SamplerKind::Euler | SamplerKind::Heun) {
                    return config_err(format!(
                        "sampler {name} is for Gaussian diffusion; flow matching supports euler and heun"
                    ));
                }
                if self.respacing.is_some() || self.timesteps.is_some() || self.sigmas.is_some() {
                    return config_err(
                        "respacing, timesteps and sigmas apply only to Gaussian diffusion",
                    );
                }
                if self.sigma_schedule != SigmaSchedule::Default {
                    return config_err("sigma_schedule applies only to Gaussian diffusion");
                }
                if !matches!(spacing, Spacing::Uniform | Spacing::Linspace) {
                    return config_err(format!(
                        "flow matching supports spacing = \"uniform\" or \"linspace\", not {spacing:?}"
                    ));
                }
                if !(self.shift.is_finite() && self.shift > 0.0) {
                    return config_err(format!("shift must be > 0, got {}", self.shift));
                }
                if self.clip_denoised || self.thresholding {
                    return config_err(
                        "clip_denoised and thresholding apply only to Gaussian diffusion",
                    );
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
    /// Parses and validates both tables. A `[sampler]` that leaves `steps`
    /// out gets the default (250) capped at a Gaussian diffusion's
    /// `timesteps`: a default follows from what the config did set, so
    /// `[diffusion] timesteps = 100` alone samples with 100 steps.
    pub fn from_toml_str(s: &str) -> Result<Self> {
        let table: toml::Table = toml::from_str(s)?;
        let steps_given = table
            .get("sampler")
            .and_then(|t| t.as_table())
            .is_some_and(|t| t.contains_key("steps"));
        let mut cfg: Self = table.try_into()?;
        let sampler = &mut cfg.sampler;
        if !steps_given
            && cfg.diffusion.kind == ProcessKind::Gaussian
            && sampler.respacing.is_none()
            && sampler.timesteps.is_none()
            && sampler.sigmas.is_none()
        {
            sampler.steps = sampler.steps.min(cfg.diffusion.timesteps);
        }
        cfg.sampler.validate(&cfg.diffusion)?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_steps_follow_the_timesteps() {
        // Left out: capped at T.
        let c = Config::from_toml_str("[diffusion]\ntimesteps = 100\n").unwrap();
        assert_eq!(c.sampler.steps, 100);
        let c = Config::from_toml_str("[diffusion]\ntimesteps = 1000\n[sampler]\n").unwrap();
        assert_eq!(c.sampler.steps, SamplerConfig::default().steps);
        // Asked for: kept, and too many is still an error that says so.
        let c =
            Config::from_toml_str("[diffusion]\ntimesteps = 100\n[sampler]\nsteps = 40\n").unwrap();
        assert_eq!(c.sampler.steps, 40);
        let e = Config::from_toml_str("[diffusion]\ntimesteps = 100\n[sampler]\nsteps = 250\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than"), "{e}");
    }
}

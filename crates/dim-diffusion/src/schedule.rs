//! Noise schedules, coefficient tables (f64) and timestep grids.

use crate::config::{BetaSchedule, DiffusionConfig, SamplerKind, Spacing};
use crate::error::{config_err, Result};
// Respacing strings are parsed in their own module (the config validates
// them too); re-exported here, where the grids use them.
pub use crate::respacing::parse_respacing;

/// The beta table of a Gaussian diffusion config, computed in f64 (rescaled to
/// zero terminal SNR when `rescale_betas_zero_snr`).
pub fn betas(cfg: &DiffusionConfig) -> Vec<f64> {
    let b = base_betas(cfg);
    if cfg.rescale_betas_zero_snr {
        rescale_zero_terminal_snr(&b)
    } else {
        b
    }
}

/// diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023, Algorithm 1), same
/// operation order: shift `sqrt(alpha_bar)` so that its last value is 0 and
/// scale it so that its first is unchanged, then recover the betas.
pub fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let mut prod = 1.0f64;
    let mut sq: Vec<f64> = betas
        .iter()
        .map(|b| {
            prod *= 1.0 - b;
            prod.sqrt()
        })
        .collect();
    let (first, last) = (sq[0], sq[sq.len() - 1]);
    for v in &mut sq {
        *v -= last;
        *v *= first / (first - last);
    }
    let ab: Vec<f64> = sq.iter().map(|v| v * v).collect();
    (0..ab.len())
        .map(|i| 1.0 - if i == 0 { ab[0] } else { ab[i] / ab[i - 1] })
        .collect()
}

fn base_betas(cfg: &DiffusionConfig) -> Vec<f64> {
    let t = cfg.timesteps;
    match cfg.schedule {
        BetaSchedule::Linear => linspace(cfg.beta_start, cfg.beta_end, t),
        BetaSchedule::ScaledLinear => linspace(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), t)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        BetaSchedule::Cosine => {
            let f = |s: f64| {
                ((s + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                    .cos()
                    .powi(2)
            };
            (0..t)
                .map(|i| {
                    let (t1, t2) = (i as f64 / t as f64, (i + 1) as f64 / t as f64);
                    (1.0 - f(t2) / f(t1)).min(0.999)
                })
                .collect()
        }
    }
}

/// `numpy.linspace(start, stop, n)` (same arithmetic, so the same f64 values).
pub fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|k| k as f64 * step + start).collect();
            v[n - 1] = stop;
            v
        }
    }
}

/// `numpy.interp(t, arange(len(table)), table)`: linear between integer
/// points, clamped at the ends, exact at integers.
pub fn interp(t: f64, table: &[f64]) -> f64 {
    let last = table.len() - 1;
    if t <= 0.0 {
        return table[0];
    }
    if t >= last as f64 {
        return table[last];
    }
    let i = t.floor() as usize;
    let w = t - i as f64;
    if w == 0.0 {
        table[i]
    } else {
        table[i] + w * (table[i + 1] - table[i])
    }
}

/// `numpy.arange(start, stop, step)` for floats, with numpy's arithmetic: the
/// length is `ceil((stop - start) / step)`, element 1 is `start + step` and
/// element `i >= 2` is `start + i * ((start + step) - start)`.
pub fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// diffusers' `trailing` timesteps: `round(arange(T, 0, -T/N)) - 1`, with
/// numpy's `arange` arithmetic (its accumulated rounding decides ties). Where
/// numpy's length rounds up to N + 1 (e.g. T = 1000, N = 61), diffusers keeps an
/// extra final timestep -1; this keeps the first N.
pub fn trailing_timesteps(num_timesteps: usize, steps: usize) -> Vec<f64> {
    let t = num_timesteps as f64;
    numpy_arange(t, 0.0, -(t / steps as f64))
        .into_iter()
        .take(steps)
        .map(|v| v.round_ties_even() - 1.0)
        .collect()
}

/// The decreasing grid of (original-index) timesteps a Gaussian sampler visits.
/// After the last grid point every sampler goes to `alpha_bar = 1` (x0).
///
/// `Adm` is `space_timesteps(T, "steps")`; `Leading`, `Trailing` and `Linspace`
/// reproduce the `set_timesteps` of the diffusers scheduler that corresponds
/// to `sampler` (DDPMScheduler/DDIMScheduler for ddpm/ddim,
/// DPMSolverMultistepScheduler for the dpm++ family, Euler(Ancestral)Discrete
/// and HeunDiscrete for euler/euler_a/heun), `steps_offset` included (it
/// shifts `leading` only, as there). Only euler/euler_a/heun with `Linspace`
/// produce fractional timesteps.
pub fn gaussian_grid(
    num_timesteps: usize,
    sampler: SamplerKind,
    spacing: Spacing,
    steps: usize,
    respacing: Option<&str>,
    steps_offset: usize,
) -> Result<Vec<f64>> {
    let t = num_timesteps;
    let n = steps;
    if let Some(r) = respacing {
        return Ok(parse_respacing(t, r)?
            .into_iter()
            .rev()
            .map(|v| v as f64)
            .collect());
    }
    if n == 0 || n > t {
        return config_err(format!("steps must be in 1..={t}, got {n}"));
    }
    let dpm = sampler.dpm_solver().is_some();
    let continuous = sampler.variance_exploding();
    let offset = steps_offset as f64;
    let mut grid: Vec<f64> = match spacing {
        Spacing::Adm => parse_respacing(t, &n.to_string())?
            .into_iter()
            .map(|v| v as f64)
            .collect(),
        Spacing::Leading if dpm => {
            let ratio = t / (n + 1);
            if ratio == 0 {
                return config_err("leading spacing for dpm++ needs steps < T");
            }
            (1..=n).map(|i| (i * ratio) as f64 + offset).collect()
        }
        Spacing::Leading => {
            let ratio = t / n;
            (0..n).map(|i| (i * ratio) as f64 + offset).collect()
        }
        Spacing::Trailing => trailing_timesteps(t, n),
        Spacing::Linspace if dpm => {
            let mut v: Vec<f64> = linspace(0.0, (t - 1) as f64, n + 1)
                .into_iter()
                .map(f64::round_ties_even)
                .collect();
            v.remove(0);
            v
        }
        Spacing::Linspace if continuous => linspace(0.0, (t - 1) as f64, n),
        Spacing::Linspace => linspace(0.0, (t - 1) as f64, n)
            .into_iter()
            .map(f64::round_ties_even)
            .collect(),
        Spacing::Uniform => {
            return config_err("spacing = \"uniform\" is for flow matching");
        }
    };
    grid.sort_by(|a, b| b.partial_cmp(a).expect("finite timesteps"));
    grid.dedup();
    if grid[0] > (t - 1) as f64 {
        return config_err(format!(
            "steps_offset = {steps_offset} puts timestep {} beyond T - 1 = {}",
            grid[0],
            t - 1
        ));
    }
    Ok(grid)
}

/// diffusers' `_sigma_to_t`: the fractional timestep whose (linearly
/// interpolated in log sigma) noise level is `sigma`, given `log_sigmas` of the
/// training table (increasing); clamped to `[0, T - 1]`.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // numpy: cumsum(dists >= 0).argmax() is the last index with log_sigmas[i] <= log_sigma
    // (0 when there is none), clipped to n - 2.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// Karras et al. (2022) sigmas, rho = 7, `n` values from `sigma_max` down to
/// `sigma_min` (diffusers `_convert_to_karras`, same arithmetic).
pub fn karras_sigmas(sigma_max: f64, sigma_min: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Geometric sigmas from `sigma_max` to `sigma_min` (diffusers `_convert_to_exponential`).
pub fn exponential_sigmas(sigma_max: f64, sigma_min: f64, n: usize) -> Vec<f64> {
    linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// The decreasing flow-matching time grid from 1 (noise) to 0 (data), `steps + 1`
/// points including the final 0. `Uniform`: `1 - i/N`. `Linspace`: diffusers
/// FlowMatchEulerDiscreteScheduler, `linspace(1, shift(1/T), N)` then `0`.
/// Every point except the final 0 is then shifted by `t' = s t / (1 + (s-1) t)`.
pub fn flow_grid(
    steps: usize,
    spacing: Spacing,
    num_timesteps: usize,
    shift: f64,
) -> Result<Vec<f64>> {
    let sh = |t: f64| shift * t / (1.0 + (shift - 1.0) * t);
    let n = steps;
    if n == 0 {
        return config_err("steps must be at least 1");
    }
    let mut g: Vec<f64> = match spacing {
        Spacing::Uniform => (0..n).map(|i| 1.0 - i as f64 / n as f64).collect(),
        Spacing::Linspace => {
            let t = num_timesteps as f64;
            // diffusers: sigma_max = 1, sigma_min = shift(1/T), timesteps in units of T.
            linspace(1.0 * t, sh(1.0 / t) * t, n)
                .into_iter()
                .map(|v| v / t)
                .collect()
        }
        other => return config_err(format!("flow matching has no {other:?} spacing")),
    };
    for v in &mut g {
        *v = sh(*v);
    }
    g.push(0.0);
    Ok(g)
}

/// Coefficient tables of a Gaussian diffusion with the given betas (ADM's
/// `GaussianDiffusion.__init__`), all in f64. Index `i` is the (possibly
/// respaced) timestep index.
#[derive(Debug, Clone)]
pub struct Tables {
    /// `beta_i`.
    pub betas: Vec<f64>,
    /// `alpha_bar_i = prod_{j<=i} (1 - beta_j)`.
    pub alphas_cumprod: Vec<f64>,
    /// `alpha_bar_{i-1}` with `alpha_bar_{-1} = 1`.
    pub alphas_cumprod_prev: Vec<f64>,
    /// `beta_tilde_i = beta_i (1 - alpha_bar_{i-1}) / (1 - alpha_bar_i)`.
    pub posterior_variance: Vec<f64>,
    /// `log beta_tilde_i` with entry 0 replaced by entry 1 (it is 0 there).
    pub posterior_log_variance_clipped: Vec<f64>,
    /// Posterior mean coefficient of x0.
    pub posterior_mean_coef1: Vec<f64>,
    /// Posterior mean coefficient of x_t.
    pub posterior_mean_coef2: Vec<f64>,
    /// `log beta_i` (upper end of the learned-variance range).
    pub log_betas: Vec<f64>,
    /// ADM `fixed_large`: `log(append(beta_tilde_1, beta_1..))`.
    pub fixed_large_log_variance: Vec<f64>,
}

impl Tables {
    /// Builds every table from `betas`.
    pub fn from_betas(betas: Vec<f64>) -> Self {
        let n = betas.len();
        assert!(n >= 1, "empty beta table");
        let mut ac = Vec::with_capacity(n);
        let mut prod = 1.0f64;
        for b in &betas {
            prod *= 1.0 - b;
            ac.push(prod);
        }
        let acp: Vec<f64> = std::iter::once(1.0)
            .chain(ac[..n - 1].iter().copied())
            .collect();
        let pv: Vec<f64> = (0..n)
            .map(|i| betas[i] * (1.0 - acp[i]) / (1.0 - ac[i]))
            .collect();
        let pv1 = if n > 1 { pv[1] } else { pv[0] };
        let plvc: Vec<f64> = (0..n)
            .map(|i| if i == 0 { pv1.ln() } else { pv[i].ln() })
            .collect();
        let c1 = (0..n)
            .map(|i| betas[i] * acp[i].sqrt() / (1.0 - ac[i]))
            .collect();
        let c2 = (0..n)
            .map(|i| (1.0 - acp[i]) * (1.0 - betas[i]).sqrt() / (1.0 - ac[i]))
            .collect();
        let log_betas = betas.iter().map(|b| b.ln()).collect();
        let fl = (0..n)
            .map(|i| if i == 0 { pv1.ln() } else { betas[i].ln() })
            .collect();
        Self {
            betas,
            alphas_cumprod: ac,
            alphas_cumprod_prev: acp,
            posterior_variance: pv,
            posterior_log_variance_clipped: plvc,
            posterior_mean_coef1: c1,
            posterior_mean_coef2: c2,
            log_betas,
            fixed_large_log_variance: fl,
        }
    }

    /// Number of timesteps.
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    /// Always false (a table has at least one entry).
    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// Tables of the respaced process that keeps the (increasing) original
    /// timesteps `kept` (improved-DDPM `SpacedDiffusion`):
    /// `beta'_i = 1 - alpha_bar[kept_i] / alpha_bar[kept_{i-1}]`, `alpha_bar[kept_{-1}] = 1`.
    pub fn respaced(&self, kept: &[usize]) -> Self {
        let mut last = 1.0f64;
        let betas = kept
            .iter()
            .map(|&k| {
                let a = self.alphas_cumprod[k];
                let b = 1.0 - a / last;
                last = a;
                b
            })
            .collect();
        Self::from_betas(betas)
    }

    /// `sigma_i = sqrt((1 - alpha_bar_i) / alpha_bar_i)` (variance-exploding noise level).
    pub fn sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect()
    }

    /// Sigma at a fractional timestep, linearly interpolated between integer
    /// timesteps (`numpy.interp`, as diffusers' Euler/Heun schedulers do).
    pub fn sigma_at(&self, t: f64) -> f64 {
        interp(t, &self.sigmas())
    }

    /// `alpha_bar` at a fractional timestep, consistent with [`Tables::sigma_at`]:
    /// `1 / (1 + sigma_at(t)^2)`.
    pub fn alpha_bar_at(&self, t: f64) -> f64 {
        let s = self.sigma_at(t);
        1.0 / (1.0 + s * s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_identity() {
        let t = Tables::from_betas(linspace(1e-4, 0.02, 1000));
        let r = t.respaced(&(0..1000).collect::<Vec<_>>());
        for i in 0..1000 {
            assert!((t.betas[i] - r.betas[i]).abs() < 1e-15);
            assert!((t.alphas_cumprod[i] - r.alphas_cumprod[i]).abs() < 1e-15);
        }
        // Respacing keeps alpha_bar at the kept steps.
        let kept = parse_respacing(1000, "250").unwrap();
        let r = t.respaced(&kept);
        for (i, &k) in kept.iter().enumerate() {
            assert!((r.alphas_cumprod[i] - t.alphas_cumprod[k]).abs() < 1e-14);
        }
        assert!((t.sigma_at(10.0) - t.sigmas()[10]).abs() < 1e-15);
        assert!((t.alpha_bar_at(10.0) - t.alphas_cumprod[10]).abs() < 1e-14);
    }
}

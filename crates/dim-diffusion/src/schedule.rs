//! Noise schedules, coefficient tables (f64) and timestep grids.

use crate::config::{BetaSchedule, DiffusionConfig, SamplerKind, Spacing};
use crate::error::{config_err, Result};

/// The beta table of a Gaussian diffusion config, computed in f64.
pub fn betas(cfg: &DiffusionConfig) -> Vec<f64> {
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

/// improved-DDPM's `space_timesteps`: the (sorted) training timesteps kept by a
/// respacing string: `"ddimN"` (integer stride giving exactly N steps) or
/// comma-separated counts, one per equal section of `[0, T)` (e.g. `"250"` or
/// `"10,15,20"`). Python's round-half-to-even is reproduced.
pub fn parse_respacing(num_timesteps: usize, s: &str) -> Result<Vec<usize>> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix("ddim") {
        let n: usize = rest.parse().map_err(|_| {
            crate::DiffusionError::Config(format!("bad respacing {s:?}: expected ddimN"))
        })?;
        for stride in 1..num_timesteps {
            if num_timesteps.div_ceil(stride) == n {
                return Ok((0..num_timesteps).step_by(stride).collect());
            }
        }
        return config_err(format!(
            "respacing {s:?}: cannot create exactly {n} steps from {num_timesteps} with an integer stride"
        ));
    }
    let counts: Vec<usize> = s
        .split(',')
        .map(|c| c.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| {
            crate::DiffusionError::Config(format!(
                "bad respacing {s:?}: expected \"N\", \"ddimN\" or comma-separated counts"
            ))
        })?;
    if counts.is_empty() || counts.iter().all(|&c| c == 0) {
        return config_err(format!("respacing {s:?} keeps no timesteps"));
    }
    let size_per = num_timesteps / counts.len();
    let extra = num_timesteps % counts.len();
    let mut start = 0usize;
    let mut all = Vec::new();
    for (i, &count) in counts.iter().enumerate() {
        let size = size_per + usize::from(i < extra);
        if size < count {
            return config_err(format!(
                "respacing {s:?}: cannot divide a section of {size} timesteps into {count} steps (T = {num_timesteps})"
            ));
        }
        let frac_stride = if count <= 1 {
            1.0
        } else {
            (size - 1) as f64 / (count - 1) as f64
        };
        let mut cur = 0.0f64;
        for _ in 0..count {
            all.push(start + cur.round_ties_even() as usize);
            cur += frac_stride;
        }
        start += size;
    }
    all.sort_unstable();
    all.dedup();
    Ok(all)
}

/// The decreasing grid of (original-index) timesteps a Gaussian sampler visits.
/// After the last grid point every sampler goes to `alpha_bar = 1` (x0).
///
/// `Adm` is `space_timesteps(T, "steps")`; `Leading`, `Trailing` and `Linspace`
/// reproduce the `set_timesteps` of the diffusers scheduler that corresponds
/// to `sampler` (DDPMScheduler/DDIMScheduler for ddpm/ddim,
/// DPMSolverMultistepScheduler for dpm++2m, EulerDiscreteScheduler and
/// HeunDiscreteScheduler for euler/heun; `steps_offset = 0`). Only euler/heun
/// with `Linspace` produce fractional timesteps.
pub fn gaussian_grid(
    num_timesteps: usize,
    sampler: SamplerKind,
    spacing: Spacing,
    steps: usize,
    respacing: Option<&str>,
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
    let dpm = sampler == SamplerKind::DpmSolverPp2M;
    let continuous = matches!(sampler, SamplerKind::Euler | SamplerKind::Heun);
    let mut grid: Vec<f64> = match spacing {
        Spacing::Adm => parse_respacing(t, &n.to_string())?
            .into_iter()
            .map(|v| v as f64)
            .collect(),
        Spacing::Leading if dpm => {
            let ratio = t / (n + 1);
            if ratio == 0 {
                return config_err("leading spacing for dpm++2m needs steps < T");
            }
            (1..=n).map(|i| (i * ratio) as f64).collect()
        }
        Spacing::Leading => {
            let ratio = t / n;
            (0..n).map(|i| (i * ratio) as f64).collect()
        }
        Spacing::Trailing => {
            let step = t as f64 / n as f64;
            (0..n)
                .map(|k| (t as f64 - k as f64 * step).round_ties_even() - 1.0)
                .collect()
        }
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
    Ok(grid)
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
        let s = |i: usize| ((1.0 - self.alphas_cumprod[i]) / self.alphas_cumprod[i]).sqrt();
        let last = self.len() - 1;
        if t <= 0.0 {
            return s(0);
        }
        if t >= last as f64 {
            return s(last);
        }
        let i = t.floor() as usize;
        let w = t - i as f64;
        if w == 0.0 {
            s(i)
        } else {
            s(i) + w * (s(i + 1) - s(i))
        }
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
    fn respacing_matches_improved_ddpm() {
        // Values from improved-diffusion's space_timesteps.
        assert_eq!(
            parse_respacing(1000, "ddim50").unwrap(),
            (0..1000).step_by(20).collect::<Vec<_>>()
        );
        let r = parse_respacing(1000, "250").unwrap();
        assert_eq!(r.len(), 250);
        assert_eq!(&r[..6], &[0, 4, 8, 12, 16, 20]);
        assert_eq!(*r.last().unwrap(), 999);
        assert_eq!(parse_respacing(300, "10,15,20").unwrap().len(), 45);
        assert_eq!(parse_respacing(100, "10,10").unwrap()[..3], [0, 5, 11]);
        assert_eq!(
            parse_respacing(1000, "1000").unwrap(),
            (0..1000).collect::<Vec<_>>()
        );
        assert!(parse_respacing(10, "20").is_err());
        assert!(parse_respacing(10, "ddim7").is_err());
        assert!(parse_respacing(10, "abc").is_err());
    }

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

//! Parity with Hugging Face diffusers (fixtures from `scripts/diffusion_fixtures.py`,
//! computed by diffusers' own scheduler code with its tables forced to f64).
//! Every value must match to 1e-6 (relative for values above 1).

use dim_diffusion::{
    BetaSchedule, DiffusionConfig, FixedVariance, FlowMatching, GaussianDiffusion, NoiseRng,
    Prediction, ProcessKind, SamplerConfig, SamplerKind, Spacing,
};
mod common;

use common::{fixtures, tensor};
use serde_json::Value;
use tch::{Kind, Tensor};

const TOL: f64 = 1e-6;

/// A fixture tensor's data, or a plain array, as f64.
fn floats(v: &Value) -> Vec<f64> {
    common::floats(v.get("data").unwrap_or(v))
}

/// Max of |a - b| / max(1, |b|).
fn max_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f64::max)
}

fn tensor_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let a: Vec<f64> = Vec::try_from(a.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    let b: Vec<f64> = Vec::try_from(b.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    max_err(&a, &b)
}

fn diffusion_cfg(schedule: &str, prediction: &str) -> DiffusionConfig {
    let mut cfg = DiffusionConfig::default();
    match schedule {
        "linear" => {}
        "scaled_linear" => {
            cfg.schedule = BetaSchedule::ScaledLinear;
            cfg.beta_start = 0.00085;
            cfg.beta_end = 0.012;
        }
        "cosine" => cfg.schedule = BetaSchedule::Cosine,
        other => panic!("schedule {other}"),
    }
    cfg.prediction = Some(match prediction {
        "eps" => Prediction::Eps,
        "v" => Prediction::V,
        "x0" => Prediction::X0,
        other => panic!("prediction {other}"),
    });
    cfg
}

fn spacing(s: &str) -> Spacing {
    match s {
        "leading" => Spacing::Leading,
        "trailing" => Spacing::Trailing,
        "linspace" => Spacing::Linspace,
        other => panic!("spacing {other}"),
    }
}

fn sampler(s: &str) -> SamplerKind {
    match s {
        "ddpm" => SamplerKind::Ddpm,
        "ddim" => SamplerKind::Ddim,
        "dpm++2m" => SamplerKind::DpmSolverPp2M,
        "euler" | "flow_euler" => SamplerKind::Euler,
        "heun" => SamplerKind::Heun,
        other => panic!("sampler {other}"),
    }
}

fn test_model(x: &Tensor, t: &Tensor, _y: Option<&Tensor>) -> Tensor {
    assert_eq!(t.kind(), Kind::Double, "f64 state gives f64 time");
    let tv = t.double_value(&[0]);
    x.tanh() * 0.7 + x * (0.1 * (tv / 137.0).cos())
}

#[test]
fn alphas_cumprod_match() {
    let f = fixtures();
    for name in ["linear", "scaled_linear", "cosine"] {
        let gd = GaussianDiffusion::new(&diffusion_cfg(name, "eps")).unwrap();
        let err = max_err(&gd.tables().alphas_cumprod, &floats(&f["tables"][name]));
        assert!(err < 1e-12, "{name}: alphas_cumprod differ by {err:e}");
    }
}

#[test]
fn single_steps_match() {
    let f = fixtures();
    let cases = f["steps"].as_array().unwrap();
    assert!(cases.len() >= 30);
    let mut worst = 0.0f64;
    for (k, c) in cases.iter().enumerate() {
        let kind = c["sampler"].as_str().unwrap();
        let mut cfg = diffusion_cfg(
            c["schedule"].as_str().unwrap(),
            c["prediction"].as_str().unwrap(),
        );
        if kind == "ddpm" {
            match c["variance"].as_str().unwrap() {
                "fixed_small" => cfg.variance = FixedVariance::Small,
                "fixed_large" => cfg.variance = FixedVariance::Large,
                "learned_range" => cfg.learn_sigma = true,
                v => panic!("variance {v}"),
            }
        }
        let gd = GaussianDiffusion::new(&cfg).unwrap();
        let sc = SamplerConfig {
            sampler: sampler(kind),
            steps: c["steps"].as_u64().unwrap() as usize,
            spacing: Some(spacing(c["spacing"].as_str().unwrap())),
            clip_denoised: c["clip"].as_bool().unwrap(),
            eta: c.get("eta").and_then(Value::as_f64).unwrap_or(0.0),
            ..SamplerConfig::default()
        };
        let sched = gd.sampling_schedule(&sc).unwrap();
        let ts = floats(&c["timesteps"]);
        assert_eq!(sched.timesteps, ts, "case {k}: timesteps");
        let t = c["t"].as_f64().unwrap();
        let i = sched.timesteps.iter().position(|&v| v == t).unwrap();
        let (x, out, noise) = (
            tensor(&c["x"]),
            tensor(&c["model_output"]),
            tensor(&c["noise"]),
        );
        let prev = match kind {
            "ddpm" => sched.ddpm_step(&out, &x, i, &noise).unwrap(),
            _ => sched.ddim_step(&out, &x, i, sc.eta, Some(&noise)).unwrap(),
        };
        let err = tensor_err(&prev, &tensor(&c["prev"]));
        worst = worst.max(err);
        assert!(
            err < TOL,
            "case {k} ({kind}, {c_desc}): step differs by {err:e}",
            c_desc = describe(c)
        );
    }
    println!(
        "{} single steps, worst relative error {worst:e}",
        cases.len()
    );
}

fn describe(c: &Value) -> String {
    format!(
        "{} {} steps={} {} t={}",
        c["schedule"], c["prediction"], c["steps"], c["spacing"], c["t"]
    )
}

#[test]
fn sampling_loops_match() {
    let f = fixtures();
    let loops = f["loops"].as_array().unwrap();
    assert!(loops.len() >= 15);
    let mut worst = 0.0f64;
    for (k, c) in loops.iter().enumerate() {
        let kind = c["sampler"].as_str().unwrap();
        let steps = c["steps"].as_u64().unwrap() as usize;
        let x_t = tensor(&c["x_T"]);
        let init = c["init_noise_sigma"].as_f64().unwrap();
        let want = tensor(&c["final"]);
        let ref_ts = dedup(floats(&c["timesteps"]));
        let sc = SamplerConfig {
            sampler: sampler(kind),
            steps,
            spacing: Some(spacing(c["spacing"].as_str().unwrap())),
            shift: c.get("shift").and_then(Value::as_f64).unwrap_or(1.0),
            ..SamplerConfig::default()
        };
        let got = if kind == "flow_euler" {
            let fm = FlowMatching::new(&DiffusionConfig {
                kind: ProcessKind::Flow,
                ..Default::default()
            })
            .unwrap();
            let grid = fm.sampling_grid(&sc).unwrap();
            let ref_sig = floats(&c["sigmas"]);
            let e = max_err(&grid, &ref_sig);
            assert!(e < TOL, "case {k}: flow sigmas differ by {e:e}");
            let ts: Vec<f64> = grid[..steps].iter().map(|t| t * 1000.0).collect();
            let e = max_err(&ts, &ref_ts);
            assert!(e < TOL, "case {k}: flow timesteps differ by {e:e}");
            fm.sample_from_noise(&test_model, &(x_t * init), None, &sc, |_| {})
                .unwrap()
        } else {
            let cfg = diffusion_cfg(
                c["schedule"].as_str().unwrap(),
                c["prediction"].as_str().unwrap(),
            );
            let gd = GaussianDiffusion::new(&cfg).unwrap();
            let sched = gd.sampling_schedule(&sc).unwrap();
            let e = max_err(&sched.timesteps, &ref_ts);
            assert!(
                e < TOL,
                "case {k} ({kind}): timesteps differ by {e:e}: {:?} vs {:?}",
                &sched.timesteps[..4],
                &ref_ts[..4]
            );
            if !c["sigmas"].is_null() {
                let e = max_err(&sched.sigmas, &dedup(floats(&c["sigmas"])));
                assert!(e < TOL, "case {k} ({kind}): sigmas differ by {e:e}");
            }
            // Our euler/heun state starts at noise * sqrt(sigma_max^2 + 1); diffusers
            // uses `init_noise_sigma` (sigma_max for linspace/trailing), so feed the
            // equivalent standard-normal noise.
            let ours = match sc.sampler {
                SamplerKind::Euler | SamplerKind::Heun => (sched.sigmas[0].powi(2) + 1.0).sqrt(),
                _ => 1.0,
            };
            let noise = x_t * (init / ours);
            gd.sample_from_noise(
                &test_model,
                &noise,
                None,
                &sc,
                &mut NoiseRng::new(0),
                |_| {},
            )
            .unwrap()
        };
        let err = tensor_err(&got, &want);
        worst = worst.max(err);
        assert!(
            err < TOL,
            "case {k} ({kind} {} {} {}): final sample differs by {err:e}",
            c["schedule"],
            c["prediction"],
            c["spacing"]
        );
    }
    println!(
        "{} sampling loops, worst relative error {worst:e}",
        loops.len()
    );
}

/// Heun repeats interior timesteps/sigmas; keep each once.
fn dedup(mut v: Vec<f64>) -> Vec<f64> {
    v.dedup();
    v
}

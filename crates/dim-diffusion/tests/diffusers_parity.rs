//! Parity with Hugging Face diffusers (fixtures from `scripts/diffusion_fixtures.py`,
//! computed by diffusers' own scheduler code with its tables forced to f64).
//! Timestep grids must match exactly; every other value to 1e-10 (relative
//! for values above 1).

use dim_diffusion::{
    BetaSchedule, DiffusionConfig, FixedVariance, FlowMatching, GaussianDiffusion, InitNoise,
    NoiseRng, Prediction, ProcessKind, SamplerConfig, SamplerKind, SigmaSchedule, Spacing,
};
mod common;

use common::{fixtures, tensor};
use serde_json::Value;
use tch::{Kind, Tensor};

const TOL: f64 = 1e-10;

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
    check_cases("steps", 30, |k, c| {
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
        tensor_err(&prev, &tensor(&c["prev"]))
    });
}

/// Runs `check` on every case of the fixture section `section` (at least
/// `min` of them): it asserts what it can and returns the case's relative
/// error against diffusers' result, which must stay below [`TOL`].
fn check_cases(section: &str, min: usize, check: impl Fn(usize, &Value) -> f64) {
    let f = fixtures();
    let cases = f[section].as_array().unwrap();
    assert!(cases.len() >= min, "{section}: only {} cases", cases.len());
    let mut worst = 0.0f64;
    for (k, c) in cases.iter().enumerate() {
        let err = check(k, c);
        worst = worst.max(err);
        assert!(
            err < TOL,
            "{section} case {k} ({}): result differs by {err:e}",
            describe(
                c,
                &["sampler", "schedule", "prediction", "steps", "spacing", "t"]
            )
        );
    }
    println!(
        "{} {section} cases, worst relative error {worst:e}",
        cases.len()
    );
}

#[test]
fn sampling_loops_match() {
    check_cases("loops", 15, |k, c| {
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
            let sc = SamplerConfig {
                init_noise: InitNoise::Diffusers,
                ..sc
            };
            let sched = gd.sampling_schedule(&sc).unwrap();
            let e = (sched.init_noise_sigma() - init).abs() / init;
            assert!(e < TOL, "case {k}: init_noise_sigma differs by {e:e}");
            let noise = x_t;
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
        tensor_err(&got, &want)
    });
}

/// Heun repeats interior timesteps/sigmas; keep each once.
fn dedup(mut v: Vec<f64>) -> Vec<f64> {
    v.dedup();
    v
}

fn test_model_learned(x: &Tensor, t: &Tensor, y: Option<&Tensor>) -> Tensor {
    let tv = t.double_value(&[0]);
    Tensor::cat(&[test_model(x, t, y), (x * 0.5 + 0.001 * tv).tanh()], 1)
}

/// The diffusion and sampler configs of a random fixture case.
fn random_configs(c: &Value) -> (DiffusionConfig, SamplerConfig) {
    let mut d = diffusion_cfg(
        c["schedule"].as_str().unwrap(),
        c["prediction"].as_str().unwrap(),
    );
    d.timesteps = c["T"].as_u64().unwrap() as usize;
    if d.schedule != BetaSchedule::Cosine {
        d.beta_start = c["beta_start"].as_f64().unwrap();
        d.beta_end = c["beta_end"].as_f64().unwrap();
    }
    d.rescale_betas_zero_snr = c["zero_snr"].as_bool().unwrap();
    match c["variance"].as_str() {
        Some("fixed_large") => d.variance = FixedVariance::Large,
        Some("learned_range") => d.learn_sigma = true,
        _ => {}
    }
    let sampler: SamplerKind = c["sampler"].as_str().unwrap().parse().unwrap();
    let custom = |k: &str| (!c[k].is_null()).then(|| floats(&c[k]));
    let sc = SamplerConfig {
        sampler,
        steps: c["steps"].as_u64().unwrap() as usize,
        spacing: Some(spacing(c["spacing"].as_str().unwrap())),
        eta: c["eta"].as_f64().unwrap(),
        clip_denoised: c["clip"].as_bool().unwrap(),
        thresholding: c["thresholding"].as_bool().unwrap(),
        dynamic_thresholding_ratio: c["ratio"].as_f64().unwrap(),
        sample_max_value: c["max"].as_f64().unwrap(),
        steps_offset: c["steps_offset"].as_u64().unwrap() as usize,
        set_alpha_to_one: c["set_alpha_to_one"].as_bool().unwrap(),
        sigma_schedule: match c["sigma_schedule"].as_str().unwrap() {
            "karras" => SigmaSchedule::Karras,
            "exponential" => SigmaSchedule::Exponential,
            _ => SigmaSchedule::Default,
        },
        timesteps: custom("custom_timesteps"),
        sigmas: custom("custom_sigmas"),
        init_noise: InitNoise::Diffusers,
        ..SamplerConfig::default()
    };
    (d, sc)
}

/// Replays recorded noise in order.
fn replay(noises: Vec<Tensor>) -> impl FnMut(&[i64], Kind, tch::Device) -> Tensor {
    let mut it = noises.into_iter();
    move |shape: &[i64], _, _| {
        let z = it.next().expect("more noise drawn than diffusers drew");
        assert_eq!(z.size(), shape);
        z
    }
}

/// Random (T, N, schedule, betas, spacing, prediction, sampler, option)
/// configurations: grids exact, loops and single steps to 1e-10.
#[test]
fn random_configurations_match() {
    let f = fixtures();
    let cases = f["random"].as_array().unwrap();
    assert!(cases.len() >= 100);
    let (mut worst_loop, mut worst_step, mut loops, mut defects) = (0.0f64, 0.0f64, 0, 0);
    let mut seen = std::collections::BTreeSet::new();
    for (k, c) in cases.iter().enumerate() {
        let (d, sc) = random_configs(c);
        let what = format!("case {k}: {c_desc}", c_desc = describe(c, &RANDOM_KEYS));
        seen.insert(sc.sampler.name());
        let gd = GaussianDiffusion::new(&d).unwrap();
        let probe = floats(&c["alphas_cumprod_probe"]);
        let t = d.timesteps;
        let ac = &gd.tables().alphas_cumprod;
        let e = max_err(&[ac[0], ac[t / 2], ac[t - 1]], &probe);
        assert!(e < 1e-12, "{what}: alphas_cumprod differ by {e:e}");
        let sched = gd.sampling_schedule(&sc).unwrap();
        let ts = floats(&c["timesteps"]);
        match c["defect"].as_str() {
            Some("trailing_n_plus_1") => {
                // diffusers' trailing grid has N + 1 entries ending at -1; ours the first N.
                defects += 1;
                assert_eq!(ts.len(), sc.steps + 1, "{what}");
                assert_eq!(*ts.last().unwrap(), -1.0, "{what}");
                assert_eq!(sched.timesteps, ts[..sc.steps], "{what}: timesteps");
                continue;
            }
            Some("repeated_timesteps") => {
                // Same grid and sigmas; diffusers' loop then skips a step (its
                // index lookup takes the second of two equal timesteps).
                defects += 1;
                assert_eq!(sched.timesteps, ts, "{what}: timesteps");
                let e = max_err(&sched.sigmas, &floats(&c["sigmas"]));
                assert!(e < TOL, "{what}: sigmas differ by {e:e}");
                continue;
            }
            Some(other) => panic!("{what}: unknown defect {other}"),
            None => {}
        }
        let integer = ts.iter().all(|t| t.fract() == 0.0);
        if integer {
            assert_eq!(sched.timesteps, ts, "{what}: timesteps");
        } else {
            let e = max_err(&sched.timesteps, &ts);
            assert!(e < TOL, "{what}: timesteps differ by {e:e}");
        }
        if !c["sigmas"].is_null() {
            let e = max_err(&sched.sigmas, &floats(&c["sigmas"]));
            assert!(e < TOL, "{what}: sigmas differ by {e:e}");
        }
        let e = (sched.init_noise_sigma() - c["init_noise_sigma"].as_f64().unwrap()).abs();
        assert!(
            e < TOL * sched.init_noise_sigma().max(1.0),
            "{what}: init noise sigma {e:e}"
        );
        let noises: Vec<Tensor> = c["noises"].as_array().unwrap().iter().map(tensor).collect();
        let model = |x: &Tensor, t: &Tensor, y: Option<&Tensor>| {
            if d.learn_sigma {
                test_model_learned(x, t, y)
            } else {
                test_model(x, t, y)
            }
        };
        let got = gd
            .sample_from_noise(
                &model,
                &tensor(&c["x_T"]),
                None,
                &sc,
                &mut replay(noises),
                |_| {},
            )
            .unwrap();
        let err = tensor_err(&got, &tensor(&c["final"]));
        worst_loop = worst_loop.max(err);
        loops += 1;
        assert!(err < TOL, "{what}: final sample differs by {err:e}");
        let err = check_single_step(&sched, &sc, &c["step"]);
        worst_step = worst_step.max(err);
        assert!(
            err < TOL,
            "{what}: single step {} differs by {err:e}",
            c["step"]["k"]
        );
    }
    assert_eq!(
        seen.len(),
        SamplerKind::ALL.len(),
        "every sampler is covered"
    );
    assert!(defects >= 2, "the N + 1 trailing defect is covered");
    println!(
        "{} random configurations ({loops} loops, {defects} diffusers defects: N + 1 grids or repeated timesteps): worst loop {worst_loop:e}, worst step {worst_step:e}",
        cases.len()
    );
}

/// Runs the recorded single step through the public step function.
fn check_single_step(
    sched: &dim_diffusion::SamplingSchedule,
    sc: &SamplerConfig,
    r: &Value,
) -> f64 {
    let i = r["k"].as_u64().unwrap() as usize;
    let (x, out) = (tensor(&r["x"]), tensor(&r["out"]));
    let noise = (!r["noise"].is_null()).then(|| tensor(&r["noise"]));
    let got = match sc.sampler {
        SamplerKind::Ddpm => {
            let z = noise.unwrap_or_else(|| x.zeros_like());
            sched.ddpm_step(&out, &x, i, &z).unwrap()
        }
        SamplerKind::Ddim => sched
            .ddim_step(&out, &x, i, sc.eta, noise.as_ref())
            .unwrap(),
        SamplerKind::Euler => sched.euler_step(&out, &x, i).unwrap(),
        SamplerKind::EulerAncestral => sched
            .euler_ancestral_step(&out, &x, i, noise.as_ref())
            .unwrap(),
        SamplerKind::Heun if i + 1 < sched.len() => {
            sched.heun_step(&out, &x, i, &tensor(&r["out2"])).unwrap()
        }
        SamplerKind::Heun => sched.euler_step(&out, &x, i).unwrap(),
        _ => {
            let hist: Vec<Tensor> = r["hist"].as_array().unwrap().iter().map(tensor).collect();
            sched
                .dpm_step(&out, &x, i, &hist, noise.as_ref())
                .unwrap()
                .0
        }
    };
    tensor_err(&got, &tensor(&r["result"]))
}

/// `key=value` for each of `keys` of fixture case `c`, for failure messages.
fn describe(c: &Value, keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("{k}={}", c[*k]))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The keys that tell a random configuration apart.
const RANDOM_KEYS: [&str; 13] = [
    "sampler",
    "T",
    "steps",
    "schedule",
    "prediction",
    "spacing",
    "sigma_schedule",
    "zero_snr",
    "thresholding",
    "clip",
    "steps_offset",
    "eta",
    "variance",
];

/// FlowMatchEuler / FlowMatchHeun on random (T, N, shift): grid, loop and the
/// public single-step functions.
#[test]
fn flow_random_configurations_match() {
    let f = fixtures();
    let cases = f["flow_random"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for (k, c) in cases.iter().enumerate() {
        let sampler: SamplerKind = c["sampler"].as_str().unwrap().parse().unwrap();
        let big_t = c["T"].as_u64().unwrap();
        // diffusers' model time is sigma * num_train_timesteps.
        let fm = FlowMatching::new(&DiffusionConfig {
            kind: ProcessKind::Flow,
            timesteps: big_t as usize,
            time_scale: big_t as f64,
            ..Default::default()
        })
        .unwrap();
        let sc = SamplerConfig {
            sampler,
            steps: c["steps"].as_u64().unwrap() as usize,
            spacing: Some(Spacing::Linspace),
            shift: c["shift"].as_f64().unwrap(),
            ..SamplerConfig::default()
        };
        let grid = fm.sampling_grid(&sc).unwrap();
        let e = max_err(&grid, &floats(&c["sigmas"]));
        assert!(e < TOL, "flow case {k}: sigmas differ by {e:e}");
        let got = fm
            .sample_from_noise(&test_model, &tensor(&c["x_T"]), None, &sc, |_| {})
            .unwrap();
        let err = tensor_err(&got, &tensor(&c["final"]));
        assert!(
            err < TOL,
            "flow case {k} ({sampler:?}): final differs by {err:e}"
        );
        let r = &c["step"];
        let i = r["k"].as_u64().unwrap() as usize;
        let (x, v) = (tensor(&r["x"]), tensor(&r["out"]));
        let (t, t_next) = (grid[i], grid[i + 1]);
        let step = if r["out2"].is_null() {
            fm.euler_step(&v, &x, t, t_next)
        } else {
            fm.heun_step(&v, &x, t, t_next, &tensor(&r["out2"]))
        };
        let err = tensor_err(&step, &tensor(&r["result"]));
        assert!(err < TOL, "flow case {k}: single step differs by {err:e}");
    }
}

//! Losses (against an improved-diffusion transcription), configs, guidance,
//! shapes and devices.

use std::cell::Cell;

use dim_diffusion::{
    ClassifierFreeGuidance, Config, Denoiser, Diffusion, DiffusionConfig, DiffusionError,
    FlowMatching, GaussianDiffusion, NoiseRng, Prediction, ProcessKind, SampleOptions,
    SamplerConfig, SamplerKind, Spacing,
};
mod common;

use common::{fixtures, ints, tensor, GAUSSIAN_SAMPLERS};
use tch::{Device, Kind, Tensor};

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn hybrid_loss_matches_improved_diffusion() {
    let f = fixtures();
    for case in f["hybrid"].as_array().unwrap() {
        let prediction = match case["prediction"].as_str().unwrap() {
            "eps" => Prediction::Eps,
            _ => Prediction::X0,
        };
        let cfg = DiffusionConfig {
            prediction: Some(prediction),
            ..DiffusionConfig::dit()
        };
        let gd = GaussianDiffusion::new(&cfg).unwrap();
        let out = tensor(&case["model_output"]);
        let model = |_x: &Tensor, _t: &Tensor, _y: Option<&Tensor>| out.shallow_clone();
        let t = Tensor::from_slice(&ints(&case["t"]));
        let l = gd
            .training_losses_at(
                &model,
                &tensor(&case["x_start"]),
                None,
                &t,
                &tensor(&case["noise"]),
            )
            .unwrap();
        // vlb_weight 0.001 * T = 1000 gives factor 1: DiT's (ADM LossType.MSE) loss.
        let vb = l.vlb.as_ref().unwrap();
        for (name, got, want) in [
            ("mse", &l.mse, &case["mse"]),
            ("vb", vb, &case["vb"]),
            ("loss", &l.loss, &case["loss"]),
        ] {
            let want = tensor(want);
            let err = ((got - &want).abs() / want.abs().clamp_min(1.0))
                .max()
                .double_value(&[]);
            assert!(
                err < 1e-9,
                "{prediction:?} {name}: {got} vs {want} (err {err:e})"
            );
        }
    }
}

#[test]
fn vlb_weight_scales_and_mean_is_detached() {
    let f = fixtures();
    let case = &f["hybrid"][0];
    let x0 = tensor(&case["x_start"]);
    let noise = tensor(&case["noise"]);
    let t = Tensor::from_slice(&[0i64, 1, 2, 500, 999, 0]);
    let out = tensor(&case["model_output"]).set_requires_grad(true);
    let model = |_x: &Tensor, _t: &Tensor, _y: Option<&Tensor>| &out * 1.0;
    let base = GaussianDiffusion::new(&DiffusionConfig::dit()).unwrap();
    let l1 = base
        .training_losses_at(&model, &x0, None, &t, &noise)
        .unwrap();
    let heavy = GaussianDiffusion::new(&DiffusionConfig {
        vlb_weight: 0.003,
        ..DiffusionConfig::dit()
    })
    .unwrap();
    let l3 = heavy
        .training_losses_at(&model, &x0, None, &t, &noise)
        .unwrap();
    let (v1, v3) = (l1.vlb.unwrap(), l3.vlb.unwrap());
    assert!(max_abs(&(&v1 * 3.0), &v3) < 1e-9);
    // Gradient of the VLB reaches only the variance channels.
    v1.sum(Kind::Double).backward();
    let g = out.grad();
    assert_eq!(g.narrow(1, 0, 3).abs().max().double_value(&[]), 0.0);
    assert!(g.narrow(1, 3, 3).abs().max().double_value(&[]) > 0.0);
}

#[test]
fn perfect_predictions_give_zero_loss() {
    // eps model returning the true noise, variance at the posterior end (v = -1):
    // mse = 0 and KL(q || p) = 0 for t > 0.
    let gd = GaussianDiffusion::new(&DiffusionConfig::dit()).unwrap();
    let mut rng = NoiseRng::new(3);
    let x0 = rng.rand(&[5, 2, 3, 4, 4], Kind::Double, Device::Cpu) * 2.0 - 1.0; // video-shaped
    let noise = rng.randn(&x0.size(), Kind::Double, Device::Cpu);
    let t = Tensor::from_slice(&[1i64, 10, 100, 500, 999]);
    let model = |x: &Tensor, _t: &Tensor, _y: Option<&Tensor>| {
        assert_eq!(x.size(), vec![5, 2, 3, 4, 4]);
        Tensor::cat(&[noise.shallow_clone(), noise.full_like(-1.0)], 1)
    };
    let l = gd
        .training_losses_at(&model, &x0, None, &t, &noise)
        .unwrap();
    assert!(l.mse.abs().max().double_value(&[]) < 1e-20);
    assert!(l.vlb.unwrap().abs().max().double_value(&[]) < 1e-9);
    // v and x0 targets.
    for (pred, target) in [(Prediction::V, "v"), (Prediction::X0, "x0")] {
        let cfg = DiffusionConfig {
            prediction: Some(pred),
            ..DiffusionConfig::default()
        };
        let gd = GaussianDiffusion::new(&cfg).unwrap();
        let ac = gd.tables().alphas_cumprod.clone();
        let model = |_x: &Tensor, _t: &Tensor, _y: Option<&Tensor>| {
            if target == "x0" {
                x0.shallow_clone()
            } else {
                let a: Vec<f64> = [1usize, 10, 100, 500, 999].iter().map(|&i| ac[i]).collect();
                let a = Tensor::from_slice(&a).view([5, 1, 1, 1, 1]);
                a.sqrt() * &noise - (a.neg() + 1.0).sqrt() * &x0
            }
        };
        let l = gd
            .training_losses_at(&model, &x0, None, &t, &noise)
            .unwrap();
        assert!(l.mse.abs().max().double_value(&[]) < 1e-20, "{target}");
        assert!(l.vlb.is_none());
    }
}

#[test]
fn flow_loss_and_interpolation() {
    let fm = FlowMatching::new(&DiffusionConfig::flow()).unwrap();
    let mut rng = NoiseRng::new(9);
    let x0 = rng.randn(&[4, 3, 8, 8], Kind::Double, Device::Cpu);
    let noise = rng.randn(&[4, 3, 8, 8], Kind::Double, Device::Cpu);
    let t = Tensor::from_slice(&[0.0f64, 0.25, 0.5, 1.0]);
    let xt = fm.interpolate(&x0, &t, &noise);
    assert!(max_abs(&xt.get(0), &x0.get(0)) < 1e-15);
    assert!(max_abs(&xt.get(3), &noise.get(3)) < 1e-15);
    let seen_t = Cell::new(0.0);
    let model = |_x: &Tensor, tt: &Tensor, _y: Option<&Tensor>| {
        seen_t.set(tt.double_value(&[1]));
        &noise - &x0
    };
    let l = fm
        .training_losses_at(&model, &x0, None, &t, &noise)
        .unwrap();
    assert!(l.loss.abs().max().double_value(&[]) < 1e-20);
    assert_eq!(seen_t.get(), 250.0, "model sees t * time_scale");
    // Logit-normal times are in (0, 1) and centred on 0.5.
    let cfg = DiffusionConfig {
        time_sampling: dim_diffusion::TimeSampling::LogitNormal,
        ..DiffusionConfig::flow()
    };
    let ts = FlowMatching::new(&cfg)
        .unwrap()
        .sample_t(&mut NoiseRng::new(1), 20000, Device::Cpu);
    let m = ts.mean(Kind::Double).double_value(&[]);
    assert!(
        (m - 0.5).abs() < 0.01
            && ts.min().double_value(&[]) > 0.0
            && ts.max().double_value(&[]) < 1.0
    );
}

#[test]
fn guidance_batches_cond_and_uncond_in_one_forward() {
    let calls = Cell::new(0);
    // Output: channel 0..2 = x + label, channels 2..4 = 10 * label (a "variance").
    let model = |x: &Tensor, _t: &Tensor, y: Option<&Tensor>| {
        calls.set(calls.get() + 1);
        let y = y.unwrap().to_kind(Kind::Double).view([-1, 1, 1, 1]);
        assert_eq!(x.size()[0], 4, "one doubled batch");
        Tensor::cat(&[x + &y, (x.zeros_like() + &y) * 10.0], 1)
    };
    let cfg = ClassifierFreeGuidance::new(&model, 4.0, 7);
    let x = Tensor::zeros([2, 2, 3, 3], (Kind::Double, Device::Cpu));
    let t = Tensor::zeros([2], (Kind::Double, Device::Cpu));
    let y = Tensor::from_slice(&[1i64, 2]);
    let out = cfg.denoise(&x, &t, Some(&y)).unwrap();
    assert_eq!(calls.get(), 1);
    assert_eq!(out.size(), vec![2, 4, 3, 3]);
    // guided = uncond + 4 (cond - uncond) = 7 + 4 (y - 7)
    assert_eq!(out.double_value(&[0, 0, 0, 0]), 7.0 + 4.0 * (1.0 - 7.0));
    assert_eq!(out.double_value(&[1, 1, 2, 2]), 7.0 + 4.0 * (2.0 - 7.0));
    // Variance channels: from the conditional half, unguided.
    assert_eq!(out.double_value(&[0, 2, 0, 0]), 10.0);
    assert_eq!(out.double_value(&[1, 3, 0, 0]), 20.0);
    assert!(cfg.denoise(&x, &t, None).is_err());
}

#[test]
fn guided_sampling_through_config() {
    // With scale s, an eps model (cond: 0.1 * y, uncond: 0) is guided to 0.1 * s * y.
    let gd = Diffusion::new(&DiffusionConfig::default()).unwrap();
    let model = |x: &Tensor, _t: &Tensor, y: Option<&Tensor>| {
        let y = y.unwrap();
        let cond = y.ne(10).to_kind(Kind::Double) * y.to_kind(Kind::Double) * 0.1;
        x.zeros_like() + cond.view([-1, 1, 1])
    };
    let sc = SamplerConfig {
        cfg_scale: 3.0,
        null_class: Some(10),
        ..SamplerConfig::new(SamplerKind::Ddim, 10)
    };
    let y = Tensor::from_slice(&[0i64, 2]);
    let opts = SampleOptions {
        kind: Kind::Double,
        ..SampleOptions::default()
    };
    let guided = gd
        .sample(&model, &[2, 1, 3], Some(&y), &sc, &opts, |_| {})
        .unwrap();
    let eps_const = |e: f64| move |x: &Tensor, _t: &Tensor, _y: Option<&Tensor>| x.zeros_like() + e;
    let plain = SamplerConfig::new(SamplerKind::Ddim, 10);
    let want0 = gd
        .sample(&eps_const(0.0), &[2, 1, 3], None, &plain, &opts, |_| {})
        .unwrap();
    let want2 = gd
        .sample(&eps_const(0.6), &[2, 1, 3], None, &plain, &opts, |_| {})
        .unwrap();
    assert!(max_abs(&guided.get(0), &want0.get(0)) < 1e-9);
    assert!(max_abs(&guided.get(1), &want2.get(1)) < 1e-9);
    // Missing labels is an error, not a panic.
    assert!(gd
        .sample(&model, &[2, 1, 3], None, &sc, &opts, |_| {})
        .is_err());
}

fn config_error(toml: &str) -> String {
    match Config::from_toml_str(toml) {
        Ok(_) => panic!("expected an error for {toml}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn config_parsing_and_validation() {
    let cfg = Config::from_toml_str(
        r#"
        [diffusion]
        kind = "gaussian"
        schedule = "cosine"
        timesteps = 1000
        prediction = "v"
        learn_sigma = true

        [sampler]
        sampler = "dpm++2m"
        steps = 20
        spacing = "trailing"
        cfg_scale = 4.0
        null_class = 1000
        "#,
    )
    .unwrap();
    assert_eq!(cfg.diffusion.prediction(), Prediction::V);
    assert_eq!(cfg.sampler.sampler, SamplerKind::DpmSolverPp2M);
    assert_eq!(cfg.sampler.spacing, Some(Spacing::Trailing));
    // Round trip.
    let s = toml::to_string(&cfg).unwrap();
    assert_eq!(Config::from_toml_str(&s).unwrap(), cfg);
    // DiT defaults.
    let dit: DiffusionConfig = toml::from_str("learn_sigma = true").unwrap();
    assert_eq!(dit, DiffusionConfig::dit());
    assert_eq!(Diffusion::new(&dit).unwrap().out_channels(4), 8);

    for (toml, needle) in [
        (
            "[diffusion]\nschedule = \"quadratic\"",
            "unknown variant `quadratic`",
        ),
        (
            "[diffusion]\nshedule = \"linear\"",
            "unknown field `shedule`",
        ),
        (
            "[sampler]\nsampler = \"ddim\"\nsteps = 2000",
            "more than the diffusion's 1000",
        ),
        ("[sampler]\ncfg_scale = 4.0", "needs null_class"),
        (
            "[sampler]\nsampler = \"ddpm\"\neta = 0.5",
            "eta applies only to sampler = \"ddim\"",
        ),
        (
            "[sampler]\nrespacing = \"ddim999\"",
            "cannot create exactly 999 steps",
        ),
        (
            "[sampler]\nrespacing = \"100\"\nsteps = 50",
            "gives 100 steps but steps = 50",
        ),
        (
            "[diffusion]\nkind = \"flow\"\n[sampler]\nsampler = \"ddim\"",
            "flow matching supports euler and heun",
        ),
        (
            "[diffusion]\nkind = \"flow\"\nlearn_sigma = true",
            "learn_sigma applies only",
        ),
        (
            "[diffusion]\nkind = \"flow\"\nprediction = \"eps\"",
            "predicts the velocity",
        ),
        (
            "[diffusion]\nprediction = \"velocity\"",
            "is for kind = \"flow\"",
        ),
        (
            "[diffusion]\nbeta_start = 0.5\nbeta_end = 0.1",
            "beta_start <= beta_end",
        ),
        ("[sampler]\nspacing = \"uniform\"", "for flow matching"),
        ("[sampler]\nsteps = 0", "at least 1"),
    ] {
        let e = config_error(toml);
        assert!(
            e.contains(needle),
            "{toml:?}: {e:?} should mention {needle:?}"
        );
    }
    // Typed constructors reject the wrong kind.
    assert!(matches!(
        GaussianDiffusion::new(&DiffusionConfig::flow()),
        Err(DiffusionError::Config(_))
    ));
    assert!(FlowMatching::new(&DiffusionConfig::default()).is_err());
}

#[test]
fn shapes_are_checked_and_any_rank_works() {
    let gd = Diffusion::new(&DiffusionConfig::dit()).unwrap();
    let mut rng = NoiseRng::new(0);
    let x0 = rng.randn(&[2, 3, 2, 4, 4], Kind::Float, Device::Cpu);
    // Wrong channel count (no learned-sigma channels).
    let bad = |x: &Tensor, _t: &Tensor, _y: Option<&Tensor>| x.shallow_clone();
    match gd.training_losses(&bad, &x0, None, &mut rng) {
        Err(DiffusionError::Shape(m)) => assert!(m.contains("expected [2, 6, 2, 4, 4]"), "{m}"),
        other => panic!("{other:?}"),
    }
    let good = |x: &Tensor, t: &Tensor, _y: Option<&Tensor>| {
        assert_eq!(t.kind(), Kind::Float);
        Tensor::cat(&[x * 0.1, x.zeros_like()], 1)
    };
    let l = gd.training_losses(&good, &x0, None, &mut rng).unwrap();
    assert_eq!(l.loss.size(), vec![2]);
    assert_eq!(l.loss.kind(), Kind::Float);
    let sc = SamplerConfig::new(SamplerKind::Ddpm, 10);
    for sampler in GAUSSIAN_SAMPLERS {
        let sc = SamplerConfig {
            sampler,
            ..sc.clone()
        };
        let mut steps = 0;
        let x = gd
            .sample(
                &good,
                &[2, 3, 2, 4, 4],
                None,
                &sc,
                &SampleOptions::seeded(1),
                |p| {
                    assert_eq!(p.total, 10);
                    steps += 1;
                },
            )
            .unwrap();
        assert_eq!(x.size(), vec![2, 3, 2, 4, 4]);
        assert_eq!(x.kind(), Kind::Float);
        assert_eq!(steps, 10);
        assert_eq!(x.isfinite().all().int64_value(&[]), 1);
    }
    // Labels of the wrong length.
    let y = Tensor::from_slice(&[1i64, 2, 3]);
    assert!(gd
        .sample(
            &good,
            &[2, 3, 4, 4],
            Some(&y),
            &sc,
            &SampleOptions::default(),
            |_| {}
        )
        .is_err());
}

#[test]
fn diffusion_enum_dispatches() {
    for cfg in [DiffusionConfig::default(), DiffusionConfig::flow()] {
        let d = Diffusion::new(&cfg).unwrap();
        let model = |x: &Tensor, _t: &Tensor, _y: Option<&Tensor>| x * 0.5;
        let x0 = Tensor::ones([3, 2, 4], (Kind::Float, Device::Cpu));
        let l = d
            .training_losses(&model, &x0, None, &mut NoiseRng::new(0))
            .unwrap();
        assert_eq!(l.loss.size(), vec![3]);
        let sampler = if cfg.kind == ProcessKind::Flow {
            SamplerKind::Euler
        } else {
            SamplerKind::Ddim
        };
        let x = d
            .sample(
                &model,
                &[3, 2, 4],
                None,
                &SamplerConfig::new(sampler, 5),
                &SampleOptions::default(),
                |_| {},
            )
            .unwrap();
        assert_eq!(x.size(), vec![3, 2, 4]);
    }
}

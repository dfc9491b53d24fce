//! On CUDA (`#[ignore]`d elsewhere; the GPU bundle runs them): the network with the
//! fused scan on the GPU against the same weights on the CPU, f32 outputs and
//! gradients, a bf16-autocast training step against f32, and the fused
//! optimizer step against the same step on the CPU.

use dim_model::{Model, ModelConfig};
use dim_scan::device::{autocast, set_cuda_autocast_dtype};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// The CUDA device, or a panic saying why there is none (these tests are
/// `#[ignore]`d in a plain `cargo test`; the GPU bundle runs them).
fn cuda() -> Device {
    assert!(
        tch::Cuda::is_available(),
        "gpu_model_cuda: CUDA is not available (GPU tests run through the GPU bundle)"
    );
    assert!(
        dim_scan::cuda_kernels_built(),
        "gpu_model_cuda: dim-scan was built without its CUDA kernels"
    );
    Device::Cuda(0)
}

fn cfg(arch: &str, video: bool) -> ModelConfig {
    let extra = if video {
        "frames = 6\ntemporal_patch = 2\ntoken_order = \"alternating\"\n"
    } else {
        ""
    };
    ModelConfig::from_toml_str(&format!(
        "arch = \"{arch}\"\ndepth = 3\nwidth = 64\nheads = 4\npatch = 2\nin_channels = 4\n\
         input_size = [12, 10]\nnum_classes = 10\nclass_dropout_prob = 0.1\n{extra}"
    ))
    .unwrap()
}

/// A CPU model with every parameter nudged (so gates are open) and its copy on `device`.
fn pair(cfg: &ModelConfig, device: Device) -> (VarStore, Model, VarStore, Model) {
    let cpu_vs = VarStore::new(Device::Cpu);
    let cpu = Model::new(cpu_vs.root(), cfg).unwrap();
    tch::no_grad(|| {
        let mut vars: Vec<(String, Tensor)> = cpu_vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, mut t) in vars {
            let noise = Tensor::randn_like(&t) * 0.05;
            let _ = t.g_add_(&noise);
        }
    });
    let mut gpu_vs = VarStore::new(device);
    let gpu = Model::new(gpu_vs.root(), cfg).unwrap();
    gpu_vs.copy(&cpu_vs).unwrap();
    (cpu_vs, cpu, gpu_vs, gpu)
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_device(Device::Cpu).to_kind(Kind::Double);
    let b = b.to_device(Device::Cpu).to_kind(Kind::Double);
    (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-30)
}

#[test]
#[ignore = "needs CUDA: runs in the GPU bundle"]
fn gpu_forward_and_gradients_match_cpu_in_f32() {
    let device = cuda();
    for (arch, video) in [("dim", false), ("dim", true), ("dit", false)] {
        let cfg = cfg(arch, video);
        let (cpu_vs, cpu, gpu_vs, gpu) = pair(&cfg, device);
        let shape: Vec<i64> = if video {
            vec![2, 4, 6, 12, 10]
        } else {
            vec![3, 4, 12, 10]
        };
        let x = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[3.0f32, 500.0, 999.0]).narrow(0, 0, shape[0]);
        let y = Tensor::from_slice(&[1i64, 9, 10]).narrow(0, 0, shape[0]);
        let target = Tensor::randn_like(&x.repeat_interleave_self_int(2, 1, None));
        let run = |m: &Model, d: Device| {
            let out = m
                .forward(
                    &x.to_device(d),
                    &t.to_device(d),
                    Some(&y.to_device(d)),
                    false,
                )
                .unwrap();
            (&out - target.to_device(d))
                .square()
                .mean(Kind::Float)
                .backward();
            out
        };
        let (a, b) = (run(&cpu, Device::Cpu), run(&gpu, device));
        let err = rel(&b, &a);
        assert!(
            err < 1e-3,
            "{arch} video={video}: GPU output differs from CPU by {err:e}"
        );
        let cv = cpu_vs.variables();
        for (name, v) in gpu_vs.variables() {
            let err = rel(&v.grad(), &cv[&name].grad());
            assert!(
                err < 5e-3,
                "{arch} video={video}: gradient of `{name}` differs by {err:e}"
            );
        }
    }
}

#[test]
#[ignore = "needs CUDA: runs in the GPU bundle"]
fn gpu_bf16_autocast_step_tracks_f32() {
    let device = cuda();
    set_cuda_autocast_dtype(Kind::BFloat16).unwrap();
    for arch in ["dim", "dit"] {
        let cfg = cfg(arch, false);
        let (_, _, _, gpu) = pair(&cfg, device);
        let x = Tensor::randn([4, 4, 12, 10], (Kind::Float, device));
        let t = Tensor::from_slice(&[1.0f32, 10.0, 100.0, 900.0]).to_device(device);
        let y = Tensor::from_slice(&[0i64, 3, 5, 9]).to_device(device);
        let f32_out = gpu.forward(&x, &t, Some(&y), false).unwrap();
        let bf16_out = autocast(true, || gpu.forward(&x, &t, Some(&y), false).unwrap()).unwrap();
        let err = rel(&bf16_out, &f32_out);
        assert!(
            err < 5e-2,
            "{arch}: bf16 autocast output differs from f32 by {err:e}"
        );
        let loss = autocast(true, || {
            bf16_out.to_kind(Kind::Float).square().mean(Kind::Float)
        })
        .unwrap();
        loss.backward();
        assert!(loss.double_value(&[]).is_finite());
    }
}

/// The fused AdamW step (with clipping, weight decay on some parameters) on
/// CUDA against the same step on the CPU, and the foreach norm and lerp.
#[test]
#[ignore = "needs CUDA: runs in the GPU bundle"]
fn gpu_fused_adamw_matches_cpu() {
    use dim_model::optim::{foreach_lerp_, AdamW, AdamWConfig};
    let device = cuda();
    tch::manual_seed(3);
    let shapes: [&[i64]; 3] = [&[33, 7], &[7], &[5, 1, 4]];
    let init: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)))
        .collect();
    let decay = [true, false, true];
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };
    let mut runs = Vec::new();
    for d in [Device::Cpu, device] {
        let params: Vec<Tensor> = init
            .iter()
            .map(|t| t.copy().to_device(d).set_requires_grad(true))
            .collect();
        let handles = params.iter().map(Tensor::shallow_clone).collect();
        let mut opt = AdamW::new(handles, &decay, cfg).unwrap();
        let mut norms = Vec::new();
        for step in 0..4 {
            tch::manual_seed(10 + step);
            let loss = params
                .iter()
                .map(|p| {
                    let w = Tensor::randn(p.size().as_slice(), (Kind::Float, Device::Cpu));
                    (p * w.to_device(d) * (1.0 + step as f64)).sum(Kind::Float)
                })
                .fold(Tensor::zeros([], (Kind::Float, d)), |a, b| a + b);
            loss.backward();
            let norm = opt.step(1e-2, 3.0, true).unwrap().unwrap();
            norms.push(norm.double_value(&[]));
            opt.zero_grad().unwrap();
        }
        let ema: Vec<Tensor> = params.iter().map(|p| p.detach().zeros_like()).collect();
        foreach_lerp_(&ema, &params, 0.25).unwrap();
        runs.push((params, norms, ema));
    }
    let (cpu, gpu) = (&runs[0], &runs[1]);
    for (a, b) in cpu.1.iter().zip(&gpu.1) {
        assert!(
            (a - b).abs() < 1e-5 * a,
            "gradient norm {b} on CUDA, {a} on CPU"
        );
    }
    for (i, (a, b)) in cpu.0.iter().zip(&gpu.0).enumerate() {
        let err = rel(b, a);
        assert!(err < 1e-5, "parameter {i} differs by {err:e}");
    }
    for (a, b) in cpu.2.iter().zip(&gpu.2) {
        assert!(rel(b, a) < 1e-6);
    }
}

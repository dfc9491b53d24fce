//! GPU checks. `#[ignore]`d in a plain `cargo test` (listed as ignored on a
//! machine without CUDA, never as passed); the GPU bundle (`cargo xtask
//! gpu-bundle`) runs them with `--include-ignored`, where no GPU is a failure.

use std::time::Instant;

mod common;

use common::GAUSSIAN_SAMPLERS;

use dim_diffusion::{
    Diffusion, DiffusionConfig, NoiseRng, SampleOptions, SamplerConfig, SamplerKind,
};
use tch::{Device, Kind, Tensor};

fn gpu() -> Device {
    assert!(
        tch::Cuda::is_available(),
        "no CUDA device visible to libtorch (GPU tests run through the GPU bundle)"
    );
    Device::Cuda(0)
}

/// Same seed, same device: identical samples; CUDA equals CPU to float
/// tolerance (the noise is generated on the CPU); training losses stay on the GPU.
#[test]
#[ignore = "needs CUDA: runs in the GPU bundle"]
fn gpu_sampling_is_seeded_and_matches_cpu() {
    let dev = gpu();
    let gd = Diffusion::new(&DiffusionConfig::dit()).unwrap();
    let model = |x: &Tensor, _t: &Tensor, _y: Option<&Tensor>| {
        Tensor::cat(&[x.tanh() * 0.5, x.zeros_like()], 1)
    };
    for sampler in GAUSSIAN_SAMPLERS {
        let sc = SamplerConfig::new(sampler, 50);
        let cpu = SampleOptions {
            kind: Kind::Double,
            ..SampleOptions::seeded(3)
        };
        let on_gpu = SampleOptions { device: dev, ..cpu };
        let a = gd
            .sample(&model, &[4, 3, 2, 8, 8], None, &sc, &cpu, |_| {})
            .unwrap();
        let b = gd
            .sample(&model, &[4, 3, 2, 8, 8], None, &sc, &on_gpu, |_| {})
            .unwrap();
        let c = gd
            .sample(&model, &[4, 3, 2, 8, 8], None, &sc, &on_gpu, |_| {})
            .unwrap();
        assert_eq!(b.device(), dev);
        assert!(
            b.equal(&c),
            "{sampler:?}: same seed, same device, same samples"
        );
        let err = (&a - b.to_device(Device::Cpu))
            .abs()
            .max()
            .double_value(&[]);
        assert!(err < 1e-9, "{sampler:?}: CPU vs CUDA differ by {err}");
    }
    let mut rng = NoiseRng::new(0);
    let x0 = rng.randn(&[4, 3, 8, 8], Kind::BFloat16, dev);
    let l = gd.training_losses(&model, &x0, None, &mut rng).unwrap();
    assert_eq!(l.loss.device(), dev);
    let fm = Diffusion::new(&DiffusionConfig::flow()).unwrap();
    let v = |x: &Tensor, _t: &Tensor, _y: Option<&Tensor>| x * 0.5;
    let l = fm.training_losses(&v, &x0, None, &mut rng).unwrap();
    assert_eq!(l.loss.device(), dev);
}

/// Not a pass/fail check: prints the per-step overhead of the samplers (the
/// CPU noise and its copy included) around a trivial model, on a DiT-XL/2-sized
/// latent batch (256, 4, 32, 32).
#[test]
#[ignore = "needs CUDA: runs in the GPU bundle"]
fn gpu_sampler_overhead() {
    let dev = gpu();
    let gd = Diffusion::new(&DiffusionConfig::dit()).unwrap();
    let model =
        |x: &Tensor, _t: &Tensor, _y: Option<&Tensor>| Tensor::cat(&[x * 0.1, x.zeros_like()], 1);
    for (sampler, steps) in [
        (SamplerKind::Ddpm, 250),
        (SamplerKind::Ddim, 50),
        (SamplerKind::DpmSolverPp2M, 20),
    ] {
        let sc = SamplerConfig::new(sampler, steps);
        let opts = SampleOptions {
            device: dev,
            ..SampleOptions::seeded(1)
        };
        let _ = gd
            .sample(&model, &[256, 4, 32, 32], None, &sc, &opts, |_| {})
            .unwrap();
        tch::Cuda::synchronize(0);
        let t0 = Instant::now();
        let x = gd
            .sample(&model, &[256, 4, 32, 32], None, &sc, &opts, |_| {})
            .unwrap();
        tch::Cuda::synchronize(0);
        let dt = t0.elapsed().as_secs_f64();
        assert_eq!(x.size(), vec![256, 4, 32, 32]);
        println!(
            "{sampler:?} {steps} steps, batch (256, 4, 32, 32) f32: {:.1} ms total, {:.2} ms/step",
            dt * 1e3,
            dt * 1e3 / steps as f64
        );
    }
}

//! bf16 on the GPU against f32 on the CPU, full-size SD VAE at random init
//! with the same weights. Stated tolerance: the largest error is at most 5%
//! of the largest reference value for the mean, log-variance and decode
//! (bf16 keeps 8 bits of mantissa through ~30 convolutions).

use dim_vae::{AutoencoderKL, VaeConfig};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 5e-2;

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let b = b.to_device(Device::Cpu).to_kind(Kind::Double);
    let a = a.to_device(Device::Cpu).to_kind(Kind::Double);
    (a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-30)
}

#[test]
#[ignore = "needs CUDA: runs in the GPU bundle"]
fn bf16_on_gpu_matches_f32_on_cpu() {
    assert!(tch::Cuda::is_available(), "no CUDA device");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("vae.safetensors");
    tch::manual_seed(7);
    AutoencoderKL::new(&VaeConfig::default(), Device::Cpu)
        .unwrap()
        .var_store()
        .save(&p)
        .unwrap();
    let cpu = AutoencoderKL::load(&VaeConfig::default(), &p, Device::Cpu).unwrap();
    let gpu = AutoencoderKL::load(&VaeConfig::default(), &p, Device::Cuda(0))
        .unwrap()
        .to_kind(Kind::BFloat16)
        .with_slice(2);
    let x = Tensor::rand([3, 3, 64, 48], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let z = Tensor::randn([3, 4, 8, 6], (Kind::Float, Device::Cpu));
    let (pc, pg) = (cpu.encode(&x).unwrap(), gpu.encode(&x).unwrap());
    let (dc, dg) = (cpu.decode(&z).unwrap(), gpu.decode(&z).unwrap());
    assert_eq!(dg.kind(), Kind::Float);
    let e = [
        ("mean", rel(&pg.mean, &pc.mean)),
        ("logvar", rel(&pg.logvar, &pc.logvar)),
        ("decode", rel(&dg, &dc)),
    ];
    println!("bf16 vs f32: {e:?}");
    for (what, err) in e {
        assert!(err < TOL, "{what}: {err:e} > {TOL:e}");
    }
}

//! SD-VAE throughput on a GPU: full-size random-init AutoencoderKL in bf16,
//! 256×256 images (4×32×32 latents), encode and decode, images per second.
//!
//! `cargo bench -p dim-vae --bench gpu_vae` (or the GPU bundle). Batch size
//! from `DIM_VAE_BENCH_BATCH` (default 32).

use std::time::Instant;

use dim_vae::{AutoencoderKL, VaeConfig};
use tch::{Device, Kind, Tensor};

fn main() {
    if !tch::Cuda::is_available() {
        println!("gpu_vae: no CUDA device, skipped");
        return;
    }
    let device = Device::Cuda(0);
    let batch: i64 = std::env::var("DIM_VAE_BENCH_BATCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    tch::manual_seed(0);
    let vae = AutoencoderKL::new(&VaeConfig::default(), device)
        .expect("SD config")
        .to_kind(Kind::BFloat16)
        .with_slice(batch);
    let x = Tensor::rand([batch, 3, 256, 256], (Kind::Float, device)) * 2.0 - 1.0;
    let z = Tensor::randn([batch, 4, 32, 32], (Kind::Float, device));
    time("encode", batch, &|| drop(vae.encode(&x).expect("encode")));
    time("decode", batch, &|| drop(vae.decode(&z).expect("decode")));
}

/// Runs `f` 3 times to warm up, then 10 times timed; prints images/s.
fn time(name: &str, batch: i64, f: &dyn Fn()) {
    for _ in 0..3 {
        f();
    }
    tch::Cuda::synchronize(0);
    let iters = 10;
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    tch::Cuda::synchronize(0);
    let s = t.elapsed().as_secs_f64();
    println!(
        "gpu_vae {name}: bf16, 256x256, batch {batch}: {:.1} images/s ({:.2} ms/batch)",
        (iters * batch) as f64 / s,
        1e3 * s / iters as f64
    );
}

//! SD-VAE throughput on a GPU: full-size random-init AutoencoderKL in bf16,
//! 256×256 images (4×32×32 latents), encode and decode, images per second.
//!
//! `cargo bench -p dim-vae --bench gpu_vae` (or the GPU bundle). Batch sizes
//! from `DIM_VAE_BENCH_BATCH`, comma-separated (default `1,8,32,64`); each is
//! one VAE call (the slice is the whole batch). `DIM_BENCH_JSON=<file>`
//! appends each case for `cargo xtask bench record`.

use std::time::Instant;

use dim_build::bench_json::{median_spread, record};
use dim_vae::{AutoencoderKL, VaeConfig};
use tch::{Device, Kind, Tensor};

fn main() {
    let missing = (!tch::Cuda::is_available()).then_some("no CUDA device");
    if !dim_build::gpu_bench::runs("gpu_vae", missing) {
        return;
    }
    let device = Device::Cuda(0);
    let spec = std::env::var("DIM_VAE_BENCH_BATCH").unwrap_or_else(|_| "1,8,32,64".into());
    let batches: Vec<i64> = spec
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("DIM_VAE_BENCH_BATCH: comma-separated integers")
        })
        .collect();
    tch::manual_seed(0);
    let mut vae = AutoencoderKL::new(&VaeConfig::default(), device)
        .expect("SD config")
        .to_kind(Kind::BFloat16);
    for batch in batches {
        vae = vae.with_slice(batch);
        let x = Tensor::rand([batch, 3, 256, 256], (Kind::Float, device)) * 2.0 - 1.0;
        let z = Tensor::randn([batch, 4, 32, 32], (Kind::Float, device));
        time("encode", batch, &|| drop(vae.encode(&x).expect("encode")));
        time("decode", batch, &|| drop(vae.decode(&z).expect("decode")));
    }
}

/// Runs `f` 3 times to warm up, then 10 times, each synchronised and timed;
/// prints the median images/s and the peak memory of the calls.
fn time(name: &str, batch: i64, f: &dyn Fn()) {
    for _ in 0..3 {
        f();
    }
    tch::Cuda::synchronize(0);
    dim_scan::device::reset_peak_memory(0).expect("reset peak memory");
    let rates: Vec<f64> = (0..10)
        .map(|_| {
            let t = Instant::now();
            f();
            tch::Cuda::synchronize(0);
            batch as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    let peak =
        dim_scan::device::peak_memory_bytes(0).expect("peak memory") as f64 / (1u64 << 30) as f64;
    let (med, spread) = median_spread(&rates);
    println!(
        "gpu_vae {name}: bf16, 256x256, batch {batch}: {med:.1} images/s ({:.2} ms/batch, spread {:.1}%), peak {peak:.2} GiB",
        1e3 * batch as f64 / med,
        100.0 * spread
    );
    record(
        &format!("vae_{name}_bf16_256_b{batch}"),
        "images/s",
        med,
        spread,
        rates.len(),
        None,
        true,
    );
}

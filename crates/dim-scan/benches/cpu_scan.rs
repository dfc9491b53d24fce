//! CPU benchmarks of the scan op (f32, z gate and softplus on; N = 16, and
//! N = 8 for the training-like shape of DiM: batch 32, D 128, L 256).
//! The CPU target: one direction's forward at batch 2, D 256,
//! L 1024 in under 25 ms on 2 cores.
//!
//! `DIM_BENCH_CPU_TIME=1` reports the process's CPU time (user + system, all
//! threads, from `/proc/self/stat`) per iteration instead of wall time: on a
//! machine shared with other jobs it moves much less than wall time. With
//! `RAYON_NUM_THREADS=1 OMP_NUM_THREADS=1` it is the single-thread time.
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Bencher, BenchmarkId, Criterion};
use dim_scan::testing::DirTensors;
use dim_scan::{
    backward_with_grad, selective_scan, selective_scan_bidirectional, Direction, ScanOptions,
};
use tch::{Device, Kind, Tensor};

/// CPU time of this process so far (clock ticks of 10 ms, Linux only).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the parenthesised command name; utime, stime are 14, 15.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// Times `f` by wall time, or by CPU time under `DIM_BENCH_CPU_TIME`.
fn run(b: &mut Bencher<'_>, mut f: impl FnMut()) {
    let cpu = std::env::var_os("DIM_BENCH_CPU_TIME").is_some();
    b.iter_custom(|iters| {
        let c0 = cpu.then(cpu_time);
        let t0 = Instant::now();
        for _ in 0..iters {
            f();
        }
        match c0 {
            Some(c0) => cpu_time() - c0,
            None => t0.elapsed(),
        }
    })
}

fn bench(c: &mut Criterion) {
    let opts = ScanOptions::default();
    let mut g = c.benchmark_group("scan_cpu");
    g.sample_size(10);
    for (batch, dim, len, n) in [(2, 256, 1024, 16), (1, 64, 16384, 16), (32, 128, 256, 8)] {
        let id = format!("{batch}x{dim}x{len}xN{n}");
        let z = Tensor::randn([batch, dim, len], (Kind::Float, Device::Cpu));
        let dir = || DirTensors::random([batch, dim, len, n, 1], Kind::Float, Device::Cpu);
        let (f, r) = (dir(), dir());
        g.bench_function(BenchmarkId::new("forward_1dir", &id), |b| {
            run(b, || {
                let y = selective_scan(f.inputs(), Direction::Forward, Some(&z), opts);
                drop(y.unwrap());
            })
        });
        g.bench_function(BenchmarkId::new("forward_bidir", &id), |b| {
            run(b, || {
                let y = selective_scan_bidirectional(f.inputs(), r.inputs(), Some(&z), opts);
                drop(y.unwrap());
            })
        });
        let with_grad = |d: DirTensors| d.map(|t| t.set_requires_grad(true));
        let (fg, rg) = (with_grad(dir()), with_grad(dir()));
        let dy = Tensor::randn([batch, dim, len], (Kind::Float, Device::Cpu));
        g.bench_function(BenchmarkId::new("fwd_bwd_bidir", &id), |b| {
            run(b, || {
                let y =
                    selective_scan_bidirectional(fg.inputs(), rg.inputs(), Some(&z), opts).unwrap();
                backward_with_grad(&y, &dy).unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

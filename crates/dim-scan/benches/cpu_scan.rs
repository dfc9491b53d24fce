//! CPU benchmarks of the scan op (f32, N = 16, z gate and softplus on).
//! The CPU target: one direction's forward at batch 2, D 256,
//! L 1024 in under 25 ms on 2 cores.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dim_scan::{
    backward_with_grad, selective_scan, selective_scan_bidirectional, Direction, ScanInputs,
    ScanOptions,
};
use tch::{Device, Kind, Tensor};

struct Dir {
    t: Vec<Tensor>,
}

impl Dir {
    fn new(batch: i64, dim: i64, len: i64, grad: bool) -> Self {
        let f = (Kind::Float, Device::Cpu);
        let t = vec![
            Tensor::randn([batch, dim, len], f),
            Tensor::randn([batch, dim, len], f) * 0.5 - 1.0,
            -(Tensor::rand([dim, 16], f) + 0.5),
            Tensor::randn([batch, 1, 16, len], f),
            Tensor::randn([batch, 1, 16, len], f),
            Tensor::randn([dim], f),
            Tensor::randn([dim], f) * 0.1,
        ];
        Self {
            t: t.into_iter().map(|t| t.set_requires_grad(grad)).collect(),
        }
    }

    fn inputs(&self) -> ScanInputs<'_> {
        ScanInputs {
            u: &self.t[0],
            delta: &self.t[1],
            a: &self.t[2],
            b: &self.t[3],
            c: &self.t[4],
            d: Some(&self.t[5]),
            delta_bias: Some(&self.t[6]),
        }
    }
}

fn bench(c: &mut Criterion) {
    let opts = ScanOptions::default();
    let mut g = c.benchmark_group("scan_cpu");
    g.sample_size(10);
    for (batch, dim, len) in [(2, 256, 1024), (1, 64, 16384)] {
        let id = format!("{batch}x{dim}x{len}");
        let z = Tensor::randn([batch, dim, len], (Kind::Float, Device::Cpu));
        let (f, r) = (
            Dir::new(batch, dim, len, false),
            Dir::new(batch, dim, len, false),
        );
        g.bench_function(BenchmarkId::new("forward_1dir", &id), |b| {
            b.iter(|| selective_scan(f.inputs(), Direction::Forward, Some(&z), opts).unwrap())
        });
        g.bench_function(BenchmarkId::new("forward_bidir", &id), |b| {
            b.iter(|| selective_scan_bidirectional(f.inputs(), r.inputs(), Some(&z), opts).unwrap())
        });
        let (fg, rg) = (
            Dir::new(batch, dim, len, true),
            Dir::new(batch, dim, len, true),
        );
        let dy = Tensor::randn([batch, dim, len], (Kind::Float, Device::Cpu));
        g.bench_function(BenchmarkId::new("fwd_bwd_bidir", &id), |b| {
            b.iter(|| {
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

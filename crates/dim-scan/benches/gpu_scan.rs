//! GPU benchmark of the scan op (bf16 u/delta/z/B/C, f32 A/D/delta_bias,
//! N = 16, z gate and softplus on), run from the GPU bundle.
//!
//! For each shape it prints the median time of: one direction forward, the
//! fused bidirectional forward (with gradients wanted, and under no_grad as
//! in sampling), the "flip + 2 calls" bidirectional forward built from our
//! own one-direction op, one direction forward+backward and fused
//! bidirectional forward+backward; the bytes moved and exponentials computed;
//! the floor (the larger of bytes over the copy bandwidth and exponentials
//! over the ex2 rate, both measured here, in this run); and the ratio to the
//! Mamba-1 figures measured on an H200 (issue 12's targets: fused
//! bidirectional forward <= 0.4x Mamba-1's flip-bidirectional forward, fused
//! bidirectional forward+backward <= 0.8x Mamba-1's one-direction
//! forward+backward, spread at fixed tokens <= 1.3).
//!
//! `DIM_BENCH_SHAPES="8x2304x1024,1x2304x16384"` picks shapes;
//! `DIM_BENCH_JSON=<file>` also appends every case as a JSON line there
//! (`dim_build::bench_json`, read by `cargo xtask bench record`).
use dim_build::bench_json::{median_spread, record};
use dim_scan::device::{copy_bandwidth, exp2_rate, time_cuda_ms};
use dim_scan::{
    backward_with_grad, selective_scan, selective_scan_bidirectional, Direction, ScanInputs,
    ScanOptions,
};
use tch::{Device, Kind, Tensor};

const N: i64 = 16;

/// Mamba-1 (state-spaces/mamba `selective_scan_cuda`) on one H200, 2026-11-29
/// (`../shared/ANCHORS.md`), ms: forward, forward+backward, flip-bidirectional
/// forward, flip-bidirectional forward+backward.
const ANCHORS: [((i64, i64, i64), [f64; 4]); 8] = [
    ((8, 2304, 1024), [0.327, 1.744, 0.883, 3.94]),
    ((32, 2304, 256), [0.331, 2.016, 0.886, 4.47]),
    ((1, 2304, 16384), [0.927, 4.117, 2.286, 9.12]),
    ((256, 768, 256), [0.861, 5.347, 2.289, 11.78]),
    ((256, 768, 64), [0.893, 3.349, 1.945, 7.01]),
    ((2, 2304, 4096), [0.354, 1.842, 0.938, 4.13]),
    ((16, 2048, 4096), [2.295, 12.04, 6.06, 26.8]),
    ((32, 2304, 64), [0.340, 1.252, 0.750, 2.63]),
];

struct Dir {
    u: Tensor,
    delta: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d: Tensor,
    bias: Tensor,
}

impl Dir {
    fn new(batch: i64, dim: i64, len: i64, dev: Device) -> Self {
        let bf = (Kind::BFloat16, dev);
        let f = (Kind::Float, dev);
        Self {
            u: Tensor::randn([batch, dim, len], bf),
            delta: Tensor::randn([batch, dim, len], bf) * 0.5 - 1.0,
            a: -(Tensor::rand([dim, N], f) + 0.5),
            b: Tensor::randn([batch, 1, N, len], bf),
            c: Tensor::randn([batch, 1, N, len], bf),
            d: Tensor::randn([dim], f),
            bias: Tensor::randn([dim], f) * 0.1,
        }
    }

    fn inputs(&self) -> ScanInputs<'_> {
        ScanInputs {
            u: &self.u,
            delta: &self.delta,
            a: &self.a,
            b: &self.b,
            c: &self.c,
            d: Some(&self.d),
            delta_bias: Some(&self.bias),
        }
    }

    fn with_grad(&self) -> Self {
        let g = |t: &Tensor| t.detach().set_requires_grad(true);
        Self {
            u: g(&self.u),
            delta: g(&self.delta),
            a: g(&self.a),
            b: g(&self.b),
            c: g(&self.c),
            d: g(&self.d),
            bias: g(&self.bias),
        }
    }

    fn flipped(&self) -> Self {
        Self {
            u: self.u.flip([2]),
            delta: self.delta.flip([2]),
            a: self.a.shallow_clone(),
            b: self.b.flip([3]),
            c: self.c.flip([3]),
            d: self.d.shallow_clone(),
            bias: self.bias.shallow_clone(),
        }
    }
}

/// Median milliseconds of `f` over several timed batches of calls, and
/// the samples' relative spread (interquartile range / median).
fn median_ms(mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..3 {
        f();
    }
    let reps = 10;
    let times: Vec<f64> = (0..9)
        .map(|_| {
            time_cuda_ms(|| {
                for _ in 0..reps {
                    f();
                }
            })
            .expect("CUDA events") as f64
                / reps as f64
        })
        .collect();
    median_spread(&times)
}

fn shapes() -> Vec<(i64, i64, i64)> {
    match std::env::var("DIM_BENCH_SHAPES") {
        Ok(s) => s
            .split(',')
            .map(|t| {
                let v: Vec<i64> = t
                    .split('x')
                    .map(|x| x.trim().parse().expect("BxDxL"))
                    .collect();
                (v[0], v[1], v[2])
            })
            .collect(),
        Err(_) => ANCHORS.iter().map(|(s, _)| *s).collect(),
    }
}

fn main() {
    let missing = if !tch::Cuda::is_available() {
        Some("no CUDA device")
    } else if !dim_scan::cuda_kernels_built() {
        Some("no CUDA kernels in this build")
    } else {
        None
    };
    if !dim_build::gpu_bench::runs("gpu_scan", missing) {
        return;
    }
    let dev = Device::Cuda(0);
    if std::env::var_os("DIM_BENCH_PROFILE").is_some() {
        profile_run(dev);
        return;
    }
    let bw = copy_bandwidth(dev).expect("copy bandwidth");
    let ex2 = exp2_rate(dev).expect("ex2 rate");
    println!(
        "gpu_scan: copy bandwidth {:.2} TB/s (read+write), ex2 rate {:.2} T/s",
        bw / 1e12,
        ex2 / 1e12
    );
    let opts = ScanOptions::default();
    println!(
        "{:>16} | {:>20} | {:>9} {:>9} {:>9} | {:>7} {:>7} | {:>8} {:>6} | target",
        "B x D x L", "case", "ms", "MB", "Gexp", "floor", "x floor", "Mamba-1", "ratio"
    );
    for (batch, dim, len) in shapes() {
        let f = Dir::new(batch, dim, len, dev);
        let r = Dir::new(batch, dim, len, dev);
        let z = Tensor::randn([batch, dim, len], (Kind::BFloat16, dev));
        let dy = Tensor::randn([batch, dim, len], (Kind::BFloat16, dev));
        let anchor = ANCHORS
            .iter()
            .find(|(s, _)| *s == (batch, dim, len))
            .map(|(_, a)| *a);
        let (bdl, bnl) = ((batch * dim * len) as f64, (batch * N * len) as f64);
        let es = 2.0;
        let exps_dir = bdl * N as f64 + 2.0 * bdl; // exp(ΔA) per state, softplus's exp and log
                                                   // Bytes: forward reads u, delta (per direction), z, B, C; writes y.
        let fwd_bytes = |dirs: f64| es * ((2.0 * dirs + 2.0) * bdl + 2.0 * dirs * bnl);
        // Backward also reads them and dy, writes du, ddelta, dz (dtype) and dB, dC (f32).
        let bwd_bytes = |dirs: f64| {
            es * ((2.0 * dirs + 2.0) * bdl + 2.0 * dirs * bnl)
                + es * (2.0 * dirs + 1.0) * bdl
                + 4.0 * 2.0 * dirs * bnl
        };
        // `goal`: the target ratio to the Mamba-1 figure, where the issue sets one.
        let row = |case: &str,
                   (ms, spread): (f64, f64),
                   bytes: f64,
                   exps: f64,
                   base: Option<f64>,
                   goal: Option<f64>| {
            let floor = (bytes / bw).max(exps / ex2) * 1e3;
            record(
                &format!("gpu_scan/{batch}x{dim}x{len}/{case}"),
                "ms",
                ms,
                spread,
                9,
                Some(floor),
                false,
            );
            let (anchor_s, ratio_s) = match base {
                Some(b) => (format!("{b:.2}"), format!("{:.2}", ms / b)),
                None => ("-".into(), "-".into()),
            };
            let target_s = match (base, goal) {
                (Some(b), Some(g)) if ms / b <= g => format!("<= {g:.2} ok"),
                (Some(_), Some(g)) => format!("<= {g:.2} MISSED"),
                _ => "-".into(),
            };
            println!(
                "{:>16} | {:>20} | {:>9.3} {:>9.1} {:>9.2} | {:>7.3} {:>7.2} | {:>8} {:>6} | {}",
                format!("{batch}x{dim}x{len}"),
                case,
                ms,
                bytes / 1e6,
                exps / 1e9,
                floor,
                ms / floor,
                anchor_s,
                ratio_s,
                target_s
            );
        };
        let t = median_ms(|| {
            let _ = selective_scan(f.inputs(), Direction::Forward, Some(&z), opts).unwrap();
        });
        row(
            "fwd, 1 direction",
            t,
            fwd_bytes(1.0),
            exps_dir,
            anchor.map(|a| a[0]),
            None,
        );
        // The training forward: inputs that require grad, so it saves the
        // chunk states and the ungated y for its backward.
        let fg = f.with_grad();
        let rg = r.with_grad();
        let t = median_ms(|| {
            let _ = selective_scan_bidirectional(fg.inputs(), rg.inputs(), Some(&z), opts).unwrap();
        });
        row(
            "fwd, fused bidir",
            t,
            fwd_bytes(2.0),
            2.0 * exps_dir,
            anchor.map(|a| a[2]),
            Some(0.4),
        );
        let t = tch::no_grad(|| {
            median_ms(|| {
                let _ =
                    selective_scan_bidirectional(fg.inputs(), rg.inputs(), Some(&z), opts).unwrap();
            })
        });
        row(
            "fwd, bidir, no_grad",
            t,
            fwd_bytes(2.0),
            2.0 * exps_dir,
            anchor.map(|a| a[2]),
            None,
        );
        let t = median_ms(|| {
            // The usual way: flip copies, two one-direction calls, flip back, add, gate.
            let rf = r.flipped();
            let yf = selective_scan(f.inputs(), Direction::Forward, None, opts).unwrap();
            let yr = selective_scan(rf.inputs(), Direction::Forward, None, opts).unwrap();
            let _ = (yf + yr.flip([2])) * z.silu();
        });
        row(
            "fwd, flip + 2 calls",
            t,
            fwd_bytes(2.0),
            2.0 * exps_dir,
            anchor.map(|a| a[2]),
            None,
        );
        let t = median_ms(|| {
            let y = selective_scan(fg.inputs(), Direction::Forward, Some(&z), opts).unwrap();
            backward_with_grad(&y, &dy).unwrap();
        });
        row(
            "fwd+bwd, 1 direction",
            t,
            fwd_bytes(1.0) + bwd_bytes(1.0),
            2.0 * exps_dir,
            anchor.map(|a| a[1]),
            None,
        );
        let t = median_ms(|| {
            let y = selective_scan_bidirectional(fg.inputs(), rg.inputs(), Some(&z), opts).unwrap();
            backward_with_grad(&y, &dy).unwrap();
        });
        row(
            "fwd+bwd, fused bidir",
            t,
            fwd_bytes(2.0) + bwd_bytes(2.0),
            4.0 * exps_dir,
            anchor.map(|a| a[1]),
            Some(0.8),
        );
    }

    // Linear cost: at fixed batch x L, the time should not depend on L.
    println!(
        "gpu_scan: fused bidirectional forward (saving for backward) at 16384 tokens per call (D 2304):"
    );
    let mut times = Vec::new();
    for (batch, len) in [(64, 256), (16, 1024), (4, 4096), (1, 16384)] {
        let f = Dir::new(batch, 2304, len, dev).with_grad();
        let r = Dir::new(batch, 2304, len, dev).with_grad();
        let z = Tensor::randn([batch, 2304, len], (Kind::BFloat16, dev));
        let (t, spread) = median_ms(|| {
            let _ = selective_scan_bidirectional(f.inputs(), r.inputs(), Some(&z), opts).unwrap();
        });
        record(
            &format!("gpu_scan/fixed tokens/fused bidir fwd {batch}x2304x{len}"),
            "ms",
            t,
            spread,
            9,
            None,
            false,
        );
        println!("  batch {batch:>3} x L {len:>6}: {t:.3} ms");
        times.push(t);
    }
    let (lo, hi) = times
        .iter()
        .fold((f64::INFINITY, 0f64), |(lo, hi), &t| (lo.min(t), hi.max(t)));
    println!(
        "  spread max/min {:.2} (target <= 1.30: {})",
        hi / lo,
        if hi / lo <= 1.3 { "ok" } else { "MISSED" }
    );
}

/// `DIM_BENCH_PROFILE=1`: five untimed fused forward+backward calls of the
/// op at 8 x 2304 x 1024, for a profiler to list every kernel the op launches
/// (`ncu --print-summary per-kernel`).
fn profile_run(dev: Device) {
    let (batch, dim, len) = (8, 2304, 1024);
    let f = Dir::new(batch, dim, len, dev).with_grad();
    let r = Dir::new(batch, dim, len, dev).with_grad();
    let z = Tensor::randn([batch, dim, len], (Kind::BFloat16, dev));
    let dy = Tensor::randn([batch, dim, len], (Kind::BFloat16, dev));
    for _ in 0..5 {
        let y =
            selective_scan_bidirectional(f.inputs(), r.inputs(), Some(&z), ScanOptions::default())
                .unwrap();
        backward_with_grad(&y, &dy).unwrap();
    }
    tch::Cuda::synchronize(0);
}

//! GPU tests, run on a machine with CUDA through the GPU bundle
//! (`cargo xtask gpu-bundle`). Without CUDA they print why and skip, unless
//! `DIM_EXPECT_GPU` is set (the bundle's run.sh sets it), where they fail.
mod common;

use common::{assert_close, run, seed, Case, Problem};
use dim_scan::Direction;
use tch::{Device, Kind, Tensor};

fn gpu() -> Option<Device> {
    let why = if !tch::Cuda::is_available() {
        "no CUDA device visible to libtorch"
    } else if !dim_scan::cuda_kernels_built() {
        "dim-scan was built without its CUDA kernels"
    } else {
        return Some(Device::Cuda(0));
    };
    if std::env::var_os("DIM_EXPECT_GPU").is_some() {
        panic!("DIM_EXPECT_GPU is set but {why}");
    }
    println!("skipped: {why}");
    None
}

/// Fills libtorch's caching allocator with NaN blocks, so that an output
/// element the kernels fail to write reads as NaN and fails the comparison.
fn poison(device: Device) {
    let t = Tensor::full([1 << 29], f64::NAN, (Kind::Float, device));
    drop(t);
    let small: Vec<Tensor> = (0..64)
        .map(|i| Tensor::full([(i + 1) << 12], f64::NAN, (Kind::Float, device)))
        .collect();
    drop(small);
}

#[test]
fn gpu_smoke_kernel_runs_on_tch_memory() {
    let Some(dev) = gpu() else { return };
    let n = 1_000_003i64; // not a multiple of the block size
    let x = Tensor::randn([n], (Kind::Float, dev));
    let out = Tensor::full([n], f64::NAN, (Kind::Float, dev));
    dim_scan::device::smoke_axpy_iota(&out, &x, 2.5).unwrap();
    let want = x.to_device(Device::Cpu) * 2.5 + Tensor::arange(n, (Kind::Float, Device::Cpu));
    let got = out.to_device(Device::Cpu);
    let err = (got - &want).abs().max().double_value(&[]);
    assert!(err <= 1e-6 * n as f64, "smoke kernel max error {err}");
    println!(
        "smoke: CUDA available ({} device(s)), kernel from kernels/smoke.cu wrote {n} elements on the current stream, max error {err:e}",
        tch::Cuda::device_count()
    );
}

/// CUDA (f32) against the CPU implementation (f32) and, where the plain-tch
/// loop is affordable, against the f64 reference.
fn check(case: Case, kind: Kind, tol: f64, with_reference: bool) {
    let dev = Device::Cuda(0);
    let p = Problem::random(case);
    poison(dev);
    let got = run(&p, kind, dev, false, false);
    let cpu = run(&p, kind, Device::Cpu, false, false);
    assert_close(&format!("{case:?} {kind:?} cuda vs cpu"), &got, &cpu, tol);
    if with_reference {
        let want = run(&p.rounded_to(kind), Kind::Double, Device::Cpu, true, false);
        assert_close(&format!("{case:?} {kind:?} cuda vs f64"), &got, &want, tol);
    }
}

#[test]
fn gpu_matches_cpu_at_awkward_sizes() {
    if gpu().is_none() {
        return;
    }
    tch::manual_seed(seed());
    for len in [
        1, 7, 127, 128, 129, 255, 256, 257, 1023, 1024, 1025, 2047, 2048, 2049,
    ] {
        for direction in [Some(Direction::Forward), Some(Direction::Reverse), None] {
            check(
                Case {
                    direction,
                    ..Case::new(2, 6, len)
                },
                Kind::Float,
                1e-5,
                len <= 257,
            );
        }
    }
    for (groups, dstate, dim) in [(2, 16, 8), (3, 12, 6), (1, 64, 4), (1, 32, 8), (4, 1, 8)] {
        check(
            Case {
                groups,
                dstate,
                ..Case::new(2, dim, 300)
            },
            Kind::Float,
            1e-5,
            true,
        );
    }
    for (z, d, bias, softplus) in [
        (false, true, true, true),
        (true, false, false, true),
        (true, true, true, false),
        (false, false, false, false),
    ] {
        for direction in [Some(Direction::Reverse), None] {
            check(
                Case {
                    direction,
                    z,
                    d,
                    bias,
                    softplus,
                    ..Case::new(2, 6, 333)
                },
                Kind::Float,
                1e-5,
                true,
            );
        }
    }
    for kind in [Kind::BFloat16, Kind::Half] {
        check(Case::new(3, 40, 700), kind, 1e-2, false);
    }
}

#[test]
fn gpu_matches_cpu_at_long_lengths() {
    if gpu().is_none() {
        return;
    }
    tch::manual_seed(seed());
    for (batch, dim, len) in [(2, 16, 16384), (1, 4, 1 << 20)] {
        for direction in [Some(Direction::Reverse), None] {
            check(
                Case {
                    direction,
                    ..Case::new(batch, dim, len)
                },
                Kind::Float,
                1e-5,
                false,
            );
        }
    }
    check(Case::new(1, 8, 1 << 20), Kind::BFloat16, 1e-2, false);
}

#[test]
fn gpu_deterministic_backward_is_bit_identical() {
    let Some(dev) = gpu() else { return };
    tch::manual_seed(seed());
    for case in [
        Case::new(4, 64, 3000),
        Case {
            groups: 2,
            ..Case::new(2, 64, 5000)
        },
    ] {
        let p = Problem::random(case);
        let first = run(&p, Kind::BFloat16, dev, false, true);
        let second = run(&p, Kind::BFloat16, dev, false, true);
        for (a, b) in first
            .grads
            .iter()
            .flatten()
            .zip(second.grads.iter().flatten())
        {
            if let (Some(a), Some(b)) = (a, b) {
                assert!(
                    a.equal(b),
                    "{case:?}: deterministic gradients differ between runs"
                );
            }
        }
        assert!(first.dz.unwrap().equal(&second.dz.unwrap()));
    }
}

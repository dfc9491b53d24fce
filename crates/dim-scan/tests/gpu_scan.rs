//! GPU tests. They are `#[ignore]`d in a plain `cargo test` (so a machine
//! without CUDA lists them as ignored, never as passed) and run on a machine
//! with CUDA through the GPU bundle (`cargo xtask gpu-bundle`), whose run.sh
//! passes `--include-ignored`; there a missing GPU or kernel fails them.
mod common;

use common::{
    assert_backward_bit_identical, assert_close, every_direction, run, seed, with_parts_off, Case,
    Problem,
};
use dim_scan::{Direction, ScanError, ScanInputs, ScanOptions};
use tch::{Device, Kind, Tensor};

/// The CUDA device, or a panic saying why there is none.
fn gpu() -> Device {
    if !tch::Cuda::is_available() {
        panic!("no CUDA device visible to libtorch (GPU tests run through the GPU bundle)");
    }
    if !dim_scan::cuda_kernels_built() {
        panic!("dim-scan was built without its CUDA kernels");
    }
    Device::Cuda(0)
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
#[ignore = "needs CUDA: runs in the GPU bundle"]
fn gpu_smoke_kernel_runs_on_tch_memory() {
    let dev = gpu();
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
#[ignore = "needs CUDA: runs in the GPU bundle"]
fn gpu_matches_cpu_at_awkward_sizes() {
    gpu();
    tch::manual_seed(seed());
    for len in [
        1, 7, 31, 32, 33, 63, 65, 127, 128, 129, 255, 256, 257, 1023, 1024, 1025, 2049,
    ] {
        for case in every_direction(Case::new(2, 6, len)) {
            check(case, Kind::Float, 1e-5, len <= 257);
        }
    }
    for (groups, dstate, dim) in [
        (2, 16, 8),
        (3, 12, 6),
        (1, 64, 4),
        (1, 32, 8),
        (4, 1, 8),
        (4, 5, 8),
        (1, 33, 4),
        (2, 48, 12),
    ] {
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
    for case in with_parts_off(Case::new(2, 6, 333)) {
        check(case, Kind::Float, 1e-5, true);
    }
    for kind in [Kind::BFloat16, Kind::Half] {
        check(Case::new(3, 40, 700), kind, 1e-2, false);
    }
}

#[test]
#[ignore = "needs CUDA: runs in the GPU bundle"]
fn gpu_matches_cpu_at_long_lengths() {
    gpu();
    tch::manual_seed(seed());
    for (batch, dim, len) in [(2, 16, 16384), (1, 4, (1 << 20) + 3)] {
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
#[ignore = "needs CUDA: runs in the GPU bundle"]
fn gpu_deterministic_backward_is_bit_identical() {
    let dev = gpu();
    tch::manual_seed(seed());
    for case in [
        Case::new(4, 64, 3000),
        Case {
            groups: 2,
            ..Case::new(2, 64, 5000)
        },
    ] {
        let p = Problem::random(case);
        assert_backward_bit_identical(&format!("{case:?}"), &p, Kind::BFloat16, dev);
    }
}

/// Runs the fused op on `(x, z)` views and returns y and the gradients of the
/// given leaves for the loss sum(y * w).
fn bidir_grads(
    u: [&Tensor; 2],
    delta: [&Tensor; 2],
    a: &Tensor,
    b: [&Tensor; 2],
    c: [&Tensor; 2],
    z: &Tensor,
    w: &Tensor,
    leaves: &[&Tensor],
) -> (Tensor, Vec<Tensor>) {
    let x = |k: usize| ScanInputs {
        u: u[k],
        delta: delta[k],
        a,
        b: b[k],
        c: c[k],
        d: None,
        delta_bias: None,
    };
    let y = dim_scan::selective_scan_bidirectional(x(0), x(1), Some(z), ScanOptions::default())
        .unwrap();
    let grads = Tensor::run_backward(&[(&y * w).sum(Kind::Float)], leaves, false, false);
    (y, grads)
}

/// Views narrowed out of larger projection outputs (batch-strided, as the
/// model hands them over) give what contiguous copies give, values and
/// gradients, bit for bit.
#[test]
#[ignore = "needs CUDA: runs in the GPU bundle"]
fn gpu_batch_strided_views_match_contiguous() {
    let dev = gpu();
    tch::manual_seed(seed());
    for (kind, (bt, e, l, n)) in [
        (Kind::BFloat16, (3, 48, 256, 16)),
        (Kind::Float, (2, 24, 301, 16)),
        (Kind::Float, (2, 8, 64, 33)),
    ] {
        let opts = (kind, dev);
        // in_proj output (B, 2E, L): x rows [0, E), z rows [E, 2E).
        let xz = Tensor::randn([bt, 2 * e, l], opts).set_requires_grad(true);
        // x_proj outputs (B, 2N + 4, L): B rows [4, 4+N), C rows [4+N, 4+2N).
        let dbl0 = Tensor::randn([bt, 2 * n + 4, l], opts).set_requires_grad(true);
        let dbl1 = Tensor::randn([bt, 2 * n + 4, l], opts).set_requires_grad(true);
        let delta = (Tensor::randn([2, bt, e, l], opts) * 0.5 - 1.0).set_requires_grad(true);
        let a = -(Tensor::rand([e, n], (Kind::Float, dev)) * 4.0 + 0.5);
        let w = Tensor::randn([bt, e, l], opts);
        let u = xz.narrow(1, 0, e);
        let z = xz.narrow(1, e, e);
        let bv = |t: &Tensor| t.narrow(1, 4, n).unsqueeze(1);
        let cv = |t: &Tensor| t.narrow(1, 4 + n, n).unsqueeze(1);
        let (d0, d1) = (delta.get(0), delta.get(1));
        let leaves = [&xz, &dbl0, &dbl1, &delta];
        let (y_view, g_view) = bidir_grads(
            [&u, &u],
            [&d0, &d1],
            &a,
            [&bv(&dbl0), &bv(&dbl1)],
            [&cv(&dbl0), &cv(&dbl1)],
            &z,
            &w,
            &leaves,
        );
        let (uc, zc) = (u.contiguous(), z.contiguous());
        let (b0, b1, c0, c1) = (
            bv(&dbl0).contiguous(),
            bv(&dbl1).contiguous(),
            cv(&dbl0).contiguous(),
            cv(&dbl1).contiguous(),
        );
        let (y_cont, g_cont) = bidir_grads(
            [&uc, &uc],
            [&d0, &d1],
            &a,
            [&b0, &b1],
            [&c0, &c1],
            &zc,
            &w,
            &leaves,
        );
        assert!(
            y_view.equal(&y_cont),
            "{kind:?}: y differs between views and copies"
        );
        // Gradient sums over the two directions' views may add in another
        // order than over copies, so they agree to rounding, not bitwise.
        let tol = if kind == Kind::Float { 1e-6 } else { 1e-2 };
        for (i, (gv, gc)) in g_view.iter().zip(&g_cont).enumerate() {
            let e = common::rel_err(&gv.to_kind(Kind::Double), &gc.to_kind(Kind::Double));
            assert!(e < tol, "{kind:?}: gradient {i} views vs copies: {e:e}");
        }
    }
}

/// A forward under no_grad (sampling) keeps nothing for a backward and
/// gives the same y, bit for bit, as a forward that does.
#[test]
#[ignore = "needs CUDA: runs in the GPU bundle"]
fn gpu_forward_without_grad_matches() {
    let dev = gpu();
    tch::manual_seed(seed());
    let p = Problem::random(Case::new(3, 40, 1000));
    let with_grad = run(&p, Kind::BFloat16, dev, false, false);
    let y_no_grad = tch::no_grad(|| common::forward_only(&p, Kind::BFloat16, dev));
    assert!(with_grad.y.equal(&y_no_grad), "no_grad forward differs");
}

/// N past the kernels' limit is an error naming the argument, not a launch failure.
#[test]
#[ignore = "needs CUDA: runs in the GPU bundle"]
fn gpu_rejects_state_size_past_the_limit() {
    let dev = gpu();
    let n = dim_scan::CUDA_MAX_DSTATE + 1;
    let t = |s: &[i64]| Tensor::randn(s, (Kind::Float, dev));
    let (u, delta, a, b, c) = (
        t(&[1, 4, 8]),
        t(&[1, 4, 8]),
        t(&[4, n]),
        t(&[1, 1, n, 8]),
        t(&[1, 1, n, 8]),
    );
    let x = ScanInputs {
        u: &u,
        delta: &delta,
        a: &a,
        b: &b,
        c: &c,
        d: None,
        delta_bias: None,
    };
    match dim_scan::selective_scan(x, Direction::Forward, None, ScanOptions::default()) {
        Err(e @ ScanError::Unsupported { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("N") && msg.contains("65"), "{msg}");
        }
        other => panic!("expected an Unsupported error, got {other:?}"),
    }
}

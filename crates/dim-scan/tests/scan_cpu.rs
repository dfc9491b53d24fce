//! The op on CPU tensors against the f64 plain-tch reference: values and
//! every gradient, at awkward sizes, every option, both directions and fused.
mod common;

use common::{
    assert_backward_bit_identical, assert_close, every_direction, run, seed, with_parts_off, Case,
    Problem,
};
use dim_scan::{selective_scan, Direction, ScanError, ScanInputs, ScanOptions};
use tch::{Device, Kind, Tensor};

const F32_TOL: f64 = 1e-5;
const BF16_TOL: f64 = 1e-2;

fn check(case: Case, kind: Kind, tol: f64) {
    let p = Problem::random(case);
    let want = run(&p.rounded_to(kind), Kind::Double, Device::Cpu, true, false);
    let got = run(&p, kind, Device::Cpu, false, false);
    assert_close(&format!("{case:?} {kind:?}"), &got, &want, tol);
}

#[test]
fn every_direction_at_awkward_lengths() {
    tch::manual_seed(seed());
    // Lengths around the backward's segment (128) and the odd ones the issue names.
    for len in [1, 7, 127, 128, 129, 257] {
        for case in every_direction(Case::new(2, 5, len)) {
            check(case, Kind::Float, F32_TOL);
        }
    }
}

#[test]
fn long_sequence_fused() {
    tch::manual_seed(seed());
    check(Case::new(1, 3, 2049), Kind::Float, F32_TOL);
}

#[test]
fn groups_and_state_sizes() {
    tch::manual_seed(seed());
    for (groups, dstate, dim) in [(2, 16, 6), (3, 12, 6), (1, 64, 4), (4, 1, 20)] {
        check(
            Case {
                groups,
                dstate,
                ..Case::new(2, dim, 37)
            },
            Kind::Float,
            F32_TOL,
        );
    }
}

#[test]
fn optional_parts_off() {
    tch::manual_seed(seed());
    for case in with_parts_off(Case::new(2, 4, 45)) {
        check(case, Kind::Float, F32_TOL);
    }
}

#[test]
fn half_precision_inputs() {
    tch::manual_seed(seed());
    for kind in [Kind::BFloat16, Kind::Half] {
        for direction in [Some(Direction::Forward), None] {
            check(
                Case {
                    direction,
                    ..Case::new(2, 4, 131)
                },
                kind,
                BF16_TOL,
            );
        }
    }
}

#[test]
fn more_channels_than_one_task() {
    // 40 channels in 2 groups: several backward tasks per group, so the dB/dC
    // partial sums are really reduced.
    tch::manual_seed(seed());
    check(
        Case {
            groups: 2,
            ..Case::new(2, 40, 33)
        },
        Kind::Float,
        F32_TOL,
    );
}

#[test]
fn backward_is_bit_identical_twice() {
    tch::manual_seed(seed());
    let p = Problem::random(Case::new(3, 40, 300));
    assert_backward_bit_identical("f32 CPU", &p, Kind::Float, Device::Cpu);
}

#[test]
fn bad_inputs_name_the_tensor() {
    let f = (Kind::Float, Device::Cpu);
    let u = Tensor::zeros([2, 4, 8], f);
    let a = Tensor::zeros([4, 16], f);
    let b = Tensor::zeros([2, 1, 16, 8], f);
    let ok = ScanInputs {
        u: &u,
        delta: &u,
        a: &a,
        b: &b,
        c: &b,
        d: None,
        delta_bias: None,
    };
    let opts = ScanOptions::default();
    let msg = |r: Result<Tensor, ScanError>| r.unwrap_err().to_string();

    let bad_c = Tensor::zeros([2, 1, 16, 9], f);
    let e = msg(selective_scan(
        ScanInputs { c: &bad_c, ..ok },
        Direction::Forward,
        None,
        opts,
    ));
    assert!(e.contains("`C`") && e.contains("[2, 1, 16, 9]"), "{e}");

    let bad_b = Tensor::zeros([2, 3, 16, 8], f);
    let e = msg(selective_scan(
        ScanInputs { b: &bad_b, ..ok },
        Direction::Forward,
        None,
        opts,
    ));
    assert!(e.contains("`B`") && e.contains("G dividing D"), "{e}");

    let half_delta = u.to_kind(Kind::BFloat16);
    let e = msg(selective_scan(
        ScanInputs {
            delta: &half_delta,
            ..ok
        },
        Direction::Forward,
        None,
        opts,
    ));
    assert!(e.contains("`delta`") && e.contains("dtype"), "{e}");

    let int_u = u.to_kind(Kind::Int);
    let e = msg(selective_scan(
        ScanInputs { u: &int_u, ..ok },
        Direction::Forward,
        None,
        opts,
    ));
    assert!(e.contains("`u`"), "{e}");

    let bad_z = Tensor::zeros([2, 4, 7], f);
    let e = msg(selective_scan(ok, Direction::Forward, Some(&bad_z), opts));
    assert!(e.contains("`z`"), "{e}");

    let bad_d = Tensor::zeros([5], f);
    let e = msg(selective_scan(
        ScanInputs {
            d: Some(&bad_d),
            ..ok
        },
        Direction::Forward,
        None,
        opts,
    ));
    assert!(e.contains("`D`"), "{e}");

    // And the good call works, with zeros in and zeros out.
    let y = selective_scan(ok, Direction::Forward, None, opts).unwrap();
    assert_eq!(y.size(), [2, 4, 8]);
    assert_eq!(y.abs().sum(Kind::Double).double_value(&[]), 0.0);
}

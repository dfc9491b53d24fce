//! `dim ops scan` driven as a user would: tensors in a safetensors file, the
//! binary, the result file; checked against the f64 plain-tch reference.
mod common;

use std::path::Path;
use std::process::Output;

use common::{failed, read_tensors, s, succeeded};

use dim_scan::reference::selective_scan_bidirectional_ref;
use dim_scan::testing::{DirTensors, INPUT_NAMES};
use tch::{Device, Kind, Tensor};

/// Runs `dim ops scan --input input --output output` plus `extra`.
fn ops_scan(input: &Path, output: &Path, extra: &[&str]) -> Output {
    let (input, output) = (s(input), s(output));
    let mut args = vec!["ops", "scan", "--input", &input, "--output", &output];
    args.extend_from_slice(extra);
    common::run(&args)
}

fn write(path: &Path, tensors: &[(&str, &Tensor)]) {
    Tensor::write_safetensors(tensors, path).unwrap();
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    (&a - b).norm().double_value(&[]) / b.norm().double_value(&[])
}

#[test]
fn bidirectional_forward_and_backward_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (
        dir.path().join("in.safetensors"),
        dir.path().join("out.safetensors"),
    );
    let f = (Kind::Float, Device::Cpu);
    let (b, d, l, n) = (2, 3, 19, 8);
    let names = INPUT_NAMES;
    let make = || DirTensors::random([b, d, l, n, 1], Kind::Float, Device::Cpu);
    let (fw, bw) = (make(), make());
    let z = Tensor::randn([b, d, l], f);
    let dy = Tensor::randn([b, d, l], f);
    let mut named: Vec<(String, &Tensor)> = Vec::new();
    for (i, nm) in names.iter().enumerate() {
        named.push((nm.to_string(), &fw.0[i]));
        named.push((format!("{nm}_b"), &bw.0[i]));
    }
    named.push(("z".into(), &z));
    named.push(("dy".into(), &dy));
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    write(&input, &refs);

    succeeded(
        &ops_scan(&input, &output, &["--bidirectional"]),
        "dim ops scan",
    );
    let got = read_tensors(&output);

    // The reference in f64 with libtorch's own autograd.
    let leaf = |t: &Tensor| t.to_kind(Kind::Double).set_requires_grad(true);
    let (fw64, bw64) = (fw.map(leaf), bw.map(leaf));
    let z64 = leaf(&z);
    let y = selective_scan_bidirectional_ref(fw64.inputs(), bw64.inputs(), Some(&z64), true);
    (&y * dy.to_kind(Kind::Double)).sum(Kind::Double).backward();
    assert!(rel_err(&got["y"], &y) < 1e-5);
    for (i, nm) in names.iter().enumerate() {
        assert!(
            rel_err(&got[&format!("d{nm}")], &fw64.0[i].grad()) < 1e-5,
            "d{nm}"
        );
        assert!(
            rel_err(&got[&format!("d{nm}_b")], &bw64.0[i].grad()) < 1e-5,
            "d{nm}_b"
        );
    }
    assert!(rel_err(&got["dz"], &z64.grad()) < 1e-5);
}

#[test]
fn bad_inputs_get_a_message_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let output = dir.path().join("out.safetensors");
    let f = (Kind::Float, Device::Cpu);
    let u = Tensor::randn([1, 2, 5], f);
    let a = Tensor::randn([2, 4], f);
    let b = Tensor::randn([1, 1, 4, 5], f);
    let bad_c = Tensor::randn([1, 1, 4, 6], f);
    // `u delta A B` and `more`, which must be refused; the message.
    let refused = |more: &[(&str, &Tensor)]| {
        let mut tensors = vec![("u", &u), ("delta", &u), ("A", &a), ("B", &b)];
        tensors.extend_from_slice(more);
        write(&input, &tensors);
        failed(&ops_scan(&input, &output, &[]), "dim ops scan")
    };
    let e = refused(&[]);
    assert!(e.contains("in.safetensors") && e.contains("`C`"), "{e}");
    let e = refused(&[("C", &bad_c)]);
    assert!(e.contains("`C`") && e.contains("[1, 1, 4, 6]"), "{e}");
    let e = refused(&[("C", &b), ("u_b", &u)]);
    assert!(e.contains("`u_b`") && e.contains("--bidirectional"), "{e}");
    let e = refused(&[("C", &b), ("dy", &bad_c)]);
    assert!(e.contains("dy"), "{e}");
    std::fs::write(&input, b"not a safetensors file").unwrap();
    let e = failed(&ops_scan(&input, Path::new("x"), &[]), "dim ops scan");
    assert!(e.contains("in.safetensors"), "{e}");
    assert!(!output.exists(), "no output file is left behind on failure");
}

//! Inception-v3 (FID): names and shapes as in the PyTorch state dict, exact
//! load checks, and a forward on small inputs with weights the test makes.

mod common;

use dim_eval::{FeatureExtractor, InceptionV3};
use tch::{Device, Kind, Tensor};

#[test]
fn variables_follow_the_pytorch_state_dict() {
    let net = InceptionV3::new(Device::Cpu);
    let vars = net.var_store().variables();
    // 94 BasicConv2d blocks: a conv weight plus four batch-norm tensors each.
    assert_eq!(vars.len(), 94 * 5);
    for (name, shape) in [
        ("Conv2d_1a_3x3.conv.weight", vec![32, 3, 3, 3]),
        ("Conv2d_4a_3x3.bn.running_var", vec![192]),
        ("Mixed_5b.branch_pool.conv.weight", vec![32, 192, 1, 1]),
        ("Mixed_6b.branch7x7_2.conv.weight", vec![128, 128, 1, 7]),
        ("Mixed_6e.branch7x7dbl_4.conv.weight", vec![192, 192, 7, 1]),
        ("Mixed_7a.branch3x3_2.conv.weight", vec![320, 192, 3, 3]),
        ("Mixed_7b.branch3x3dbl_3b.conv.weight", vec![384, 384, 3, 1]),
        ("Mixed_7c.branch_pool.conv.weight", vec![192, 2048, 1, 1]),
    ] {
        assert_eq!(vars[name].size(), shape, "{name}");
    }
}

fn saved_weights(dir: &std::path::Path) -> (InceptionV3, std::path::PathBuf) {
    common::fresh_seed("inception weights");
    let net = InceptionV3::new(Device::Cpu);
    // Non-trivial batch-norm statistics so that loading them is visible.
    tch::no_grad(|| {
        for (name, mut v) in net.var_store().variables() {
            if name.ends_with("running_mean") {
                v.copy_(&(Tensor::randn_like(&v) * 0.1));
            } else if name.ends_with("running_var") {
                v.copy_(&(Tensor::rand_like(&v) + 0.5));
            }
        }
    });
    let p = dir.join("inception.safetensors");
    net.var_store().save(&p).unwrap();
    (net, p)
}

#[test]
fn loaded_weights_give_the_same_features_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let (net, p) = saved_weights(dir.path());
    let loaded = InceptionV3::load(&p, Device::Cpu).unwrap();
    // Grey images (one channel) at 28x28, resized to 299 as for FID.
    let x = Tensor::rand([2, 1, 28, 28], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let a = net.features(&x).unwrap();
    let b = loaded.features(&x).unwrap();
    assert_eq!(a.size(), [2, 2048]);
    assert!(bool::try_from(a.isfinite().all()).unwrap());
    assert!(
        a.allclose(&b, 0.0, 0.0, false),
        "loaded weights differ from saved ones"
    );
    // Evaluation mode: each image's features do not depend on the batch.
    let one = loaded.features(&x.narrow(0, 1, 1)).unwrap();
    assert!(one.allclose(&b.narrow(0, 1, 1), 1e-4, 1e-5, false));
    // A fresh network (different weights) gives different features.
    let other = InceptionV3::new(Device::Cpu).features(&x).unwrap();
    assert!(!other.allclose(&a, 1e-3, 1e-3, false));
}

#[test]
fn small_input_without_resize() {
    let net = InceptionV3::new(Device::Cpu).with_resize(false);
    let f = net
        .features(&Tensor::zeros([1, 3, 75, 75], (Kind::Float, Device::Cpu)))
        .unwrap();
    assert_eq!(f.size(), [1, 2048]);
    let e = net
        .features(&Tensor::zeros([1, 2, 75, 75], (Kind::Float, Device::Cpu)))
        .unwrap_err();
    assert!(e.to_string().contains("C in [1, 3]"), "{e}");
}

#[test]
fn wrong_missing_and_unexpected_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (net, _) = saved_weights(dir.path());
    let mut named: Vec<(String, Tensor)> = net.var_store().variables().into_iter().collect();
    let write = |named: &[(String, Tensor)], file: &str| {
        let p = dir.path().join(file);
        Tensor::write_safetensors(named, &p).unwrap();
        p
    };
    // The classifier head and BN counters of a PyTorch state dict are ignored.
    let mut with_extras: Vec<(String, Tensor)> = named
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    with_extras.push((
        "fc.weight".into(),
        Tensor::zeros([1008, 2048], (Kind::Float, Device::Cpu)),
    ));
    with_extras.push((
        "Mixed_5b.branch1x1.bn.num_batches_tracked".into(),
        Tensor::from(0i64),
    ));
    InceptionV3::load(&write(&with_extras, "extras.safetensors"), Device::Cpu).unwrap();

    let i = named
        .iter()
        .position(|(k, _)| k == "Mixed_6b.branch7x7_2.conv.weight")
        .unwrap();
    named[i].1 = Tensor::zeros([128, 128, 7, 1], (Kind::Float, Device::Cpu));
    let e = InceptionV3::load(&write(&named, "bad.safetensors"), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Mixed_6b.branch7x7_2.conv.weight") && e.contains("[128, 128, 7, 1]"),
        "{e}"
    );

    drop(named.remove(i));
    named.push((
        "aux.weight".into(),
        Tensor::zeros([3], (Kind::Float, Device::Cpu)),
    ));
    let e = InceptionV3::load(&write(&named, "missing.safetensors"), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing `Mixed_6b.branch7x7_2.conv.weight`"),
        "{e}"
    );
    assert!(e.contains("unexpected `aux.weight`"), "{e}");

    let e = InceptionV3::load(&dir.path().join("nope.safetensors"), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nope.safetensors") && e.contains("No such file"),
        "{e}"
    );
}

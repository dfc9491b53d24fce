//! Inception-v3 parity with pytorch-fid at random init: pool (2048), spatial
//! (the ADM evaluator's 2023 sFID features) and logits (1008), including
//! pytorch-fid's preprocessing (bilinear resize to 299, `[0, 1] → [-1, 1]`).
//! The fixture is made on each run by `scripts/inception_fixture.py` with a
//! fresh seed (float64 reference); it needs the project venv with
//! `pytorch-fid` (`cargo xtask setup` installs it) and fails, saying so,
//! without it.

use std::path::{Path, PathBuf};
use std::process::Command;

use dim_eval::{InceptionV3, LOGITS_DIM, SPATIAL_DIM};
use tch::{Device, Kind, Tensor};

fn python() -> PathBuf {
    match std::env::var("DIM_PYTHON") {
        Ok(p) => p.into(),
        Err(_) => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python"),
    }
}

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let b = b.to_kind(Kind::Double);
    let scale = b.abs().max().double_value(&[]).max(1e-30);
    (a.to_kind(Kind::Double) - &b).abs().max().double_value(&[]) / scale
}

#[test]
fn features_match_pytorch_fid_at_random_init() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    eprintln!("fixture seed {seed}");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/inception_fixture.py");
    let out = Command::new(python())
        .arg(&script)
        .arg("--out")
        .arg(dir.path())
        .args(["--seed", &seed.to_string()])
        .output()
        .expect("cannot run the venv's python: run `cargo xtask setup` or set DIM_PYTHON");
    assert!(
        out.status.success(),
        "{} failed (is pytorch-fid installed? `cargo xtask setup` installs it):\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let io: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("io.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let net = InceptionV3::load(&dir.path().join("weights.safetensors"), Device::Cpu).unwrap();
    let f = net.all_features(&(&io["images"] * 2.0 - 1.0)).unwrap();
    let logits = f.logits.expect("the fixture has the fc head");
    assert_eq!(f.spatial.size(), [3, SPATIAL_DIM]);
    assert_eq!(logits.size(), [3, LOGITS_DIM]);
    let e = [
        ("pool", rel_err(&f.pool, &io["pool"])),
        ("spatial", rel_err(&f.spatial, &io["spatial"])),
        ("logits", rel_err(&logits, &io["logits"])),
    ];
    eprintln!("{e:?}");
    for (what, err) in e {
        assert!(err < 1e-4, "{what} differs from pytorch-fid by {err:e}");
    }
}

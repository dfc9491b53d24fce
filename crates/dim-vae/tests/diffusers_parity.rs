//! Parity with diffusers' `AutoencoderKL` at random init: the fixture is
//! made on each run by `tests/fixtures/make_vae_fixture.py` (diffusers, run
//! in float64, fresh seed) in a temporary folder, because the full SD-VAE
//! weights (335 MB) are too large to commit. Our f32 CPU encode (mean,
//! log-variance) and decode must match within 1e-4 relative to the largest
//! reference value.
//!
//! Needs the project venv with `diffusers` (`cargo xtask setup` installs it);
//! without it these tests fail and say so, rather than pass silently.

use std::path::{Path, PathBuf};
use std::process::Command;

use dim_vae::{AutoencoderKL, VaeConfig};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("DIM_PYTHON") {
        return p.into();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.join(".venv/bin/python")
}

fn fresh_seed() -> u64 {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    eprintln!("fixture seed {s}");
    s
}

/// Runs the fixture script; panics with what to do when diffusers is missing.
fn make_fixture(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make_vae_fixture.py");
    let py = python();
    let out = Command::new(&py)
        .arg(&script)
        .arg("--out")
        .arg(dir.path())
        .args(["--seed", &fresh_seed().to_string(), "--config", config])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): run `cargo xtask setup` (it installs diffusers) or set DIM_PYTHON",
                py.display()
            )
        });
    assert!(
        out.status.success(),
        "{} failed (is diffusers installed? `cargo xtask setup` installs it):\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

fn io(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(dir.join("io.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

/// max |a - b| / max |b|, in f64.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let scale = b.abs().max().double_value(&[]).max(1e-30);
    (a - &b).abs().max().double_value(&[]) / scale
}

fn check(cfg: &VaeConfig, config: &str) {
    let dir = make_fixture(config);
    let t = io(dir.path());
    for weights in ["weights.safetensors", "weights_old.safetensors"] {
        let vae = AutoencoderKL::load(cfg, &dir.path().join(weights), Device::Cpu)
            .unwrap()
            .with_slice(2); // the batch of 3 runs as slices 2 + 1
        let post = vae.encode(&t["images"]).unwrap();
        let dec = vae.decode(&t["latents"]).unwrap();
        let e = [
            ("mean", rel_err(&post.mean, &t["mean"])),
            ("logvar", rel_err(&post.logvar, &t["logvar"])),
            ("decoded", rel_err(&dec, &t["decoded"])),
        ];
        eprintln!("{config} {weights}: {e:?}");
        for (what, err) in e {
            assert!(
                err < TOL,
                "{config} {weights}: {what} differs by {err:e} > {TOL:e}"
            );
        }
    }
}

#[test]
fn sd_vae_matches_diffusers_in_f32_on_cpu() {
    check(&VaeConfig::default(), "sd");
}

#[test]
fn narrow_vae_matches_diffusers() {
    let cfg = VaeConfig {
        block_out_channels: vec![32, 64],
        layers_per_block: 1,
        norm_num_groups: 8,
        ..Default::default()
    };
    check(&cfg, "tiny");
}

#[test]
fn wrong_weights_are_named() {
    let dir = make_fixture("tiny");
    // The SD config needs tensors the narrow file does not have, with other shapes.
    let err = AutoencoderKL::load(
        &VaeConfig::default(),
        &dir.path().join("weights.safetensors"),
        Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("weights.safetensors"), "{err}");
    assert!(err.contains("do not match the network"), "{err}");
    assert!(
        err.contains(
            "`decoder.conv_in.weight` has shape [64, 4, 3, 3] in the file, the network needs [512, 4, 3, 3]"
        ),
        "{err}"
    );
    // An extra tensor is named too.
    let cfg = VaeConfig {
        block_out_channels: vec![32, 64],
        layers_per_block: 1,
        norm_num_groups: 8,
        ..Default::default()
    };
    let p = dir.path().join("weights.safetensors");
    let mut t: Vec<(String, Tensor)> = Tensor::read_safetensors(&p).unwrap();
    t.push((
        "encoder.extra.weight".into(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    ));
    let q = dir.path().join("extra.safetensors");
    Tensor::write_safetensors(&t, &q).unwrap();
    let err = AutoencoderKL::load(&cfg, &q, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unexpected `encoder.extra.weight`"), "{err}");
}

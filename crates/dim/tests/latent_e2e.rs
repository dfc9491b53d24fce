//! Latent diffusion end to end on the CPU: a tiny random VAE, an ImageFolder
//! of generated images, `dim latents` (interrupted, then resumed: no
//! duplicates), a few training steps on the cache with sample grids decoded
//! through the VAE, `dim sample` (PNGs + the ADM `.npz`), and `dim eval`
//! with random Inception weights (FID, sFID, IS, precision/recall).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dim_vae::{AutoencoderKL, VaeConfig};
use tch::{Device, Kind, Tensor};

const DIM: &str = env!("CARGO_BIN_EXE_dim");

fn dim(args: &[&str]) -> Output {
    let out = Command::new(DIM)
        .args(args)
        .env("DIM_LOG", "warn")
        .output()
        .unwrap();
    eprintln!(
        "dim {}:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ok(args: &[&str]) -> String {
    let out = dim(args);
    assert!(out.status.success(), "dim {} failed", args.join(" "));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tiny_vae() -> VaeConfig {
    VaeConfig {
        block_out_channels: vec![16, 32],
        layers_per_block: 1,
        norm_num_groups: 8,
        ..Default::default()
    }
}

/// Two classes, 7 images of assorted sizes (the centre crop makes them square).
fn image_folder(root: &Path) {
    for (c, name) in ["cat", "dog"].iter().enumerate() {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..(3 + c) {
            let (w, h) = (20 + 3 * i as u32, 17 + 2 * c as u32);
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([
                    (x * 11 + c as u32 * 90) as u8,
                    (y * 13) as u8,
                    (i * 60) as u8,
                ])
            });
            img.save(d.join(format!("{i}.png"))).unwrap();
        }
    }
}

fn config(dir: &Path, vae: &Path, cache: &Path) -> std::path::PathBuf {
    let text = format!(
        r#"
[model]
preset = "DiM-S/2"
depth = 2
width = 32
heads = 2
patch = 2
in_channels = 4
input_size = [8, 8]
num_classes = 2
learn_sigma = true
dt_rank = 4

[diffusion]
learn_sigma = true

[sampler]
sampler = "ddim"
steps = 2

[data]
kind = "latents"
dir = "{cache}"

[loader]
workers = 1

[vae]
weights = "{vae}"
block_out_channels = [16, 32]
layers_per_block = 1
norm_num_groups = 8
slice = 3

[train]
steps = 4
batch_size = 4
grad_accum = 2
device = "cpu"
log_every = 1
ckpt_every = 2
sample_every = 2
sample_grid = 4
threads = 1
out_dir = "{out}"
"#,
        cache = cache.display(),
        vae = vae.display(),
        out = dir.join("run").display()
    );
    let p = dir.join("latent.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// The generated ImageFolder, a tiny random VAE and its diffusers config.
fn inputs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let data = dir.join("images");
    image_folder(&data);
    tch::manual_seed(5);
    let vae = AutoencoderKL::new(&tiny_vae(), Device::Cpu).unwrap();
    let vae_path = dir.join("vae.safetensors");
    vae.var_store().save(&vae_path).unwrap();
    let vae_json = dir.join("vae.json");
    std::fs::write(&vae_json, r#"{"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8, "scaling_factor": 0.18215}"#).unwrap();
    (data, vae_path, vae_json)
}

/// Every file of a finished cache (index and shards), by name.
fn cache_files(d: &Path) -> BTreeMap<String, Vec<u8>> {
    assert!(
        d.join("index.json").is_file(),
        "{} is not finished",
        d.display()
    );
    std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// `dim latents` on the generated folder into `out` (posterior draws, not
/// the mean), with extra flags.
fn latents_cmd(dir: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "latents",
        "--data",
        dir.join("images").to_str().unwrap(),
        "--vae",
        dir.join("vae.safetensors").to_str().unwrap(),
        "--vae-config",
        dir.join("vae.json").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--image-size",
        "16",
        "--shard-size",
        "4",
        "--device",
        "cpu",
        "--seed",
        "3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Every shard's `latents` of a finished cache, as one f64 tensor.
fn cache_latents(d: &Path) -> Tensor {
    let shards: Vec<Tensor> = cache_files(d)
        .keys()
        .filter(|f| f.starts_with("shard-"))
        .map(|f| {
            Tensor::read_safetensors(d.join(f))
                .unwrap()
                .into_iter()
                .find(|(n, _)| n == "latents")
                .unwrap()
                .1
                .to_kind(Kind::Double)
        })
        .collect();
    Tensor::cat(&shards, 0)
}

/// The posterior noise is keyed by (seed, latent index) alone: batches of 3
/// and of 5 images give the same latents; another seed does not. Equal to
/// f16 rounding, not bit for bit: the CPU convolutions of the encoder may
/// round differently for another batch size, and such a difference can
/// cross an f16 rounding boundary.
#[test]
fn latents_do_not_depend_on_the_batch_size() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    inputs(dir);
    let (a, b, c) = (dir.join("a"), dir.join("b"), dir.join("c"));
    ok(&strs(&latents_cmd(dir, &a, &["--batch", "3"])));
    ok(&strs(&latents_cmd(dir, &b, &["--batch", "5"])));
    let (la, lb) = (cache_latents(&a), cache_latents(&b));
    // One f16 ulp of the largest value (2^-10 relative), with room for two.
    let scale = la.abs().max().double_value(&[]);
    let tol = 2.0 * scale / 1024.0;
    let diff = (&la - &lb).abs().max().double_value(&[]);
    assert!(
        diff <= tol,
        "--batch 3 and --batch 5 differ by {diff:e} (f16 rounding: {tol:e})"
    );
    let mut other = latents_cmd(dir, &c, &["--batch", "3"]);
    let at = other.iter().position(|s| s == "--seed").unwrap();
    other[at + 1] = "4".into();
    ok(&strs(&other));
    let far = (&la - cache_latents(&c)).abs().max().double_value(&[]);
    assert!(
        far > 50.0 * tol,
        "another seed moves the latents by only {far:e}"
    );
}

/// `dim latents --nproc 2` (Gloo ranks on the CPU) writes the cache of one
/// process byte for byte, and a 2-process run interrupted after its first
/// shards resumes, with 3 and then 2 processes, into that same cache.
#[test]
fn latents_over_processes_match_one_process_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    inputs(dir);
    // 7 images + mirror images = 14 latents: shards of 4, 4, 4, 2.
    let flags = ["--flip", "--batch", "2"];
    let with = |out: &Path, more: &[&str]| {
        let mut f = flags.to_vec();
        f.extend(more);
        latents_cmd(dir, out, &f)
    };
    let one = dir.join("one");
    ok(&strs(&with(&one, &["--nproc", "1"])));
    let want = cache_files(&one);
    assert_eq!(
        want.keys().cloned().collect::<Vec<_>>(),
        [
            "index.json",
            "shard-00000.safetensors",
            "shard-00001.safetensors",
            "shard-00002.safetensors",
            "shard-00003.safetensors"
        ]
    );
    let two = dir.join("two");
    ok(&strs(&with(&two, &["--nproc", "2"])));
    assert_eq!(
        cache_files(&two),
        want,
        "--nproc 2 differs from one process"
    );

    // Each rank stops after one batch (one shard of 2 images): rank 0 has
    // shard 0 on disk, rank 1 shard 2, unless it was stopped first.
    let cut = dir.join("cut");
    let e = dim(&strs(&with(
        &cut,
        &["--nproc", "2", "--fail-after-batches", "1"],
    )));
    assert!(!e.status.success());
    assert!(!cut.join("index.json").exists());
    // Shard files present, by inode: a kept shard is the same file afterwards.
    let inode = |f: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(cut.join(f)).ok().map(|m| m.ino())
    };
    let kept: BTreeMap<String, u64> = (0..4)
        .map(|k| format!("shard-{k:05}.safetensors"))
        .filter_map(|f| Some((f.clone(), inode(&f)?)))
        .collect();
    assert!(!kept.is_empty() && kept.len() <= 2, "{:?}", kept.keys());
    // Resumed with 3 ranks, each stopped before its first batch; then with 2.
    let e = dim(&strs(&with(
        &cut,
        &["--nproc", "3", "--fail-after-batches", "0"],
    )));
    assert!(!e.status.success());
    ok(&strs(&with(&cut, &["--nproc", "2"])));
    let got = cache_files(&cut);
    assert_eq!(
        got, want,
        "a resumed 2-process run differs from one process"
    );
    for (f, ino) in &kept {
        assert_eq!(inode(f), Some(*ino), "{f} was written again");
    }
    let ds = dim_data::LatentDataset::open(&two).unwrap();
    use dim_data::Dataset;
    let labels: Vec<i64> = (0..ds.len())
        .map(|i| ds.get(i, 0).unwrap().label.unwrap())
        .collect();
    assert_eq!(labels, [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]);
}

#[test]
fn images_to_latents_to_training_to_samples_to_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (data, vae_path, vae_json) = inputs(dir);

    // dim latents, interrupted after 2 batches of 2 images (8 latents with flips, shards of 4).
    let cache = dir.join("cache");
    let base = [
        "latents",
        "--data",
        data.to_str().unwrap(),
        "--vae",
        vae_path.to_str().unwrap(),
        "--vae-config",
        vae_json.to_str().unwrap(),
        "--out",
        cache.to_str().unwrap(),
        "--image-size",
        "16",
        "--flip",
        "--batch",
        "2",
        "--shard-size",
        "4",
        "--device",
        "cpu",
    ];
    let mut first = base.to_vec();
    first.extend(["--fail-after-batches", "2"]);
    assert!(!dim(&first).status.success());
    assert!(cache.join("progress.json").is_file());
    assert!(!cache.join("index.json").exists());
    // Changed arguments are refused on resume.
    let mut changed = base.to_vec();
    changed[10] = "8"; // --image-size
    let e = dim(&changed);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("image_size"));
    ok(&base);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["count"], 14,
        "7 images and their mirror images, once each"
    );
    assert_eq!(index["sample_shape"], serde_json::json!([4, 8, 8]));
    assert_eq!(index["dtype"], "F16");
    assert_eq!(index["meta"]["scaling_factor"], "0.18215");

    // The cache against a fresh uninterrupted encoding: same latents, same labels.
    let fresh = dir.join("cache2");
    let mut again = base.to_vec();
    again[8] = fresh.to_str().unwrap();
    ok(&again);
    let read = |d: &Path| -> (Tensor, Tensor) {
        let ds = dim_data::LatentDataset::open(d).unwrap();
        use dim_data::Dataset;
        let xs: Vec<Tensor> = (0..ds.len()).map(|i| ds.get(i, 0).unwrap().data).collect();
        let ys: Vec<i64> = (0..ds.len())
            .map(|i| ds.get(i, 0).unwrap().label.unwrap())
            .collect();
        (Tensor::stack(&xs, 0), Tensor::from_slice(&ys))
    };
    let (a, ya) = read(&cache);
    let (b, yb) = read(&fresh);
    assert!(
        a.equal(&b),
        "a resumed cache differs from an uninterrupted one"
    );
    assert!(ya.equal(&yb));
    assert_eq!(
        Vec::<i64>::try_from(&ya).unwrap(),
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    );
    // A flipped copy's latents differ from the original's.
    assert!(!a.get(0).equal(&a.get(1)));

    // Training: checkpoints and VAE-decoded grids.
    let cfg = config(dir, &vae_path, &cache);
    let ck = ok(&["train", "--config", cfg.to_str().unwrap()]);
    let ck = ck.trim();
    assert!(Path::new(ck).is_file());
    for step in [2, 4] {
        let grid = dir.join(format!("run/samples-{step:09}.png"));
        let img = image::open(&grid).unwrap();
        assert!(img.width() >= 2 * 16, "grid of 16x16 decoded images");
    }

    // A [vae] whose latent channels do not match the model is refused before training.
    let bad = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[vae]", "[vae]\nlatent_channels = 3");
    let bad_cfg = dir.join("bad.toml");
    std::fs::write(&bad_cfg, bad).unwrap();
    let e = dim(&[
        "train",
        "--config",
        bad_cfg.to_str().unwrap(),
        "train.out_dir=\"x\"",
    ]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("latent channels"));

    // dim sample: PNGs, the ADM npz, raw latents, grid.
    let out = dir.join("samples");
    ok(&[
        "sample",
        "--checkpoint",
        ck,
        "--out",
        out.to_str().unwrap(),
        "--num",
        "5",
        "--batch",
        "2",
        "--device",
        "cpu",
    ]);
    for i in 0..5 {
        let png = image::open(out.join(format!("{i:06}.png"))).unwrap();
        assert_eq!((png.width(), png.height()), (16, 16));
    }
    let mut npz = dim_eval::NpzReader::open(&out.join("samples.npz")).unwrap();
    let arr = npz.array("arr_0").unwrap();
    assert_eq!(arr.size(), [5, 16, 16, 3]);
    assert_eq!(arr.kind(), Kind::Uint8);
    assert_eq!(
        Vec::<i64>::try_from(npz.array("arr_1").unwrap()).unwrap(),
        [0, 1, 0, 1, 0]
    );
    let lat = Tensor::read_safetensors(out.join("samples.safetensors")).unwrap();
    assert_eq!(lat[0].0, "latents");
    assert_eq!(lat[0].1.size(), [5, 4, 8, 8]);
    assert!(out.join("grid.png").is_file());

    // dim eval with random Inception weights (with the fc head): every metric is finite.
    tch::manual_seed(1);
    let inc = dim_eval::InceptionV3::new(Device::Cpu).with_head();
    let inc_path = dir.join("inception.safetensors");
    let mut all: Vec<(String, Tensor)> = inc.var_store().variables().into_iter().collect();
    all.extend(inc.head_var_store().unwrap().variables());
    Tensor::write_safetensors(&all, &inc_path).unwrap();
    // Reference: an ADM-style npz of the training images.
    let refnpz = dir.join("ref.npz");
    let mut w = dim_eval::NpzWriter::create(&refnpz, 4, 16, 16, 3).unwrap();
    w.append(&Tensor::randint(
        256,
        [4, 16, 16, 3],
        (Kind::Uint8, Device::Cpu),
    ))
    .unwrap();
    w.finish(None).unwrap();
    let report = ok(&[
        "eval",
        "--samples",
        out.to_str().unwrap(),
        "--reference",
        refnpz.to_str().unwrap(),
        "--features",
        "inception",
        "--weights",
        inc_path.to_str().unwrap(),
        "--k",
        "2",
        "--device",
        "cpu",
    ]);
    let r: serde_json::Value = serde_json::from_str(&report).unwrap();
    for key in ["fid", "sfid", "inception_score", "precision", "recall"] {
        assert!(
            r[key].as_f64().is_some_and(f64::is_finite),
            "{key} in {report}"
        );
    }
    assert_eq!(r["num_generated"], 5);
}

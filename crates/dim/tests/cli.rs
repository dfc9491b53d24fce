//! Drives the `dim` binary on CPU: a tiny config trains a few steps,
//! checkpoints, resumes exactly, samples and evaluates; and the errors a
//! user meets say what to do.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const DIM: &str = env!("CARGO_BIN_EXE_dim");

/// A tiny class-conditional DiM on Fashion-MNIST: 16 tokens, 2 blocks.
fn tiny_config(dir: &Path, out: &str) -> PathBuf {
    let text = format!(
        r#"
[model]
preset = "DiM-S/2"
depth = 2
width = 32
heads = 2
patch = 8
in_channels = 1
input_size = [32, 32]
num_classes = 10
class_dropout_prob = 0.1
learn_sigma = true
dt_rank = 4

[diffusion]
learn_sigma = true

[sampler]
sampler = "ddim"
steps = 3

[data]
kind = "fashion_mnist"
transforms = [{{ op = "pad", size = 32 }}]

[loader]
workers = 1

[optim]
lr = 1e-3
warmup_steps = 2
ema_decay = 0.9

[train]
steps = 6
batch_size = 8
grad_accum = 2
seed = 3
device = "cpu"
log_every = 1
ckpt_every = 3
keep_last = 2
threads = 1
out_dir = "{}"
"#,
        dir.join(out).display()
    );
    let p = dir.join(format!("{out}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn dim(args: &[&str]) -> Output {
    Command::new(DIM)
        .args(args)
        .env("DIM_LOG", "warn")
        .output()
        .expect("run dim")
}

fn ok(args: &[&str]) -> String {
    let o = dim(args);
    assert!(
        o.status.success(),
        "dim {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn err(args: &[&str]) -> String {
    let o = dim(args);
    assert!(!o.status.success(), "dim {args:?} should have failed");
    String::from_utf8(o.stderr).unwrap()
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn train_resume_sample_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let s = |p: &Path| p.display().to_string();

    // Uninterrupted: 6 steps.
    let full = tiny_config(d, "full");
    let ckpt = ok(&["train", "--config", &s(&full)]).trim().to_string();
    assert!(ckpt.ends_with("ckpt-000000006.safetensors"), "{ckpt}");
    let a = losses(&d.join("full"));
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    assert!(a.iter().all(|x| x.1.is_finite() && x.1 > 0.0));
    // keep_last = 2: the step-3 and step-6 checkpoints remain.
    let mut kept: Vec<String> = std::fs::read_dir(d.join("full"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("ckpt-"))
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        ["ckpt-000000003.safetensors", "ckpt-000000006.safetensors"]
    );

    // Interrupted after 3 steps (an override), then resumed to 6.
    let part = tiny_config(d, "part");
    ok(&["train", "--config", &s(&part), "train.steps=3"]);
    ok(&["train", "--config", &s(&part), "--resume", "auto"]);
    let b = losses(&d.join("part"));
    assert_eq!(
        a, b,
        "a resumed run must repeat the uninterrupted loss sequence exactly"
    );

    // A checkpoint of another architecture is refused with a clear message.
    let e = err(&[
        "train",
        "--config",
        &s(&part),
        "--resume",
        &ckpt,
        "model.depth=3",
    ]);
    assert!(e.contains("different [model]"), "{e}");

    // One checkpoint format: dim-model reads a `dim train` checkpoint, and
    // `dim sample` reads one that dim-model wrote.
    let ck = dim_model::load_checkpoint(Path::new(&ckpt), tch::Device::Cpu).unwrap();
    assert_eq!(ck.metadata["step"], "6");
    assert_eq!(ck.config.depth, 2);
    let model_only = d.join("model-only.safetensors");
    dim_model::save_checkpoint(&model_only, &ck.vs, &ck.config, &Default::default()).unwrap();
    let out0 = d.join("samples0");
    sample_cpu(&s(&model_only), &out0, &["--num", "2"]);
    assert!(out0.join("000001.png").is_file());

    // Sampling: PNGs, a grid and the raw tensor.
    let out = d.join("samples");
    let grid = sample_cpu(&ckpt, &out, &["--num", "8", "--batch", "5"]);
    assert!(Path::new(grid.trim()).is_file());
    assert!(out.join("000007.png").is_file() && out.join("samples.safetensors").is_file());
    let img = image_size(&out.join("000000.png"));
    assert_eq!(img, (32, 32));
    // Same seed, different batch size: identical samples (noise keyed by sample index).
    let out2 = d.join("samples2");
    sample_cpu(&ckpt, &out2, &["--num", "8", "--batch", "8"]);
    assert_eq!(
        std::fs::read(out.join("000006.png")).unwrap(),
        std::fs::read(out2.join("000006.png")).unwrap()
    );
    // Guidance with a config that names no null class: the model's is used,
    // and guidance changes the samples.
    let guided = d.join("guided");
    sample_cpu(
        &ckpt,
        &guided,
        &["--num", "8", "--batch", "8", "--cfg", "4"],
    );
    assert_ne!(
        std::fs::read(out.join("samples.safetensors")).unwrap(),
        std::fs::read(guided.join("samples.safetensors")).unwrap()
    );

    // Evaluation with a feature network whose weights the test makes.
    let w = d.join("features.safetensors");
    dim_eval::FmnistClassifier::new(tch::Device::Cpu)
        .save(&w)
        .unwrap();
    let report = ok(&[
        "eval",
        "--samples",
        &s(&out),
        "--reference",
        &s(&out2),
        "--weights",
        &s(&w),
        "--k",
        "2",
        "--device",
        "cpu",
    ]);
    let r: serde_json::Value = serde_json::from_str(&report).unwrap();
    // Same images on both sides: FID 0, precision and recall 1.
    assert!(r["fid"].as_f64().unwrap().abs() < 1e-6, "{report}");
    assert_eq!(r["precision"].as_f64(), Some(1.0));
    let report = ok(&[
        "eval",
        "--samples",
        &s(&out),
        "--reference",
        "fashion-mnist:test",
        "--weights",
        &s(&w),
        "--device",
        "cpu",
    ]);
    let r: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert!(
        r["fid"].as_f64().unwrap() > 0.0 && r["num_reference"].as_u64() == Some(10_000),
        "{report}"
    );
}

/// A tiny video model: trains two steps on Moving Fashion-MNIST, then
/// sampling writes a GIF, an MP4 (4 frames at the requested rate) and a
/// frame strip per clip.
#[cfg(feature = "video")]
#[test]
fn video_model_samples_gif_mp4_and_strip() {
    let s = |p: &Path| p.display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = d.join("video.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[model]
preset = "DiM-S/2"
depth = 1
width = 32
heads = 2
patch = 8
temporal_patch = 2
in_channels = 1
input_size = [32, 32]
frames = 4
num_classes = 0
class_dropout_prob = 0.0
learn_sigma = false
dt_rank = 4
token_order = "alternating"

[diffusion]
learn_sigma = false

[sampler]
sampler = "ddim"
steps = 2

[data]
kind = "moving_fashion_mnist"
moving = {{ len = 16, frames = 4, canvas = 32, items = 1, seed = 0, min_speed = 1.0, max_speed = 2.0 }}

[loader]
workers = 1

[train]
steps = 2
batch_size = 2
device = "cpu"
threads = 1
out_dir = "{}"
"#,
            d.join("run").display()
        ),
    )
    .unwrap();
    let ckpt = ok(&["train", "--config", &s(&cfg)]);
    let out = d.join("clips");
    sample_cpu(ckpt.trim(), &out, &["--num", "2", "--fps", "5"]);
    for i in 0..2 {
        for ext in ["gif", "mp4"] {
            assert!(out.join(format!("00000{i}.{ext}")).is_file(), "{i}.{ext}");
        }
        // Four 32×32 frames in a row with 2-pixel borders.
        assert_eq!(
            image_size(&out.join(format!("00000{i}_strip.png"))),
            (4 * 34 + 2, 36)
        );
    }
    let info = dim_data::video::probe(&out.join("000001.mp4")).unwrap();
    assert_eq!(
        (info.frames, info.fps, info.width, info.height),
        (4, 5.0, 32, 32)
    );
}

/// `dim sample --checkpoint ckpt --out out --device cpu` plus `extra`; its stdout.
fn sample_cpu(ckpt: &str, out: &Path, extra: &[&str]) -> String {
    let out = out.display().to_string();
    let mut args = vec![
        "sample",
        "--checkpoint",
        ckpt,
        "--out",
        &out,
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    ok(&args)
}

fn image_size(p: &Path) -> (u32, u32) {
    // PNG IHDR: width and height are big-endian at bytes 16..24.
    let b = std::fs::read(p).unwrap();
    (
        u32::from_be_bytes(b[16..20].try_into().unwrap()),
        u32::from_be_bytes(b[20..24].try_into().unwrap()),
    )
}

#[test]
fn errors_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = tiny_config(d, "e");
    let c = cfg.display().to_string();

    let e = err(&["train", "--config", &c, "optim.lrr=1"]);
    assert!(
        e.contains("unknown field `lrr`") && e.contains("[optim]") && e.contains(&c),
        "{e}"
    );
    let e = err(&["train", "--config", &c, "train.batch_size=\"big\""]);
    assert!(e.contains("[train]") && e.contains(&c), "{e}");
    let e = err(&["train", "--config", &c, "optim.lr=-1"]);
    assert!(e.contains("optim.lr"), "{e}");
    let e = err(&[
        "train",
        "--config",
        &d.join("nope.toml").display().to_string(),
    ]);
    assert!(
        e.contains("cannot read config") && e.contains("nope.toml"),
        "{e}"
    );
    if !tch::Cuda::is_available() {
        let e = err(&["train", "--config", &c, "train.device=\"cuda\""]);
        assert!(e.contains("no CUDA device") && e.contains("cpu"), "{e}");
    }
    let file = d.join("a-file");
    std::fs::write(&file, "").unwrap();
    let e = err(&[
        "train",
        "--config",
        &c,
        &format!("train.out_dir=\"{}/sub\"", file.display()),
    ]);
    assert!(e.contains("cannot create output folder"), "{e}");
    let e = err(&[
        "sample",
        "--checkpoint",
        &c,
        "--out",
        &d.join("s").display().to_string(),
    ]);
    assert!(
        e.contains("not a readable tensor file") && e.contains("e.toml"),
        "{e}"
    );
}

#[test]
fn ctrl_c_saves_and_exits_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = tiny_config(d, "int");
    let child = Command::new(DIM)
        .args([
            "train",
            "--config",
            &cfg.display().to_string(),
            "train.steps=100000",
            "train.ckpt_every=100000",
        ])
        .env("DIM_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = d.join("int").join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 2
    {
        assert!(t0.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ckpt = String::from_utf8(out.stdout).unwrap();
    let ckpt = Path::new(ckpt.trim());
    assert!(
        ckpt.is_file(),
        "no checkpoint after Ctrl-C: {}",
        ckpt.display()
    );
    // It is complete: it resumes.
    let steps = losses(&d.join("int")).len() as u64;
    assert!(steps >= 2);
    ok(&[
        "train",
        "--config",
        &cfg.display().to_string(),
        "--resume",
        "auto",
        &format!("train.steps={}", steps + 1),
    ]);
    assert_eq!(losses(&d.join("int")).last().unwrap().0, steps + 1);
}

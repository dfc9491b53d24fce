//! Drives the `dim` binary on CPU: a tiny config trains a few steps,
//! checkpoints, resumes exactly, samples and evaluates; and the errors a
//! user meets say what to do.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    checkpoints, dim_cmd, err, image_size, logged_lines, losses, ok, s, sample_cpu, send_signal,
    succeeded, wait_until, Config,
};

/// A tiny class-conditional DiM on Fashion-MNIST: 16 tokens, 2 blocks.
fn tiny_config(dir: &Path, out: &str) -> PathBuf {
    Config::tiny()
        .set("model.depth", 2)
        .classes(10, 0.1)
        .learn_sigma(true)
        .ddim(3)
        .set("optim.lr", 1e-3)
        .set("optim.warmup_steps", 2)
        .set("optim.ema_decay", 0.9)
        .set_all(&[
            ("train.steps", 6),
            ("train.batch_size", 8),
            ("train.grad_accum", 2),
            ("train.seed", 3),
            ("train.log_every", 1),
            ("train.ckpt_every", 3),
            ("train.keep_last", 2),
        ])
        .run_named(dir, out)
}

#[test]
fn train_resume_sample_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();

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
    assert_eq!(
        checkpoints(&d.join("full")),
        ["ckpt-000000003.safetensors", "ckpt-000000006.safetensors"]
            .map(|n| d.join("full").join(n))
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
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = Config::tiny()
        .set_all(&[
            ("model.depth", 1),
            ("model.temporal_patch", 2),
            ("model.frames", 4),
        ])
        .classes(0, 0.0)
        .learn_sigma(false)
        .set("model.token_order", "alternating")
        .ddim(2)
        .set("data", common::moving_fmnist(16, 4, 0, 2.0))
        .set_all(&[("train.steps", 2), ("train.batch_size", 2)])
        .set_path("train.out_dir", &d.join("run"))
        .save(&d.join("video.toml"));
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

#[test]
fn errors_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = tiny_config(d, "e");
    let c = s(&cfg);

    let e = err(&["train", "--config", &c, "optim.lrr=1"]);
    assert!(
        e.contains("unknown field `lrr`") && e.contains("[optim]") && e.contains(&c),
        "{e}"
    );
    let e = err(&["train", "--config", &c, "train.batch_size=\"big\""]);
    assert!(e.contains("[train]") && e.contains(&c), "{e}");
    let e = err(&["train", "--config", &c, "optim.lr=-1"]);
    assert!(e.contains("optim.lr"), "{e}");
    let e = err(&["train", "--config", &s(&d.join("nope.toml"))]);
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
    let e = err(&["sample", "--checkpoint", &c, "--out", &s(&d.join("s"))]);
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
    let child = dim_cmd(&[
        "train",
        "--config",
        &s(&cfg),
        "train.steps=100000",
        "train.ckpt_every=100000",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let run = d.join("int");
    wait_until(Duration::from_secs(120), "training did not start", || {
        logged_lines(&run) >= 2
    });
    send_signal(child.id(), "INT");
    let out = child.wait_with_output().unwrap();
    let ckpt = succeeded(&out, "dim train after Ctrl-C");
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
        &s(&cfg),
        "--resume",
        "auto",
        &format!("train.steps={}", steps + 1),
    ]);
    assert_eq!(losses(&d.join("int")).last().unwrap().0, steps + 1);
}

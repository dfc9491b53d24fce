//! Whole-network behaviour: shapes, identity at initialisation, gradient flow,
//! parameter and FLOP counts, checkpoints, configs and input checks.

use std::collections::BTreeMap;

use dim_model::{
    load_checkpoint, load_weights, save_checkpoint, Arch, LayerOrder, Model, ModelConfig,
    TokenOrder,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// A tiny config; lines of `extra` (`key = value`) replace the defaults.
fn tiny(arch: &str, extra: &str) -> ModelConfig {
    let mut lines: Vec<String> = [
        format!("arch = \"{arch}\""),
        "depth = 2".into(),
        "width = 32".into(),
        "heads = 4".into(),
        "patch = 2".into(),
        "in_channels = 3".into(),
        "input_size = [8, 8]".into(),
        "num_classes = 5".into(),
        "class_dropout_prob = 0.1".into(),
        "d_state = 4".into(),
    ]
    .into();
    let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_string();
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        lines.retain(|l| key(l) != key(line));
        lines.push(line.to_string());
    }
    ModelConfig::from_toml_str(&lines.join("\n")).unwrap()
}

fn tiny_video(arch: &str, order: &str) -> ModelConfig {
    tiny(
        arch,
        &format!("frames = 4\ntemporal_patch = 2\ntoken_order = \"{order}\""),
    )
}

/// Gives every parameter a random nudge so that zero-initialised gates and
/// the zero final layer no longer hide the rest of the network.
fn perturb(vs: &VarStore, scale: f64) {
    tch::no_grad(|| {
        // Sorted: the store's map iterates in random order, and the noise must be reproducible.
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, mut t) in vars {
            let noise = Tensor::randn_like(&t) * scale;
            let _ = t.g_add_(&noise);
        }
    });
}

fn inputs(cfg: &ModelConfig, shape: &[i64]) -> (Tensor, Tensor, Tensor) {
    let b = shape[0];
    let x = Tensor::randn(shape, (Kind::Float, Device::Cpu));
    let t = Tensor::rand([b], (Kind::Float, Device::Cpu)) * 999.0;
    let y = Tensor::randint(cfg.num_classes, [b], (Kind::Int64, Device::Cpu));
    (x, t, y)
}

#[test]
fn output_shapes_images_at_several_resolutions() {
    tch::manual_seed(0);
    for arch in ["dim", "dit"] {
        let cfg = tiny(arch, "");
        let vs = VarStore::new(Device::Cpu);
        let model = Model::new(vs.root(), &cfg).unwrap();
        perturb(&vs, 0.05);
        for shape in [[2, 3, 8, 8], [1, 3, 6, 10], [3, 3, 4, 14], [1, 3, 2, 2]] {
            let (x, t, y) = inputs(&cfg, &shape);
            let out = model.forward(&x, &t, Some(&y), false).unwrap();
            assert_eq!(
                out.size(),
                vec![shape[0], 6, shape[2], shape[3]],
                "{arch} at {shape:?}"
            );
            assert!(out.isfinite().all().int64_value(&[]) == 1);
        }
    }
}

#[test]
fn output_shapes_video_every_token_order() {
    tch::manual_seed(1);
    for arch in ["dim", "dit"] {
        for order in [
            "frame_major",
            "row_column",
            "row_column_time",
            "interleaved",
            "alternating",
            "factorised",
        ] {
            // "factorised" stands for Latte's attention (DiM ignores it).
            let cfg = if order == "factorised" {
                tiny(
                    arch,
                    "frames = 4\ntemporal_patch = 2\nattention = \"factorised\"",
                )
            } else {
                tiny_video(arch, order)
            };
            let vs = VarStore::new(Device::Cpu);
            let model = Model::new(vs.root(), &cfg).unwrap();
            perturb(&vs, 0.05);
            for shape in [[2, 3, 4, 8, 8], [1, 3, 6, 4, 6], [1, 3, 2, 2, 4]] {
                let (x, t, y) = inputs(&cfg, &shape);
                let out = model.forward(&x, &t, Some(&y), true).unwrap();
                assert_eq!(
                    out.size(),
                    vec![shape[0], 6, shape[2], shape[3], shape[4]],
                    "{arch} {order} {shape:?}"
                );
            }
        }
    }
}

/// Video token orders change DiM's output (the scan sees another sequence)
/// but not DiT's (attention is permutation-equivariant). One model, its
/// layers' orders switched in place, so the weights are identical.
#[test]
fn token_order_matters_for_dim_only() {
    for arch in ["dim", "dit"] {
        let cfg = tiny_video(arch, "frame_major");
        let vs = VarStore::new(Device::Cpu);
        let mut model = Model::new(vs.root(), &cfg).unwrap();
        perturb(&vs, 0.1);
        let (x, t, y) = inputs(&cfg, &[1, 3, 4, 4, 4]);
        let mut run = |order: LayerOrder| {
            for b in model.blocks.iter_mut() {
                b.order = order;
            }
            model.forward(&x, &t, Some(&y), false).unwrap()
        };
        let (a, a2, b) = (
            run(LayerOrder::FrameMajor),
            run(LayerOrder::FrameMajor),
            run(LayerOrder::Interleaved),
        );
        assert!(a.equal(&a2), "{arch}: not reproducible");
        let diff = (&a - &b).abs().max().double_value(&[]);
        if arch == "dim" {
            assert!(diff > 1e-4, "dim: orders gave the same output");
        } else {
            assert!(diff < 1e-4, "dit: order changed the output by {diff}");
        }
    }
}

#[test]
fn every_block_is_the_identity_at_initialisation() {
    tch::manual_seed(2);
    for cfg in [
        tiny("dim", ""),
        tiny("dit", ""),
        tiny_video("dim", "alternating"),
    ] {
        let vs = VarStore::new(Device::Cpu);
        let model = Model::new(vs.root(), &cfg).unwrap();
        let shape: Vec<i64> = if cfg.is_video() {
            vec![2, 3, 4, 6, 8]
        } else {
            vec![2, 3, 6, 8]
        };
        let (x, t, y) = inputs(&cfg, &shape);
        let (tokens, c, g) = model.embed(&x, &t, Some(&y), false).unwrap();
        assert!(tokens.abs().max().double_value(&[]) > 0.1);
        for (i, block) in model.blocks.iter().enumerate() {
            let out = block.forward(&tokens, &c, &g).unwrap();
            assert!(
                out.equal(&tokens),
                "{:?} block {i} is not the identity at init",
                cfg.arch
            );
        }
        let out = model.forward(&x, &t, Some(&y), false).unwrap();
        assert_eq!(
            out.abs().max().double_value(&[]),
            0.0,
            "zero final layer must give zero output"
        );
        // Non-zero gates make the blocks act: the check above can fail.
        perturb(&vs, 0.05);
        let (tokens, c, g) = model.embed(&x, &t, Some(&y), false).unwrap();
        let out = model.blocks[0].forward(&tokens, &c, &g).unwrap();
        assert!(!out.equal(&tokens));
    }
}

#[test]
fn gradients_reach_every_parameter() {
    for cfg in [
        tiny("dim", ""),
        tiny("dit", ""),
        tiny_video("dim", "alternating"),
    ] {
        tch::manual_seed(4);
        let vs = VarStore::new(Device::Cpu);
        let model = Model::new(vs.root(), &cfg).unwrap();
        perturb(&vs, 0.02);
        let shape: Vec<i64> = if cfg.is_video() {
            vec![2, 3, 4, 4, 6]
        } else {
            vec![2, 3, 6, 4]
        };
        let (x, t, _) = inputs(&cfg, &shape);
        // One real label and one null-class label so both kinds of row get gradient.
        let y = Tensor::from_slice(&[1i64, cfg.num_classes]);
        let out = model.forward(&x, &t, Some(&y), false).unwrap();
        let target = Tensor::randn_like(&out);
        let loss = (out - target).square().mean(Kind::Float);
        loss.backward();
        let vars = vs.variables();
        assert_eq!(vars.len(), vs.trainable_variables().len());
        for (name, v) in vars {
            let g = v.grad();
            assert!(g.defined(), "{:?}: no gradient for `{name}`", cfg.arch);
            let norm = g.abs().sum(Kind::Double).double_value(&[]);
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{:?}: gradient of `{name}` is {norm}",
                cfg.arch
            );
        }
    }
}

/// Every preset, built at depth 1 (the blocks are identical, so depth only
/// multiplies): the instantiated count equals the closed form.
#[test]
fn param_counts_match_closed_form_for_every_preset() {
    tch::no_grad(|| {
        for name in ModelConfig::preset_names() {
            let full = ModelConfig::preset(&name).unwrap();
            let mut cfg = full.clone();
            cfg.depth = 1;
            let vs = VarStore::new(Device::Cpu);
            let model = Model::new(vs.root(), &cfg).unwrap();
            let in_store: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
            assert_eq!(model.param_count(), in_store, "{name}");
            assert_eq!(
                in_store,
                cfg.param_count(),
                "{name}: instantiated vs closed form"
            );
            assert_eq!(
                full.param_count(),
                cfg.param_count() + (full.depth - 1) * full.block_param_count(),
                "{name}"
            );
        }
    });
}

/// DiT-XL/2, really instantiated: the published 675M parameters (±0.5%).
#[test]
fn dit_xl2_has_the_published_675m_parameters() {
    tch::no_grad(|| {
        let cfg = ModelConfig::preset("DiT-XL/2").unwrap();
        let vs = VarStore::new(Device::Cpu);
        let model = Model::new(vs.root(), &cfg).unwrap();
        let n = model.param_count();
        assert_eq!(n, cfg.param_count());
        assert_eq!(
            n,
            vs.variables()
                .values()
                .map(|t| t.numel() as i64)
                .sum::<i64>()
        );
        let rel = (n as f64 - 675e6).abs() / 675e6;
        assert!(
            rel < 0.005,
            "DiT-XL/2 has {n} parameters, {:.2}% from 675M",
            rel * 100.0
        );
    });
}

/// Forward cost against DiT's published Gflops (which count multiply-accumulates), 256×256 images.
#[test]
fn dit_flops_match_published_numbers() {
    for (name, gflops) in [
        ("DiT-S/2", 6.06),
        ("DiT-B/2", 23.01),
        ("DiT-L/2", 80.71),
        ("DiT-XL/2", 118.64),
        ("DiT-XL/4", 29.05),
        ("DiT-XL/8", 7.39),
        ("DiT-B/4", 5.56),
    ] {
        let cfg = ModelConfig::preset(name).unwrap();
        let got = cfg.flops(&[1, 4, 32, 32]).unwrap().gmacs();
        let rel = (got - gflops).abs() / gflops;
        assert!(rel < 0.015, "{name}: {got:.2} GMACs vs published {gflops}");
    }
    let cfg = ModelConfig::preset("DiM-XL/2").unwrap();
    let one = cfg.flops(&[1, 4, 32, 32]).unwrap();
    let two = cfg.flops(&[2, 4, 32, 32]).unwrap();
    assert!((two.macs - 2.0 * one.macs).abs() < 1.0 && one.gflops() == 2.0 * one.gmacs());
}

#[test]
fn save_then_load_reproduces_outputs_bit_for_bit() {
    tch::manual_seed(6);
    let dir = tempfile::tempdir().unwrap();
    for (i, cfg) in [tiny("dim", ""), tiny_video("dit", "interleaved")]
        .into_iter()
        .enumerate()
    {
        let vs = VarStore::new(Device::Cpu);
        let model = Model::new(vs.root(), &cfg).unwrap();
        perturb(&vs, 0.05);
        let path = dir.path().join(format!("model{i}.safetensors"));
        let mut extra = BTreeMap::new();
        extra.insert("step".to_string(), "1234".to_string());
        save_checkpoint(&path, &vs, &cfg, &extra).unwrap();
        let ck = load_checkpoint(&path, Device::Cpu).unwrap();
        assert_eq!(ck.config, cfg);
        assert_eq!(ck.metadata, extra);
        let shape: Vec<i64> = if cfg.is_video() {
            vec![2, 3, 4, 6, 4]
        } else {
            vec![2, 3, 10, 6]
        };
        let (x, t, y) = inputs(&cfg, &shape);
        let a = model.forward(&x, &t, Some(&y), false).unwrap();
        let b = ck.model.forward(&x, &t, Some(&y), false).unwrap();
        assert!(a.abs().max().double_value(&[]) > 0.0);
        assert!(a.equal(&b), "loaded model differs");
    }
    // Only the two checkpoints: no temporary files left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn loading_into_another_architecture_lists_every_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ck.safetensors");
    let cfg = tiny("dim", "");
    let vs = VarStore::new(Device::Cpu);
    let _model = Model::new(vs.root(), &cfg).unwrap();
    save_checkpoint(&path, &vs, &cfg, &BTreeMap::new()).unwrap();

    let other = tiny("dim", "d_state = 8\ndepth = 3");
    let vs2 = VarStore::new(Device::Cpu);
    let _m2 = Model::new(vs2.root(), &other).unwrap();
    let msg = load_weights(&path, &vs2).unwrap_err().to_string();
    assert!(msg.contains("ck.safetensors"), "{msg}");
    assert!(
        msg.contains(
            "`blocks.0.mixer.fwd.A_log` has shape [64, 4] in the file, the network needs [64, 8]"
        ),
        "{msg}"
    );
    assert!(msg.contains("missing `blocks.2.mlp.fc1.weight`"), "{msg}");

    let dit = tiny("dit", "");
    let vs3 = VarStore::new(Device::Cpu);
    let _m3 = Model::new(vs3.root(), &dit).unwrap();
    let msg = load_weights(&path, &vs3).unwrap_err().to_string();
    assert!(
        msg.contains("unexpected `blocks.1.mixer.in_proj.weight`"),
        "{msg}"
    );
    assert!(msg.contains("missing `blocks.1.attn.qkv.bias`"), "{msg}");

    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"not a checkpoint").unwrap();
    let msg = load_checkpoint(&bad, Device::Cpu).unwrap_err().to_string();
    assert!(
        msg.contains("bad.safetensors") && msg.contains("not a readable tensor file"),
        "{msg}"
    );
}

#[test]
fn configs_parse_validate_and_match_presets() {
    let cfg = ModelConfig::from_toml_str(
        "preset = \"DiM-L/4\"\nlearn_sigma = false\nnum_classes = 0\nclass_dropout_prob = 0.0",
    )
    .unwrap();
    assert_eq!(
        (cfg.arch, cfg.depth, cfg.width, cfg.patch, cfg.dt_rank),
        (Arch::Dim, 24, 1024, 4, 64)
    );
    assert_eq!(cfg.out_channels(), 4);
    let xl = ModelConfig::preset("DiM-XL/2").unwrap();
    assert_eq!(
        (xl.d_state, xl.expand, xl.dt_rank, xl.d_conv),
        (16, 2, 72, 4)
    );
    // Round trip through the full TOML form.
    assert_eq!(
        ModelConfig::from_toml_str(&xl.to_toml_string()).unwrap(),
        xl
    );

    for (text, needle) in [
        ("preset = \"DiM-XL/3\"", "unknown preset"),
        ("preset = \"DiM-S/2\"\nwidht = 3", "widht"),
        ("preset = \"DiT-S/2\"\nheads = 5", "`heads` = 5"),
        (
            "preset = \"DiM-S/2\"\ninput_size = [32, 31]",
            "input_size[1]",
        ),
        (
            "preset = \"DiM-S/2\"\nframes = 5\ntemporal_patch = 2",
            "`frames` = 5",
        ),
        ("preset = \"DiM-S/2\"\ntoken_order = \"zigzag\"", "zigzag"),
        (
            "arch = \"dim\"\ndepth = 2\npatch = 2",
            "`width` is required",
        ),
        (
            "preset = \"DiM-S/2\"\nnum_classes = 0",
            "class_dropout_prob",
        ),
        (
            "preset = \"DiM-S/2\"\nframes = -1",
            "`frames` = -1, must be 0 (images) or positive",
        ),
        (
            "preset = \"DiM-S/2\"\nnum_classes = -2",
            "`num_classes` = -2, must be 0 (unconditional) or positive",
        ),
    ] {
        let msg = ModelConfig::from_toml_str(text).unwrap_err().to_string();
        assert!(msg.contains(needle), "{text:?}: {msg}");
    }

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/models");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name == "sizes.toml" || !name.ends_with(".toml") {
            continue;
        }
        let cfg = ModelConfig::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
        // Files named after a preset ("dim-xl-2.toml") must equal it.
        let stem = name.trim_end_matches(".toml");
        let parts: Vec<&str> = stem.split('-').collect();
        if parts.len() == 3 {
            let preset = format!("{}-{}/{}", parts[0], parts[1], parts[2]);
            assert_eq!(cfg, ModelConfig::preset(&preset).unwrap(), "{name}");
        }
        n += 1;
    }
    assert!(n >= 3, "expected example configs in {}", dir.display());
    let msg = ModelConfig::from_file(&dir.join("missing.toml"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("missing.toml"), "{msg}");
}

#[test]
fn bad_inputs_are_errors_naming_the_argument() {
    let cfg = tiny("dim", "");
    let vs = VarStore::new(Device::Cpu);
    let model = Model::new(vs.root(), &cfg).unwrap();
    let (x, t, y) = inputs(&cfg, &[2, 3, 8, 8]);
    let err = |r: dim_model::Result<Tensor>| r.unwrap_err().to_string();
    let zeros = |shape: [i64; 4]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    let m = err(model.forward(&zeros([2, 4, 8, 8]), &t, Some(&y), false));
    assert!(m.contains("`x`") && m.contains("4 channels"), "{m}");
    let m = err(model.forward(&zeros([2, 3, 7, 8]), &t, Some(&y), false));
    assert!(m.contains("`x`") && m.contains("patch 2"), "{m}");
    let m = err(model.forward(&x.unsqueeze(2), &t, Some(&y), false));
    assert!(m.contains("image model"), "{m}");
    let m = err(model.forward(&x, &t.narrow(0, 0, 1), Some(&y), false));
    assert!(m.contains("`t`"), "{m}");
    let m = err(model.forward(&x, &t, Some(&Tensor::from_slice(&[0i64, 6])), false));
    assert!(m.contains("`y`") && m.contains("[0, 5]"), "{m}");
    // No labels: the null class (classifier-free guidance's unconditional branch).
    assert!(model.forward(&x, &t, None, false).is_ok());
    let uncond = tiny("dim", "num_classes = 0\nclass_dropout_prob = 0.0");
    let vs = VarStore::new(Device::Cpu);
    let model = Model::new(vs.root(), &uncond).unwrap();
    let m = err(model.forward(&x, &t, Some(&y), false));
    assert!(m.contains("unconditional"), "{m}");
    assert_eq!(
        model.forward(&x, &t, None, false).unwrap().size(),
        vec![2, 6, 8, 8]
    );
}

/// In training, labels are replaced by the null class with the dropout
/// probability; in evaluation never.
#[test]
fn label_dropout_uses_the_null_class_in_training_only() {
    tch::manual_seed(8);
    let cfg = tiny("dit", "class_dropout_prob = 0.5");
    let vs = VarStore::new(Device::Cpu);
    let model = Model::new(vs.root(), &cfg).unwrap();
    let emb = model.y_embedder.as_ref().unwrap();
    let n = 4000;
    let y = Tensor::full([n], 2, (Kind::Int64, Device::Cpu));
    let null_row = emb.embedding_table.get(cfg.num_classes);
    let is_null = |e: &Tensor| {
        e.eq_tensor(&null_row.unsqueeze(0))
            .all_dim(1, false)
            .to_kind(Kind::Double)
            .mean(Kind::Double)
            .double_value(&[])
    };
    let frac = is_null(&emb.forward(&y, n, true).unwrap());
    assert!((frac - 0.5).abs() < 0.04, "dropped fraction {frac}");
    assert_eq!(is_null(&emb.forward(&y, n, false).unwrap()), 0.0);
}

#[test]
fn unconditional_video_config_in_toml() {
    let cfg = ModelConfig::from_toml_str(
        "preset = \"DiM-S/2\"\nframes = 8\ntemporal_patch = 2\nnum_classes = 0\nclass_dropout_prob = 0.0\ntoken_order = \"alternating\"",
    )
    .unwrap();
    assert!(cfg.is_video() && cfg.token_order == TokenOrder::Alternating);
    let g = cfg.token_grid(&[1, 4, 8, 32, 32]).unwrap();
    assert_eq!(g.len(), 4 * 16 * 16);
    assert!(cfg.flops(&[1, 4, 32, 32]).is_err());
}

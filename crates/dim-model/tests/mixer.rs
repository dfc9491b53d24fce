//! The bidirectional Mamba mixer against a reference assembled here from plain
//! tch operations: explicit flips, an explicit causal convolution loop and a
//! sequential scan, in f64 at small awkward sizes.

use dim_model::network::{add_gated, BiMamba, DirectionInputs, MambaDirection, Mixer};
use dim_model::{AttentionSpan, LayerOrder, Model, ModelConfig, TokenGrid};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn small_cfg() -> ModelConfig {
    ModelConfig::from_toml_str(
        r#"
        arch = "dim"
        depth = 1
        width = 12
        patch = 1
        in_channels = 2
        input_size = [3, 5]
        d_state = 3
        expand = 2
        dt_rank = 2
        d_conv = 3
        "#,
    )
    .unwrap()
}

/// A small video DiM with `frames` frames, in f64 (config, its store, the model).
fn video_model_f64(frames: i64) -> (ModelConfig, VarStore, Model) {
    let mut cfg = small_cfg();
    cfg.frames = frames;
    cfg.width = 20; // video position embeddings need at least 16
    cfg.validate().unwrap();
    let mut vs = VarStore::new(Device::Cpu);
    let model = Model::new(vs.root(), &cfg).unwrap();
    vs.double();
    (cfg, vs, model)
}

fn mamba(model: &Model) -> &BiMamba {
    match &model.blocks[0].mixer {
        Mixer::Mamba(m) => m,
        Mixer::Attention(_) => panic!("expected a Mamba mixer"),
    }
}

/// Causal depthwise conv: `x (B, E, L)`, `w (E, 1, K)`: `y_l = Σ_k w_k x_{l-K+1+k} + bias`.
fn causal_conv(x: &Tensor, w: &Tensor, bias: &Tensor) -> Tensor {
    let (_, _, len) = x.size3().unwrap();
    let k = w.size()[2];
    let mut cols = Vec::new();
    for l in 0..len {
        let mut acc = x.select(2, 0).zeros_like() + bias.unsqueeze(0); // a fresh (B, E) tensor
        for j in 0..k {
            let src = l - (k - 1) + j;
            if src >= 0 {
                acc += x.select(2, src) * w.select(2, j).squeeze_dim(1).unsqueeze(0);
            }
        }
        cols.push(acc);
    }
    Tensor::stack(&cols, 2)
}

/// One direction by the textbook recipe on an already-ordered sequence: conv, SiLU, projections, sequential scan.
fn direction_ref(xs: &Tensor, dir: &MambaDirection, r: i64, n: i64) -> Tensor {
    let d64 = |t: &Tensor| t.detach().to_kind(Kind::Double);
    let (b, e, len) = xs.size3().unwrap();
    let u = causal_conv(xs, &d64(&dir.conv_weight), &d64(&dir.conv_bias)).silu(); // (B, E, L)
    let ut = u.transpose(1, 2); // (B, L, E)
    let dbl = ut.matmul(&d64(&dir.x_proj.weight).tr()); // (B, L, R+2N)
    let dt = (dbl.narrow(2, 0, r).matmul(&d64(&dir.dt_proj.weight).tr())
        + d64(dir.dt_proj.bias.as_ref().unwrap()))
    .softplus(); // (B, L, E)
    let bm = dbl.narrow(2, r, n);
    let cm = dbl.narrow(2, r + n, n);
    let a = -d64(&dir.a_log).exp(); // (E, N)
    let dskip = d64(&dir.d);
    let mut h = Tensor::zeros([b, e, n], (Kind::Double, Device::Cpu));
    let mut ys = Vec::new();
    for l in 0..len {
        let dtl = dt.select(1, l).unsqueeze(2); // (B, E, 1)
        let ul = ut.select(1, l); // (B, E)
        h = (&dtl * &a).exp() * &h + &dtl * bm.select(1, l).unsqueeze(1) * ul.unsqueeze(2);
        ys.push(
            (&h * cm.select(1, l).unsqueeze(1)).sum_dim_intlist(-1, false, None) + &dskip * &ul,
        );
    }
    Tensor::stack(&ys, 2) // (B, E, L)
}

/// The mixer on `(B, L, W)` tokens already in scan order.
fn mixer_ref(m: &BiMamba, x: &Tensor, cfg: &ModelConfig) -> Tensor {
    let d64 = |t: &Tensor| t.detach().to_kind(Kind::Double);
    let e = cfg.inner_width();
    let xz = x.matmul(&d64(&m.in_proj.weight).tr()); // (B, L, 2E)
    let xs = xz.narrow(2, 0, e).transpose(1, 2); // (B, E, L)
    let z = xz.narrow(2, e, e).transpose(1, 2);
    let (r, n) = (cfg.dt_rank, cfg.d_state);
    let y_f = direction_ref(&xs, &m.fwd, r, n);
    // Reverse: flip the sequence, run the same recipe, flip back.
    let y_r = direction_ref(&xs.flip([2]), &m.rev, r, n).flip([2]);
    let y = (y_f + y_r) * z.silu();
    y.transpose(1, 2).matmul(&d64(&m.out_proj.weight).tr())
}

/// Silences one direction: zero `B` rows of `x_proj` and `D` make its output 0.
fn silence(dir: &MambaDirection, r: i64, n: i64) {
    tch::no_grad(|| {
        let _ = dir.x_proj.weight.narrow(0, r, n).fill_(0.0);
        let _ = dir.d.shallow_clone().fill_(0.0);
    });
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[]).max(1e-30)
}

fn check(case: &str, silence_dir: Option<bool>) {
    tch::manual_seed(7);
    let cfg = small_cfg();
    let grid = TokenGrid {
        batch: 2,
        frames: 1,
        rows: 3,
        cols: 5,
    }; // L = 15
    for kind in [Kind::Double, Kind::Float] {
        tch::manual_seed(11);
        let mut vs = VarStore::new(Device::Cpu);
        let model = Model::new(vs.root(), &cfg).unwrap();
        if kind == Kind::Double {
            vs.double();
        }
        let m = mamba(&model);
        match silence_dir {
            Some(true) => silence(&m.rev, cfg.dt_rank, cfg.d_state),
            Some(false) => silence(&m.fwd, cfg.dt_rank, cfg.d_state),
            None => {}
        }
        let x = Tensor::randn(
            [grid.batch, grid.len(), cfg.width],
            (Kind::Double, Device::Cpu),
        );
        let got = m
            .forward(&x.to_kind(kind), &grid, LayerOrder::FrameMajor)
            .unwrap();
        let want = mixer_ref(m, &x, &cfg);
        assert_eq!(got.size(), want.size());
        let err = max_rel_err(&got.to_kind(Kind::Double), &want);
        let tol = if kind == Kind::Double { 1e-10 } else { 2e-5 };
        assert!(
            err < tol,
            "{case} ({kind:?}): relative error {err:e} >= {tol:e}"
        );
        assert!(
            want.abs().max().double_value(&[]) > 1e-3,
            "{case}: reference output is trivially small"
        );
    }
}

#[test]
fn mixer_matches_reference_forward_direction_only() {
    check("forward only", Some(true));
}

#[test]
fn mixer_matches_reference_reverse_direction_only() {
    check("reverse only", Some(false));
}

#[test]
fn mixer_matches_reference_bidirectional() {
    check("bidirectional", None);
}

/// Checks the mixer in `order` on tokens `x` `(B, L, W)` of `grid` against
/// the reference run on the tokens in scan order (`scan[i]` is the token at
/// scan position `i`), output put back; and that the order really differs
/// from the frame-major scan.
fn check_scan_order(
    m: &BiMamba,
    cfg: &ModelConfig,
    x: &Tensor,
    grid: &TokenGrid,
    order: LayerOrder,
    scan: &[i64],
    case: &str,
) {
    let got = m.forward(x, grid, order).unwrap();
    let perm = Tensor::from_slice(scan);
    let y = mixer_ref(m, &x.index_select(1, &perm), cfg);
    let want = Tensor::zeros_like(&y).index_copy(1, &perm, &y);
    let err = max_rel_err(&got, &want);
    assert!(err < 1e-10, "{case}: relative error {err:e}");
    let frame_major = m.forward(x, grid, LayerOrder::FrameMajor).unwrap();
    assert!(
        max_rel_err(&frame_major, &want) > 1e-6,
        "{case}: orders should give different outputs"
    );
}

/// Interleaved order: the mixer must equal the reference run on tokens
/// permuted to (spatial, frame) order, with the output permuted back.
#[test]
fn interleaved_order_matches_reference_on_permuted_tokens() {
    tch::manual_seed(3);
    let (cfg, _vs, model) = video_model_f64(3);
    let m = mamba(&model);
    let grid = TokenGrid {
        batch: 1,
        frames: 3,
        rows: 2,
        cols: 2,
    };
    let (t, s, w) = (grid.frames, grid.spatial(), cfg.width);
    let x = Tensor::randn([1, t * s, w], (Kind::Double, Device::Cpu));
    // Token (t, s) sits at t·S + s in frame-major order and at s·T + t interleaved.
    let scan: Vec<i64> = (0..s)
        .flat_map(|si| (0..t).map(move |ti| ti * s + si))
        .collect();
    check_scan_order(
        m,
        &cfg,
        &x,
        &grid,
        LayerOrder::Interleaved,
        &scan,
        "interleaved",
    );
}

/// Column-major order: the mixer must equal the reference run on each
/// frame's tokens transposed to column-after-column order, output put back.
#[test]
fn column_major_order_matches_reference_on_transposed_tokens() {
    tch::manual_seed(4);
    let cfg = small_cfg();
    let mut vs = VarStore::new(Device::Cpu);
    let model = Model::new(vs.root(), &cfg).unwrap();
    vs.double();
    let m = mamba(&model);
    for frames in [1, 2] {
        let grid = TokenGrid {
            batch: 2,
            frames,
            rows: 3,
            cols: 5,
        };
        let (t, h, w) = (grid.frames, grid.rows, grid.cols);
        let x = Tensor::randn([2, grid.len(), cfg.width], (Kind::Double, Device::Cpu));
        // Scan position (f, c, r) holds token f·H·W + r·W + c.
        let scan: Vec<i64> = (0..t)
            .flat_map(|f| (0..w).flat_map(move |c| (0..h).map(move |r| f * h * w + r * w + c)))
            .collect();
        let case = format!("column-major, {frames} frame(s)");
        check_scan_order(m, &cfg, &x, &grid, LayerOrder::ColumnMajor, &scan, &case);
    }
}

/// DiT's attention against softmax(QKᵀ/√d)V written out, f64.
#[test]
fn attention_matches_reference() {
    tch::manual_seed(5);
    let cfg = ModelConfig::from_toml_str(
        "arch = \"dit\"\ndepth = 1\nwidth = 12\nheads = 3\npatch = 1\ninput_size = [3, 3]",
    )
    .unwrap();
    let mut vs = VarStore::new(Device::Cpu);
    let model = Model::new(vs.root(), &cfg).unwrap();
    vs.double();
    let attn = match &model.blocks[0].mixer {
        Mixer::Attention(a) => a,
        Mixer::Mamba(_) => panic!("expected attention"),
    };
    let (b, w, heads) = (2, 12, 3);
    let hd = w / heads;
    // 3 frames of 2×3 tokens: every span (all, frame, time) against a masked
    // softmax over the whole clip, the mask built from token indices.
    let grid = TokenGrid {
        batch: b,
        frames: 3,
        rows: 2,
        cols: 3,
    };
    let (l, sp) = (grid.len(), grid.spatial());
    let x = Tensor::randn([b, l, w], (Kind::Double, Device::Cpu));
    for span in [
        AttentionSpan::All,
        AttentionSpan::Frame,
        AttentionSpan::Time,
    ] {
        let got = attn.forward(&x, &grid, span);
        let allowed: Vec<f64> = (0..l)
            .flat_map(|i| {
                (0..l).map(move |j| {
                    let ok = match span {
                        AttentionSpan::All => true,
                        AttentionSpan::Frame => i / sp == j / sp,
                        AttentionSpan::Time => i % sp == j % sp,
                    };
                    if ok {
                        0.0
                    } else {
                        f64::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_slice(&allowed).view([l, l]);
        let qkv =
            x.matmul(&attn.qkv.weight.detach().tr()) + attn.qkv.bias.as_ref().unwrap().detach();
        let mut outs = Vec::new();
        for h in 0..heads {
            let q = qkv.narrow(2, h * hd, hd);
            let k = qkv.narrow(2, w + h * hd, hd);
            let v = qkv.narrow(2, 2 * w + h * hd, hd);
            let att = (q.matmul(&k.transpose(1, 2)) / (hd as f64).sqrt() + &mask)
                .softmax(-1, Kind::Double);
            outs.push(att.matmul(&v));
        }
        let o = Tensor::cat(&outs, 2);
        let want =
            o.matmul(&attn.proj.weight.detach().tr()) + attn.proj.bias.as_ref().unwrap().detach();
        let err = max_rel_err(&got, &want);
        assert!(err < 1e-10, "attention {span:?}: relative error {err:e}");
    }
}

/// The per-direction computation the batched one replaced, kept here as its
/// reference: each direction's own conv (K taps, padded K-1 on both sides,
/// causal window forward, anti-causal window with mirrored taps reverse),
/// SiLU, x_proj and dt_proj matmuls. `xs (B, E, L)`.
fn direction_old(
    dir: &MambaDirection,
    xs: &Tensor,
    reverse: bool,
    r: i64,
    n: i64,
) -> DirectionInputs {
    let (len, k) = (xs.size()[2], dir.conv_weight.size()[2]);
    let e = dir.conv_weight.size()[0];
    let weight = if reverse {
        dir.conv_weight.flip([-1])
    } else {
        dir.conv_weight.shallow_clone()
    };
    let conv = xs.conv1d(&weight, Some(&dir.conv_bias), [1], [k - 1], [1], e);
    let u = conv.narrow(2, if reverse { k - 1 } else { 0 }, len).silu();
    let dbl = dir.x_proj.weight.matmul(&u);
    let delta = dir.dt_proj.weight.matmul(&dbl.narrow(1, 0, r));
    DirectionInputs {
        u,
        delta,
        a: dir.a(),
        b: dbl.narrow(1, r, n).unsqueeze(1),
        c: dbl.narrow(1, r + n, n).unsqueeze(1),
    }
}

/// The batched directions (one conv with 2E channels, one bmm each for
/// x_proj and dt_proj) give the per-direction operands of the old path, and
/// so the same mixer output and input gradient, in f64 and f32.
#[test]
fn batched_directions_equal_per_direction_computation() {
    let cfg = small_cfg();
    let (r, n) = (cfg.dt_rank, cfg.d_state);
    for kind in [Kind::Double, Kind::Float] {
        tch::manual_seed(21);
        let mut vs = VarStore::new(Device::Cpu);
        let model = Model::new(vs.root(), &cfg).unwrap();
        if kind == Kind::Double {
            vs.double();
        }
        let m = mamba(&model);
        let tol = if kind == Kind::Double { 1e-12 } else { 1e-5 };
        let (batch, len, w) = (3, 11, cfg.width);
        let x = Tensor::randn([batch, len, w], (kind, Device::Cpu)).set_requires_grad(true);

        let xz = m.project_in(&x).unwrap();
        assert_eq!(xz.size(), [batch, 2 * cfg.inner_width(), len]);
        assert!(
            xz.is_contiguous(),
            "in_proj must write the (B, 2E, L) layout"
        );
        let (xs, z) = m.split_xz(&xz);
        let ops = m.scan_operands(&xs);
        let new = ops.directions();
        let xs_c = xs.contiguous();
        let old = [
            direction_old(&m.fwd, &xs_c, false, r, n),
            direction_old(&m.rev, &xs_c, true, r, n),
        ];
        for (d, (a, b)) in new.iter().zip(&old).enumerate() {
            for (name, got, want) in [
                ("u", &a.u, &b.u),
                ("delta", &a.delta, &b.delta),
                ("A", &a.a, &b.a),
                ("B", &a.b, &b.b),
                ("C", &a.c, &b.c),
            ] {
                assert_eq!(got.size(), want.size(), "direction {d} {name}");
                // The scan reads L contiguously with channel stride L.
                if name != "A" {
                    let st = got.stride();
                    assert_eq!(st[st.len() - 1], 1, "direction {d} {name} strides {st:?}");
                    assert_eq!(st[st.len() - 2], len, "direction {d} {name} strides {st:?}");
                }
                let err = max_rel_err(&got.to_kind(Kind::Double), &want.to_kind(Kind::Double));
                assert!(
                    err < tol,
                    "{kind:?} direction {d} {name}: relative error {err:e}"
                );
            }
        }

        // Whole mixer and its input gradient: batched against the old path.
        let y_new = m.project_out(&m.scan_op(&ops, &z).unwrap());
        let z_old = xz.narrow(1, cfg.inner_width(), cfg.inner_width());
        let y_old = {
            let (f, rv) = (&old[0], &old[1]);
            let y = if kind == Kind::Double {
                dim_scan::reference::selective_scan_bidirectional_ref(
                    m.fwd.scan_inputs(f),
                    m.rev.scan_inputs(rv),
                    Some(&z_old),
                    true,
                )
            } else {
                dim_scan::selective_scan_bidirectional(
                    m.fwd.scan_inputs(f),
                    m.rev.scan_inputs(rv),
                    Some(&z_old.contiguous()),
                    dim_scan::ScanOptions::default(),
                )
                .unwrap()
            };
            m.out_proj.weight.matmul(&y).transpose(1, 2)
        };
        assert!(
            y_new.is_contiguous(),
            "out_proj must write (B, L, W) contiguous"
        );
        let err = max_rel_err(&y_new.to_kind(Kind::Double), &y_old.to_kind(Kind::Double));
        assert!(err < tol, "{kind:?} mixer output: relative error {err:e}");
        let probe = Tensor::randn_like(&y_new);
        let grads = |y: &Tensor| {
            Tensor::run_backward(
                &[(y * &probe).sum(kind)],
                &[&x, &m.fwd.x_proj.weight, &m.rev.conv_weight],
                true,
                false,
            )
        };
        let (g_new, g_old) = (grads(&y_new), grads(&y_old));
        for (i, (a, b)) in g_new.iter().zip(&g_old).enumerate() {
            let err = max_rel_err(&a.to_kind(Kind::Double), &b.to_kind(Kind::Double));
            assert!(
                err < tol * 10.0,
                "{kind:?} gradient {i}: relative error {err:e}"
            );
        }
    }
}

/// A permuted layer inside a block: the residual add that reads the mixer's
/// scan-order output through a view equals adding the mixer's frame-major output.
#[test]
fn residual_add_puts_scan_order_back() {
    tch::manual_seed(8);
    let (cfg, _vs, model) = video_model_f64(2);
    let m = mamba(&model);
    let grid = TokenGrid {
        batch: 2,
        frames: 2,
        rows: 3,
        cols: 4,
    };
    let opts = (Kind::Double, Device::Cpu);
    let x = Tensor::randn([2, grid.len(), cfg.width], opts);
    let h = Tensor::randn([2, grid.len(), cfg.width], opts);
    let gate = Tensor::randn([2, 1, cfg.width], opts);
    for order in [
        LayerOrder::FrameMajor,
        LayerOrder::ColumnMajor,
        LayerOrder::Interleaved,
    ] {
        let got = add_gated(&x, &gate, &m.mix(&h, &grid, order).unwrap(), &grid, order);
        let want = &x + &gate * m.forward(&h, &grid, order).unwrap();
        assert!(got.is_contiguous());
        let err = max_rel_err(&got, &want);
        assert!(err < 1e-14, "{order:?}: relative error {err:e}");
    }
}

//! The whole network in one file: DiM (Diffusion Mamba) and its DiT baseline
//! share every part except the token mixer.
//!
//! ```text
//! x (B,C,H,W) | (B,C,T,H,W) ─ PatchEmbed ─ + sin-cos pos ─┐
//! t (B) ─ TimestepEmbedder ─┐                            │
//! y (B) ─ LabelEmbedder ────┴─ c (B,W)                   │ tokens (B,L,W)
//!                            │                           ▼
//!                            └──────────► depth × Block (adaLN-Zero: mixer, MLP)
//!                            └──────────► FinalLayer ─ unpatchify ─ (B,C_out,…)
//! ```
//!
//! Tokens are kept in frame-major raster order `(t, h, w)` between blocks; a
//! Mamba layer that scans in another order permutes its input (one copy) and
//! puts its output back in the residual add, through a view.

use std::sync::Mutex;

use dim_scan::{reference, selective_scan_bidirectional, ScanInputs, ScanOptions};
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

use crate::config::{Arch, AttentionSpan, LayerOrder, ModelConfig, TokenGrid, TIMESTEP_FREQ_DIM};
use crate::error::{ModelError, Result};

/// `x · (1 + scale) + shift`, with `shift`, `scale`: `(B, 1, W)` broadcast over tokens.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    x * (scale + 1.0) + shift
}

/// LayerNorm over the last dim without affine parameters (adaLN supplies them), eps 1e-6 as DiT.
fn layer_norm(x: &Tensor) -> Tensor {
    let w = *x.size().last().unwrap_or(&1);
    x.layer_norm([w], None::<Tensor>, None::<Tensor>, 1e-6, true)
}

/// Creates a trainable variable and records it for [`Model::param_count`].
fn var(
    p: &nn::Path<'_>,
    reg: &mut Vec<Tensor>,
    name: &str,
    dims: &[i64],
    init: Init,
) -> Result<Tensor> {
    let t = p.f_var(name, dims, init)?;
    reg.push(t.shallow_clone());
    Ok(t)
}

/// [`var`] with a computed initial value (converted to the store's dtype and device).
fn var_from(p: &nn::Path<'_>, reg: &mut Vec<Tensor>, name: &str, value: &Tensor) -> Result<Tensor> {
    let t = p.f_var_copy(name, &value.to_kind(p.kind()).to_device(p.device()))?;
    reg.push(t.shallow_clone());
    Ok(t)
}

fn xavier(fan_in: i64, fan_out: i64) -> Init {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// How a [`Linear`]'s weight starts.
#[derive(Clone, Copy)]
enum LinearInit {
    /// Xavier-uniform weight, zero bias (DiT's default for every linear).
    Xavier,
    /// Normal(0, std) weight, zero bias.
    Normal(f64),
    /// All zeros (adaLN-Zero modulation and the final projection).
    Zero,
}

/// `y = x Wᵀ + b`: `weight (out, in)`, `bias (out)`; takes `(…, in)`, returns `(…, out)`.
#[derive(Debug)]
pub struct Linear {
    /// `(out, in)`.
    pub weight: Tensor,
    /// `(out)`, absent for Mamba's bias-free projections.
    pub bias: Option<Tensor>,
}

impl Linear {
    fn new(
        p: nn::Path<'_>,
        reg: &mut Vec<Tensor>,
        d_in: i64,
        d_out: i64,
        bias: bool,
        init: LinearInit,
    ) -> Result<Self> {
        let w_init = match init {
            LinearInit::Xavier => xavier(d_in, d_out),
            LinearInit::Normal(std) => Init::Randn {
                mean: 0.0,
                stdev: std,
            },
            LinearInit::Zero => Init::Const(0.0),
        };
        let weight = var(&p, reg, "weight", &[d_out, d_in], w_init)?;
        let bias = if bias {
            Some(var(&p, reg, "bias", &[d_out], Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// `(…, in)` → `(…, out)`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// Cuts the input into `pt × p × p` patches (tubelets) and projects each to a
/// token: a strided convolution written as patchify + [`Linear`].
#[derive(Debug)]
pub struct PatchEmbed {
    /// `(W, C·pt·p·p)`, features ordered `(c, pt, p, p)`.
    pub proj: Linear,
    patch: i64,
    temporal_patch: i64,
}

impl PatchEmbed {
    /// `x (B, C, T, H, W)` → tokens `(B, L, W)` in frame-major raster order.
    pub fn forward(&self, x: &Tensor, g: &TokenGrid) -> Tensor {
        let c = x.size()[1];
        let (p, pt) = (self.patch, self.temporal_patch);
        let patches = x
            .reshape([g.batch, c, g.frames, pt, g.rows, p, g.cols, p])
            .permute([0, 2, 4, 6, 1, 3, 5, 7])
            .reshape([g.batch, g.len(), c * pt * p * p]);
        self.proj.forward(&patches)
    }
}

/// 1-D sin-cos embedding: positions `(n)` → `(n, dim)` as `[sin(pos·ω) | cos(pos·ω)]`
/// with `ω_i = 10000^(-i/(dim/2))`; `dim` even. Computed in f64.
pub fn sincos_1d(pos: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let omega = (Tensor::arange(half, (Kind::Double, pos.device()))
        * (-(10000f64.ln()) / half as f64))
        .exp();
    let args = pos.to_kind(Kind::Double).unsqueeze(1) * omega.unsqueeze(0);
    Tensor::cat(&[args.sin(), args.cos()], 1)
}

/// Fixed sin-cos position embedding of a token grid, `(L, width)` in
/// frame-major raster order, f64. Images: half the channels encode the row,
/// half the column. Video: `4·⌊width/16⌋` channels encode the frame, the rest
/// split between row and column. Built for any grid, so a model runs at other
/// resolutions and frame counts than it was trained at.
pub fn sincos_pos_embed(
    width: i64,
    frames: i64,
    rows: i64,
    cols: i64,
    video: bool,
    device: Device,
) -> Tensor {
    let opts = (Kind::Int64, device);
    let spatial = rows * cols;
    let t = Tensor::arange(frames, opts).repeat_interleave_self_int(spatial, 0, None);
    let h = Tensor::arange(rows, opts)
        .repeat_interleave_self_int(cols, 0, None)
        .repeat([frames]);
    let w = Tensor::arange(cols, opts).repeat([frames * rows]);
    let d_t = if video { 4 * (width / 16) } else { 0 };
    let d_s = (width - d_t) / 2;
    let mut parts = Vec::with_capacity(3);
    if d_t > 0 {
        parts.push(sincos_1d(&t, d_t));
    }
    parts.push(sincos_1d(&h, d_s));
    parts.push(sincos_1d(&w, d_s));
    Tensor::cat(&parts, 1)
}

/// Sinusoidal timestep features `(B)` → `(B, dim)` as `[cos(t·ω) | sin(t·ω)]`
/// with `ω_i = 10000^(-i/(dim/2))` (DiT's convention), in f64.
pub fn timestep_embedding(t: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let freqs =
        (Tensor::arange(half, (Kind::Double, t.device())) * (-(10000f64.ln()) / half as f64)).exp();
    let args = t.to_kind(Kind::Double).unsqueeze(1) * freqs.unsqueeze(0);
    Tensor::cat(&[args.cos(), args.sin()], 1)
}

/// Timestep `(B)` → `(B, W)`: sinusoidal features, then Linear–SiLU–Linear.
#[derive(Debug)]
pub struct TimestepEmbedder {
    /// `(W, 256)`.
    pub fc1: Linear,
    /// `(W, W)`.
    pub fc2: Linear,
}

impl TimestepEmbedder {
    /// `t (B)` float timesteps → `(B, W)`.
    pub fn forward(&self, t: &Tensor) -> Tensor {
        let feats = timestep_embedding(t, TIMESTEP_FREQ_DIM).to_kind(self.fc1.weight.kind());
        self.fc2.forward(&self.fc1.forward(&feats).silu())
    }
}

/// Class label `(B)` → `(B, W)`, with a null class (index `num_classes`) for
/// classifier-free guidance when labels are dropped in training.
#[derive(Debug)]
pub struct LabelEmbedder {
    /// `(num_classes [+ 1 null], W)`.
    pub embedding_table: Tensor,
    num_classes: i64,
    dropout_prob: f64,
}

impl LabelEmbedder {
    /// Whether the table has the null class.
    pub fn has_null_class(&self) -> bool {
        self.embedding_table.size()[0] > self.num_classes
    }

    /// Checks that labels `y` lie in `[0, num_classes)` (or are `num_classes`,
    /// the null class, when the table has it). Reads the values, so on a GPU
    /// tensor it waits for the device: call it on host labels, before they
    /// are moved (as `dim train` does when a batch is loaded).
    pub fn check_labels(&self, y: &Tensor) -> Result<()> {
        if y.numel() == 0 {
            return Ok(());
        }
        let max_label = if self.has_null_class() {
            self.num_classes
        } else {
            self.num_classes - 1
        };
        let (lo, hi) = (y.min().int64_value(&[]), y.max().int64_value(&[]));
        if lo < 0 || hi > max_label {
            return Err(ModelError::input(
                "y",
                format!(
                    "labels span [{lo}, {hi}], expected [0, {max_label}]{}",
                    if self.has_null_class() {
                        " (the last is the null class)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        Ok(())
    }

    /// `y (B)` i64 labels in `[0, num_classes)` (or `num_classes` = null) → `(B, W)`.
    /// In training, each label becomes the null class with the dropout probability.
    /// Label values are checked ([`LabelEmbedder::check_labels`]) only on the
    /// CPU: on a GPU the check would stall every step on a device-to-host copy,
    /// so callers check their labels on the host before moving them.
    pub fn forward(&self, y: &Tensor, batch: i64, train: bool) -> Result<Tensor> {
        if y.size() != [batch] || y.kind() != Kind::Int64 {
            return Err(ModelError::input(
                "y",
                format!(
                    "shape {:?} dtype {:?}, expected ({batch}) Int64 labels",
                    y.size(),
                    y.kind()
                ),
            ));
        }
        if y.device() == Device::Cpu {
            self.check_labels(y)?;
        }
        let y = if train && self.dropout_prob > 0.0 {
            let drop = Tensor::rand([batch], (Kind::Float, y.device())).lt(self.dropout_prob);
            y.where_self(
                &drop.logical_not(),
                &Tensor::full([batch], self.num_classes, (Kind::Int64, y.device())),
            )
        } else {
            y.shallow_clone()
        };
        Ok(Tensor::embedding(
            &self.embedding_table,
            &y,
            -1,
            false,
            false,
        ))
    }
}

/// One scan direction's parameters of the Mamba mixer.
#[derive(Debug)]
pub struct MambaDirection {
    /// Depthwise conv `(E, 1, K)`. The forward direction applies it causally;
    /// the reverse one anti-causally with the taps mirrored, which equals
    /// flipping the sequence, convolving causally and flipping back.
    pub conv_weight: Tensor,
    /// `(E)`.
    pub conv_bias: Tensor,
    /// `(R + 2N, E)`, no bias: to `(Δ low-rank, B, C)`.
    pub x_proj: Linear,
    /// `(E, R)` weight; its bias `(E)` is the scan's `delta_bias`, added inside the fused softplus.
    pub dt_proj: Linear,
    /// `(E, N)`; `A = -exp(A_log)`.
    pub a_log: Tensor,
    /// `(E)` skip connection.
    pub d: Tensor,
}

/// One direction's scan operands: views into [`ScanOperands`]' buffers, in
/// the layout the scan reads (`L` innermost and contiguous, channel stride
/// `L`, any batch stride).
#[derive(Debug)]
pub struct DirectionInputs {
    /// `(B, E, L)`: SiLU of the convolution.
    pub u: Tensor,
    /// `(B, E, L)`: Δ before bias and softplus (the scan fuses both).
    pub delta: Tensor,
    /// `(E, N)`: `-exp(A_log)`, f32 (f64 for f64 models).
    pub a: Tensor,
    /// `(B, 1, N, L)`.
    pub b: Tensor,
    /// `(B, 1, N, L)`.
    pub c: Tensor,
}

/// Both directions' scan operands, computed together by
/// [`BiMamba::scan_operands`]: one convolution and one batched matmul each for
/// `x_proj` and `dt_proj` instead of one per direction.
#[derive(Debug)]
pub struct ScanOperands {
    /// `(B, 2E, L)`: SiLU of the convolution; channels `[0, E)` belong to the
    /// forward direction, `[E, 2E)` to the reverse one.
    pub u: Tensor,
    /// `(B, 2E, L)`: Δ before bias and softplus, halves as in `u`.
    pub delta: Tensor,
    /// `(2B, R + 2N, L)`: `x_proj`'s output (Δ low-rank, B, C); row `2b + d`
    /// holds batch item `b`, direction `d` (0 forward, 1 reverse).
    pub dbl: Tensor,
    /// `(E, N)` per direction (forward, reverse): `-exp(A_log)`, f32 (f64 for f64 models).
    pub a: [Tensor; 2],
}

impl ScanOperands {
    /// The per-direction views `[forward, reverse]`. `u` and `Δ` are cut by
    /// one `chunk` each, whose backward concatenates the pieces' gradients in
    /// one kernel (a `narrow` per piece would zero-fill a full-size gradient
    /// for each); `dbl`, small (`R + 2N` rows), by one `split`.
    pub fn directions(&self) -> [DirectionInputs; 2] {
        let s = self.dbl.size();
        let (batch, rows, len) = (s[0] / 2, s[1], s[2]);
        let n = self.a[0].size()[1];
        let parts = self.dbl.split_with_sizes([rows - 2 * n, n, n], 1);
        // (2B, N, L) → per direction (B, 1, N, L).
        let per_dir = |t: &Tensor| t.view([batch, 2, n, len]).unbind(1);
        let (bs, cs) = (per_dir(&parts[1]), per_dir(&parts[2]));
        let (us, ds) = (self.u.chunk(2, 1), self.delta.chunk(2, 1));
        [0, 1].map(|d| DirectionInputs {
            u: us[d].shallow_clone(),
            delta: ds[d].shallow_clone(),
            a: self.a[d].shallow_clone(),
            b: bs[d].unsqueeze(1),
            c: cs[d].unsqueeze(1),
        })
    }
}

impl MambaDirection {
    fn new(p: nn::Path<'_>, reg: &mut Vec<Tensor>, cfg: &ModelConfig) -> Result<Self> {
        let (e, n, r, k) = (cfg.inner_width(), cfg.d_state, cfg.dt_rank, cfg.d_conv);
        // PyTorch's Conv1d default: U(±1/√fan_in) with fan_in = K for a depthwise kernel.
        let conv_bound = 1.0 / (k as f64).sqrt();
        let conv_init = Init::Uniform {
            lo: -conv_bound,
            up: conv_bound,
        };
        let conv_weight = var(&p, reg, "conv_weight", &[e, 1, k], conv_init)?;
        let conv_bias = var(&p, reg, "conv_bias", &[e], conv_init)?;
        let x_proj = Linear::new(
            p.sub("x_proj"),
            reg,
            e,
            r + 2 * n,
            false,
            LinearInit::Xavier,
        )?;
        // Mamba's Δ initialisation: weight U(±R^-1/2); bias = softplus⁻¹(dt) with dt
        // log-uniform in [dt_min, dt_max], so softplus(bias) starts in that range.
        let dt_std = (r as f64).powf(-0.5);
        let dt_p = p.sub("dt_proj");
        let dt_weight = var(
            &dt_p,
            reg,
            "weight",
            &[e, r],
            Init::Uniform {
                lo: -dt_std,
                up: dt_std,
            },
        )?;
        let (lmin, lmax) = (cfg.dt_min.ln(), cfg.dt_max.ln());
        let dt = (Tensor::rand([e], (Kind::Double, Device::Cpu)) * (lmax - lmin) + lmin)
            .exp()
            .clamp_min(1e-4);
        let inv_softplus = &dt + (-(-&dt).expm1()).log();
        let dt_bias = var_from(&dt_p, reg, "bias", &inv_softplus)?;
        let dt_proj = Linear {
            weight: dt_weight,
            bias: Some(dt_bias),
        };
        // S4D-real: A[:, n] = -(n + 1).
        let a = Tensor::arange_start(1, n + 1, (Kind::Double, Device::Cpu))
            .unsqueeze(0)
            .repeat([e, 1]);
        let a_log = var_from(&p, reg, "A_log", &a.log())?;
        let d = var(&p, reg, "D", &[e], Init::Const(1.0))?;
        Ok(Self {
            conv_weight,
            conv_bias,
            x_proj,
            dt_proj,
            a_log,
            d,
        })
    }

    /// `A = -exp(A_log)` `(E, N)`, f32 (f64 for f64 models).
    pub fn a(&self) -> Tensor {
        let kind = if self.a_log.kind() == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        };
        -self.a_log.to_kind(kind).exp()
    }

    /// Borrows `x` with this direction's `D` and Δ bias into the scan's argument struct.
    pub fn scan_inputs<'a>(&'a self, x: &'a DirectionInputs) -> ScanInputs<'a> {
        ScanInputs {
            u: &x.u,
            delta: &x.delta,
            a: &x.a,
            b: &x.b,
            c: &x.c,
            d: Some(&self.d),
            delta_bias: self.dt_proj.bias.as_ref(),
        }
    }
}

/// Bidirectional Mamba mixer (Vision Mamba's "v2" layout, with anti-causal
/// convolution instead of flipped copies): `(B, L, W)` → `(B, L, W)`.
#[derive(Debug)]
pub struct BiMamba {
    /// `(2E, W)`, no bias: rows `[0, E)` give `x`, rows `[E, 2E)` give the gate `z`.
    pub in_proj: Linear,
    /// Forward-direction parameters.
    pub fwd: MambaDirection,
    /// Reverse-direction parameters.
    pub rev: MambaDirection,
    /// `(W, E)`, no bias.
    pub out_proj: Linear,
    dt_rank: i64,
}

impl BiMamba {
    fn new(p: nn::Path<'_>, reg: &mut Vec<Tensor>, cfg: &ModelConfig) -> Result<Self> {
        let (w, e) = (cfg.width, cfg.inner_width());
        Ok(Self {
            in_proj: Linear::new(p.sub("in_proj"), reg, w, 2 * e, false, LinearInit::Xavier)?,
            fwd: MambaDirection::new(p.sub("fwd"), reg, cfg)?,
            rev: MambaDirection::new(p.sub("rev"), reg, cfg)?,
            out_proj: Linear::new(p.sub("out_proj"), reg, e, w, false, LinearInit::Xavier)?,
            dt_rank: cfg.dt_rank,
        })
    }

    /// `in_proj` in one matmul: tokens `x (B, L, W)` in scan order →
    /// `xz (B, 2E, L)` contiguous, rows `[0, E)` the scan input `x`, rows
    /// `[E, 2E)` the gate `z` (cut with [`BiMamba::split_xz`]). A bmm against
    /// the weight broadcast over the batch (stride 0, no copy) writes the
    /// `L`-innermost layout the conv and the scan read; `matmul` would instead
    /// fold the batch into one mm and copy its `(B, L, 2E)` result into this
    /// layout (and its gradient back).
    pub fn project_in(&self, x: &Tensor) -> Result<Tensor> {
        let kind = compute_kind(x)?;
        let batch = x.size()[0];
        let w = broadcast(&self.in_proj.weight.to_kind(kind), batch);
        Ok(w.bmm(&x.to_kind(kind).transpose(1, 2)))
    }

    /// `xz (B, 2E, L)` → `(x, z)`, each a `(B, E, L)` view (batch stride `2E·L`).
    pub fn split_xz(&self, xz: &Tensor) -> (Tensor, Tensor) {
        let v = xz.chunk(2, 1);
        (v[0].shallow_clone(), v[1].shallow_clone())
    }

    /// Both directions' depthwise conv, SiLU, `x_proj` and `dt_proj`, batched:
    /// `xs (B, E, L)` (any batch stride) → the scan's operands.
    ///
    /// The conv is one grouped conv with two outputs per channel (`E`
    /// groups, `2E` outputs, channel `2e + d` for direction `d`) and `2K-1`
    /// taps: the forward direction's `K` taps on the left (causal), the
    /// reverse direction's mirrored on the right (anti-causal, which equals
    /// flipping the sequence, convolving causally and flipping back); the
    /// other `K-1` taps are zero. It keeps only `xs` (a view of `in_proj`'s
    /// output, alive anyway) for its backward. One copy then groups the
    /// channels by direction, `[forward | reverse]`, as the scan reads them.
    /// `x_proj` and `dt_proj` each run as one bmm over (batch item,
    /// direction) pairs, with the two directions' weights stacked at forward
    /// time (the parameters stay per direction, as checkpoints name them).
    pub fn scan_operands(&self, xs: &Tensor) -> ScanOperands {
        let s = xs.size();
        let (batch, e, len) = (s[0], s[1], s[2]);
        let k = self.fwd.conv_weight.size()[2];
        let weight = Tensor::stack(
            &[
                self.fwd.conv_weight.constant_pad_nd([0, k - 1]),
                self.rev.conv_weight.flip([-1]).constant_pad_nd([k - 1, 0]),
            ],
            1,
        )
        .view([2 * e, 1, 2 * k - 1]);
        let bias = Tensor::stack(&[&self.fwd.conv_bias, &self.rev.conv_bias], 1).view([2 * e]);
        let u = xs
            .conv1d(&weight, Some(&bias), [1], [k - 1], [1], e) // (B, 2E, L), channel 2e + d
            .view([batch, e, 2, len])
            .transpose(1, 2)
            .reshape([batch, 2 * e, len])
            .silu(); // (B, 2E, L), [forward | reverse]
        let kind = u.kind();
        let stacked = |f: &Linear, r: &Linear| {
            let w = Tensor::stack(&[&f.weight, &r.weight], 0).to_kind(kind); // (2, O, I)
            let (o, i) = (w.size()[1], w.size()[2]);
            // (2B, O, I), entry 2b + d = direction d: a copy, but of weights only.
            w.unsqueeze(0)
                .expand([batch, 2, o, i], false)
                .reshape([2 * batch, o, i])
        };
        let dbl = stacked(&self.fwd.x_proj, &self.rev.x_proj).bmm(&u.view([2 * batch, e, len]));
        let delta = stacked(&self.fwd.dt_proj, &self.rev.dt_proj)
            .bmm(&dbl.narrow(1, 0, self.dt_rank))
            .view([batch, 2 * e, len]);
        ScanOperands {
            u,
            delta,
            dbl,
            a: [self.fwd.a(), self.rev.a()],
        }
    }

    /// The fused bidirectional scan, gated by `silu(z)`: operands and
    /// `z (B, E, L)` → `y (B, E, L)` contiguous. f64 inputs (numerical checks
    /// only) go through dim-scan's plain-tch reference, since the fused op
    /// takes f32, bf16 and f16.
    pub fn scan_op(&self, ops: &ScanOperands, z: &Tensor) -> Result<Tensor> {
        let [f, r] = ops.directions();
        let (fi, ri) = (self.fwd.scan_inputs(&f), self.rev.scan_inputs(&r));
        if z.kind() == Kind::Double {
            Ok(reference::selective_scan_bidirectional_ref(
                fi,
                ri,
                Some(z),
                true,
            ))
        } else {
            Ok(selective_scan_bidirectional(
                fi,
                ri,
                Some(z),
                ScanOptions::default(),
            )?)
        }
    }

    /// `out_proj`: the scan's `y (B, E, L)` → `(B, L, W)` contiguous, by a bmm
    /// that reads `y` transposed in place against the weight broadcast over
    /// the batch.
    pub fn project_out(&self, y: &Tensor) -> Tensor {
        let w = broadcast(&self.out_proj.weight.to_kind(y.kind()).tr(), y.size()[0]);
        y.transpose(1, 2).bmm(&w)
    }

    /// The mixer up to `out_proj`: tokens `(B, L, W)` in frame-major order →
    /// `(B, L, W)` in the scan order `order` (see [`scan_order`]). The caller
    /// reads the result back in frame-major order through [`add_gated`], so
    /// that a permuted layer makes one copy of its tokens (on entry) rather
    /// than two.
    pub fn mix(&self, x: &Tensor, g: &TokenGrid, order: LayerOrder) -> Result<Tensor> {
        let x = scan_order(x, g, order);
        let xz = self.project_in(&x)?;
        let (xs, z) = self.split_xz(&xz);
        let ops = self.scan_operands(&xs);
        let y = self.scan_op(&ops, &z)?;
        Ok(self.project_out(&y))
    }

    /// Tokens `(B, L, W)` in frame-major order → `(B, L, W)` in frame-major
    /// order, scanning in `order`.
    pub fn forward(&self, x: &Tensor, g: &TokenGrid, order: LayerOrder) -> Result<Tensor> {
        let h = self.mix(x, g, order)?;
        Ok(match order_blocks(g, order) {
            None => h,
            Some(_) => frame_major_view(&h, g, order).reshape(x.size()),
        })
    }
}

/// The dtype matmuls compute in for input `x`: CUDA autocast's while it is
/// on (for a CUDA f32 input), else `x`'s own. Operands are cast before they
/// are broadcast, since autocast would materialise a broadcast operand.
fn compute_kind(x: &Tensor) -> Result<Kind> {
    if x.device().is_cuda() && x.kind() == Kind::Float && dim_scan::device::cuda_autocast_enabled()?
    {
        if let Some(kind) = dim_scan::device::cuda_autocast_dtype()? {
            return Ok(kind);
        }
    }
    Ok(x.kind())
}

/// A matrix `(O, I)` as a `(batch, O, I)` bmm operand with batch stride 0.
fn broadcast(w: &Tensor, batch: i64) -> Tensor {
    let s = w.size();
    w.unsqueeze(0).expand([batch, s[0], s[1]], false)
}

/// The token permutation of a scan order as `(lead, outer, inner)`: the flat
/// frame-major token axis read as `(lead, outer, inner)` blocks is scanned
/// as `(lead, inner, outer)`, a transpose of the `(T, H, W)` grid. `None`
/// when the order is the frame-major layout itself (no permutation).
fn order_blocks(g: &TokenGrid, order: LayerOrder) -> Option<(i64, i64, i64)> {
    match order {
        LayerOrder::FrameMajor => None,
        LayerOrder::Interleaved if g.frames == 1 => None,
        LayerOrder::Interleaved => Some((1, g.frames, g.spatial())),
        LayerOrder::ColumnMajor if g.rows == 1 || g.cols == 1 => None,
        LayerOrder::ColumnMajor => Some((g.frames, g.rows, g.cols)),
    }
}

/// Tokens `(B, L, W)` from frame-major order into `order`: a copy for a
/// permuted order. It cannot be folded into `in_proj`'s operand: a cuBLAS
/// operand has one stride per matrix dimension, and a transposed token grid
/// needs two along `L`.
pub fn scan_order(x: &Tensor, g: &TokenGrid, order: LayerOrder) -> Tensor {
    let Some((lead, outer, inner)) = order_blocks(g, order) else {
        return x.shallow_clone();
    };
    let s = x.size();
    x.reshape([s[0], lead, outer, inner, s[2]])
        .transpose(2, 3)
        .reshape([s[0], s[1], s[2]])
}

/// `h (B, L, W)` in scan order `order`, viewed in frame-major order as
/// `(B, lead, outer, inner, W)` (no copy; `(B, L, W)` for frame-major order):
/// the inverse of [`scan_order`].
pub fn frame_major_view(h: &Tensor, g: &TokenGrid, order: LayerOrder) -> Tensor {
    let Some((lead, outer, inner)) = order_blocks(g, order) else {
        return h.shallow_clone();
    };
    let s = h.size();
    h.view([s[0], lead, inner, outer, s[2]]).transpose(2, 3)
}

/// The scan position's token: `(L)` i64, entry `i` the frame-major index of
/// the token that `order` scans `i`-th. Computed by [`scan_order`] itself
/// (on the indices), for tests and pictures.
pub fn scan_permutation(g: &TokenGrid, order: LayerOrder) -> Tensor {
    let idx = Tensor::arange(g.len(), (Kind::Int64, Device::Cpu)).view([1, g.len(), 1]);
    let one = TokenGrid { batch: 1, ..*g };
    scan_order(&idx, &one, order).view([g.len()])
}

/// The residual update `x + gate · h` for tokens `x (B, L, W)` in
/// frame-major order, `gate (B, 1, W)` and a mixer output `h (B, L, W)` in
/// scan order `order`. `h` is read through a permuted view, so the add,
/// which writes a new tensor anyway, also puts the tokens back in
/// frame-major order: no separate copy.
pub fn add_gated(
    x: &Tensor,
    gate: &Tensor,
    h: &Tensor,
    g: &TokenGrid,
    order: LayerOrder,
) -> Tensor {
    if order_blocks(g, order).is_none() {
        return x + gate * h;
    }
    let hv = frame_major_view(h, g, order);
    let s = x.size();
    let x5 = x.reshape(hv.size());
    let gate5 = gate.reshape([s[0], 1, 1, 1, s[2]]);
    (x5 + gate5 * hv).reshape([s[0], s[1], s[2]])
}

/// Softmax attention of `q`, `k`, `v` `(N, heads, L, hd)` → `(N, heads, L, hd)`
/// with the `1/sqrt(hd)` scale, no mask and no dropout, through libtorch's
/// fused `scaled_dot_product_attention` (flash or memory-efficient kernels on CUDA).
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, false, None::<f64>, false)
}

/// Multi-head self-attention (DiT's mixer) through libtorch's
/// `scaled_dot_product_attention`: `(B, L, W)` → `(B, L, W)`.
#[derive(Debug)]
pub struct Attention {
    /// `(3W, W)` with bias.
    pub qkv: Linear,
    /// `(W, W)` with bias.
    pub proj: Linear,
    heads: i64,
}

impl Attention {
    /// Tokens `(B, L, W)` in frame-major order → `(B, L, W)`, each token
    /// attending to the tokens of its `span` (all, its frame, or its spatial
    /// position across frames) in grid `g`.
    pub fn forward(&self, x: &Tensor, g: &TokenGrid, span: AttentionSpan) -> Tensor {
        let s = x.size();
        let (b, l, w) = (s[0], s[1], s[2]);
        let (heads, hd) = (self.heads, w / self.heads);
        // Tokens as (B, groups, seq): independent attention per group.
        let qkv = self.qkv.forward(x);
        let (groups, seq) = match span {
            AttentionSpan::All => (1, l),
            AttentionSpan::Frame => (g.frames, g.spatial()),
            AttentionSpan::Time => (g.spatial(), g.frames),
        };
        let grid = qkv.reshape([b, g.frames, g.spatial(), 3, heads, hd]);
        let qkv = match span {
            AttentionSpan::All => qkv.reshape([b, 1, l, 3, heads, hd]),
            AttentionSpan::Frame => grid,
            // Frame-major (B, T', S, …) read by spatial position: a view.
            AttentionSpan::Time => grid.transpose(1, 2),
        };
        let qkv = qkv
            .permute([3, 0, 1, 4, 2, 5]) // (3, B, groups, heads, seq, hd)
            .reshape([3, b * groups, heads, seq, hd]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let o = attend(&q, &k, &v) // (B·groups, heads, seq, hd)
            .view([b, groups, heads, seq, hd])
            .permute([0, 1, 3, 2, 4]); // (B, groups, seq, heads, hd)
        let o = if span == AttentionSpan::Time {
            o.transpose(1, 2)
        } else {
            o
        };
        self.proj.forward(&o.reshape([b, l, w]))
    }
}

/// The token mixer of a block.
#[derive(Debug)]
pub enum Mixer {
    /// DiM.
    Mamba(BiMamba),
    /// DiT.
    Attention(Attention),
}

/// Linear–GELU(tanh)–Linear: `(B, L, W)` → `(B, L, W)`.
#[derive(Debug)]
pub struct Mlp {
    /// `(mlp_ratio·W, W)`.
    pub fc1: Linear,
    /// `(W, mlp_ratio·W)`.
    pub fc2: Linear,
}

impl Mlp {
    /// `(…, W)` → `(…, W)`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&self.fc1.forward(x).gelu("tanh"))
    }
}

/// DiMBlock / DiTBlock with adaLN-Zero: `x += gate₁·mixer(modulate(LN(x)))`,
/// `x += gate₂·MLP(modulate(LN(x)))`, shifts, scales and gates from `c`.
/// The modulation starts at zero, so a fresh block is the identity.
#[derive(Debug)]
pub struct Block {
    /// `(6W, W)` after SiLU: shift, scale, gate for the mixer, then for the MLP.
    pub ada_ln_modulation: Linear,
    /// Mamba or attention.
    pub mixer: Mixer,
    /// The MLP.
    pub mlp: Mlp,
    /// Scan order of this layer (Mamba only).
    pub order: LayerOrder,
    /// Tokens each token attends to in this layer (attention only).
    pub span: AttentionSpan,
}

impl Block {
    fn new(
        p: nn::Path<'_>,
        reg: &mut Vec<Tensor>,
        cfg: &ModelConfig,
        layer: usize,
    ) -> Result<Self> {
        let w = cfg.width;
        let mixer = match cfg.arch {
            Arch::Dim => Mixer::Mamba(BiMamba::new(p.sub("mixer"), reg, cfg)?),
            Arch::Dit => {
                let a = p.sub("attn");
                Mixer::Attention(Attention {
                    qkv: Linear::new(a.sub("qkv"), reg, w, 3 * w, true, LinearInit::Xavier)?,
                    proj: Linear::new(a.sub("proj"), reg, w, w, true, LinearInit::Xavier)?,
                    heads: cfg.heads,
                })
            }
        };
        let m = p.sub("mlp");
        let mlp = Mlp {
            fc1: Linear::new(
                m.sub("fc1"),
                reg,
                w,
                cfg.mlp_width(),
                true,
                LinearInit::Xavier,
            )?,
            fc2: Linear::new(
                m.sub("fc2"),
                reg,
                cfg.mlp_width(),
                w,
                true,
                LinearInit::Xavier,
            )?,
        };
        let ada_ln_modulation = Linear::new(
            p.sub("adaLN_modulation"),
            reg,
            w,
            6 * w,
            true,
            LinearInit::Zero,
        )?;
        Ok(Self {
            ada_ln_modulation,
            mixer,
            mlp,
            order: cfg.token_order.for_layer(layer),
            span: cfg.attention.for_layer(layer),
        })
    }

    /// Tokens `(B, L, W)` (frame-major), conditioning `c (B, W)` → `(B, L, W)`.
    pub fn forward(&self, x: &Tensor, c: &Tensor, g: &TokenGrid) -> Result<Tensor> {
        let m = self
            .ada_ln_modulation
            .forward(&c.silu())
            .unsqueeze(1)
            .chunk(6, 2);
        let h = modulate(&layer_norm(x), &m[0], &m[1]);
        let x = match &self.mixer {
            Mixer::Mamba(mamba) => {
                add_gated(x, &m[2], &mamba.mix(&h, g, self.order)?, g, self.order)
            }
            Mixer::Attention(attn) => x + &m[2] * attn.forward(&h, g, self.span),
        };
        let h = self.mlp.forward(&modulate(&layer_norm(&x), &m[3], &m[4]));
        Ok(x + &m[5] * h)
    }
}

/// adaLN (shift, scale from `c`) then a linear map to `pt·p·p·C_out` values per token.
#[derive(Debug)]
pub struct FinalLayer {
    /// `(2W, W)`, zero-initialised.
    pub ada_ln_modulation: Linear,
    /// `(pt·p·p·C_out, W)`, zero-initialised; outputs ordered `(pt, p, p, c)`.
    pub linear: Linear,
}

impl FinalLayer {
    /// Tokens `(B, L, W)`, `c (B, W)` → `(B, L, pt·p·p·C_out)`.
    pub fn forward(&self, x: &Tensor, c: &Tensor) -> Tensor {
        let m = self
            .ada_ln_modulation
            .forward(&c.silu())
            .unsqueeze(1)
            .chunk(2, 2);
        self.linear.forward(&modulate(&layer_norm(x), &m[0], &m[1]))
    }
}

/// Cache key of the position embedding: grid and where it lives.
type PosKey = (i64, i64, i64, Device, Kind);

/// The DiM or DiT network (chosen by `cfg.arch`).
#[derive(Debug)]
pub struct Model {
    cfg: ModelConfig,
    /// Patch (tubelet) embedding.
    pub x_embedder: PatchEmbed,
    /// Timestep embedding.
    pub t_embedder: TimestepEmbedder,
    /// Label embedding; `None` for unconditional models.
    pub y_embedder: Option<LabelEmbedder>,
    /// The blocks.
    pub blocks: Vec<Block>,
    /// The output head.
    pub final_layer: FinalLayer,
    params: Vec<Tensor>,
    pos_cache: Mutex<Option<(PosKey, Tensor)>>,
}

impl Model {
    /// Builds and initialises the network under `p` (variables named as in
    /// DiT: `x_embedder.proj.weight`, `blocks.0.mixer.fwd.A_log`, …).
    pub fn new(p: nn::Path<'_>, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let mut reg = Vec::new();
        let w = cfg.width;
        let x_embedder = PatchEmbed {
            proj: Linear::new(
                p.sub("x_embedder").sub("proj"),
                &mut reg,
                cfg.in_channels * cfg.patch_volume(),
                w,
                true,
                LinearInit::Xavier,
            )?,
            patch: cfg.patch,
            temporal_patch: cfg.temporal_patch,
        };
        let tp = p.sub("t_embedder");
        let t_embedder = TimestepEmbedder {
            fc1: Linear::new(
                tp.sub("fc1"),
                &mut reg,
                TIMESTEP_FREQ_DIM,
                w,
                true,
                LinearInit::Normal(0.02),
            )?,
            fc2: Linear::new(
                tp.sub("fc2"),
                &mut reg,
                w,
                w,
                true,
                LinearInit::Normal(0.02),
            )?,
        };
        let y_embedder = if cfg.num_classes > 0 {
            let table = var(
                &p.sub("y_embedder"),
                &mut reg,
                "embedding_table",
                &[cfg.label_rows(), w],
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?;
            Some(LabelEmbedder {
                embedding_table: table,
                num_classes: cfg.num_classes,
                dropout_prob: cfg.class_dropout_prob,
            })
        } else {
            None
        };
        let bp = p.sub("blocks");
        let blocks = (0..cfg.depth as usize)
            .map(|i| Block::new(bp.sub(i), &mut reg, cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let fp = p.sub("final_layer");
        let final_layer = FinalLayer {
            ada_ln_modulation: Linear::new(
                fp.sub("adaLN_modulation"),
                &mut reg,
                w,
                2 * w,
                true,
                LinearInit::Zero,
            )?,
            linear: Linear::new(
                fp.sub("linear"),
                &mut reg,
                w,
                cfg.patch_volume() * cfg.out_channels(),
                true,
                LinearInit::Zero,
            )?,
        };
        let model = Self {
            cfg: cfg.clone(),
            x_embedder,
            t_embedder,
            y_embedder,
            blocks,
            final_layer,
            params: reg,
            pos_cache: Mutex::new(None),
        };
        tracing::info!(
            arch = ?cfg.arch,
            depth = cfg.depth,
            width = cfg.width,
            patch = cfg.patch,
            params = model.param_count(),
            "built model"
        );
        Ok(model)
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Number of trainable scalars the model holds.
    pub fn param_count(&self) -> i64 {
        self.params.iter().map(|t| t.numel() as i64).sum()
    }

    /// Forward cost for an input shape; see [`ModelConfig::flops`].
    pub fn flops(&self, input_shape: &[i64]) -> Result<crate::FlopCount> {
        self.cfg.flops(input_shape)
    }

    /// The position embedding `(L, W)` of a grid, in `kind` on `device` (cached for the last grid).
    pub fn pos_embed(&self, g: &TokenGrid, kind: Kind, device: Device) -> Tensor {
        let key = (g.frames, g.rows, g.cols, device, kind);
        let mut cache = self.pos_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, t)) = cache.as_ref() {
            if *k == key {
                return t.shallow_clone();
            }
        }
        let t = sincos_pos_embed(
            self.cfg.width,
            g.frames,
            g.rows,
            g.cols,
            self.cfg.is_video(),
            device,
        )
        .to_kind(kind);
        *cache = Some((key, t.shallow_clone()));
        t
    }

    /// Checks the inputs and computes the tokens `(B, L, W)` (patch embedding
    /// plus position embedding), the conditioning `c (B, W)` and the token grid.
    pub fn embed(
        &self,
        x: &Tensor,
        t: &Tensor,
        y: Option<&Tensor>,
        train: bool,
    ) -> Result<(Tensor, Tensor, TokenGrid)> {
        let g = self.cfg.token_grid(&x.size())?;
        if !x.is_floating_point() {
            return Err(ModelError::input(
                "x",
                format!("dtype {:?}, expected floating point", x.kind()),
            ));
        }
        if t.size() != [g.batch] {
            return Err(ModelError::input(
                "t",
                format!(
                    "shape {:?}, expected ({}) timesteps, one per batch item",
                    t.size(),
                    g.batch
                ),
            ));
        }
        let device = self.x_embedder.proj.weight.device();
        for (name, tensor) in [("x", Some(x)), ("t", Some(t)), ("y", y)] {
            if let Some(tensor) = tensor {
                if tensor.device() != device {
                    return Err(ModelError::input(
                        name,
                        format!("is on {:?}, the model on {device:?}", tensor.device()),
                    ));
                }
            }
        }
        let x5 = if self.cfg.is_video() {
            x.shallow_clone()
        } else {
            x.unsqueeze(2)
        };
        let kind = self.x_embedder.proj.weight.kind();
        let tokens =
            self.x_embedder.forward(&x5.to_kind(kind), &g) + self.pos_embed(&g, kind, x.device());
        let mut c = self.t_embedder.forward(t);
        match (&self.y_embedder, y) {
            (Some(emb), Some(y)) => c += emb.forward(y, g.batch, train)?,
            (Some(emb), None) if emb.has_null_class() => {
                let null = Tensor::full([g.batch], self.cfg.num_classes, (Kind::Int64, x.device()));
                c += emb.forward(&null, g.batch, false)?;
            }
            (Some(_), None) => {
                return Err(ModelError::input(
                    "y",
                    "missing: the model is class-conditional without a null class (class_dropout_prob = 0)",
                ))
            }
            (None, Some(_)) => {
                return Err(ModelError::input("y", "given, but the model is unconditional (num_classes = 0)"))
            }
            (None, None) => {}
        }
        Ok((tokens, c, g))
    }

    /// `(B, L, pt·p·p·C_out)` → `(B, C_out, T, H, W)` (video) or `(B, C_out, H, W)` (image).
    pub fn unpatchify(&self, out: &Tensor, g: &TokenGrid) -> Tensor {
        let (p, pt, co) = (
            self.cfg.patch,
            self.cfg.temporal_patch,
            self.cfg.out_channels(),
        );
        let x = out
            .reshape([g.batch, g.frames, g.rows, g.cols, pt, p, p, co])
            .permute([0, 7, 1, 4, 2, 5, 3, 6])
            .reshape([g.batch, co, g.frames * pt, g.rows * p, g.cols * p]);
        if self.cfg.is_video() {
            x
        } else {
            x.squeeze_dim(2)
        }
    }

    /// The network: `x (B, C, H, W)` or `(B, C, T, H, W)`, `t (B)` float
    /// timesteps, `y (B)` i64 labels (`None`: the null class if the model has
    /// one; required otherwise for conditional models, refused for
    /// unconditional ones) → `(B, C_out, …)` with the input's spatial and
    /// temporal size; with learned sigma the first `C` channels are ε, the
    /// last `C` the variance interpolation. `train` enables label dropout.
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        y: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (mut tokens, c, g) = self.embed(x, t, y, train)?;
        for block in &self.blocks {
            tokens = block.forward(&tokens, &c, &g)?;
        }
        let out = self.final_layer.forward(&tokens, &c);
        Ok(self.unpatchify(&out, &g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sin-cos embeddings against the formula evaluated element by element in plain f64.
    #[test]
    fn position_embedding_matches_formula() {
        let one_d = |pos: f64, dim: i64, i: i64| {
            let half = dim / 2;
            let j = i % half;
            let arg = pos * 10000f64.powf(-(j as f64) / half as f64);
            if i < half {
                arg.sin()
            } else {
                arg.cos()
            }
        };
        for (width, frames, rows, cols, video) in [
            (20, 1, 3, 5, false),
            (40, 3, 2, 3, true),
            (36, 2, 1, 4, true),
        ] {
            let got = sincos_pos_embed(width, frames, rows, cols, video, Device::Cpu);
            assert_eq!(got.size(), [frames * rows * cols, width]);
            let d_t = if video { 4 * (width / 16) } else { 0 };
            let d_s = (width - d_t) / 2;
            for t in 0..frames {
                for h in 0..rows {
                    for w in 0..cols {
                        let l = (t * rows + h) * cols + w;
                        for i in 0..width {
                            let want = if i < d_t {
                                one_d(t as f64, d_t, i)
                            } else if i < d_t + d_s {
                                one_d(h as f64, d_s, i - d_t)
                            } else {
                                one_d(w as f64, d_s, i - d_t - d_s)
                            };
                            let v = got.double_value(&[l, i]);
                            assert!(
                                (v - want).abs() < 1e-12,
                                "({t},{h},{w}) channel {i}: {v} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn timestep_embedding_matches_formula() {
        let t = Tensor::from_slice(&[0.0f32, 3.5, 999.0]);
        let dim = 10;
        let got = timestep_embedding(&t, dim);
        for (b, tv) in [0.0f64, 3.5, 999.0].iter().enumerate() {
            for i in 0..dim {
                let arg = tv * (-(10000f64.ln()) * (i % 5) as f64 / 5.0).exp();
                let want = if i < 5 { arg.cos() } else { arg.sin() };
                assert!((got.double_value(&[b as i64, i]) - want).abs() < 1e-9);
            }
        }
    }

    /// Patchify then unpatchify is the identity when the head outputs the patch values back.
    #[test]
    fn unpatchify_inverts_patchify() {
        let cfg = ModelConfig::from_toml_str(
            "arch = \"dit\"\ndepth = 1\nwidth = 16\nheads = 2\npatch = 2\nin_channels = 3\nframes = 4\ntemporal_patch = 2\nlearn_sigma = false\ninput_size = [4, 6]",
        )
        .unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Model::new(vs.root(), &cfg).unwrap();
        let x = Tensor::randn([2, 3, 4, 6, 4], (Kind::Float, Device::Cpu));
        let g = cfg.token_grid(&x.size()).unwrap();
        // Patch features are ordered (c, pt, p, p); the head's outputs (pt, p, p, c).
        let patches = x
            .reshape([2, 3, g.frames, 2, g.rows, 2, g.cols, 2])
            .permute([0, 2, 4, 6, 3, 5, 7, 1])
            .reshape([2, g.len(), 24]);
        assert!(model.unpatchify(&patches, &g).equal(&x));
    }
}

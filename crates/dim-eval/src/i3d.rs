//! I3D (Inflated Inception-v1, Carreira & Zisserman 2017) as FVD's feature
//! network: the Kinetics-400 classifier whose 400 logits are the features of
//! the standard FVD protocol (StyleGAN-V: 2,048 clips of 16 frames resized
//! to 224×224). Weights come from a file the user converts (`docs/eval.md`);
//! tensor names follow the PyTorch port (`Conv3d_1a_7x7.conv3d.weight`,
//! `Mixed_3b.b1b.bn.running_var`, `logits.conv3d.bias`, …).
//!
//! Every convolution and max-pool pads TensorFlow-style ("SAME": the
//! padding that gives `⌈size / stride⌉` outputs, the odd pixel at the end,
//! zeros also for max-pooling, as the port does), so the graph matches the
//! TF original at any input size.

use std::path::Path;

use tch::nn::{self, Module, ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

use crate::fvd::{check_clips, VideoFeatureExtractor};
use crate::{load_checked, Result};

/// Kinetics-400 classes: the width of the logits (the FVD features).
pub const I3D_CLASSES: i64 = 400;
/// Width of the pooled features before the logits layer.
pub const I3D_POOLED_DIM: i64 = 1024;
/// Side frames are resized to (bilinear) in the FVD protocol.
pub const I3D_SIZE: i64 = 224;

/// "SAME" padding of one axis of size `s` for kernel `k` and stride `st`:
/// `(front, back)`.
fn same_pad(s: i64, k: i64, st: i64) -> (i64, i64) {
    let total = if s % st == 0 {
        (k - st).max(0)
    } else {
        (k - s % st).max(0)
    };
    (total / 2, total - total / 2)
}

/// Zero-pads `x (N, C, T, H, W)` for a "SAME" window `k` with stride `st`.
fn pad_same(x: &Tensor, k: [i64; 3], st: [i64; 3]) -> Tensor {
    let s = x.size();
    let (t, h, w) = (
        same_pad(s[2], k[0], st[0]),
        same_pad(s[3], k[1], st[1]),
        same_pad(s[4], k[2], st[2]),
    );
    x.constant_pad_nd([w.0, w.1, h.0, h.1, t.0, t.1])
}

/// Conv3d ("SAME" padding), optional batch norm (eval statistics) and ReLU.
#[derive(Debug)]
struct Unit3d {
    conv: nn::Conv<[i64; 3]>,
    bn: Option<nn::BatchNorm>,
    kernel: [i64; 3],
    stride: [i64; 3],
    relu: bool,
}

impl Unit3d {
    /// A unit with batch norm and ReLU, no conv bias (every unit but the logits).
    fn new(p: nn::Path<'_>, i: i64, o: i64, kernel: [i64; 3], stride: [i64; 3]) -> Self {
        Self::build(p, i, o, kernel, stride, true)
    }

    fn build(
        p: nn::Path<'_>,
        i: i64,
        o: i64,
        kernel: [i64; 3],
        stride: [i64; 3],
        bn_relu: bool,
    ) -> Self {
        let cfg = nn::ConvConfigND::<[i64; 3]> {
            stride,
            padding: [0, 0, 0],
            dilation: [1, 1, 1],
            groups: 1,
            bias: !bn_relu,
            ws_init: nn::ConvConfig::default().ws_init,
            bs_init: nn::Init::Const(0.0),
            padding_mode: nn::PaddingMode::Zeros,
        };
        let conv = nn::conv(&p / "conv3d", i, o, kernel, cfg);
        let bn = bn_relu.then(|| {
            nn::batch_norm3d(
                &p / "bn",
                o,
                nn::BatchNormConfig {
                    eps: 1e-5,
                    ..Default::default()
                },
            )
        });
        Self {
            conv,
            bn,
            kernel,
            stride,
            relu: bn_relu,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut y = self.conv.forward(&pad_same(x, self.kernel, self.stride));
        if let Some(bn) = &self.bn {
            y = bn.forward_t(&y, false);
        }
        if self.relu {
            y = y.relu();
        }
        y
    }
}

/// Max-pool with "SAME" zero padding.
fn max_pool_same(x: &Tensor, k: [i64; 3], st: [i64; 3]) -> Tensor {
    pad_same(x, k, st).max_pool3d(k, st, [0, 0, 0], [1, 1, 1], false)
}

/// An Inception module: 1×1, 1×1→3×3×3, 1×1→3×3×3 and 3×3×3 max-pool→1×1
/// branches, concatenated along channels.
#[derive(Debug)]
struct Mixed {
    b0: Unit3d,
    b1a: Unit3d,
    b1b: Unit3d,
    b2a: Unit3d,
    b2b: Unit3d,
    b3b: Unit3d,
}

impl Mixed {
    /// `out`: branch widths `[b0, b1a, b1b, b2a, b2b, b3b]`.
    fn new(p: nn::Path<'_>, i: i64, out: [i64; 6]) -> Self {
        let (one, three, s1) = ([1, 1, 1], [3, 3, 3], [1, 1, 1]);
        Self {
            b0: Unit3d::new(&p / "b0", i, out[0], one, s1),
            b1a: Unit3d::new(&p / "b1a", i, out[1], one, s1),
            b1b: Unit3d::new(&p / "b1b", out[1], out[2], three, s1),
            b2a: Unit3d::new(&p / "b2a", i, out[3], one, s1),
            b2b: Unit3d::new(&p / "b2b", out[3], out[4], three, s1),
            b3b: Unit3d::new(&p / "b3b", i, out[5], one, s1),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let pooled = max_pool_same(x, [3, 3, 3], [1, 1, 1]);
        Tensor::cat(
            &[
                self.b0.forward(x),
                self.b1b.forward(&self.b1a.forward(x)),
                self.b2b.forward(&self.b2a.forward(x)),
                self.b3b.forward(&pooled),
            ],
            1,
        )
    }
}

/// One stage of the network, in order.
#[derive(Debug)]
enum Stage {
    Unit(Box<Unit3d>),
    Pool([i64; 3], [i64; 3]),
    Mixed(Box<Mixed>),
}

/// I3D up to its logits. Clips `(N, 3, T, H, W)` in `[-1, 1]` (1-channel
/// clips are repeated to RGB by [`I3d::prepare`]).
#[derive(Debug)]
pub struct I3d {
    vs: VarStore,
    stages: Vec<Stage>,
    logits: Unit3d,
}

impl I3d {
    /// The architecture with freshly initialised weights.
    pub fn new(device: Device) -> Self {
        let vs = VarStore::new(device);
        let r = vs.root();
        let unit =
            |name: &str, i, o, k, s| Stage::Unit(Box::new(Unit3d::new(&r / name, i, o, k, s)));
        let mixed = |name: &str, i, out| Stage::Mixed(Box::new(Mixed::new(&r / name, i, out)));
        let stages = vec![
            unit("Conv3d_1a_7x7", 3, 64, [7, 7, 7], [2, 2, 2]),
            Stage::Pool([1, 3, 3], [1, 2, 2]),
            unit("Conv3d_2b_1x1", 64, 64, [1, 1, 1], [1, 1, 1]),
            unit("Conv3d_2c_3x3", 64, 192, [3, 3, 3], [1, 1, 1]),
            Stage::Pool([1, 3, 3], [1, 2, 2]),
            mixed("Mixed_3b", 192, [64, 96, 128, 16, 32, 32]),
            mixed("Mixed_3c", 256, [128, 128, 192, 32, 96, 64]),
            Stage::Pool([3, 3, 3], [2, 2, 2]),
            mixed("Mixed_4b", 480, [192, 96, 208, 16, 48, 64]),
            mixed("Mixed_4c", 512, [160, 112, 224, 24, 64, 64]),
            mixed("Mixed_4d", 512, [128, 128, 256, 24, 64, 64]),
            mixed("Mixed_4e", 512, [112, 144, 288, 32, 64, 64]),
            mixed("Mixed_4f", 528, [256, 160, 320, 32, 128, 128]),
            Stage::Pool([2, 2, 2], [2, 2, 2]),
            mixed("Mixed_5b", 832, [256, 160, 320, 32, 128, 128]),
            mixed("Mixed_5c", 832, [384, 192, 384, 48, 128, 128]),
        ];
        let logits = Unit3d::build(
            &r / "logits",
            I3D_POOLED_DIM,
            I3D_CLASSES,
            [1, 1, 1],
            [1, 1, 1],
            false,
        );
        Self { vs, stages, logits }
    }

    /// Loads converted Kinetics-400 weights (safetensors, PyTorch-port names;
    /// BatchNorm's `num_batches_tracked` is ignored), checking every name and shape.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let net = Self::new(device);
        load_checked(&net.vs, path, &|k| k.ends_with("num_batches_tracked"))?;
        Ok(net)
    }

    /// The variables, for tests that set weights (names as in [`I3d::load`]).
    pub fn var_store(&mut self) -> &mut VarStore {
        &mut self.vs
    }

    /// The FVD protocol's input: clips `(N, C, T, H, W)` in `[-1, 1]`, `C` 1
    /// or 3, frames resized to 224×224 (bilinear, as the reference
    /// preprocessing) and grey clips repeated to RGB.
    pub fn prepare(clips: &Tensor) -> Result<Tensor> {
        check_clips(clips, &[1, 3])?;
        let s = clips.size();
        let (n, c, t) = (s[0], s[1], s[2]);
        let frames = clips.transpose(1, 2).reshape([n * t, c, s[3], s[4]]);
        let frames = if s[3] == I3D_SIZE && s[4] == I3D_SIZE {
            frames
        } else {
            frames.upsample_bilinear2d([I3D_SIZE, I3D_SIZE], false, None, None)
        };
        Ok(frames
            .view([n, t, c, I3D_SIZE, I3D_SIZE])
            .transpose(1, 2)
            .expand([n, 3, t, I3D_SIZE, I3D_SIZE], false))
    }

    /// The last Inception block's output `(N, 1024, T/8, ⌈H/32⌉, ⌈W/32⌉)`
    /// for clips `(N, 3, T, H, W)` at any size (no resizing).
    pub fn pre_pool(&self, clips: &Tensor) -> Tensor {
        let mut x = clips.to_device(self.vs.device()).to_kind(self.kind());
        for stage in &self.stages {
            x = match stage {
                Stage::Unit(u) => u.forward(&x),
                Stage::Pool(k, s) => max_pool_same(&x, *k, *s),
                Stage::Mixed(m) => m.forward(&x),
            };
        }
        x
    }

    /// Logits `(N, 400)` of clips `(N, 3, T, H, W)` already at 224×224 (the
    /// reference graph: 2×7×7 average pool with stride 1, 1×1×1 logits conv,
    /// mean over the remaining time steps).
    pub fn logits(&self, clips: &Tensor) -> Tensor {
        let x = self
            .pre_pool(clips)
            .avg_pool3d([2, 7, 7], [1, 1, 1], [0, 0, 0], false, true, None);
        let y = self.logits.forward(&x); // (N, 400, T', 1, 1)
        y.mean_dim(&[2i64, 3, 4][..], false, y.kind())
    }

    fn kind(&self) -> Kind {
        self.logits.conv.ws.kind()
    }
}

impl VideoFeatureExtractor for I3d {
    fn name(&self) -> &str {
        "i3d-kinetics400"
    }

    fn dim(&self) -> i64 {
        I3D_CLASSES
    }

    fn device(&self) -> Device {
        self.vs.device()
    }

    fn features(&self, clips: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        Ok(self.logits(&Self::prepare(clips)?).to_kind(Kind::Float))
    }
}

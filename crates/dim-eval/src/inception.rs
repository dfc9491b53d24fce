//! Inception-v3 as used for FID: the TensorFlow `2015-12-05` graph ported to
//! PyTorch (`pt_inception-2015-12-05-6726825d.pth`), returning the 2048-d
//! pool features.
//!
//! The layer names equal the PyTorch state-dict keys (`Conv2d_1a_3x3.conv.weight`,
//! `Mixed_5b.branch1x1.bn.running_mean`, ...), so a converted file loads with
//! exact name and shape checks; the `fc.*` head and `num_batches_tracked`
//! counters are ignored. Differences from torchvision's Inception-v3 that
//! the FID graph needs: average pools exclude padding, and the last block
//! (`Mixed_7c`) max-pools its pool branch. Inputs are resized to 299×299
//! (bilinear, no corner alignment) as in the reference implementation.

use std::path::Path;

use tch::nn::{self, VarStore};
use tch::{Device, Tensor};

use crate::features::{check_images, FeatureExtractor};
use crate::{EvalError, Result};

/// Conv (no bias) + batch norm (eps 1e-3) + ReLU.
#[derive(Debug)]
struct BasicConv {
    conv: nn::Conv<[i64; 2]>,
    bn: nn::BatchNorm,
}

impl BasicConv {
    fn new(p: nn::Path<'_>, cin: i64, cout: i64, k: [i64; 2], stride: i64, pad: [i64; 2]) -> Self {
        let cfg = nn::ConvConfigND::<[i64; 2]> {
            stride: [stride, stride],
            padding: pad,
            bias: false,
            ..Default::default()
        };
        let conv = nn::conv(&p / "conv", cin, cout, k, cfg);
        let bn = nn::batch_norm2d(
            &p / "bn",
            cout,
            nn::BatchNormConfig {
                eps: 1e-3,
                ..Default::default()
            },
        );
        Self { conv, bn }
    }

    fn sq(p: nn::Path<'_>, cin: i64, cout: i64, k: i64, stride: i64, pad: i64) -> Self {
        Self::new(p, cin, cout, [k, k], stride, [pad, pad])
    }

    fn fwd(&self, x: &Tensor) -> Tensor {
        x.apply(&self.conv).apply_t(&self.bn, false).relu()
    }
}

fn avg_pool(x: &Tensor) -> Tensor {
    x.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None)
}

fn max_pool_s2(x: &Tensor) -> Tensor {
    x.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false)
}

/// The kinds of mixed blocks, with their constructor arguments.
// Eleven blocks built once per network: variant sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Mixed {
    A {
        b1: BasicConv,
        b5: [BasicConv; 2],
        b3: [BasicConv; 3],
        pool: BasicConv,
    },
    B {
        b3: BasicConv,
        b3d: [BasicConv; 3],
    },
    C {
        b1: BasicConv,
        b7: [BasicConv; 3],
        b7d: [BasicConv; 5],
        pool: BasicConv,
    },
    D {
        b3: [BasicConv; 2],
        b7: [BasicConv; 4],
    },
    E {
        b1: BasicConv,
        b3_1: BasicConv,
        b3_2: [BasicConv; 2],
        b3d_1: [BasicConv; 2],
        b3d_2: [BasicConv; 2],
        pool: BasicConv,
        max_pool: bool,
    },
}

impl Mixed {
    fn a(p: &nn::Path<'_>, cin: i64, pool_features: i64) -> Self {
        Mixed::A {
            b1: BasicConv::sq(p / "branch1x1", cin, 64, 1, 1, 0),
            b5: [
                BasicConv::sq(p / "branch5x5_1", cin, 48, 1, 1, 0),
                BasicConv::sq(p / "branch5x5_2", 48, 64, 5, 1, 2),
            ],
            b3: [
                BasicConv::sq(p / "branch3x3dbl_1", cin, 64, 1, 1, 0),
                BasicConv::sq(p / "branch3x3dbl_2", 64, 96, 3, 1, 1),
                BasicConv::sq(p / "branch3x3dbl_3", 96, 96, 3, 1, 1),
            ],
            pool: BasicConv::sq(p / "branch_pool", cin, pool_features, 1, 1, 0),
        }
    }

    fn b(p: &nn::Path<'_>, cin: i64) -> Self {
        Mixed::B {
            b3: BasicConv::sq(p / "branch3x3", cin, 384, 3, 2, 0),
            b3d: [
                BasicConv::sq(p / "branch3x3dbl_1", cin, 64, 1, 1, 0),
                BasicConv::sq(p / "branch3x3dbl_2", 64, 96, 3, 1, 1),
                BasicConv::sq(p / "branch3x3dbl_3", 96, 96, 3, 2, 0),
            ],
        }
    }

    fn c(p: &nn::Path<'_>, cin: i64, c7: i64) -> Self {
        let row = |name: &str, i, o| BasicConv::new(p / name, i, o, [1, 7], 1, [0, 3]);
        let col = |name: &str, i, o| BasicConv::new(p / name, i, o, [7, 1], 1, [3, 0]);
        Mixed::C {
            b1: BasicConv::sq(p / "branch1x1", cin, 192, 1, 1, 0),
            b7: [
                BasicConv::sq(p / "branch7x7_1", cin, c7, 1, 1, 0),
                row("branch7x7_2", c7, c7),
                col("branch7x7_3", c7, 192),
            ],
            b7d: [
                BasicConv::sq(p / "branch7x7dbl_1", cin, c7, 1, 1, 0),
                col("branch7x7dbl_2", c7, c7),
                row("branch7x7dbl_3", c7, c7),
                col("branch7x7dbl_4", c7, c7),
                row("branch7x7dbl_5", c7, 192),
            ],
            pool: BasicConv::sq(p / "branch_pool", cin, 192, 1, 1, 0),
        }
    }

    fn d(p: &nn::Path<'_>, cin: i64) -> Self {
        Mixed::D {
            b3: [
                BasicConv::sq(p / "branch3x3_1", cin, 192, 1, 1, 0),
                BasicConv::sq(p / "branch3x3_2", 192, 320, 3, 2, 0),
            ],
            b7: [
                BasicConv::sq(p / "branch7x7x3_1", cin, 192, 1, 1, 0),
                BasicConv::new(p / "branch7x7x3_2", 192, 192, [1, 7], 1, [0, 3]),
                BasicConv::new(p / "branch7x7x3_3", 192, 192, [7, 1], 1, [3, 0]),
                BasicConv::sq(p / "branch7x7x3_4", 192, 192, 3, 2, 0),
            ],
        }
    }

    fn e(p: &nn::Path<'_>, cin: i64, max_pool: bool) -> Self {
        let row = |name: &str| BasicConv::new(p / name, 384, 384, [1, 3], 1, [0, 1]);
        let col = |name: &str| BasicConv::new(p / name, 384, 384, [3, 1], 1, [1, 0]);
        Mixed::E {
            b1: BasicConv::sq(p / "branch1x1", cin, 320, 1, 1, 0),
            b3_1: BasicConv::sq(p / "branch3x3_1", cin, 384, 1, 1, 0),
            b3_2: [row("branch3x3_2a"), col("branch3x3_2b")],
            b3d_1: [
                BasicConv::sq(p / "branch3x3dbl_1", cin, 448, 1, 1, 0),
                BasicConv::sq(p / "branch3x3dbl_2", 448, 384, 3, 1, 1),
            ],
            b3d_2: [row("branch3x3dbl_3a"), col("branch3x3dbl_3b")],
            pool: BasicConv::sq(p / "branch_pool", cin, 192, 1, 1, 0),
            max_pool,
        }
    }

    fn fwd(&self, x: &Tensor) -> Tensor {
        let chain = |convs: &[BasicConv], x: &Tensor| {
            convs.iter().fold(x.shallow_clone(), |h, c| c.fwd(&h))
        };
        match self {
            Mixed::A { b1, b5, b3, pool } => Tensor::cat(
                &[
                    b1.fwd(x),
                    chain(b5, x),
                    chain(b3, x),
                    pool.fwd(&avg_pool(x)),
                ],
                1,
            ),
            Mixed::B { b3, b3d } => Tensor::cat(&[b3.fwd(x), chain(b3d, x), max_pool_s2(x)], 1),
            Mixed::C { b1, b7, b7d, pool } => Tensor::cat(
                &[
                    b1.fwd(x),
                    chain(b7, x),
                    chain(b7d, x),
                    pool.fwd(&avg_pool(x)),
                ],
                1,
            ),
            Mixed::D { b3, b7 } => Tensor::cat(&[chain(b3, x), chain(b7, x), max_pool_s2(x)], 1),
            Mixed::E {
                b1,
                b3_1,
                b3_2,
                b3d_1,
                b3d_2,
                pool,
                max_pool,
            } => {
                let h3 = b3_1.fwd(x);
                let h3 = Tensor::cat(&[b3_2[0].fwd(&h3), b3_2[1].fwd(&h3)], 1);
                let hd = chain(b3d_1, x);
                let hd = Tensor::cat(&[b3d_2[0].fwd(&hd), b3d_2[1].fwd(&hd)], 1);
                let pooled = if *max_pool {
                    x.max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false)
                } else {
                    avg_pool(x)
                };
                Tensor::cat(&[b1.fwd(x), h3, hd, pool.fwd(&pooled)], 1)
            }
        }
    }
}

/// Width of the ADM evaluator's spatial (sFID) features: the first 7
/// channels of `Mixed_6d`'s 1×1 branch (`mixed_6/conv` in the TensorFlow
/// graph) at 17×17, flattened channels-last.
pub const SPATIAL_DIM: i64 = 17 * 17 * 7;

/// Number of classes of the FID Inception's `fc` head (1008, as the TF graph).
pub const LOGITS_DIM: i64 = 1008;

/// Every feature the ADM evaluator uses, for `N` images.
#[derive(Debug)]
pub struct InceptionFeatures {
    /// `(N, 2048)` pool3 features (FID, precision/recall).
    pub pool: Tensor,
    /// `(N, 2023)` spatial features (sFID).
    pub spatial: Tensor,
    /// `(N, 1008)` logits (Inception Score), when the weights have the `fc` head.
    pub logits: Option<Tensor>,
}

/// Inception-v3 FID feature network: images `(N, 1|3, H, W)` in `[-1, 1]`
/// → pool3 features `(N, 2048)`.
#[derive(Debug)]
pub struct InceptionV3 {
    vs: VarStore,
    stem: Vec<BasicConv>,
    mixed: Vec<Mixed>,
    resize: bool,
    /// The `fc` head `(2048 → 1008)` in its own store: FID needs no head, so
    /// weights converted without it still load.
    head: Option<(VarStore, nn::Linear)>,
}

impl InceptionV3 {
    /// The network with untrained weights (for tests and for writing a
    /// template file); use [`InceptionV3::load`] for FID.
    pub fn new(device: Device) -> Self {
        let vs = VarStore::new(device);
        let r = vs.root();
        let stem = vec![
            BasicConv::sq(&r / "Conv2d_1a_3x3", 3, 32, 3, 2, 0),
            BasicConv::sq(&r / "Conv2d_2a_3x3", 32, 32, 3, 1, 0),
            BasicConv::sq(&r / "Conv2d_2b_3x3", 32, 64, 3, 1, 1),
            BasicConv::sq(&r / "Conv2d_3b_1x1", 64, 80, 1, 1, 0),
            BasicConv::sq(&r / "Conv2d_4a_3x3", 80, 192, 3, 1, 0),
        ];
        let mixed = vec![
            Mixed::a(&(&r / "Mixed_5b"), 192, 32),
            Mixed::a(&(&r / "Mixed_5c"), 256, 64),
            Mixed::a(&(&r / "Mixed_5d"), 288, 64),
            Mixed::b(&(&r / "Mixed_6a"), 288),
            Mixed::c(&(&r / "Mixed_6b"), 768, 128),
            Mixed::c(&(&r / "Mixed_6c"), 768, 160),
            Mixed::c(&(&r / "Mixed_6d"), 768, 160),
            Mixed::c(&(&r / "Mixed_6e"), 768, 192),
            Mixed::d(&(&r / "Mixed_7a"), 768),
            Mixed::e(&(&r / "Mixed_7b"), 1280, false),
            Mixed::e(&(&r / "Mixed_7c"), 2048, true),
        ];
        Self {
            vs,
            stem,
            mixed,
            resize: true,
            head: None,
        }
    }

    /// Adds an `fc` head `(2048 → 1008)` with untrained weights (for tests).
    pub fn with_head(mut self) -> Self {
        let hvs = VarStore::new(self.vs.device());
        let fc = nn::linear(hvs.root() / "fc", 2048, LOGITS_DIM, Default::default());
        self.head = Some((hvs, fc));
        self
    }

    /// The `fc` head's variables (`fc.weight`, `fc.bias`), if it has one.
    pub fn head_var_store(&self) -> Option<&VarStore> {
        self.head.as_ref().map(|(v, _)| v)
    }

    /// Loads FID weights from a safetensors file with the PyTorch state-dict
    /// names (see `docs/eval.md`); every name and shape is checked.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let file = dim_io::read_all(path)?;
        let mut net = Self::new(device);
        load_tensors(&net.vs, &file, path, &|k| {
            k.starts_with("fc.") || k.ends_with(".num_batches_tracked")
        })?;
        // The head is optional (FID needs none); a file with only part of it
        // is treated as having none.
        if file.contains_key("fc.weight") && file.contains_key("fc.bias") {
            net = net.with_head();
            let (hvs, _) = net.head.as_mut().expect("just added");
            load_tensors(hvs, &file, path, &|k| !k.starts_with("fc."))?;
        }
        Ok(net)
    }

    /// Whether inputs are resized to 299×299 first (the default; the FID
    /// reference always resizes). Off only to test on small inputs quickly.
    pub fn with_resize(mut self, resize: bool) -> Self {
        self.resize = resize;
        self
    }

    /// The variables, named as in the PyTorch state dict.
    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }
}

impl FeatureExtractor for InceptionV3 {
    fn name(&self) -> &str {
        "inception-v3-fid"
    }

    fn dim(&self) -> i64 {
        2048
    }

    fn device(&self) -> Device {
        self.vs.device()
    }

    fn features(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self.trunk(images, false)?.0)
    }
}

impl InceptionV3 {
    /// Pool features `(N, 2048)` and, if `spatial`, the sFID features
    /// `(N, 2023)` of images `(N, 1|3, H, W)` in `[-1, 1]`.
    fn trunk(&self, images: &Tensor, spatial: bool) -> Result<(Tensor, Option<Tensor>)> {
        check_images(images, &[1, 3])?;
        let _guard = tch::no_grad_guard();
        let mut x = images.to_device(self.vs.device()).to_kind(tch::Kind::Float);
        if x.size()[1] == 1 {
            x = x.repeat([1, 3, 1, 1]);
        }
        if self.resize {
            // Bilinear weights sum to one, so resizing in [-1, 1] equals the
            // reference's resizing in [0, 1] followed by 2x - 1.
            x = x.upsample_bilinear2d([299, 299], false, None, None);
        }
        for (i, c) in self.stem.iter().enumerate() {
            x = c.fwd(&x);
            if i == 2 || i == 4 {
                x = max_pool_s2(&x);
            }
        }
        let mut sp = None;
        for (i, m) in self.mixed.iter().enumerate() {
            // Mixed_6d's 1x1 branch, before the block runs (it reads the same input).
            if spatial && i == 6 {
                if let Mixed::C { b1, .. } = m {
                    let s = b1.fwd(&x).narrow(1, 0, 7).permute([0, 2, 3, 1]);
                    sp = Some(s.flatten(1, -1));
                }
            }
            x = m.fwd(&x);
        }
        Ok((x.adaptive_avg_pool2d([1, 1]).flatten(1, -1), sp))
    }

    /// Pool, spatial and (with the `fc` head) logit features of images
    /// `(N, 1|3, H, W)` in `[-1, 1]`, as the ADM evaluator uses them.
    pub fn all_features(&self, images: &Tensor) -> Result<InceptionFeatures> {
        let (pool, spatial) = self.trunk(images, true)?;
        let spatial = spatial.ok_or_else(|| EvalError::Shape {
            what: "images",
            detail: "no spatial features".into(),
        })?;
        let logits = self.head.as_ref().map(|(_, fc)| {
            let _guard = tch::no_grad_guard();
            pool.apply(fc)
        });
        Ok(InceptionFeatures {
            pool,
            spatial,
            logits,
        })
    }
}

/// Loads every variable of `vs` from `file`, tensors for which `ignore` is
/// true needing none (through dim-io's one checked loader).
fn load_tensors(
    vs: &VarStore,
    file: &std::collections::HashMap<String, Tensor>,
    path: &Path,
    ignore: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let targets = vs.variables().into_iter().collect();
    dim_io::load_map(
        file,
        path,
        &targets,
        dim_io::Group::new("").ignoring(ignore),
    )?;
    Ok(())
}

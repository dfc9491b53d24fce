//! The `AutoencoderKL` network: encoder, diagonal Gaussian posterior, decoder.

use std::collections::HashMap;
use std::path::Path;

use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

use crate::{Result, VaeConfig, VaeError};

const EPS: f64 = 1e-6;

fn conv(p: nn::Path<'_>, cin: i64, cout: i64, k: i64, stride: i64, pad: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding: pad,
        ..Default::default()
    };
    nn::conv2d(p, cin, cout, k, cfg)
}

fn norm(p: nn::Path<'_>, groups: i64, c: i64) -> nn::GroupNorm {
    nn::group_norm(
        p,
        groups,
        c,
        nn::GroupNormConfig {
            eps: EPS,
            ..Default::default()
        },
    )
}

/// Pre-activation ResNet block without time embedding (diffusers'
/// `ResnetBlock2D` with `temb_channels = None`): `(N, Cin, H, W) → (N, Cout, H, W)`.
#[derive(Debug)]
struct ResnetBlock {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    shortcut: Option<nn::Conv2D>,
}

impl ResnetBlock {
    fn new(p: nn::Path<'_>, groups: i64, cin: i64, cout: i64) -> Self {
        Self {
            norm1: norm(&p / "norm1", groups, cin),
            conv1: conv(&p / "conv1", cin, cout, 3, 1, 1),
            norm2: norm(&p / "norm2", groups, cout),
            conv2: conv(&p / "conv2", cout, cout, 3, 1, 1),
            shortcut: (cin != cout).then(|| conv(&p / "conv_shortcut", cin, cout, 1, 1, 0)),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = x.apply(&self.norm1).silu().apply(&self.conv1);
        let h = h.apply(&self.norm2).silu().apply(&self.conv2);
        match &self.shortcut {
            Some(s) => x.apply(s) + h,
            None => x + h,
        }
    }
}

/// Single-head self-attention over all positions with a residual, as in the
/// VAE's mid block: `(N, C, H, W) → (N, C, H, W)`.
#[derive(Debug)]
struct Attention {
    group_norm: nn::GroupNorm,
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
}

impl Attention {
    fn new(p: nn::Path<'_>, groups: i64, c: i64) -> Self {
        let lin = |name: &str| nn::linear(&p / name, c, c, Default::default());
        Self {
            group_norm: norm(&p / "group_norm", groups, c),
            to_q: lin("to_q"),
            to_k: lin("to_k"),
            to_v: lin("to_v"),
            to_out: nn::linear(&p / "to_out" / "0", c, c, Default::default()),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
        // (N, C, H, W) → (N, 1 head, HW, C)
        let t = x
            .apply(&self.group_norm)
            .reshape([n, c, h * w])
            .transpose(1, 2)
            .unsqueeze(1);
        let (q, k, v) = (
            t.apply(&self.to_q),
            t.apply(&self.to_k),
            t.apply(&self.to_v),
        );
        let a = Tensor::scaled_dot_product_attention::<Tensor>(
            &q, &k, &v, None, 0.0, false, None, false,
        );
        let o = a.squeeze_dim(1).apply(&self.to_out);
        o.transpose(1, 2).reshape([n, c, h, w]) + x
    }
}

/// ResNet, attention, ResNet at the lowest resolution (`UNetMidBlock2D`).
#[derive(Debug)]
struct MidBlock {
    resnets: [ResnetBlock; 2],
    attention: Attention,
}

impl MidBlock {
    fn new(p: nn::Path<'_>, groups: i64, c: i64) -> Self {
        Self {
            resnets: [
                ResnetBlock::new(&p / "resnets" / "0", groups, c, c),
                ResnetBlock::new(&p / "resnets" / "1", groups, c, c),
            ],
            attention: Attention::new(&p / "attentions" / "0", groups, c),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.resnets[0].forward(x);
        let h = self.attention.forward(&h);
        self.resnets[1].forward(&h)
    }
}

/// Whether a level changes the resolution after its ResNet blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Resample {
    None,
    /// Pad right/bottom by one, 3×3 conv with stride 2.
    Down,
    /// Nearest ×2, 3×3 conv.
    Up,
}

/// One resolution level: ResNet blocks, then an optional down/upsampling conv
/// (diffusers' `DownEncoderBlock2D` / `UpDecoderBlock2D`).
#[derive(Debug)]
struct Level {
    resnets: Vec<ResnetBlock>,
    resample: Option<(Resample, nn::Conv2D)>,
}

impl Level {
    fn new(
        p: nn::Path<'_>,
        groups: i64,
        cin: i64,
        cout: i64,
        layers: i64,
        resample: Resample,
    ) -> Self {
        let resnets = (0..layers)
            .map(|j| {
                let i = if j == 0 { cin } else { cout };
                ResnetBlock::new(&p / "resnets" / j, groups, i, cout)
            })
            .collect();
        let resample = match resample {
            Resample::None => None,
            Resample::Down => Some((
                Resample::Down,
                conv(&p / "downsamplers" / "0" / "conv", cout, cout, 3, 2, 0),
            )),
            Resample::Up => Some((
                Resample::Up,
                conv(&p / "upsamplers" / "0" / "conv", cout, cout, 3, 1, 1),
            )),
        };
        Self { resnets, resample }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self
            .resnets
            .iter()
            .fold(x.shallow_clone(), |h, r| r.forward(&h));
        if let Some((kind, c)) = &self.resample {
            h = match kind {
                Resample::Down => h.constant_pad_nd([0, 1, 0, 1]).apply(c),
                Resample::Up => {
                    let s = h.size();
                    h.upsample_nearest2d([s[2] * 2, s[3] * 2], None, None)
                        .apply(c)
                }
                Resample::None => h,
            };
        }
        h
    }
}

/// conv_in → levels → mid block → GroupNorm, SiLU, conv_out.
#[derive(Debug)]
struct Coder {
    conv_in: nn::Conv2D,
    levels: Vec<Level>,
    mid: MidBlock,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
    /// The encoder runs the mid block after the levels, the decoder before.
    mid_first: bool,
}

impl Coder {
    fn encoder(p: nn::Path<'_>, cfg: &VaeConfig) -> Self {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let last = *ch.last().expect("validated: not empty");
        let levels = ch
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let cin = if i == 0 { ch[0] } else { ch[i - 1] };
                let rs = if i + 1 < ch.len() {
                    Resample::Down
                } else {
                    Resample::None
                };
                Level::new(&p / "down_blocks" / i, g, cin, c, cfg.layers_per_block, rs)
            })
            .collect();
        Self {
            conv_in: conv(&p / "conv_in", cfg.in_channels, ch[0], 3, 1, 1),
            levels,
            mid: MidBlock::new(&p / "mid_block", g, last),
            norm_out: norm(&p / "conv_norm_out", g, last),
            // Mean and log-variance.
            conv_out: conv(&p / "conv_out", last, 2 * cfg.latent_channels, 3, 1, 1),
            mid_first: false,
        }
    }

    fn decoder(p: nn::Path<'_>, cfg: &VaeConfig) -> Self {
        let rev: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let levels = rev
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let cin = if i == 0 { rev[0] } else { rev[i - 1] };
                let rs = if i + 1 < rev.len() {
                    Resample::Up
                } else {
                    Resample::None
                };
                Level::new(
                    &p / "up_blocks" / i,
                    g,
                    cin,
                    c,
                    cfg.layers_per_block + 1,
                    rs,
                )
            })
            .collect();
        let first = *rev.last().expect("validated: not empty");
        Self {
            conv_in: conv(&p / "conv_in", cfg.latent_channels, rev[0], 3, 1, 1),
            levels,
            mid: MidBlock::new(&p / "mid_block", g, rev[0]),
            norm_out: norm(&p / "conv_norm_out", g, first),
            conv_out: conv(&p / "conv_out", first, cfg.out_channels, 3, 1, 1),
            mid_first: true,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.apply(&self.conv_in);
        if self.mid_first {
            h = self.mid.forward(&h);
        }
        for l in &self.levels {
            h = l.forward(&h);
        }
        if !self.mid_first {
            h = self.mid.forward(&h);
        }
        h.apply(&self.norm_out).silu().apply(&self.conv_out)
    }
}

/// The encoder's output: a diagonal Gaussian over latents, `mean` and
/// `logvar` both `(N, latent_channels, H/f, W/f)` f32 (log-variance clamped
/// to `[-30, 20]`, as diffusers does).
#[derive(Debug)]
pub struct DiagonalGaussian {
    /// `(N, C, h, w)`.
    pub mean: Tensor,
    /// `(N, C, h, w)`.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// A draw `mean + exp(logvar / 2) · ε` with `ε` from libtorch's generator
    /// (seed it with `tch::manual_seed` for reproducible latents).
    pub fn sample(&self) -> Tensor {
        &self.mean + (&self.logvar * 0.5).exp() * self.mean.randn_like()
    }

    /// A draw with the given standard-normal noise `(N, C, h, w)`.
    pub fn sample_with(&self, noise: &Tensor) -> Tensor {
        &self.mean + (&self.logvar * 0.5).exp() * noise
    }
}

/// The SD VAE: images `(N, 3, H, W)` in `[-1, 1]` ⇄ latents
/// `(N, 4, H/8, W/8)`, with H and W multiples of 8 (of
/// [`VaeConfig::downsample`] in general).
///
/// Latents from [`AutoencoderKL::encode`] and those given to
/// [`AutoencoderKL::decode`] are raw (no scale factor); [`AutoencoderKL::scale`]
/// and [`AutoencoderKL::unscale`] convert to and from the diffusion model's
/// latents. Work runs in slices of at most `slice` images (see
/// [`AutoencoderKL::with_slice`]) so that large batches fit in memory.
#[derive(Debug)]
pub struct AutoencoderKL {
    vs: VarStore,
    encoder: Coder,
    decoder: Coder,
    quant_conv: nn::Conv2D,
    post_quant_conv: nn::Conv2D,
    cfg: VaeConfig,
    slice: i64,
}

impl AutoencoderKL {
    /// The network with untrained (random) weights, f32 on `device`.
    pub fn new(cfg: &VaeConfig, device: Device) -> Result<Self> {
        cfg.validate()?;
        let vs = VarStore::new(device);
        let r = vs.root();
        let z2 = 2 * cfg.latent_channels;
        let lc = cfg.latent_channels;
        Ok(Self {
            encoder: Coder::encoder(&r / "encoder", cfg),
            decoder: Coder::decoder(&r / "decoder", cfg),
            quant_conv: conv(&r / "quant_conv", z2, z2, 1, 1, 0),
            post_quant_conv: conv(&r / "post_quant_conv", lc, lc, 1, 1, 0),
            cfg: cfg.clone(),
            vs,
            slice: 32,
        })
    }

    /// Loads diffusers-format weights (`vae/diffusion_pytorch_model.safetensors`).
    ///
    /// Both attention key schemes are accepted: `to_q/to_k/to_v/to_out.0`
    /// and the older `query/key/value/proj_attn` (whose weights may also be
    /// stored as 1×1 convolutions). Every tensor of the network must be in
    /// the file with its shape, and the file may hold nothing else; the
    /// error names the offending keys.
    pub fn load(cfg: &VaeConfig, path: &Path, device: Device) -> Result<Self> {
        let net = Self::new(cfg, device)?;
        let file = to_current_attention_keys(dim_io::read_all(path)?);
        let targets = net.vs.variables().into_iter().collect();
        dim_io::load_map(&file, path, &targets, dim_io::Group::new(""))?;
        Ok(net)
    }

    /// Casts the weights to `kind` (`Kind::BFloat16` on GPUs); inputs are
    /// cast to it and outputs come back f32.
    pub fn to_kind(mut self, kind: Kind) -> Self {
        self.vs.set_kind(kind);
        self
    }

    /// Encodes and decodes at most `slice` images at a time (default 32).
    pub fn with_slice(mut self, slice: i64) -> Self {
        self.slice = slice.max(1);
        self
    }

    /// The architecture and scale factor.
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// The variables, named as in diffusers' state dict.
    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    fn weight_kind(&self) -> Kind {
        self.quant_conv.ws.kind()
    }

    fn check(&self, x: &Tensor, what: &'static str, channels: i64, multiple: i64) -> Result<()> {
        let s = x.size();
        if s.len() != 4 || s[1] != channels || s[2] % multiple != 0 || s[3] % multiple != 0 {
            return Err(VaeError::Shape {
                what,
                detail: format!(
                    "expected (N, {channels}, H, W) with H and W multiples of {multiple}, got {s:?}"
                ),
            });
        }
        Ok(())
    }

    /// Runs `f` on slices of at most `self.slice` rows of `x` (moved to the
    /// network's device and dtype) and concatenates the f32 results.
    fn sliced(&self, x: &Tensor, f: impl Fn(&Tensor) -> Vec<Tensor>) -> Vec<Tensor> {
        let _guard = tch::no_grad_guard();
        let n = x.size()[0];
        let mut parts: Vec<Vec<Tensor>> = Vec::new();
        for first in (0..n).step_by(self.slice as usize) {
            let xs = x
                .narrow(0, first, self.slice.min(n - first))
                .to_device(self.device())
                .to_kind(self.weight_kind());
            for (i, o) in f(&xs).into_iter().enumerate() {
                if parts.len() <= i {
                    parts.push(Vec::new());
                }
                parts[i].push(o.to_kind(Kind::Float));
            }
        }
        parts.iter().map(|p| Tensor::cat(p, 0)).collect()
    }

    /// Images `(N, in_channels, H, W)` in `[-1, 1]` → the posterior over raw
    /// latents `(N, latent_channels, H/f, W/f)`, on the network's device.
    pub fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        self.check(
            images,
            "images",
            self.cfg.in_channels,
            self.cfg.downsample(),
        )?;
        if images.size()[0] == 0 {
            return Err(VaeError::Shape {
                what: "images",
                detail: "empty batch".into(),
            });
        }
        let mut out = self.sliced(images, |x| {
            let m = self.encoder.forward(x).apply(&self.quant_conv);
            let mut c = m.chunk(2, 1);
            let logvar = c.pop().expect("two chunks").clamp(-30.0, 20.0);
            vec![c.pop().expect("two chunks"), logvar]
        });
        let logvar = out.pop().expect("two outputs");
        let mean = out.pop().expect("two outputs");
        Ok(DiagonalGaussian { mean, logvar })
    }

    /// Raw latents `(N, latent_channels, h, w)` → images
    /// `(N, out_channels, h·f, w·f)` f32 (about `[-1, 1]`, not clamped), on
    /// the network's device.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.check(latents, "latents", self.cfg.latent_channels, 1)?;
        if latents.size()[0] == 0 {
            return Err(VaeError::Shape {
                what: "latents",
                detail: "empty batch".into(),
            });
        }
        let mut out = self.sliced(latents, |z| {
            vec![self.decoder.forward(&z.apply(&self.post_quant_conv))]
        });
        Ok(out.pop().expect("one output"))
    }

    /// Raw latents → the diffusion model's latents (`· scaling_factor`).
    pub fn scale(&self, z: &Tensor) -> Tensor {
        z * self.cfg.scaling_factor
    }

    /// The diffusion model's latents → raw latents (`/ scaling_factor`).
    pub fn unscale(&self, z: &Tensor) -> Tensor {
        z / self.cfg.scaling_factor
    }
}

impl Module for AutoencoderKL {
    /// Reconstruction through the posterior mean (for quick checks).
    fn forward(&self, xs: &Tensor) -> Tensor {
        let z = self.encode(xs).expect("shape checked by the caller").mean;
        self.decode(&z).expect("encoder output fits the decoder")
    }
}

/// Renames the older diffusers attention keys (`query`, `key`, `value`,
/// `proj_attn`) to the current ones and flattens 1×1-conv-shaped attention
/// weights `(C, C, 1, 1)` to linear `(C, C)`. Other keys pass unchanged.
fn to_current_attention_keys(file: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    file.into_iter()
        .map(|(k, t)| {
            let parts: Vec<&str> = k.split('.').collect();
            let Some(a) = parts.iter().position(|p| *p == "attentions") else {
                return (k, t);
            };
            // `<...>.attentions.<i>.<layer>.<weight|bias>`
            if parts.len() != a + 4 {
                return (k, t);
            }
            let layer = match parts[a + 2] {
                "query" => "to_q",
                "key" => "to_k",
                "value" => "to_v",
                "proj_attn" => "to_out.0",
                other => other,
            };
            let t = if layer.starts_with("to_") && t.dim() == 4 {
                t.flatten(1, -1)
            } else {
                t
            };
            let mut name = parts[..a + 2].join(".");
            name.push('.');
            name.push_str(layer);
            name.push('.');
            name.push_str(parts[a + 3]);
            (name, t)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_attention_keys_are_renamed_and_flattened() {
        let mut m = HashMap::new();
        let w = Tensor::zeros([8, 8, 1, 1], (Kind::Float, Device::Cpu));
        m.insert("encoder.mid_block.attentions.0.query.weight".into(), w);
        m.insert(
            "decoder.mid_block.attentions.0.proj_attn.bias".into(),
            Tensor::zeros([8], (Kind::Float, Device::Cpu)),
        );
        m.insert(
            "decoder.mid_block.attentions.0.group_norm.weight".into(),
            Tensor::zeros([8], (Kind::Float, Device::Cpu)),
        );
        m.insert(
            "decoder.conv_in.weight".into(),
            Tensor::zeros([8, 4, 3, 3], (Kind::Float, Device::Cpu)),
        );
        let r = to_current_attention_keys(m);
        assert_eq!(
            r["encoder.mid_block.attentions.0.to_q.weight"].size(),
            [8, 8]
        );
        assert!(r.contains_key("decoder.mid_block.attentions.0.to_out.0.bias"));
        assert!(r.contains_key("decoder.mid_block.attentions.0.group_norm.weight"));
        assert_eq!(r["decoder.conv_in.weight"].size(), [8, 4, 3, 3]);
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn sd_vae_has_the_diffusers_names_and_size() {
        let vae = AutoencoderKL::new(&VaeConfig::default(), Device::Cpu).unwrap();
        let vars = vae.var_store().variables();
        let count: i64 = vars.values().map(|t| t.numel() as i64).sum();
        // 83,653,863 parameters: the published size of the SD VAE.
        assert_eq!(count, 83_653_863);
        for (name, shape) in [
            ("encoder.conv_in.weight", vec![128, 3, 3, 3]),
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                vec![256, 128, 1, 1],
            ),
            (
                "encoder.down_blocks.0.downsamplers.0.conv.weight",
                vec![128, 128, 3, 3],
            ),
            (
                "encoder.mid_block.attentions.0.to_out.0.weight",
                vec![512, 512],
            ),
            ("encoder.conv_out.weight", vec![8, 512, 3, 3]),
            ("quant_conv.weight", vec![8, 8, 1, 1]),
            ("post_quant_conv.weight", vec![4, 4, 1, 1]),
            (
                "decoder.up_blocks.2.resnets.2.conv2.weight",
                vec![256, 256, 3, 3],
            ),
            (
                "decoder.up_blocks.3.resnets.0.conv_shortcut.weight",
                vec![128, 256, 1, 1],
            ),
            (
                "decoder.up_blocks.0.upsamplers.0.conv.weight",
                vec![512, 512, 3, 3],
            ),
            ("decoder.conv_out.weight", vec![3, 128, 3, 3]),
        ] {
            assert_eq!(vars[name].size(), shape, "{name}");
        }
        assert!(!vars.contains_key("decoder.up_blocks.3.upsamplers.0.conv.weight"));
    }
}

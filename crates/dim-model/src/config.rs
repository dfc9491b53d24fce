//! [`ModelConfig`]: the typed, validated description of a DiM or DiT network,
//! read from TOML, with the paper's presets and closed-form parameter and FLOP
//! counts.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// The network sizes of the presets, shared by DiM and DiT (`configs/models/sizes.toml`).
const SIZES_TOML: &str = include_str!("../../../configs/models/sizes.toml");

/// Size of the sinusoidal timestep features fed to the timestep MLP (as DiT).
pub const TIMESTEP_FREQ_DIM: i64 = 256;

/// Which token mixer the blocks use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Diffusion Mamba: bidirectional selective-scan mixer.
    Dim,
    /// Diffusion Transformer baseline: multi-head self-attention mixer.
    Dit,
}

/// Order in which the Mamba mixer scans the tokens, layer by layer.
/// Attention does not depend on the order.
///
/// Every order scans a clip as one sequence: the state carries across rows
/// and across frames. The fused bidirectional scan also runs each order
/// backwards, so a layer links each token to both of its neighbours along
/// the order's innermost axis. An order reaches a neighbour pair only if some
/// layer puts the pair next to each other: raster order does so for
/// horizontal neighbours, column-major for vertical ones, time-major for
/// temporal ones (see docs/model.md for a picture).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TokenOrder {
    /// Raster order (row after row, frame after frame) in every layer.
    FrameMajor,
    /// Images: row after row in even layers, column after column in odd
    /// layers, as DiM alternates its scan directions: a raster scan alone
    /// reaches a vertical neighbour only a whole row later. A video model
    /// scans frame after frame in both, so temporal neighbours stay a frame apart.
    #[default]
    RowColumn,
    /// Video: layers cycle through row-major, column-major and time-major
    /// order, so every spatial and temporal neighbour is adjacent in some
    /// layer. The default of video models.
    RowColumnTime,
    /// Video: time-major in every layer (each spatial position's frames
    /// together, positions in raster order).
    Interleaved,
    /// Video: row-major in even layers, time-major in odd layers. Vertical
    /// neighbours are never adjacent; kept as an ablation of `row_column_time`.
    Alternating,
}

/// The order one layer actually uses (what [`TokenOrder`] resolves to per
/// layer): a nesting of the token grid's axes `(T, H, W)`, outermost first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerOrder {
    /// Row-major: `(T, H, W)`, frame after frame, raster inside each frame
    /// (the layout tokens keep between blocks).
    FrameMajor,
    /// Column-major: `(T, W, H)`, frame after frame, column after column.
    ColumnMajor,
    /// Time-major: `(H, W, T)`, spatial position after spatial position,
    /// each position's frames together.
    Interleaved,
}

impl TokenOrder {
    /// The order layer `layer` (0-based) scans in.
    pub fn for_layer(self, layer: usize) -> LayerOrder {
        use LayerOrder::{ColumnMajor, FrameMajor, Interleaved};
        match self {
            TokenOrder::FrameMajor => FrameMajor,
            TokenOrder::RowColumn => [FrameMajor, ColumnMajor][layer % 2],
            TokenOrder::RowColumnTime => [FrameMajor, ColumnMajor, Interleaved][layer % 3],
            TokenOrder::Interleaved => Interleaved,
            TokenOrder::Alternating => [FrameMajor, Interleaved][layer % 2],
        }
    }

    /// Whether the order only makes sense for video models (it scans along time).
    pub fn is_video_only(self) -> bool {
        matches!(
            self,
            TokenOrder::RowColumnTime | TokenOrder::Interleaved | TokenOrder::Alternating
        )
    }

    /// The name used in TOML (`row_column_time`, ...).
    pub fn name(self) -> &'static str {
        match self {
            TokenOrder::FrameMajor => "frame_major",
            TokenOrder::RowColumn => "row_column",
            TokenOrder::RowColumnTime => "row_column_time",
            TokenOrder::Interleaved => "interleaved",
            TokenOrder::Alternating => "alternating",
        }
    }
}

/// Which tokens attend to which in DiT's attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKind {
    /// Every token attends to every token of the clip (full spatio-temporal attention).
    #[default]
    Full,
    /// Video, Latte's factorised variant: even layers attend within each
    /// frame (spatial), odd layers within each spatial position across
    /// frames (temporal).
    Factorised,
}

/// The tokens one attention layer mixes (what [`AttentionKind`] resolves to per layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionSpan {
    /// All `T'·H'·W'` tokens of a clip.
    All,
    /// The `H'·W'` tokens of each frame.
    Frame,
    /// The `T'` tokens of each spatial position.
    Time,
}

impl AttentionKind {
    /// The span of layer `layer` (0-based).
    pub fn for_layer(self, layer: usize) -> AttentionSpan {
        match self {
            AttentionKind::Full => AttentionSpan::All,
            AttentionKind::Factorised => [AttentionSpan::Frame, AttentionSpan::Time][layer % 2],
        }
    }
}

/// A complete, validated network description. Serialised to TOML in full (every
/// field explicit); read with [`ModelConfig::from_toml_str`], which also
/// accepts `preset = "DiM-XL/2"` plus overrides.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelConfig {
    /// `dim` or `dit`.
    pub arch: Arch,
    /// Number of blocks.
    pub depth: i64,
    /// Token width (hidden size).
    pub width: i64,
    /// Attention heads (DiT only; kept for DiM so a config switches arch cleanly).
    pub heads: i64,
    /// MLP hidden size = `mlp_ratio · width`.
    pub mlp_ratio: i64,
    /// Spatial patch size `p`.
    pub patch: i64,
    /// Temporal patch size `pt` (tubelet depth); 1 for images.
    pub temporal_patch: i64,
    /// Input channels `C` (4 for SD-VAE latents).
    pub in_channels: i64,
    /// Training input size `(H, W)`; other sizes divisible by the patch run too.
    pub input_size: [i64; 2],
    /// Frames `T` of the training input for video models; 0 = image model.
    pub frames: i64,
    /// Number of classes; 0 = unconditional.
    pub num_classes: i64,
    /// Probability of replacing a label by the null class in training (CFG).
    pub class_dropout_prob: f64,
    /// Predict the variance interpolation too: output has `2C` channels.
    pub learn_sigma: bool,
    /// Scan order of the tokens, layer by layer (Mamba mixer only).
    pub token_order: TokenOrder,
    /// Full or factorised (Latte) attention (attention mixer only).
    pub attention: AttentionKind,
    /// SSM state size `N`.
    pub d_state: i64,
    /// Mixer inner width `E = expand · width`.
    pub expand: i64,
    /// Rank of Δ's low-rank projection.
    pub dt_rank: i64,
    /// Width of the depthwise convolution before each scan direction.
    pub d_conv: i64,
    /// Smallest Δ at initialisation.
    pub dt_min: f64,
    /// Largest Δ at initialisation.
    pub dt_max: f64,
}

/// The TOML form: every field optional, filled from `preset` or defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    preset: Option<String>,
    arch: Option<Arch>,
    depth: Option<i64>,
    width: Option<i64>,
    heads: Option<i64>,
    mlp_ratio: Option<i64>,
    patch: Option<i64>,
    temporal_patch: Option<i64>,
    in_channels: Option<i64>,
    input_size: Option<[i64; 2]>,
    frames: Option<i64>,
    num_classes: Option<i64>,
    class_dropout_prob: Option<f64>,
    learn_sigma: Option<bool>,
    token_order: Option<TokenOrder>,
    attention: Option<AttentionKind>,
    d_state: Option<i64>,
    expand: Option<i64>,
    dt_rank: Option<i64>,
    d_conv: Option<i64>,
    dt_min: Option<f64>,
    dt_max: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Size {
    depth: i64,
    width: i64,
    heads: i64,
}

/// Forward cost of one call, counted as multiply-accumulates (MACs) of the
/// matmuls, convolutions, attention products and the scan recurrence
/// (3 MACs per channel, state and token per direction); normalisation and
/// elementwise work are not counted. DiT's paper reports MACs as "Gflops"
/// (118.6 for DiT-XL/2 at 256 tokens).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlopCount {
    /// Multiply-accumulates.
    pub macs: f64,
}

impl FlopCount {
    /// Giga-MACs (the unit DiT's paper calls "Gflops").
    pub fn gmacs(&self) -> f64 {
        self.macs / 1e9
    }

    /// GFLOPs counting a multiply-accumulate as two operations.
    pub fn gflops(&self) -> f64 {
        2.0 * self.macs / 1e9
    }
}

/// Token grid of one input: `(T', H', W')` after patching, images have `T' = 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenGrid {
    /// Batch size.
    pub batch: i64,
    /// Frames after temporal patching.
    pub frames: i64,
    /// Rows after patching.
    pub rows: i64,
    /// Columns after patching.
    pub cols: i64,
}

impl TokenGrid {
    /// Sequence length `T'·H'·W'`.
    pub fn len(&self) -> i64 {
        self.frames * self.rows * self.cols
    }

    /// Whether the sequence is empty (never for a validated input).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens per frame `H'·W'`.
    pub fn spatial(&self) -> i64 {
        self.rows * self.cols
    }
}

impl ModelConfig {
    /// A named preset: `"<arch>-<size>/<patch>"`, arch `DiM` or `DiT`, size
    /// S, B, L, XL or H, patch 2, 4 or 8 (e.g. `"DiM-XL/2"`). Class-conditional
    /// ImageNet latents: 4 channels, 32×32, 1000 classes, dropout 0.1, learned sigma.
    pub fn preset(name: &str) -> Result<Self> {
        let bad = || {
            ModelError::config(format!(
                "unknown preset {name:?}: expected \"<DiM|DiT>-<S|B|L|XL|H>/<2|4|8>\", e.g. \"DiM-XL/2\""
            ))
        };
        let (arch, rest) = name.split_once('-').ok_or_else(bad)?;
        let (size, patch) = rest.split_once('/').ok_or_else(bad)?;
        let arch = match arch.to_ascii_lowercase().as_str() {
            "dim" => Arch::Dim,
            "dit" => Arch::Dit,
            _ => return Err(bad()),
        };
        let patch: i64 = patch.parse().map_err(|_| bad())?;
        if ![2, 4, 8].contains(&patch) {
            return Err(bad());
        }
        let sizes: BTreeMap<String, Size> =
            toml::from_str(SIZES_TOML).map_err(|e| ModelError::Config {
                source_name: Some("configs/models/sizes.toml".into()),
                msg: e.to_string(),
            })?;
        let size = sizes.get(&size.to_ascii_uppercase()).ok_or_else(bad)?;
        let cfg = Self {
            arch,
            depth: size.depth,
            width: size.width,
            heads: size.heads,
            mlp_ratio: 4,
            patch,
            temporal_patch: 1,
            in_channels: 4,
            input_size: [32, 32],
            frames: 0,
            num_classes: 1000,
            class_dropout_prob: 0.1,
            learn_sigma: true,
            token_order: TokenOrder::RowColumn,
            attention: AttentionKind::Full,
            d_state: 16,
            expand: 2,
            dt_rank: default_dt_rank(size.width),
            d_conv: 4,
            dt_min: 0.001,
            dt_max: 0.1,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every preset name, in size then patch order, for both architectures.
    pub fn preset_names() -> Vec<String> {
        let mut names = Vec::new();
        for arch in ["DiM", "DiT"] {
            for size in ["S", "B", "L", "XL", "H"] {
                for patch in [2, 4, 8] {
                    names.push(format!("{arch}-{size}/{patch}"));
                }
            }
        }
        names
    }

    /// Parses and validates a TOML config. `preset = "DiM-XL/2"` starts from a
    /// preset; without it `arch`, `depth`, `width` and `patch` are required.
    /// Any other key overrides; unknown keys are errors.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ModelError::config(e.to_string()))?;
        Self::from_raw(raw)
    }

    /// [`Self::from_toml_str`] on a file; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text).map_err(|e| match e {
            ModelError::Config { msg, .. } => ModelError::Config {
                source_name: Some(path.display().to_string()),
                msg,
            },
            other => other,
        })
    }

    /// The full config as TOML (every field explicit).
    pub fn to_toml_string(&self) -> String {
        // Serialising a plain struct of numbers, bools and enums cannot fail.
        toml::to_string(self).unwrap_or_else(|e| format!("# unserialisable config: {e}"))
    }

    fn from_raw(raw: RawConfig) -> Result<Self> {
        let base = match &raw.preset {
            Some(name) => Some(Self::preset(name)?),
            None => None,
        };
        let need = |name: &str| {
            ModelError::config(format!("`{name}` is required when no `preset` is given"))
        };
        let width = match raw.width.or(base.as_ref().map(|b| b.width)) {
            Some(w) => w,
            None => return Err(need("width")),
        };
        let dflt =
            |get: fn(&Self) -> i64, fallback: i64| base.as_ref().map(get).unwrap_or(fallback);
        // dt_rank follows the width unless set: a preset with a new width gets ⌈width/16⌉.
        let dt_rank = raw.dt_rank.unwrap_or(match (&base, raw.width) {
            (Some(b), None) => b.dt_rank,
            _ => default_dt_rank(width),
        });
        let frames = raw.frames.unwrap_or(0);
        let cfg = Self {
            arch: raw
                .arch
                .or(base.as_ref().map(|b| b.arch))
                .ok_or_else(|| need("arch"))?,
            depth: raw
                .depth
                .or(base.as_ref().map(|b| b.depth))
                .ok_or_else(|| need("depth"))?,
            width,
            heads: raw.heads.unwrap_or(dflt(|b| b.heads, (width / 64).max(1))),
            mlp_ratio: raw.mlp_ratio.unwrap_or(4),
            patch: raw
                .patch
                .or(base.as_ref().map(|b| b.patch))
                .ok_or_else(|| need("patch"))?,
            temporal_patch: raw.temporal_patch.unwrap_or(1),
            in_channels: raw.in_channels.unwrap_or(4),
            input_size: raw.input_size.unwrap_or([32, 32]),
            frames,
            num_classes: raw.num_classes.unwrap_or(dflt(|b| b.num_classes, 0)),
            class_dropout_prob: raw
                .class_dropout_prob
                .unwrap_or(base.as_ref().map_or(0.0, |b| b.class_dropout_prob)),
            learn_sigma: raw.learn_sigma.unwrap_or(true),
            // Video models default to the order that reaches every neighbour.
            token_order: raw.token_order.unwrap_or(if frames > 0 {
                TokenOrder::RowColumnTime
            } else {
                TokenOrder::RowColumn
            }),
            attention: raw.attention.unwrap_or_default(),
            d_state: raw.d_state.unwrap_or(16),
            expand: raw.expand.unwrap_or(2),
            dt_rank,
            d_conv: raw.d_conv.unwrap_or(4),
            dt_min: raw.dt_min.unwrap_or(0.001),
            dt_max: raw.dt_max.unwrap_or(0.1),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every field; the error names the key and the constraint.
    pub fn validate(&self) -> Result<()> {
        let err = |msg: String| Err(ModelError::config(msg));
        let positive = [
            ("depth", self.depth),
            ("width", self.width),
            ("heads", self.heads),
            ("mlp_ratio", self.mlp_ratio),
            ("patch", self.patch),
            ("temporal_patch", self.temporal_patch),
            ("in_channels", self.in_channels),
            ("d_state", self.d_state),
            ("expand", self.expand),
            ("dt_rank", self.dt_rank),
            ("d_conv", self.d_conv),
        ];
        for (key, v) in positive {
            if v < 1 {
                return err(format!("`{key}` = {v}, must be at least 1"));
            }
        }
        if self.width % 4 != 0 {
            return err(format!(
                "`width` = {}, must be a multiple of 4 (sin-cos position embeddings)",
                self.width
            ));
        }
        if self.arch == Arch::Dit && self.width % self.heads != 0 {
            return err(format!(
                "`heads` = {} does not divide `width` = {}",
                self.heads, self.width
            ));
        }
        for (i, s) in self.input_size.iter().enumerate() {
            if *s < 1 || s % self.patch != 0 {
                return err(format!(
                    "`input_size[{i}]` = {s}, must be a positive multiple of `patch` = {}",
                    self.patch
                ));
            }
        }
        // Keys where 0 switches a feature off: (key, value, what 0 means).
        let zero_or_positive = [
            ("frames", self.frames, "images"),
            ("num_classes", self.num_classes, "unconditional"),
        ];
        for (key, v, zero) in zero_or_positive {
            if v < 0 {
                return err(format!("`{key}` = {v}, must be 0 ({zero}) or positive"));
            }
        }
        if self.frames == 0 && self.temporal_patch != 1 {
            return err(format!(
                "`temporal_patch` = {} but `frames` = 0 (an image model): set frames or temporal_patch = 1",
                self.temporal_patch
            ));
        }
        if !self.is_video() && self.token_order.is_video_only() {
            return err(format!(
                "`token_order` = \"{}\" scans along time, but `frames` = 0 (an image model): use \"row_column\" or \"frame_major\", or set `frames`",
                self.token_order.name()
            ));
        }
        if !self.is_video() && self.attention == AttentionKind::Factorised {
            return err(
                "`attention` = \"factorised\" splits frames from time, but `frames` = 0 (an image model): use \"full\", or set `frames`".into(),
            );
        }
        if self.frames > 0 && self.width < 16 {
            return err(format!(
                "`width` = {}: video models need at least 16 (4·⌊width/16⌋ channels encode the frame)",
                self.width
            ));
        }
        if self.frames > 0 && self.frames % self.temporal_patch != 0 {
            return err(format!(
                "`frames` = {} is not a multiple of `temporal_patch` = {}",
                self.frames, self.temporal_patch
            ));
        }
        if !(0.0..1.0).contains(&self.class_dropout_prob) {
            return err(format!(
                "`class_dropout_prob` = {}, must be in [0, 1)",
                self.class_dropout_prob
            ));
        }
        if self.num_classes == 0 && self.class_dropout_prob != 0.0 {
            return err(format!(
                "`class_dropout_prob` = {} but `num_classes` = 0 (unconditional): set it to 0",
                self.class_dropout_prob
            ));
        }
        if !(self.dt_min > 0.0 && self.dt_max >= self.dt_min) {
            return err(format!(
                "`dt_min` = {} and `dt_max` = {}: need 0 < dt_min <= dt_max",
                self.dt_min, self.dt_max
            ));
        }
        Ok(())
    }

    /// Whether this is a video model (inputs `(B, C, T, H, W)`).
    pub fn is_video(&self) -> bool {
        self.frames > 0
    }

    /// Output channels: `2C` with learned sigma (ε then v), else `C`.
    pub fn out_channels(&self) -> i64 {
        if self.learn_sigma {
            2 * self.in_channels
        } else {
            self.in_channels
        }
    }

    /// Values per token of a patch: `pt · p · p`.
    pub fn patch_volume(&self) -> i64 {
        self.temporal_patch * self.patch * self.patch
    }

    /// Mixer inner width `E = expand · width`.
    pub fn inner_width(&self) -> i64 {
        self.expand * self.width
    }

    /// MLP hidden width.
    pub fn mlp_width(&self) -> i64 {
        self.mlp_ratio * self.width
    }

    /// Rows of the label table: the classes plus a null class when labels are dropped.
    pub fn label_rows(&self) -> i64 {
        if self.num_classes == 0 {
            0
        } else {
            self.num_classes + i64::from(self.class_dropout_prob > 0.0)
        }
    }

    /// The token grid of an input of shape `(B, C, H, W)` (image model) or
    /// `(B, C, T, H, W)` (video model), checking channels and divisibility.
    pub fn token_grid(&self, shape: &[i64]) -> Result<TokenGrid> {
        let (batch, c, t, h, w) = match (self.is_video(), shape) {
            (false, &[b, c, h, w]) => (b, c, 1, h, w),
            (true, &[b, c, t, h, w]) => (b, c, t, h, w),
            (video, _) => {
                return Err(ModelError::input(
                    "x",
                    format!(
                        "shape {shape:?}, expected {} for this {} model",
                        if video {
                            "(B, C, T, H, W)"
                        } else {
                            "(B, C, H, W)"
                        },
                        if video { "video" } else { "image" }
                    ),
                ))
            }
        };
        if c != self.in_channels {
            return Err(ModelError::input(
                "x",
                format!(
                    "shape {shape:?} has {c} channels, the model takes {}",
                    self.in_channels
                ),
            ));
        }
        let (p, pt) = (self.patch, self.temporal_patch);
        if batch < 1 || t < 1 || h < p || w < p || h % p != 0 || w % p != 0 || t % pt != 0 {
            return Err(ModelError::input(
                "x",
                format!(
                    "shape {shape:?}: batch must be positive, H and W positive multiples of patch {p}{}",
                    if self.is_video() {
                        format!(", T a positive multiple of temporal_patch {pt}")
                    } else {
                        String::new()
                    }
                ),
            ));
        }
        Ok(TokenGrid {
            batch,
            frames: t / pt,
            rows: h / p,
            cols: w / p,
        })
    }

    /// Trainable parameters of one block, in closed form.
    pub fn block_param_count(&self) -> i64 {
        let w = self.width;
        let ada_ln = w * 6 * w + 6 * w;
        let mlp = w * self.mlp_width() + self.mlp_width() + self.mlp_width() * w + w;
        let mixer = match self.arch {
            Arch::Dit => w * 3 * w + 3 * w + w * w + w,
            Arch::Dim => {
                let (e, n, r, k) = (self.inner_width(), self.d_state, self.dt_rank, self.d_conv);
                let per_direction = e * k + e + e * (r + 2 * n) + r * e + e + e * n + e;
                w * 2 * e + 2 * per_direction + e * w
            }
        };
        ada_ln + mlp + mixer
    }

    /// Trainable parameters of the whole network, in closed form (the fixed
    /// sin-cos position embeddings are not parameters).
    pub fn param_count(&self) -> i64 {
        let w = self.width;
        let out = self.patch_volume() * self.out_channels();
        let x_embed = self.in_channels * self.patch_volume() * w + w;
        let t_embed = TIMESTEP_FREQ_DIM * w + w + w * w + w;
        let y_embed = self.label_rows() * w;
        let final_layer = w * 2 * w + 2 * w + w * out + out;
        x_embed + t_embed + y_embed + self.depth * self.block_param_count() + final_layer
    }

    /// Forward cost for an input of shape `(B, C, H, W)` or `(B, C, T, H, W)`
    /// (see [`FlopCount`] for what is counted).
    pub fn flops(&self, input_shape: &[i64]) -> Result<FlopCount> {
        let g = self.token_grid(input_shape)?;
        let (l, w) = (g.len() as f64, self.width as f64);
        let out = (self.patch_volume() * self.out_channels()) as f64;
        let hidden = self.mlp_width() as f64;
        let mixer = |layer: usize| match self.arch {
            Arch::Dit => {
                let span = match self.attention.for_layer(layer) {
                    AttentionSpan::All => l,
                    AttentionSpan::Frame => g.spatial() as f64,
                    AttentionSpan::Time => g.frames as f64,
                };
                l * 4.0 * w * w + 2.0 * l * span * w
            }
            Arch::Dim => {
                let (e, n, r, k) = (
                    self.inner_width() as f64,
                    self.d_state as f64,
                    self.dt_rank as f64,
                    self.d_conv as f64,
                );
                let per_direction = k * e + e * (r + 2.0 * n) + r * e + 3.0 * e * n;
                l * (2.0 * e * w + 2.0 * per_direction + e * w)
            }
        };
        let blocks: f64 = (0..self.depth as usize)
            .map(|layer| w * 6.0 * w + l * 2.0 * w * hidden + mixer(layer))
            .sum();
        let per_sample = l * (self.in_channels * self.patch_volume()) as f64 * w
            + TIMESTEP_FREQ_DIM as f64 * w
            + w * w
            + blocks
            + w * 2.0 * w
            + l * w * out;
        Ok(FlopCount {
            macs: per_sample * g.batch as f64,
        })
    }
}

fn default_dt_rank(width: i64) -> i64 {
    (width + 15) / 16
}

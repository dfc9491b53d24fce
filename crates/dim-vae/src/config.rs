//! The architecture and scale of an `AutoencoderKL`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Result, VaeError};

/// Shape of an `AutoencoderKL` (diffusers' config names) plus its latent
/// scale factor. The default is the SD VAE (`sd-vae-ft-ema`/`-mse`):
/// channels 128/256/512/512, 2 ResNet blocks per level in the encoder (3 in
/// the decoder), GroupNorm(32, eps 1e-6), 4 latent channels, 8× downsampling,
/// scale 0.18215.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VaeConfig {
    /// Image channels (3).
    pub in_channels: i64,
    /// Decoded image channels (3).
    pub out_channels: i64,
    /// Latent channels (4).
    pub latent_channels: i64,
    /// Channels of each resolution level; `len - 1` halvings of H and W.
    pub block_out_channels: Vec<i64>,
    /// ResNet blocks per encoder level (the decoder has one more).
    pub layers_per_block: i64,
    /// GroupNorm groups (32).
    pub norm_num_groups: i64,
    /// Latents are `scaling_factor · z` for the diffusion model (0.18215).
    pub scaling_factor: f64,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
        }
    }
}

/// The keys of a diffusers `vae/config.json` that this implementation reads;
/// the others (`_class_name`, `sample_size`, ...) do not change the network.
#[derive(Debug, Deserialize)]
struct DiffusersJson {
    in_channels: Option<i64>,
    out_channels: Option<i64>,
    latent_channels: Option<i64>,
    block_out_channels: Option<Vec<i64>>,
    layers_per_block: Option<i64>,
    norm_num_groups: Option<i64>,
    scaling_factor: Option<f64>,
    act_fn: Option<String>,
    down_block_types: Option<Vec<String>>,
    up_block_types: Option<Vec<String>>,
    use_quant_conv: Option<bool>,
    use_post_quant_conv: Option<bool>,
    mid_block_add_attention: Option<bool>,
}

impl VaeConfig {
    /// Downsampling factor of the latents (8 for the SD VAE).
    pub fn downsample(&self) -> i64 {
        1 << (self.block_out_channels.len().max(1) - 1)
    }

    /// Checks that the numbers describe a buildable network.
    pub fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(VaeError::Config(s));
        if self.block_out_channels.is_empty() {
            return bad("block_out_channels is empty".into());
        }
        for &c in &self.block_out_channels {
            if c <= 0 || c % self.norm_num_groups.max(1) != 0 {
                return bad(format!(
                    "block_out_channels {:?}: each must be a positive multiple of norm_num_groups = {}",
                    self.block_out_channels, self.norm_num_groups
                ));
            }
        }
        if self.in_channels <= 0 || self.out_channels <= 0 || self.latent_channels <= 0 {
            return bad("in_channels, out_channels and latent_channels must be positive".into());
        }
        if self.layers_per_block < 1 {
            return bad(format!(
                "layers_per_block = {}: need at least 1",
                self.layers_per_block
            ));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return bad(format!(
                "scaling_factor = {}: must be a positive number",
                self.scaling_factor
            ));
        }
        Ok(())
    }

    /// Reads a diffusers `config.json` (the one next to the weights in the
    /// `vae/` folder of a Hugging Face repository). Variants this code does
    /// not implement (other block types, no quant convs, no mid attention,
    /// another activation) are refused by name.
    pub fn from_diffusers_json(path: &Path) -> Result<Self> {
        let err = |detail: String| VaeError::ConfigFile {
            path: path.to_path_buf(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let j: DiffusersJson =
            serde_json::from_str(&text).map_err(|e| err(format!("not a VAE config: {e}")))?;
        if let Some(a) = &j.act_fn {
            if a != "silu" {
                return Err(err(format!("act_fn = {a:?}: only \"silu\" is implemented")));
            }
        }
        for (name, types, want) in [
            (
                "down_block_types",
                &j.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &j.up_block_types, "UpDecoderBlock2D"),
        ] {
            if let Some(t) = types {
                if t.iter().any(|b| b != want) {
                    return Err(err(format!("{name} = {t:?}: only {want} is implemented")));
                }
            }
        }
        for (name, v) in [
            ("use_quant_conv", j.use_quant_conv),
            ("use_post_quant_conv", j.use_post_quant_conv),
            ("mid_block_add_attention", j.mid_block_add_attention),
        ] {
            if v == Some(false) {
                return Err(err(format!("{name} = false: not implemented")));
            }
        }
        let d = Self::default();
        let cfg = Self {
            in_channels: j.in_channels.unwrap_or(d.in_channels),
            out_channels: j.out_channels.unwrap_or(d.out_channels),
            latent_channels: j.latent_channels.unwrap_or(d.latent_channels),
            block_out_channels: j.block_out_channels.unwrap_or(d.block_out_channels),
            layers_per_block: j.layers_per_block.unwrap_or(d.layers_per_block),
            norm_num_groups: j.norm_num_groups.unwrap_or(d.norm_num_groups),
            scaling_factor: j.scaling_factor.unwrap_or(d.scaling_factor),
        };
        cfg.validate().map_err(|e| err(e.to_string()))?;
        Ok(cfg)
    }
}

//! The DiM network (Diffusion Mamba: DiT's diffusion backbone with
//! self-attention replaced by a bidirectional selective-state-space scan) and
//! a DiT baseline built from the same parts, on tch, for images and video.
//!
//! - [`ModelConfig`]: typed config read from TOML, presets `"DiM-XL/2"`,
//!   `"DiT-B/4"`, …, closed-form [`ModelConfig::param_count`] and
//!   [`ModelConfig::flops`].
//! - [`Model`]: `Model::new(vs.root(), &cfg)?`, then
//!   `model.forward(&x, &t, y, train)?` with `x (B, C, H, W)` or
//!   `(B, C, T, H, W)`, `t (B)`, `y (B)` → `(B, C_out, …)`; the network is in
//!   one file, [`network`].
//! - [`save_checkpoint`] / [`load_checkpoint`]: the one checkpoint format
//!   (also written by `dim train`), see [`checkpoint`].
//!
//! Mixed precision (bf16 autocast, TF32) is switched through
//! `dim_scan::device`.
//!
//! See `docs/model.md`.

pub mod checkpoint;
mod config;
mod error;
pub mod network;
pub mod optim;

pub use checkpoint::{
    load_checkpoint, load_weights, open_checkpoint, save_checkpoint, write_checkpoint, Checkpoint,
    CheckpointFile,
};
pub use config::{
    Arch, AttentionKind, AttentionSpan, FlopCount, LayerOrder, ModelConfig, TokenGrid, TokenOrder,
    TIMESTEP_FREQ_DIM,
};
pub use error::{ModelError, Result};
pub use network::Model;

//! Tensor files of diffusion-mamba: safetensors, streamed both ways.
//!
//! - [`save`]: writes named tensors one at a time (each copied to the host
//!   alone), to a temporary file that is synced and renamed: a file is there
//!   complete or not at all, and the peak memory is one tensor, not a second
//!   copy of all of them.
//! - [`save_bytes`]: the same writer for data already in bytes (the latent
//!   cache's shards, dataset caches).
//! - [`TensorFile`]: opens a file, checks its header against its length, and
//!   reads tensors (or byte ranges of one) on request.
//! - [`load_checked`] / [`load_into`]: the one weight loader: every target
//!   must be in the file with its shape, every tensor of the file (group) must
//!   have a target, and the error lists what differs. Used for training
//!   checkpoints, `dim_model` checkpoints, the VAE, Inception and the
//!   classifier.

mod checked;
mod error;
mod file;

pub use checked::{load_checked, load_into, load_map, read_all, Group};
pub use error::{IoError, Result};
pub use file::{
    dtype_of, is_temporary, kind_of, save, save_bytes, RawTensor, TensorFile, TensorMeta,
};

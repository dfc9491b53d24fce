//! Image and video datasets with fast, resumable loaders for diffusion
//! training.
//!
//! * Sources implement [`Dataset`]: [`IdxDataset`] (MNIST / Fashion-MNIST),
//!   [`ImageFolder`], [`ArrayDataset`] (`.npy`, safetensors), [`VideoDataset`]
//!   (video files, frame folders, UCF-101), [`MovingFashionMnist`] and
//!   [`LatentDataset`] (with [`LatentWriter`] to build the cache).
//! * [`Transformed`] applies [`Transform`]s (ADM centre crop, flip, pad);
//!   pixels end up `f32` in `[-1, 1]`, `(C, H, W)` or `(C, T, H, W)`.
//! * [`Loader`] batches any dataset with worker threads, deterministic
//!   shuffles, exact resume ([`LoaderState`]) and rank sharding.
//! * [`DataConfig`] builds a dataset from the `[data]` TOML table.
//!
//! See `docs/data.md` for the user guide.

pub mod error;
pub use dim_rng as rng;

mod arrays;
mod config;
mod dataset;
mod decode;
#[cfg(feature = "video")]
mod ffmpeg;
#[cfg(not(feature = "video"))]
#[path = "ffmpeg_off.rs"]
mod ffmpeg;
mod files;
mod frames;
mod idx;
mod image_folder;
mod latents;
mod loader;
mod moving;
pub mod video;

pub use arrays::ArrayDataset;
pub use config::{
    DataConfig, FashionMnistConfig, ImageFileConfig, ImageFolderConfig, LatentsConfig,
    MovingFashionMnistConfig, SafetensorsConfig, Ucf101Config, VideoFolderConfig,
};
pub use dataset::{Dataset, RawSample, Sample, Transformed};
pub use error::{DataError, Result};
pub use frames::{Filter, Frames, Transform};
pub use idx::{fashion_mnist_dir, IdxDataset, Split, FASHION_MNIST_DIR};
pub use image_folder::{decode_rgb, ImageFolder};
pub use latents::{
    begin_cache, finish_cache, shard_file_name, shard_len, LatentDataset, LatentIndex,
    LatentWriter, ShardInfo, ShardWriter, LATENT_INDEX, LATENT_PROGRESS,
};
pub use loader::{
    sample_seed, Batch, EpochBatches, ErrorPolicy, Loader, LoaderConfig, LoaderState,
};
pub use moving::{default_cache_path, MovingConfig, MovingFashionMnist};
pub use video::{ClipSampling, ClipSource, ClipStart, DecodeOptions, VideoDataset, VideoInfo};

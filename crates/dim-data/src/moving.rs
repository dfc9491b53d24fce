//! Moving Fashion-MNIST: Fashion-MNIST items bouncing in a canvas, the
//! default video dataset (its source installs with the project).
//!
//! Clip `i` is a pure function of (`seed`, `i`) and the source images, drawn
//! with the crate's portable generator, so it is identical on every machine
//! and can be cached to disk once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dim_io::{save_bytes, RawTensor, TensorFile};
use safetensors::Dtype;

use serde::{Deserialize, Serialize};

use crate::dataset::{check_index, Dataset, RawSample};
use crate::error::{DataError, Result};
use crate::frames::Frames;
use crate::idx::IdxDataset;
use crate::rng::{derive, Rng};

/// Generator settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MovingConfig {
    /// Number of clips.
    pub len: usize,
    /// Frames per clip (T).
    pub frames: usize,
    /// Canvas side in pixels (square).
    pub canvas: usize,
    /// Items per clip.
    pub items: usize,
    /// Seed of item choice, positions and velocities.
    pub seed: u64,
    /// Slowest speed, pixels per frame.
    pub min_speed: f64,
    /// Fastest speed, pixels per frame.
    pub max_speed: f64,
}

impl Default for MovingConfig {
    fn default() -> Self {
        Self {
            len: 10_000,
            frames: 16,
            canvas: 64,
            items: 2,
            seed: 0,
            min_speed: 2.0,
            max_speed: 4.0,
        }
    }
}

impl MovingConfig {
    /// Checks the settings for items of `item`×`item` pixels; errors name
    /// keys under `prefix`.
    pub fn validate(&self, prefix: &str, item: usize) -> Result<()> {
        let key = |k: &str| format!("{prefix}.{k}");
        DataError::require_counts(
            prefix,
            &[
                ("len", self.len),
                ("frames", self.frames),
                ("items", self.items),
            ],
        )?;
        if self.canvas < item {
            return Err(DataError::config(
                key("canvas"),
                format!("{} is smaller than the {item}-pixel items", self.canvas),
            ));
        }
        if !(self.min_speed >= 0.0
            && self.max_speed >= self.min_speed
            && self.max_speed.is_finite())
        {
            return Err(DataError::config(
                key("max_speed"),
                format!(
                    "need 0 <= min_speed <= max_speed, got {} and {}",
                    self.min_speed, self.max_speed
                ),
            ));
        }
        Ok(())
    }
}

/// Clips `(1, T, canvas, canvas)`; the label is the class of the first item
/// (the others are random and unlabelled).
#[derive(Debug)]
pub struct MovingFashionMnist {
    config: MovingConfig,
    source: IdxDataset,
    /// Clips loaded from a cache file: `(N, T, H, W)` bytes and labels.
    cached: Option<(Vec<u8>, Vec<i64>)>,
}

impl MovingFashionMnist {
    /// A generator over `source` (Fashion-MNIST train set, labelled).
    pub fn new(source: IdxDataset, config: MovingConfig) -> Result<Self> {
        config.validate("data", source.image_size().0.max(source.image_size().1))?;
        if source.label(0).is_none() {
            return Err(DataError::config(
                "data",
                "Moving Fashion-MNIST needs a labelled source",
            ));
        }
        Ok(Self {
            config,
            source,
            cached: None,
        })
    }

    /// Like [`MovingFashionMnist::new`], but serves clips from `cache`
    /// (safetensors), generating and writing it first if it does not exist.
    /// A cache written with other settings is an error.
    pub fn with_cache(
        source: IdxDataset,
        config: MovingConfig,
        cache: impl AsRef<Path>,
    ) -> Result<Self> {
        let mut me = Self::new(source, config)?;
        let cache = cache.as_ref();
        if !cache.exists() {
            me.write_cache(cache)?;
        }
        me.cached = Some(me.read_cache(cache)?);
        Ok(me)
    }

    /// The settings.
    pub fn config(&self) -> &MovingConfig {
        &self.config
    }

    fn config_tag(&self) -> String {
        serde_json::to_string(&self.config).expect("plain struct")
    }

    /// Generates clip `index`: `(T, canvas, canvas, 1)` bytes and its label.
    pub fn generate(&self, index: usize) -> (Frames, i64) {
        let c = &self.config;
        let (ih, iw) = self.source.image_size();
        let (limx, limy) = ((c.canvas - iw) as f64, (c.canvas - ih) as f64);
        let mut rng = Rng::new(derive(c.seed, &[index as u64]));
        let mut data = vec![0u8; c.frames * c.canvas * c.canvas];
        let mut label = 0;
        for item in 0..c.items {
            let src = rng.below(self.source.len() as u64) as usize;
            if item == 0 {
                label = self.source.label(src).expect("labelled source");
            }
            let pixels = self.source.pixels(src);
            let (mut x, mut y) = (rng.uniform() * limx, rng.uniform() * limy);
            let angle = rng.uniform() * std::f64::consts::TAU;
            let speed = c.min_speed + rng.uniform() * (c.max_speed - c.min_speed);
            let (mut vx, mut vy) = (speed * angle.cos(), speed * angle.sin());
            for t in 0..c.frames {
                let (px, py) = (x.round() as usize, y.round() as usize);
                let frame = &mut data[t * c.canvas * c.canvas..(t + 1) * c.canvas * c.canvas];
                for r in 0..ih {
                    for q in 0..iw {
                        let d = &mut frame[(py + r) * c.canvas + px + q];
                        // Overlaps keep the brighter pixel, as Moving MNIST does.
                        *d = (*d).max(pixels[r * iw + q]);
                    }
                }
                (x, vx) = bounce(x + vx, vx, limx);
                (y, vy) = bounce(y + vy, vy, limy);
            }
        }
        (Frames::clip(c.frames, c.canvas, c.canvas, 1, data), label)
    }

    /// Generates every clip and writes them to `path` as safetensors:
    /// `videos` u8 `(N, T, H, W)`, `labels` i64 `(N)`, and the settings in
    /// the metadata.
    pub fn write_cache(&self, path: &Path) -> Result<()> {
        let c = &self.config;
        let clip = c.frames * c.canvas * c.canvas;
        let mut videos = Vec::with_capacity(c.len * clip);
        let mut labels = Vec::with_capacity(c.len * 8);
        for i in 0..c.len {
            let (f, y) = self.generate(i);
            videos.extend_from_slice(&f.data);
            labels.extend_from_slice(&y.to_le_bytes());
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        }
        let meta = BTreeMap::from([("moving_fashion_mnist".to_string(), self.config_tag())]);
        save_bytes(
            path,
            &[
                RawTensor {
                    name: "videos",
                    dtype: Dtype::U8,
                    shape: &[c.len, c.frames, c.canvas, c.canvas],
                    bytes: &videos,
                },
                RawTensor {
                    name: "labels",
                    dtype: Dtype::I64,
                    shape: &[c.len],
                    bytes: &labels,
                },
            ],
            &meta,
        )?;
        tracing::info!(path = %path.display(), clips = c.len, "wrote Moving Fashion-MNIST cache");
        Ok(())
    }

    fn read_cache(&self, path: &Path) -> Result<(Vec<u8>, Vec<i64>)> {
        let file = TensorFile::open(path)?;
        let tag = file.metadata().get("moving_fashion_mnist");
        if tag != Some(&self.config_tag()) {
            return Err(DataError::corrupt(
                path,
                format!(
                    "cache was written with settings {} but {} are asked for; delete it to regenerate",
                    tag.map_or("(none)", String::as_str),
                    self.config_tag()
                ),
            ));
        }
        let videos = file.read_bytes("videos")?;
        let labels: Vec<i64> = file
            .read_bytes("labels")?
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        let c = &self.config;
        if videos.len() != c.len * c.frames * c.canvas * c.canvas || labels.len() != c.len {
            return Err(DataError::corrupt(
                path,
                "cache tensors do not match its settings",
            ));
        }
        Ok((videos, labels))
    }
}

/// Reflects a coordinate off the walls `0` and `lim`.
fn bounce(mut p: f64, mut v: f64, lim: f64) -> (f64, f64) {
    if lim <= 0.0 {
        return (0.0, v);
    }
    // A loop, not one reflection: with speeds above the free span an item
    // could otherwise leave the canvas.
    while !(0.0..=lim).contains(&p) {
        if p < 0.0 {
            p = -p;
        } else {
            p = 2.0 * lim - p;
        }
        v = -v;
    }
    (p, v)
}

impl Dataset for MovingFashionMnist {
    fn len(&self) -> usize {
        self.config.len
    }

    fn get_raw(&self, index: usize, _seed: u64) -> Result<RawSample> {
        check_index(index, self.config.len)?;
        let (frames, label) = match &self.cached {
            Some((videos, labels)) => {
                let c = &self.config;
                let k = c.frames * c.canvas * c.canvas;
                let data = videos[index * k..(index + 1) * k].to_vec();
                (
                    Frames::clip(c.frames, c.canvas, c.canvas, 1, data),
                    labels[index],
                )
            }
            None => self.generate(index),
        };
        Ok(RawSample {
            frames,
            label: Some(label),
        })
    }

    fn num_classes(&self) -> Option<usize> {
        self.source.num_classes()
    }

    fn describe(&self) -> String {
        format!(
            "Moving Fashion-MNIST ({} clips of {} frames)",
            self.config.len, self.config.frames
        )
    }
}

/// Where a cache for `config` goes by default under `dir`.
pub fn default_cache_path(dir: &Path, config: &MovingConfig) -> PathBuf {
    dir.join(format!(
        "moving-fmnist-n{}-t{}-c{}-k{}-s{}.safetensors",
        config.len, config.frames, config.canvas, config.items, config.seed
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounce_reflects_and_stays_inside() {
        assert_eq!(bounce(-1.5, -2.0, 10.0), (1.5, 2.0));
        assert_eq!(bounce(11.0, 3.0, 10.0), (9.0, -3.0));
        assert_eq!(bounce(5.0, 1.0, 10.0), (5.0, 1.0));
        let (p, _) = bounce(27.0, 27.0, 10.0);
        assert!((0.0..=10.0).contains(&p));
    }
}

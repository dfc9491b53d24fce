//! The [`Dataset`] trait every source implements, and transform composition.

use std::sync::Arc;

use tch::Tensor;

use crate::error::{DataError, Result};
use crate::frames::{Frames, Transform};
use crate::rng::Rng;

/// One training example.
#[derive(Debug)]
pub struct Sample {
    /// `f32` in `[-1, 1]`: `(C, H, W)` for images, `(C, T, H, W)` for clips;
    /// for latents, whatever shape the encoder wrote (usually `(C, H, W)`).
    pub data: Tensor,
    /// Class index (0-based), `None` for unconditional sources.
    pub label: Option<i64>,
}

/// Decoded `u8` pixels of one example, before conversion to a tensor.
#[derive(Debug, Clone)]
pub struct RawSample {
    /// The pixels.
    pub frames: Frames,
    /// Class index (0-based), if any.
    pub label: Option<i64>,
}

/// A random-access collection of samples.
///
/// `seed` carries all randomness of one access (clip start, flips): the
/// loader derives it from (loader seed, epoch, index), so a sample does not
/// depend on which worker loads it or when.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;

    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decoded pixels of sample `index`. Sources that do not hold pixels
    /// (latents) return an error and override [`Dataset::get`] instead.
    fn get_raw(&self, index: usize, seed: u64) -> Result<RawSample>;

    /// Sample `index` as a tensor in `[-1, 1]`: `(C, H, W)` or `(C, T, H, W)`.
    fn get(&self, index: usize, seed: u64) -> Result<Sample> {
        let raw = self.get_raw(index, seed)?;
        Ok(Sample {
            data: raw.frames.to_tensor(),
            label: raw.label,
        })
    }

    /// Number of classes, for class-conditional sources.
    fn num_classes(&self) -> Option<usize> {
        None
    }

    /// A short human-readable description for logs.
    fn describe(&self) -> String;
}

impl std::fmt::Debug for dyn Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} samples)", self.describe(), self.len())
    }
}

// Datasets are shared as `Arc<dyn Dataset>` (config builds, loader workers).
impl<D: Dataset + ?Sized> Dataset for Arc<D> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn get_raw(&self, index: usize, seed: u64) -> Result<RawSample> {
        (**self).get_raw(index, seed)
    }
    fn get(&self, index: usize, seed: u64) -> Result<Sample> {
        (**self).get(index, seed)
    }
    fn num_classes(&self) -> Option<usize> {
        (**self).num_classes()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// A dataset with a pipeline of [`Transform`]s applied to every sample.
#[derive(Debug)]
pub struct Transformed<D> {
    inner: D,
    transforms: Vec<Transform>,
}

impl<D: Dataset> Transformed<D> {
    /// Wraps `inner`; transforms run in order.
    pub fn new(inner: D, transforms: Vec<Transform>) -> Self {
        Self { inner, transforms }
    }

    /// The transforms, in order.
    pub fn transforms(&self) -> &[Transform] {
        &self.transforms
    }
}

impl<D: Dataset> Dataset for Transformed<D> {
    fn len(&self) -> usize {
        self.inner.len()
    }

    fn get_raw(&self, index: usize, seed: u64) -> Result<RawSample> {
        // The source and the transforms draw from separate streams so adding a
        // transform never changes, say, the clip start the source picks.
        let mut raw = self.inner.get_raw(index, seed)?;
        let mut rng = Rng::new(crate::rng::derive(seed, &[0x0074_7261_6e73]));
        let origin = format!("{} sample {index}", self.inner.describe());
        for t in &self.transforms {
            t.apply(&mut raw.frames, &mut rng, &origin)?;
        }
        Ok(raw)
    }

    fn num_classes(&self) -> Option<usize> {
        self.inner.num_classes()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// The class count of integer labels (the largest plus one; 0 when there
/// are none), for [`Dataset::num_classes`] of labelled sources.
pub(crate) fn class_count<T: Copy + Ord + Into<i64>>(labels: Option<&[T]>) -> Option<usize> {
    labels.map(|l| l.iter().copied().max().map_or(0, |m| m.into() as usize + 1))
}

/// Checks `index < len`.
pub(crate) fn check_index(index: usize, len: usize) -> Result<()> {
    if index < len {
        Ok(())
    } else {
        Err(DataError::IndexOutOfRange { index, len })
    }
}

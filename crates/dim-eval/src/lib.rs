//! Sample-quality metrics for diffusion models.
//!
//! - [`frechet`]: Gaussian feature statistics accumulated in f64 and the
//!   Fréchet distance between two of them (FID when the features are
//!   Inception-v3 pool features), with a stable symmetric matrix square root.
//! - [`precision_recall`]: improved precision and recall (Kynkäänniemi et al.
//!   2019) from k-nearest-neighbour radii.
//! - [`FeatureExtractor`]: the pluggable feature network; [`inception`] is
//!   Inception-v3 with the FID weights (`pt_inception-2015-12-05`, converted to
//!   safetensors by the user, see `docs/eval.md`), [`classifier`] a small
//!   Fashion-MNIST classifier trained by the project (`dim train-features`).
//!
//! - [`fvd`]: Fréchet video distance on pluggable [`VideoFeatureExtractor`]s:
//!   [`i3d`] (Kinetics-400 I3D, weights converted by the user) and
//!   [`video_classifier`] (a Moving Fashion-MNIST classifier trained by the
//!   project, `dim train-features --video`).
//!
//! Image tensors everywhere are `(N, C, H, W)` floats in `[-1, 1]`; clips
//! `(N, C, T, H, W)`.

pub mod classifier;
mod error;
pub mod feature_classifier;
pub mod features;
pub mod frechet;
pub mod fvd;
pub mod i3d;
pub mod inception;
pub mod inception_score;
pub mod npz;
pub mod precision_recall;
pub mod video_classifier;

pub use classifier::FmnistClassifier;
/// The one name- and shape-checked weight loader (from `dim-io`).
pub use dim_io::load_checked;
pub use error::{EvalError, Result};
pub use feature_classifier::{Classifier, ClassifierKind, ClassifierTrainConfig};
pub use features::{extract_features, FeatureExtractor};
pub use frechet::{frechet_distance, FeatureStats, GaussianStats};
pub use fvd::{extract_video_features, fvd, VideoFeatureExtractor};
pub use i3d::I3d;
pub use inception::{InceptionFeatures, InceptionV3, LOGITS_DIM, SPATIAL_DIM};
pub use inception_score::inception_score;
pub use npz::{NpzReader, NpzWriter};
pub use precision_recall::{precision_recall, PrecisionRecall};
pub use video_classifier::VideoClassifier;

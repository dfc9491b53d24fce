//! A small Fashion-MNIST classifier whose penultimate layer serves as the
//! feature network of the Fashion-MNIST benchmarks (`dim train-features`).
//!
//! Inception-v3 features are trained on ImageNet photographs and say little
//! about 32×32 grey garments; a classifier trained on the data itself gives
//! features that separate the classes, which is what FID needs to see.
//! Architecture: three stride-2 3×3 convolutions (32, 64, 128 channels, ReLU)
//! on a 32×32 input, global average pool, a 128-d hidden layer (the
//! features, after ReLU), and a 10-way linear head. Cheap enough to train on
//! a CPU in well under a minute per epoch.

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

pub use crate::feature_classifier::ClassifierTrainConfig;
use crate::feature_classifier::{Classifier, ClassifierKind, HIDDEN_DIM};
use crate::features::{check_images, FeatureExtractor};
use crate::Result;

/// Width of the features.
pub const FEATURE_DIM: i64 = HIDDEN_DIM;
/// Number of classes.
pub const NUM_CLASSES: i64 = 10;

/// The Fashion-MNIST classifier. Images `(N, 1, H, W)` in `[-1, 1]`,
/// resized to 32×32 if they are not already; labels 0..10.
pub type FmnistClassifier = Classifier<Fmnist>;

/// The [`ClassifierKind`] of [`FmnistClassifier`].
#[derive(Debug)]
pub struct Fmnist;

impl ClassifierKind for Fmnist {
    const NAME: &'static str = "classifier";
    const TRAINING: &'static str =
        "classifier training (images, batch_size and epochs must be positive)";
    const CLASSES: i64 = NUM_CLASSES;

    fn convs(r: &nn::Path<'_>) -> Vec<Box<dyn Module>> {
        let cfg = nn::ConvConfig {
            stride: 2,
            padding: 1,
            ..Default::default()
        };
        vec![
            Box::new(nn::conv2d(r / "conv1", 1, 32, 3, cfg)),
            Box::new(nn::conv2d(r / "conv2", 32, 64, 3, cfg)),
            Box::new(nn::conv2d(r / "conv3", 64, HIDDEN_DIM, 3, cfg)),
        ]
    }

    fn check_inputs(images: &Tensor) -> Result<()> {
        check_images(images, &[1])
    }

    fn prepare(images: &Tensor) -> Result<Tensor> {
        let x = images.to_kind(Kind::Float);
        let s = x.size();
        Ok(if s[2] != 32 || s[3] != 32 {
            x.upsample_bilinear2d([32, 32], false, None, None)
        } else {
            x
        })
    }

    fn training_batch(images: Tensor, labels: Tensor) -> Result<(Tensor, Tensor)> {
        Ok((images, labels))
    }
}

impl FeatureExtractor for FmnistClassifier {
    fn name(&self) -> &str {
        "fmnist-classifier"
    }

    fn dim(&self) -> i64 {
        FEATURE_DIM
    }

    fn device(&self) -> Device {
        Classifier::device(self)
    }

    fn features(&self, images: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.hidden_features(images)
    }
}

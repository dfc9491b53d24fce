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

use std::path::Path;

use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

use crate::features::{check_images, FeatureExtractor};
pub use crate::training::ClassifierTrainConfig;
use crate::training::{self, Classifier};
use crate::Result;

/// Width of the features.
pub const FEATURE_DIM: i64 = 128;
/// Number of classes.
pub const NUM_CLASSES: i64 = 10;

/// The classifier. Images `(N, 1, H, W)` in `[-1, 1]`, resized to 32×32 if
/// they are not already.
#[derive(Debug)]
pub struct FmnistClassifier {
    vs: VarStore,
    convs: Vec<nn::Conv2D>,
    hidden: nn::Linear,
    head: nn::Linear,
}

impl FmnistClassifier {
    /// A freshly initialised classifier (initialisation from tch's global RNG;
    /// [`FmnistClassifier::train`] seeds it).
    pub fn new(device: Device) -> Self {
        let vs = VarStore::new(device);
        let r = vs.root();
        let cfg = nn::ConvConfig {
            stride: 2,
            padding: 1,
            ..Default::default()
        };
        let convs = vec![
            nn::conv2d(&r / "conv1", 1, 32, 3, cfg),
            nn::conv2d(&r / "conv2", 32, 64, 3, cfg),
            nn::conv2d(&r / "conv3", 64, 128, 3, cfg),
        ];
        let hidden = nn::linear(&r / "hidden", 128, FEATURE_DIM, Default::default());
        let head = nn::linear(&r / "head", FEATURE_DIM, NUM_CLASSES, Default::default());
        Self {
            vs,
            convs,
            hidden,
            head,
        }
    }

    /// Loads weights written by [`FmnistClassifier::save`], checking every
    /// name and shape.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        training::load(path, device)
    }

    /// Writes the weights as safetensors.
    pub fn save(&self, path: &Path) -> Result<()> {
        training::save(self, path)
    }

    fn hidden_features(&self, images: &Tensor) -> Tensor {
        let mut x = images.to_device(self.vs.device()).to_kind(Kind::Float);
        let s = x.size();
        if s[2] != 32 || s[3] != 32 {
            x = x.upsample_bilinear2d([32, 32], false, None, None);
        }
        for c in &self.convs {
            x = c.forward(&x).relu();
        }
        x.mean_dim(&[2i64, 3][..], false, Kind::Float)
            .apply(&self.hidden)
            .relu()
    }

    /// Class logits `(N, 10)`.
    pub fn logits(&self, images: &Tensor) -> Result<Tensor> {
        check_images(images, &[1])?;
        Ok(self.hidden_features(images).apply(&self.head))
    }

    /// Trains on `images` `(N, 1, H, W)` in `[-1, 1]` with `labels` `(N)`
    /// (integers 0..10) with Adam and cross-entropy. `on_step(epoch, step,
    /// loss)` is called after every step (for progress). Returns the mean
    /// loss of the last epoch.
    pub fn train(
        &mut self,
        images: &Tensor,
        labels: &Tensor,
        cfg: &ClassifierTrainConfig,
        on_step: &mut dyn FnMut(usize, usize, f64),
    ) -> Result<f64> {
        training::train(self, images, labels, cfg, on_step)
    }

    /// Top-1 accuracy on `images` `(N, 1, H, W)` with `labels` `(N)`.
    pub fn accuracy(&self, images: &Tensor, labels: &Tensor, batch: usize) -> Result<f64> {
        training::accuracy(self, images, labels, batch)
    }
}

impl Classifier for FmnistClassifier {
    const NAME: &'static str = "classifier";
    const TRAINING: &'static str =
        "classifier training (images, batch_size and epochs must be positive)";

    fn init(device: Device) -> Self {
        Self::new(device)
    }

    fn vars(&self) -> &VarStore {
        &self.vs
    }

    fn check_inputs(images: &Tensor) -> Result<()> {
        check_images(images, &[1])
    }

    fn logits(&self, images: &Tensor) -> Result<Tensor> {
        FmnistClassifier::logits(self, images)
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
        self.vs.device()
    }

    fn features(&self, images: &Tensor) -> Result<Tensor> {
        check_images(images, &[1])?;
        let _guard = tch::no_grad_guard();
        Ok(self.hidden_features(images))
    }
}

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

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, OptimizerConfig, VarStore};
use tch::{Device, Kind, Tensor};

use crate::features::{check_images, FeatureExtractor};
use crate::{load_checked, EvalError, Result};

/// Width of the features.
pub const FEATURE_DIM: i64 = 128;
/// Number of classes.
pub const NUM_CLASSES: i64 = 10;

/// Training settings of the classifier.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifierTrainConfig {
    /// Passes over the training images.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Seed of the initialisation and of the shuffling.
    pub seed: u64,
}

impl Default for ClassifierTrainConfig {
    fn default() -> Self {
        Self {
            epochs: 2,
            batch_size: 128,
            lr: 2e-3,
            seed: 0,
        }
    }
}

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
        let net = Self::new(device);
        load_checked(&net.vs, path, &|_| false)?;
        Ok(net)
    }

    /// Writes the weights as safetensors.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.vs.save(path)?;
        Ok(())
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
        check_images(images, &[1])?;
        let n = images.size()[0];
        if labels.size() != [n] {
            return Err(EvalError::Shape {
                what: "labels",
                detail: format!("expected ({n}), got {:?}", labels.size()),
            });
        }
        if n == 0 || cfg.batch_size == 0 || cfg.epochs == 0 {
            return Err(EvalError::TooFewSamples {
                what: "classifier training (images, batch_size and epochs must be positive)",
                need: 1,
                got: 0,
            });
        }
        tch::manual_seed(cfg.seed as i64);
        // Re-initialise under the seed so that training is reproducible.
        *self = Self::new(self.vs.device());
        let mut opt = nn::Adam::default().build(&self.vs, cfg.lr)?;
        let device = self.vs.device();
        let labels = labels.to_kind(Kind::Int64);
        let bs = cfg.batch_size as i64;
        let mut last = 0.0;
        for epoch in 0..cfg.epochs {
            let perm = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
            let (mut sum, mut count) = (0.0, 0);
            for (step, s) in (0..n).step_by(bs as usize).enumerate() {
                let idx = perm.narrow(0, s, bs.min(n - s));
                let x = images
                    .index_select(0, &idx.to_device(images.device()))
                    .to_device(device);
                let y = labels
                    .index_select(0, &idx.to_device(labels.device()))
                    .to_device(device);
                let loss = self
                    .hidden_features(&x)
                    .apply(&self.head)
                    .cross_entropy_for_logits(&y);
                opt.backward_step(&loss);
                let l = loss.double_value(&[]);
                sum += l;
                count += 1;
                on_step(epoch, step, l);
            }
            last = sum / count as f64;
            tracing::info!(epoch, loss = last, "classifier epoch done");
        }
        Ok(last)
    }

    /// Top-1 accuracy on `images` `(N, 1, H, W)` with `labels` `(N)`.
    pub fn accuracy(&self, images: &Tensor, labels: &Tensor, batch: usize) -> Result<f64> {
        check_images(images, &[1])?;
        let _guard = tch::no_grad_guard();
        let n = images.size()[0];
        let mut correct = 0i64;
        for s in (0..n).step_by(batch.max(1)) {
            let len = (batch as i64).min(n - s);
            let pred = self.logits(&images.narrow(0, s, len))?.argmax(1, false);
            let y = labels
                .narrow(0, s, len)
                .to_device(pred.device())
                .to_kind(Kind::Int64);
            correct += pred.eq_tensor(&y).sum(Kind::Int64).int64_value(&[]);
        }
        Ok(correct as f64 / n.max(1) as f64)
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

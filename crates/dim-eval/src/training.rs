//! The supervised training loop, top-1 accuracy and weight files shared by
//! the project's feature classifiers ([`crate::classifier`] on images,
//! [`crate::video_classifier`] on clips): they differ only in the network,
//! the input check and what a training batch becomes before the loss.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn::{self, OptimizerConfig, VarStore};
use tch::{Device, Kind, Tensor};

use crate::{load_checked, EvalError, Result};

/// Training settings of the feature classifiers.
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

/// What [`train`], [`accuracy`] and [`load`] need of a classifier whose
/// inputs are `(N, ...)` and labels `(N)` integers.
pub(crate) trait Classifier: Sized {
    /// Names the classifier in errors and logs ("classifier", "video classifier").
    const NAME: &'static str;
    /// Names the inputs in the error for an empty training set.
    const TRAINING: &'static str;
    /// A freshly initialised network on `device` (tch's global RNG).
    fn init(device: Device) -> Self;
    /// Its variables.
    fn vars(&self) -> &VarStore;
    /// Checks the whole input tensor's shape.
    fn check_inputs(inputs: &Tensor) -> Result<()>;
    /// Class logits `(B, classes)` of a batch of inputs.
    fn logits(&self, inputs: &Tensor) -> Result<Tensor>;
    /// The batch the loss sees, from inputs on the network's device and
    /// `Int64` labels `(B)` there (identity, or augmentation).
    fn training_batch(inputs: Tensor, labels: Tensor) -> Result<(Tensor, Tensor)>;
}

/// Loads weights written by [`save`] into a fresh `C`, checking every name
/// and shape.
pub(crate) fn load<C: Classifier>(path: &Path, device: Device) -> Result<C> {
    let net = C::init(device);
    load_checked(net.vars(), path, &|_| false)?;
    Ok(net)
}

/// Writes the weights as safetensors.
pub(crate) fn save<C: Classifier>(net: &C, path: &Path) -> Result<()> {
    net.vars().save(path)?;
    Ok(())
}

/// Re-initialises `net` under `cfg.seed` and trains it on `inputs` `(N, ...)`
/// (any device) with `labels` `(N)` with Adam and cross-entropy on shuffled
/// batches. `on_step(epoch, step, loss)` is called after every step. Returns
/// the mean loss of the last epoch.
pub(crate) fn train<C: Classifier>(
    net: &mut C,
    inputs: &Tensor,
    labels: &Tensor,
    cfg: &ClassifierTrainConfig,
    on_step: &mut dyn FnMut(usize, usize, f64),
) -> Result<f64> {
    C::check_inputs(inputs)?;
    let n = inputs.size()[0];
    if labels.size() != [n] {
        return Err(EvalError::Shape {
            what: "labels",
            detail: format!("expected ({n}), got {:?}", labels.size()),
        });
    }
    if n == 0 || cfg.batch_size == 0 || cfg.epochs == 0 {
        return Err(EvalError::TooFewSamples {
            what: C::TRAINING,
            need: 1,
            got: 0,
        });
    }
    tch::manual_seed(cfg.seed as i64);
    // Re-initialise under the seed so that training is reproducible.
    let device = net.vars().device();
    *net = C::init(device);
    let mut opt = nn::Adam::default().build(net.vars(), cfg.lr)?;
    let labels = labels.to_kind(Kind::Int64);
    let bs = cfg.batch_size as i64;
    let mut last = 0.0;
    for epoch in 0..cfg.epochs {
        let perm = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
        let (mut sum, mut count) = (0.0, 0);
        for (step, s) in (0..n).step_by(bs as usize).enumerate() {
            let idx = perm.narrow(0, s, bs.min(n - s));
            let pick = |t: &Tensor| {
                t.index_select(0, &idx.to_device(t.device()))
                    .to_device(device)
            };
            let (x, y) = C::training_batch(pick(inputs), pick(&labels))?;
            let loss = net.logits(&x)?.cross_entropy_for_logits(&y);
            opt.backward_step(&loss);
            let l = loss.double_value(&[]);
            sum += l;
            count += 1;
            on_step(epoch, step, l);
        }
        last = sum / count as f64;
        tracing::info!(classifier = C::NAME, epoch, loss = last, "epoch done");
    }
    Ok(last)
}

/// Top-1 accuracy of `net` on `inputs` `(N, ...)` with `labels` `(N)`, in
/// batches of `batch`.
pub(crate) fn accuracy<C: Classifier>(
    net: &C,
    inputs: &Tensor,
    labels: &Tensor,
    batch: usize,
) -> Result<f64> {
    C::check_inputs(inputs)?;
    let _guard = tch::no_grad_guard();
    let n = inputs.size()[0];
    let mut correct = 0i64;
    for s in (0..n).step_by(batch.max(1)) {
        let len = (batch as i64).min(n - s);
        let pred = net.logits(&inputs.narrow(0, s, len))?.argmax(1, false);
        let y = labels
            .narrow(0, s, len)
            .to_device(pred.device())
            .to_kind(Kind::Int64);
        correct += pred.eq_tensor(&y).sum(Kind::Int64).int64_value(&[]);
    }
    Ok(correct as f64 / n.max(1) as f64)
}

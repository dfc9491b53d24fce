//! The body shared by the project's feature classifiers
//! ([`crate::classifier`] on images, [`crate::video_classifier`] on clips):
//! a stack of stride-2 convolutions with ReLU, a global average pool, a
//! hidden layer whose ReLU output is the feature vector, and a linear
//! head; its training loop, top-1 accuracy and weight files. A
//! [`ClassifierKind`] supplies what differs: the convolutions, the input
//! check and preparation, and what a training batch becomes before the loss.

use std::marker::PhantomData;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, OptimizerConfig, VarStore};
use tch::{Device, Kind, Tensor};

use crate::{load_checked, EvalError, Result};

/// Width of the hidden layer, the features of both classifiers.
pub const HIDDEN_DIM: i64 = 128;

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

/// What sets one feature classifier apart from another.
pub trait ClassifierKind {
    /// Names the classifier in logs ("classifier", "video classifier").
    const NAME: &'static str;
    /// Names the inputs in the error for an empty training set.
    const TRAINING: &'static str;
    /// Number of classes of the head.
    const CLASSES: i64;
    /// The convolutions under `root` (names `conv1`, `conv2`, ...), the
    /// last with [`HIDDEN_DIM`] output channels.
    fn convs(root: &nn::Path<'_>) -> Vec<Box<dyn Module>>;
    /// Checks the shape of a whole input tensor `(N, C, ...)`.
    fn check_inputs(inputs: &Tensor) -> Result<()>;
    /// Inputs (on the network's device) as the convolutions see them, f32.
    fn prepare(inputs: &Tensor) -> Result<Tensor>;
    /// The batch the loss sees, from prepared inputs and `Int64` labels `(B)`
    /// on the network's device (identity, or augmentation).
    fn training_batch(inputs: Tensor, labels: Tensor) -> Result<(Tensor, Tensor)>;
}

/// A feature classifier of kind `K`: inputs `(N, C, ...)` in `[-1, 1]`,
/// features `(N, 128)`, logits `(N, K::CLASSES)`.
#[derive(Debug)]
pub struct Classifier<K> {
    vs: VarStore,
    convs: Vec<Box<dyn Module>>,
    hidden: nn::Linear,
    head: nn::Linear,
    kind: PhantomData<K>,
}

impl<K: ClassifierKind> Classifier<K> {
    /// A freshly initialised classifier (initialisation from tch's global
    /// RNG; [`Classifier::train`] seeds it).
    pub fn new(device: Device) -> Self {
        let vs = VarStore::new(device);
        let r = vs.root();
        let convs = K::convs(&r);
        let hidden = nn::linear(&r / "hidden", HIDDEN_DIM, HIDDEN_DIM, Default::default());
        let head = nn::linear(&r / "head", HIDDEN_DIM, K::CLASSES, Default::default());
        Self {
            vs,
            convs,
            hidden,
            head,
            kind: PhantomData,
        }
    }

    /// Loads weights written by [`Classifier::save`], checking every name
    /// and shape.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let net = Self::new(device);
        load_checked(&net.vs, path, &|_| false)?;
        Ok(net)
    }

    /// Writes the weights as safetensors (atomically, through `dim_io`).
    pub fn save(&self, path: &Path) -> Result<()> {
        dim_io::save(path, self.vs.variables(), &Default::default())?;
        Ok(())
    }

    /// The device the network runs on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Features `(N, 128)` of prepared inputs.
    fn hidden_of_prepared(&self, x: &Tensor) -> Tensor {
        let mut x = x.shallow_clone();
        for c in &self.convs {
            x = c.forward(&x).relu();
        }
        let spatial: Vec<i64> = (2..x.dim() as i64).collect();
        x.mean_dim(&spatial[..], false, Kind::Float)
            .apply(&self.hidden)
            .relu()
    }

    /// Features `(N, 128)` of inputs `(N, C, ...)` (any device).
    pub(crate) fn hidden_features(&self, inputs: &Tensor) -> Result<Tensor> {
        K::check_inputs(inputs)?;
        let x = K::prepare(&inputs.to_device(self.device()))?;
        Ok(self.hidden_of_prepared(&x))
    }

    /// Class logits `(N, K::CLASSES)`.
    pub fn logits(&self, inputs: &Tensor) -> Result<Tensor> {
        Ok(self.hidden_features(inputs)?.apply(&self.head))
    }

    /// Re-initialises the network under `cfg.seed` and trains it on `inputs`
    /// `(N, C, ...)` in `[-1, 1]` (any device) with integer `labels` `(N)`,
    /// with Adam and cross-entropy on shuffled batches. `on_step(epoch,
    /// step, loss)` is called after every step (for progress). Returns the
    /// mean loss of the last epoch.
    pub fn train(
        &mut self,
        inputs: &Tensor,
        labels: &Tensor,
        cfg: &ClassifierTrainConfig,
        on_step: &mut dyn FnMut(usize, usize, f64),
    ) -> Result<f64> {
        K::check_inputs(inputs)?;
        let n = inputs.size()[0];
        if labels.size() != [n] {
            return Err(EvalError::Shape {
                what: "labels",
                detail: format!("expected ({n}), got {:?}", labels.size()),
            });
        }
        if n == 0 || cfg.batch_size == 0 || cfg.epochs == 0 {
            return Err(EvalError::TooFewSamples {
                what: K::TRAINING,
                need: 1,
                got: 0,
            });
        }
        tch::manual_seed(cfg.seed as i64);
        // Re-initialise under the seed so that training is reproducible.
        let device = self.device();
        *self = Self::new(device);
        let mut opt = nn::Adam::default().build(&self.vs, cfg.lr)?;
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
                let x = K::prepare(&pick(inputs))?;
                let (x, y) = K::training_batch(x, pick(&labels))?;
                let loss = self
                    .hidden_of_prepared(&x)
                    .apply(&self.head)
                    .cross_entropy_for_logits(&y);
                opt.backward_step(&loss);
                let l = loss.double_value(&[]);
                sum += l;
                count += 1;
                on_step(epoch, step, l);
            }
            last = sum / count as f64;
            tracing::info!(classifier = K::NAME, epoch, loss = last, "epoch done");
        }
        Ok(last)
    }

    /// Top-1 accuracy on `inputs` `(N, C, ...)` with integer `labels` `(N)`,
    /// in batches of `batch`.
    pub fn accuracy(&self, inputs: &Tensor, labels: &Tensor, batch: usize) -> Result<f64> {
        K::check_inputs(inputs)?;
        let _guard = tch::no_grad_guard();
        let n = inputs.size()[0];
        let mut correct = 0i64;
        for s in (0..n).step_by(batch.max(1)) {
            let len = (batch as i64).min(n - s);
            let pred = self.logits(&inputs.narrow(0, s, len))?.argmax(1, false);
            let y = labels
                .narrow(0, s, len)
                .to_device(pred.device())
                .to_kind(Kind::Int64);
            correct += pred.eq_tensor(&y).sum(Kind::Int64).int64_value(&[]);
        }
        Ok(correct as f64 / n.max(1) as f64)
    }
}

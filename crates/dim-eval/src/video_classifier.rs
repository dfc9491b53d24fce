//! A small 3-D convolutional classifier of Moving Fashion-MNIST clips whose
//! penultimate layer is the feature network of the project's FVD
//! (`dim train-features --video`), as the Fashion-MNIST classifier is FID's.
//!
//! Its targets make the features see both content and motion: the class of
//! the clip's first garment (10 classes) for real clips, plus two classes
//! made on the fly from real clips, *frozen* (one frame repeated) and
//! *shuffled* (frames in random order), so that broken temporal coherence
//! moves the features as far as wrong garments do.
//!
//! Architecture: clips are average-pooled to 16 frames of 32×32
//! ([`VideoClassifier::prepare`]), then four 3×3×3 convolutions (16, 32,
//! 64, 128 channels, ReLU; stride 1×2×2 then 2×2×2), global average pool, a
//! 128-d hidden layer (the features, after ReLU) and a 12-way linear head.

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::feature_classifier::{Classifier, ClassifierKind, HIDDEN_DIM};
use crate::fvd::{check_clips, VideoFeatureExtractor};
use crate::Result;

/// Width of the features.
pub const VIDEO_FEATURE_DIM: i64 = HIDDEN_DIM;
/// Garment classes of real clips.
pub const GARMENT_CLASSES: i64 = 10;
/// Label of a frozen clip (one frame repeated).
pub const FROZEN_CLASS: i64 = 10;
/// Label of a clip with shuffled frames.
pub const SHUFFLED_CLASS: i64 = 11;
/// Frames and side the clips are pooled to before the convolutions.
pub const CLIP_SHAPE: [i64; 3] = [16, 32, 32];

/// The Moving Fashion-MNIST clip classifier. Clips `(N, 1, T, H, W)` in
/// `[-1, 1]`; trained on garment labels 0..10 of real clips
/// ([`Classifier::train`]), to which it adds frozen and shuffled clips on the
/// fly ([`VideoClassifier::corrupt`]); [`VideoClassifier::prepare`]d clips
/// save memory. Logits `(N, 12)`: garments 0–9, frozen, shuffled.
pub type VideoClassifier = Classifier<MovingClips>;

/// The [`ClassifierKind`] of [`VideoClassifier`].
#[derive(Debug)]
pub struct MovingClips;

impl ClassifierKind for MovingClips {
    const NAME: &'static str = "video classifier";
    const TRAINING: &'static str =
        "video classifier training (clips, batch_size and epochs must be positive)";
    const CLASSES: i64 = SHUFFLED_CLASS + 1;

    fn convs(r: &nn::Path<'_>) -> Vec<Box<dyn Module>> {
        let d = nn::ConvConfig::default();
        let conv = |name: &str, i: i64, o: i64, stride: [i64; 3]| -> Box<dyn Module> {
            let cfg = nn::ConvConfigND::<[i64; 3]> {
                stride,
                padding: [1, 1, 1],
                dilation: [1, 1, 1],
                groups: 1,
                bias: true,
                // PyTorch's Conv3d defaults, as tch's 1-D/2-D configs.
                ws_init: d.ws_init,
                bs_init: d.bs_init,
                padding_mode: nn::PaddingMode::Zeros,
            };
            Box::new(nn::conv(r / name, i, o, [3, 3, 3], cfg))
        };
        vec![
            conv("conv1", 1, 16, [1, 2, 2]),
            conv("conv2", 16, 32, [2, 2, 2]),
            conv("conv3", 32, 64, [2, 2, 2]),
            conv("conv4", 64, HIDDEN_DIM, [2, 2, 2]),
        ]
    }

    fn check_inputs(clips: &Tensor) -> Result<()> {
        check_clips(clips, &[1])
    }

    fn prepare(clips: &Tensor) -> Result<Tensor> {
        VideoClassifier::prepare(clips)
    }

    /// Real clips become frozen or shuffled ones on the fly.
    fn training_batch(clips: Tensor, labels: Tensor) -> Result<(Tensor, Tensor)> {
        Ok(VideoClassifier::corrupt(&clips, &labels))
    }
}

impl VideoClassifier {
    /// Clips `(N, 1, T, H, W)` average-pooled to `(N, 1, 16, 32, 32)` f32
    /// (idempotent), what the network sees: callers holding many clips in
    /// memory may store them prepared.
    pub fn prepare(clips: &Tensor) -> Result<Tensor> {
        check_clips(clips, &[1])?;
        let x = clips.to_kind(Kind::Float);
        Ok(if x.size()[2..] == CLIP_SHAPE {
            x
        } else {
            x.adaptive_avg_pool3d(CLIP_SHAPE)
        })
    }

    /// Real clips `(B, 1, T, H, W)` with labels `(B)` turned, each with
    /// probability 1/6, into a frozen clip (a random frame repeated, label
    /// [`FROZEN_CLASS`]) or a shuffled one ([`SHUFFLED_CLASS`]). Draws from
    /// tch's global RNG.
    pub fn corrupt(clips: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
        let s = clips.size();
        let (b, t, dev) = (s[0], s[2], clips.device());
        let r = Tensor::rand([b, 1], (Kind::Float, dev));
        let frozen = r.ge(4.0 / 6.0).logical_and(&r.lt(5.0 / 6.0));
        let shuffled = r.ge(5.0 / 6.0);
        let keep = Tensor::arange(t, (Kind::Int64, dev))
            .unsqueeze(0)
            .expand([b, t], false);
        let one = Tensor::randint(t, [b, 1], (Kind::Int64, dev)).expand([b, t], false);
        let perm = Tensor::rand([b, t], (Kind::Float, dev)).argsort(1, false);
        let idx = keep.where_self(&frozen.logical_not(), &one);
        let idx = idx.where_self(&shuffled.logical_not(), &perm);
        let x = clips.gather(
            2,
            &idx.view([b, 1, t, 1, 1]).expand(s.as_slice(), false),
            false,
        );
        let y = labels.to_device(dev).to_kind(Kind::Int64);
        let y = y.where_self(
            &frozen.squeeze_dim(1).logical_not(),
            &Tensor::full([b], FROZEN_CLASS, (Kind::Int64, dev)),
        );
        let y = y.where_self(
            &shuffled.squeeze_dim(1).logical_not(),
            &Tensor::full([b], SHUFFLED_CLASS, (Kind::Int64, dev)),
        );
        (x, y)
    }
}

impl VideoFeatureExtractor for VideoClassifier {
    fn name(&self) -> &str {
        "mfmnist-video-classifier"
    }

    fn dim(&self) -> i64 {
        VIDEO_FEATURE_DIM
    }

    fn device(&self) -> Device {
        Classifier::device(self)
    }

    fn features(&self, clips: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.hidden_features(clips)
    }
}

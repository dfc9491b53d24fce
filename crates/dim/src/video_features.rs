//! `dim train-features --video` (the Moving Fashion-MNIST video classifier,
//! FVD's default features) and `dim fvd` (Fréchet video distance between
//! two clip sets).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use dim_data::{DataConfig, Dataset, MovingConfig, MovingFashionMnistConfig};
use dim_eval::{
    extract_video_features, fvd, ClassifierTrainConfig, I3d, VideoClassifier, VideoFeatureExtractor,
};
use indicatif::ProgressBar;
use serde::Serialize;
use tch::{Kind, Tensor};

use crate::runtime::{progress_bar, resolve_device};

/// Default weights of the video classifier.
pub const DEFAULT_VIDEO_FEATURES: &str = "runs/features/mfmnist_video_classifier.safetensors";

/// Options of `dim train-features --video`.
#[derive(Debug, Clone)]
pub struct VideoFeatureArgs {
    /// Weights file to write.
    pub out: PathBuf,
    /// A config whose `[data]` is Moving Fashion-MNIST (the models' training
    /// clips); default: the generator's defaults (16 frames of 64×64, 2 items).
    pub data: Option<PathBuf>,
    /// Training clips (the first of the data's clips).
    pub clips: usize,
    /// Passes over the clips, seed, batch.
    pub train: ClassifierTrainConfig,
    /// auto, cpu, cuda, cuda:N.
    pub device: String,
}

/// The Moving Fashion-MNIST settings of `data` (a config with `[data]`), or the defaults.
fn moving_config(data: Option<&Path>) -> Result<MovingFashionMnistConfig> {
    match data {
        None => Ok(MovingFashionMnistConfig {
            source_dir: None,
            cache: None,
            moving: MovingConfig::default(),
            transforms: Vec::new(),
        }),
        Some(p) => match DataConfig::from_file(p)? {
            DataConfig::MovingFashionMnist(c) => Ok(c),
            _ => bail!(
                "{}: the video classifier trains on Moving Fashion-MNIST; its [data] must have kind = \"moving_fashion_mnist\"",
                p.display()
            ),
        },
    }
}

fn bar(len: u64, what: &str) -> ProgressBar {
    progress_bar(
        len,
        true,
        &format!("{{spinner}} {what} [{{bar:30}}] {{pos}}/{{len}}, ETA {{eta}} {{msg}}"),
    )
}

/// The first `n` clips of `ds`, pooled to the classifier's input size, and their labels.
fn load_clips(ds: &Arc<dyn Dataset>, n: usize) -> Result<(Tensor, Tensor)> {
    let n = n.min(ds.len());
    let progress = bar(n as u64, "clips");
    let mut xs = Vec::with_capacity(n);
    let mut ys = Vec::with_capacity(n);
    for i in 0..n {
        let s = ds.get(i, 0)?;
        xs.push(VideoClassifier::prepare(&s.data.unsqueeze(0))?);
        ys.push(
            s.label
                .context("Moving Fashion-MNIST clip without a label")?,
        );
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok((Tensor::cat(&xs, 0), Tensor::from_slice(&ys)))
}

/// Trains the video classifier on Moving Fashion-MNIST clips (generator
/// seed as configured), reports garment accuracy on held-out clips (the
/// generator seed plus one), writes the weights. Returns the accuracy.
pub fn train_video_features(a: &VideoFeatureArgs) -> Result<f64> {
    let device = resolve_device(&a.device)?;
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::images::ensure_writable_dir(dir)?;
    }
    let mut cfg = moving_config(a.data.as_deref())?;
    cfg.moving.len = cfg.moving.len.max(a.clips);
    let train = DataConfig::MovingFashionMnist(cfg.clone()).build()?;
    let (x, y) = load_clips(&train, a.clips)?;
    let mut held = cfg;
    held.moving.seed += 1;
    held.cache = None;
    let held_n = (a.clips / 4).clamp(1, 1000);
    held.moving.len = held_n;
    let (tx, ty) = load_clips(&DataConfig::MovingFashionMnist(held).build()?, held_n)?;
    let mut net = VideoClassifier::new(device);
    let steps = a.train.epochs as u64 * (x.size()[0] as u64).div_ceil(a.train.batch_size as u64);
    let progress = bar(steps, "train-features --video");
    net.train(&x, &y, &a.train, &mut |_, _, loss| {
        progress.inc(1);
        progress.set_message(format!("loss {loss:.3}"));
    })?;
    progress.finish_and_clear();
    let acc = net.accuracy(&tx, &ty, 256)?;
    net.save(&a.out)?;
    tracing::info!(accuracy = acc, path = %a.out.display(), "video feature classifier written");
    Ok(acc)
}

/// Options of `dim fvd`.
#[derive(Debug, clap::Args)]
pub struct FvdArgs {
    /// Generated clips: a `dim sample` folder or its samples.safetensors, or a config .toml with [data].
    #[arg(long)]
    pub samples: String,
    /// Reference clips (same forms as --samples).
    #[arg(long)]
    pub reference: String,
    /// video-classifier (default: `dim train-features --video`) or i3d (converted Kinetics-400 weights, docs/eval.md).
    #[arg(long, default_value = "video-classifier")]
    pub features: String,
    /// Weights of the feature network (default: runs/features/mfmnist_video_classifier.safetensors).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Use at most this many clips of each set (0 = all).
    #[arg(long, default_value_t = 0)]
    pub num: usize,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// What `dim fvd` prints.
#[derive(Debug, Clone, Serialize)]
pub struct FvdReport {
    pub fvd: f64,
    pub num_samples: usize,
    pub num_reference: usize,
    pub features: String,
    pub samples: String,
    pub reference: String,
}

/// A set of clips `(C, T, H, W)`.
enum Clips {
    Dataset(Arc<dyn Dataset>),
    Tensor(Tensor),
}

impl Clips {
    fn open(spec: &str) -> Result<Self> {
        let p = Path::new(spec);
        let file = if p.is_dir() {
            p.join("samples.safetensors")
        } else {
            p.to_path_buf()
        };
        match file.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => {
                let x = dim_io::TensorFile::open(&file).and_then(|f| f.read("samples"))?;
                if x.dim() != 5 {
                    bail!(
                        "{}: `samples` has shape {:?}, expected clips (N, C, T, H, W) from a video model",
                        file.display(),
                        x.size()
                    );
                }
                Ok(Clips::Tensor(x))
            }
            Some("toml") => Ok(Clips::Dataset(DataConfig::from_file(&file)?.build()?)),
            _ => bail!("cannot read clips from `{spec}`: give a `dim sample` output folder, a .safetensors file or a config .toml with [data]"),
        }
    }

    fn len(&self) -> usize {
        match self {
            Clips::Dataset(d) => d.len(),
            Clips::Tensor(t) => t.size()[0] as usize,
        }
    }

    fn batch(&self, first: usize, n: usize) -> Result<Tensor> {
        Ok(match self {
            Clips::Dataset(d) => {
                let items = (first..first + n)
                    .map(|i| Ok(d.get(i, 0)?.data))
                    .collect::<Result<Vec<_>>>()?;
                let x = Tensor::stack(&items, 0);
                if x.dim() != 5 {
                    bail!(
                        "the data gives {:?} items, not clips (C, T, H, W)",
                        x.size()
                    );
                }
                x
            }
            Clips::Tensor(t) => t.narrow(0, first as i64, n as i64),
        })
    }

    /// Features `(N, F)` of the first `limit` clips (0 = all).
    fn features(
        &self,
        ext: &dyn VideoFeatureExtractor,
        limit: usize,
        batch: usize,
        name: &str,
    ) -> Result<Tensor> {
        let n = if limit > 0 {
            limit.min(self.len())
        } else {
            self.len()
        };
        let progress = bar(n as u64, "features");
        progress.set_message(name.to_string());
        let batches = (0..n).step_by(batch.max(1)).map(|first| {
            let b = batch.max(1).min(n - first);
            progress.inc(b as u64);
            self.batch(first, b)
        });
        let batches = batches.collect::<Result<Vec<_>>>()?;
        let f = extract_video_features(ext, batches)?;
        progress.finish_and_clear();
        Ok(f)
    }
}

/// Loads the video feature network named `kind`.
pub fn video_feature_network(
    kind: &str,
    weights: Option<&Path>,
    device: tch::Device,
) -> Result<Box<dyn VideoFeatureExtractor>> {
    Ok(match kind {
        "video-classifier" => {
            let w =
                weights.map_or_else(|| PathBuf::from(DEFAULT_VIDEO_FEATURES), Path::to_path_buf);
            Box::new(VideoClassifier::load(&w, device).with_context(|| {
                "the video feature classifier: create it with `dim train-features --video` (or pass --weights)"
            })?)
        }
        "i3d" => {
            let w = weights.context(
                "--features i3d needs --weights <converted I3D safetensors> (see docs/eval.md)",
            )?;
            Box::new(I3d::load(w, device).context(
                "I3D Kinetics-400 weights: convert them to safetensors, see docs/eval.md",
            )?)
        }
        k => bail!("unknown video feature network `{k}`: use video-classifier or i3d"),
    })
}

/// `dim fvd`: the FVD between two clip sets.
pub fn run_fvd(a: &FvdArgs) -> Result<FvdReport> {
    let device = resolve_device(&a.device)?;
    let ext = video_feature_network(&a.features, a.weights.as_deref(), device)?;
    let (s, r) = (Clips::open(&a.samples)?, Clips::open(&a.reference)?);
    let fs = s.features(ext.as_ref(), a.num, a.batch, &a.samples)?;
    let fr = r.features(ext.as_ref(), a.num, a.batch, &a.reference)?;
    let report = FvdReport {
        fvd: fvd(&fs.to_kind(Kind::Double), &fr.to_kind(Kind::Double))?,
        num_samples: fs.size()[0] as usize,
        num_reference: fr.size()[0] as usize,
        features: ext.name().to_string(),
        samples: a.samples.clone(),
        reference: a.reference.clone(),
    };
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(p) = &a.json {
        std::fs::write(p, &text).with_context(|| format!("cannot write {}", p.display()))?;
    }
    println!("{text}");
    Ok(report)
}

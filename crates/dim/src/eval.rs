//! `dim eval` (FID and precision/recall between two image sets) and
//! `dim train-features` (the Fashion-MNIST feature classifier).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use dim_data::{DataConfig, Dataset, FashionMnistConfig, Split, Transform};
use dim_eval::{
    extract_features, frechet_distance, precision_recall, ClassifierTrainConfig, FeatureExtractor,
    FmnistClassifier, GaussianStats, InceptionV3,
};

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::runtime::{progress_bar, resolve_device};

/// Where a set of images comes from.
pub enum Source {
    /// A dataset described by dim-data (e.g. Fashion-MNIST test, padded to 32).
    Dataset(Arc<dyn Dataset>, String),
    /// A tensor `(N, C, H, W)` in `[-1, 1]` (what `dim sample` writes as `samples.safetensors`).
    Tensor(Tensor, String),
    /// An ADM `.npz` batch (`arr_0` uint8 `(N, H, W, 3)`), read in row ranges.
    Npz(std::sync::Mutex<dim_eval::NpzReader>, usize, String),
}

fn open_npz(file: &Path, spec: &str) -> Result<Source> {
    let mut r = dim_eval::NpzReader::open(file)?;
    let info = r.info("arr_0")?.with_context(|| {
        format!(
            "{} has no `arr_0` (the ADM evaluator's uint8 (N, H, W, 3) images)",
            file.display()
        )
    })?;
    if info.kind != Kind::Uint8 || info.shape.len() != 4 || info.shape[3] != 3 {
        bail!(
            "{}: arr_0 is {:?} {:?}, expected uint8 (N, H, W, 3)",
            file.display(),
            info.kind,
            info.shape
        );
    }
    Ok(Source::Npz(
        std::sync::Mutex::new(r),
        info.shape[0] as usize,
        spec.to_string(),
    ))
}

/// Fashion-MNIST `split`, padded to 32×32 as the project's models see it.
pub fn fashion_mnist(split: Split) -> DataConfig {
    DataConfig::FashionMnist(FashionMnistConfig {
        dir: None,
        split,
        transforms: vec![Transform::Pad { size: 32, value: 0 }],
    })
}

/// Parses `fashion-mnist:train|test`, a folder or file written by
/// `dim sample` (`samples.safetensors`), or a TOML file with a `[data]` table.
pub fn parse_source(spec: &str) -> Result<Source> {
    let ds =
        |cfg: DataConfig| -> Result<Source> { Ok(Source::Dataset(cfg.build()?, spec.to_string())) };
    match spec {
        "fashion-mnist:train" => return ds(fashion_mnist(Split::Train)),
        "fashion-mnist:test" => return ds(fashion_mnist(Split::Test)),
        _ => {}
    }
    let p = Path::new(spec);
    let file = if p.is_dir() {
        // A latent model's folder holds latents there; its images are in samples.npz.
        let st = p.join("samples.safetensors");
        let has_images =
            st.is_file() && dim_io::TensorFile::open(&st).is_ok_and(|f| f.get("samples").is_some());
        if !has_images && p.join("samples.npz").is_file() {
            p.join("samples.npz")
        } else {
            st
        }
    } else {
        p.to_path_buf()
    };
    match file.extension().and_then(|e| e.to_str()) {
        Some("npz") => open_npz(&file, spec),
        Some("safetensors") => {
            let x = dim_io::TensorFile::open(&file)
                .and_then(|f| f.read("samples"))
                .context("expected the samples.safetensors `dim sample` writes")?;
            Ok(Source::Tensor(x, spec.to_string()))
        }
        Some("toml") => ds(DataConfig::from_file(&file)?),
        _ => bail!("cannot read images from `{spec}`: give fashion-mnist:train, fashion-mnist:test, a `dim sample` output folder, an ADM .npz, a .safetensors file or a config .toml with [data]"),
    }
}

impl Source {
    fn name(&self) -> String {
        match self {
            Source::Dataset(_, s) | Source::Tensor(_, s) | Source::Npz(_, _, s) => s.clone(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Source::Dataset(d, _) => d.len(),
            Source::Tensor(t, _) => t.size()[0] as usize,
            Source::Npz(_, n, _) => *n,
        }
    }

    /// Images `first .. first + n` as `(n, C, H, W)` (video clips are flattened to frames).
    fn batch(&self, first: usize, n: usize) -> Result<Tensor> {
        let x = match self {
            Source::Dataset(d, _) => {
                let items: Vec<Tensor> = (first..first + n)
                    .map(|i| Ok(d.get(i, 0)?.data))
                    .collect::<Result<_>>()?;
                Tensor::stack(&items, 0)
            }
            Source::Tensor(t, _) => t.narrow(0, first as i64, n as i64),
            Source::Npz(r, _, _) => {
                let mut r = r
                    .lock()
                    .map_err(|_| anyhow::anyhow!("npz reader poisoned"))?;
                let x = r.rows("arr_0", first as i64, n as i64)?;
                x.permute([0, 3, 1, 2]).to_kind(Kind::Float) / 127.5 - 1.0
            }
        };
        Ok(if x.dim() == 5 {
            let s = x.size();
            x.transpose(1, 2).reshape([s[0] * s[2], s[1], s[3], s[4]])
        } else {
            x
        })
    }

    /// Features `(N, F)` of the first `limit` images (0 = all).
    fn features(&self, ext: &dyn FeatureExtractor, limit: usize, batch: usize) -> Result<Tensor> {
        let n = if limit > 0 {
            limit.min(self.len())
        } else {
            self.len()
        };
        let name = self.name();
        let bar = progress_bar(
            n as u64,
            true,
            "{spinner} features {msg} [{bar:30}] {pos}/{len}, ETA {eta}",
        );
        bar.set_message(name);
        let mut batches = Vec::new();
        for first in (0..n).step_by(batch) {
            let b = batch.min(n - first);
            batches.push(self.batch(first, b)?);
            bar.inc(b as u64);
        }
        let f = extract_features(ext, batches)?;
        bar.finish_and_clear();
        Ok(f)
    }
}

/// Loads the feature network named `kind`.
pub fn feature_network(
    kind: &str,
    weights: &Path,
    device: Device,
) -> Result<Box<dyn FeatureExtractor>> {
    Ok(match kind {
        "fmnist-classifier" => Box::new(FmnistClassifier::load(weights, device).with_context(|| {
            "the Fashion-MNIST feature classifier: create it with `dim train-features` (or pass --weights)".to_string()
        })?),
        "inception" => Box::new(
            InceptionV3::load(weights, device)
                .context("Inception-v3 FID weights: convert pt_inception-2015-12-05 to safetensors, see docs/eval.md")?,
        ),
        k => bail!("unknown feature network `{k}`: use fmnist-classifier or inception"),
    })
}

/// Metrics of one comparison.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub fid: f64,
    pub precision: f64,
    pub recall: f64,
    pub k: usize,
    pub num_generated: usize,
    pub num_reference: usize,
    pub features: String,
    pub generated: String,
    pub reference: String,
}

/// FID and precision/recall of `generated` against `reference`.
pub fn evaluate(
    generated: &str,
    reference: &str,
    ext: &dyn FeatureExtractor,
    num: usize,
    k: usize,
    batch: usize,
) -> Result<EvalReport> {
    let g = parse_source(generated)?;
    let r = parse_source(reference)?;
    let fg = g.features(ext, num, batch)?;
    let fr = r.features(ext, 0, batch)?;
    let fid = frechet_distance(
        &GaussianStats::from_features(&fg)?,
        &GaussianStats::from_features(&fr)?,
    )?;
    // Precision/recall compares equally many samples (the paper's setting).
    let m = fg.size()[0].min(fr.size()[0]);
    let pr = precision_recall(&fr.narrow(0, 0, m), &fg.narrow(0, 0, m), k, 1024)?;
    Ok(EvalReport {
        fid,
        precision: pr.precision,
        recall: pr.recall,
        k,
        num_generated: fg.size()[0] as usize,
        num_reference: fr.size()[0] as usize,
        features: ext.name().to_string(),
        generated: generated.to_string(),
        reference: reference.to_string(),
    })
}

/// The ADM evaluator's metrics (Inception features).
#[derive(Debug, Clone, Serialize)]
pub struct AdmReport {
    pub fid: f64,
    pub sfid: f64,
    pub inception_score: Option<f64>,
    pub precision: f64,
    pub recall: f64,
    pub k: usize,
    pub num_generated: usize,
    pub num_reference: usize,
    /// Whether the reference statistics came precomputed from the reference
    /// `.npz` (`mu`, `sigma`, `mu_s`, `sigma_s`).
    pub reference_stats_precomputed: bool,
    pub generated: String,
    pub reference: String,
}

/// Pool, spatial and logit features of the first `limit` images of `src`.
fn adm_features(
    src: &Source,
    net: &InceptionV3,
    limit: usize,
    batch: usize,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let n = if limit > 0 {
        limit.min(src.len())
    } else {
        src.len()
    };
    let bar = progress_bar(
        n as u64,
        true,
        "{spinner} inception {msg} [{bar:30}] {pos}/{len}, ETA {eta}",
    );
    bar.set_message(src.name());
    let (mut pool, mut spatial, mut logits) = (Vec::new(), Vec::new(), Vec::new());
    for first in (0..n).step_by(batch) {
        let b = batch.min(n - first);
        let f = net.all_features(&src.batch(first, b)?)?;
        pool.push(f.pool.to_device(Device::Cpu));
        spatial.push(f.spatial.to_device(Device::Cpu));
        if let Some(l) = f.logits {
            logits.push(l.to_device(Device::Cpu));
        }
        bar.inc(b as u64);
    }
    bar.finish_and_clear();
    if pool.is_empty() {
        bail!("{}: no images", src.name());
    }
    let logits = (!logits.is_empty()).then(|| Tensor::cat(&logits, 0));
    Ok((Tensor::cat(&pool, 0), Tensor::cat(&spatial, 0), logits))
}

/// Precomputed statistics `mu`/`sigma` (`suffix` "") or `mu_s`/`sigma_s`
/// (`"_s"`) of an ADM reference batch, if it has them.
fn npz_stats(path: &Path, suffix: &str) -> Result<Option<GaussianStats>> {
    let mut r = dim_eval::NpzReader::open(path)?;
    let names = r.names();
    let (m, s) = (format!("mu{suffix}"), format!("sigma{suffix}"));
    if !names.contains(&m) || !names.contains(&s) {
        return Ok(None);
    }
    Ok(Some(GaussianStats {
        mu: r.array(&m)?.to_kind(Kind::Double),
        sigma: r.array(&s)?.to_kind(Kind::Double),
        n: 0,
    }))
}

/// FID, sFID, Inception Score and precision/recall as the ADM evaluator
/// computes them. `reference` may be the ADM reference batch
/// (`VIRTUAL_imagenet256_labeled.npz`): its precomputed `mu`/`sigma` (pool)
/// and `mu_s`/`sigma_s` (spatial) are used, and its images for
/// precision/recall.
pub fn evaluate_adm(
    generated: &str,
    reference: &str,
    net: &InceptionV3,
    num: usize,
    k: usize,
    batch: usize,
) -> Result<AdmReport> {
    let g = parse_source(generated)?;
    let r = parse_source(reference)?;
    let (gp, gs, gl) = adm_features(&g, net, num, batch)?;
    let (rp, rs, _) = adm_features(&r, net, 0, batch)?;
    let ref_file = Path::new(reference);
    let pre = if ref_file.extension().is_some_and(|e| e == "npz") {
        (npz_stats(ref_file, "")?, npz_stats(ref_file, "_s")?)
    } else {
        (None, None)
    };
    let precomputed = pre.0.is_some() && pre.1.is_some();
    let ref_pool = match pre.0 {
        Some(s) => s,
        None => GaussianStats::from_features(&rp)?,
    };
    let ref_spatial = match pre.1 {
        Some(s) => s,
        None => GaussianStats::from_features(&rs)?,
    };
    let fid = frechet_distance(&GaussianStats::from_features(&gp)?, &ref_pool)?;
    let sfid = frechet_distance(&GaussianStats::from_features(&gs)?, &ref_spatial)?;
    let inception_score = match &gl {
        Some(l) => Some(dim_eval::inception_score(l, 5000)?),
        None => {
            tracing::warn!("the Inception weights have no fc head: no Inception Score (convert them with fc.weight and fc.bias, see docs/eval.md)");
            None
        }
    };
    let m = gp.size()[0].min(rp.size()[0]);
    let pr = precision_recall(&rp.narrow(0, 0, m), &gp.narrow(0, 0, m), k, 1024)?;
    Ok(AdmReport {
        fid,
        sfid,
        inception_score,
        precision: pr.precision,
        recall: pr.recall,
        k,
        num_generated: gp.size()[0] as usize,
        num_reference: rp.size()[0] as usize,
        reference_stats_precomputed: precomputed,
        generated: generated.to_string(),
        reference: reference.to_string(),
    })
}

/// `dim train-features`: trains the classifier on Fashion-MNIST train,
/// reports test accuracy, and writes the weights. Returns the accuracy.
pub fn train_features(out: &Path, cfg: &ClassifierTrainConfig, device: &str) -> Result<f64> {
    let device = resolve_device(device)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::images::ensure_writable_dir(dir)?;
    }
    let load = |split| -> Result<(Tensor, Tensor)> {
        let d = fashion_mnist(split).build()?;
        let mut xs = Vec::with_capacity(d.len());
        let mut ys = Vec::with_capacity(d.len());
        for i in 0..d.len() {
            let s = d.get(i, 0)?;
            xs.push(s.data);
            ys.push(s.label.context("Fashion-MNIST sample without a label")?);
        }
        Ok((Tensor::stack(&xs, 0), Tensor::from_slice(&ys)))
    };
    let (x, y) = load(Split::Train)?;
    let (tx, ty) = load(Split::Test)?;
    let mut net = FmnistClassifier::new(device);
    let steps = cfg.epochs as u64 * (x.size()[0] as u64).div_ceil(cfg.batch_size as u64);
    let bar = progress_bar(
        steps,
        true,
        "{spinner} train-features [{bar:30}] {pos}/{len}, ETA {eta} {msg}",
    );
    net.train(&x, &y.to_kind(Kind::Int64), cfg, &mut |_, _, loss| {
        bar.inc(1);
        bar.set_message(format!("loss {loss:.3}"));
    })?;
    bar.finish_and_clear();
    let acc = net.accuracy(&tx, &ty, 1000)?;
    net.save(out)?;
    tracing::info!(accuracy = acc, path = %out.display(), "feature classifier written");
    Ok(acc)
}

/// The default weights path of the feature classifier.
pub fn default_features_path() -> PathBuf {
    PathBuf::from("runs/features/fmnist_classifier.safetensors")
}

//! `dim latents`: encodes an ImageFolder dataset (one sub-folder per class,
//! as ImageNet) through the VAE into dim-data's latent cache, which
//! `[data] kind = "latents"` trains on.
//!
//! Each image gets ADM/DiT's centre crop and resize; with `--flip` its
//! mirror image is stored right after it (DiT's feature extraction). Latents
//! are a draw from the VAE posterior (DiT's `latent_dist.sample()`) whose
//! noise depends only on `(seed, sample index)`, times the scale factor,
//! stored as f16 with the class labels. The cache is written shard by shard;
//! an interrupted run started again with the same arguments resumes after
//! the last complete shard, without duplicates.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use dim_data::{Dataset, ImageFolder, LatentWriter, Transform, Transformed};
use dim_vae::VaeConfig;
use indicatif::{ProgressBar, ProgressStyle};
use tch::{Device, Kind, Tensor};

use crate::runtime::resolve_device;
use crate::vae::VaeSection;

#[derive(Args, Debug, Clone)]
pub struct LatentsArgs {
    /// ImageFolder root: one sub-folder of JPEG/PNG images per class.
    #[arg(long)]
    pub data: PathBuf,
    /// The VAE weights (diffusers `vae/diffusion_pytorch_model.safetensors`).
    #[arg(long)]
    pub vae: PathBuf,
    /// A diffusers `vae/config.json` (default: the SD VAE, scale 0.18215).
    #[arg(long)]
    pub vae_config: Option<PathBuf>,
    /// The cache folder to write (or to resume).
    #[arg(long)]
    pub out: PathBuf,
    /// Side of the centre crop in pixels (256 or 512 for ImageNet).
    #[arg(long, default_value_t = 256)]
    pub image_size: usize,
    /// Also store each image's horizontally flipped copy.
    #[arg(long)]
    pub flip: bool,
    /// Store the posterior mean instead of a draw from it.
    #[arg(long)]
    pub mean: bool,
    /// Images per VAE call.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Samples per shard file (a multiple of 2 with --flip).
    #[arg(long, default_value_t = 4096)]
    pub shard_size: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Encode at most this many images (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Stop with an error after this many batches (tests use it to interrupt a run).
    #[arg(long, hide = true)]
    pub fail_after_batches: Option<usize>,
}

/// Runs `dim latents`; returns the number of latents in the finished cache.
pub fn run(a: &LatentsArgs) -> Result<usize> {
    let copies = if a.flip { 2 } else { 1 };
    if a.shard_size == 0 || !a.shard_size.is_multiple_of(copies) {
        bail!(
            "--shard-size {}: must be a positive multiple of {copies}",
            a.shard_size
        );
    }
    if a.image_size == 0 || a.batch == 0 {
        bail!("--image-size and --batch must be positive");
    }
    let device = resolve_device(&a.device)?;
    let config = match &a.vae_config {
        Some(p) => VaeConfig::from_diffusers_json(p)?,
        None => VaeConfig::default(),
    };
    if a.image_size as i64 % config.downsample() != 0 {
        bail!(
            "--image-size {}: must be a multiple of the VAE's downsampling factor {}",
            a.image_size,
            config.downsample()
        );
    }
    let section = VaeSection {
        weights: a.vae.clone(),
        config,
        slice: a.batch as i64,
    };
    let vae = section.load(device)?;
    let folder = ImageFolder::with_classes(&a.data).with_context(|| {
        format!(
            "--data {}: expected one sub-folder of images per class",
            a.data.display()
        )
    })?;
    let classes = folder.classes().len();
    let ds = Transformed::new(
        folder,
        vec![Transform::CenterCropResize { size: a.image_size }],
    );
    let n_images = if a.limit > 0 {
        ds.len().min(a.limit)
    } else {
        ds.len()
    };
    if n_images == 0 {
        bail!("--data {}: no images found", a.data.display());
    }

    let (mut w, done) = LatentWriter::resume(&a.out, a.shard_size)
        .with_context(|| format!("--out {}", a.out.display()))?;
    let meta = [
        ("scaling_factor", vae.config().scaling_factor.to_string()),
        ("vae", a.vae.display().to_string()),
        ("image_size", a.image_size.to_string()),
        ("flip", a.flip.to_string()),
        (
            "posterior",
            if a.mean { "mean" } else { "sample" }.to_string(),
        ),
        ("seed", a.seed.to_string()),
        ("source", a.data.display().to_string()),
        ("classes", classes.to_string()),
        ("images", n_images.to_string()),
    ];
    for (k, v) in &meta {
        // `images` may grow between runs (--limit); everything else must match.
        if done > 0 && *k != "images" {
            // A resumed cache must continue exactly as it began.
            let old = w.meta().get(*k).cloned().unwrap_or_default();
            if old != *v {
                bail!(
                    "--out {} was begun with {k} = {old:?}, now {v:?}: resume with the same arguments, or write to a new folder",
                    a.out.display()
                );
            }
        }
        w.set_meta(k, v.clone());
    }
    let first_image = done / copies;
    tracing::info!(images = n_images, classes, resumed_at = first_image, out = %a.out.display(), "encoding");
    let bar = ProgressBar::new(n_images as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} latents [{bar:30}] {pos}/{len} images, {per_sec}, ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_position(first_image as u64);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(16);
    let mut first = first_image;
    let mut batches = 0usize;
    while first < n_images {
        if a.fail_after_batches == Some(batches) {
            bail!("stopped after {batches} batches (--fail-after-batches)");
        }
        batches += 1;
        let b = a.batch.min(n_images - first);
        let samples = load_parallel(&ds, first, b, threads)?;
        let x = Tensor::stack(&samples.iter().map(|s| &s.0).collect::<Vec<_>>(), 0);
        let y: Vec<i64> = samples.iter().map(|s| s.1).collect();
        let (x, y) = if a.flip {
            // (orig_0, flip_0, orig_1, flip_1, ...)
            let xf = x.flip([3]);
            let s = x.size();
            let both = Tensor::stack(&[x, xf], 1).reshape([2 * s[0], s[1], s[2], s[3]]);
            let yy: Vec<i64> = y.iter().flat_map(|&v| [v, v]).collect();
            (both, yy)
        } else {
            (x, y)
        };
        let post = vae.encode(&x.to_device(device))?;
        let z = if a.mean {
            post.mean
        } else {
            post.sample_with(&posterior_noise(
                &post.mean,
                a.seed,
                (first * copies) as u64,
            ))
        };
        let z = vae.scale(&z).to_kind(Kind::Half);
        w.write(&z, Some(&Tensor::from_slice(&y)))?;
        first += b;
        bar.set_position(first as u64);
    }
    bar.finish_and_clear();
    let index = w.finish()?;
    Ok(index.count)
}

/// Standard-normal noise shaped like `like` `(B, C, h, w)` whose row `i`
/// depends only on `(seed, first + i)`, so a resumed run draws the same
/// latents as an uninterrupted one whatever the batch boundaries.
fn posterior_noise(like: &Tensor, seed: u64, first: u64) -> Tensor {
    let s = like.size();
    let rows: Vec<Tensor> = (0..s[0] as u64)
        .map(|i| {
            tch::manual_seed(dim_rng::derive(seed, &[first + i]) as i64);
            Tensor::randn(&s[1..], (Kind::Float, Device::Cpu))
        })
        .collect();
    Tensor::stack(&rows, 0).to_device(like.device())
}

/// Images `first..first + n` as `(3, S, S)` tensors with their labels,
/// decoded on up to `threads` threads.
fn load_parallel(
    ds: &Transformed<ImageFolder>,
    first: usize,
    n: usize,
    threads: usize,
) -> Result<Vec<(Tensor, i64)>> {
    let per = n.div_ceil(threads.max(1));
    let chunks: Vec<Result<Vec<(Tensor, i64)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (first..first + n)
            .step_by(per)
            .map(|start| {
                let end = (start + per).min(first + n);
                scope.spawn(move || {
                    (start..end)
                        .map(|i| {
                            let s = ds.get(i, 0)?;
                            let y = s.label.context("ImageFolder samples have labels")?;
                            Ok((s.data, y))
                        })
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("an image decoding thread panicked"))
            })
            .collect()
    });
    let mut out = Vec::with_capacity(n);
    for c in chunks {
        out.extend(c?);
    }
    Ok(out)
}

//! `dim latents`: encodes an ImageFolder dataset (one sub-folder per class,
//! as ImageNet) through the VAE into dim-data's latent cache, which
//! `[data] kind = "latents"` trains on.
//!
//! Each image gets ADM/DiT's centre crop and resize; with `--flip` its
//! mirror image is stored right after it (DiT's feature extraction). Latents
//! are a draw from the VAE posterior (DiT's `latent_dist.sample()`) whose
//! noise depends only on `(seed, sample index)`, times the scale factor,
//! stored as f16 with the class labels. The cache is written shard by shard;
//! an interrupted run started again with the same arguments (and any number
//! of processes) keeps the complete shards and encodes the rest, without
//! duplicates. With `--gpus N` / `--nproc N` each of N processes encodes a
//! contiguous block of shards; the cache is byte for byte the one a single
//! process writes.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use dim_data::{
    begin_cache, finish_cache, shard_file_name, Dataset, ImageFolder, LatentIndex, ShardInfo,
    ShardWriter, Transform, Transformed,
};
use dim_vae::VaeConfig;
use indicatif::{ProgressBar, ProgressStyle};
use tch::{Kind, Tensor};

use crate::launch::Placement;
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
    /// Encode on N GPUs of this machine, one process each with its share of the shards.
    #[arg(long, conflicts_with = "nproc")]
    pub gpus: Option<usize>,
    /// Encode in N processes on --device, each with its share of the shards.
    #[arg(long)]
    pub nproc: Option<usize>,
}

impl LatentsArgs {
    /// The command line of one rank under `placement` (`--gpus/--nproc`
    /// dropped; `--gpus` ranks take device `cuda`, i.e. GPU `LOCAL_RANK`).
    pub fn rank_args(&self, placement: Placement) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec!["latents".into()];
        let mut opt = |k: &str, val: String| v.extend([k.into(), val.into()]);
        opt("--data", self.data.display().to_string());
        opt("--vae", self.vae.display().to_string());
        if let Some(c) = &self.vae_config {
            opt("--vae-config", c.display().to_string());
        }
        opt("--out", self.out.display().to_string());
        opt("--image-size", self.image_size.to_string());
        opt("--batch", self.batch.to_string());
        opt("--shard-size", self.shard_size.to_string());
        opt("--seed", self.seed.to_string());
        opt("--limit", self.limit.to_string());
        let device = match placement {
            Placement::Gpus(_) => "cuda".to_string(),
            Placement::Procs(_) => self.device.clone(),
        };
        opt("--device", device);
        if let Some(n) = self.fail_after_batches {
            opt("--fail-after-batches", n.to_string());
        }
        for (on, flag) in [(self.flip, "--flip"), (self.mean, "--mean")] {
            if on {
                v.push(flag.into());
            }
        }
        v
    }
}

/// Runs `dim latents` (one rank of it under `--gpus/--nproc`); returns the
/// number of latents in the finished cache.
///
/// The unit of work is the shard: shard `k` holds latents
/// `k·shard_size ..` (images `k·shard_size / copies ..`), and rank `r` of
/// `W` encodes a contiguous block of shards, each written whole and then
/// renamed. Noise is keyed by latent index and batches start at shard
/// starts, so the cache is the same bytes whatever `W`; a shard already on
/// disk with its full length is skipped, which makes any run resumable with
/// any number of processes. Rank 0 writes the index once all are done.
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
    let config = match &a.vae_config {
        Some(p) => VaeConfig::from_diffusers_json(p)?,
        None => VaeConfig::default(),
    };
    let down = config.downsample();
    if a.image_size as i64 % down != 0 {
        bail!(
            "--image-size {}: must be a multiple of the VAE's downsampling factor {down}",
            a.image_size,
        );
    }
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
    let count = n_images * copies;
    let n_shards = count.div_ceil(a.shard_size);
    let rows = |k: usize| a.shard_size.min(count - k * a.shard_size);

    let place = crate::dist::SampleShard::from_env(n_shards as i64, &a.device)?;
    let side = a.image_size / down as usize;
    let meta = [
        ("scaling_factor", config.scaling_factor.to_string()),
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
        ("shard_size", a.shard_size.to_string()),
    ];
    let mut index = LatentIndex {
        version: 1,
        count,
        sample_shape: vec![config.latent_channels as usize, side, side],
        dtype: "F16".into(),
        has_labels: true,
        shards: Vec::new(),
        meta: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    };
    if place.rank == 0 {
        // `images` may grow between runs (--limit); everything else must match.
        begin_cache(&a.out, &index, &["images"])
            .with_context(|| format!("--out {}", a.out.display()))?;
    }
    // The others look at the folder once rank 0 has checked and claimed it.
    place.barrier()?;
    let device = place.device;
    let vae = VaeSection {
        weights: a.vae.clone(),
        config,
        slice: a.batch as i64,
    }
    .load(device)?;

    let mine = place.start as usize..(place.start + place.count) as usize;
    let mut todo = Vec::new();
    for k in mine.clone() {
        if dim_data::shard_len(&a.out, k)? != Some(rows(k)) {
            todo.push(k);
        }
    }
    let images_of = |ks: &mut dyn Iterator<Item = usize>| ks.map(rows).sum::<usize>() / copies;
    let total = images_of(&mut mine.clone());
    let done = total - images_of(&mut todo.iter().copied());
    tracing::info!(images = n_images, classes, shards = n_shards, rank = place.rank, mine = ?mine, resumed_with = done, out = %a.out.display(), "encoding");
    let bar = match place.rank {
        0 => ProgressBar::new(total as u64),
        _ => ProgressBar::hidden(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} latents [{bar:30}] {pos}/{len} images, {per_sec}, ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_position(done as u64);
    let threads = place.cores.min(16);
    // The batches to encode, in order: (shard, first image, images). Each
    // batch's images are decoded on the CPU while the GPU encodes the one
    // before it.
    let jobs: Vec<(usize, usize, usize)> = todo
        .iter()
        .flat_map(|&k| {
            let (first, end) = (
                k * a.shard_size / copies,
                (k * a.shard_size + rows(k)) / copies,
            );
            (first..end)
                .step_by(a.batch)
                .map(move |f| (k, f, a.batch.min(end - f)))
        })
        .collect();
    std::thread::scope(|scope| -> Result<()> {
        let ds = &ds;
        let load = |&(_, first, b): &(usize, usize, usize)| {
            scope.spawn(move || load_parallel(ds, first, b, threads, a.flip))
        };
        let mut next = jobs.first().map(load);
        let mut shard: Option<ShardWriter> = None;
        for (i, job) in jobs.iter().enumerate() {
            let &(k, first, b) = job;
            let images = next.take().expect("a load per job");
            if a.fail_after_batches == Some(i) {
                bail!("stopped after {i} batches (--fail-after-batches)");
            }
            let (x, y) = images
                .join()
                .unwrap_or_else(|_| bail!("the image loading thread panicked"))?;
            next = jobs.get(i + 1).map(load);
            let w = shard.get_or_insert_with(|| ShardWriter::new(&a.out, k, rows(k)));
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
            // A shard is written as soon as its last batch is in.
            if w.is_full() {
                shard.take().expect("set above").finish()?;
            }
            bar.inc(b as u64);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    // Rank 0 indexes the cache once every rank's shards are in place.
    place.barrier()?;
    if place.rank == 0 {
        index.shards = (0..n_shards)
            .map(|k| ShardInfo {
                file: shard_file_name(k),
                count: rows(k),
            })
            .collect();
        finish_cache(&a.out, &index).with_context(|| format!("--out {}", a.out.display()))?;
    }
    Ok(count)
}

/// Standard-normal noise shaped like `like` `(B, C, h, w)` whose row `i`
/// is the dim-rng stream of latent `first + i` (no global generator is
/// touched), so the draw depends only on `(seed, latent index)`: not on
/// batch boundaries, resumption, the device or the number of processes.
fn posterior_noise(like: &Tensor, seed: u64, first: u64) -> Tensor {
    // A stream family of its own, apart from the training noise of the same seed.
    let seed = dim_rng::derive(seed, &[u64::from_le_bytes(*b"vae-post")]);
    dim_diffusion::NoiseRng::with_first_row(seed, first).randn(
        &like.size(),
        Kind::Float,
        like.device(),
    )
}

/// Images `first..first + n` as a batch `(n, 3, S, S)` with their labels,
/// decoded on up to `threads` threads; with `flip` each image is followed by
/// its mirror image `(2n, 3, S, S)` (DiT's order: orig_0, flip_0, orig_1, ...).
fn load_parallel(
    ds: &Transformed<ImageFolder>,
    first: usize,
    n: usize,
    threads: usize,
    flip: bool,
) -> Result<(Tensor, Vec<i64>)> {
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
    let mut xs = Vec::with_capacity(n);
    let mut ys = Vec::with_capacity(n);
    for c in chunks {
        for (x, y) in c? {
            xs.push(x);
            ys.push(y);
        }
    }
    let x = Tensor::stack(&xs, 0);
    if !flip {
        return Ok((x, ys));
    }
    let s = x.size();
    let both = Tensor::stack(&[&x, &x.flip([3])], 1).reshape([2 * s[0], s[1], s[2], s[3]]);
    Ok((both, ys.iter().flat_map(|&y| [y, y]).collect()))
}

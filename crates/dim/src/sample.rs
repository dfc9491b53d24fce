//! `dim sample`: images (PNG files and a grid) or videos (GIF files and
//! frame strips) from a training checkpoint, in batches, with progress.
//!
//! Latent models decode through the `[vae]` of their config; without one
//! they write latents (`.safetensors`) and say so. Each batch is written as
//! it finishes (`parts/`, then its PNGs), so a run started again with the
//! same arguments resumes after the last finished batch. At the end come
//! `samples.safetensors` (the raw samples, when they fit in memory),
//! `samples.npz` (the ADM evaluator's sample batch: `arr_0` uint8
//! `(N, H, W, 3)`, `arr_1` the labels) and, last, `grid.png`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dim_diffusion::{Diffusion, SampleOptions, SamplerConfig, SamplerKind};
use dim_model::ModelConfig;
use indicatif::ProgressBar;
use tch::{Device, Kind, Tensor};

use dim_io::Group;

use crate::checkpoint;
use crate::config::{section, LoopConfig};
use crate::images;
use crate::runtime::{diffusion_config_of, progress_bar, set_precision, Net};
use crate::vae::{Output, VaeSection};

/// A network restored from a training checkpoint, with its diffusion setup.
pub struct Restored {
    pub net: Net,
    pub diffusion: Diffusion,
    pub sampler: SamplerConfig,
    pub step: u64,
    /// The `[vae]` of the training config, for latent models.
    pub vae: Option<VaeSection>,
}

/// Loads `path` onto `device`, with the EMA weights (`ema = true`, the
/// default for sampling) or the raw training weights.
pub fn restore(path: &Path, device: Device, ema: bool) -> Result<Restored> {
    let ck = checkpoint::open(path)?;
    let table = ck.config_table()?;
    let what = format!("{} (embedded config)", path.display());
    let mcfg = ck.model_config()?;
    let dcfg = diffusion_config_of(&table, &mcfg, &what)?;
    let train: LoopConfig = section(&table, "train", &what)?;
    let net = Net::new(&mcfg, device)?;
    // Sampling runs without autocast; TF32 matmuls as the model trained.
    set_precision(&train.precision, device)?;
    let targets = net.vs.variables().into_iter().collect();
    // The EMA holds trainable weights only; buffers come from the model.
    let group = if ema
        && ck
            .file()
            .names()
            .any(|n| n.starts_with(checkpoint::EMA_GROUP))
    {
        Group::new(checkpoint::EMA_GROUP).or(checkpoint::MODEL_GROUP)
    } else {
        Group::new(checkpoint::MODEL_GROUP)
    };
    ck.load_group(&targets, group)?;
    let vae = match table.get("vae").and_then(|v| v.as_table()) {
        None => None,
        Some(t) => Some(VaeSection::from_table(t, &what)?),
    };
    let diffusion = Diffusion::new(&dcfg.diffusion)?;
    let step = match ck.extra().get("step") {
        Some(s) => s
            .parse()
            .with_context(|| format!("checkpoint {}: step {s:?}", path.display()))?,
        None => 0,
    };
    Ok(Restored {
        net,
        diffusion,
        sampler: dcfg.sampler,
        step,
        vae,
    })
}

/// Parses a sampler name as used on the command line (dim-diffusion's names and aliases).
pub fn parse_sampler(s: &str) -> Result<SamplerKind> {
    Ok(s.parse::<SamplerKind>()?)
}

/// The shape of one sample `(C, H, W)` or `(C, T, H, W)`.
pub fn sample_shape(cfg: &ModelConfig) -> Vec<i64> {
    let [h, w] = cfg.input_size;
    if cfg.is_video() {
        vec![cfg.in_channels, cfg.frames, h, w]
    } else {
        vec![cfg.in_channels, h, w]
    }
}

/// Guidance needs the "no class" label; a config that does not name one
/// gets the model's (DiT's convention: label `num_classes`, the one class
/// dropout trains).
fn default_null_class(sampler: &mut SamplerConfig, model: &ModelConfig) {
    if sampler.guided() && sampler.null_class.is_none() {
        sampler.null_class = Some(model.num_classes);
    }
}

/// Generates `n` samples in batches of `batch` → `(n, C, …)` f32 on the
/// CPU (images in `[-1, 1]`; latents as the model made them). Labels: `class` for all, or `0, 1, …` cycling for
/// class-conditional models. Sample `i`'s noise depends only on `(seed, i)`.
pub fn generate(
    net: &Net,
    diffusion: &Diffusion,
    sampler: &SamplerConfig,
    n: i64,
    batch: i64,
    class: Option<i64>,
    seed: u64,
    bar: Option<&ProgressBar>,
) -> Result<Tensor> {
    let mut sampler = sampler.clone();
    default_null_class(&mut sampler, &net.cfg);
    let mut out = Vec::new();
    for first in (0..n).step_by(batch.max(1) as usize) {
        let b = batch.min(n - first);
        out.push(generate_rows(
            net, diffusion, &sampler, first, b, class, seed,
        )?);
        if let Some(bar) = bar {
            bar.inc(b as u64);
        }
    }
    Ok(Tensor::cat(&out, 0))
}

/// The labels [`generate`] uses for samples `first .. first + n`.
pub fn labels(cfg: &ModelConfig, class: Option<i64>, first: i64, n: i64) -> Option<Vec<i64>> {
    (cfg.num_classes > 0).then(|| {
        (first..first + n)
            .map(|i| class.unwrap_or(i % cfg.num_classes))
            .collect()
    })
}

/// Writes a grid of model outputs `x`: images tile `√n` wide (10 wide for
/// the 10 Fashion-MNIST classes); videos show each sample's frames as a row;
/// latents are decoded by `output`'s VAE, or written as `<path>.safetensors`
/// when there is none. Returns the file written.
pub fn write_grid(x: &Tensor, cfg: &ModelConfig, output: &Output, path: &Path) -> Result<PathBuf> {
    let Some(x) = output.images(x)? else {
        return crate::vae::write_latents(x, path);
    };
    let x = &x;
    if cfg.is_video() {
        // (N, C, T, H, W) → rows of frames.
        let s = x.size();
        let frames = x.transpose(1, 2).reshape([s[0] * s[2], s[1], s[3], s[4]]);
        images::save_grid(&frames, s[2], path)?;
    } else {
        let n = x.size()[0];
        let ncol = if cfg.num_classes > 0 && cfg.num_classes <= 16 {
            cfg.num_classes
        } else {
            (n as f64).sqrt().ceil() as i64
        };
        images::save_grid(x, ncol, path)?;
    }
    Ok(path.to_path_buf())
}

// Options of `dim sample` (a plain comment: a doc comment here would
// replace the subcommand's help text).
#[derive(clap::Args, Debug, Clone)]
pub struct SampleArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output folder (PNG files and grid.png; GIFs and strips for video).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub num: i64,
    /// Samples per batch.
    #[arg(long, default_value_t = 64)]
    pub batch: i64,
    /// Sampling steps (default: the config's [sampler] steps).
    #[arg(long)]
    pub steps: Option<usize>,
    /// ddpm, ddim, dpm++, euler or heun (default: the config's).
    #[arg(long)]
    pub sampler: Option<String>,
    /// Classifier-free guidance scale (1 = off).
    #[arg(long)]
    pub cfg: Option<f64>,
    /// Sample only this class (default: classes cycle 0, 1, ...).
    #[arg(long)]
    pub class: Option<i64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Use the raw training weights instead of their EMA.
    #[arg(long)]
    pub no_ema: bool,
    /// Frames per second of video GIFs.
    #[arg(long, default_value_t = 8)]
    pub fps: u32,
}

impl SampleArgs {
    /// The `dim sample ...` arguments that give these options, on `device`:
    /// what the launcher starts each rank with.
    pub fn to_command_line(&self, device: &str) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec!["sample".into()];
        let mut opt = |k: &str, v: String| args.extend([k.into(), v.into()]);
        opt("--checkpoint", self.checkpoint.display().to_string());
        opt("--out", self.out.display().to_string());
        opt("--num", self.num.to_string());
        opt("--batch", self.batch.to_string());
        opt("--seed", self.seed.to_string());
        opt("--fps", self.fps.to_string());
        opt("--device", device.to_string());
        if let Some(v) = self.steps {
            opt("--steps", v.to_string());
        }
        if let Some(v) = &self.sampler {
            opt("--sampler", v.clone());
        }
        if let Some(v) = self.cfg {
            opt("--cfg", v.to_string());
        }
        if let Some(v) = self.class {
            opt("--class", v.to_string());
        }
        if self.no_ema {
            args.push("--no-ema".into());
        }
        args
    }
}

/// Runs `dim sample`; returns the grid's path.
///
/// Samples are drawn in batches of `batch` into `parts/` (each written
/// whole, then renamed), so an interrupted run resumes after the last full
/// batch. Started as one of several ranks (`dim sample --gpus N`, or
/// torchrun's variables), each rank draws the batches that start in its
/// contiguous share of the `num` samples; rank 0 then writes the gathered
/// outputs.
pub fn run(a: &SampleArgs) -> Result<PathBuf> {
    let shard = crate::dist::SampleShard::from_env(a.num, &a.device)?;
    if shard.rank == 0 {
        images::ensure_writable_dir(&a.out)?;
    }
    // The others write into the folder once rank 0 has made it.
    shard.barrier()?;
    let device = shard.device;
    let r = restore(&a.checkpoint, device, !a.no_ema)?;
    let mut sampler = r.sampler.clone();
    if let Some(s) = &a.sampler {
        sampler.sampler = parse_sampler(s)?;
    }
    if let Some(s) = a.steps {
        sampler.steps = s;
        sampler.respacing = None;
    }
    if let Some(c) = a.cfg {
        if r.net.cfg.num_classes == 0 && c != 1.0 {
            bail!("--cfg {c}: the model is unconditional (num_classes = 0); guidance needs a class-conditional model");
        }
        sampler.cfg_scale = c;
    }
    if let Some(k) = a.class {
        if k < 0 || k >= r.net.cfg.num_classes {
            bail!(
                "--class {k}: the model has {} classes (0..{})",
                r.net.cfg.num_classes,
                r.net.cfg.num_classes
            );
        }
    }
    default_null_class(&mut sampler, &r.net.cfg);
    sampler
        .validate(r.diffusion.config())
        .context("sampler options")?;
    tracing::info!(checkpoint = %a.checkpoint.display(), step = r.step, sampler = ?sampler.sampler, steps = sampler.steps, cfg = sampler.cfg_scale, "sampling {} to {}", a.num, a.out.display());
    let output = Output::for_model(r.vae.as_ref(), &r.net.cfg, device)?;
    let parts = a.out.join("parts");
    if shard.rank == 0 {
        std::fs::create_dir_all(&parts)
            .with_context(|| format!("cannot create {}", parts.display()))?;
    }
    shard.barrier()?;
    // This rank's batches: those starting in its share; the ones already in
    // parts/ (a resumed run) are kept.
    let batch = a.batch.max(1);
    let mine: Vec<(i64, i64)> = (0..a.num)
        .step_by(batch as usize)
        .map(|first| (first, batch.min(a.num - first)))
        .filter(|(first, _)| (shard.start..shard.start + shard.count).contains(first))
        .collect();
    let todo: Vec<(i64, i64)> = mine
        .iter()
        .copied()
        .filter(|&(first, b)| !part_path(&parts, first, b).is_file())
        .collect();
    let done: i64 =
        mine.iter().map(|(_, b)| b).sum::<i64>() - todo.iter().map(|(_, b)| b).sum::<i64>();
    if done > 0 {
        tracing::info!(
            done,
            "resuming after the batches already in {}",
            parts.display()
        );
    }
    let bar = progress_bar(
        mine.iter().map(|(_, b)| *b as u64).sum(),
        shard.rank == 0,
        "{spinner} sample [{bar:30}] {pos}/{len}, ETA {eta}",
    );
    bar.set_position(done as u64);
    for (first, b) in todo {
        // Sample i's noise depends on (seed, i) only: generate rows first..first+b.
        let x = generate_rows(&r.net, &r.diffusion, &sampler, first, b, a.class, a.seed)?;
        let p = part_path(&parts, first, b);
        if let Some(img) = output.images(&x)? {
            if r.net.cfg.is_video() {
                write_videos(&img, a.fps, &a.out, first)?;
            } else {
                images::save_pngs(&img, &a.out, "", first as usize)?;
            }
        }
        // The part last, atomically: a part on disk means its images are too.
        dim_io::save(&p, [("samples".to_string(), x)], &Default::default())?;
        bar.inc(b as u64);
    }
    bar.finish_and_clear();
    // Rank 0 gathers once every rank's batches are in parts/.
    shard.barrier()?;
    let grid_path = a.out.join("grid.png");
    if shard.rank != 0 {
        return Ok(grid_path);
    }
    finish_outputs(a, &r, &output, &parts)
}

fn part_path(dir: &Path, first: i64, n: i64) -> PathBuf {
    dir.join(format!("part-{first:09}-{n}.safetensors"))
}

/// Samples `first .. first + n` (the rows [`generate`] would give them).
fn generate_rows(
    net: &Net,
    diffusion: &Diffusion,
    sampler: &SamplerConfig,
    first: i64,
    n: i64,
    class: Option<i64>,
    seed: u64,
) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let device = net.vs.device();
    let y = labels(&net.cfg, class, first, n).map(|v| Tensor::from_slice(&v).to_device(device));
    let mut full = vec![n];
    full.extend(sample_shape(&net.cfg));
    let opts = SampleOptions {
        device,
        kind: Kind::Float,
        seed,
        first_row: first as u64,
    };
    let denoiser = dim_diffusion::FallibleFn(|x: &Tensor, t: &Tensor, y: Option<&Tensor>| {
        net.model.forward(x, t, y, false)
    });
    let x = diffusion.sample(&denoiser, &full, y.as_ref(), sampler, &opts, |_| {})?;
    // Pixels are clamped to the image range; latents are kept as they are.
    let x = if matches!(net.cfg.in_channels, 1 | 3) {
        x.clamp(-1.0, 1.0)
    } else {
        x
    };
    Ok(x.to_device(Device::Cpu))
}

fn write_videos(x: &Tensor, fps: u32, out: &Path, first: i64) -> Result<()> {
    let mut mp4 = true;
    for i in 0..x.size()[0] {
        let v = x.get(i);
        let k = first + i;
        images::save_gif(&v, fps, &out.join(format!("{k:06}.gif")))?;
        if mp4 && !images::save_mp4(&v, fps, &out.join(format!("{k:06}.mp4")))? {
            tracing::warn!(
                "this dim was built without FFmpeg (the `video` feature): no MP4s, GIFs only"
            );
            mp4 = false;
        }
        images::save_strip(&v, &out.join(format!("{k:06}_strip.png")))?;
    }
    Ok(())
}

/// Raw samples beyond this many bytes are not gathered into one
/// `samples.safetensors` (50,000 images at 256² would be 39 GB); `samples.npz`
/// holds them as bytes instead.
const MAX_GATHER_BYTES: i64 = 4 << 30;

/// After all batches: `samples.safetensors`, `samples.npz` and the grid, in
/// that order; returns the grid's path.
fn finish_outputs(a: &SampleArgs, r: &Restored, output: &Output, parts: &Path) -> Result<PathBuf> {
    let mut files = Vec::new();
    let mut first = 0i64;
    while first < a.num {
        let b = a.batch.max(1).min(a.num - first);
        files.push(part_path(parts, first, b));
        first += b;
    }
    let read = |p: &Path| -> Result<Tensor> {
        Ok(dim_io::TensorFile::open(p).and_then(|f| f.read("samples"))?)
    };
    let head = read(&files[0])?;
    let per: i64 = head.size()[1..].iter().product::<i64>() * 4;
    let latent = !matches!(r.net.cfg.in_channels, 1 | 3);
    if per * a.num <= MAX_GATHER_BYTES {
        let all: Vec<Tensor> = files.iter().map(|p| read(p)).collect::<Result<_>>()?;
        let x = Tensor::cat(&all, 0);
        let name = if latent { "latents" } else { "samples" };
        let p = a.out.join("samples.safetensors");
        dim_io::save(&p, [(name.to_string(), x)], &Default::default())?;
        if latent {
            tracing::info!(path = %p.display(), "raw latents (scaled, as the model made them)");
        }
    } else {
        tracing::info!(
            "{} samples are too many to gather into samples.safetensors; samples.npz holds them",
            a.num
        );
    }
    // The ADM sample batch: uint8 NHWC images and labels.
    if !r.net.cfg.is_video() {
        if let Some(img) = output.images(&head.narrow(0, 0, 1))? {
            let s = img.size();
            let npz = a.out.join("samples.npz");
            let mut w = dim_eval::NpzWriter::create(&npz, a.num, s[2], s[3], 3)?;
            for p in &files {
                let img = output.images(&read(p)?)?.expect("decodable, as the first");
                w.append(&images::to_nhwc_u8(&img)?)?;
            }
            let y = labels(&r.net.cfg, a.class, 0, a.num);
            w.finish(y.as_deref())?;
            tracing::info!(path = %npz.display(), "ADM sample batch (arr_0 uint8 NHWC, arr_1 labels)");
        }
    }
    if r.net.cfg.is_video() {
        // An animated grid of the first 16 clips, 4 wide.
        if let Some(img) = output.images(&head.narrow(0, 0, head.size()[0].min(16)))? {
            images::save_gif_grid(&img, 4, a.fps, &a.out.join("grid.gif"))?;
        }
    }
    let grid_path = a.out.join("grid.png");
    let shown = head.narrow(0, 0, head.size()[0].min(100));
    write_grid(&shown, &r.net.cfg, output, &grid_path)
}

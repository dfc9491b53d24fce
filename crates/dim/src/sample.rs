//! `dim sample`: images (PNG files and a grid) or videos (GIF files and
//! frame strips) from a training checkpoint, in batches, with progress.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dim_diffusion::{Diffusion, SampleOptions, SamplerConfig, SamplerKind};
use dim_model::ModelConfig;
use indicatif::{ProgressBar, ProgressStyle};
use tch::{Device, Kind, Tensor};

use dim_io::Group;

use crate::checkpoint;
use crate::config::{section, LoopConfig};
use crate::images;
use crate::runtime::{diffusion_config_of, set_precision, Net};

/// A network restored from a training checkpoint, with its diffusion setup.
pub struct Restored {
    pub net: Net,
    pub diffusion: Diffusion,
    pub sampler: SamplerConfig,
    pub step: u64,
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

/// Generates `n` samples in batches of `batch` → `(n, C, …)` f32 in
/// `[-1, 1]` on the CPU. Labels: `class` for all, or `0, 1, …` cycling for
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
    generate_range(net, diffusion, sampler, 0, n, batch, class, seed, bar)
}

/// As [`generate`], samples `start..start + n` of the sequence (a rank's
/// shard): each is exactly the sample of that index a single run draws.
pub fn generate_range(
    net: &Net,
    diffusion: &Diffusion,
    sampler: &SamplerConfig,
    start: i64,
    n: i64,
    batch: i64,
    class: Option<i64>,
    seed: u64,
    bar: Option<&ProgressBar>,
) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let device = net.vs.device();
    let mut out = Vec::new();
    let shape = sample_shape(&net.cfg);
    let mut sampler = sampler.clone();
    default_null_class(&mut sampler, &net.cfg);
    for first in (start..start + n).step_by(batch.max(1) as usize) {
        let b = batch.min(start + n - first);
        let y = (net.cfg.num_classes > 0).then(|| match class {
            Some(k) => Tensor::full([b], k, (Kind::Int64, device)),
            None => (Tensor::arange_start(first, first + b, (Kind::Int64, device)))
                .remainder(net.cfg.num_classes),
        });
        let mut full = vec![b];
        full.extend(&shape);
        let opts = SampleOptions {
            device,
            kind: Kind::Float,
            seed,
            first_row: first as u64,
        };
        let denoiser = dim_diffusion::FallibleFn(|x: &Tensor, t: &Tensor, y: Option<&Tensor>| {
            net.model.forward(x, t, y, false)
        });
        let x = diffusion.sample(&denoiser, &full, y.as_ref(), &sampler, &opts, |_| {})?;
        out.push(x.clamp(-1.0, 1.0).to_device(Device::Cpu));
        if let Some(bar) = bar {
            bar.inc(b as u64);
        }
    }
    if out.is_empty() {
        let mut empty = vec![0];
        empty.extend(&shape);
        return Ok(Tensor::zeros(empty, (Kind::Float, Device::Cpu)));
    }
    Ok(Tensor::cat(&out, 0))
}

/// Writes a grid: images tile `√n` wide (10 wide for the 10 Fashion-MNIST
/// classes); videos show each sample's frames as a row.
pub fn write_grid(x: &Tensor, cfg: &ModelConfig, path: &Path) -> Result<()> {
    if cfg.is_video() {
        // (N, C, T, H, W) → rows of frames.
        let s = x.size();
        let frames = x.transpose(1, 2).reshape([s[0] * s[2], s[1], s[3], s[4]]);
        images::save_grid(&frames, s[2], path)
    } else {
        let n = x.size()[0];
        let ncol = if cfg.num_classes > 0 && cfg.num_classes <= 16 {
            cfg.num_classes
        } else {
            (n as f64).sqrt().ceil() as i64
        };
        images::save_grid(x, ncol, path)
    }
}

/// Options of `dim sample`.
#[derive(Debug, Clone)]
pub struct SampleArgs {
    pub checkpoint: PathBuf,
    pub num: i64,
    pub batch: i64,
    pub steps: Option<usize>,
    pub sampler: Option<String>,
    pub cfg: Option<f64>,
    pub class: Option<i64>,
    pub seed: u64,
    pub out: PathBuf,
    pub device: String,
    pub no_ema: bool,
    pub fps: u32,
}

/// Runs `dim sample`; returns the grid's path. Started as one of several
/// ranks (`dim sample --gpus N`, or torchrun's variables), each rank draws
/// its contiguous share of the `num` samples and writes their files; rank 0
/// then gathers the shards into `samples.safetensors` and the grid.
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
    let bar = match shard.rank {
        0 => ProgressBar::new(shard.count as u64),
        _ => ProgressBar::hidden(),
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} sample [{bar:30}] {pos}/{len}, ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let x = generate_range(
        &r.net,
        &r.diffusion,
        &sampler,
        shard.start,
        shard.count,
        a.batch,
        a.class,
        a.seed,
        Some(&bar),
    )?;
    bar.finish_and_clear();
    let grid_path = a.out.join("grid.png");
    if r.net.cfg.is_video() {
        // An animated grid of the first 16 clips, 4 wide.
        let n = x.size()[0].min(16);
        images::save_gif_grid(&x.narrow(0, 0, n), 4, a.fps, &a.out.join("grid.gif"))?;
        let mut mp4 = true;
        for j in 0..x.size()[0] {
            let i = shard.start + j;
            let v = x.get(j);
            images::save_gif(&v, a.fps, &a.out.join(format!("{i:06}.gif")))?;
            if mp4 && !images::save_mp4(&v, a.fps, &a.out.join(format!("{i:06}.mp4")))? {
                tracing::warn!(
                    "this dim was built without FFmpeg (the `video` feature): no MP4s, GIFs only"
                );
                mp4 = false;
            }
            images::save_strip(&v, &a.out.join(format!("{i:06}_strip.png")))?;
        }
    } else {
        images::save_pngs(&x, &a.out, "", shard.start as usize)?;
    }
    // Keep the raw tensor too: `dim eval` reads it without PNG rounding.
    let x = shard.gather(&x, &a.out)?;
    if let Some(x) = x {
        Tensor::write_safetensors(&[("samples", &x)], a.out.join("samples.safetensors"))?;
        let shown = x.narrow(0, 0, x.size()[0].min(100));
        write_grid(&shown, &r.net.cfg, &grid_path)?;
    }
    Ok(grid_path)
}

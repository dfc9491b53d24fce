//! The `dim` command: train, sample and evaluate Diffusion Mamba models.
//!
//! - `dim train --config configs/<x>.toml [--resume <ckpt|auto>] [--gpus N | --nproc N] [key=value ...]`
//! - `dim sample --checkpoint <ckpt> --out <dir> [--num N] [--steps S] [--sampler ...] [--cfg s] [--class k] [--gpus N | --nproc N]`
//! - `dim eval --samples <dir|fashion-mnist:train> [--reference fashion-mnist:test] [--features ...]`
//! - `dim train-features [--video]`: the Fashion-MNIST feature classifier for `dim eval` (`--video`: the clip classifier for `dim fvd`)
//! - `dim fvd --samples <dir> --reference <config.toml>`: Fréchet video distance
//! - `dim latents --data <ImageFolder> --vae <weights> --out <cache>`: the latent cache of a dataset
//! - `dim ops scan|vae|inception`: single ops from files
//! - `dim demo`: a small DiM on Fashion-MNIST in about ten minutes, a sample grid and its FID
//!
//! See `docs/cli.md`.

mod checkpoint;
mod config;
mod demo;
mod dist;
mod eval;
mod guard;
mod images;
mod latents;
mod launch;
mod metrics;
mod ops;
mod optim;
mod runtime;
mod sample;
mod train;
mod vae;
mod video_features;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "dim",
    version,
    about = "Train, sample and evaluate Diffusion Mamba (DiM) models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a TOML config.
    Train {
        /// The config file (see configs/).
        #[arg(long)]
        config: PathBuf,
        /// Resume from a checkpoint file, or `auto` for the newest in train.out_dir.
        #[arg(long)]
        resume: Option<String>,
        /// Data-parallel training on N GPUs of this machine (one process each, NCCL).
        #[arg(long, conflicts_with = "nproc")]
        gpus: Option<usize>,
        /// Data-parallel training in N processes on train.device (on CPU: Gloo).
        #[arg(long)]
        nproc: Option<usize>,
        /// Overrides such as `train.steps=100 optim.lr=2e-4`.
        overrides: Vec<String>,
    },
    /// Sample images or videos from a training checkpoint.
    Sample {
        #[command(flatten)]
        args: sample::SampleArgs,
        /// Sample on N GPUs of this machine, one process each with its share.
        #[arg(long, conflicts_with = "nproc")]
        gpus: Option<usize>,
        /// Sample in N processes on --device, each with its share.
        #[arg(long)]
        nproc: Option<usize>,
    },
    /// FID and precision/recall between generated samples and a reference set
    /// (with --features inception: the ADM evaluator's FID, sFID, IS, precision/recall).
    Eval {
        /// Generated images: a `dim sample` folder, a .safetensors, fashion-mnist:train|test, or a config .toml.
        #[arg(long)]
        samples: String,
        /// Reference images (same forms as --samples).
        #[arg(long, default_value = "fashion-mnist:test")]
        reference: String,
        /// fmnist-classifier (default) or inception.
        #[arg(long, default_value = "fmnist-classifier")]
        features: String,
        /// Weights of the feature network (safetensors).
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Use at most this many generated samples (0 = all).
        #[arg(long, default_value_t = 0)]
        num: usize,
        /// k of the precision/recall k-NN radii.
        #[arg(long, default_value_t = 3)]
        k: usize,
        #[arg(long, default_value_t = 500)]
        batch: usize,
        #[arg(long, default_value = "auto")]
        device: String,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Train the Fashion-MNIST feature classifier used by `dim eval` (`--video`: the Moving Fashion-MNIST clip classifier used by `dim fvd`).
    TrainFeatures {
        /// Weights to write (default: runs/features/fmnist_classifier.safetensors, or mfmnist_video_classifier.safetensors with --video).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 2)]
        epochs: usize,
        /// Train the video classifier (FVD features) on Moving Fashion-MNIST clips.
        #[arg(long)]
        video: bool,
        /// With --video: a config whose [data] is the Moving Fashion-MNIST the models train on.
        #[arg(long, requires = "video")]
        data: Option<PathBuf>,
        /// With --video: training clips.
        #[arg(long, default_value_t = 4000, requires = "video")]
        clips: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Fréchet video distance between generated and reference clips.
    Fvd(video_features::FvdArgs),
    /// Train a small DiM on Fashion-MNIST, write a class-conditional grid and print its FID.
    Demo(demo::DemoArgs),
    /// Run single ops from files (the selective scan, the VAE, Inception), to check them against other implementations.
    Ops(ops::OpsArgs),
    /// Encode an ImageFolder dataset through the VAE into a latent cache (resumable).
    Latents(latents::LatentsArgs),
}

fn main() {
    let filter = EnvFilter::try_from_env("DIM_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Sets a flag on Ctrl-C; the training loop checkpoints and exits at the next
/// step boundary. A second Ctrl-C exits at once.
fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || {
        if s.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\nCtrl-C: saving a checkpoint at the end of this step (Ctrl-C again to quit now)"
        );
    })
    .context("installing the Ctrl-C handler")?;
    Ok(stop)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train {
            config,
            resume,
            gpus,
            nproc,
            overrides,
        } => {
            let cfg = config::TrainConfig::load(&config, &overrides)?;
            if let Some(placement) = launch::placement(gpus, nproc) {
                let mut args: Vec<std::ffi::OsString> =
                    vec!["train".into(), "--config".into(), config.into_os_string()];
                if let Some(r) = resume {
                    args.extend(["--resume".into(), r.into()]);
                }
                args.extend(overrides.into_iter().map(Into::into));
                if let launch::Placement::Gpus(_) = placement {
                    // Each rank takes GPU LOCAL_RANK.
                    args.push("train.device=cuda".into());
                }
                return launch::run(placement, &args, stop_flag()?);
            }
            let resume = resume.map(|r| match r.as_str() {
                "auto" => train::Resume::Auto,
                p => train::Resume::Path(PathBuf::from(p)),
            });
            let stop = stop_flag()?;
            let out = guard::libtorch_boundary("training", || train::train(&cfg, resume, stop))?;
            if !out.primary {
                return Ok(());
            }
            if out.interrupted {
                eprintln!(
                    "interrupted at step {}; continue with --resume auto",
                    out.step
                );
            }
            println!("{}", out.checkpoint.display());
            Ok(())
        }
        Command::Sample { args, gpus, nproc } => {
            if let Some(placement) = launch::placement(gpus, nproc) {
                let device = match placement {
                    launch::Placement::Gpus(_) => "cuda",
                    launch::Placement::Procs(_) => &args.device,
                };
                let argv = args.to_command_line(device);
                return launch::run(placement, &argv, stop_flag()?);
            }
            let primary = std::env::var("RANK").map_or(true, |r| r.trim() == "0");
            let grid = sample::run(&args)?;
            if primary {
                println!("{}", grid.display());
            }
            Ok(())
        }
        Command::Eval {
            samples,
            reference,
            features,
            weights,
            num,
            k,
            batch,
            device,
            json,
        } => {
            let device = runtime::resolve_device(&device)?;
            let weights = weights.unwrap_or_else(eval::default_features_path);
            let text = if features == "inception" {
                // The ADM evaluator's metrics: FID, sFID, IS, precision/recall.
                let net = dim_eval::InceptionV3::load(&weights, device).context(
                    "Inception-v3 FID weights: convert pt_inception-2015-12-05 to safetensors, see docs/eval.md",
                )?;
                let report = eval::evaluate_adm(&samples, &reference, &net, num, k, batch.max(1))?;
                serde_json::to_string_pretty(&report)?
            } else {
                let ext = eval::feature_network(&features, &weights, device)?;
                let report =
                    eval::evaluate(&samples, &reference, ext.as_ref(), num, k, batch.max(1))?;
                serde_json::to_string_pretty(&report)?
            };
            if let Some(p) = json {
                std::fs::write(&p, &text)
                    .with_context(|| format!("cannot write {}", p.display()))?;
            }
            println!("{text}");
            Ok(())
        }
        Command::TrainFeatures {
            out,
            epochs,
            video,
            data,
            clips,
            seed,
            device,
        } => {
            let cfg = dim_eval::ClassifierTrainConfig {
                epochs,
                seed,
                ..Default::default()
            };
            if video {
                let out = out.unwrap_or_else(|| video_features::DEFAULT_VIDEO_FEATURES.into());
                let args = video_features::VideoFeatureArgs {
                    out: out.clone(),
                    data,
                    clips,
                    train: dim_eval::ClassifierTrainConfig {
                        batch_size: 32,
                        ..cfg
                    },
                    device,
                };
                let acc = video_features::train_video_features(&args)?;
                println!("{} (held-out garment accuracy {:.4})", out.display(), acc);
                return Ok(());
            }
            let out = out.unwrap_or_else(eval::default_features_path);
            let acc = eval::train_features(&out, &cfg, &device)?;
            println!("{} (test accuracy {:.4})", out.display(), acc);
            Ok(())
        }
        Command::Fvd(args) => video_features::run_fvd(&args).map(|_| ()),
        Command::Demo(args) => demo::run(&args, stop_flag()?),
        Command::Ops(args) => ops::run(args),
        Command::Latents(args) => {
            if let Some(placement) = launch::placement(args.gpus, args.nproc) {
                return launch::run(placement, &args.rank_args(placement), stop_flag()?);
            }
            let n = latents::run(&args)?;
            if std::env::var("RANK").map_or(true, |r| r.trim() == "0") {
                println!("{} ({n} latents)", args.out.display());
            }
            Ok(())
        }
    }
}

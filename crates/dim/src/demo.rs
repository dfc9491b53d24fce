//! `dim demo`: the out-of-the-box run behind `cargo xtask demo`.
//!
//! Trains a small class-conditional DiM on Fashion-MNIST for a fixed wall
//! time (about ten minutes; a larger preset on a GPU), trains the feature
//! classifier if it is not cached, writes a 10×10 class-conditional grid
//! and prints its path and the FID of its samples (200 on a CPU, 2,000 on a
//! GPU) against the test split.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;

use crate::config::{load_table_str, TrainConfig};
use crate::{eval, runtime, sample, train};

/// The CPU demo config (embedded so that the demo runs from any folder).
const DEMO_CPU: &str = include_str!("../../../configs/demo.toml");
/// The GPU demo config: a larger preset for the same wall time.
const DEMO_GPU: &str = include_str!("../../../configs/demo_gpu.toml");

/// Options of `dim demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Output folder.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Training wall time in minutes (the feature classifier, sampling and FID take about two more on a CPU).
    #[arg(long, default_value_t = 7.0)]
    pub minutes: f64,
    /// Generated samples for the FID.
    #[arg(long)]
    pub fid_samples: Option<i64>,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Config overrides, as for `dim train`.
    pub overrides: Vec<String>,
}

/// Runs the demo.
pub fn run(a: &DemoArgs, stop: Arc<AtomicBool>) -> Result<()> {
    let started = Instant::now();
    let device = runtime::resolve_device(&a.device)?;
    let gpu = device.is_cuda();
    let mut overrides = vec![
        format!("train.out_dir=\"{}\"", a.out.join("train").display()),
        format!("train.time_limit_s={}", a.minutes * 60.0),
        format!("train.device=\"{}\"", a.device),
    ];
    overrides.extend(a.overrides.iter().cloned());
    let (text, name) = if gpu {
        (DEMO_GPU, "configs/demo_gpu.toml")
    } else {
        (DEMO_CPU, "configs/demo.toml")
    };
    let table = load_table_str(text, name, &overrides)?;
    let cfg = TrainConfig::from_table(table, name)?;
    tracing::info!(
        "demo: training {} for {:.1} min on {:?}",
        name,
        a.minutes,
        device
    );
    let out = train::train(&cfg, None, stop)?;

    let features = cfg.eval.features_path.clone();
    if !features.exists() {
        tracing::info!(
            "demo: training the feature classifier ({})",
            features.display()
        );
        let ccfg = dim_eval::ClassifierTrainConfig {
            epochs: if gpu { 5 } else { 1 },
            ..Default::default()
        };
        eval::train_features(&features, &ccfg, &a.device)?;
    }

    let samples_dir = a.out.join("samples");
    let n = a.fid_samples.unwrap_or(if gpu { 2_000 } else { 200 });
    let grid = sample::run(&sample::SampleArgs {
        checkpoint: out.checkpoint.clone(),
        num: n.max(100),
        batch: if gpu { 500 } else { 100 },
        steps: None,
        sampler: None,
        cfg: None,
        class: None,
        seed: 0,
        out: samples_dir.clone(),
        device: a.device.clone(),
        no_ema: false,
        fps: 8,
    })?;
    let ext = eval::feature_network("fmnist-classifier", &features, device)?;
    let report = eval::evaluate(
        &samples_dir.display().to_string(),
        "fashion-mnist:test",
        ext.as_ref(),
        0,
        3,
        500,
    )?;
    std::fs::write(
        a.out.join("eval.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("sample grid: {}", grid.display());
    println!(
        "FID ({} samples vs Fashion-MNIST test, project features): {:.2}   precision {:.3}   recall {:.3}",
        report.num_generated, report.fid, report.precision, report.recall
    );
    println!(
        "trained {} steps; demo took {:.1} min",
        out.step,
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

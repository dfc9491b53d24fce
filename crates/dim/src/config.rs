//! The training configuration: one TOML file with a table per concern,
//! `key.sub=value` overrides from the command line, and errors that name the
//! key and the file.
//!
//! ```toml
//! [model]      # dim-model's ModelConfig (e.g. preset = "DiM-S/2" plus overrides)
//! [diffusion]  # dim-diffusion's DiffusionConfig
//! [sampler]    # dim-diffusion's SamplerConfig (used by sample grids and `dim sample`)
//! [data]       # dim-data's DataConfig (kind = "fashion_mnist", ...)
//! [loader]     # dim-data's LoaderConfig (workers, prefetch)
//! [optim]      # OptimConfig
//! [train]      # LoopConfig
//! [eval]       # EvalConfig
//! [dist]       # DistConfig (data-parallel runs: timeout, gradient buckets)
//! ```

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A configuration problem, always naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {file}: {detail}")]
    Invalid { file: String, detail: String },
    #[error(
        "override `{arg}`: {detail} (overrides look like `train.steps=100` or `optim.lr=1e-4`)"
    )]
    Override { arg: String, detail: String },
}

/// Parses a config file, applying `overrides` (`a.b=value`, the value read as
/// TOML, else as a bare string) before deserialising.
pub fn load_table(path: &Path, overrides: &[String]) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    load_table_str(&text, &path.display().to_string(), overrides)
}

/// As [`load_table`], from text (`file` names it in messages).
pub fn load_table_str(
    text: &str,
    file: &str,
    overrides: &[String],
) -> Result<toml::Table, ConfigError> {
    let mut table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| ConfigError::Invalid {
                file: file.to_string(),
                detail: format!("not valid TOML: {e}"),
            })?;
    for o in overrides {
        apply_override(&mut table, o)?;
    }
    Ok(table)
}

/// Sets `key.sub=value` in `table`, creating intermediate tables.
pub fn apply_override(table: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
    let err = |detail: String| ConfigError::Override {
        arg: arg.to_string(),
        detail,
    };
    let (key, raw) = arg.split_once('=').ok_or_else(|| err("no `=`".into()))?;
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err("empty key segment".into()));
    }
    let raw = raw.trim();
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let next = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        cur = next
            .as_table_mut()
            .ok_or_else(|| err(format!("`{p}` is a value, not a table")))?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// Deserialises table `section` of `table` (missing = all defaults).
pub fn section<T: DeserializeOwned>(
    table: &toml::Table,
    section: &str,
    file: &str,
) -> Result<T, ConfigError> {
    let sub = table
        .get(section)
        .cloned()
        .unwrap_or_else(|| toml::Value::Table(Default::default()));
    T::deserialize(sub).map_err(|e| ConfigError::Invalid {
        file: file.to_string(),
        detail: format!("[{section}]: {}", e.message()),
    })
}

/// AdamW, warmup, clipping and EMA.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Adam `(β₁, β₂)`.
    pub betas: [f64; 2],
    /// Adam ε.
    pub eps: f64,
    /// Decoupled weight decay (AdamW); 0 as DiT.
    pub weight_decay: f64,
    /// Linear warmup from 0 over this many optimizer steps.
    pub warmup_steps: u64,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub grad_clip: f64,
    /// EMA decay of the weights (DiT: 0.9999).
    pub ema_decay: f64,
    /// Steps before the EMA starts tracking (it copies the weights until then).
    pub ema_start: u64,
    /// Warm the decay up as `min(ema_decay, (1 + n) / (10 + n))` after `n`
    /// tracked steps, so that a short run's EMA does not still hold its
    /// initial weights (0.9999 keeps 70% of them after 3,500 steps).
    pub ema_warmup: bool,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 0,
            grad_clip: 1.0,
            ema_decay: 0.9999,
            ema_start: 0,
            ema_warmup: true,
        }
    }
}

/// The training loop.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoopConfig {
    /// Optimizer steps to train for.
    pub steps: u64,
    /// Stop after this many seconds of training instead (0 = no limit); the
    /// demo uses it to fit a time budget.
    pub time_limit_s: f64,
    /// Images per optimizer step (split into `grad_accum` micro-batches).
    pub batch_size: i64,
    /// Micro-batches per optimizer step.
    pub grad_accum: i64,
    /// Seed of initialisation, data order and noise.
    pub seed: u64,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `f32`; `tf32`: f32 weights and activations, with TF32 tensor cores
    /// for matmuls and convolutions (as DiT trains); or `bf16`: libtorch's
    /// CUDA autocast in bf16 around the forward (`amp` is another name for
    /// it). All three are plain f32 on CPU.
    pub precision: String,
    /// Output folder: checkpoints, metrics.jsonl, sample grids.
    pub out_dir: PathBuf,
    /// Log every N steps.
    pub log_every: u64,
    /// Write a sample grid every N steps (0 = never).
    pub sample_every: u64,
    /// Images in each sample grid.
    pub sample_grid: i64,
    /// Checkpoint every N steps (and at the end, and on Ctrl-C).
    pub ckpt_every: u64,
    /// Keep the last K checkpoints.
    pub keep_last: usize,
    /// CPU threads for libtorch (0 = libtorch's default).
    pub threads: i32,
    /// Record this many steps with libtorch's profiler (0 = none) into
    /// `<out_dir>/trace.json`, a Chrome trace of rank 0's host operators
    /// and GPU kernels, copies and collectives.
    pub profile_steps: u64,
    /// The first profiled step (after warm-up).
    pub profile_from: u64,
    /// Whether the profile records the host's operators too (they slow the
    /// host down; false keeps only the GPU's activity, for a truer timeline).
    pub profile_host: bool,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            time_limit_s: 0.0,
            batch_size: 64,
            grad_accum: 1,
            seed: 0,
            device: "auto".into(),
            precision: "f32".into(),
            out_dir: PathBuf::from("runs/default"),
            log_every: 50,
            sample_every: 0,
            sample_grid: 64,
            ckpt_every: 1000,
            keep_last: 3,
            threads: 0,
            profile_steps: 0,
            profile_from: 10,
            profile_host: true,
        }
    }
}

/// Data-parallel training (`dim train --gpus N` / `--nproc N`, or torchrun's
/// environment); ignored by single-process runs. See docs/distributed.md.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    /// Seconds a rank waits for the rendezvous or a collective before it
    /// gives up (a peer crashed, was killed or hangs) and exits naming it.
    pub timeout_s: f64,
    /// Gradient bucket size of the all-reduce, MiB (DDP's 25).
    pub bucket_mib: f64,
    /// The first bucket (the last layers' gradients, ready first), MiB.
    pub first_bucket_mib: f64,
    /// DDP's `gradient_as_bucket_view` (default true): gradients live in
    /// the buckets, one copy of every gradient less per step.
    pub grad_as_bucket_view: bool,
    /// Wire type of the gradient all-reduce: `none` (f32, equal to one
    /// process to rounding), `f16` or `bf16` (half the bytes).
    pub compress: dim_dist::Compress,
}

impl Default for DistConfig {
    fn default() -> Self {
        // The reducer's knobs default as in dim-dist (DDP's defaults).
        let r = dim_dist::ReducerOptions::default();
        Self {
            timeout_s: 300.0,
            bucket_mib: r.bucket_mib,
            first_bucket_mib: r.first_bucket_mib,
            grad_as_bucket_view: r.grad_as_bucket_view,
            compress: r.compress,
        }
    }
}

/// Evaluation settings (`dim eval`, the demo).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// `fmnist-classifier` or `inception`.
    pub features: String,
    /// Weights of the feature network (safetensors).
    pub features_path: PathBuf,
    /// Generated samples to compare.
    pub num_samples: usize,
    /// Reference split of the training dataset.
    pub reference_split: String,
    /// k of the precision/recall radii.
    pub k: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            features: "fmnist-classifier".into(),
            features_path: PathBuf::from("runs/features/fmnist_classifier.safetensors"),
            num_samples: 10_000,
            reference_split: "test".into(),
            k: 3,
        }
    }
}

/// Everything `dim train` reads.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// The `[model]` table, handed to dim-model.
    pub model: toml::Table,
    /// The `[diffusion]` and `[sampler]` tables, handed to dim-diffusion.
    pub diffusion: toml::Table,
    /// `[data]`: dim-data's dataset description.
    pub data: dim_data::DataConfig,
    /// `[loader]`: workers and prefetch (batch size and seed come from `[train]`).
    pub loader: dim_data::LoaderConfig,
    pub optim: OptimConfig,
    pub train: LoopConfig,
    pub eval: EvalConfig,
    pub dist: DistConfig,
    /// `[vae]`: the autoencoder of a latent model (see `crate::vae`).
    pub vae: Option<crate::vae::VaeSection>,
    /// The `[vae]` table as written (kept for checkpoints).
    pub vae_table: Option<toml::Table>,
    /// The file it came from (for messages).
    pub file: String,
}

impl TrainConfig {
    /// Reads `path` with overrides and validates the parts this crate owns.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let table = load_table(path, overrides)?;
        Self::from_table(table, &path.display().to_string())
    }

    /// Builds from an already-parsed table (e.g. a checkpoint's embedded config).
    pub fn from_table(table: toml::Table, file: &str) -> Result<Self, ConfigError> {
        let known = [
            "model",
            "diffusion",
            "sampler",
            "data",
            "loader",
            "optim",
            "train",
            "eval",
            "dist",
            "vae",
        ];
        if let Some(k) = table.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ConfigError::Invalid {
                file: file.into(),
                detail: format!(
                    "unknown table or key `{k}` (known tables: {})",
                    known.join(", ")
                ),
            });
        }
        let sub = |name: &str| -> Result<toml::Table, ConfigError> {
            match table.get(name) {
                None => Ok(Default::default()),
                Some(toml::Value::Table(t)) => Ok(t.clone()),
                Some(_) => Err(ConfigError::Invalid {
                    file: file.into(),
                    detail: format!("`{name}` must be a table ([{name}])"),
                }),
            }
        };
        let model = sub("model")?;
        if model.is_empty() {
            return Err(ConfigError::Invalid {
                file: file.into(),
                detail: "missing [model] table (e.g. [model] preset = \"DiM-S/2\")".into(),
            });
        }
        let mut diffusion = toml::Table::new();
        for name in ["diffusion", "sampler"] {
            if table.contains_key(name) {
                diffusion.insert(name.into(), toml::Value::Table(sub(name)?));
            }
        }
        let cfg = Self {
            model,
            diffusion,
            data: {
                if !table.contains_key("data") {
                    return Err(ConfigError::Invalid {
                        file: file.into(),
                        detail: "missing [data] table (e.g. [data] kind = \"fashion_mnist\")"
                            .into(),
                    });
                }
                let d: dim_data::DataConfig = section(&table, "data", file)?;
                d.validate().map_err(|e| ConfigError::Invalid {
                    file: file.into(),
                    detail: format!("[data]: {e}"),
                })?;
                d
            },
            loader: section(&table, "loader", file)?,
            optim: section(&table, "optim", file)?,
            train: section(&table, "train", file)?,
            eval: section(&table, "eval", file)?,
            dist: section(&table, "dist", file)?,
            vae: match table.get("vae") {
                None => None,
                Some(_) => Some(
                    crate::vae::VaeSection::from_table(&sub("vae")?, file).map_err(|e| {
                        ConfigError::Invalid {
                            file: file.into(),
                            detail: format!("[vae]: {e:#}"),
                        }
                    })?,
                ),
            },
            vae_table: table.get("vae").and_then(|v| v.as_table().cloned()),
            file: file.into(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, what: &str| {
            Err(ConfigError::Invalid {
                file: self.file.clone(),
                detail: format!("`{key}` {what}"),
            })
        };
        let (o, t) = (&self.optim, &self.train);
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return bad("optim.lr", "must be a positive number");
        }
        if o.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return bad("optim.betas", "must be two numbers in [0, 1)");
        }
        if !(0.0..=1.0).contains(&o.ema_decay) {
            return bad("optim.ema_decay", "must be in [0, 1]");
        }
        if o.weight_decay < 0.0 || o.grad_clip < 0.0 || o.eps <= 0.0 {
            return bad(
                "optim.weight_decay / optim.grad_clip / optim.eps",
                "must not be negative (eps > 0)",
            );
        }
        if t.batch_size <= 0 || t.grad_accum <= 0 || t.batch_size % t.grad_accum != 0 {
            return bad(
                "train.batch_size",
                "must be positive and divisible by train.grad_accum",
            );
        }
        if t.keep_last == 0 {
            return bad("train.keep_last", "must be at least 1");
        }
        if t.log_every == 0 || t.ckpt_every == 0 {
            return bad("train.log_every / train.ckpt_every", "must be at least 1");
        }
        let d = &self.dist;
        if !(d.timeout_s > 0.0 && d.bucket_mib > 0.0 && d.first_bucket_mib > 0.0) {
            return bad(
                "dist.timeout_s / dist.bucket_mib / dist.first_bucket_mib",
                "must be positive",
            );
        }
        if !["bf16", "amp", "f32", "tf32"].contains(&t.precision.as_str()) {
            return bad("train.precision", "must be \"f32\", \"tf32\" or \"bf16\"");
        }
        Ok(())
    }

    /// The whole configuration as one TOML table (stored in checkpoints).
    pub fn to_table(&self) -> toml::Table {
        let mut t = toml::Table::new();
        t.insert("model".into(), toml::Value::Table(self.model.clone()));
        for (k, v) in &self.diffusion {
            t.insert(k.clone(), v.clone());
        }
        t.insert("data".into(), val(&self.data));
        t.insert("loader".into(), val(&self.loader));
        t.insert("optim".into(), val(&self.optim));
        t.insert("train".into(), val(&self.train));
        t.insert("eval".into(), val(&self.eval));
        t.insert("dist".into(), val(&self.dist));
        if let Some(v) = &self.vae_table {
            t.insert("vae".into(), toml::Value::Table(v.clone()));
        }
        t
    }
}

fn val<T: Serialize>(x: &T) -> toml::Value {
    // Plain structs of numbers, strings and paths always serialise.
    toml::Value::try_from(x).unwrap_or_else(|_| toml::Value::Table(Default::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_parse_toml_values_and_create_tables() {
        let mut t: toml::Table = "[optim]\nlr = 1.0\n".parse().unwrap();
        apply_override(&mut t, "optim.lr=2e-4").unwrap();
        apply_override(&mut t, "train.device=cpu").unwrap();
        apply_override(&mut t, "optim.betas=[0.5, 0.6]").unwrap();
        apply_override(&mut t, "a.b.c=\"x y\"").unwrap();
        assert_eq!(t["optim"]["lr"].as_float(), Some(2e-4));
        assert_eq!(t["train"]["device"].as_str(), Some("cpu"));
        assert_eq!(t["optim"]["betas"].as_array().unwrap().len(), 2);
        assert_eq!(t["a"]["b"]["c"].as_str(), Some("x y"));
        let e = apply_override(&mut t, "optim.lr.x=1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`lr` is a value"), "{e}");
        assert!(apply_override(&mut t, "nokey").is_err());
        assert!(apply_override(&mut t, "a..b=1").is_err());
    }

    #[test]
    fn unknown_sections_and_keys_name_the_file() {
        let t: toml::Table =
            "[model]\npreset = \"DiM-S/2\"\n[data]\nkind = \"fashion_mnist\"\n[trian]\nsteps = 1\n"
                .parse()
                .unwrap();
        let e = TrainConfig::from_table(t, "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.toml") && e.contains("`trian`"), "{e}");
        let t: toml::Table = "[model]\npreset = \"DiM-S/2\"\n[data]\nkind = \"fashion_mnist\"\n[train]\nbatch_size = 10\ngrad_accum = 3\n"
            .parse()
            .unwrap();
        let e = TrainConfig::from_table(t, "y.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("y.toml") && e.contains("train.batch_size"),
            "{e}"
        );
        let t: toml::Table = "[data]\nkind = \"fashion_mnist\"\n".parse().unwrap();
        let e = TrainConfig::from_table(t, "z.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing [model]"), "{e}");
    }
}

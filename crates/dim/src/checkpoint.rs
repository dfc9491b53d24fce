//! Training checkpoints in the workspace's one checkpoint format
//! (`dim_model::checkpoint`): the model, its EMA and the optimizer moments
//! as tensor groups, and the step, data position, RNG seed and the full
//! config as metadata. Written streamed and atomically (temporary file,
//! fsync, rename, fsync of the folder) so that a crash or Ctrl-C never
//! leaves a torn file; the last K are kept.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
pub use dim_model::checkpoint::{open_checkpoint as open, EMA_GROUP, MODEL_GROUP};
use tch::Tensor;

/// Prefix of the optimizer state group.
pub const OPTIM_GROUP: &str = "optim/";

/// A checkpoint being assembled for writing: named tensors (shallow
/// references to the live ones; each is copied to the host only while it
/// is written) and string metadata.
#[derive(Debug, Default)]
pub struct Checkpoint {
    /// `model/<name>`, `ema/<name>`, `optim/m/<name>`, `optim/v/<name>`.
    pub tensors: BTreeMap<String, Tensor>,
    /// `config` (TOML), `step`, `data_position`, `seed`, ...
    pub meta: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Writes to `path` (streamed, atomic); `meta["config"]` is the run's
    /// config and becomes the checkpoint's config.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut extra = self.meta.clone();
        let config = extra
            .remove(dim_model::checkpoint::CONFIG_KEY)
            .context("a training checkpoint needs its config")?;
        let tensors = self
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()));
        dim_model::write_checkpoint(path, tensors, &config, &extra).with_context(|| {
            format!(
                "cannot write checkpoint {} (the earlier checkpoints beside it are untouched; free space or pick another train.out_dir, then --resume auto)",
                path.display()
            )
        })
    }
}

/// `<dir>/ckpt-<step>.safetensors`, zero-padded so names sort by step.
pub fn path_for_step(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("ckpt-{step:09}.safetensors"))
}

/// Checkpoints in `dir`, oldest first.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("ckpt-") && n.ends_with(".safetensors"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Deletes all but the newest `keep` checkpoints in `dir`, and temporary
/// files that a killed writer left.
pub fn prune(dir: &Path, keep: usize) -> Result<()> {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".ckpt-") && name.ends_with(".tmp") {
            let _ = fs::remove_file(entry.path());
        }
    }
    let all = list(dir);
    for p in &all[..all.len().saturating_sub(keep)] {
        fs::remove_file(p).with_context(|| format!("removing old checkpoint {}", p.display()))?;
    }
    Ok(())
}

/// The newest checkpoint in `dir`, if any (`--resume auto`).
pub fn latest(dir: &Path) -> Option<PathBuf> {
    list(dir).pop()
}

//! The one checkpoint format of the workspace, read by `dim_model` and by
//! every `dim` command.
//!
//! A safetensors file (written and read one tensor at a time by `dim-io`)
//! whose tensors are grouped by prefix: [`MODEL_GROUP`] `model/<name>` holds
//! the network's variables; training checkpoints add [`EMA_GROUP`]
//! `ema/<name>` and `optim/...`. Its metadata holds [`FORMAT_KEY`] and
//! [`CONFIG_KEY`]: a TOML document with at least a `[model]` table (`dim
//! train` stores its whole run config there), plus caller keys such as
//! `step`.

use std::collections::BTreeMap;
use std::path::Path;

use dim_io::{Group, TensorFile};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::network::Model;

/// Metadata key of the format tag.
pub const FORMAT_KEY: &str = "format";
/// The format tag this crate writes.
pub const FORMAT: &str = "dim-checkpoint/1";
/// The tag of `dim train` checkpoints written before the formats were one:
/// the same layout, still read.
const FORMAT_TRAIN_V1: &str = "dim-train-checkpoint/1";
/// Metadata key of the config (TOML with a `[model]` table).
pub const CONFIG_KEY: &str = "config";
/// Prefix of the network's variables.
pub const MODEL_GROUP: &str = "model/";
/// Prefix of the EMA weights (trainable variables only).
pub const EMA_GROUP: &str = "ema/";

fn ck_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Writes a checkpoint: `tensors` (already named with their group prefix),
/// `config` as the [`CONFIG_KEY`] TOML (it must hold a `[model]` table) and
/// `extra` metadata, whose keys may not be `format` or `config`. Streamed
/// and atomic (see `dim_io::save`).
pub fn write_checkpoint(
    path: &Path,
    tensors: impl IntoIterator<Item = (String, Tensor)>,
    config: &str,
    extra: &BTreeMap<String, String>,
) -> Result<()> {
    if let Some(key) = extra
        .keys()
        .find(|k| [FORMAT_KEY, CONFIG_KEY].contains(&k.as_str()))
    {
        return Err(ck_err(path, format!("metadata key {key:?} is reserved")));
    }
    let mut meta = extra.clone();
    meta.insert(FORMAT_KEY.into(), FORMAT.into());
    meta.insert(CONFIG_KEY.into(), config.into());
    dim_io::save(path, tensors, &meta)?;
    tracing::info!(path = %path.display(), "saved checkpoint");
    Ok(())
}

/// An opened checkpoint: the header is read and checked, tensors are read
/// on demand, group by group, into their destinations.
#[derive(Debug)]
pub struct CheckpointFile {
    file: TensorFile,
}

/// Opens a checkpoint and checks its format tag.
pub fn open_checkpoint(path: &Path) -> Result<CheckpointFile> {
    let file = TensorFile::open(path)?;
    match file.metadata().get(FORMAT_KEY).map(String::as_str) {
        Some(FORMAT | FORMAT_TRAIN_V1) => Ok(CheckpointFile { file }),
        other => Err(ck_err(
            path,
            format!(
                "not a diffusion-mamba checkpoint: its metadata has `{FORMAT_KEY}` = {other:?}, not {FORMAT:?}"
            ),
        )),
    }
}

impl CheckpointFile {
    /// The underlying tensor file.
    pub fn file(&self) -> &TensorFile {
        &self.file
    }

    /// The checkpoint's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// A metadata value, or an error naming the checkpoint and the key.
    pub fn meta(&self, key: &str) -> Result<&str> {
        self.file
            .metadata()
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| ck_err(self.path(), format!("no `{key}` in its metadata")))
    }

    /// The caller metadata: every key but `format` and `config`.
    pub fn extra(&self) -> BTreeMap<String, String> {
        let mut m = self.file.metadata().clone();
        m.remove(FORMAT_KEY);
        m.remove(CONFIG_KEY);
        m
    }

    /// The embedded config document.
    pub fn config_table(&self) -> Result<toml::Table> {
        self.meta(CONFIG_KEY)?.parse().map_err(|e| {
            ck_err(
                self.path(),
                format!("its embedded config is not valid TOML: {e}"),
            )
        })
    }

    /// The model config: the `[model]` table of the embedded config.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let model = self
            .config_table()?
            .remove("model")
            .ok_or_else(|| ck_err(self.path(), "its embedded config has no [model] table"))?;
        let text = toml::to_string(&model).map_err(|e| ck_err(self.path(), e.to_string()))?;
        ModelConfig::from_toml_str(&text)
            .map_err(|e| ck_err(self.path(), format!("[model] of its embedded config: {e}")))
    }

    /// Copies a group of tensors into `targets` with name and shape checks
    /// (see `dim_io::load_into`).
    pub fn load_group(&self, targets: &BTreeMap<String, Tensor>, group: Group<'_>) -> Result<()> {
        Ok(dim_io::load_into(&self.file, targets, group)?)
    }

    /// Copies the `model/` group into every variable of `vs`.
    pub fn load_model_weights(&self, vs: &VarStore) -> Result<()> {
        let targets = vs.variables().into_iter().collect();
        self.load_group(&targets, Group::new(MODEL_GROUP))
    }

    /// The floating dtype of the `model/` group, when all its floating
    /// tensors share one.
    fn model_float_kind(&self) -> Option<Kind> {
        let mut kinds = self
            .file
            .names()
            .filter(|n| n.starts_with(MODEL_GROUP))
            .filter_map(|n| self.file.get(n))
            .map(|m| m.kind)
            .filter(|k| matches!(k, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16));
        let first = kinds.next()?;
        kinds.all(|k| k == first).then_some(first)
    }
}

/// A loaded checkpoint: the config, a `VarStore` holding the weights, the model built on it, and the caller metadata.
#[derive(Debug)]
pub struct Checkpoint {
    /// The model config from the header.
    pub config: ModelConfig,
    /// The weights (in the file's dtype when all floating tensors share one).
    pub vs: VarStore,
    /// The network built on `vs`.
    pub model: Model,
    /// Caller metadata (e.g. `step`; everything but `format` and `config`).
    pub metadata: BTreeMap<String, String>,
}

/// Writes the variables of `vs` as the `model/` group, `cfg` as the
/// `[model]` table of the config and `extra` as metadata.
pub fn save_checkpoint(
    path: &Path,
    vs: &VarStore,
    cfg: &ModelConfig,
    extra: &BTreeMap<String, String>,
) -> Result<()> {
    let model: toml::Table = cfg
        .to_toml_string()
        .parse()
        .map_err(|e| ck_err(path, format!("model config as TOML: {e}")))?;
    let mut doc = toml::Table::new();
    doc.insert("model".into(), toml::Value::Table(model));
    let config = toml::to_string(&doc).map_err(|e| ck_err(path, e.to_string()))?;
    let tensors = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (format!("{MODEL_GROUP}{n}"), t));
    write_checkpoint(path, tensors, &config, extra)
}

/// Loads a checkpoint (written by [`save_checkpoint`] or `dim train`) onto
/// `device`: builds the network of its `[model]` config on a fresh
/// `VarStore` (in the file's floating dtype when the `model/` tensors share
/// one) and copies the `model/` weights in. Errors name every missing,
/// unexpected or mis-shaped tensor.
pub fn load_checkpoint(path: &Path, device: Device) -> Result<Checkpoint> {
    let ck = open_checkpoint(path)?;
    let config = ck.model_config()?;
    let mut vs = VarStore::new(device);
    let model = Model::new(vs.root(), &config)?;
    if let Some(kind) = ck.model_float_kind() {
        vs.set_kind(kind);
    }
    ck.load_model_weights(&vs)?;
    tracing::info!(path = %path.display(), params = model.param_count(), "loaded checkpoint");
    Ok(Checkpoint {
        config,
        vs,
        model,
        metadata: ck.extra(),
    })
}

/// Loads the `model/` weights of a checkpoint into an existing `VarStore`:
/// names and shapes must match exactly. Returns the model config and the
/// caller metadata.
pub fn load_weights(path: &Path, vs: &VarStore) -> Result<(ModelConfig, BTreeMap<String, String>)> {
    let ck = open_checkpoint(path)?;
    let config = ck.model_config()?;
    ck.load_model_weights(vs)?;
    Ok((config, ck.extra()))
}

//! Training checkpoints: safetensors files holding the model, its EMA and the
//! optimizer moments as tensors, and the step, data position, RNG seed and the
//! full config as metadata. Written atomically (temporary file, fsync,
//! rename, fsync of the folder) so that a crash or Ctrl-C never leaves a
//! torn file; the last K are kept.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::{Dtype, View};
use tch::{Kind, Tensor};

/// Format tag stored in the metadata.
const FORMAT: &str = "dim-train-checkpoint/1";

/// A tensor copied to host memory, ready for safetensors.
struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl HostTensor {
    fn new(t: &Tensor) -> Result<Self> {
        let t = t.detach().to_device(tch::Device::Cpu).contiguous();
        let (t, dtype) = match t.kind() {
            Kind::Float => (t, Dtype::F32),
            Kind::Double => (t, Dtype::F64),
            Kind::BFloat16 => (t, Dtype::BF16),
            Kind::Half => (t, Dtype::F16),
            Kind::Int64 => (t, Dtype::I64),
            Kind::Int => (t, Dtype::I32),
            Kind::Uint8 => (t, Dtype::U8),
            Kind::Bool => (t.to_kind(Kind::Uint8), Dtype::U8),
            k => bail!("cannot store a tensor of kind {k:?} in a checkpoint"),
        };
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.copy_data_u8(&mut bytes, numel);
        let shape = t.size().iter().map(|&d| d as usize).collect();
        Ok(Self {
            dtype,
            shape,
            bytes,
        })
    }
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// A checkpoint in memory: named tensors and string metadata.
#[derive(Debug, Default)]
pub struct Checkpoint {
    /// `model/<name>`, `ema/<name>`, `optim/m/<name>`, `optim/v/<name>`.
    pub tensors: BTreeMap<String, Tensor>,
    /// `config` (TOML), `step`, `data_position`, `seed`, ...
    pub meta: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Writes to `path` atomically: `path.tmp`, fsync, rename, fsync folder.
    pub fn save(&self, path: &Path) -> Result<()> {
        let host: Vec<(String, HostTensor)> = self
            .tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), HostTensor::new(t)?)))
            .collect::<Result<_>>()?;
        let mut meta: HashMap<String, String> = self.meta.clone().into_iter().collect();
        meta.insert("format".into(), FORMAT.into());
        let bytes = safetensors::serialize(host.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
            .context("serialising checkpoint")?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create checkpoint folder {}", dir.display()))?;
        let tmp = path.with_extension("safetensors.tmp");
        {
            let mut f = fs::File::create(&tmp).with_context(|| {
                format!("cannot write {} (is the folder writable?)", tmp.display())
            })?;
            f.write_all(&bytes)
                .with_context(|| format!("writing {}", tmp.display()))?;
            f.sync_all()
                .with_context(|| format!("fsync {}", tmp.display()))?;
        }
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        // The rename is durable only once the folder entry is on disk.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Reads a checkpoint written by [`Checkpoint::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes =
            fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is not a safetensors file", path.display()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
        let meta: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            bail!(
                "{} is not a `dim train` checkpoint (no `format = {FORMAT}` in its metadata)",
                path.display()
            );
        }
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let kind = match view.dtype() {
                Dtype::F32 => Kind::Float,
                Dtype::F64 => Kind::Double,
                Dtype::BF16 => Kind::BFloat16,
                Dtype::F16 => Kind::Half,
                Dtype::I64 => Kind::Int64,
                Dtype::I32 => Kind::Int,
                Dtype::U8 => Kind::Uint8,
                d => bail!(
                    "{}: tensor `{name}` has unsupported dtype {d:?}",
                    path.display()
                ),
            };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            tensors.insert(name, Tensor::from_data_size(view.data(), &shape, kind));
        }
        Ok(Self { tensors, meta })
    }

    /// A metadata value, or an error naming the checkpoint and the key.
    pub fn meta(&self, key: &str, path: &Path) -> Result<&str> {
        self.meta.get(key).map(String::as_str).with_context(|| {
            format!(
                "checkpoint {} has no `{key}` in its metadata",
                path.display()
            )
        })
    }

    /// Tensors under `prefix/`, with the prefix stripped.
    pub fn group(&self, prefix: &str) -> BTreeMap<String, Tensor> {
        let p = format!("{prefix}/");
        self.tensors
            .iter()
            .filter_map(|(k, t)| {
                k.strip_prefix(&p)
                    .map(|n| (n.to_string(), t.shallow_clone()))
            })
            .collect()
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

/// Deletes all but the newest `keep` checkpoints in `dir`.
pub fn prune(dir: &Path, keep: usize) -> Result<()> {
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

//! Checkpoints: safetensors files holding every variable of a `VarStore`, with
//! the [`ModelConfig`] (TOML) and caller metadata in the header. Written
//! atomically; loading checks every name and shape and lists each mismatch.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::network::Model;

/// Header key of the model config (TOML text).
pub const CONFIG_KEY: &str = "dim_model.config";
/// Header key of the checkpoint format version.
pub const FORMAT_KEY: &str = "dim_model.format";
const FORMAT_VERSION: &str = "1";
/// Prefix reserved for this crate's header keys; caller metadata may not use it.
const RESERVED_PREFIX: &str = "dim_model.";

/// A loaded checkpoint: the config, a `VarStore` holding the weights, the model built on it, and the caller metadata.
#[derive(Debug)]
pub struct Checkpoint {
    /// Config read from the header.
    pub config: ModelConfig,
    /// The weights (in the file's dtype when all floating tensors share one).
    pub vs: VarStore,
    /// The network built on `vs`.
    pub model: Model,
    /// Metadata given to [`save_checkpoint`] as `extra`.
    pub metadata: BTreeMap<String, String>,
}

fn ck_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn to_dtype(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

fn to_kind(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Writes every variable of `vs` (names as in the store) with `cfg` and
/// `extra` in the header. The file appears complete or not at all: it is
/// written to a temporary file in the same directory, synced, then renamed.
/// `extra` keys may not start with `dim_model.`.
pub fn save_checkpoint(
    path: &Path,
    vs: &VarStore,
    cfg: &ModelConfig,
    extra: &BTreeMap<String, String>,
) -> Result<()> {
    if let Some(key) = extra.keys().find(|k| k.starts_with(RESERVED_PREFIX)) {
        return Err(ck_err(
            path,
            format!("metadata key {key:?} uses the reserved prefix {RESERVED_PREFIX:?}"),
        ));
    }
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut buffers = Vec::with_capacity(named.len());
    for (name, t) in &named {
        let dtype = to_dtype(t.kind()).ok_or_else(|| {
            ck_err(
                path,
                format!("tensor `{name}` has dtype {:?}, not storable", t.kind()),
            )
        })?;
        let cpu = t.detach().to_device(Device::Cpu).contiguous();
        let numel = cpu.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        cpu.f_copy_data_u8(&mut bytes, numel)?;
        let shape: Vec<usize> = cpu.size().iter().map(|&s| s as usize).collect();
        buffers.push((name.clone(), dtype, shape, bytes));
    }
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ck_err(path, format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut meta: HashMap<String, String> =
        extra.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    meta.insert(CONFIG_KEY.into(), cfg.to_toml_string());
    meta.insert(FORMAT_KEY.into(), FORMAT_VERSION.into());
    let data =
        safetensors::serialize(views, Some(meta)).map_err(|e| ck_err(path, e.to_string()))?;
    drop(buffers);

    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".dim-ckpt-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io)?;
    tmp.write_all(&data).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    tracing::info!(path = %path.display(), tensors = named.len(), bytes = data.len(), "saved checkpoint");
    Ok(())
}

/// Reads a checkpoint file: config, caller metadata and the parsed tensors.
fn read(path: &Path) -> Result<(Vec<u8>, ModelConfig, BTreeMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| ck_err(path, format!("not a safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let text = meta.get(CONFIG_KEY).ok_or_else(|| {
        ck_err(
            path,
            format!("header has no `{CONFIG_KEY}`: not written by dim-model"),
        )
    })?;
    let config = ModelConfig::from_toml_str(text)
        .map_err(|e| ck_err(path, format!("config in the header: {e}")))?;
    let extra = meta
        .into_iter()
        .filter(|(k, _)| !k.starts_with(RESERVED_PREFIX))
        .collect();
    Ok((bytes, config, extra))
}

/// Copies the tensors of `st` into `vs`, after checking that both hold exactly
/// the same names with the same shapes; the error lists every difference.
fn copy_into(path: &Path, st: &SafeTensors<'_>, vs: &VarStore) -> Result<()> {
    let vars = vs.variables();
    let mut problems = Vec::new();
    let mut file_names: Vec<&str> = st.names();
    file_names.sort_unstable();
    let mut var_names: Vec<&String> = vars.keys().collect();
    var_names.sort_unstable();
    for name in &var_names {
        match st.tensor(name) {
            Err(_) => problems.push(format!(
                "missing from the file: `{name}` {:?}",
                vars[*name].size()
            )),
            Ok(view) => {
                let shape: Vec<i64> = view.shape().iter().map(|&s| s as i64).collect();
                let want = vars[*name].size();
                if shape != want {
                    problems.push(format!("shape of `{name}`: file {shape:?}, model {want:?}"));
                }
                if to_kind(view.dtype()).is_none() {
                    problems.push(format!(
                        "dtype of `{name}`: {:?} is not supported",
                        view.dtype()
                    ));
                }
            }
        }
    }
    for name in &file_names {
        if !vars.contains_key(*name) {
            problems.push(format!("not in the model: `{name}`"));
        }
    }
    if !problems.is_empty() {
        return Err(ck_err(
            path,
            format!(
                "{} mismatch(es) with the model:\n  {}",
                problems.len(),
                problems.join("\n  ")
            ),
        ));
    }
    tch::no_grad(|| -> Result<()> {
        for name in var_names {
            let view = st.tensor(name).map_err(|e| ck_err(path, e.to_string()))?;
            let kind =
                to_kind(view.dtype()).ok_or_else(|| ck_err(path, format!("dtype of `{name}`")))?;
            let shape: Vec<i64> = view.shape().iter().map(|&s| s as i64).collect();
            let src = Tensor::f_from_data_size(view.data(), &shape, kind)?;
            let mut dst = vars[name].shallow_clone();
            dst.f_copy_(&src)?;
        }
        Ok(())
    })
}

/// Loads a checkpoint onto `device`: reads the config from the header, builds
/// the network on a fresh `VarStore` (in the file's floating dtype when all
/// floating tensors share one) and copies the weights in. Errors name every
/// missing, unexpected or mis-shaped tensor.
pub fn load_checkpoint(path: &Path, device: Device) -> Result<Checkpoint> {
    let (bytes, config, metadata) = read(path)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| ck_err(path, e.to_string()))?;
    let mut vs = VarStore::new(device);
    let model = Model::new(vs.root(), &config)?;
    let float_kinds: std::collections::BTreeSet<String> = st
        .tensors()
        .iter()
        .filter_map(|(_, v)| to_kind(v.dtype()))
        .filter(|k| is_float(*k))
        .map(|k| format!("{k:?}"))
        .collect();
    if float_kinds.len() == 1 {
        let kind = st
            .tensors()
            .iter()
            .filter_map(|(_, v)| to_kind(v.dtype()))
            .find(|k| is_float(*k));
        if let Some(kind) = kind {
            vs.set_kind(kind);
        }
    }
    copy_into(path, &st, &vs)?;
    tracing::info!(path = %path.display(), params = model.param_count(), "loaded checkpoint");
    Ok(Checkpoint {
        config,
        vs,
        model,
        metadata,
    })
}

/// Loads the weights of a checkpoint into an existing `VarStore` (for
/// resuming training or an EMA copy): names and shapes must match exactly.
/// Returns the config and caller metadata from the header.
pub fn load_weights(path: &Path, vs: &VarStore) -> Result<(ModelConfig, BTreeMap<String, String>)> {
    let (bytes, config, metadata) = read(path)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| ck_err(path, e.to_string()))?;
    copy_into(path, &st, vs)?;
    Ok((config, metadata))
}

//! What every `dim` command shares: the device, the configs of a run, the
//! network with its weights, and libtorch's precision settings.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use dim_model::{Model, ModelConfig};
use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::config::TrainConfig;
use crate::optim::Params;

/// `auto` → CUDA if present, else CPU; `cuda` without a GPU is an error that says what to do.
pub fn resolve_device(spec: &str) -> Result<Device> {
    let cuda = tch::Cuda::is_available();
    match spec {
        "auto" => Ok(if cuda { Device::Cuda(0) } else { Device::Cpu }),
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            if !cuda {
                bail!("device `{s}` requested but no CUDA device is available: use `--device cpu` / train.device = \"cpu\" (or \"auto\")");
            }
            let i: usize = s
                .strip_prefix("cuda:")
                .map(str::parse::<usize>)
                .transpose()
                .with_context(|| format!("bad device `{s}`: use cuda:N"))?
                .unwrap_or(0);
            if i >= tch::Cuda::device_count() as usize {
                bail!(
                    "device `{s}` requested but only {} CUDA device(s) exist",
                    tch::Cuda::device_count()
                );
            }
            Ok(Device::Cuda(i))
        }
        s => bail!("unknown device `{s}`: use auto, cpu, cuda or cuda:N"),
    }
}

/// The model config of a `TrainConfig` (its `[model]` table through dim-model).
pub fn model_config(cfg: &TrainConfig) -> Result<ModelConfig> {
    let text = toml::to_string(&cfg.model)?;
    ModelConfig::from_toml_str(&text).with_context(|| format!("config {}: [model]", cfg.file))
}

/// The diffusion and sampler configs of a `TrainConfig`.
pub fn diffusion_config(cfg: &TrainConfig) -> Result<dim_diffusion::Config> {
    let text = toml::to_string(&cfg.diffusion)?;
    dim_diffusion::Config::from_toml_str(&text)
        .with_context(|| format!("config {}: [diffusion]/[sampler]", cfg.file))
}

/// Trainable parameters by name (sorted, so the order is stable across runs).
pub fn named_params(vs: &VarStore) -> Params {
    let mut v: Params = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A network with its weights, built from a config.
pub struct Net {
    pub vs: VarStore,
    pub model: Model,
    pub cfg: ModelConfig,
}

impl Net {
    /// Builds the network on `device` (initialised from libtorch's generator).
    pub fn new(cfg: &ModelConfig, device: Device) -> Result<Self> {
        let vs = VarStore::new(device);
        let model = Model::new(vs.root(), cfg).context("building the network")?;
        Ok(Self {
            vs,
            model,
            cfg: cfg.clone(),
        })
    }

    /// Copies `weights` (exact names and shapes) into the network.
    pub fn load(&self, weights: &BTreeMap<String, Tensor>, what: &str) -> Result<()> {
        copy_named(&self.vs, weights, what)
    }
}

/// Copies named tensors into `vs`, checking names and shapes both ways.
pub fn copy_named(vs: &VarStore, weights: &BTreeMap<String, Tensor>, what: &str) -> Result<()> {
    let vars = vs.variables();
    let mut problems = Vec::new();
    for (k, v) in &vars {
        match weights.get(k) {
            None => problems.push(format!("missing `{k}`")),
            Some(w) if w.size() != v.size() => problems.push(format!(
                "`{k}` is {:?}, the network has {:?}",
                w.size(),
                v.size()
            )),
            _ => {}
        }
    }
    problems.extend(
        weights
            .keys()
            .filter(|k| !vars.contains_key(*k))
            .map(|k| format!("unexpected `{k}`")),
    );
    if !problems.is_empty() {
        let n = problems.len();
        problems.sort();
        problems.truncate(6);
        bail!(
            "{what} does not fit this network ({n} problem(s): {}): it comes from another architecture or size; use the config it was trained with",
            problems.join(", ")
        );
    }
    tch::no_grad(|| {
        for (k, mut v) in vars {
            v.copy_(&weights[&k].to_kind(v.kind()).to_device(v.device()));
        }
    });
    Ok(())
}

/// Sets libtorch up for `train.precision` on `device`; returns whether the
/// forward should run under (bf16) autocast.
pub fn set_precision(precision: &str, device: Device) -> Result<bool> {
    if !device.is_cuda() {
        return Ok(false);
    }
    dim_scan::device::set_allow_tf32(precision == "tf32")?;
    let amp = ["bf16", "amp"].contains(&precision);
    if amp {
        // libtorch's CUDA autocast defaults to f16; DiT-style training is bf16.
        dim_scan::device::set_cuda_autocast_dtype(tch::Kind::BFloat16)?;
    }
    Ok(amp)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn shipped_configs_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        for name in [
            "demo.toml",
            "demo_gpu.toml",
            "fmnist_dim_s2.toml",
            "fmnist_dit_s2.toml",
            "imagenet256_dim_xl2.toml",
            "mfmnist_video_dim.toml",
            "ucf101_video_dim.toml",
        ] {
            let cfg =
                TrainConfig::load(&root.join(name), &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
            model_config(&cfg).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            diffusion_config(&cfg).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
    }
}

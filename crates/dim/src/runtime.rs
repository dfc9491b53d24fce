//! What every `dim` command shares: the device, the configs of a run, the
//! network with its weights, and libtorch's precision settings.

use anyhow::{bail, Context, Result};
use dim_model::{Model, ModelConfig};
use indicatif::{ProgressBar, ProgressStyle};
use tch::nn::VarStore;
use tch::Device;

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
    diffusion_config_of(&cfg.diffusion, &model_config(cfg)?, &cfg.file)
}

/// The diffusion and sampler configs from the `[diffusion]` and `[sampler]`
/// tables of `table` (other tables are left out); `file` names it in errors.
///
/// `learn_sigma` has one source of truth, the model (it decides the output
/// channels): `diffusion.learn_sigma` follows `model.learn_sigma`, and may
/// only be written if it says the same.
pub fn diffusion_config_of(
    table: &toml::Table,
    model: &ModelConfig,
    file: &str,
) -> Result<dim_diffusion::Config> {
    let mut parts: toml::Table = table
        .iter()
        .filter(|(k, _)| ["diffusion", "sampler"].contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let diffusion = parts
        .entry("diffusion")
        .or_insert_with(|| toml::Value::Table(Default::default()));
    if let toml::Value::Table(d) = diffusion {
        let follow = toml::Value::Boolean(model.learn_sigma);
        match d.get("learn_sigma") {
            None => {
                d.insert("learn_sigma".into(), follow);
            }
            Some(v) if *v == follow => {}
            Some(v) => bail!(
                "config {file}: diffusion.learn_sigma = {v} but model.learn_sigma = {}: leave diffusion.learn_sigma out, it follows the model",
                model.learn_sigma
            ),
        }
    }
    dim_diffusion::Config::from_toml_str(&toml::to_string(&parts)?)
        .with_context(|| format!("config {file}: [diffusion]/[sampler]"))
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

/// A progress bar over `len` items drawn with the indicatif `template`;
/// hidden where `shown` is false (on every rank but the first).
pub fn progress_bar(len: u64, shown: bool, template: &str) -> ProgressBar {
    let bar = if shown {
        ProgressBar::new(len)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
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

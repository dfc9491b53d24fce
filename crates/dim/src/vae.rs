//! Latent diffusion glue: the `[vae]` table of a config, turning model
//! outputs into pixels (or into latents on disk when there is no VAE), and
//! the check that a latent cache, the VAE and the model agree before training.
//!
//! ```toml
//! [vae]
//! weights = "weights/sd-vae-ft-ema.safetensors"  # diffusers vae/diffusion_pytorch_model.safetensors
//! scaling_factor = 0.18215                       # and any other dim-vae VaeConfig key
//! slice = 8                                      # images per VAE call (memory)
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dim_model::ModelConfig;
use dim_vae::{AutoencoderKL, VaeConfig};
use tch::{Device, Kind, Tensor};

/// The `[vae]` table: which autoencoder the model's latents belong to.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeSection {
    /// diffusers-format safetensors weights.
    pub weights: PathBuf,
    /// Architecture and scale factor (default: the SD VAE, 0.18215).
    pub config: VaeConfig,
    /// Images per encoder/decoder call.
    pub slice: i64,
}

impl VaeSection {
    /// Parses `[vae]`; `file` names the config in errors.
    pub fn from_table(t: &toml::Table, file: &str) -> Result<Self> {
        let mut rest = t.clone();
        let weights = match rest.remove("weights") {
            Some(toml::Value::String(s)) => PathBuf::from(s),
            Some(_) => bail!("config {file}: vae.weights must be a path string"),
            None => bail!(
                "config {file}: [vae] needs `weights` (a diffusers AutoencoderKL safetensors file)"
            ),
        };
        let slice = match rest.remove("slice") {
            Some(toml::Value::Integer(n)) if n > 0 => n,
            Some(_) => bail!("config {file}: vae.slice must be a positive integer"),
            None => 8,
        };
        let config: VaeConfig =
            toml::Value::Table(rest)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    anyhow::anyhow!("config {file}: [vae]: {}", e.message())
                })?;
        config
            .validate()
            .with_context(|| format!("config {file}: [vae]"))?;
        Ok(Self {
            weights,
            config,
            slice,
        })
    }

    /// Loads the VAE onto `device`: bf16 on CUDA, f32 on the CPU.
    pub fn load(&self, device: Device) -> Result<AutoencoderKL> {
        let vae = AutoencoderKL::load(&self.config, &self.weights, device).with_context(|| {
            format!(
                "loading the VAE named in [vae] ({})",
                self.weights.display()
            )
        })?;
        let vae = if device.is_cuda() {
            vae.to_kind(Kind::BFloat16)
        } else {
            vae
        };
        Ok(vae.with_slice(self.slice))
    }
}

/// How a model's outputs become something to look at.
pub enum Output {
    /// The model works in pixels (1 or 3 channels).
    Pixels,
    /// Latents decoded through this VAE (`/ scaling_factor`, then decode).
    Vae(Box<AutoencoderKL>),
    /// Latents and no VAE: written as `.safetensors`, never as images.
    Latents,
}

impl Output {
    /// Picks the output for a model: the VAE when `[vae]` is given,
    /// pixels for 1- or 3-channel image models, raw latents otherwise.
    pub fn for_model(
        vae: Option<&VaeSection>,
        model: &ModelConfig,
        device: Device,
    ) -> Result<Self> {
        if let Some(v) = vae {
            if v.config.latent_channels != model.in_channels {
                bail!(
                    "[vae] has {} latent channels but the model takes {}: the VAE does not belong to this model",
                    v.config.latent_channels,
                    model.in_channels
                );
            }
            if model.is_video() {
                bail!("[vae] is for image models; this model is a video model");
            }
            return Ok(Output::Vae(Box::new(v.load(device)?)));
        }
        Ok(if model.in_channels == 1 || model.in_channels == 3 {
            Output::Pixels
        } else {
            Output::Latents
        })
    }

    /// Model outputs `(N, C, ...)` → images `(N, 1|3, H, W)` in `[-1, 1]`
    /// on the CPU, or `None` for undecodable latents.
    pub fn images(&self, x: &Tensor) -> Result<Option<Tensor>> {
        Ok(match self {
            Output::Pixels => Some(x.to_device(Device::Cpu)),
            Output::Vae(vae) => {
                let z = vae.unscale(&x.to_kind(Kind::Float));
                Some(vae.decode(&z)?.clamp(-1.0, 1.0).to_device(Device::Cpu))
            }
            Output::Latents => None,
        })
    }
}

/// Writes latents `(N, ...)` that cannot be shown as images to
/// `<path>.safetensors` (tensor `latents`, as the model produced them, i.e.
/// scaled) and says so; returns the file written.
pub fn write_latents(x: &Tensor, png_path: &Path) -> Result<PathBuf> {
    let p = png_path.with_extension("safetensors");
    dim_io::save(
        &p,
        [("latents".to_string(), x.shallow_clone())],
        &Default::default(),
    )?;
    tracing::warn!(
        path = %p.display(),
        "the model works in latents and the config has no [vae]: wrote latents, not images (add [vae] weights = ..., or decode with `dim ops vae decode` after dividing by the scale factor)"
    );
    Ok(p)
}

/// Before training on a latent cache: the cache's sample shape, labels and
/// classes, the VAE's latent channels and scale factor, and the model must
/// agree. Errors say which two disagree and how.
pub fn check_latent_setup(
    file: &str,
    data: &dim_data::DataConfig,
    dataset: &dyn dim_data::Dataset,
    vae: Option<&VaeSection>,
    model: &ModelConfig,
) -> Result<()> {
    let dim_data::DataConfig::Latents(lc) = data else {
        return Ok(());
    };
    let cache = dim_data::LatentDataset::open(&lc.dir)?;
    let idx = cache.index();
    let [h, w] = model.input_size;
    let want = [model.in_channels as usize, h as usize, w as usize];
    if idx.sample_shape != want {
        bail!(
            "config {file}: the latent cache {} holds latents {:?} but the model takes {:?} (model.in_channels, model.input_size): encode at the image size the model expects",
            lc.dir.display(),
            idx.sample_shape,
            want
        );
    }
    if model.num_classes > 0 {
        if !idx.has_labels {
            bail!("config {file}: the model is class-conditional (model.num_classes = {}) but the latent cache {} has no labels", model.num_classes, lc.dir.display());
        }
        if let Some(n) = dataset.num_classes() {
            if n as i64 > model.num_classes {
                bail!(
                    "config {file}: the latent cache {} has labels up to {} but model.num_classes = {}",
                    lc.dir.display(),
                    n - 1,
                    model.num_classes
                );
            }
        }
    }
    if let Some(v) = vae {
        if v.config.latent_channels as usize != idx.sample_shape[0] {
            bail!(
                "config {file}: [vae] has {} latent channels, the cache {} holds {}",
                v.config.latent_channels,
                lc.dir.display(),
                idx.sample_shape[0]
            );
        }
        if let Some(s) = idx.meta.get("scaling_factor") {
            let s: f64 = s.parse().unwrap_or(f64::NAN);
            if (s - v.config.scaling_factor).abs() > 1e-9 * s.abs().max(1.0) {
                bail!(
                    "config {file}: the cache {} was scaled by {s}, [vae] scaling_factor is {}",
                    lc.dir.display(),
                    v.config.scaling_factor
                );
            }
        }
        if !v.weights.is_file() {
            bail!(
                "config {file}: vae.weights = {}: no such file (the sample grids decode through it)",
                v.weights.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-sample latent cache of `shape` labelled `label`.
    fn cache(dir: &Path, shape: [i64; 3], label: i64) -> dim_data::DataConfig {
        let mut w = dim_data::LatentWriter::create(dir, 4).unwrap();
        w.set_meta("scaling_factor", "0.18215");
        let x = Tensor::zeros([2, shape[0], shape[1], shape[2]], (Kind::Half, Device::Cpu));
        w.write(&x, Some(&Tensor::from_slice(&[0i64, label])))
            .unwrap();
        w.finish().unwrap();
        dim_data::DataConfig::Latents(dim_data::LatentsConfig {
            dir: dir.to_path_buf(),
        })
    }

    /// The shipped ImageNet config loads, and a cache that does not fit its
    /// DiM-XL/2 (latent channels, spatial size, class count) or its VAE is
    /// refused before training with the config file, the cache and the key.
    #[test]
    fn latent_setup_mismatches_name_file_cache_and_key() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let cfg =
            crate::config::TrainConfig::load(&root.join("imagenet256_dim_xl2.toml"), &[]).unwrap();
        let model = crate::runtime::model_config(&cfg).unwrap();
        assert_eq!(
            (model.in_channels, model.input_size, model.num_classes),
            (4, [32, 32], 1000)
        );
        let tmp = tempfile::tempdir().unwrap();
        let weights = tmp.path().join("vae.safetensors");
        std::fs::write(&weights, b"x").unwrap();
        let vae = |channels: i64| VaeSection {
            weights: weights.clone(),
            config: VaeConfig {
                latent_channels: channels,
                ..VaeConfig::default()
            },
            slice: 1,
        };
        let check = |name: &str, shape: [i64; 3], label: i64, channels: i64| {
            let dir = tmp.path().join(name);
            let data = cache(&dir, shape, label);
            let ds = data.build().unwrap();
            check_latent_setup(
                "imagenet.toml",
                &data,
                ds.as_ref(),
                Some(&vae(channels)),
                &model,
            )
            .map_err(|e| format!("{e:#}"))
        };
        check("good", [4, 32, 32], 999, 4).unwrap();
        for (name, shape, label, channels, key) in [
            ("channels", [8, 32, 32], 0, 4, "model.in_channels"),
            ("spatial", [4, 16, 16], 0, 4, "model.input_size"),
            ("classes", [4, 32, 32], 1000, 4, "model.num_classes"),
            ("vae", [4, 32, 32], 0, 8, "[vae] has 8 latent channels"),
        ] {
            let e = check(name, shape, label, channels).unwrap_err();
            assert!(
                e.contains("imagenet.toml") && e.contains(name) && e.contains(key),
                "{name}: {e}"
            );
        }
    }
}

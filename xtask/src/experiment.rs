//! Experiment files (`xtask/experiments/*.toml`), read by `cargo xtask repro`.
//!
//! ```toml
//! name = "fmnist_s2"
//! description = "DiM-S/2 vs DiT-S/2 on Fashion-MNIST"
//! device = "cuda"                 # cuda (one arm per visible GPU), cpu, or auto
//! seeds = [0]                     # every arm runs once per seed (train.seed)
//!
//! [budget]                        # per run; at least one of the two
//! time_limit_s = 600              # wall time of training (train.time_limit_s)
//! steps = 1000000                 # optimizer steps (train.steps)
//!
//! [[arms]]
//! name = "dim"
//! config = "configs/fmnist_dim_s2.toml"
//! overrides = ["train.precision=\"bf16\""]   # `dim train` key=value overrides
//! group = "DiM-S/2"               # optional: one line per group in the vs-tokens plots
//!
//! [[samplers]]                    # each trained run is sampled and evaluated with each
//! name = "ddim50"
//! sampler = "ddim"
//! steps = 50
//! cfg = 1.0
//! num = 10000
//! batch = 1000
//!
//! [metrics]
//! reference = "fashion-mnist:test" # `dim eval --reference`
//! features_epochs = 5              # train the feature classifier in the run ...
//! # features_weights = "path"     # ... or use these weights
//! floor = "fashion-mnist:train"    # also evaluate this set against the reference
//! guided_grid_cfg = 1.5            # a 100-sample guided grid per run (0: none)
//! curve_num = 0                    # > 0: FID of every kept checkpoint on this many samples
//! ```
//!
//! Paths are relative to the folder `repro` runs in (the repository root, or
//! the experiment bundle's root).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    pub budget: Budget,
    pub arms: Vec<Arm>,
    #[serde(default)]
    pub samplers: Vec<SamplerSpec>,
    #[serde(default)]
    pub metrics: Metrics,
}

fn default_device() -> String {
    "auto".into()
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub steps: Option<u64>,
    pub time_limit_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arm {
    pub name: String,
    pub config: PathBuf,
    #[serde(default)]
    pub overrides: Vec<String>,
    /// The line this arm belongs to in the throughput/memory-vs-tokens
    /// plots (default: its name): arms of one group at several token counts
    /// (resolutions) draw one line.
    pub group: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerSpec {
    pub name: String,
    pub sampler: Option<String>,
    pub steps: Option<u64>,
    #[serde(default = "one")]
    pub cfg: f64,
    pub num: u64,
    #[serde(default = "default_batch")]
    pub batch: u64,
}

fn one() -> f64 {
    1.0
}

fn default_batch() -> u64 {
    500
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// `dim eval --reference`; no evaluation when absent.
    pub reference: Option<String>,
    pub features_epochs: Option<u64>,
    pub features_weights: Option<PathBuf>,
    pub floor: Option<String>,
    #[serde(default)]
    pub guided_grid_cfg: f64,
    #[serde(default)]
    pub curve_num: u64,
}

impl Experiment {
    /// Reads an experiment by name (`xtask/experiments/<name>.toml`) or path,
    /// with `--set key=value` overrides applied to the TOML first.
    pub fn load(name_or_path: &str, sets: &[String]) -> Result<(Self, PathBuf)> {
        let path = resolve(name_or_path)?;
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the experiment {}", path.display()))?;
        let mut table: toml::Table = toml::from_str(&text)
            .with_context(|| format!("{} is not valid TOML", path.display()))?;
        for s in sets {
            apply_override(&mut table, s)
                .with_context(|| format!("override `{s}` for {}", path.display()))?;
        }
        let exp: Experiment = toml::Value::Table(table)
            .try_into()
            .with_context(|| format!("{}: not an experiment file", path.display()))?;
        exp.check().with_context(|| format!("{}", path.display()))?;
        Ok((exp, path))
    }

    fn check(&self) -> Result<()> {
        if self.arms.is_empty() {
            bail!("no [[arms]]");
        }
        if self.seeds.is_empty() {
            bail!("`seeds` is empty");
        }
        if self.budget.steps.is_none() && self.budget.time_limit_s.is_none() {
            bail!("[budget] needs `steps` or `time_limit_s`");
        }
        let mut names: Vec<&str> = self.arms.iter().map(|a| a.name.as_str()).collect();
        names.sort();
        names.dedup();
        if names.len() != self.arms.len() {
            bail!("arm names must be distinct");
        }
        for a in &self.arms {
            if a.name.is_empty()
                || !a
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
            {
                bail!("arm name `{}`: use letters, digits, `_`, `-`, `.`", a.name);
            }
        }
        if !self.samplers.is_empty()
            && self.metrics.reference.is_some()
            && self.metrics.features_epochs.is_none()
            && self.metrics.features_weights.is_none()
        {
            bail!("[metrics] needs `features_epochs` or `features_weights` to evaluate");
        }
        Ok(())
    }

    /// The runs: every arm with every seed, named `arm` (one seed) or `arm_s<seed>`.
    pub fn runs(&self) -> Vec<Run> {
        let mut out = Vec::new();
        for arm in &self.arms {
            for &seed in &self.seeds {
                let name = if self.seeds.len() == 1 {
                    arm.name.clone()
                } else {
                    format!("{}_s{seed}", arm.name)
                };
                out.push(Run {
                    name,
                    arm: arm.clone(),
                    seed,
                });
            }
        }
        out
    }
}

/// One training run: an arm with one seed.
#[derive(Debug, Clone)]
pub struct Run {
    pub name: String,
    pub arm: Arm,
    pub seed: u64,
}

impl Run {
    /// The arm's config with its overrides applied (to read model sizes from).
    pub fn resolved_config(&self) -> Result<toml::Table> {
        let text = std::fs::read_to_string(&self.arm.config)
            .with_context(|| format!("reading {}", self.arm.config.display()))?;
        let mut t: toml::Table = toml::from_str(&text)
            .with_context(|| format!("{} is not valid TOML", self.arm.config.display()))?;
        for o in &self.arm.overrides {
            apply_override(&mut t, o)
                .with_context(|| format!("arm {}: override `{o}`", self.arm.name))?;
        }
        Ok(t)
    }
}

fn resolve(name_or_path: &str) -> Result<PathBuf> {
    let p = Path::new(name_or_path);
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    let named = Path::new("xtask/experiments").join(format!("{name_or_path}.toml"));
    if named.is_file() {
        return Ok(named);
    }
    let known: Vec<String> = std::fs::read_dir("xtask/experiments")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.strip_suffix(".toml").map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    bail!(
        "no experiment `{name_or_path}`: not a file, and no {} (known: {})",
        named.display(),
        if known.is_empty() {
            "none".into()
        } else {
            known.join(", ")
        }
    )
}

/// Sets `a.b.c=value` in a TOML table; the value is TOML, or a string when it
/// does not parse as TOML (as `dim train` reads its overrides). A numeric
/// part indexes an array (`samplers.0.num=100`).
pub fn apply_override(table: &mut toml::Table, kv: &str) -> Result<()> {
    let (key, value) = kv
        .split_once('=')
        .with_context(|| format!("`{kv}` is not key=value"))?;
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("empty part in the key `{key}`");
    }
    let mut cur = table
        .entry(parts[0].to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    for p in &parts[1..] {
        cur = match cur {
            toml::Value::Table(t) => t
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new())),
            toml::Value::Array(a) => {
                let i: usize = p
                    .parse()
                    .with_context(|| format!("`{p}` in `{key}` must index an array"))?;
                let n = a.len();
                a.get_mut(i)
                    .with_context(|| format!("index {i} in `{key}`: the array has {n} items"))?
            }
            _ => bail!("`{key}`: `{p}` is inside a value that is not a table"),
        };
    }
    *cur = value;
    Ok(())
}

/// Tokens per sample of a `dim` config: (H / p) * (W / p) * frames, with the
/// patch from `[model].patch` or the preset's `/p` suffix.
pub fn tokens(cfg: &toml::Table) -> Option<u64> {
    let model = cfg.get("model")?.as_table()?;
    let patch = match model.get("patch").and_then(toml::Value::as_integer) {
        Some(p) => p as u64,
        None => model
            .get("preset")?
            .as_str()?
            .rsplit_once('/')?
            .1
            .parse()
            .ok()?,
    };
    let size = model.get("input_size")?.as_array()?;
    let hw: Vec<u64> = size
        .iter()
        .filter_map(|v| v.as_integer().map(|x| x as u64))
        .collect();
    let frames = model
        .get("frames")
        .and_then(toml::Value::as_integer)
        .unwrap_or(1) as u64;
    let tpatch = model
        .get("temporal_patch")
        .and_then(toml::Value::as_integer)
        .unwrap_or(1) as u64;
    match hw.as_slice() {
        [h, w] if patch > 0 => Some((h / patch) * (w / patch) * frames.div_ceil(tpatch.max(1))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_set_nested_keys_arrays_and_strings() {
        let mut t: toml::Table =
            toml::from_str("[budget]\nsteps = 3\n[[samplers]]\nnum = 10\n").unwrap();
        apply_override(&mut t, "budget.steps=7").unwrap();
        apply_override(&mut t, "samplers.0.num=99").unwrap();
        apply_override(&mut t, "device=cpu").unwrap();
        apply_override(&mut t, "metrics.reference=\"x:y\"").unwrap();
        assert_eq!(t["budget"]["steps"].as_integer(), Some(7));
        assert_eq!(t["samplers"][0]["num"].as_integer(), Some(99));
        assert_eq!(t["device"].as_str(), Some("cpu"));
        assert_eq!(t["metrics"]["reference"].as_str(), Some("x:y"));
        assert!(apply_override(&mut t, "samplers.3.num=1").is_err());
        assert!(apply_override(&mut t, "budget.steps.x=1").is_err());
        assert!(apply_override(&mut t, "novalue").is_err());
    }

    #[test]
    fn tokens_from_preset_or_patch() {
        let t: toml::Table =
            toml::from_str("[model]\npreset = \"DiM-S/2\"\ninput_size = [32, 32]\n").unwrap();
        assert_eq!(tokens(&t), Some(256));
        let t: toml::Table = toml::from_str(
            "[model]\npreset = \"DiM-S/2\"\npatch = 8\ninput_size = [32, 24]\nframes = 4\n",
        )
        .unwrap();
        assert_eq!(tokens(&t), Some(4 * 3 * 4));
        let t: toml::Table = toml::from_str("[model]\npreset = \"DiM-S\"\n").unwrap();
        assert_eq!(tokens(&t), None);
    }
}

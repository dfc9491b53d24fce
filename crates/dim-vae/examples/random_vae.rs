//! Writes a randomly initialised AutoencoderKL in the diffusers layout, to
//! run the latent pipeline (`dim latents`, latent training) on a machine
//! without the downloaded weights: timings and multi-GPU checks, not images.
//!
//! ```text
//! cargo run --release -p dim-vae --example random_vae -- OUT_DIR [CONFIG_JSON] [SEED]
//! ```
//!
//! Writes `OUT_DIR/diffusion_pytorch_model.safetensors` (f32) and
//! `OUT_DIR/config.json`. Without `CONFIG_JSON` the network is the SD VAE's
//! (83.65 M parameters).
use std::path::PathBuf;
use std::process::ExitCode;

use dim_vae::{AutoencoderKL, VaeConfig};
use tch::Device;

fn run() -> Result<(), String> {
    let mut args = std::env::args_os().skip(1);
    let out = PathBuf::from(
        args.next()
            .ok_or("usage: random_vae OUT_DIR [CONFIG_JSON] [SEED]")?,
    );
    let cfg = match args.next() {
        Some(p) => VaeConfig::from_diffusers_json(&PathBuf::from(p)).map_err(|e| e.to_string())?,
        None => VaeConfig::default(),
    };
    let seed: i64 = match args.next() {
        Some(s) => s
            .to_str()
            .and_then(|s| s.parse().ok())
            .ok_or("SEED must be an integer")?,
        None => 0,
    };
    tch::manual_seed(seed);
    let vae = AutoencoderKL::new(&cfg, Device::Cpu).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let weights = out.join("diffusion_pytorch_model.safetensors");
    dim_io::save(&weights, vae.var_store().variables(), &Default::default())
        .map_err(|e| e.to_string())?;
    let json = serde_json::to_string_pretty(&cfg).map_err(|e| e.to_string())?;
    let cfg_path = out.join("config.json");
    std::fs::write(&cfg_path, json).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    println!("wrote {} and {}", weights.display(), cfg_path.display());
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("random_vae: {e}");
            ExitCode::FAILURE
        }
    }
}

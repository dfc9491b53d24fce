//! The Stable Diffusion VAE (`AutoencoderKL`, Rombach et al. 2022) on tch.
//!
//! Latent diffusion (DiT, DiM, and their peers on ImageNet) trains on the
//! latents of this autoencoder: images `(N, 3, H, W)` in `[-1, 1]` are
//! encoded to a diagonal Gaussian posterior over latents
//! `(N, 4, H/8, W/8)`; a sample of it (or its mean), times the scale factor
//! 0.18215, is what the diffusion model sees. Samples are divided by the
//! scale factor and decoded back to pixels.
//!
//! The layer names are those of diffusers' `AutoencoderKL` state dict, so the
//! `vae/diffusion_pytorch_model.safetensors` of `stabilityai/sd-vae-ft-ema`
//! or `sd-vae-ft-mse` loads with exact name and shape checks, in either of
//! diffusers' attention key schemes ([`AutoencoderKL::load`]).

mod config;
mod error;
mod net;

pub use config::VaeConfig;
pub use error::{Result, VaeError};
pub use net::{AutoencoderKL, DiagonalGaussian};

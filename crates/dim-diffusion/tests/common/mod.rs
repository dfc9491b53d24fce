//! Shared by the integration tests: the diffusers fixture file and its tensors.
#![allow(dead_code)]

use dim_diffusion::SamplerKind;
use serde_json::Value;
use tch::Tensor;

/// `tests/fixtures/diffusers.json`, written by `scripts/diffusion_fixtures.py`.
pub fn fixtures() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/diffusers.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture file")).expect("json")
}

/// A fixture array of integers.
pub fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("fixture array")
        .iter()
        .map(|d| d.as_i64().expect("integer"))
        .collect()
}

/// A fixture array of numbers as f64.
pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("fixture array")
        .iter()
        .map(|d| d.as_f64().expect("number"))
        .collect()
}

/// A fixture tensor `{ "shape": [...], "data": [...] }` as f64.
pub fn tensor(v: &Value) -> Tensor {
    Tensor::from_slice(&floats(&v["data"])).view(ints(&v["shape"]).as_slice())
}

/// The Gaussian samplers that need no extra settings, for tests that run
/// every one of them.
pub const GAUSSIAN_SAMPLERS: [SamplerKind; 5] = [
    SamplerKind::Ddpm,
    SamplerKind::Ddim,
    SamplerKind::DpmSolverPp2M,
    SamplerKind::Euler,
    SamplerKind::Heun,
];

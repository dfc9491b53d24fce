//! Shared by the integration tests: the diffusers fixture file and its tensors.
#![allow(dead_code)]

use serde_json::Value;
use tch::Tensor;

/// `tests/fixtures/diffusers.json`, written by `scripts/diffusion_fixtures.py`.
pub fn fixtures() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/diffusers.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture file")).expect("json")
}

/// A fixture tensor `{ "shape": [...], "data": [...] }` as f64.
pub fn tensor(v: &Value) -> Tensor {
    let shape: Vec<i64> = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_i64().unwrap())
        .collect();
    let data: Vec<f64> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_f64().unwrap())
        .collect();
    Tensor::from_slice(&data).view(shape.as_slice())
}

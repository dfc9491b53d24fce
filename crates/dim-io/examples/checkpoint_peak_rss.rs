//! Peak resident memory of saving and loading a large checkpoint, streamed
//! (dim-io) against whole-file (what the workspace did before: every tensor
//! copied to host buffers, serialised to one buffer, written; on load the
//! file read whole and every tensor built before copying into the network).
//!
//! `cargo run --release -p dim-io --example checkpoint_peak_rss -- MODE FILE GIB`
//! with MODE one of `save-streamed`, `save-whole`, `load-streamed`,
//! `load-whole`; run each in its own process (the peak is per process).
//! The "network" is `GIB` GiB of f32 tensors of 64 MiB each, held in memory
//! throughout, as training holds its weights; the figure to compare is the
//! peak above it.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

const CHUNK: i64 = 16 << 20; // f32 elements per tensor: 64 MiB

/// Peak and current resident set of this process, MiB (from /proc).
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn network(gib: i64, fill: bool) -> Vec<(String, Tensor)> {
    let n = gib * 1024 / 64;
    (0..n)
        .map(|i| {
            let t = if fill {
                Tensor::full([CHUNK], i as f64, (Kind::Float, Device::Cpu))
            } else {
                Tensor::zeros([CHUNK], (Kind::Float, Device::Cpu))
            };
            (format!("model/block{i:04}.weight"), t)
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, file, gib] = &args[..] else {
        eprintln!("usage: checkpoint_peak_rss MODE FILE GIB");
        std::process::exit(2);
    };
    let path = Path::new(file);
    let gib: i64 = gib.parse().expect("GIB: an integer");
    let net = network(gib, mode.starts_with("save"));
    let (_, base) = rss_mib();
    match mode.as_str() {
        "save-streamed" => {
            let tensors = net.iter().map(|(k, t)| (k.clone(), t.shallow_clone()));
            dim_io::save(path, tensors, &BTreeMap::new()).unwrap();
        }
        "save-whole" => {
            // Host copies of every tensor, then one serialised buffer.
            let host: Vec<(String, Vec<u8>, Vec<usize>)> = net
                .iter()
                .map(|(k, t)| {
                    let mut b = vec![0u8; t.numel() * 4];
                    t.copy_data_u8(&mut b, t.numel());
                    (k.clone(), b, vec![t.numel()])
                })
                .collect();
            let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = host
                .iter()
                .map(|(k, b, s)| {
                    let v =
                        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
                    (k.clone(), v.unwrap())
                })
                .collect();
            let bytes = safetensors::serialize(views, None).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        "load-streamed" => {
            let f = dim_io::TensorFile::open(path).unwrap();
            let targets: BTreeMap<String, Tensor> = net
                .iter()
                .map(|(k, t)| (k.clone(), t.shallow_clone()))
                .collect();
            dim_io::load_into(&f, &targets, dim_io::Group::new("")).unwrap();
        }
        "load-whole" => {
            let bytes = std::fs::read(path).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let all: BTreeMap<String, Tensor> = st
                .tensors()
                .into_iter()
                .map(|(k, v)| {
                    let shape: Vec<i64> = v.shape().iter().map(|&d| d as i64).collect();
                    (k, Tensor::from_data_size(v.data(), &shape, Kind::Float))
                })
                .collect();
            tch::no_grad(|| {
                for (k, t) in &net {
                    t.shallow_clone().copy_(&all[k]);
                }
            });
        }
        m => panic!("unknown mode {m}"),
    }
    if mode.starts_with("load") {
        // The values arrived: tensor i holds i everywhere.
        for (i, (_, t)) in net.iter().enumerate().step_by(7) {
            assert_eq!(t.double_value(&[CHUNK - 1]), i as f64);
        }
    }
    let (peak, _) = rss_mib();
    println!(
        "{mode}: network {:.0} MiB, peak RSS {peak:.0} MiB, peak above the network {:.0} MiB",
        base,
        peak - base
    );
}

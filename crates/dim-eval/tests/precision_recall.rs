//! Precision/recall against a brute-force f64 reference and the committed fixture.

mod common;

use common::fresh_seed;
use dim_eval::precision_recall;
use tch::{Device, Kind, Tensor};

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    common::to_mat(t)
}

fn dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Direct transcription of the paper's definition.
fn brute(real: &[Vec<f64>], fake: &[Vec<f64>], k: usize) -> (f64, f64) {
    let radii = |x: &[Vec<f64>]| -> Vec<f64> {
        x.iter()
            .map(|p| {
                let mut d: Vec<f64> = x.iter().map(|q| dist(p, q)).collect();
                d.sort_by(f64::total_cmp);
                d[k]
            })
            .collect()
    };
    let inside = |q: &[Vec<f64>], r: &[Vec<f64>], rad: &[f64]| {
        q.iter()
            .filter(|p| r.iter().zip(rad).any(|(c, &ra)| dist(p, c) <= ra))
            .count() as f64
            / q.len() as f64
    };
    (
        inside(fake, real, &radii(real)),
        inside(real, fake, &radii(fake)),
    )
}

#[test]
fn matches_brute_force_on_random_sets() {
    fresh_seed("matches_brute_force_on_random_sets");
    for (shift, scale) in [(0.0, 1.0), (0.7, 1.0), (0.0, 0.4), (1.5, 2.0)] {
        let real = Tensor::randn([150, 6], (Kind::Float, Device::Cpu));
        let fake = Tensor::randn([120, 6], (Kind::Float, Device::Cpu)) * scale + shift;
        for k in [1usize, 3, 5] {
            // A chunk that does not divide the counts exercises the tails.
            let got = precision_recall(&real, &fake, k, 37).unwrap();
            let (p, r) = brute(&rows(&real), &rows(&fake), k);
            assert!(
                (got.precision - p).abs() < 1e-12,
                "k={k} precision {} vs {p}",
                got.precision
            );
            assert!(
                (got.recall - r).abs() < 1e-12,
                "k={k} recall {} vs {r}",
                got.recall
            );
        }
    }
}

#[test]
fn far_apart_sets_score_zero_and_identical_sets_one() {
    fresh_seed("far_apart_sets_score_zero_and_identical_sets_one");
    let real = Tensor::randn([60, 4], (Kind::Float, Device::Cpu));
    let same = precision_recall(&real, &real, 3, 64).unwrap();
    assert_eq!((same.precision, same.recall), (1.0, 1.0));
    let far = precision_recall(&real, &(&real + 100.0), 3, 64).unwrap();
    assert_eq!((far.precision, far.recall), (0.0, 0.0));
}

#[test]
fn too_few_samples_is_an_error() {
    let x = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
    let e = precision_recall(&x, &x, 3, 8).unwrap_err().to_string();
    assert!(e.contains("need at least 4"), "{e}");
}

#[test]
fn matches_numpy_on_committed_fixture() {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fid_fixture.json"
    );
    let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let t = |v: &serde_json::Value| {
        let rows: Vec<Vec<f64>> = serde_json::from_value(v.clone()).unwrap();
        let f = rows[0].len() as i64;
        Tensor::from_slice(&rows.concat()).reshape([-1, f])
    };
    let got = precision_recall(
        &t(&fx["real"]),
        &t(&fx["fake"]),
        fx["k"].as_u64().unwrap() as usize,
        100,
    )
    .unwrap();
    assert!((got.precision - fx["precision"].as_f64().unwrap()).abs() < 1e-12);
    assert!((got.recall - fx["recall"].as_f64().unwrap()).abs() < 1e-12);
}

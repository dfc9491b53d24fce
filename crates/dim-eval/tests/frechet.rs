//! Fréchet distance against closed forms, an independent square root, and scipy.

mod common;

use common::*;
use dim_eval::{frechet_distance, FeatureStats, GaussianStats};
use tch::{Device, Kind, Tensor};

const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

fn stats(mu: Tensor, sigma: Tensor) -> GaussianStats {
    GaussianStats { mu, sigma, n: 100 }
}

/// Checks the Fréchet distance of two Gaussians `(mu, sigma)` against
/// `expected` to `rel` relative (absolute below 1).
fn assert_fd(a: (Tensor, Tensor), b: (Tensor, Tensor), expected: f64, rel: f64) {
    let got = frechet_distance(&stats(a.0, a.1), &stats(b.0, b.1)).unwrap();
    assert!(
        (got - expected).abs() < rel * expected.max(1.0),
        "{got} vs {expected}"
    );
}

fn random_rotation(f: i64) -> Tensor {
    let (q, _) = Tensor::linalg_qr(&Tensor::randn([f, f], F64), "reduced");
    q
}

#[test]
fn commuting_covariances_match_closed_form() {
    fresh_seed("commuting_covariances_match_closed_form");
    let f = 16;
    let q = random_rotation(f);
    let a = Tensor::rand([f], F64) * 3.0 + 0.01;
    let b = Tensor::rand([f], F64) * 3.0 + 0.01;
    let mu1 = Tensor::randn([f], F64);
    let mu2 = Tensor::randn([f], F64);
    let s1 = (&q * a.unsqueeze(0)).matmul(&q.tr());
    let s2 = (&q * b.unsqueeze(0)).matmul(&q.tr());
    let av: Vec<f64> = Vec::try_from(&a).unwrap();
    let bv: Vec<f64> = Vec::try_from(&b).unwrap();
    let m1: Vec<f64> = Vec::try_from(&mu1).unwrap();
    let m2: Vec<f64> = Vec::try_from(&mu2).unwrap();
    let expected: f64 = m1
        .iter()
        .zip(&m2)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        + av.iter()
            .zip(&bv)
            .map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2))
            .sum::<f64>();
    assert_fd((mu1, s1), (mu2, s2), expected, 1e-9);
}

#[test]
fn general_covariances_match_denman_beavers_sqrtm() {
    fresh_seed("general_covariances_match_denman_beavers_sqrtm");
    let f = 7;
    let g1 = Tensor::randn([f, f], F64);
    let g2 = Tensor::randn([f, f], F64) * 2.0;
    let s1 = g1.matmul(&g1.tr()) + Tensor::eye(f, F64) * 0.1;
    let s2 = g2.matmul(&g2.tr()) + Tensor::eye(f, F64) * 0.1;
    let mu1 = Tensor::randn([f], F64);
    let mu2 = Tensor::randn([f], F64);
    let diff: Vec<f64> = Vec::try_from(&(&mu1 - &mu2)).unwrap();
    let (m1, m2) = (to_mat(&s1), to_mat(&s2));
    let expected = diff.iter().map(|d| d * d).sum::<f64>() + trace(&m1) + trace(&m2)
        - 2.0 * trace(&sqrtm_db(&matmul(&m1, &m2)));
    assert_fd((mu1, s1), (mu2, s2), expected, 1e-8);
}

#[test]
fn singular_covariances_are_stable_and_zero_for_identical_sets() {
    fresh_seed("singular_covariances_are_stable_and_zero_for_identical_sets");
    // Fewer samples than dimensions: rank-deficient covariance, where a
    // naive sqrtm returns complex parts or NaN.
    let x = Tensor::randn([20, 64], F64);
    let s = GaussianStats::from_features(&x).unwrap();
    let d = frechet_distance(&s, &s).unwrap();
    assert!(d.is_finite() && d.abs() < 1e-8, "FD(x, x) = {d}");
    let y = Tensor::randn([20, 64], F64) + 0.5;
    let d2 = frechet_distance(&s, &GaussianStats::from_features(&y).unwrap()).unwrap();
    assert!(d2.is_finite() && d2 > 0.0);
}

#[test]
fn streaming_stats_match_two_pass_reference() {
    fresh_seed("streaming_stats_match_two_pass_reference");
    // A large mean stresses the accumulation (shifted sums keep precision).
    let x = Tensor::randn([203, 9], (Kind::Float, Device::Cpu)) * 0.5 + 1000.0;
    let mut acc = FeatureStats::default();
    for chunk in x.split(50, 0) {
        acc.update(&chunk).unwrap();
    }
    assert_eq!(acc.count(), 203);
    let got = acc.finish().unwrap();
    let (mu, cov) = mean_cov(&to_mat(&x));
    let gm: Vec<f64> = Vec::try_from(&got.mu).unwrap();
    let gc = to_mat(&got.sigma);
    for j in 0..9 {
        assert!((gm[j] - mu[j]).abs() < 1e-9, "mean {j}");
        for i in 0..9 {
            assert!(
                (gc[i][j] - cov[i][j]).abs() < 1e-9,
                "cov {i},{j}: {} vs {}",
                gc[i][j],
                cov[i][j]
            );
        }
    }
}

#[test]
fn stats_roundtrip_through_safetensors() {
    fresh_seed("stats_roundtrip_through_safetensors");
    let x = Tensor::randn([30, 5], F64);
    let s = GaussianStats::from_features(&x).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("stats.safetensors");
    s.save(&p).unwrap();
    let t = GaussianStats::load(&p).unwrap();
    assert_eq!(t.n, 30);
    assert!(frechet_distance(&s, &t).unwrap() < 1e-12);
    assert!(t.mu.allclose(&s.mu, 0.0, 0.0, false));
}

#[test]
fn mismatched_widths_are_an_error() {
    let a = GaussianStats::from_features(&Tensor::randn([10, 4], F64)).unwrap();
    let b = GaussianStats::from_features(&Tensor::randn([10, 5], F64)).unwrap();
    let e = frechet_distance(&a, &b).unwrap_err().to_string();
    assert!(e.contains("widths differ"), "{e}");
}

fn fixture() -> serde_json::Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fid_fixture.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

pub fn fixture_tensor(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<f64>> = serde_json::from_value(v.clone()).unwrap();
    let f = rows[0].len() as i64;
    let flat: Vec<f64> = rows.concat();
    Tensor::from_slice(&flat).reshape([-1, f])
}

#[test]
fn matches_scipy_on_committed_fixture() {
    let fx = fixture();
    let real = fixture_tensor(&fx["real"]);
    let fake = fixture_tensor(&fx["fake"]);
    // Features arrive in f32 in practice; the statistics are f64 either way.
    let a = GaussianStats::from_features(&real).unwrap();
    let b = GaussianStats::from_features(&fake).unwrap();
    let got = frechet_distance(&a, &b).unwrap();
    let expected = fx["fid"].as_f64().unwrap();
    assert!(
        (got - expected).abs() < 1e-8 * expected,
        "{got} vs scipy {expected}"
    );
}

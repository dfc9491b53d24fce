//! Improved precision and recall (Kynkäänniemi et al. 2019).
//!
//! Each set's manifold is the union of balls around its samples, with radius
//! the distance to the sample's k-th nearest neighbour in the same set.
//! Precision is the fraction of generated samples inside the real manifold,
//! recall the fraction of real samples inside the generated manifold.

use tch::{Kind, Tensor};

use crate::{EvalError, Result};

/// The two fractions, each in `[0, 1]`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct PrecisionRecall {
    /// Fraction of generated samples within the real manifold.
    pub precision: f64,
    /// Fraction of real samples within the generated manifold.
    pub recall: f64,
}

/// Precision and recall of `fake` `(M, F)` against `real` `(N, F)` with
/// k-NN radii (`k = 3` in the paper). Distances are computed in f64 on the
/// features' device, `chunk` rows at a time (memory `chunk × max(N, M)`).
pub fn precision_recall(
    real: &Tensor,
    fake: &Tensor,
    k: usize,
    chunk: usize,
) -> Result<PrecisionRecall> {
    for (what, t) in [("real features", real), ("generated features", fake)] {
        let s = t.size();
        if s.len() != 2 {
            return Err(EvalError::Shape {
                what,
                detail: format!("expected (N, F), got {s:?}"),
            });
        }
        if (s[0] as usize) < k + 1 {
            return Err(EvalError::TooFewSamples {
                what,
                need: k + 1,
                got: s[0] as usize,
            });
        }
    }
    if real.size()[1] != fake.size()[1] {
        return Err(EvalError::Shape {
            what: "precision/recall",
            detail: format!(
                "feature widths differ ({} vs {})",
                real.size()[1],
                fake.size()[1]
            ),
        });
    }
    let _guard = tch::no_grad_guard();
    let real = real.to_kind(Kind::Double);
    let fake = fake.to_device(real.device()).to_kind(Kind::Double);
    let chunk = chunk.max(1) as i64;
    let r_real = knn_radii_sq(&real, k, chunk);
    let r_fake = knn_radii_sq(&fake, k, chunk);
    Ok(PrecisionRecall {
        precision: coverage(&fake, &real, &r_real, chunk),
        recall: coverage(&real, &fake, &r_fake, chunk),
    })
}

/// Squared distances `(A, B)` between rows of `a` `(A, F)` and `b` `(B, F)`.
fn sq_dists(a: &Tensor, b: &Tensor) -> Tensor {
    let an = a.square().sum_dim_intlist(1, true, Kind::Double);
    let bn = b
        .square()
        .sum_dim_intlist(1, true, Kind::Double)
        .transpose(0, 1);
    (an + bn - a.matmul(&b.transpose(0, 1)) * 2.0).clamp_min(0.0)
}

/// Squared distance of each row to its k-th nearest other row, `(N)`.
fn knn_radii_sq(x: &Tensor, k: usize, chunk: i64) -> Tensor {
    let n = x.size()[0];
    let parts: Vec<Tensor> = (0..n)
        .step_by(chunk as usize)
        .map(|s| {
            let d = sq_dists(&x.narrow(0, s, chunk.min(n - s)), x);
            // k + 1 smallest: the first is the sample itself (distance 0).
            let (v, _) = d.topk(k as i64 + 1, 1, false, true);
            v.select(1, k as i64)
        })
        .collect();
    Tensor::cat(&parts, 0)
}

/// Fraction of `query` rows within radius of at least one `reference` row.
fn coverage(query: &Tensor, reference: &Tensor, radii_sq: &Tensor, chunk: i64) -> f64 {
    let n = query.size()[0];
    let mut inside = 0i64;
    for s in (0..n).step_by(chunk as usize) {
        let d = sq_dists(&query.narrow(0, s, chunk.min(n - s)), reference);
        inside += d
            .le_tensor(&radii_sq.unsqueeze(0))
            .any_dim(1, false)
            .sum(Kind::Int64)
            .int64_value(&[]);
    }
    inside as f64 / n as f64
}

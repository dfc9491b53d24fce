//! Gaussian feature statistics and the Fréchet distance between them.
//!
//! `d² = |μ₁ - μ₂|² + tr Σ₁ + tr Σ₂ - 2 tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}`
//!
//! The trace term is computed in f64 through two symmetric eigendecompositions
//! (`Σ₁^{1/2}`, then the eigenvalues of the symmetric `Σ₁^{1/2} Σ₂ Σ₁^{1/2}`),
//! clamping the tiny negative eigenvalues that rounding leaves on singular
//! covariances. This is the same quantity as `tr sqrtm(Σ₁ Σ₂)` (the two
//! matrices are similar) but never produces complex parts or NaNs, unlike a
//! general `sqrtm` of the non-symmetric product.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::{EvalError, Result};

/// Mean `(F)` and covariance `(F, F)` of a feature set, f64 on the CPU.
#[derive(Debug)]
pub struct GaussianStats {
    /// `(F)` f64.
    pub mu: Tensor,
    /// `(F, F)` f64, unbiased (divides by `n - 1`, as `numpy.cov`).
    pub sigma: Tensor,
    /// Number of samples the statistics come from.
    pub n: usize,
}

impl GaussianStats {
    /// Statistics of a whole feature matrix `(N, F)`.
    pub fn from_features(features: &Tensor) -> Result<Self> {
        let mut acc = FeatureStats::default();
        acc.update(features)?;
        acc.finish()
    }

    /// Feature width `F`.
    pub fn dim(&self) -> i64 {
        self.mu.size()[0]
    }

    /// Writes `mu`, `sigma` and `n` to a safetensors file (to cache the
    /// statistics of a reference set).
    pub fn save(&self, path: &Path) -> Result<()> {
        let n = Tensor::from_slice(&[self.n as i64]);
        let tensors = [("mu", &self.mu), ("sigma", &self.sigma), ("n", &n)]
            .map(|(k, t)| (k.to_string(), t.shallow_clone()));
        dim_io::save(path, tensors, &Default::default())?;
        Ok(())
    }

    /// Reads statistics written by [`GaussianStats::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |detail: String| {
            EvalError::File(dim_io::IoError::Mismatch {
                path: path.to_path_buf(),
                detail: format!(
                    "{detail}: not a statistics file written by dim eval; delete it to recompute"
                ),
            })
        };
        let file = dim_io::TensorFile::open(path)?;
        let get = |name: &str| match file.get(name) {
            Some(_) => Ok(file.read(name)?),
            None => Err(bad(format!("no tensor `{name}`"))),
        };
        let mu = get("mu")?.f_to_kind(Kind::Double)?;
        let sigma = get("sigma")?.f_to_kind(Kind::Double)?;
        let n = get("n")?;
        let f = mu.size();
        if f.len() != 1 || sigma.size() != [f[0], f[0]] || n.size() != [1] {
            return Err(bad(format!(
                "mu {:?}, sigma {:?} and n {:?} are not (F), (F, F) and (1)",
                f,
                sigma.size(),
                n.size()
            )));
        }
        let n = n.f_int64_value(&[0])? as usize;
        Ok(Self { mu, sigma, n })
    }
}

/// Streaming accumulator of feature mean and covariance, in f64.
///
/// Sums are taken around a shift (the first batch's mean) so that the
/// covariance does not lose precision to large means.
#[derive(Debug, Default)]
pub struct FeatureStats {
    n: usize,
    shift: Option<Tensor>,
    sum: Option<Tensor>,
    outer: Option<Tensor>,
}

impl FeatureStats {
    /// Adds a batch of features `(B, F)` (any float dtype, any device; the sums
    /// stay on that device in f64).
    pub fn update(&mut self, features: &Tensor) -> Result<()> {
        let size = features.size();
        if size.len() != 2 {
            return Err(EvalError::Shape {
                what: "features",
                detail: format!("expected (N, F), got {size:?}"),
            });
        }
        if size[0] == 0 {
            return Ok(());
        }
        let x = features.to_kind(Kind::Double);
        if let Some(shift) = &self.shift {
            if shift.size()[0] != size[1] {
                return Err(EvalError::Shape {
                    what: "features",
                    detail: format!(
                        "width {} differs from earlier batches' {}",
                        size[1],
                        shift.size()[0]
                    ),
                });
            }
        } else {
            self.shift = Some(x.mean_dim(0, false, Kind::Double));
        }
        let xc = &x
            - self
                .shift
                .as_ref()
                .expect("set above")
                .to_device(x.device());
        let s = xc.sum_dim_intlist(0, false, Kind::Double);
        let o = xc.transpose(0, 1).matmul(&xc);
        self.sum = Some(match self.sum.take() {
            Some(prev) => prev + s,
            None => s,
        });
        self.outer = Some(match self.outer.take() {
            Some(prev) => prev + o,
            None => o,
        });
        self.n += size[0] as usize;
        Ok(())
    }

    /// Number of samples seen.
    pub fn count(&self) -> usize {
        self.n
    }

    /// Mean and unbiased covariance, on the CPU. Needs at least 2 samples.
    pub fn finish(self) -> Result<GaussianStats> {
        if self.n < 2 {
            return Err(EvalError::TooFewSamples {
                what: "feature covariance",
                need: 2,
                got: self.n,
            });
        }
        let n = self.n as f64;
        let cpu = |t: Option<Tensor>| t.expect("n >= 2").to_device(Device::Cpu);
        let (shift, sum, outer) = (cpu(self.shift), cpu(self.sum), cpu(self.outer));
        let mean_c = sum / n;
        let sigma = (outer - mean_c.outer(&mean_c) * n) / (n - 1.0);
        Ok(GaussianStats {
            mu: shift + mean_c,
            sigma,
            n: self.n,
        })
    }
}

/// The squared Fréchet distance between two Gaussians (FID when the features
/// are Inception pool features). Computed in f64 on the CPU.
pub fn frechet_distance(a: &GaussianStats, b: &GaussianStats) -> Result<f64> {
    if a.dim() != b.dim() {
        return Err(EvalError::Shape {
            what: "Fréchet distance",
            detail: format!(
                "feature widths differ ({} vs {}): both sets must use the same feature network",
                a.dim(),
                b.dim()
            ),
        });
    }
    let sym = |s: &Tensor| {
        let s = s.to_device(Device::Cpu).to_kind(Kind::Double);
        (&s + s.transpose(0, 1)) * 0.5
    };
    let (s1, s2) = (sym(&a.sigma), sym(&b.sigma));
    let diff = a.mu.to_kind(Kind::Double) - b.mu.to_kind(Kind::Double);
    let sqrt_s1 = psd_sqrt(&s1);
    let m = sym(&sqrt_s1.matmul(&s2).matmul(&sqrt_s1));
    let tr_covmean = m
        .linalg_eigvalsh("L")
        .clamp_min(0.0)
        .sqrt()
        .sum(Kind::Double)
        .double_value(&[]);
    let d = diff.dot(&diff).double_value(&[])
        + s1.trace().double_value(&[])
        + s2.trace().double_value(&[])
        - 2.0 * tr_covmean;
    // Rounding can leave a tiny negative value for identical inputs.
    Ok(d.max(0.0))
}

/// Square root of a symmetric positive semi-definite matrix `(F, F)`, f64.
fn psd_sqrt(s: &Tensor) -> Tensor {
    let (w, v) = s.linalg_eigh("L");
    let r = w.clamp_min(0.0).sqrt();
    (&v * r.unsqueeze(0)).matmul(&v.transpose(0, 1))
}

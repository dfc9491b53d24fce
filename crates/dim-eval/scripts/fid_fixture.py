#!/usr/bin/env python3
"""Writes tests/fixtures/fid_fixture.json: two fixed feature sets and the
reference values dim-eval's tests compare against.

- FID as the reference implementations compute it: numpy mean/cov
  (rowvar=False, unbiased) and scipy.linalg.sqrtm of the product of the
  covariances, real part.
- Precision/recall (Kynkäänniemi et al. 2019, k = 3) by brute force in numpy.

Run from the crate folder with the project venv (scipy installed):
    ../../.venv/bin/python scripts/fid_fixture.py
"""
import json
import pathlib

import numpy as np
from scipy import linalg

rng = np.random.default_rng(20191105)
n1, n2, f = 300, 250, 12
# Correlated, non-Gaussian features with different means and covariances.
mix1 = rng.normal(size=(f, f))
mix2 = mix1 + 0.5 * rng.normal(size=(f, f))
x1 = np.tanh(rng.normal(size=(n1, f))) @ mix1 + 0.3
x2 = rng.standard_t(df=5, size=(n2, f)) @ mix2 * 0.7 - 0.1

mu1, mu2 = x1.mean(0), x2.mean(0)
s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
covmean = linalg.sqrtm(s1.dot(s2))
covmean = covmean.real
diff = mu1 - mu2
fid = float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def radii(x, k):
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, k]


def inside(q, ref, r):
    d = np.sqrt(((q[:, None, :] - ref[None, :, :]) ** 2).sum(-1))
    return float((d <= r[None, :]).any(1).mean())


k = 3
precision = inside(x2, x1, radii(x1, k))
recall = inside(x1, x2, radii(x2, k))

out = {
    "real": x1.tolist(),
    "fake": x2.tolist(),
    "fid": fid,
    "k": k,
    "precision": precision,
    "recall": recall,
    "scipy_version": __import__("scipy").__version__,
}
path = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fid_fixture.json"
path.write_text(json.dumps(out))
print(f"wrote {path}: fid={fid:.10f} precision={precision} recall={recall}")

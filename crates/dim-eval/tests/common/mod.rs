//! Helpers shared by the tests: fresh seeds and plain-Rust f64 references.

#![allow(dead_code)]

/// A fresh seed per run (printed, so a failure can be reproduced).
pub fn fresh_seed(test: &str) -> i64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as i64;
    eprintln!("{test}: seed {nanos}");
    tch::manual_seed(nanos);
    nanos
}

/// Row-major `n × n` matrix in f64.
pub type Mat = Vec<Vec<f64>>;

pub fn to_mat(t: &tch::Tensor) -> Mat {
    let t = t.to_kind(tch::Kind::Double).contiguous();
    let s = t.size();
    let flat: Vec<f64> = Vec::<f64>::try_from(t.flatten(0, -1)).unwrap();
    flat.chunks(s[1] as usize).map(|r| r.to_vec()).collect()
}

pub fn matmul(a: &Mat, b: &Mat) -> Mat {
    let (n, m, p) = (a.len(), b.len(), b[0].len());
    let mut c = vec![vec![0.0; p]; n];
    for i in 0..n {
        for k in 0..m {
            for j in 0..p {
                c[i][j] += a[i][k] * b[k][j];
            }
        }
    }
    c
}

/// Gauss-Jordan inverse with partial pivoting.
pub fn inverse(a: &Mat) -> Mat {
    let n = a.len();
    let mut m: Mat = a
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut row = r.clone();
            row.extend((0..n).map(|j| if i == j { 1.0 } else { 0.0 }));
            row
        })
        .collect();
    for c in 0..n {
        let p = (c..n)
            .max_by(|&x, &y| m[x][c].abs().total_cmp(&m[y][c].abs()))
            .unwrap();
        m.swap(c, p);
        let d = m[c][c];
        for v in m[c].iter_mut() {
            *v /= d;
        }
        for r in 0..n {
            if r != c {
                let f = m[r][c];
                let pivot = m[c].clone();
                for (v, pv) in m[r].iter_mut().zip(pivot) {
                    *v -= f * pv;
                }
            }
        }
    }
    m.into_iter().map(|r| r[n..].to_vec()).collect()
}

/// Principal square root by the Denman-Beavers iteration (works on the
/// non-symmetric product of two SPD matrices, whose eigenvalues are positive).
pub fn sqrtm_db(a: &Mat) -> Mat {
    let n = a.len();
    let mut y = a.clone();
    let mut z: Mat = (0..n)
        .map(|i| (0..n).map(|j| if i == j { 1.0 } else { 0.0 }).collect())
        .collect();
    for _ in 0..60 {
        let (yi, zi) = (inverse(&y), inverse(&z));
        let ny: Mat = (0..n)
            .map(|i| (0..n).map(|j| 0.5 * (y[i][j] + zi[i][j])).collect())
            .collect();
        let nz: Mat = (0..n)
            .map(|i| (0..n).map(|j| 0.5 * (z[i][j] + yi[i][j])).collect())
            .collect();
        y = ny;
        z = nz;
    }
    y
}

pub fn trace(a: &Mat) -> f64 {
    (0..a.len()).map(|i| a[i][i]).sum()
}

/// Mean and unbiased covariance of the rows, two-pass.
pub fn mean_cov(x: &Mat) -> (Vec<f64>, Mat) {
    let (n, f) = (x.len(), x[0].len());
    let mu: Vec<f64> = (0..f)
        .map(|j| x.iter().map(|r| r[j]).sum::<f64>() / n as f64)
        .collect();
    let mut c = vec![vec![0.0; f]; f];
    for r in x {
        for i in 0..f {
            for j in 0..f {
                c[i][j] += (r[i] - mu[i]) * (r[j] - mu[j]);
            }
        }
    }
    for row in c.iter_mut() {
        for v in row.iter_mut() {
            *v /= (n - 1) as f64;
        }
    }
    (mu, c)
}

//! Seeded, device-independent noise.
//!
//! `tch::manual_seed` seeds a process-global generator, which makes results
//! depend on everything else that draws from it. Instead every random number in
//! this crate comes from a [`NoiseRng`]: one xoshiro256++ stream per batch row
//! (row `r` of a rng created with seed `s` and `first_row = f` is seeded from
//! `(s, f + r)` through SplitMix64), standard normals by Box–Muller in f64 on the
//! CPU, then converted to the requested dtype and copied to the device.
//!
//! Consequences: the same seed gives bit-identical noise on every device and
//! platform, and a sample's noise depends only on `(seed, global row index)`,
//! not on the batch size it was drawn in (so sampling 50 000 images in batches
//! of any size, or resuming half-way with `first_row`, draws the same noise).
//! The cost is a host-to-device copy of the noise each step, which is small next
//! to a network forward.

use dim_rng::Xoshiro256pp;
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

/// Above this many values, rows are filled in parallel (rayon).
const PARALLEL_MIN: usize = 1 << 18;

/// Seeded per-row random streams; see the module docs.
#[derive(Debug, Clone)]
pub struct NoiseRng {
    seed: u64,
    first_row: u64,
    row_stride: u64,
    streams: Vec<Xoshiro256pp>,
}

impl NoiseRng {
    /// Streams for rows `0, 1, ...` of seed `seed`.
    pub fn new(seed: u64) -> Self {
        Self::with_first_row(seed, 0)
    }

    /// Streams for global rows `first_row, first_row + 1, ...`: row `r` of this
    /// generator draws exactly what row `first_row + r` of `NoiseRng::new(seed)`
    /// draws (given the same sequence of calls).
    pub fn with_first_row(seed: u64, first_row: u64) -> Self {
        Self::with_rows(seed, first_row, 1)
    }

    /// Streams for global rows `first_row, first_row + stride, ...`: one
    /// data-parallel rank's share of a batch whose rows are dealt out round
    /// robin (rank `r` of `n` holds rows `first + r, first + r + n, ...`), so
    /// every sample draws the same noise whatever the number of ranks.
    pub fn with_rows(seed: u64, first_row: u64, stride: u64) -> Self {
        Self {
            seed,
            first_row,
            row_stride: stride.max(1),
            streams: Vec::new(),
        }
    }

    /// The seed this generator was created with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    fn rows(&mut self, n: usize) -> &mut [Xoshiro256pp] {
        while self.streams.len() < n {
            let r = self.first_row + self.streams.len() as u64 * self.row_stride;
            self.streams.push(Xoshiro256pp::new(self.seed, r));
        }
        &mut self.streams[..n]
    }

    fn split_shape(shape: &[i64]) -> (usize, usize) {
        assert!(
            !shape.is_empty(),
            "NoiseRng needs at least one dimension (the batch)"
        );
        assert!(
            shape.iter().all(|&d| d >= 0),
            "negative dimension in {shape:?}"
        );
        let rows = shape[0] as usize;
        let per_row = shape[1..].iter().product::<i64>() as usize;
        (rows, per_row)
    }

    /// Standard normal noise of `shape` (first dimension = rows).
    pub fn randn(&mut self, shape: &[i64], kind: Kind, device: Device) -> Tensor {
        let (rows, per_row) = Self::split_shape(shape);
        if kind == Kind::Float {
            // Same values as generating f64 and converting (both round to nearest).
            let buf = self.normals(rows, per_row, |v| v as f32);
            return upload(Tensor::from_slice(&buf).view(shape), device);
        }
        let buf = self.normals(rows, per_row, |v| v);
        to_tensor(&buf, shape, kind, device)
    }

    fn normals<T: Copy + Default + Send>(
        &mut self,
        rows: usize,
        per_row: usize,
        conv: fn(f64) -> T,
    ) -> Vec<T> {
        let mut buf = vec![T::default(); rows * per_row];
        let fill = |(stream, chunk): (&mut Xoshiro256pp, &mut [T])| {
            let mut pairs = chunk.chunks_exact_mut(2);
            for pair in &mut pairs {
                let (a, b) = stream.next_normal_pair();
                pair[0] = conv(a);
                pair[1] = conv(b);
            }
            if let [last] = pairs.into_remainder() {
                *last = conv(stream.next_normal_pair().0);
            }
        };
        let streams = self.rows(rows);
        let chunk = per_row.max(1);
        if rows * per_row >= PARALLEL_MIN {
            // Rows are independent streams, so the result does not depend on threading.
            streams
                .par_iter_mut()
                .zip(buf.par_chunks_mut(chunk))
                .for_each(fill);
        } else {
            streams.iter_mut().zip(buf.chunks_mut(chunk)).for_each(fill);
        }
        buf
    }

    /// Uniform noise in [0, 1) of `shape` (first dimension = rows).
    pub fn rand(&mut self, shape: &[i64], kind: Kind, device: Device) -> Tensor {
        let (rows, per_row) = Self::split_shape(shape);
        let mut buf = vec![0f64; rows * per_row];
        for (stream, chunk) in self
            .rows(rows)
            .iter_mut()
            .zip(buf.chunks_mut(per_row.max(1)))
        {
            for v in chunk {
                *v = stream.next_f64();
            }
        }
        to_tensor(&buf, shape, kind, device)
    }

    /// One integer in `[0, high)` per row, as an Int64 tensor of shape (rows).
    pub fn randint(&mut self, high: i64, rows: i64, device: Device) -> Tensor {
        assert!(high > 0, "randint needs high > 0");
        let vals: Vec<i64> = self
            .rows(rows as usize)
            .iter_mut()
            .map(|s| ((s.next_f64() * high as f64) as i64).min(high - 1))
            .collect();
        upload(Tensor::from_slice(&vals), device)
    }
}

fn to_tensor(buf: &[f64], shape: &[i64], kind: Kind, device: Device) -> Tensor {
    upload(Tensor::from_slice(buf).view(shape).to_kind(kind), device)
}

/// `host` on `device`. To a GPU through pinned memory, without waiting: a
/// copy from pageable memory makes the host wait until the GPU has finished
/// all its queued work, which in a training loop idles the GPU once a step.
fn upload(host: Tensor, device: Device) -> Tensor {
    match device {
        Device::Cuda(_) => {
            host.internal_pin_memory(device)
                .to_device_(device, host.kind(), true, false)
        }
        _ => host.to_device(device),
    }
}

/// Where a sampler's per-step noise comes from (ddpm, ddim with eta > 0,
/// euler_a, dpm++2m_sde): a [`NoiseRng`], or any closure
/// `FnMut(shape, kind, device) -> Tensor`, e.g. one that replays recorded noise.
/// Samplers draw only on steps whose noise coefficient is non-zero, in step order.
pub trait NoiseSource {
    /// Standard-normal noise of `shape`.
    fn noise(&mut self, shape: &[i64], kind: Kind, device: Device) -> Tensor;
}

impl NoiseSource for NoiseRng {
    fn noise(&mut self, shape: &[i64], kind: Kind, device: Device) -> Tensor {
        self.randn(shape, kind, device)
    }
}

impl<F: FnMut(&[i64], Kind, Device) -> Tensor> NoiseSource for F {
    fn noise(&mut self, shape: &[i64], kind: Kind, device: Device) -> Tensor {
        self(shape, kind, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_batch_independent() {
        let a = NoiseRng::new(7).randn(&[4, 3, 5], Kind::Double, Device::Cpu);
        let b = NoiseRng::new(7).randn(&[4, 3, 5], Kind::Double, Device::Cpu);
        assert!(a.equal(&b));
        // Rows 2..4 drawn on their own equal rows 2..4 of the full batch.
        let c = NoiseRng::with_first_row(7, 2).randn(&[2, 3, 5], Kind::Double, Device::Cpu);
        assert!(a.narrow(0, 2, 2).equal(&c));
        let d = NoiseRng::new(8).randn(&[4, 3, 5], Kind::Double, Device::Cpu);
        assert!(!a.equal(&d));
        // The f32 fast path equals generating f64 and converting.
        let f = NoiseRng::new(7).randn(&[4, 3, 5], Kind::Float, Device::Cpu);
        assert!(f.equal(&a.to_kind(Kind::Float)));
        // Large (parallel) draws equal sequential ones row by row.
        let big = NoiseRng::new(7).randn(&[64, 8192], Kind::Double, Device::Cpu);
        let small = NoiseRng::with_first_row(7, 63).randn(&[1, 8192], Kind::Double, Device::Cpu);
        assert!(big.narrow(0, 63, 1).equal(&small));
    }

    /// Round-robin shares of a batch (data-parallel ranks) draw the rows of
    /// the whole batch, for every number of ranks.
    #[test]
    fn strided_rows_equal_the_whole_batch() {
        let all = NoiseRng::with_first_row(3, 10).randn(&[12, 7], Kind::Double, Device::Cpu);
        for ranks in [2i64, 3, 4] {
            for r in 0..ranks {
                let part = NoiseRng::with_rows(3, 10 + r as u64, ranks as u64).randn(
                    &[12 / ranks, 7],
                    Kind::Double,
                    Device::Cpu,
                );
                let rows = Tensor::arange_start_step(r, 12, ranks, (Kind::Int64, Device::Cpu));
                assert!(
                    all.index_select(0, &rows).equal(&part),
                    "rank {r} of {ranks}"
                );
            }
        }
    }

    #[test]
    fn moments() {
        let x = NoiseRng::new(1).randn(&[1000, 200], Kind::Double, Device::Cpu);
        let m = x.mean(Kind::Double).double_value(&[]);
        let v = x.var(true).double_value(&[]);
        // 200 000 draws: SE(mean) = 0.0022, SE(var) = 0.0032.
        assert!(m.abs() < 0.011, "mean {m}");
        assert!((v - 1.0).abs() < 0.016, "var {v}");
        let u = NoiseRng::new(1).rand(&[1000, 100], Kind::Double, Device::Cpu);
        let mu = u.mean(Kind::Double).double_value(&[]);
        assert!((mu - 0.5).abs() < 0.005, "uniform mean {mu}");
        let t = NoiseRng::new(3).randint(10, 10000, Device::Cpu);
        assert_eq!(t.min().int64_value(&[]), 0);
        assert_eq!(t.max().int64_value(&[]), 9);
    }
}

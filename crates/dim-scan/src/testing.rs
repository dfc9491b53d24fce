//! Inputs for the scan's tests and benchmarks, in one place: deterministic
//! `f32` vectors for the slice-level CPU scan ([`DirData`], the same values on
//! every run and platform, as the instruction-count guard needs) and random
//! tensors for the op ([`DirTensors`], from libtorch's generator, so
//! `tch::manual_seed` replays them). The value ranges are Mamba's usual ones:
//! `delta` around −1 before the softplus (Δ ≈ 0.3), `A` negative.

use tch::{Device, Kind, Tensor};

use crate::cpu::{DirGrads, DirInputs, Shape};
use crate::ScanInputs;

/// The names of one direction's inputs, in the order of [`DirData`] and
/// [`DirTensors`] (and of `dim ops scan`'s safetensors keys).
pub const INPUT_NAMES: [&str; 7] = ["u", "delta", "A", "B", "C", "D", "delta_bias"];

/// `n` values in `[lo, hi)` from a fixed 64-bit LCG seeded by `seed`: the
/// same stream on every run (no `rand` dependency).
pub fn lcg_values(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            lo + (hi - lo) * ((x >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

/// One direction's inputs as contiguous f32 vectors, in the order of
/// [`INPUT_NAMES`]: `u`, `delta` `(batch, D, L)`; `A` `(D, N)`; `B`, `C`
/// `(batch, G, N, L)`; `D`, `delta_bias` `(D)`. Also used, shaped alike, as
/// one direction's gradient buffers.
#[derive(Clone, Debug)]
pub struct DirData(pub [Vec<f32>; 7]);

impl DirData {
    /// Deterministic inputs for shape `s`, the stream picked by `seed`
    /// (seeds `seed..seed + 7` feed the seven vectors).
    pub fn new(s: Shape, seed: u64) -> Self {
        let (bdl, bgnl) = (
            s.batch * s.dim * s.len,
            s.batch * s.groups * s.dstate * s.len,
        );
        Self([
            lcg_values(bdl, seed, -2.0, 2.0),
            lcg_values(bdl, seed + 1, -1.5, 0.5),
            lcg_values(s.dim * s.dstate, seed + 2, -1.5, -0.5),
            lcg_values(bgnl, seed + 3, -1.0, 1.0),
            lcg_values(bgnl, seed + 4, -1.0, 1.0),
            lcg_values(s.dim, seed + 5, -1.0, 1.0),
            lcg_values(s.dim, seed + 6, -0.1, 0.1),
        ])
    }

    /// Buffers of the same shapes, every element `v` (NaN shows an output
    /// left unwritten).
    pub fn filled_like(&self, v: f32) -> Self {
        Self(self.0.clone().map(|x| vec![v; x.len()]))
    }

    /// The scan's view of these inputs, `D` and `delta_bias` included.
    pub fn inputs(&self, reverse: bool) -> DirInputs<'_, f32> {
        let t = &self.0;
        DirInputs {
            u: &t[0],
            delta: &t[1],
            a: &t[2],
            b: &t[3],
            c: &t[4],
            d: Some(&t[5]),
            delta_bias: Some(&t[6]),
            reverse,
        }
    }

    /// These buffers as one direction's gradients (every one wanted).
    pub fn grads(&mut self) -> DirGrads<'_, f32> {
        let [du, ddelta, da, db, dc, dd, ddb] = &mut self.0;
        DirGrads {
            du,
            ddelta,
            da,
            db,
            dc,
            dd: Some(dd),
            ddelta_bias: Some(ddb),
        }
    }
}

/// One direction's input tensors, in the order of [`INPUT_NAMES`]: `u`,
/// `delta` `(batch, D, L)`, `B`, `C` `(batch, G, N, L)` in the data dtype;
/// `A` `(D, N)`, `D`, `delta_bias` `(D)` in f32.
#[derive(Debug)]
pub struct DirTensors(pub [Tensor; 7]);

impl DirTensors {
    /// Random inputs from libtorch's generator: `data` is the dtype of `u`,
    /// `delta`, `B`, `C`.
    pub fn random([batch, dim, len, dstate, groups]: [i64; 5], data: Kind, device: Device) -> Self {
        let (x, f) = ((data, device), (Kind::Float, device));
        Self([
            Tensor::randn([batch, dim, len], x),
            Tensor::randn([batch, dim, len], x) * 0.5 - 1.0,
            -(Tensor::rand([dim, dstate], f) + 0.5),
            Tensor::randn([batch, groups, dstate, len], x),
            Tensor::randn([batch, groups, dstate, len], x),
            Tensor::randn([dim], f),
            Tensor::randn([dim], f) * 0.1,
        ])
    }

    /// Every tensor through `f` (a dtype change, gradients wanted, ...).
    pub fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        Self(self.0.each_ref().map(f))
    }

    /// The op's view of these tensors, `D` and `delta_bias` included.
    pub fn inputs(&self) -> ScanInputs<'_> {
        let t = &self.0;
        ScanInputs {
            u: &t[0],
            delta: &t[1],
            a: &t[2],
            b: &t[3],
            c: &t[4],
            d: Some(&t[5]),
            delta_bias: Some(&t[6]),
        }
    }
}

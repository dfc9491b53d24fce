//! Instruction counts of the CPU scan (`dim_scan::cpu`), fused bidirectional
//! forward and backward at an awkward training-like size (batch 2, D 48,
//! L 200, N 16, f32, z gate and softplus on). Measured by
//! `cargo xtask bench icount` under callgrind; see `dim_build::icount`.
use dim_scan::cpu::{backward, forward, DirGrads, DirInputs, Shape};

const S: Shape = Shape {
    batch: 2,
    dim: 48,
    len: 200,
    dstate: 16,
    groups: 1,
};

/// Deterministic values in `[lo, hi)` (a fixed LCG: the same inputs every run).
fn values(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
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

/// One direction's inputs: u, delta, A, B, C, D, delta_bias.
struct Dir([Vec<f32>; 7]);

impl Dir {
    fn new(seed: u64) -> Self {
        let (bdl, bnl) = (
            S.batch * S.dim * S.len,
            S.batch * S.groups * S.dstate * S.len,
        );
        Self([
            values(bdl, seed, -2.0, 2.0),
            values(bdl, seed + 1, -1.5, 0.5),
            values(S.dim * S.dstate, seed + 2, -1.5, -0.5),
            values(bnl, seed + 3, -1.0, 1.0),
            values(bnl, seed + 4, -1.0, 1.0),
            values(S.dim, seed + 5, -1.0, 1.0),
            values(S.dim, seed + 6, -0.1, 0.1),
        ])
    }

    fn inputs(&self, reverse: bool) -> DirInputs<'_, f32> {
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
}

fn fwd() -> Box<dyn FnMut() + Send> {
    let (f, r) = (Dir::new(1), Dir::new(20));
    let z = values(S.batch * S.dim * S.len, 40, -2.0, 2.0);
    let mut y = vec![0f32; z.len()];
    Box::new(move || {
        forward(
            S,
            &[f.inputs(false), r.inputs(true)],
            Some(&z),
            &mut y,
            true,
        );
        std::hint::black_box(&y);
    })
}

/// Gradients of one direction, shaped as its inputs.
struct Grads([Vec<f32>; 7]);

impl Grads {
    fn new(d: &Dir) -> Self {
        Self(d.0.clone().map(|v| vec![0f32; v.len()]))
    }

    fn as_grads(&mut self) -> DirGrads<'_, f32> {
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

fn bwd() -> Box<dyn FnMut() + Send> {
    let (f, r) = (Dir::new(1), Dir::new(20));
    let z = values(S.batch * S.dim * S.len, 40, -2.0, 2.0);
    let dy = values(z.len(), 41, -1.0, 1.0);
    let (mut gf, mut gr) = (Grads::new(&f), Grads::new(&r));
    let mut dz = vec![0f32; z.len()];
    Box::new(move || {
        let mut grads = [gf.as_grads(), gr.as_grads()];
        backward(
            S,
            &[f.inputs(false), r.inputs(true)],
            Some(&z),
            &dy,
            &mut grads,
            Some(&mut dz),
            true,
        );
        std::hint::black_box(&dz);
    })
}

fn main() {
    dim_build::icount::main(&[("scan_cpu_fwd_bidir", &fwd), ("scan_cpu_bwd_bidir", &bwd)]);
}

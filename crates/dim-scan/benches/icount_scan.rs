//! Instruction counts of the CPU scan (`dim_scan::cpu`), fused bidirectional
//! forward and backward at an awkward training-like size (batch 2, D 48,
//! L 200, N 16, f32, z gate and softplus on). Measured by
//! `cargo xtask bench icount` under callgrind; see `dim_build::icount`.
use dim_scan::cpu::{backward, forward, Isa, Shape};
use dim_scan::testing::{lcg_values, DirData};

const S: Shape = Shape {
    batch: 2,
    dim: 48,
    len: 200,
    dstate: 16,
    groups: 1,
};

fn fwd() -> Box<dyn FnMut() + Send> {
    let (f, r) = (DirData::new(S, 1), DirData::new(S, 20));
    let z = lcg_values(S.batch * S.dim * S.len, 40, -2.0, 2.0);
    let mut y = vec![0f32; z.len()];
    Box::new(move || {
        forward(
            Isa::detect(),
            S,
            &[f.inputs(false), r.inputs(true)],
            Some(&z),
            &mut y,
            true,
        );
        std::hint::black_box(&y);
    })
}

fn bwd() -> Box<dyn FnMut() + Send> {
    let (f, r) = (DirData::new(S, 1), DirData::new(S, 20));
    let z = lcg_values(S.batch * S.dim * S.len, 40, -2.0, 2.0);
    let dy = lcg_values(z.len(), 41, -1.0, 1.0);
    let (mut gf, mut gr) = (f.filled_like(0.0), r.filled_like(0.0));
    let mut dz = vec![0f32; z.len()];
    Box::new(move || {
        let mut grads = [gf.grads(), gr.grads()];
        backward(
            Isa::detect(),
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

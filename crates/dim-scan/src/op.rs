//! The public entry points: validation, then the native autograd op.

use tch::{Device, Kind, Tensor};

use crate::{Direction, ScanError, ScanInputs, ScanOptions};

/// Largest state size N the CUDA kernels take (`DIM_SCAN_CUDA_MAX_DSTATE`).
pub const CUDA_MAX_DSTATE: i64 = 64;

/// Whether this build compiled the CUDA kernels (nvcc was found at build time).
pub fn cuda_kernels_built() -> bool {
    cfg!(dim_cuda)
}

/// One direction of the selective scan, optionally gated by `silu(z)`.
///
/// Takes [`ScanInputs`] (shapes there) and `z: (batch, D, L)`; returns
/// `y: (batch, D, L)` in the input dtype. Differentiable with respect to every
/// tensor input.
pub fn selective_scan(
    x: ScanInputs<'_>,
    direction: Direction,
    z: Option<&Tensor>,
    opts: ScanOptions,
) -> Result<Tensor, ScanError> {
    validate(&[x], z)?;
    crate::ffi::apply(&[x], direction == Direction::Reverse, z, opts)
}

/// Fused bidirectional scan: `(scan_forward(forward) + scan_reverse(reverse)) · silu(z)`.
///
/// Each direction has its own parameters; both share the shapes of
/// [`ScanInputs`]. Returns `y: (batch, D, L)` in the input dtype.
pub fn selective_scan_bidirectional(
    forward: ScanInputs<'_>,
    reverse: ScanInputs<'_>,
    z: Option<&Tensor>,
    opts: ScanOptions,
) -> Result<Tensor, ScanError> {
    validate(&[forward, reverse], z)?;
    crate::ffi::apply(&[forward, reverse], false, z, opts)
}

/// Backpropagates `dy` from `y` through libtorch autograd (`y.backward(dy)`),
/// which tch does not offer for non-scalar outputs. `dy` has `y`'s shape.
pub fn backward_with_grad(y: &Tensor, dy: &Tensor) -> Result<(), ScanError> {
    if y.size() != dy.size() {
        return Err(ScanError::Shape {
            name: "dy".into(),
            got: dy.size(),
            expected: format!("{:?}, the shape of y", y.size()),
        });
    }
    crate::ffi::backward_with_grad(y, dy)
}

const DATA_KINDS: [Kind; 3] = [Kind::Float, Kind::BFloat16, Kind::Half];
const PARAM_KINDS: [Kind; 4] = [Kind::Float, Kind::BFloat16, Kind::Half, Kind::Double];

fn validate(dirs: &[ScanInputs<'_>], z: Option<&Tensor>) -> Result<(), ScanError> {
    let u0 = dirs[0].u;
    let (kind, device) = (u0.kind(), u0.device());
    let shape = |name: &str, t: &Tensor, expected: &[i64]| -> Result<(), ScanError> {
        if t.size() != expected {
            return Err(ScanError::Shape {
                name: name.into(),
                got: t.size(),
                expected: format!("{expected:?}"),
            });
        }
        if t.device() != device {
            return Err(ScanError::Device {
                name: name.into(),
                got: t.device(),
                expected: device,
            });
        }
        Ok(())
    };
    let data_kind = |name: &str, t: &Tensor| -> Result<(), ScanError> {
        if t.kind() != kind {
            return Err(ScanError::Dtype {
                name: name.into(),
                got: t.kind(),
                expected: format!("{kind:?}, the dtype of `u`"),
            });
        }
        Ok(())
    };
    let param_kind = |name: &str, t: &Tensor| -> Result<(), ScanError> {
        if !PARAM_KINDS.contains(&t.kind()) {
            return Err(ScanError::Dtype {
                name: name.into(),
                got: t.kind(),
                expected: "a floating-point dtype (used as f32)".into(),
            });
        }
        Ok(())
    };

    if !DATA_KINDS.contains(&kind) {
        return Err(ScanError::Dtype {
            name: "u".into(),
            got: kind,
            expected: "f32, bf16 or f16".into(),
        });
    }
    let [batch, dim, len] = <[i64; 3]>::try_from(u0.size()).map_err(|got| ScanError::Shape {
        name: "u".into(),
        got,
        expected: "(batch, D, L)".into(),
    })?;
    let a_size = dirs[0].a.size();
    if a_size.len() != 2 || a_size[0] != dim || a_size[1] < 1 {
        return Err(ScanError::Shape {
            name: "A".into(),
            got: a_size,
            expected: format!("[{dim}, N] (D, N)"),
        });
    }
    let dstate = a_size[1];
    let b_size = dirs[0].b.size();
    let groups = if b_size.len() == 4 { b_size[1] } else { 0 };
    if groups < 1 || dim % groups != 0 {
        return Err(ScanError::Shape {
            name: "B".into(),
            got: b_size,
            expected: format!("[{batch}, G, {dstate}, {len}] with G dividing D = {dim}"),
        });
    }
    if batch < 1 || dim < 1 || len < 1 {
        return Err(ScanError::Shape {
            name: "u".into(),
            got: u0.size(),
            expected: "(batch, D, L), all at least 1".into(),
        });
    }
    for (i, x) in dirs.iter().enumerate() {
        let sfx = if i == 0 { "" } else { "_b" };
        let bl = [batch, dim, len];
        let bgnl = [batch, groups, dstate, len];
        shape(&format!("u{sfx}"), x.u, &bl)?;
        data_kind(&format!("u{sfx}"), x.u)?;
        shape(&format!("delta{sfx}"), x.delta, &bl)?;
        data_kind(&format!("delta{sfx}"), x.delta)?;
        shape(&format!("A{sfx}"), x.a, &[dim, dstate])?;
        param_kind(&format!("A{sfx}"), x.a)?;
        shape(&format!("B{sfx}"), x.b, &bgnl)?;
        data_kind(&format!("B{sfx}"), x.b)?;
        shape(&format!("C{sfx}"), x.c, &bgnl)?;
        data_kind(&format!("C{sfx}"), x.c)?;
        if let Some(d) = x.d {
            shape(&format!("D{sfx}"), d, &[dim])?;
            param_kind(&format!("D{sfx}"), d)?;
        }
        if let Some(bias) = x.delta_bias {
            shape(&format!("delta_bias{sfx}"), bias, &[dim])?;
            param_kind(&format!("delta_bias{sfx}"), bias)?;
        }
    }
    if let Some(z) = z {
        shape("z", z, &[batch, dim, len])?;
        data_kind("z", z)?;
    }
    if let Device::Cuda(_) = device {
        if !cuda_kernels_built() {
            return Err(ScanError::NoCudaKernels);
        }
        if dstate > CUDA_MAX_DSTATE {
            return Err(ScanError::Unsupported {
                name: "N (A's second dimension, the state size)".into(),
                got: dstate,
                limit: format!("at most {CUDA_MAX_DSTATE}; the CPU implementation has no limit"),
            });
        }
    }
    Ok(())
}

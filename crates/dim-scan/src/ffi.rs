//! The bridge to the native autograd op (`csrc/scan_op.cpp`) and the C ABI
//! of `kernels/selective_scan.h`, mirrored here field for field.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Once;

use tch::Tensor;

use half::{bf16, f16};

use crate::cpu::{self, Elem, Shape};
use crate::{ScanError, ScanInputs, ScanOptions};

pub(crate) const MAX_DIRS: usize = 2;

/// `dim_scan_dir`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct DirParams {
    pub u: *const c_void,
    pub delta: *const c_void,
    pub a: *const f32,
    pub b: *const c_void,
    pub c: *const c_void,
    pub d: *const f32,
    pub delta_bias: *const f32,
    pub reverse: i32,
}

/// `dim_scan_dir_grads`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct DirGrads {
    pub du: *mut c_void,
    pub ddelta: *mut c_void,
    pub da: *mut f32,
    pub db: *mut f32,
    pub dc: *mut f32,
    pub dd: *mut f32,
    pub ddelta_bias: *mut f32,
}

/// `dim_scan_params`.
#[repr(C)]
pub(crate) struct Params {
    pub batch: i64,
    pub dim: i64,
    pub seqlen: i64,
    pub dstate: i64,
    pub ngroups: i64,
    pub ndirs: i32,
    pub dtype: i32,
    pub delta_softplus: i32,
    pub deterministic: i32,
    pub dir: [DirParams; MAX_DIRS],
    pub z: *const c_void,
    pub y: *mut c_void,
    pub dy: *const c_void,
    pub grad: [DirGrads; MAX_DIRS],
    pub dz: *mut c_void,
    pub saved: *mut c_void,
    pub workspace: *mut c_void,
    /// Batch strides (elements) of u, delta, B, C per direction and of z; 0 is
    /// contiguous. The shim sets them for CUDA tensors only: the CPU
    /// implementation gets contiguous tensors and zeros here.
    pub u_batch_stride: [i64; MAX_DIRS],
    pub delta_batch_stride: [i64; MAX_DIRS],
    pub b_batch_stride: [i64; MAX_DIRS],
    pub c_batch_stride: [i64; MAX_DIRS],
    pub z_batch_stride: i64,
}

pub(crate) const DTYPE_F32: i32 = 0;
pub(crate) const DTYPE_BF16: i32 = 1;
pub(crate) const DTYPE_F16: i32 = 2;

type CpuFn = extern "C" fn(*const Params) -> c_int;

extern "C" {
    fn dim_scan_set_cpu_impl(fwd: CpuFn, bwd: CpuFn);
    fn dim_scan_apply(
        inputs: *mut *mut c_void,
        n: c_int,
        flags: i64,
        out: *mut *mut c_void,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn dim_smoke_apply(
        out: *mut c_void,
        x: *mut c_void,
        alpha: f32,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn dim_backward_with_grad(
        y: *mut c_void,
        dy: *mut c_void,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn dim_cuda_event(
        op: c_int,
        ev: *mut *mut c_void,
        ev2: *mut c_void,
        ms: *mut f32,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn dim_probe_exp2(out: *mut c_void, iters: c_int, err: *mut c_char, errlen: usize) -> c_int;
    fn dim_set_allow_tf32(enable: c_int, now: *mut c_int, err: *mut c_char, errlen: usize)
        -> c_int;
    fn dim_cuda_autocast(
        op: c_int,
        value: c_int,
        out: *mut c_int,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn dim_cuda_peak_memory(
        device: c_int,
        out: *mut u64,
        reset: c_int,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
}

/// Calls a native function that reports failure through an error buffer.
pub(crate) fn checked(call: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), ScanError> {
    let mut err = [0 as c_char; 1024];
    if call(err.as_mut_ptr(), err.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the native side always NUL-terminates within the buffer.
    let msg = unsafe { CStr::from_ptr(err.as_ptr()) };
    Err(ScanError::Native(msg.to_string_lossy().into_owned()))
}

fn handle(t: Option<&Tensor>) -> *mut c_void {
    t.map_or(std::ptr::null_mut(), |t| t.as_ptr() as *mut c_void)
}

static REGISTER_CPU: Once = Once::new();

/// Runs the autograd op. `dirs` are validated; `reverse` only matters for one direction.
pub(crate) fn apply(
    dirs: &[ScanInputs<'_>],
    reverse: bool,
    z: Option<&Tensor>,
    opts: ScanOptions,
) -> Result<Tensor, ScanError> {
    REGISTER_CPU.call_once(|| {
        // SAFETY: plain function pointers with the C signature the shim expects.
        unsafe { dim_scan_set_cpu_impl(ffi_forward, ffi_backward) }
    });
    let mut inputs: Vec<*mut c_void> = Vec::with_capacity(dirs.len() * 7 + 1);
    for x in dirs {
        inputs.extend([
            handle(Some(x.u)),
            handle(Some(x.delta)),
            handle(Some(x.a)),
            handle(Some(x.b)),
            handle(Some(x.c)),
            handle(x.d),
            handle(x.delta_bias),
        ]);
    }
    inputs.push(handle(z));
    let flags = dirs.len() as i64
        | (i64::from(reverse) << 2)
        | (i64::from(opts.delta_softplus) << 3)
        | (i64::from(opts.deterministic) << 4);
    let mut out: *mut c_void = std::ptr::null_mut();
    checked(|err, len| {
        // SAFETY: every non-null entry is a live tch tensor handle (at::Tensor*)
        // borrowed for the call; `out` receives a new at::Tensor* on success.
        unsafe {
            dim_scan_apply(
                inputs.as_mut_ptr(),
                inputs.len() as c_int,
                flags,
                &mut out,
                err,
                len,
            )
        }
    })?;
    // SAFETY: `out` is a heap at::Tensor* created by the shim, now owned here.
    Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
}

/// `out = alpha * x + [0, 1, 2, ...]` by the smoke kernel, on libtorch's current
/// CUDA stream. `x`, `out`: contiguous f32 CUDA tensors of equal size.
pub(crate) fn smoke_axpy_iota(out: &Tensor, x: &Tensor, alpha: f32) -> Result<(), ScanError> {
    checked(|err, len| {
        // SAFETY: live tensor handles borrowed for the call.
        unsafe { dim_smoke_apply(handle(Some(out)), handle(Some(x)), alpha, err, len) }
    })
}

/// Peak (or, with `reset`, resets the peak of) bytes allocated by libtorch on a CUDA device.
pub(crate) fn cuda_peak_memory(device: usize, reset: bool) -> Result<u64, ScanError> {
    let mut bytes = 0u64;
    checked(|err, len| {
        // SAFETY: `bytes` outlives the call.
        unsafe { dim_cuda_peak_memory(device as c_int, &mut bytes, c_int::from(reset), err, len) }
    })?;
    Ok(bytes)
}

/// Switches TF32 math for f32 matmuls (cuBLAS) and convolutions (cuDNN);
/// returns the cuBLAS setting read back.
pub(crate) fn set_allow_tf32(enable: bool) -> Result<bool, ScanError> {
    let mut now = 0;
    checked(|err, len| {
        // SAFETY: `now` outlives the call.
        unsafe { dim_set_allow_tf32(c_int::from(enable), &mut now, err, len) }
    })?;
    Ok(now != 0)
}

/// Operations on libtorch's CUDA autocast state (the `op` codes of
/// `dim_cuda_autocast` in the shim); returns its `*out`.
pub(crate) fn cuda_autocast(op: AutocastOp, value: i32) -> Result<i32, ScanError> {
    let mut out = 0;
    checked(|err, len| {
        // SAFETY: `out` outlives the call.
        unsafe { dim_cuda_autocast(op as c_int, value, &mut out, err, len) }
    })?;
    Ok(out)
}

/// What [`cuda_autocast`] does.
#[derive(Clone, Copy, Debug)]
pub(crate) enum AutocastOp {
    /// Switch on or off (`value`), one nesting level deeper; returns the previous state.
    Enter = 0,
    /// One level out (dropping the cast cache at the outermost), then restore `value`.
    Exit = 1,
    /// Set the dtype to the `c10::ScalarType` code `value`; returns the code read back.
    SetDtype = 2,
    /// Returns the dtype's `c10::ScalarType` code.
    Dtype = 3,
    /// Returns whether autocast is on.
    Enabled = 4,
}

/// `torch::autograd::backward({y}, {dy})`.
pub(crate) fn backward_with_grad(y: &Tensor, dy: &Tensor) -> Result<(), ScanError> {
    checked(|err, len| {
        // SAFETY: live tensor handles borrowed for the call.
        unsafe { dim_backward_with_grad(handle(Some(y)), handle(Some(dy)), err, len) }
    })
}

/// A CUDA event (`op` codes of `dim_cuda_event` in the shim).
pub(crate) fn cuda_event(
    op: c_int,
    ev: &mut *mut c_void,
    ev2: *mut c_void,
) -> Result<f32, ScanError> {
    let mut ms = 0f32;
    checked(|err, len| {
        // SAFETY: `ev` is a handle made by op 0 (or receives one), `ms` outlives the call.
        unsafe { dim_cuda_event(op, ev, ev2, &mut ms, err, len) }
    })?;
    Ok(ms)
}

/// Runs the ex2 rate probe over `out` (one f32 per thread).
pub(crate) fn probe_exp2(out: &Tensor, iters: i32) -> Result<(), ScanError> {
    checked(|err, len| {
        // SAFETY: live tensor handle borrowed for the call.
        unsafe { dim_probe_exp2(handle(Some(out)), iters, err, len) }
    })
}

// ---- The CPU implementation behind the C ABI: the shim calls these for CPU tensors. ----

/// Builds slices over the raw pointers of `p` and runs `f` for the dtype.
///
/// # Safety
/// `p` must describe valid, contiguous, non-overlapping CPU buffers of the
/// sizes its shape implies (the shim guarantees this).
unsafe fn with_views(p: &Params, is_backward: bool) {
    // The shim hands the CPU implementation contiguous tensors only.
    let strided = p
        .u_batch_stride
        .iter()
        .chain(&p.delta_batch_stride)
        .chain(&p.b_batch_stride);
    assert!(
        strided.chain(&p.c_batch_stride).all(|&s| s == 0) && p.z_batch_stride == 0,
        "the CPU implementation takes contiguous tensors (batch strides must be 0)"
    );
    let s = Shape {
        batch: p.batch as usize,
        dim: p.dim as usize,
        len: p.seqlen as usize,
        dstate: p.dstate as usize,
        groups: p.ngroups as usize,
    };
    // SAFETY: forwarded from the caller.
    unsafe {
        match p.dtype {
            DTYPE_F32 => run_typed::<f32>(p, s, is_backward),
            DTYPE_BF16 => run_typed::<bf16>(p, s, is_backward),
            DTYPE_F16 => run_typed::<f16>(p, s, is_backward),
            other => panic!("unknown dtype code {other}"),
        }
    }
}

/// # Safety
/// See [`with_views`].
unsafe fn run_typed<E: Elem>(p: &Params, s: Shape, is_backward: bool) {
    use std::slice::{from_raw_parts as view, from_raw_parts_mut as view_mut};
    let bdl = s.batch * s.dim * s.len;
    let bgnl = s.batch * s.groups * s.dstate * s.len;
    let dn = s.dim * s.dstate;
    let ndirs = p.ndirs as usize;
    // SAFETY: sizes follow the layouts of selective_scan.h; pointers are valid
    // for the call and outputs do not alias inputs.
    unsafe {
        let opt = |ptr: *const f32, n: usize| (!ptr.is_null()).then(|| view(ptr, n));
        let dirs: Vec<cpu::DirInputs<'_, E>> = p.dir[..ndirs]
            .iter()
            .map(|d| cpu::DirInputs {
                u: view(d.u as *const E, bdl),
                delta: view(d.delta as *const E, bdl),
                a: view(d.a, dn),
                b: view(d.b as *const E, bgnl),
                c: view(d.c as *const E, bgnl),
                d: opt(d.d, s.dim),
                delta_bias: opt(d.delta_bias, s.dim),
                reverse: d.reverse != 0,
            })
            .collect();
        let z = (!p.z.is_null()).then(|| view(p.z as *const E, bdl));
        let softplus = p.delta_softplus != 0;
        let isa = cpu::Isa::detect();
        if !is_backward {
            cpu::forward(isa, s, &dirs, z, view_mut(p.y as *mut E, bdl), softplus);
            return;
        }
        let optm = |ptr: *mut f32, n: usize| (!ptr.is_null()).then(|| view_mut(ptr, n));
        let mut grads: Vec<cpu::DirGrads<'_, E>> = p.grad[..ndirs]
            .iter()
            .map(|g| cpu::DirGrads {
                du: view_mut(g.du as *mut E, bdl),
                ddelta: view_mut(g.ddelta as *mut E, bdl),
                da: view_mut(g.da, dn),
                db: view_mut(g.db, bgnl),
                dc: view_mut(g.dc, bgnl),
                dd: optm(g.dd, s.dim),
                ddelta_bias: optm(g.ddelta_bias, s.dim),
            })
            .collect();
        let dz = (!p.dz.is_null()).then(|| view_mut(p.dz as *mut E, bdl));
        let dy = view(p.dy as *const E, bdl);
        cpu::backward(isa, s, &dirs, z, dy, &mut grads, dz, softplus);
    }
}

fn ffi_entry(p: *const Params, backward: bool) -> c_int {
    let result = std::panic::catch_unwind(|| {
        // SAFETY: the shim passes a valid params struct over live CPU tensors.
        unsafe { with_views(&*p, backward) }
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| e.downcast_ref::<&str>().copied())
                .unwrap_or("panic");
            eprintln!("dim-scan CPU implementation failed: {msg}");
            1
        }
    }
}

pub(crate) extern "C" fn ffi_forward(p: *const Params) -> c_int {
    ffi_entry(p, false)
}

pub(crate) extern "C" fn ffi_backward(p: *const Params) -> c_int {
    ffi_entry(p, true)
}

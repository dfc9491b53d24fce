//! Optimizer steps through libtorch's multi-tensor kernels: AdamW fused over
//! all parameters (`_fused_adamw_`), the global gradient norm
//! (`_foreach_norm`), lerp for weight averages (`_foreach_lerp_`). Each is a
//! few kernel launches for the whole model, where an update written with
//! per-tensor ops launches about ten per parameter. tch has no bindings for
//! these ops, so they go through a small C++ shim (`csrc/foreach.cpp`).
//!
//! Nothing here reads a value back to the host: the gradient norm stays a
//! device scalar, and gradient clipping is applied inside the fused kernel
//! through its `grad_scale` argument.

use std::ffi::{c_char, c_int, c_void, CStr};

use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};

extern "C" {
    fn dim_fused_adamw(
        params: *mut *mut c_void,
        grads: *mut *mut c_void,
        exp_avgs: *mut *mut c_void,
        exp_avg_sqs: *mut *mut c_void,
        steps: *mut *mut c_void,
        n: c_int,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        grad_scale: *mut c_void,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn dim_foreach_norm(
        ts: *mut *mut c_void,
        n: c_int,
        out: *mut *mut c_void,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn dim_foreach_lerp(
        a: *mut *mut c_void,
        b: *mut *mut c_void,
        n: c_int,
        w: f64,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn dim_foreach_add_scalar(
        a: *mut *mut c_void,
        n: c_int,
        v: f64,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn dim_clear_grads(ts: *mut *mut c_void, n: c_int, err: *mut c_char, errlen: usize) -> c_int;
}

/// Calls a shim function that reports failure through an error buffer.
fn checked(what: &str, call: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut err = [0 as c_char; 1024];
    if call(err.as_mut_ptr(), err.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim NUL-terminates its message within the buffer.
    let msg = unsafe { CStr::from_ptr(err.as_ptr()) };
    Err(ModelError::Torch(tch::TchError::Torch(format!(
        "{what}: {}",
        msg.to_string_lossy()
    ))))
}

/// tch handles (`at::Tensor*`) of `ts`, borrowed for one shim call.
fn handles(ts: &[Tensor]) -> Vec<*mut c_void> {
    ts.iter().map(|t| t.as_ptr() as *mut c_void).collect()
}

fn len(ts: &[Tensor]) -> Result<c_int> {
    c_int::try_from(ts.len())
        .map_err(|_| ModelError::Torch(tch::TchError::Torch("tensor list too long".into())))
}

/// The L2 norm of all `ts` together, as a 0-d tensor on their device in
/// their dtype (`_foreach_norm` per tensor, then the norm of those).
/// Zero tensors give a 0-d zero on the CPU.
pub fn foreach_norm(ts: &[Tensor]) -> Result<Tensor> {
    if ts.is_empty() {
        return Ok(Tensor::zeros([], (Kind::Float, Device::Cpu)));
    }
    let n = len(ts)?;
    let mut h = handles(ts);
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: `h` holds live handles for the call; `out` receives a new
    // at::Tensor* on success, owned by the Tensor made from it below.
    checked("_foreach_norm", |e, l| unsafe {
        dim_foreach_norm(h.as_mut_ptr(), n, &mut out, e, l)
    })?;
    // SAFETY: see above.
    Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
}

/// `a[i] ← a[i] + w·(b[i] − a[i])` for every `i`, in place (no autograd).
pub fn foreach_lerp_(a: &[Tensor], b: &[Tensor], w: f64) -> Result<()> {
    if a.len() != b.len() {
        return Err(ModelError::Torch(tch::TchError::Torch(format!(
            "foreach_lerp_: {} tensors against {}",
            a.len(),
            b.len()
        ))));
    }
    if a.is_empty() {
        return Ok(());
    }
    let n = len(a)?;
    let (mut ha, mut hb) = (handles(a), handles(b));
    // SAFETY: live handles for the duration of the call.
    checked("_foreach_lerp_", |e, l| unsafe {
        dim_foreach_lerp(ha.as_mut_ptr(), hb.as_mut_ptr(), n, w, e, l)
    })
}

/// `a[i] ← a[i] + v` for every `i`, in place (no autograd).
pub fn foreach_add_(a: &[Tensor], v: f64) -> Result<()> {
    if a.is_empty() {
        return Ok(());
    }
    let n = len(a)?;
    let mut h = handles(a);
    // SAFETY: live handles for the duration of the call.
    checked("_foreach_add_", |e, l| unsafe {
        dim_foreach_add_scalar(h.as_mut_ptr(), n, v, e, l)
    })
}

/// Drops the gradients of `params` (PyTorch's `zero_grad(set_to_none=True)`):
/// the next backward writes fresh gradients rather than adding to zeroed ones.
pub fn clear_grads(params: &[Tensor]) -> Result<()> {
    if params.is_empty() {
        return Ok(());
    }
    let n = len(params)?;
    let mut h = handles(params);
    // SAFETY: live handles for the duration of the call.
    checked("clear_grads", |e, l| unsafe {
        dim_clear_grads(h.as_mut_ptr(), n, e, l)
    })
}

/// AdamW hyperparameters that stay fixed over a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// `(β₁, β₂)`.
    pub betas: [f64; 2],
    /// ε, added to `√v̂`.
    pub eps: f64,
    /// Decoupled weight decay, applied to the parameters marked for it.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW (decoupled weight decay, PyTorch's update) over a fixed list of
/// parameters, through `_fused_adamw_`:
///
/// ```text
/// g ← g / s            s = max(1, (‖g‖ + 1e-6) / clip) if ‖g‖ > clip, else 1
/// p ← p · (1 − lr·wd)  (parameters marked for decay only)
/// m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²
/// p ← p − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
/// ```
///
/// The moments `m`, `v` are plain tensors (one per parameter, like it), so a
/// checkpoint can save and restore them exactly.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<Tensor>,
    /// Indices into `params` of each `_fused_adamw_` call and its weight decay.
    groups: Vec<(Vec<usize>, f64)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// The step count as f32 scalars on the parameters' device, one per
    /// parameter, as `_fused_adamw_` reads them (it does not increment them).
    steps: Vec<Tensor>,
    step: u64,
}

impl AdamW {
    /// Zero moments for `params`; `decay[i]` says whether `params[i]` gets
    /// weight decay.
    pub fn new(params: Vec<Tensor>, decay: &[bool], cfg: AdamWConfig) -> Result<Self> {
        if decay.len() != params.len() {
            return Err(ModelError::config(format!(
                "AdamW: {} decay flags for {} parameters",
                decay.len(),
                params.len()
            )));
        }
        let pick = |want: bool| -> Vec<usize> {
            (0..params.len()).filter(|&i| decay[i] == want).collect()
        };
        let groups: Vec<(Vec<usize>, f64)> = if cfg.weight_decay > 0.0 {
            vec![(pick(true), cfg.weight_decay), (pick(false), 0.0)]
        } else {
            vec![((0..params.len()).collect(), 0.0)]
        };
        let zeros = || -> Vec<Tensor> { params.iter().map(|p| p.zeros_like().detach()).collect() };
        let (exp_avg, exp_avg_sq) = (zeros(), zeros());
        let steps = params
            .iter()
            .map(|p| Tensor::zeros([], (Kind::Float, p.device())))
            .collect();
        Ok(Self {
            cfg,
            params,
            groups: groups.into_iter().filter(|(g, _)| !g.is_empty()).collect(),
            exp_avg,
            exp_avg_sq,
            steps,
            step: 0,
        })
    }

    /// Optimizer steps taken.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The parameters, in the order given to [`AdamW::new`].
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// First moments, one per parameter.
    pub fn exp_avg(&self) -> &[Tensor] {
        &self.exp_avg
    }

    /// Second moments, one per parameter.
    pub fn exp_avg_sq(&self) -> &[Tensor] {
        &self.exp_avg_sq
    }

    /// Sets the step count (after restoring the moments from a checkpoint).
    pub fn set_steps_taken(&mut self, step: u64) {
        self.step = step;
        tch::no_grad(|| {
            for s in &mut self.steps {
                let _ = s.fill_(step as f64);
            }
        });
    }

    /// The parameters' gradients; a parameter without one gets zeros.
    pub fn grads(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|p| {
                let g = p.grad();
                if g.defined() {
                    g
                } else {
                    p.zeros_like()
                }
            })
            .collect()
    }

    /// One step at learning rate `lr`, with the global gradient norm clipped
    /// to `grad_clip` (0 = no clipping). Returns the norm before clipping, as
    /// a 0-d device tensor (reading it waits for the device; do so only when
    /// logging), if clipping needed it or `want_norm` asks for it (it costs
    /// one read of every gradient). Gradients are divided in place by the
    /// clipping factor; the caller drops them afterwards ([`AdamW::zero_grad`]).
    pub fn step(&mut self, lr: f64, grad_clip: f64, want_norm: bool) -> Result<Option<Tensor>> {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let grads = self.grads();
        let norm = if grad_clip > 0.0 || want_norm {
            Some(foreach_norm(&grads)?)
        } else {
            None
        };
        if self.params.is_empty() {
            return Ok(norm);
        }
        // Clipping as the kernel's `grad_scale`, which divides each gradient
        // as it is read: no separate pass over the gradients.
        let scale = norm.as_ref().filter(|_| grad_clip > 0.0).map(|norm| {
            ((norm + 1e-6) / grad_clip)
                .where_scalarother(&norm.gt(grad_clip), 1.0)
                .to_kind(Kind::Float)
        });
        foreach_add_(&self.steps, 1.0)?;
        let [b1, b2] = self.cfg.betas;
        for (idx, wd) in &self.groups {
            let pick = |ts: &[Tensor]| -> Vec<*mut c_void> {
                idx.iter().map(|&i| ts[i].as_ptr() as *mut c_void).collect()
            };
            let (mut p, mut g) = (pick(&self.params), pick(&grads));
            let (mut m, mut v, mut s) = (
                pick(&self.exp_avg),
                pick(&self.exp_avg_sq),
                pick(&self.steps),
            );
            let n = c_int::try_from(idx.len()).unwrap_or(c_int::MAX);
            let gs = scale
                .as_ref()
                .map_or(std::ptr::null_mut(), |t| t.as_ptr() as *mut c_void);
            // SAFETY: every pointer is a live tch handle owned by `self`,
            // `grads` or `scale` for the duration of the call.
            checked("_fused_adamw_", |e, l| unsafe {
                dim_fused_adamw(
                    p.as_mut_ptr(),
                    g.as_mut_ptr(),
                    m.as_mut_ptr(),
                    v.as_mut_ptr(),
                    s.as_mut_ptr(),
                    n,
                    lr,
                    b1,
                    b2,
                    *wd,
                    self.cfg.eps,
                    gs,
                    e,
                    l,
                )
            })?;
        }
        Ok(norm)
    }

    /// Drops the parameters' gradients ([`clear_grads`]).
    pub fn zero_grad(&self) -> Result<()> {
        clear_grads(&self.params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreach_ops_match_per_tensor_ops() {
        let a: Vec<Tensor> = [[3i64, 4], [5, 1]]
            .iter()
            .map(|s| Tensor::randn(s.as_slice(), (Kind::Double, Device::Cpu)))
            .collect();
        let b: Vec<Tensor> = a.iter().map(Tensor::randn_like).collect();
        let want = a
            .iter()
            .map(|t| t.square().sum(Kind::Double))
            .fold(Tensor::from(0.0f64), |x, y| x + y)
            .sqrt()
            .double_value(&[]);
        let got = foreach_norm(&a).unwrap().double_value(&[]);
        assert!((got - want).abs() < 1e-12 * want, "{got} vs {want}");

        let expect: Vec<Tensor> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| x + (y - x) * 0.3 + 2.0)
            .collect();
        foreach_lerp_(&a, &b, 0.3).unwrap();
        foreach_add_(&a, 2.0).unwrap();
        for (x, y) in a.iter().zip(&expect) {
            assert!(x.allclose(y, 1e-12, 1e-12, false));
        }
        assert!(foreach_lerp_(&a, &b[..1], 0.5).is_err());
    }

    #[test]
    fn clear_grads_drops_gradients() {
        let p = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&p * 2.0).sum(Kind::Float).backward();
        assert!(p.grad().defined());
        clear_grads(std::slice::from_ref(&p)).unwrap();
        assert!(!p.grad().defined());
        // The next backward writes a fresh gradient.
        (&p * 3.0).sum(Kind::Float).backward();
        assert_eq!(p.grad().double_value(&[0]), 3.0);
    }
}

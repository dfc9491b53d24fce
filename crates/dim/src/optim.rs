//! AdamW with linear warmup, global-norm gradient clipping and an EMA of the
//! weights, with all state in named tensors so that checkpoints capture it
//! exactly (tch's built-in optimizers keep their moments inside libtorch,
//! out of reach of a checkpoint).

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use crate::config::OptimConfig;

/// Named trainable parameters, sorted by name.
pub type Params = Vec<(String, Tensor)>;

/// AdamW state: first and second moments per parameter, and the step count.
#[derive(Debug)]
pub struct AdamW {
    cfg: OptimConfig,
    /// `(name, m, v)` in parameter order.
    state: Vec<(String, Tensor, Tensor)>,
    /// Optimizer steps taken.
    pub step: u64,
}

impl AdamW {
    /// Zero moments for `params`.
    pub fn new(cfg: &OptimConfig, params: &Params) -> Self {
        let state = params
            .iter()
            .map(|(n, p)| (n.clone(), p.zeros_like().detach(), p.zeros_like().detach()))
            .collect();
        Self {
            cfg: cfg.clone(),
            state,
            step: 0,
        }
    }

    /// Learning rate of optimizer step `step` (1-based): linear warmup, then constant.
    pub fn lr_at(&self, step: u64) -> f64 {
        let w = self.cfg.warmup_steps;
        if w > 0 && step <= w {
            self.cfg.lr * step as f64 / w as f64
        } else {
            self.cfg.lr
        }
    }

    /// Clips gradients to `grad_clip` (if set) and applies one AdamW update.
    /// Returns `(gradient norm before clipping, learning rate)`. The caller
    /// zeroes the gradients afterwards.
    pub fn step(&mut self, params: &Params) -> (f64, f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        if params.is_empty() {
            return (0.0, self.lr_at(self.step));
        }
        let lr = self.lr_at(self.step);
        let grads: Vec<Tensor> = params
            .iter()
            .map(|(_, p)| {
                let g = p.grad();
                if g.defined() {
                    g
                } else {
                    p.zeros_like()
                }
            })
            .collect();
        let norm = grads
            .iter()
            .map(|g| g.to_kind(Kind::Double).square().sum(Kind::Double))
            .fold(Tensor::from(0.0f64).to_device(grads[0].device()), |a, b| {
                a + b
            })
            .sqrt()
            .double_value(&[]);
        let scale = if self.cfg.grad_clip > 0.0 && norm > self.cfg.grad_clip {
            self.cfg.grad_clip / (norm + 1e-6)
        } else {
            1.0
        };
        let [b1, b2] = self.cfg.betas;
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        for ((_, p), ((_, m, v), g)) in params.iter().zip(self.state.iter_mut().zip(&grads)) {
            let g = g * scale;
            let _ = m.g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1)));
            let _ = v.g_mul_scalar_(b2).g_add_(&(g.square() * (1.0 - b2)));
            let denom = (&*v / bc2).sqrt() + self.cfg.eps;
            let update = (&*m / bc1) / denom;
            let mut p = p.shallow_clone();
            if self.cfg.weight_decay > 0.0 {
                let _ = p.g_mul_scalar_(1.0 - lr * self.cfg.weight_decay);
            }
            let _ = p.g_sub_(&(update * lr));
        }
        (norm, lr)
    }

    /// Moments as named tensors (`m/<name>`, `v/<name>`) for a checkpoint.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (n, m, v) in &self.state {
            out.insert(format!("m/{n}"), m.shallow_clone());
            out.insert(format!("v/{n}"), v.shallow_clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`].
    pub fn load_state(&mut self, saved: &BTreeMap<String, Tensor>, step: u64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (n, m, v) in &mut self.state {
            for (key, t) in [(format!("m/{n}"), m), (format!("v/{n}"), v)] {
                let Some(src) = saved.get(&key) else {
                    bail!("optimizer state `{key}` missing from the checkpoint");
                };
                if src.size() != t.size() {
                    bail!(
                        "optimizer state `{key}` has shape {:?}, expected {:?}",
                        src.size(),
                        t.size()
                    );
                }
                t.copy_(src);
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Exponential moving average of the weights.
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    start: u64,
    /// Averaged copies, in parameter order.
    pub shadow: Params,
}

impl Ema {
    /// Starts as a copy of `params`.
    pub fn new(decay: f64, start: u64, params: &Params) -> Self {
        let shadow = params
            .iter()
            .map(|(n, p)| (n.clone(), p.detach().copy()))
            .collect();
        Self {
            decay,
            start,
            shadow,
        }
    }

    /// `shadow ← decay·shadow + (1 − decay)·param` after optimizer step `step`
    /// (a plain copy before `ema_start`).
    pub fn update(&mut self, params: &Params, step: u64) {
        let _guard = tch::no_grad_guard();
        let w = if step <= self.start {
            1.0
        } else {
            1.0 - self.decay
        };
        for ((_, s), (_, p)) in self.shadow.iter_mut().zip(params) {
            let _ = s.lerp_(p, w);
        }
    }
}

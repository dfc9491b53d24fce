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
    warmup: bool,
    /// Averaged copies, in parameter order.
    pub shadow: Params,
}

impl Ema {
    /// Starts as a copy of `params`; see [`Ema::decay_at`] for `warmup`.
    pub fn new(decay: f64, start: u64, warmup: bool, params: &Params) -> Self {
        let shadow = params
            .iter()
            .map(|(n, p)| (n.clone(), p.detach().copy()))
            .collect();
        Self {
            decay,
            start,
            warmup,
            shadow,
        }
    }

    /// The decay applied after optimizer step `step`: 0 (a plain copy) up to
    /// `ema_start`, then `ema_decay`, or with warmup
    /// `min(ema_decay, (1 + n) / (10 + n))` after `n = step − ema_start`.
    pub fn decay_at(&self, step: u64) -> f64 {
        if step <= self.start {
            return 0.0;
        }
        if self.warmup {
            let n = (step - self.start) as f64;
            self.decay.min((1.0 + n) / (10.0 + n))
        } else {
            self.decay
        }
    }

    /// `shadow ← d·shadow + (1 − d)·param` after optimizer step `step`, with
    /// `d` from [`Ema::decay_at`].
    pub fn update(&mut self, params: &Params, step: u64) {
        let _guard = tch::no_grad_guard();
        let w = 1.0 - self.decay_at(step);
        for ((_, s), (_, p)) in self.shadow.iter_mut().zip(params) {
            let _ = s.lerp_(p, w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    /// The shadow follows the recurrence computed independently in f64, with
    /// and without warmup, including the copy phase before `ema_start`.
    #[test]
    fn ema_follows_its_recurrence() {
        for (decay, start, warmup) in [(0.9999, 0, true), (0.99, 3, true), (0.9, 2, false)] {
            let p = Tensor::zeros([3], (Kind::Double, Device::Cpu));
            let params: Params = vec![("w".to_string(), p.shallow_clone())];
            let mut ema = Ema::new(decay, start, warmup, &params);
            let mut want = 0.0f64;
            for step in 1..=40u64 {
                let value = (step as f64).sin() * 3.0;
                tch::no_grad(|| {
                    let _ = params[0].1.shallow_clone().fill_(value);
                });
                ema.update(&params, step);
                let d = if step <= start {
                    0.0
                } else if warmup {
                    let n = (step - start) as f64;
                    decay.min((1.0 + n) / (10.0 + n))
                } else {
                    decay
                };
                want = d * want + (1.0 - d) * value;
                let got = ema.shadow[0].1.double_value(&[1]);
                assert!((got - want).abs() < 1e-12, "step {step}: {got} vs {want}");
            }
        }
    }

    /// With warmup, a 3,500-step run keeps almost none of its initial weights;
    /// without, DiT's 0.9999 keeps about 70%.
    #[test]
    fn warmup_forgets_the_initialisation() {
        let p = Tensor::zeros([1], (Kind::Double, Device::Cpu));
        let params: Params = vec![("w".to_string(), p)];
        let kept = |warmup: bool| {
            let ema = Ema::new(0.9999, 0, warmup, &params);
            (1..=3500u64).map(|s| ema.decay_at(s)).product::<f64>()
        };
        assert!(kept(true) < 1e-3, "{}", kept(true));
        assert!((kept(false) - 0.9999f64.powi(3500)).abs() < 1e-9);
        assert!(kept(false) > 0.6);
    }
}

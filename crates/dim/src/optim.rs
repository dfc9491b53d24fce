//! AdamW with linear warmup, global-norm gradient clipping and an EMA of the
//! weights, on libtorch's fused and multi-tensor kernels
//! ([`dim_model::optim`]), with all state in named tensors so that
//! checkpoints capture it exactly (tch's built-in optimizers keep their
//! moments inside libtorch, out of reach of a checkpoint).
//!
//! A step reads nothing back to the host: the gradient norm is returned as a
//! device scalar, for the caller to read when it logs.

use std::collections::BTreeMap;

use anyhow::Result;
use dim_model::optim::{foreach_lerp_, AdamW as FusedAdamW, AdamWConfig};
use tch::Tensor;

use crate::config::OptimConfig;

/// Named trainable parameters, sorted by name.
pub type Params = Vec<(String, Tensor)>;

/// Whether parameter `name` of shape `shape` gets weight decay: weight
/// matrices, convolution kernels and the label table (two or more
/// dimensions) do; biases, `D` (one dimension) and `A_log` do not, as in
/// Mamba and DiT (the network has no norm parameters: its LayerNorms take
/// their scale and shift from adaLN).
pub fn decays(name: &str, shape: &[i64]) -> bool {
    shape.len() >= 2 && name.rsplit('.').next() != Some("A_log")
}

/// AdamW state: first and second moments per parameter, and the step count.
#[derive(Debug)]
pub struct AdamW {
    cfg: OptimConfig,
    names: Vec<String>,
    inner: FusedAdamW,
}

impl AdamW {
    /// Zero moments for `params`; weight decay for those [`decays`] picks.
    pub fn new(cfg: &OptimConfig, params: &Params) -> Result<Self> {
        let decay: Vec<bool> = params.iter().map(|(n, p)| decays(n, &p.size())).collect();
        let inner = FusedAdamW::new(
            params.iter().map(|(_, p)| p.shallow_clone()).collect(),
            &decay,
            AdamWConfig {
                betas: cfg.betas,
                eps: cfg.eps,
                weight_decay: cfg.weight_decay,
            },
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            names: params.iter().map(|(n, _)| n.clone()).collect(),
            inner,
        })
    }

    /// Optimizer steps taken.
    pub fn steps_taken(&self) -> u64 {
        self.inner.steps_taken()
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
    /// Returns `(gradient norm before clipping, learning rate)`, the norm as
    /// a 0-d device tensor (reading it waits for the device), computed when
    /// clipping needs it or `want_norm` asks for it. The caller clears the
    /// gradients afterwards ([`AdamW::zero_grad`]).
    pub fn step(&mut self, want_norm: bool) -> Result<(Option<Tensor>, f64)> {
        let lr = self.lr_at(self.steps_taken() + 1);
        let norm = self.inner.step(lr, self.cfg.grad_clip, want_norm)?;
        Ok((norm, lr))
    }

    /// Drops the parameters' gradients (the next backward writes fresh ones).
    pub fn zero_grad(&self) -> Result<()> {
        Ok(self.inner.zero_grad()?)
    }

    /// Moments as named tensors (`m/<name>`, `v/<name>`) for a checkpoint.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        let moments = self.inner.exp_avg().iter().zip(self.inner.exp_avg_sq());
        for (n, (m, v)) in self.names.iter().zip(moments) {
            out.insert(format!("m/{n}"), m.shallow_clone());
            out.insert(format!("v/{n}"), v.shallow_clone());
        }
        out
    }

    /// Sets the step count (on resume, after the moments of
    /// [`AdamW::state_tensors`] were loaded in place).
    pub fn set_steps_taken(&mut self, step: u64) {
        self.inner.set_steps_taken(step);
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
    /// All tensors in one multi-tensor lerp.
    pub fn update(&mut self, params: &Params, step: u64) -> Result<()> {
        let w = 1.0 - self.decay_at(step);
        let list =
            |ps: &Params| -> Vec<Tensor> { ps.iter().map(|(_, t)| t.shallow_clone()).collect() };
        foreach_lerp_(&list(&self.shadow), &list(params), w)?;
        Ok(())
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
                ema.update(&params, step).unwrap();
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

    /// The decay set of real networks: every weight matrix and conv kernel,
    /// the label table; never `A_log`, `D` or a bias.
    #[test]
    fn weight_decay_spares_a_log_d_and_biases() {
        for arch in ["dim", "dit"] {
            let cfg = dim_model::ModelConfig::from_toml_str(&format!(
                "arch = \"{arch}\"\ndepth = 2\nwidth = 32\nheads = 2\npatch = 2\ninput_size = [8, 8]\nnum_classes = 3\nd_state = 4"
            ))
            .unwrap();
            let vs = tch::nn::VarStore::new(Device::Cpu);
            let _model = dim_model::Model::new(vs.root(), &cfg).unwrap();
            let mut seen = (0, 0);
            for (name, t) in vs.variables() {
                let last = name.rsplit('.').next().unwrap();
                let want = match last {
                    "A_log" | "D" | "bias" | "conv_bias" => false,
                    "weight" | "conv_weight" | "embedding_table" => true,
                    other => panic!("{arch}: unclassified parameter {name} ({other})"),
                };
                assert_eq!(
                    decays(&name, &t.size()),
                    want,
                    "{arch}: {name} {:?}",
                    t.size()
                );
                if want {
                    seen.0 += 1
                } else {
                    seen.1 += 1
                }
            }
            assert!(seen.0 > 0 && seen.1 > 0, "{arch}: {seen:?}");
        }
        assert!(!decays("blocks.0.mixer.fwd.A_log", &[8, 4]));
        assert!(decays("blocks.0.mixer.fwd.x_proj.weight", &[8, 4]));
        assert!(!decays("final_layer.linear.bias", &[8]));
    }

    /// The fused step against the AdamW recurrence written out in f64 (the
    /// update this module used to run per tensor): warmup, global-norm
    /// clipping (active in some steps, not in others), decay on some
    /// parameters only, moments and parameters within f32 rounding.
    #[test]
    fn fused_step_matches_the_adamw_recurrence() {
        tch::manual_seed(5);
        let cfg = OptimConfig {
            lr: 1e-2,
            betas: [0.9, 0.99],
            eps: 1e-8,
            weight_decay: 0.1,
            warmup_steps: 3,
            grad_clip: 4.0,
            ..OptimConfig::default()
        };
        let shapes: [(&str, &[i64]); 4] = [
            ("a.weight", &[7, 5]),
            ("a.bias", &[7]),
            ("m.A_log", &[6, 4]),
            ("c.conv_weight", &[6, 1, 3]),
        ];
        let params: Params = shapes
            .iter()
            .map(|(n, s)| {
                (
                    n.to_string(),
                    Tensor::randn(*s, (Kind::Float, Device::Cpu)).set_requires_grad(true),
                )
            })
            .collect();
        let mut opt = AdamW::new(&cfg, &params).unwrap();
        let d64 = |t: &Tensor| t.detach().to_kind(Kind::Double);
        let mut p_ref: Vec<Tensor> = params.iter().map(|(_, p)| d64(p)).collect();
        let mut m_ref: Vec<Tensor> = p_ref.iter().map(Tensor::zeros_like).collect();
        let mut v_ref: Vec<Tensor> = p_ref.iter().map(Tensor::zeros_like).collect();
        let [b1, b2] = cfg.betas;
        let mut clipped = (0, 0);
        for step in 1..=8u64 {
            // Gradients of a random linear loss; their size varies so that clipping comes and goes.
            let scale = if step % 2 == 0 { 3.0 } else { 0.2 };
            let loss = params
                .iter()
                .map(|(_, p)| (p * Tensor::randn_like(p) * scale).sum(Kind::Float))
                .fold(Tensor::from(0.0f32), |a, b| a + b);
            loss.backward();
            let grads: Vec<Tensor> = params.iter().map(|(_, p)| d64(&p.grad())).collect();
            let (norm, lr) = opt.step(true).unwrap();
            let norm = norm.unwrap();
            opt.zero_grad().unwrap();

            let norm_ref = grads
                .iter()
                .map(|g| g.square().sum(Kind::Double))
                .fold(Tensor::from(0.0f64), |a, b| a + b)
                .sqrt()
                .double_value(&[]);
            let norm = norm.double_value(&[]);
            assert!(
                (norm - norm_ref).abs() < 1e-5 * norm_ref,
                "step {step}: norm {norm} vs {norm_ref}"
            );
            let clip = if norm_ref > cfg.grad_clip {
                clipped.0 += 1;
                cfg.grad_clip / (norm_ref + 1e-6)
            } else {
                clipped.1 += 1;
                1.0
            };
            let lr_ref = cfg.lr * (step.min(cfg.warmup_steps) as f64 / cfg.warmup_steps as f64);
            assert!((lr - lr_ref).abs() < 1e-15);
            let (bc1, bc2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
            for (i, g) in grads.iter().enumerate() {
                let g = g * clip;
                m_ref[i] = &m_ref[i] * b1 + &g * (1.0 - b1);
                v_ref[i] = &v_ref[i] * b2 + g.square() * (1.0 - b2);
                if decays(shapes[i].0, shapes[i].1) {
                    p_ref[i] = &p_ref[i] * (1.0 - lr_ref * cfg.weight_decay);
                }
                let update = (&m_ref[i] / bc1) / ((&v_ref[i] / bc2).sqrt() + cfg.eps);
                p_ref[i] = &p_ref[i] - update * lr_ref;
            }
            let state = opt.state_tensors();
            for (i, (name, p)) in params.iter().enumerate() {
                for (what, got, want) in [
                    ("param", d64(p), &p_ref[i]),
                    ("m", d64(&state[&format!("m/{name}")]), &m_ref[i]),
                    ("v", d64(&state[&format!("v/{name}")]), &v_ref[i]),
                ] {
                    let err = (&got - want).abs().max().double_value(&[]);
                    let size = want.abs().max().double_value(&[]).max(1e-3);
                    assert!(
                        err < 2e-6 * size.max(1.0),
                        "step {step} {name} {what}: error {err:e}"
                    );
                }
            }
        }
        assert!(
            clipped.0 > 0 && clipped.1 > 0,
            "clipping should come and go: {clipped:?}"
        );
        assert_eq!(opt.steps_taken(), 8);
    }

    /// Saving the moments and step, then loading them into a fresh optimizer,
    /// continues bit for bit.
    #[test]
    fn state_round_trips_exactly() {
        tch::manual_seed(9);
        let cfg = OptimConfig {
            weight_decay: 0.05,
            warmup_steps: 2,
            ..OptimConfig::default()
        };
        let fresh = || -> Params {
            tch::manual_seed(1);
            vec![(
                "w.weight".into(),
                Tensor::randn([4, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true),
            )]
        };
        let run = |opt: &mut AdamW, ps: &Params, seed: i64| {
            tch::manual_seed(seed);
            (&ps[0].1 * Tensor::randn([4, 3], (Kind::Float, Device::Cpu)))
                .sum(Kind::Float)
                .backward();
            opt.step(false).unwrap();
            opt.zero_grad().unwrap();
        };
        let (pa, pb) = (fresh(), fresh());
        let mut a = AdamW::new(&cfg, &pa).unwrap();
        for s in 0..3 {
            run(&mut a, &pa, s);
        }
        let mut b = AdamW::new(&cfg, &pb).unwrap();
        tch::no_grad(|| pb[0].1.shallow_clone().copy_(&pa[0].1));
        tch::no_grad(|| {
            for (k, dst) in b.state_tensors() {
                dst.shallow_clone().copy_(&a.state_tensors()[&k]);
            }
        });
        b.set_steps_taken(a.steps_taken());
        for s in 3..6 {
            run(&mut a, &pa, s);
            run(&mut b, &pb, s);
        }
        assert!(pa[0].1.equal(&pb[0].1), "resumed optimizer diverged");
    }
}

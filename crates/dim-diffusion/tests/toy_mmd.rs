//! SLOW TEST (about 10-30 s each on a laptop CPU in the dev profile): train a
//! small MLP on a 2-D mixture of Gaussians and check the samples with MMD.
//!
//! Data: 4 equally weighted Gaussians with std 0.1 at (+-0.5, +-0.5) (inside
//! [-1, 1], as the discretised decoder of the VLB assumes).
//!
//! Metric: the biased (V-statistic) squared MMD with a Gaussian kernel of fixed
//! bandwidth h = 0.2, on 1 000 generated vs 1 000 real points. Threshold: 3x
//! the MMD^2 between two independent real batches of the same size, plus 0.002.
//! Why: for two samples of one distribution the V-statistic is not 0 but about
//! `2 (1 - E k(x, x')) / n` = 0.0017 here (over 30 pairs of real batches:
//! mean 0.0016, sd 0.0009), which the real-vs-real value estimates. A sampler
//! matching the data up to a small error scores that floor plus its true
//! MMD^2; 3x the floor plus 0.002 (with this test's seeds: 0.0043, the null
//! mean + 3 sd) admits a true MMD^2 of roughly twice the floor and no more.
//! Blurring the components to std 0.2 scores ~0.03 and dropping a mode ~0.06,
//! far above it; the negative-control test checks that both fail. Observed
//! values for the trained models are 0.0024-0.0027.
//!
//! Everything is seeded (tch::manual_seed for the weights and Adam, NoiseRng
//! for data, times and noise), so the test is reproducible.

use dim_diffusion::{
    Diffusion, DiffusionConfig, NoiseRng, ProcessKind, SampleOptions, SamplerConfig, SamplerKind,
};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

const H: f64 = 0.2;
const N_EVAL: i64 = 1000;

fn mixture(n: i64, rng: &mut NoiseRng) -> Tensor {
    let centres = Tensor::from_slice(&[0.5f32, 0.5, -0.5, 0.5, 0.5, -0.5, -0.5, -0.5]).view([4, 2]);
    let comp = rng.randint(4, n, Device::Cpu);
    centres.index_select(0, &comp) + rng.randn(&[n, 2], Kind::Float, Device::Cpu) * 0.1
}

fn mmd2(x: &Tensor, y: &Tensor) -> f64 {
    let k = |a: &Tensor, b: &Tensor| {
        let d2 = (a.unsqueeze(1) - b.unsqueeze(0))
            .square()
            .sum_dim_intlist(2, false, Kind::Double);
        (d2 / (-2.0 * H * H))
            .exp()
            .mean(Kind::Double)
            .double_value(&[])
    };
    k(x, x) + k(y, y) - 2.0 * k(x, y)
}

/// Time features + MLP.
struct Net {
    mlp: nn::Sequential,
}

impl Net {
    fn new(vs: &nn::Path<'_>, out: i64) -> Self {
        let h = 128;
        let mlp = nn::seq()
            .add(nn::linear(vs / "l1", 2 + 16, h, Default::default()))
            .add_fn(|x| x.silu())
            .add(nn::linear(vs / "l2", h, h, Default::default()))
            .add_fn(|x| x.silu())
            .add(nn::linear(vs / "l3", h, h, Default::default()))
            .add_fn(|x| x.silu())
            .add(nn::linear(vs / "l4", h, out, Default::default()));
        Self { mlp }
    }

    fn forward(&self, x: &Tensor, t: &Tensor) -> Tensor {
        let freqs =
            Tensor::from_slice(&[1.0f32, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]).view([1, 8]);
        let arg = t.to_kind(Kind::Float).view([-1, 1]) / 1000.0 * freqs;
        let emb = Tensor::cat(&[arg.sin(), arg.cos()], 1);
        self.mlp
            .forward(&Tensor::cat(&[x.to_kind(Kind::Float), emb], 1))
            .to_kind(x.kind())
    }
}

fn threshold() -> (f64, Tensor) {
    let mut rng = NoiseRng::new(1);
    let real_a = mixture(N_EVAL, &mut rng);
    let real_b = mixture(N_EVAL, &mut NoiseRng::new(2));
    let base = mmd2(&real_a, &real_b);
    (3.0 * base + 0.002, real_a)
}

fn train<F>(steps: usize, out: i64, seed: i64, mut loss_fn: F) -> (nn::VarStore, Net)
where
    F: FnMut(&Net, &Tensor, &mut NoiseRng) -> Tensor,
{
    tch::manual_seed(seed);
    // Tiny tensors: intra-op threads only add overhead.
    tch::set_num_threads(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Net::new(&vs.root(), out);
    let mut opt = nn::Adam::default().build(&vs, 2e-3).unwrap();
    let mut data_rng = NoiseRng::new(100 + seed as u64);
    let mut rng = NoiseRng::new(200 + seed as u64);
    for step in 0..steps {
        if step == steps * 3 / 4 {
            opt.set_lr(5e-4);
        }
        let x0 = mixture(256, &mut data_rng);
        let loss = loss_fn(&net, &x0, &mut rng);
        opt.backward_step(&loss);
    }
    (vs, net)
}

#[test]
fn negative_control_fails_threshold() {
    let (thr, real) = threshold();
    // Blurred components (std 0.2 instead of 0.1).
    let mut rng = NoiseRng::new(3);
    let blurred =
        mixture(N_EVAL, &mut rng) + rng.randn(&[N_EVAL, 2], Kind::Float, Device::Cpu) * 0.17;
    assert!(
        mmd2(&blurred, &real) > thr,
        "blurred {} vs threshold {thr}",
        mmd2(&blurred, &real)
    );
    // One mode missing.
    let x = mixture(N_EVAL, &mut NoiseRng::new(4));
    let missing = x.abs().where_self(
        &x.narrow(1, 0, 1)
            .lt(0.0)
            .logical_and(&x.narrow(1, 1, 1).lt(0.0)),
        &x,
    );
    assert!(
        mmd2(&missing, &real) > thr,
        "missing mode {} vs threshold {thr}",
        mmd2(&missing, &real)
    );
}

/// Trains `cfg`'s process for `steps` (weights seeded by `seed`), then
/// samples [`N_EVAL`] points with each sampler from `SampleOptions::seeded(seed
/// - 6)` and checks their MMD^2 against the threshold.
fn learns_mixture(cfg: &DiffusionConfig, steps: usize, seed: i64, samplers: &[SamplerConfig]) {
    let (thr, real) = threshold();
    let diffusion = Diffusion::new(cfg).unwrap();
    let (_vs, net) = train(steps, diffusion.out_channels(2), seed, |net, x0, rng| {
        let model = |x: &Tensor, t: &Tensor, _y: Option<&Tensor>| net.forward(x, t);
        let l = diffusion.training_losses(&model, x0, None, rng).unwrap();
        assert_eq!(l.vlb.is_some(), cfg.learn_sigma);
        l.loss.mean(Kind::Float)
    });
    let model = |x: &Tensor, t: &Tensor, _y: Option<&Tensor>| net.forward(x, t);
    let opts = SampleOptions::seeded(seed as u64 - 6);
    for sampler in samplers {
        let x = diffusion
            .sample(&model, &[N_EVAL, 2], None, sampler, &opts, |_| {})
            .unwrap();
        let m = mmd2(&x, &real);
        println!("{:?}: MMD^2 {m:.5}, threshold {thr:.5}", sampler.sampler);
        assert!(
            m < thr,
            "{:?}: MMD^2 {m} >= threshold {thr}",
            sampler.sampler
        );
    }
}

/// SLOW: Gaussian diffusion with learned sigma and the hybrid loss (DiT config),
/// sampled with DDPM (learned variances) on 100 respaced steps and DDIM 50.
/// (Observed MMD^2: 0.0027 and 0.0027 against a threshold of 0.0043.
/// DPM-Solver++ is not asserted here: with this small model it reaches 0.0037
/// at 50 steps, too close to the threshold to be a stable test; its
/// correctness is covered by the diffusers parity and closed-form tests.)
#[test]
fn gaussian_hybrid_loss_learns_mixture() {
    learns_mixture(
        &DiffusionConfig::dit(),
        3000,
        11,
        &[
            SamplerConfig::new(SamplerKind::Ddpm, 100),
            SamplerConfig::new(SamplerKind::Ddim, 50),
        ],
    );
}

/// SLOW: flow matching with logit-normal t, sampled with Euler 50 and Heun 25.
/// (Observed MMD^2: 0.0024 and 0.0026 against 0.0043.)
#[test]
fn flow_matching_learns_mixture() {
    let cfg = DiffusionConfig {
        kind: ProcessKind::Flow,
        time_sampling: dim_diffusion::TimeSampling::LogitNormal,
        ..DiffusionConfig::default()
    };
    learns_mixture(
        &cfg,
        1500,
        12,
        &[
            SamplerConfig::new(SamplerKind::Euler, 50),
            SamplerConfig::new(SamplerKind::Heun, 25),
        ],
    );
}

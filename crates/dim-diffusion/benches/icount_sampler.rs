//! Instruction counts of the samplers' steps (the CPU work of sampling
//! besides the network): ten consecutive DDPM, DDIM and DPM-Solver++(2M)
//! steps of DiT's diffusion (learned sigma, T = 1000, 50-step grids) on a
//! batch of 4 grey 30x30 images. Measured by `cargo xtask bench icount`
//! under callgrind; see `dim_build::icount`.
use dim_diffusion::{
    DiffusionConfig, GaussianDiffusion, SamplerConfig, SamplerKind, SamplingSchedule,
};
use tch::{Device, Kind, Tensor};

/// The state, a fixed model output (2C channels: learned sigma) and noise.
struct Inputs {
    x: Tensor,
    out: Tensor,
    noise: Tensor,
}

fn setup(kind: SamplerKind) -> (SamplingSchedule, Inputs) {
    tch::set_num_threads(1);
    tch::manual_seed(3);
    let diffusion = GaussianDiffusion::new(&DiffusionConfig::dit()).expect("diffusion");
    let cfg = SamplerConfig {
        sampler: kind,
        steps: 50,
        ..Default::default()
    };
    let schedule = diffusion.sampling_schedule(&cfg).expect("schedule");
    let f = (Kind::Float, Device::Cpu);
    let inputs = Inputs {
        x: Tensor::randn([4, 1, 30, 30], f),
        out: Tensor::randn([4, 2, 30, 30], f).clamp(-1.0, 1.0),
        noise: Tensor::randn([4, 1, 30, 30], f),
    };
    (schedule, inputs)
}

const STEPS: std::ops::Range<usize> = 20..30;

fn ddpm() -> Box<dyn FnMut() + Send> {
    let (s, t) = setup(SamplerKind::Ddpm);
    Box::new(move || {
        let mut x = t.x.shallow_clone();
        for i in STEPS {
            x = s.ddpm_step(&t.out, &x, i, &t.noise).expect("ddpm step");
        }
        drop(std::hint::black_box(x));
    })
}

fn ddim() -> Box<dyn FnMut() + Send> {
    let (s, t) = setup(SamplerKind::Ddim);
    Box::new(move || {
        let mut x = t.x.shallow_clone();
        for i in STEPS {
            x = s.ddim_step(&t.out, &x, i, 0.0, None).expect("ddim step");
        }
        drop(std::hint::black_box(x));
    })
}

fn dpm() -> Box<dyn FnMut() + Send> {
    let (s, t) = setup(SamplerKind::DpmSolverPp2M);
    Box::new(move || {
        let mut x = t.x.shallow_clone();
        let mut history: Vec<Tensor> = Vec::new();
        for i in STEPS {
            let (next, x0) = s.dpm_step(&t.out, &x, i, &history, None).expect("dpm step");
            history.push(x0);
            x = next;
        }
        drop(std::hint::black_box(x));
    })
}

fn main() {
    dim_build::icount::main(&[
        ("sampler_ddpm_10_steps", &ddpm),
        ("sampler_ddim_10_steps", &ddim),
        ("sampler_dpmpp2m_10_steps", &dpm),
    ]);
}

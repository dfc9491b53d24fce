//! GPU benchmark: training-step throughput and peak memory of DiM vs DiT
//! (XL/2 by default) under bf16 autocast, at several token counts, plus a
//! per-block breakdown of where DiM's (and DiT's) time goes.
//!
//! One training step = forward + MSE loss (on the ε channels) + backward +
//! AdamW step. Warm-up steps, then the median of timed steps, each between
//! two CUDA synchronisations.
//!
//! ```text
//! cargo bench -p dim-model --bench gpu_model -- [--tokens 256:32,1024:8,4096:2,16384:1]
//!     [--arch dim,dit] [--size XL] [--patch 2] [--depth N] [--warmup 2] [--steps 5]
//!     [--reps 5] [--no-breakdown] [--cpu]
//! ```
//!
//! The same options can come from the environment: `DIM_BENCH_TOKENS`,
//! `DIM_BENCH_ARCH`, `DIM_BENCH_SIZE`, `DIM_BENCH_STEPS`, `DIM_BENCH_DEPTH`.
//! Without CUDA it prints why and exits 0; `--cpu` runs a tiny smoke version
//! on the CPU instead (checks the code path, not the speed).

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use dim_model::network::{Block, Mixer};
use dim_model::{Arch, Model, ModelConfig};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

#[derive(Debug, Clone)]
struct Args {
    sizes: Vec<(i64, i64)>,
    archs: Vec<Arch>,
    size: String,
    patch: i64,
    depth: Option<i64>,
    warmup: usize,
    steps: usize,
    reps: usize,
    breakdown: bool,
    cpu: bool,
}

fn parse_sizes(s: &str) -> Result<Vec<(i64, i64)>, String> {
    s.split(',')
        .map(|item| {
            let (tok, batch) = item.split_once(':').unwrap_or((item, "1"));
            let tok: i64 = tok
                .trim()
                .parse()
                .map_err(|_| format!("bad token count {tok:?}"))?;
            let batch: i64 = batch
                .trim()
                .parse()
                .map_err(|_| format!("bad batch {batch:?}"))?;
            let side = (tok as f64).sqrt().round() as i64;
            if side * side != tok || batch < 1 {
                return Err(format!(
                    "{item:?}: tokens must be a perfect square and batch positive"
                ));
            }
            Ok((tok, batch))
        })
        .collect()
}

fn parse_archs(s: &str) -> Result<Vec<Arch>, String> {
    s.split(',')
        .map(|a| match a.trim().to_ascii_lowercase().as_str() {
            "dim" => Ok(Arch::Dim),
            "dit" => Ok(Arch::Dit),
            other => Err(format!("unknown arch {other:?} (dim or dit)")),
        })
        .collect()
}

fn parse_args() -> Result<Args, String> {
    let env = |k: &str| std::env::var(k).ok();
    let mut a = Args {
        sizes: parse_sizes(
            &env("DIM_BENCH_TOKENS").unwrap_or_else(|| "256:32,1024:8,4096:2,16384:1".into()),
        )?,
        archs: parse_archs(&env("DIM_BENCH_ARCH").unwrap_or_else(|| "dim,dit".into()))?,
        size: env("DIM_BENCH_SIZE").unwrap_or_else(|| "XL".into()),
        patch: 2,
        depth: env("DIM_BENCH_DEPTH").and_then(|d| d.parse().ok()),
        warmup: 2,
        steps: env("DIM_BENCH_STEPS")
            .and_then(|d| d.parse().ok())
            .unwrap_or(5),
        reps: 5,
        breakdown: true,
        cpu: false,
    };
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, name: &str| -> Result<i64, String> {
        v.as_deref()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a number"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--tokens" => a.sizes = parse_sizes(&it.next().ok_or("--tokens needs a value")?)?,
            "--arch" => a.archs = parse_archs(&it.next().ok_or("--arch needs a value")?)?,
            "--size" => a.size = it.next().ok_or("--size needs a value")?,
            "--patch" => a.patch = num(it.next(), "--patch")?,
            "--depth" => a.depth = Some(num(it.next(), "--depth")?),
            "--warmup" => a.warmup = num(it.next(), "--warmup")? as usize,
            "--steps" => a.steps = num(it.next(), "--steps")?.max(1) as usize,
            "--reps" => a.reps = num(it.next(), "--reps")?.max(1) as usize,
            "--no-breakdown" => a.breakdown = false,
            "--cpu" => a.cpu = true,
            // Passed by `cargo bench` to every bench binary.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median wall time (ms) of `f` over `reps` runs after one warm-up run, synchronised.
fn time_ms(device: Device, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        sync(device);
        let t0 = Instant::now();
        f();
        sync(device);
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    median(times)
}

fn peak_reset(device: Device) {
    if let Device::Cuda(i) = device {
        if let Err(e) = dim_scan::device::reset_peak_memory(i) {
            eprintln!("peak memory reset failed: {e}");
        }
    }
}

fn peak_gib(device: Device) -> Option<f64> {
    match device {
        Device::Cuda(i) => dim_scan::device::peak_memory_bytes(i)
            .ok()
            .map(|b| b as f64 / (1u64 << 30) as f64),
        _ => None,
    }
}

struct StepResult {
    ms: f64,
    images_per_s: f64,
    peak_gib: Option<f64>,
    params: i64,
    tflops: f64,
}

fn config(args: &Args, arch: Arch, tokens: i64) -> ModelConfig {
    let name = format!(
        "{}-{}/{}",
        if arch == Arch::Dim { "DiM" } else { "DiT" },
        args.size,
        args.patch
    );
    let mut cfg = ModelConfig::preset(&name).unwrap_or_else(|e| panic!("{e}"));
    let side = (tokens as f64).sqrt().round() as i64 * args.patch;
    cfg.input_size = [side, side];
    if let Some(d) = args.depth {
        cfg.depth = d;
    }
    cfg
}

fn randn_inputs(cfg: &ModelConfig, batch: i64, device: Device) -> (Tensor, Tensor, Tensor, Tensor) {
    let [h, w] = cfg.input_size;
    let x = Tensor::randn([batch, cfg.in_channels, h, w], (Kind::Float, device));
    let noise = Tensor::randn([batch, cfg.in_channels, h, w], (Kind::Float, device));
    let t = Tensor::randint(1000, [batch], (Kind::Int64, device)).to_kind(Kind::Float);
    let y = Tensor::randint(cfg.num_classes, [batch], (Kind::Int64, device));
    (x, noise, t, y)
}

fn train_step_bench(
    args: &Args,
    cfg: &ModelConfig,
    batch: i64,
    device: Device,
) -> (StepResult, Model, nn::VarStore) {
    let vs = nn::VarStore::new(device);
    let model = Model::new(vs.root(), cfg).unwrap_or_else(|e| panic!("{e}"));
    let mut opt = nn::AdamW::default()
        .build(&vs, 1e-4)
        .unwrap_or_else(|e| panic!("{e}"));
    let (x, noise, t, y) = randn_inputs(cfg, batch, device);
    let c = cfg.in_channels;
    let mut step = || {
        let loss = amp(|| {
            let out = model
                .forward(&x, &t, Some(&y), true)
                .unwrap_or_else(|e| panic!("{e}"));
            out.narrow(1, 0, c)
                .to_kind(Kind::Float)
                .mse_loss(&noise, Reduction::Mean)
        });
        opt.zero_grad();
        loss.backward();
        opt.step();
    };
    for _ in 0..args.warmup {
        step();
    }
    sync(device);
    peak_reset(device);
    let mut times = Vec::with_capacity(args.steps);
    for _ in 0..args.steps {
        sync(device);
        let t0 = Instant::now();
        step();
        sync(device);
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let ms = median(times);
    let flops = cfg.flops(&x.size()).map(|f| f.gflops()).unwrap_or(0.0);
    let result = StepResult {
        ms,
        images_per_s: batch as f64 / (ms / 1e3),
        peak_gib: peak_gib(device),
        params: model.param_count(),
        // Training ≈ 3× the forward FLOPs (forward + backward of data and weights).
        tflops: 3.0 * flops / 1e3 / (ms / 1e3),
    };
    (result, model, vs)
}

/// Runs `f` under CUDA autocast.
fn amp<T>(f: impl FnOnce() -> T) -> T {
    dim_scan::device::autocast(true, f).unwrap_or_else(|e| panic!("{e}"))
}

/// Forward+backward time (ms) of `f`'s output, with `sum()` as the loss, under autocast.
fn fwd_bwd_ms(device: Device, reps: usize, f: impl Fn() -> Tensor) -> f64 {
    time_ms(device, reps, || {
        let out = amp(&f);
        out.to_kind(Kind::Float).sum(Kind::Float).backward();
    })
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().copy().set_requires_grad(true)
}

/// Per-block breakdown (forward + backward, ms) of the first block, in the model's step shapes.
fn breakdown(
    model: &Model,
    block: &Block,
    batch: i64,
    reps: usize,
    device: Device,
) -> Vec<(String, f64)> {
    let cfg = model.config();
    let [h, w] = cfg.input_size;
    let g = cfg
        .token_grid(&[batch, cfg.in_channels, h, w])
        .unwrap_or_else(|e| panic!("{e}"));
    let tokens =
        Tensor::randn([batch, g.len(), cfg.width], (Kind::Float, device)).set_requires_grad(true);
    let c = Tensor::randn([batch, cfg.width], (Kind::Float, device));
    let mut parts = Vec::new();
    let total = fwd_bwd_ms(device, reps, || {
        block
            .forward(&tokens, &c, &g)
            .unwrap_or_else(|e| panic!("{e}"))
    });
    let mlp = fwd_bwd_ms(device, reps, || block.mlp.forward(&tokens));
    match &block.mixer {
        Mixer::Mamba(m) => {
            parts.push((
                "in_proj".to_string(),
                fwd_bwd_ms(device, reps, || {
                    let (xs, z) = m.project_in(&tokens);
                    xs + z
                }),
            ));
            let (xs, z) = amp(|| m.project_in(&tokens));
            let (xs, z) = (leaf(&xs), leaf(&z));
            parts.push((
                "conv+SiLU+x_proj+dt_proj (2 dirs)".into(),
                fwd_bwd_ms(device, reps, || {
                    let (f, r) = m.direction_inputs(&xs);
                    f.u.sum(Kind::Float)
                        + f.delta.sum(Kind::Float)
                        + f.b.sum(Kind::Float)
                        + f.c.sum(Kind::Float)
                        + r.u.sum(Kind::Float)
                        + r.delta.sum(Kind::Float)
                        + r.b.sum(Kind::Float)
                        + r.c.sum(Kind::Float)
                }),
            ));
            let (f, r) = amp(|| m.direction_inputs(&xs));
            let lf = dim_model::network::DirectionInputs {
                u: leaf(&f.u),
                delta: leaf(&f.delta),
                a: f.a.detach(),
                b: leaf(&f.b),
                c: leaf(&f.c),
            };
            let lr = dim_model::network::DirectionInputs {
                u: leaf(&r.u),
                delta: leaf(&r.delta),
                a: r.a.detach(),
                b: leaf(&r.b),
                c: leaf(&r.c),
            };
            parts.push((
                "scan op (fused bidirectional)".into(),
                fwd_bwd_ms(device, reps, || {
                    m.scan_op(&lf, &lr, &z).unwrap_or_else(|e| panic!("{e}"))
                }),
            ));
            let y = leaf(&amp(|| {
                m.scan_op(&lf, &lr, &z).unwrap_or_else(|e| panic!("{e}"))
            }));
            parts.push((
                "out_proj".into(),
                fwd_bwd_ms(device, reps, || m.out_proj.weight.matmul(&y)),
            ));
        }
        Mixer::Attention(a) => {
            let (b, l, wd) = (batch, g.len(), cfg.width);
            let hd = wd / cfg.heads;
            parts.push((
                "qkv".into(),
                fwd_bwd_ms(device, reps, || a.qkv.forward(&tokens)),
            ));
            let qkv = amp(|| a.qkv.forward(&tokens))
                .reshape([b, l, 3, cfg.heads, hd])
                .permute([2, 0, 3, 1, 4]);
            let (q, k, v) = (leaf(&qkv.get(0)), leaf(&qkv.get(1)), leaf(&qkv.get(2)));
            parts.push((
                "scaled_dot_product_attention".into(),
                fwd_bwd_ms(device, reps, || {
                    Tensor::scaled_dot_product_attention(
                        &q,
                        &k,
                        &v,
                        None::<Tensor>,
                        0.0,
                        false,
                        None::<f64>,
                        false,
                    )
                }),
            ));
            parts.push((
                "proj".into(),
                fwd_bwd_ms(device, reps, || a.proj.forward(&tokens)),
            ));
        }
    }
    parts.push(("MLP (fc1, GELU, fc2)".into(), mlp));
    let named: f64 = parts.iter().map(|(_, v)| v).sum();
    parts.push((
        "rest: adaLN, LayerNorm, modulate, gates, residuals".into(),
        (total - named).max(0.0),
    ));
    parts.push(("block total".into(), total));
    parts
}

fn card_name() -> String {
    std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,driver_version",
            "--format=csv,noheader",
            "-i",
            "0",
        ])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown card".into())
}

fn main() {
    let mut args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gpu_model: {e}");
            std::process::exit(2);
        }
    };
    let device = if args.cpu {
        // Smoke test: a tiny network, tiny sizes, unless given explicitly.
        if std::env::var("DIM_BENCH_TOKENS").is_err() && !std::env::args().any(|a| a == "--tokens")
        {
            args.sizes = vec![(16, 2), (64, 1)];
        }
        if args.depth.is_none() {
            args.depth = Some(1);
        }
        if !std::env::args().any(|a| a == "--size") && std::env::var("DIM_BENCH_SIZE").is_err() {
            args.size = "S".into();
        }
        args.reps = args.reps.min(2);
        args.steps = args.steps.min(2);
        Device::Cpu
    } else if !tch::Cuda::is_available() {
        println!("gpu_model: skipped: CUDA is not available (libtorch sees no GPU); use --cpu for a smoke run");
        return;
    } else if !dim_scan::cuda_kernels_built() {
        println!("gpu_model: skipped: dim-scan was built without its CUDA kernels (nvcc not found at build time)");
        return;
    } else {
        Device::Cuda(0)
    };
    if device != Device::Cpu {
        if let Err(e) = dim_scan::device::set_cuda_autocast_dtype(Kind::BFloat16) {
            println!("gpu_model: skipped: {e}");
            return;
        }
    }
    tch::manual_seed(0);
    let card = if device == Device::Cpu {
        "CPU (smoke run)".to_string()
    } else {
        card_name()
    };
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    println!("# gpu_model: {card}, {}", date.trim());
    println!(
        "# {}/{} models, bf16 autocast, AdamW, warm-up {} steps, median of {} steps; libtorch {}",
        args.size,
        args.patch,
        args.warmup,
        args.steps,
        if device == Device::Cpu { "CPU" } else { "CUDA" }
    );
    println!(
        "{:<10} {:>7} {:>6} {:>10} {:>10} {:>9} {:>10} {:>8}",
        "model", "tokens", "batch", "ms/step", "images/s", "peak GiB", "params M", "TFLOP/s"
    );
    let mut results: Vec<(Arch, i64, Option<StepResult>)> = Vec::new();
    let mut breakdowns = Vec::new();
    for &(tokens, batch) in &args.sizes {
        for &arch in &args.archs {
            let cfg = config(&args, arch, tokens);
            let label = format!(
                "{}-{}/{}",
                if arch == Arch::Dim { "DiM" } else { "DiT" },
                args.size,
                args.patch
            );
            let args_ref = &args;
            let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let (r, model, vs) = train_step_bench(args_ref, &cfg, batch, device);
                let parts = if args_ref.breakdown {
                    Some(breakdown(
                        &model,
                        &model.blocks[0],
                        batch,
                        args_ref.reps,
                        device,
                    ))
                } else {
                    None
                };
                drop(vs);
                (r, parts)
            }));
            match run {
                Ok((r, parts)) => {
                    println!(
                        "{:<10} {:>7} {:>6} {:>10.1} {:>10.2} {:>9} {:>10.1} {:>8.1}",
                        label,
                        tokens,
                        batch,
                        r.ms,
                        r.images_per_s,
                        r.peak_gib.map_or("n/a".to_string(), |g| format!("{g:.2}")),
                        r.params as f64 / 1e6,
                        r.tflops
                    );
                    if let Some(p) = parts {
                        breakdowns.push((label.clone(), tokens, batch, cfg.depth, r.ms, p));
                    }
                    results.push((arch, tokens, Some(r)));
                }
                Err(e) => {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    let first = msg
                        .lines()
                        .next()
                        .unwrap_or("")
                        .chars()
                        .take(160)
                        .collect::<String>();
                    println!("{label:<10} {tokens:>7} {batch:>6}   FAILED: {first}");
                    results.push((arch, tokens, None));
                }
            }
        }
    }

    println!("\n# DiM / DiT at equal tokens and batch (targets: ≥0.8× at 1024, ≥1× at 4096, ≥2× at 16384; lower memory from 4096)");
    for &(tokens, _) in &args.sizes {
        let get = |a: Arch| {
            results
                .iter()
                .find(|(ar, t, _)| *ar == a && *t == tokens)
                .and_then(|(_, _, r)| r.as_ref())
        };
        if let (Some(m), Some(t)) = (get(Arch::Dim), get(Arch::Dit)) {
            let mem = match (m.peak_gib, t.peak_gib) {
                (Some(a), Some(b)) => format!("{:.2}×", a / b),
                _ => "n/a".into(),
            };
            println!(
                "tokens {tokens:>6}: throughput {:.2}×, peak memory {mem}",
                m.images_per_s / t.images_per_s
            );
        }
    }

    for (label, tokens, batch, depth, step_ms, parts) in breakdowns {
        println!("\n# {label} at {tokens} tokens, batch {batch}: one block, forward+backward (ms), × depth {depth}, share of the step");
        for (name, ms) in parts {
            println!(
                "  {name:<52} {ms:>8.2} ms  ×{depth} = {:>8.1} ms  {:>5.1}%",
                ms * depth as f64,
                100.0 * ms * depth as f64 / step_ms
            );
        }
    }
}

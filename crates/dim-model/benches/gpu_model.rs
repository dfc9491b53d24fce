//! GPU benchmark: training-step throughput and peak memory of DiM vs DiT
//! (XL/2 by default) under bf16 autocast, at several token counts; the
//! sampling cost (one denoiser evaluation, forward only); and a per-block
//! breakdown of where DiM's (and DiT's) time goes, each piece beside its
//! floor.
//!
//! One training step = forward + MSE loss (on the ε channels) + backward +
//! fused AdamW step (`dim_model::optim`, libtorch's `_fused_adamw_`).
//! Warm-up steps, then the median of timed steps, each between two CUDA
//! synchronisations. One sampling evaluation = the network's forward under
//! `no_grad` (labels given, no label dropout).
//!
//! Floors: each piece's FLOPs at the matmul rate measured in the same run
//! (an 8192³ bf16 matmul), its compulsory activation bytes (read + written,
//! forward + backward) at the measured device copy rate, and the scan's
//! exponentials at the measured `ex2` rate; the floor is the largest.
//!
//! ```text
//! cargo bench -p dim-model --bench gpu_model -- [--tokens 256:32,1024:8,4096:2,16384:1]
//!     [--arch dim,dit] [--size XL] [--patch 2] [--depth N] [--warmup 2] [--steps 5]
//!     [--reps 5] [--no-breakdown] [--no-sampling] [--cpu]
//! ```
//!
//! The same options can come from the environment: `DIM_BENCH_TOKENS`,
//! `DIM_BENCH_ARCH`, `DIM_BENCH_SIZE`, `DIM_BENCH_STEPS`, `DIM_BENCH_DEPTH`.
//! Without CUDA it prints `skipped: no CUDA` and exits 0; `--cpu` runs a tiny
//! smoke version on the CPU instead (checks the code path, not the speed).
//! `DIM_BENCH_JSON=<file>` also appends each training-step and sampling row
//! as a JSON line there (`dim_build::bench_json`, for `cargo xtask bench record`).

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use dim_build::bench_json::{median_spread, record};
use dim_model::network::{attend, Block, Mixer, ScanOperands};
use dim_model::optim::{AdamW, AdamWConfig};
use dim_model::{Arch, Model, ModelConfig};
use tch::nn;
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
    sampling: bool,
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
        sampling: true,
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
            "--no-sampling" => a.sampling = false,
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

thread_local! {
    /// The spread of the last `median_runs`, for the rows that record it.
    static LAST_SPREAD: std::cell::Cell<f64> = const { std::cell::Cell::new(f64::NAN) };
}

/// Median wall time (ms) of `f` over `reps` runs after one warm-up run, synchronised.
fn time_ms(device: Device, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median_runs(device, reps, f)
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
    /// Relative spread of the timed runs (interquartile range / median).
    spread: f64,
    images_per_s: f64,
    peak_gib: Option<f64>,
    params: i64,
    tflops: f64,
}

/// One denoiser evaluation (forward only).
struct SampleResult {
    ms: f64,
    spread: f64,
    images_per_s: f64,
    peak_gib: Option<f64>,
}

fn config(args: &Args, arch: Arch, tokens: i64) -> ModelConfig {
    let mut cfg = ModelConfig::preset(&model_name(args, arch)).unwrap_or_else(|e| panic!("{e}"));
    let side = (tokens as f64).sqrt().round() as i64 * args.patch;
    cfg.input_size = [side, side];
    if let Some(d) = args.depth {
        cfg.depth = d;
    }
    cfg
}

fn model_name(args: &Args, arch: Arch) -> String {
    format!(
        "{}-{}/{}",
        if arch == Arch::Dim { "DiM" } else { "DiT" },
        args.size,
        args.patch
    )
}

fn randn_inputs(cfg: &ModelConfig, batch: i64, device: Device) -> (Tensor, Tensor, Tensor, Tensor) {
    let [h, w] = cfg.input_size;
    let x = Tensor::randn([batch, cfg.in_channels, h, w], (Kind::Float, device));
    let noise = Tensor::randn([batch, cfg.in_channels, h, w], (Kind::Float, device));
    let t = Tensor::randint(1000, [batch], (Kind::Int64, device)).to_kind(Kind::Float);
    let y = Tensor::randint(cfg.num_classes, [batch], (Kind::Int64, device));
    (x, noise, t, y)
}

/// Median wall time (ms) of `f` over `reps` runs after `warmup` runs, each between synchronisations.
/// Median wall time (ms) of `f` over `reps` runs after `warmup` runs; the
/// peak-memory counter restarts after the warm-up.
fn timed(device: Device, warmup: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    sync(device);
    peak_reset(device);
    median_runs(device, reps, f)
}

/// Median wall time (ms) of `reps` synchronised runs of `f`.
fn median_runs(device: Device, reps: usize, mut f: impl FnMut()) -> f64 {
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        sync(device);
        let t0 = Instant::now();
        f();
        sync(device);
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let (median, spread) = median_spread(&times);
    LAST_SPREAD.with(|c| c.set(spread));
    median
}

fn train_step_bench(
    args: &Args,
    cfg: &ModelConfig,
    batch: i64,
    device: Device,
) -> (StepResult, Model, nn::VarStore) {
    let vs = nn::VarStore::new(device);
    let model = Model::new(vs.root(), cfg).unwrap_or_else(|e| panic!("{e}"));
    let params: Vec<Tensor> = vs.trainable_variables();
    let decay = vec![false; params.len()];
    // DiT's recipe: AdamW without weight decay or clipping.
    let mut opt =
        AdamW::new(params, &decay, AdamWConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    let (x, noise, t, y) = randn_inputs(cfg, batch, device);
    let c = cfg.in_channels;
    let step = || {
        let loss = amp(|| {
            let out = model
                .forward(&x, &t, Some(&y), true)
                .unwrap_or_else(|e| panic!("{e}"));
            out.narrow(1, 0, c)
                .to_kind(Kind::Float)
                .mse_loss(&noise, Reduction::Mean)
        });
        loss.backward();
        opt.step(1e-4, 0.0, false).unwrap_or_else(|e| panic!("{e}"));
        opt.zero_grad().unwrap_or_else(|e| panic!("{e}"));
    };
    let ms = timed(device, args.warmup, args.steps, step);
    let spread = LAST_SPREAD.with(|c| c.get());
    let flops = cfg.flops(&x.size()).map(|f| f.gflops()).unwrap_or(0.0);
    let result = StepResult {
        ms,
        spread,
        images_per_s: batch as f64 / (ms / 1e3),
        peak_gib: peak_gib(device),
        params: model.param_count(),
        // Training ≈ 3× the forward FLOPs (forward + backward of data and weights).
        tflops: 3.0 * flops / 1e3 / (ms / 1e3),
    };
    (result, model, vs)
}

/// One denoiser evaluation of a fresh model: forward under `no_grad` and autocast.
fn sample_bench(args: &Args, cfg: &ModelConfig, batch: i64, device: Device) -> SampleResult {
    let vs = nn::VarStore::new(device);
    let model = Model::new(vs.root(), cfg).unwrap_or_else(|e| panic!("{e}"));
    let (x, _, t, y) = randn_inputs(cfg, batch, device);
    let ms = timed(device, args.warmup, args.steps.max(args.reps), || {
        tch::no_grad(|| {
            let _ =
                amp(|| model.forward(&x, &t, Some(&y), false)).unwrap_or_else(|e| panic!("{e}"));
        })
    });
    SampleResult {
        ms,
        spread: LAST_SPREAD.with(|c| c.get()),
        images_per_s: batch as f64 / (ms / 1e3),
        peak_gib: peak_gib(device),
    }
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

/// The device's rates that the floors use.
struct Rates {
    /// bf16 matmul FLOP/s (an 8192³ matmul; 512³ f32 in the CPU smoke run).
    matmul: f64,
    /// Device copy bytes/s, read plus written.
    copy: f64,
    /// `ex2.approx` per second (CUDA only).
    exp2: Option<f64>,
}

fn measure_rates(device: Device) -> Rates {
    let (n, kind) = if device.is_cuda() {
        (8192, Kind::BFloat16)
    } else {
        (512, Kind::Float)
    };
    let a = Tensor::randn([n, n], (kind, device));
    let b = Tensor::randn([n, n], (kind, device));
    let mm = time_ms(device, 10, || {
        let _ = a.matmul(&b);
    });
    let matmul = 2.0 * (n as f64).powi(3) / (mm / 1e3);
    let (copy, exp2) = if device.is_cuda() {
        (
            dim_scan::device::copy_bandwidth(device).unwrap_or_else(|e| panic!("{e}")),
            dim_scan::device::exp2_rate(device).ok(),
        )
    } else {
        let src = Tensor::ones([1 << 24], (Kind::Float, device));
        let mut dst = src.empty_like();
        let ms = time_ms(device, 5, || dst.copy_(&src));
        (2.0 * 4.0 * (1 << 24) as f64 / (ms / 1e3), None)
    };
    Rates { matmul, copy, exp2 }
}

/// One piece of a block: measured forward+backward time and its work.
struct Piece {
    name: String,
    ms: f64,
    /// Forward + backward FLOPs.
    flops: f64,
    /// Compulsory activation bytes, read + written, forward + backward.
    bytes: f64,
    /// Exponentials (the scan's `exp(Δ·A)`), forward + backward.
    exps: f64,
}

impl Piece {
    fn new(name: &str, ms: f64, flops: f64, bytes: f64, exps: f64) -> Self {
        Self {
            name: name.into(),
            ms,
            flops,
            bytes,
            exps,
        }
    }

    /// The largest of the three bounds, ms.
    fn floor_ms(&self, r: &Rates) -> f64 {
        let exp = r.exp2.map_or(0.0, |rate| self.exps / rate);
        (self.flops / r.matmul).max(self.bytes / r.copy).max(exp) * 1e3
    }
}

/// A linear layer `I → O` over `t` tokens, forward + backward: FLOPs
/// (forward, input gradient, weight gradient) and activation elements (read
/// x, write y; read dy and x, write dx).
fn linear_work(t: f64, i: f64, o: f64) -> (f64, f64) {
    (6.0 * t * i * o, 3.0 * t * i + 2.0 * t * o)
}

/// Per-block breakdown (forward + backward) of the first block, in the
/// model's step shapes, with each piece's FLOPs and bytes.
fn breakdown(model: &Model, block: &Block, batch: i64, reps: usize, device: Device) -> Vec<Piece> {
    let cfg = model.config();
    let [h, w] = cfg.input_size;
    let g = cfg
        .token_grid(&[batch, cfg.in_channels, h, w])
        .unwrap_or_else(|e| panic!("{e}"));
    let tokens =
        Tensor::randn([batch, g.len(), cfg.width], (Kind::Float, device)).set_requires_grad(true);
    let c = Tensor::randn([batch, cfg.width], (Kind::Float, device));
    // Work counts: t tokens of width wd; activations in bf16 (2 bytes).
    let (t, wd) = ((batch * g.len()) as f64, cfg.width as f64);
    let el = 2.0;
    let mut parts = Vec::new();
    let total = fwd_bwd_ms(device, reps, || {
        block
            .forward(&tokens, &c, &g)
            .unwrap_or_else(|e| panic!("{e}"))
    });
    let mlp_ms = fwd_bwd_ms(device, reps, || block.mlp.forward(&tokens));
    let hidden = cfg.mlp_width() as f64;
    let (f1, b1) = linear_work(t, wd, hidden);
    let (f2, b2) = linear_work(t, hidden, wd);
    // GELU: read x, write y; read dy and x, write dx.
    let mlp = Piece::new(
        "MLP (fc1, GELU, fc2)",
        mlp_ms,
        f1 + f2,
        (b1 + b2 + 5.0 * t * hidden) * el,
        0.0,
    );
    match &block.mixer {
        Mixer::Mamba(m) => {
            let (e, n, r, k) = (
                cfg.inner_width() as f64,
                cfg.d_state as f64,
                cfg.dt_rank as f64,
                cfg.d_conv as f64,
            );
            let (f, b) = linear_work(t, wd, 2.0 * e);
            parts.push(Piece::new(
                "in_proj (one bmm → (B, 2E, L))",
                fwd_bwd_ms(device, reps, || {
                    m.project_in(&tokens).unwrap_or_else(|e| panic!("{e}"))
                }),
                f,
                b * el,
                0.0,
            ));
            let xz = leaf(&amp(|| {
                m.project_in(&tokens).unwrap_or_else(|e| panic!("{e}"))
            }));
            let (xs, z) = m.split_xz(&xz);
            // Conv (K real taps per direction), x_proj and dt_proj of both
            // directions; I/O: read x, write u, Δ (both 2E wide) and x_proj's
            // output; backward reads their gradients and x, writes dx.
            let conv_flops = 6.0 * t * 2.0 * e * k;
            let proj_flops = 2.0 * (linear_work(t, e, r + 2.0 * n).0 + linear_work(t, r, e).0);
            let io = t * (e + 4.0 * e + 2.0 * (r + 2.0 * n)) + t * (4.0 * e + 4.0 * n + e + e);
            parts.push(Piece::new(
                "conv+SiLU+x_proj+dt_proj (2 dirs, batched)",
                fwd_bwd_ms(device, reps, || {
                    let ops = m.scan_operands(&xs);
                    ops.u.sum(Kind::Float) + ops.delta.sum(Kind::Float) + ops.dbl.sum(Kind::Float)
                }),
                conv_flops + proj_flops,
                io * el,
                0.0,
            ));
            let ops = amp(|| m.scan_operands(&xs));
            let lops = ScanOperands {
                u: leaf(&ops.u),
                delta: leaf(&ops.delta),
                dbl: leaf(&ops.dbl),
                a: [ops.a[0].detach(), ops.a[1].detach()],
            };
            // Forward reads u, Δ (2E each), z, B, C and writes y; backward
            // reads those and dy, writes du, dΔ, dz, dB, dC. exp(Δ·A) per
            // channel, state and token, both directions, forward and again in
            // the backward (recomputed).
            let scan_io = t * (6.0 * e + 4.0 * n) + t * (7.0 * e + 4.0 * n + 5.0 * e + 4.0 * n);
            parts.push(Piece::new(
                "scan op (fused bidirectional)",
                fwd_bwd_ms(device, reps, || {
                    m.scan_op(&lops, &z).unwrap_or_else(|e| panic!("{e}"))
                }),
                0.0,
                scan_io * el,
                4.0 * t * e * n,
            ));
            let y = leaf(&amp(|| {
                m.scan_op(&lops, &z).unwrap_or_else(|e| panic!("{e}"))
            }));
            let (f, b) = linear_work(t, e, wd);
            parts.push(Piece::new(
                "out_proj (bmm → (B, L, W))",
                fwd_bwd_ms(device, reps, || m.project_out(&y)),
                f,
                b * el,
                0.0,
            ));
        }
        Mixer::Attention(a) => {
            let (b, l, wdi) = (batch, g.len(), cfg.width);
            let hd = wdi / cfg.heads;
            let (f, bytes) = linear_work(t, wd, 3.0 * wd);
            parts.push(Piece::new(
                "qkv",
                fwd_bwd_ms(device, reps, || a.qkv.forward(&tokens)),
                f,
                bytes * el,
                0.0,
            ));
            let qkv = amp(|| a.qkv.forward(&tokens))
                .reshape([b, l, 3, cfg.heads, hd])
                .permute([2, 0, 3, 1, 4]);
            let (q, k, v) = (leaf(&qkv.get(0)), leaf(&qkv.get(1)), leaf(&qkv.get(2)));
            // Flash attention: 2 L×L products forward, 5 backward (with the
            // recomputation); I/O q, k, v, o forward; q, k, v, o, do in and
            // dq, dk, dv out backward.
            let l = l as f64;
            parts.push(Piece::new(
                "scaled_dot_product_attention",
                fwd_bwd_ms(device, reps, || attend(&q, &k, &v)),
                14.0 * batch as f64 * l * l * wd,
                12.0 * t * wd * el,
                0.0,
            ));
            let (f, bytes) = linear_work(t, wd, wd);
            parts.push(Piece::new(
                "proj",
                fwd_bwd_ms(device, reps, || a.proj.forward(&tokens)),
                f,
                bytes * el,
                0.0,
            ));
        }
    }
    parts.push(mlp);
    let named: f64 = parts.iter().map(|p| p.ms).sum();
    // adaLN modulation, two LayerNorms, modulate, gates and residuals:
    // elementwise passes over (B, L, W) in f32, about 12 reads/writes
    // forward and 20 backward.
    let (fa, _) = linear_work(batch as f64, wd, 6.0 * wd);
    parts.push(Piece::new(
        "rest: adaLN, LayerNorm, modulate, gates, residuals",
        (total - named).max(0.0),
        fa,
        32.0 * t * wd * 4.0,
        0.0,
    ));
    let sum = |f: fn(&Piece) -> f64| parts.iter().map(f).sum::<f64>();
    let (flops, bytes, exps) = (sum(|p| p.flops), sum(|p| p.bytes), sum(|p| p.exps));
    parts.push(Piece {
        name: "block total".into(),
        ms: total,
        flops,
        bytes,
        exps,
    });
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

/// The first line of a caught panic's message.
/// A table row for a size whose run panicked (out of memory, say).
/// The first columns of a result row: model, tokens, batch.
fn row(label: &str, tokens: i64, batch: i64) -> String {
    format!("{label:<10} {tokens:>7} {batch:>6}")
}

/// Runs one measurement, catching a panic (CUDA out of memory, say) and
/// printing it as a FAILED row instead.
fn guarded<R>(label: &str, tokens: i64, batch: i64, f: impl FnOnce() -> R) -> Option<R> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => Some(r),
        Err(e) => {
            println!(
                "{}   FAILED: {}",
                row(label, tokens, batch),
                panic_line(e.as_ref())
            );
            None
        }
    }
}

fn panic_line(e: &(dyn std::any::Any + Send)) -> String {
    let msg = e
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    msg.lines().next().unwrap_or("").chars().take(160).collect()
}

fn gib(g: Option<f64>) -> String {
    g.map_or("n/a".to_string(), |g| format!("{g:.2}"))
}

/// `a / b` as `0.00×`, or `n/a`.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "n/a".into(),
    }
}

struct Breakdown {
    arch: Arch,
    label: String,
    tokens: i64,
    batch: i64,
    depth: i64,
    step_ms: f64,
    parts: Vec<Piece>,
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
    } else if !dim_build::gpu_bench::runs(
        "gpu_model",
        if !tch::Cuda::is_available() {
            Some("no CUDA (libtorch sees no GPU); `--cpu` runs a tiny smoke version")
        } else if !dim_scan::cuda_kernels_built() {
            Some("dim-scan was built without its CUDA kernels (nvcc not found at build time)")
        } else {
            None
        },
    ) {
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
    let rates = measure_rates(device);
    println!(
        "# measured: matmul {:.1} TFLOP/s ({}), copy {:.2} TB/s (read + written){}",
        rates.matmul / 1e12,
        if device.is_cuda() {
            "8192³ bf16"
        } else {
            "512³ f32"
        },
        rates.copy / 1e12,
        rates
            .exp2
            .map_or(String::new(), |r| format!(", ex2 {:.2} T/s", r / 1e12))
    );
    println!(
        "# {}/{} models, bf16 autocast, fused AdamW, warm-up {} steps, median of {} steps; libtorch {}",
        args.size,
        args.patch,
        args.warmup,
        args.steps,
        if device == Device::Cpu { "CPU" } else { "CUDA" }
    );
    println!("\n# training step (forward, loss, backward, AdamW)");
    println!(
        "{:<10} {:>7} {:>6} {:>10} {:>10} {:>9} {:>10} {:>8}",
        "model", "tokens", "batch", "ms/step", "images/s", "peak GiB", "params M", "TFLOP/s"
    );
    let mut results: Vec<(Arch, i64, Option<StepResult>)> = Vec::new();
    let mut breakdowns = Vec::new();
    for &(tokens, batch) in &args.sizes {
        for &arch in &args.archs {
            let cfg = config(&args, arch, tokens);
            let label = model_name(&args, arch);
            let args_ref = &args;
            let run = guarded(&label, tokens, batch, || {
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
            });
            let run = run.map(|(r, parts)| {
                record(
                    &format!("gpu_model/train step/{label}/{tokens} tokens x{batch}"),
                    "ms",
                    r.ms,
                    r.spread,
                    args.steps,
                    None,
                    false,
                );
                println!(
                    "{} {:>10.1} {:>10.2} {:>9} {:>10.1} {:>8.1}",
                    row(&label, tokens, batch),
                    r.ms,
                    r.images_per_s,
                    gib(r.peak_gib),
                    r.params as f64 / 1e6,
                    r.tflops
                );
                if let Some(parts) = parts {
                    breakdowns.push(Breakdown {
                        arch,
                        label: label.clone(),
                        tokens,
                        batch,
                        depth: cfg.depth,
                        step_ms: r.ms,
                        parts,
                    });
                }
                r
            });
            results.push((arch, tokens, run));
        }
    }

    let mut samples: Vec<(Arch, i64, Option<SampleResult>)> = Vec::new();
    if args.sampling {
        println!("\n# sampling: one denoiser evaluation (forward, no grad, bf16 autocast)");
        println!(
            "{:<10} {:>7} {:>6} {:>10} {:>10} {:>9} {:>9}",
            "model", "tokens", "batch", "ms", "images/s", "peak GiB", "floor ms"
        );
        for &(tokens, batch) in &args.sizes {
            for &arch in &args.archs {
                let cfg = config(&args, arch, tokens);
                let label = model_name(&args, arch);
                let run = guarded(&label, tokens, batch, || {
                    sample_bench(&args, &cfg, batch, device)
                });
                if let Some(r) = &run {
                    let [h, w] = cfg.input_size;
                    let floor = cfg
                        .flops(&[batch, cfg.in_channels, h, w])
                        .map(|f| f.gflops() * 1e9 / rates.matmul * 1e3)
                        .unwrap_or(0.0);
                    record(
                        &format!("gpu_model/sample eval/{label}/{tokens} tokens x{batch}"),
                        "ms",
                        r.ms,
                        r.spread,
                        args.steps.max(args.reps),
                        (floor > 0.0).then_some(floor),
                        false,
                    );
                    println!(
                        "{} {:>10.2} {:>10.2} {:>9} {:>9.2}",
                        row(&label, tokens, batch),
                        r.ms,
                        r.images_per_s,
                        gib(r.peak_gib),
                        floor
                    );
                }
                samples.push((arch, tokens, run));
            }
        }
    }

    for b in &breakdowns {
        println!(
            "\n# {} at {} tokens, batch {}: one block, forward+backward, × depth {}, share of the step; floor = max(FLOPs at the matmul rate, bytes at the copy rate, exps at the ex2 rate)",
            b.label, b.tokens, b.batch, b.depth
        );
        println!(
            "  {:<52} {:>9} {:>11} {:>6} {:>9} {:>9} {:>9} {:>7}",
            "piece", "ms", "× depth", "share", "GFLOP", "MB", "floor ms", "/floor"
        );
        let depth = b.depth as f64;
        for p in &b.parts {
            let floor = p.floor_ms(&rates);
            println!(
                "  {:<52} {:>9.3} {:>11.1} {:>5.1}% {:>9.2} {:>9.1} {:>9.3} {:>6.1}×",
                p.name,
                p.ms,
                p.ms * depth,
                100.0 * p.ms * depth / b.step_ms,
                p.flops / 1e9,
                p.bytes / 1e6,
                floor,
                if floor > 0.0 { p.ms / floor } else { 0.0 }
            );
        }
    }

    println!("\n# DiM / DiT at equal tokens and batch");
    println!("#   train: throughput (targets ≥0.8× at 1024, ≥1.2× at 4096, ≥2× at 16384), peak memory (DiM ≤ DiT from 4096)");
    println!(
        "#   sample: throughput (targets ≥1× at 1024, ≥1.5× at 4096, ≥3× at 16384), peak memory"
    );
    println!("#   block: DiT block time / DiM block time, forward+backward");
    for &(tokens, _) in &args.sizes {
        let step = |a: Arch| {
            results
                .iter()
                .find(|(ar, t, _)| *ar == a && *t == tokens)
                .and_then(|(_, _, r)| r.as_ref())
        };
        let sample = |a: Arch| {
            samples
                .iter()
                .find(|(ar, t, _)| *ar == a && *t == tokens)
                .and_then(|(_, _, r)| r.as_ref())
        };
        let block = |a: Arch| {
            breakdowns
                .iter()
                .find(|b| b.arch == a && b.tokens == tokens)
                .and_then(|b| b.parts.last())
                .map(|p| p.ms)
        };
        let (sm, st) = (step(Arch::Dim), step(Arch::Dit));
        let (pm, pt) = (sample(Arch::Dim), sample(Arch::Dit));
        if sm.is_none() && pm.is_none() {
            continue;
        }
        println!(
            "tokens {tokens:>6}: train {} (memory {}), sample {} (memory {}), block {}",
            ratio(sm.map(|r| r.images_per_s), st.map(|r| r.images_per_s)),
            ratio(sm.and_then(|r| r.peak_gib), st.and_then(|r| r.peak_gib)),
            ratio(pm.map(|r| r.images_per_s), pt.map(|r| r.images_per_s)),
            ratio(pm.and_then(|r| r.peak_gib), pt.and_then(|r| r.peak_gib)),
            ratio(block(Arch::Dit), block(Arch::Dim)),
        );
    }
}

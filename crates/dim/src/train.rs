//! `dim train`: the training loop.
//!
//! Determinism: every random draw of a step is keyed by `(seed, step)`:
//! diffusion noise and times come from dim-diffusion's `NoiseRng` at row
//! `step · batch + i`, label dropout from libtorch's generator re-seeded
//! with `(seed, step)` before the step, and the data order from dim-data's
//! loader, whose position is saved. So a resumed run repeats exactly the
//! loss sequence of an uninterrupted one (on CPU; CUDA kernels with atomics
//! may differ in the last bits).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use dim_diffusion::{Diffusion, FallibleFn, NoiseRng, SamplerConfig};
use dim_io::Group;
use dim_rng::derive;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, Checkpoint};
use crate::config::TrainConfig;
use crate::dist::{self, World};
use crate::images;
use crate::metrics::{rss_mib, JsonlWriter, StepRecord};
use crate::optim::{AdamW, Ema};
use crate::runtime::{
    diffusion_config, model_config, named_params, progress_bar, set_precision, Net,
};

/// Steps between the ranks' agreements on stopping (Ctrl-C, time limit).
const STOP_CHECK_EVERY: u64 = 10;

/// Where to resume from.
#[derive(Debug, Clone)]
pub enum Resume {
    /// The newest checkpoint in `train.out_dir`, or a fresh start if none.
    Auto,
    /// A given checkpoint file.
    Path(PathBuf),
}

/// What a finished (or interrupted) run leaves.
#[derive(Debug)]
pub struct TrainOutcome {
    pub step: u64,
    pub checkpoint: PathBuf,
    pub interrupted: bool,
    /// Whether this process is rank 0 (the one that reports).
    pub primary: bool,
}

/// Trains per `cfg`; `stop` is set by Ctrl-C and makes the loop checkpoint
/// and return at the next step boundary.
pub fn train(
    cfg: &TrainConfig,
    resume: Option<Resume>,
    stop: Arc<AtomicBool>,
) -> Result<TrainOutcome> {
    let t = &cfg.train;
    // Data parallelism: a world of one unless started by `--gpus/--nproc` or torchrun.
    let (mut world, device) = World::from_env(&cfg.dist, &t.device)?;
    if t.threads > 0 {
        tch::set_num_threads(t.threads);
    }
    // Only rank 0 writes to the run folder.
    if world.is_primary() {
        images::ensure_writable_dir(&t.out_dir)?;
    }
    let mcfg = model_config(cfg)?;
    let dcfg = diffusion_config(cfg)?;
    let diffusion = Diffusion::new(&dcfg.diffusion)
        .with_context(|| format!("config {}: [diffusion]", cfg.file))?;
    if diffusion.out_channels(mcfg.in_channels) != mcfg.out_channels() {
        bail!(
            "config {}: model.learn_sigma = {} but diffusion.learn_sigma = {}: set both the same",
            cfg.file,
            mcfg.learn_sigma,
            dcfg.diffusion.learn_sigma
        );
    }

    tch::manual_seed(derive(t.seed, &[u64::MAX]) as i64);
    let net = Net::new(&mcfg, device)?;
    // Every rank starts from rank 0's weights (as DDP).
    // Sorted by name: every rank must list them in the same order.
    let all_vars: Vec<Tensor> = net
        .vs
        .variables()
        .into_iter()
        .collect::<BTreeMap<_, _>>()
        .into_values()
        .collect();
    world.broadcast_from_primary(&all_vars)?;
    let params = named_params(&net.vs);
    let mut opt = AdamW::new(&cfg.optim, &params)?;
    let mut ema = Ema::new(
        cfg.optim.ema_decay,
        cfg.optim.ema_start,
        cfg.optim.ema_warmup,
        &params,
    );

    let dataset = cfg
        .data
        .build()
        .with_context(|| format!("config {}: [data]", cfg.file))?;
    // Latent runs: cache, VAE, classes and model must agree (issue 15); the
    // VAE is loaded once, here, so a bad [vae] fails before step 1.
    crate::vae::check_latent_setup(
        &cfg.file,
        &cfg.data,
        dataset.as_ref(),
        cfg.vae.as_ref(),
        &mcfg,
    )?;
    let output = crate::vae::Output::for_model(cfg.vae.as_ref(), &mcfg, device)?;
    // `micro`: samples of a micro-batch over all ranks; each loads its share.
    let micro = t.batch_size / t.grad_accum;
    let mut lcfg = cfg.loader.clone();
    lcfg.batch_size = world.local_batch(micro, &cfg.file)? as usize;
    lcfg.rank = world.rank();
    lcfg.world_size = world.size();
    lcfg.seed = t.seed;
    let mut loader = dim_data::Loader::new(dataset, lcfg)
        .with_context(|| format!("config {}: [loader]", cfg.file))?;

    let mut step = 0u64;
    let resume_path = match resume {
        Some(Resume::Auto) => checkpoint::latest(&t.out_dir),
        Some(Resume::Path(p)) => Some(p),
        None => None,
    };
    if let Some(p) = &resume_path {
        let ck = checkpoint::open(p)?;
        let saved: toml::Table = ck.config_table()?;
        if saved.get("model") != Some(&toml::Value::Table(cfg.model.clone())) {
            bail!(
                "checkpoint {} was trained with a different [model] than config {}: resume with the config it was trained with (its [model] is stored in the checkpoint)",
                p.display(),
                cfg.file
            );
        }
        ck.load_model_weights(&net.vs)?;
        let shadow = ema
            .shadow
            .iter()
            .map(|(n, s)| (n.clone(), s.shallow_clone()));
        ck.load_group(&shadow.collect(), Group::new(checkpoint::EMA_GROUP))?;
        step = ck.meta("step")?.parse()?;
        ck.load_group(&opt.state_tensors(), Group::new(checkpoint::OPTIM_GROUP))?;
        opt.set_steps_taken(step);
        let pos: dim_data::LoaderState = serde_json::from_str(ck.meta("data_position")?)?;
        let pos = world
            .loader_position(&pos, &loader.position())
            .with_context(|| format!("checkpoint {}: data position", p.display()))?;
        loader
            .resume(&pos)
            .with_context(|| format!("checkpoint {}: data position", p.display()))?;
        tracing::info!(checkpoint = %p.display(), step, "resumed");
    }

    world.attach_reducer(&params, &cfg.dist)?;
    let mut metrics = match world.is_primary() {
        true => Some(JsonlWriter::open(&t.out_dir.join("metrics.jsonl"))?),
        false => None,
    };
    tracing::info!(
        params = mcfg.param_count(),
        device = ?device,
        steps = t.steps,
        batch = t.batch_size,
        "training {}",
        cfg.file
    );
    let bar = progress_bar(
        t.steps,
        world.is_primary(),
        "{spinner} train [{bar:30}] {pos}/{len} steps, {per_sec}, ETA {eta} {msg}",
    );
    bar.set_position(step);
    let start = Instant::now();
    let mut window = (Instant::now(), 0i64);
    let mut last_ckpt: Option<PathBuf> = resume_path.clone();
    let amp = set_precision(&t.precision, device)?;
    let conditional = mcfg.num_classes > 0;
    // Step losses not yet checked for finiteness: (first such step, their sum
    // on the device). Reading a loss waits for the device, so it happens
    // when a step is logged, before a checkpoint or sample grid, and at the
    // end, not every step; a non-finite loss poisons the sum.
    let mut unchecked: Option<(u64, Tensor)> = None;

    let save = |step: u64,
                net: &Net,
                ema: &Ema,
                opt: &AdamW,
                loader: &dim_data::Loader|
     -> Result<PathBuf> {
        let mut ck = Checkpoint::default();
        for (n, w) in named_params(&net.vs) {
            ck.tensors.insert(format!("model/{n}"), w);
        }
        // Non-trainable buffers, if the network has any, travel with the model.
        for (n, w) in net.vs.variables() {
            ck.tensors.entry(format!("model/{n}")).or_insert(w);
        }
        for (n, w) in &ema.shadow {
            ck.tensors.insert(format!("ema/{n}"), w.shallow_clone());
        }
        for (n, w) in opt.state_tensors() {
            ck.tensors.insert(format!("optim/{n}"), w);
        }
        ck.meta
            .insert("config".into(), toml::to_string(&cfg.to_table())?);
        ck.meta.insert("step".into(), step.to_string());
        ck.meta.insert(
            "data_position".into(),
            serde_json::to_string(&loader.position())?,
        );
        ck.meta.insert("seed".into(), t.seed.to_string());
        let p = checkpoint::path_for_step(&t.out_dir, step);
        ck.save(&p)?;
        checkpoint::prune(&t.out_dir, t.keep_last)?;
        tracing::info!(path = %p.display(), step, "checkpoint written");
        Ok(p)
    };

    let mut interrupted = false;
    let mut profiler = None;
    let profile_end = t.profile_from + t.profile_steps;
    while step < t.steps {
        if t.profile_steps > 0 && step == t.profile_from && world.is_primary() {
            profiler = Some(dim_scan::profiler::Profiler::start(
                t.profile_host || !device.is_cuda(),
                device.is_cuda(),
            )?);
        }
        let timed_out = t.time_limit_s > 0.0 && start.elapsed().as_secs_f64() >= t.time_limit_s;
        // Ranks agree, so that they stop at the same step; with several ranks
        // only every STOP_CHECK_EVERY steps, as the agreement makes each
        // rank's host wait for the slowest one's.
        let (stopping, timed_out) = if world.size() == 1 || step.is_multiple_of(STOP_CHECK_EVERY) {
            let [s, t] = world.any([stop.load(Ordering::SeqCst), timed_out])?;
            (s, t)
        } else {
            (false, false)
        };
        if stopping {
            interrupted = true;
            break;
        }
        if timed_out {
            tracing::info!(step, "time limit reached");
            break;
        }
        tch::manual_seed(derive(t.seed, &[step]) as i64);
        let mut step_loss = Tensor::zeros([], (Kind::Double, device));
        for m in 0..t.grad_accum {
            let batch = loader
                .next_batch()
                .context("the data loader stopped")?
                .context("loading a batch")?;
            // Non-blocking from the loader's pinned memory: the host goes on to queue the step.
            let x = batch.x.to_device_(device, batch.x.kind(), true, false);
            // This rank's rows of global micro-batch `g`: per-sample noise and
            // label dropout are the same whatever the number of ranks.
            let g = step * t.grad_accum as u64 + m as u64;
            let y = if conditional {
                let y = batch.y.context("the model is class-conditional (model.num_classes > 0) but the dataset has no labels: set model.num_classes = 0")?;
                // Checked here on the host; the model checks only CPU labels.
                if let Some(emb) = &net.model.y_embedder {
                    emb.check_labels(&y).context("a batch from the dataset")?;
                }
                let y = drop_labels(&y, &world, derive(t.seed, &[2]), g, micro, &mcfg);
                // Pinned, so that the copy does not wait for the GPU.
                let y = match device {
                    Device::Cuda(_) => y.f_internal_pin_memory(device)?,
                    _ => y,
                };
                Some(y.to_device_(device, y.kind(), true, false))
            } else {
                None
            };
            let mut rng: NoiseRng = world.noise_rng(derive(t.seed, &[1]), g, micro);
            // Labels were dropped above (train = false: no second dropout).
            let denoiser = FallibleFn(|x: &Tensor, tt: &Tensor, y: Option<&Tensor>| {
                net.model.forward(x, tt, y, false)
            });
            let losses_t = dim_scan::device::autocast(amp, || {
                diffusion.training_losses(&denoiser, &x, y.as_ref(), &mut rng)
            })??;
            let loss = losses_t.loss.mean(Kind::Float) / t.grad_accum as f64;
            if m + 1 == t.grad_accum {
                // Gradients are all-reduced during this backward only.
                world.before_last_backward(&loss)?;
            }
            world.backward(&loss)?;
            step_loss += loss.detach().to_kind(Kind::Double);
        }
        unchecked = Some(match unchecked.take() {
            None => (step + 1, step_loss.shallow_clone()),
            Some((first, sum)) => (first, sum + &step_loss),
        });
        let logs = (step + 1).is_multiple_of(t.log_every) || step + 1 == t.steps;
        dist::dump_grads_if_asked(&world, step, &params)?;
        let (grad_norm, lr) = opt.step(logs)?;
        opt.zero_grad()?;
        step += 1;
        ema.update(&params, step)?;
        if step == profile_end {
            if let Some(p) = profiler.take() {
                if let Device::Cuda(i) = device {
                    tch::Cuda::synchronize(i as i64);
                }
                let path = t.out_dir.join("trace.json");
                p.finish(&path)
                    .with_context(|| format!("writing the profile {}", path.display()))?;
                tracing::info!(path = %path.display(), steps = t.profile_steps, "profile written");
            }
        }
        window.1 += t.batch_size;
        bar.set_position(step);

        if step.is_multiple_of(t.log_every) || step == t.steps {
            check_finite(&world, &mut unchecked, step, last_ckpt.as_deref())?;
            let secs = window.0.elapsed().as_secs_f64().max(1e-9);
            let rec = StepRecord {
                step,
                loss: world.mean(&step_loss)?.double_value(&[]),
                grad_norm: grad_norm.map_or(0.0, |n| n.double_value(&[])),
                lr,
                images_per_s: window.1 as f64 / secs,
                memory_mib: match device {
                    Device::Cuda(i) => cuda_peak_mib(i)?,
                    _ => rss_mib(),
                },
                elapsed_s: start.elapsed().as_secs_f64(),
            };
            window = (Instant::now(), 0);
            bar.set_message(format!("loss {:.4}", rec.loss));
            tracing::debug!(
                step,
                loss = rec.loss,
                grad_norm = rec.grad_norm,
                lr,
                images_per_s = rec.images_per_s,
                memory_mib = rec.memory_mib,
                "step"
            );
            if let Some(m) = metrics.as_mut() {
                m.write(&rec)?;
            }
        }
        // The checkpoint comes before the sample grid, so that a grid that
        // fails can never cost the run its weights; a failed grid is logged
        // and training goes on. Every rank checks (a collective); rank 0
        // alone writes.
        let grid_due = t.sample_every > 0 && step.is_multiple_of(t.sample_every);
        if (step.is_multiple_of(t.ckpt_every) && step < t.steps) || grid_due {
            check_finite(&world, &mut unchecked, step, last_ckpt.as_deref())?;
            if world.is_primary() {
                last_ckpt = Some(save(step, &net, &ema, &opt, &loader)?);
            }
        }
        if grid_due && world.is_primary() {
            let p = t.out_dir.join(format!("samples-{step:09}.png"));
            if let Err(e) = sample_grid(
                &net,
                &ema,
                &diffusion,
                &dcfg.sampler,
                t.sample_grid,
                t.seed,
                &output,
                &p,
            ) {
                tracing::error!(step, "sample grid failed ({e:#}); training goes on");
            }
        }
    }
    bar.finish_and_clear();
    check_finite(&world, &mut unchecked, step, last_ckpt.as_deref())?;
    let ck = match (&last_ckpt, checkpoint::path_for_step(&t.out_dir, step)) {
        (Some(p), q) if *p == q && p.exists() => q,
        (_, q) if !world.is_primary() => q,
        _ => save(step, &net, &ema, &opt, &loader)?,
    };
    let primary = world.is_primary();
    // No rank leaves while another may still need it (rank 0 hosts the store).
    world.finish()?;
    if interrupted {
        tracing::warn!(step, checkpoint = %ck.display(), "interrupted: checkpoint saved, resume with --resume auto");
    }
    Ok(TrainOutcome {
        step,
        checkpoint: ck,
        interrupted,
        primary,
    })
}

/// Label dropout for classifier-free guidance (as the model's own, with
/// `class_dropout_prob`), drawn per sample from its global row of micro-batch
/// `g`, so that every world size drops the same labels. `y (b)` on the host.
fn drop_labels(
    y: &Tensor,
    world: &World,
    seed: u64,
    g: u64,
    micro: i64,
    mcfg: &dim_model::ModelConfig,
) -> Tensor {
    if mcfg.class_dropout_prob <= 0.0 {
        return y.shallow_clone();
    }
    let b = y.size()[0];
    let u = world
        .noise_rng(seed, g, micro)
        .rand(&[b], Kind::Double, Device::Cpu);
    let keep = u.ge(mcfg.class_dropout_prob);
    y.where_self(
        &keep,
        &Tensor::full([b], mcfg.num_classes, (Kind::Int64, Device::Cpu)),
    )
}

/// Reads the sum of the step losses since the last check (waiting for the
/// device) and stops training if one of them was not finite, before anything
/// is written from the spoiled weights. `step`: the last step taken.
fn check_finite(
    world: &World,
    unchecked: &mut Option<(u64, Tensor)>,
    step: u64,
    last_ckpt: Option<&Path>,
) -> Result<()> {
    let Some((first, sum)) = unchecked.take() else {
        return Ok(());
    };
    // Summed over the ranks, so that all of them stop together.
    let total = world.mean(&sum)?.double_value(&[]);
    if !total.is_finite() {
        let at = if first == step {
            format!("at step {step}")
        } else {
            format!("in steps {first}..={step}")
        };
        bail!(
            "loss is {total} {at}: training stopped; the last good checkpoint ({}) is intact. Lower optim.lr, set optim.grad_clip, or use train.precision = \"f32\"",
            last_ckpt.map(|p| p.display().to_string()).unwrap_or_else(|| "none yet".into())
        );
    }
    Ok(())
}

/// Writes a grid of `n` samples from the EMA weights (the training weights
/// are put back afterwards).
fn sample_grid(
    net: &Net,
    ema: &Ema,
    diffusion: &Diffusion,
    sampler: &SamplerConfig,
    n: i64,
    seed: u64,
    output: &crate::vae::Output,
    path: &Path,
) -> Result<()> {
    let backup: Vec<Tensor> = named_params(&net.vs)
        .iter()
        .map(|(_, p)| p.detach().copy())
        .collect();
    let weights: BTreeMap<String, Tensor> = ema
        .shadow
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    swap_in(&net.vs, &weights);
    let out = crate::sample::generate(net, diffusion, sampler, n, n, None, seed, None);
    let restore: BTreeMap<String, Tensor> = named_params(&net.vs)
        .iter()
        .map(|(k, _)| k.clone())
        .zip(backup)
        .collect();
    swap_in(&net.vs, &restore);
    let written = crate::sample::write_grid(&out?, &net.cfg, output, path)?;
    tracing::info!(path = %written.display(), "sample grid");
    Ok(())
}

fn swap_in(vs: &VarStore, w: &BTreeMap<String, Tensor>) {
    tch::no_grad(|| {
        for (k, mut v) in vs.variables() {
            if let Some(src) = w.get(&k) {
                v.copy_(src);
            }
        }
    });
}

/// Peak CUDA memory allocated by libtorch on device `index` since the last
/// log line, MiB; the peak is reset so each line reports its own window.
fn cuda_peak_mib(index: usize) -> Result<f64> {
    let bytes = dim_scan::device::peak_memory_bytes(index)?;
    dim_scan::device::reset_peak_memory(index)?;
    Ok(bytes as f64 / (1024.0 * 1024.0))
}

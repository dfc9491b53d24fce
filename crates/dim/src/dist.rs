//! The training loop's view of data parallelism: which rank this process is,
//! and the few points where ranks talk (dim-dist over c10d). A single-process
//! run is a world of one, where every call here is a no-op, so `train.rs`
//! has one code path.
//!
//! Batch semantics (the same as on one GPU): `train.batch_size` is the global
//! batch of an optimizer step, split into `train.grad_accum` micro-batches;
//! each of the `W` ranks loads `batch_size / (grad_accum · W)` samples of
//! every micro-batch (dim-data's loader deals a global batch's samples out
//! round robin), gradients are averaged over the ranks once per step (on the
//! last micro-batch), so the learning rate and the EMA see exactly what one
//! process would.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use dim_dist::{DistEnv, DistError, Heartbeat, ProcessGroup, Reducer, ReducerOptions};
use tch::{Device, Kind, Tensor};

use crate::config::DistConfig;
use crate::runtime::resolve_device;

/// Set to a file path, rank 0 writes the averaged gradients of the first
/// optimizer step there (safetensors) before the update: the distributed
/// parity tests compare them with a single process's.
pub const DUMP_GRADS_ENV: &str = "DIM_DEBUG_DUMP_GRADS";

struct Group {
    env: DistEnv,
    pg: ProcessGroup,
    heartbeat: Heartbeat,
    reducer: Option<Reducer>,
}

/// The device of a rank: `cpu`, or with `auto`/`cuda` GPU `LOCAL_RANK` when
/// CUDA is available.
fn rank_device(env: &DistEnv, device_spec: &str) -> Result<Device> {
    Ok(match device_spec {
        "cpu" => Device::Cpu,
        "auto" if !tch::Cuda::is_available() => Device::Cpu,
        "auto" | "cuda" => resolve_device(&format!("cuda:{}", env.local_rank))
            .with_context(|| format!("rank {} (LOCAL_RANK {})", env.rank, env.local_rank))?,
        s => bail!(
            "device \"{s}\" with {} ranks: use \"auto\", \"cuda\" (each rank takes GPU LOCAL_RANK) or \"cpu\"",
            env.world_size
        ),
    })
}

/// This rank's share of the machine's cores: torchrun's `LOCAL_WORLD_SIZE`
/// ranks share them (a world of one, `None`, has them all). Ranks set their
/// libtorch pools to it (GPU ranks too: each rank's libtorch would otherwise
/// start a pool of all the cores, and the ranks' pools, whose OpenMP threads
/// spin after each parallel region, crowd out the threads that decode data
/// and launch the GPU work).
fn local_cores(env: Option<&DistEnv>) -> usize {
    let local_world = env.map_or(1, |env| {
        std::env::var("LOCAL_WORLD_SIZE")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(env.world_size)
            .max(1)
    });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / local_world).max(1)
}

/// One rank's share of `dim sample` (a world of one: all of it): samples
/// `start..start + count` of `num`, contiguous, at most `⌈num / W⌉` each.
pub struct SampleShard {
    pub rank: usize,
    pub start: i64,
    pub count: i64,
    pub device: Device,
    /// This rank's share of the machine's cores (all of them in a world of one).
    pub cores: usize,
    /// Gloo on the CPU: the ranks only wait for each other.
    group: Option<ProcessGroup>,
}

impl SampleShard {
    /// Ranks can finish minutes apart; a dead one is noticed at once (its
    /// socket closes).
    const WAIT: Duration = Duration::from_secs(3600);

    /// This rank's share, from torchrun's variables (see [`World::from_env`]).
    pub fn from_env(num: i64, device_spec: &str) -> Result<Self> {
        let Some(env) = DistEnv::from_env()? else {
            return Ok(Self {
                rank: 0,
                start: 0,
                count: num,
                device: resolve_device(device_spec)?,
                cores: local_cores(None),
                group: None,
            });
        };
        let device = rank_device(&env, device_spec)?;
        let cores = local_cores(Some(&env));
        // CPU ranks keep libtorch's whole pool: its convolutions round by the
        // thread count, and the outputs must not depend on the number of ranks.
        if device.is_cuda() {
            tch::set_num_threads(cores as i32);
        }
        let w = env.world_size as i64;
        let per = (num + w - 1) / w;
        let start = (env.rank as i64 * per).min(num);
        let count = per.min(num - start);
        let group = ProcessGroup::new(&env, None, Self::WAIT).with_context(|| {
            format!(
                "joining {} ranks at {}:{}",
                env.world_size, env.master_addr, env.master_port
            )
        })?;
        Ok(Self {
            rank: env.rank,
            start,
            count,
            device,
            cores,
            group: Some(group),
        })
    }

    /// Waits for every rank.
    pub fn barrier(&self) -> Result<()> {
        match &self.group {
            Some(g) => Ok(g.barrier()?),
            None => Ok(()),
        }
    }
}

/// This process's place among the data-parallel ranks.
pub struct World {
    group: Option<Group>,
}

impl World {
    /// A world of one (no collectives).
    pub fn single() -> Self {
        Self { group: None }
    }

    /// Joins the ranks named by torchrun's variables (`RANK`, `WORLD_SIZE`,
    /// `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), or a world of one when
    /// they are unset. `device_spec` is `train.device`: with CUDA, each rank
    /// takes GPU `LOCAL_RANK` and NCCL; on CPU, Gloo.
    pub fn from_env(cfg: &DistConfig, device_spec: &str) -> Result<(Self, Device)> {
        let Some(env) = DistEnv::from_env()? else {
            return Ok((Self::single(), resolve_device(device_spec)?));
        };
        let device = rank_device(&env, device_spec)?;
        if device.is_cuda() && !dim_dist::has_nccl() {
            bail!("this dim was built without NCCL (no CUDA headers at build time): it cannot train on several GPUs; rebuild it with the CUDA toolkit (cargo xtask setup)");
        }
        tch::set_num_threads(local_cores(Some(&env)) as i32);
        let timeout = Duration::from_secs_f64(cfg.timeout_s);
        let cuda = match device {
            Device::Cuda(i) => Some(i),
            _ => None,
        };
        let pg = ProcessGroup::new(&env, cuda, timeout).with_context(|| {
            format!(
                "joining {} ranks at {}:{}",
                env.world_size, env.master_addr, env.master_port
            )
        })?;
        let heartbeat = pg.heartbeat()?;
        tracing::info!(
            rank = env.rank,
            world_size = env.world_size,
            ?device,
            "data-parallel rank"
        );
        Ok((
            Self {
                group: Some(Group {
                    env,
                    pg,
                    heartbeat,
                    reducer: None,
                }),
            },
            device,
        ))
    }

    /// This rank, `0..size()`.
    pub fn rank(&self) -> usize {
        self.group.as_ref().map_or(0, |g| g.env.rank)
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.group.as_ref().map_or(1, |g| g.env.world_size)
    }

    /// Whether this rank writes checkpoints, logs and sample grids (rank 0).
    pub fn is_primary(&self) -> bool {
        self.rank() == 0
    }

    /// Samples each rank loads per micro-batch of `global_micro` samples.
    pub fn local_batch(&self, global_micro: i64, file: &str) -> Result<i64> {
        let w = self.size() as i64;
        if global_micro % w != 0 {
            bail!(
                "config {file}: train.batch_size / train.grad_accum = {global_micro} samples per micro-batch do not split over {w} ranks: make it a multiple of {w}"
            );
        }
        Ok(global_micro / w)
    }

    /// Row streams of this rank's share of global micro-batch `g` (of
    /// `global_micro` samples), for a per-sample seed: the rows a single
    /// process would draw for the same samples.
    pub fn noise_rng(&self, seed: u64, g: u64, global_micro: i64) -> dim_diffusion::NoiseRng {
        dim_diffusion::NoiseRng::with_rows(
            seed,
            g * global_micro as u64 + self.rank() as u64,
            self.size() as u64,
        )
    }

    /// A failed collective, with the rank(s) that stopped named when the
    /// heartbeat finds them.
    fn fail(&self, e: DistError) -> anyhow::Error {
        match &self.group {
            Some(g) => g.heartbeat.explain(e).into(),
            None => e.into(),
        }
    }

    /// Copies rank 0's values of `tensors` to every rank (DDP's start).
    pub fn broadcast_from_primary(&self, tensors: &[Tensor]) -> Result<()> {
        let Some(g) = &self.group else { return Ok(()) };
        let refs: Vec<&Tensor> = tensors.iter().collect();
        g.pg.broadcast(&refs, 0).map_err(|e| self.fail(e))
    }

    /// Installs DDP's gradient reducer over `params`.
    pub fn attach_reducer(&mut self, params: &[(String, Tensor)], cfg: &DistConfig) -> Result<()> {
        let Some(g) = &mut self.group else {
            return Ok(());
        };
        let opts = ReducerOptions {
            bucket_mib: cfg.bucket_mib,
            first_bucket_mib: cfg.first_bucket_mib,
            grad_as_bucket_view: cfg.grad_as_bucket_view,
            compress: cfg.compress,
        };
        let r = Reducer::new(&g.pg, params, &opts)
            .context("the gradient reducer (are the models the same on every rank?)")?;
        g.reducer = Some(r);
        Ok(())
    }

    /// Call before the backward of a step's last micro-batch: its gradients
    /// (with the earlier micro-batches' accumulated) are all-reduced in
    /// buckets during that backward.
    pub fn before_last_backward(&self, loss: &Tensor) -> Result<()> {
        let Some(g) = &self.group else { return Ok(()) };
        match &g.reducer {
            Some(r) => r.prepare_for_backward(loss).map_err(|e| self.fail(e)),
            None => Ok(()),
        }
    }

    /// `loss.backward()`; with a reducer armed, the gradient all-reduce runs
    /// (and can fail, e.g. a peer died) inside it.
    pub fn backward(&self, loss: &Tensor) -> Result<()> {
        loss.f_backward().map_err(|e| match &self.group {
            Some(g) => self.fail(DistError::C10d {
                what: "backward with gradient all-reduce",
                rank: g.env.rank,
                msg: e.to_string(),
            }),
            None => anyhow::Error::from(e).context("backward"),
        })
    }

    /// The mean over the ranks of a scalar (e.g. a step's loss).
    pub fn mean(&self, x: &Tensor) -> Result<Tensor> {
        let Some(g) = &self.group else {
            return Ok(x.shallow_clone());
        };
        let y = x.detach().copy();
        g.pg.all_reduce(&[&y], true).map_err(|e| self.fail(e))?;
        Ok(y)
    }

    /// Whether any rank wants to stop (Ctrl-C, time limit): ranks stop at
    /// the same step boundary, so none waits in a collective for the others.
    pub fn any<const N: usize>(&self, flags: [bool; N]) -> Result<[bool; N]> {
        let Some(g) = &self.group else {
            return Ok(flags);
        };
        let t = Tensor::from_slice(&flags.map(i64::from));
        g.pg.all_reduce(&[&t], false).map_err(|e| self.fail(e))?;
        let mut out = [false; N];
        for (i, o) in out.iter_mut().enumerate() {
            *o = t.int64_value(&[i as i64]) > 0;
        }
        Ok(out)
    }

    /// Waits for every rank (at the end, so no rank tears the group down
    /// while another still uses it) and ends the group cleanly.
    pub fn finish(mut self) -> Result<()> {
        let Some(g) = self.group.take() else {
            return Ok(());
        };
        let Group {
            pg,
            heartbeat,
            reducer,
            ..
        } = g;
        drop(reducer);
        // The final barrier may fail (a peer died at the very end): name it.
        pg.shutdown().map_err(|e| heartbeat.explain(e).into())
    }

    /// Maps a loader position saved by rank 0 of a run with any world size
    /// onto this rank: the next global sample is the same. `mine` is this
    /// rank's fresh loader position (its rank, world size and batch size).
    pub fn loader_position(
        &self,
        saved: &dim_data::LoaderState,
        mine: &dim_data::LoaderState,
    ) -> Result<dim_data::LoaderState> {
        let saved_global = saved.batch_size * saved.world_size;
        let my_global = mine.batch_size * mine.world_size;
        let samples = saved.step * saved_global;
        if !samples.is_multiple_of(my_global) {
            bail!(
                "the checkpoint stopped {samples} samples into an epoch, which is not a whole number of this run's micro-batches of {my_global} samples ({} per rank × {} ranks): resume with a batch size (or grad_accum) that divides it",
                mine.batch_size,
                mine.world_size
            );
        }
        if saved.world_size != mine.world_size || saved.batch_size != mine.batch_size {
            tracing::info!(
                from_world = saved.world_size,
                to_world = mine.world_size,
                samples,
                "resuming under another world size at the same sample position"
            );
        }
        Ok(dim_data::LoaderState {
            step: samples / my_global,
            rank: mine.rank,
            world_size: mine.world_size,
            batch_size: mine.batch_size,
            ..saved.clone()
        })
    }
}

/// Writes `params`' gradients to the file named by [`DUMP_GRADS_ENV`] (if
/// set) on rank 0, once.
pub fn dump_grads_if_asked(world: &World, step: u64, params: &[(String, Tensor)]) -> Result<()> {
    if step != 0 || !world.is_primary() {
        return Ok(());
    }
    let Some(path) = std::env::var_os(DUMP_GRADS_ENV) else {
        return Ok(());
    };
    let grads: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, p)| {
            (
                n.clone(),
                p.grad().to_device(Device::Cpu).to_kind(Kind::Float),
            )
        })
        .collect();
    dim_io::save(std::path::Path::new(&path), grads, &Default::default())
        .with_context(|| DUMP_GRADS_ENV.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64, batch: u64, world: u64, rank: u64) -> dim_data::LoaderState {
        dim_data::LoaderState {
            epoch: 3,
            step,
            seed: 9,
            dataset_len: 1000,
            batch_size: batch,
            rank,
            world_size: world,
        }
    }

    #[test]
    fn loader_position_keeps_the_sample_position_across_world_sizes() {
        let w = World::single();
        // 2 ranks × 8 → 4 ranks × 4: same micro-batch size, same step.
        let p = w
            .loader_position(&state(5, 8, 2, 0), &state(0, 4, 4, 3))
            .unwrap();
        assert_eq!(
            (p.epoch, p.step, p.rank, p.world_size, p.batch_size),
            (3, 5, 3, 4, 4)
        );
        // 2 ranks × 8 → 1 rank × 32 (accumulation halved): 80 samples = 2.5 batches.
        assert!(w
            .loader_position(&state(5, 8, 2, 0), &state(0, 32, 1, 0))
            .is_err());
        let p = w
            .loader_position(&state(6, 8, 2, 0), &state(0, 32, 1, 0))
            .unwrap();
        assert_eq!(p.step, 3);
    }
}

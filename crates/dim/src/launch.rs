//! `dim train|sample --gpus N` / `--nproc N`: one process per rank on this machine,
//! the way `torchrun --nproc_per_node N` starts them, with torchrun's
//! environment contract (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`). The launcher forwards
//! Ctrl-C (each rank then checkpoints at the same step and exits), and when
//! one rank dies it stops the others and exits non-zero naming that rank.
//! Multi-node jobs skip the launcher: start one `dim train` per process with
//! those variables set (docs/distributed.md).

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How the ranks are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// One CUDA device per rank (`--gpus N`): device `cuda:LOCAL_RANK`.
    Gpus(usize),
    /// `N` processes on `train.device` (`--nproc N`; CPU ranks use Gloo).
    Procs(usize),
}

/// `--gpus` / `--nproc` as given (clap keeps them exclusive).
pub fn placement(gpus: Option<usize>, nproc: Option<usize>) -> Option<Placement> {
    match (gpus, nproc) {
        (Some(n), _) => Some(Placement::Gpus(n)),
        (None, Some(n)) => Some(Placement::Procs(n)),
        (None, None) => None,
    }
}

/// Variables every rank process gets on top of the launcher's environment:
/// NVLink multicast stays off (the device machines need it), and NCCL's
/// asynchronous error handling turns a timed-out collective into an abort.
fn fixed_env() -> Vec<(&'static str, String)> {
    let mut v = vec![("NCCL_NVLS_ENABLE", "0".to_string())];
    if std::env::var_os("TORCH_NCCL_ASYNC_ERROR_HANDLING").is_none() {
        v.push(("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1".to_string()));
    }
    v
}

/// A free TCP port on this machine for rank 0's store (unless `MASTER_PORT`
/// is set). Below Linux's ephemeral range (32768–60999), as torchrun's
/// 29500: a port the kernel hands out for bind(0) can be taken by any
/// outgoing connection (the ranks' own, a previous run's) between this check
/// and rank 0's listen, which then fails with EADDRINUSE.
fn free_port() -> Result<u16> {
    const LO: u16 = 20000;
    const SPAN: u16 = 12000;
    // A start that differs between launches (several jobs on one machine).
    let start = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        (h.finish() % u64::from(SPAN)) as u16
    };
    (0..SPAN)
        .map(|i| LO + (start + i) % SPAN)
        .find(|&p| std::net::TcpListener::bind(("0.0.0.0", p)).is_ok())
        .with_context(|| {
            format!(
                "no free TCP port in {LO}..{} for the rendezvous: set MASTER_PORT",
                LO + SPAN
            )
        })
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}{}", if s == 9 { " (killed)" } else { "" }),
        _ => "an unknown status".into(),
    }
}

/// Runs `args` (a `dim train` or `dim sample` command line without
/// `--gpus/--nproc`, with the device each rank should use) as one process
/// per rank and waits for all; `stop` is the launcher's Ctrl-C flag.
pub fn run(placement: Placement, args: &[OsString], stop: Arc<AtomicBool>) -> Result<()> {
    if std::env::var_os("WORLD_SIZE").is_some() {
        bail!("WORLD_SIZE is already set (torchrun / Slurm style launch): start `dim train` without --gpus/--nproc, once per rank");
    }
    let (n, gpus) = match placement {
        Placement::Gpus(n) => (n, true),
        Placement::Procs(n) => (n, false),
    };
    if n == 0 {
        bail!("--gpus / --nproc must be at least 1");
    }
    if gpus {
        let have = tch::Cuda::device_count() as usize;
        if have < n {
            bail!("--gpus {n}: only {have} CUDA device(s) are visible (on a CPU machine use --nproc {n})");
        }
    }
    let exe = std::env::current_exe().context("finding the dim executable")?;
    let addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
    let port = match std::env::var("MASTER_PORT") {
        Ok(p) => p,
        Err(_) => free_port()?.to_string(),
    };
    tracing::info!(ranks = n, gpus, %addr, %port, "launching");
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(n);
    for rank in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", &addr)
            .env("MASTER_PORT", &port)
            .envs(fixed_env())
            // Own process group: a terminal's Ctrl-C reaches the launcher
            // alone, which forwards it once.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; the rank dies with the launcher.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut children);
                return Err(e).with_context(|| format!("starting rank {rank}"));
            }
        };
        children.push((rank, child));
    }
    let mut forwarded = false;
    let mut done = vec![false; n];
    loop {
        if stop.load(Ordering::SeqCst) && !forwarded {
            forwarded = true;
            for (_, c) in &children {
                // SAFETY: plain kill(2) on our own child.
                unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            }
        }
        for (rank, child) in children.iter_mut() {
            if done[*rank] {
                continue;
            }
            if let Some(status) = child.try_wait().context("waiting for a rank")? {
                done[*rank] = true;
                if !status.success() {
                    let r = *rank;
                    stop_all(&mut children);
                    bail!(
                        "rank {r} of {n} failed ({}); the other ranks were stopped. The last checkpoint written is intact: continue with --resume auto",
                        describe(status)
                    );
                }
            }
        }
        if done.iter().all(|d| *d) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM to every rank still running, then SIGKILL after a grace period;
/// reaps them all so no process is left.
fn stop_all(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter() {
        // SAFETY: kill(2) on our own child (an exited one is a no-op).
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (_, c) in children.iter_mut() {
        loop {
            match c.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

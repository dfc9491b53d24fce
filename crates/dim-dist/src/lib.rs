//! Data-parallel training on c10d, the collective engine inside libtorch that
//! PyTorch's `DistributedDataParallel` uses, driven through a small C++ shim
//! (`csrc/dist.cpp`):
//!
//! - [`ProcessGroup`]: a `TCPStore` rendezvous (rank 0 hosts it) and a c10d
//!   process group, Gloo for CPU tensors and NCCL for CUDA tensors;
//! - [`ProcessGroup::broadcast`] (parameters from rank 0 at start) and
//!   [`ProcessGroup::all_reduce`] (losses for logging);
//! - [`Reducer`]: c10d's `Reducer`, DDP's bucketing engine: gradient hooks
//!   launch each bucket's all-reduce while the backward still runs, and the
//!   end of the backward waits for them and writes averaged gradients;
//! - [`Heartbeat`]: each rank bumps a counter in the store every second, so
//!   when a collective fails the survivors can say which rank stopped.
//!
//! The environment contract is torchrun's ([`DistEnv::from_env`]).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::Tensor;

/// Errors of the distributed layer.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A torchrun-style environment variable is missing or malformed.
    #[error("environment variable {var}: {msg}")]
    Env { var: &'static str, msg: String },
    /// c10d reported a failure (rendezvous, collective, timeout, dead peer).
    #[error("{what} failed on rank {rank}: {msg}")]
    C10d {
        what: &'static str,
        rank: usize,
        msg: String,
    },
    /// A rank stopped making progress (found by the heartbeat); `msg` names it.
    #[error("{msg}")]
    PeerLost { rank: usize, msg: String },
}

pub type Result<T> = std::result::Result<T, DistError>;

const ERR_LEN: usize = 4096;

extern "C" {
    fn dim_dist_group_new(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        cuda: c_int,
        timeout_ms: i64,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn dim_dist_group_free(g: *mut c_void);
    fn dim_dist_group_shutdown(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn dim_dist_store_clone(
        g: *mut c_void,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn dim_dist_store_free(s: *mut c_void);
    fn dim_dist_store_add(
        s: *mut c_void,
        key: *const c_char,
        delta: i64,
        value: *mut i64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn dim_dist_broadcast(
        g: *mut c_void,
        ts: *const *mut c_void,
        n: usize,
        root: c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn dim_dist_allreduce(
        g: *mut c_void,
        ts: *const *mut c_void,
        n: usize,
        op: c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn dim_dist_barrier(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn dim_dist_reducer_new(
        g: *mut c_void,
        ps: *const *mut c_void,
        n: usize,
        names: *const *const c_char,
        bucket_bytes: i64,
        first_bucket_bytes: i64,
        bucket_view: c_int,
        compress: c_int,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn dim_dist_reducer_free(r: *mut c_void);
    fn dim_dist_reducer_prepare(
        r: *mut c_void,
        output: *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn dim_dist_has_nccl() -> c_int;
}

/// Whether this build can drive NCCL (CUDA process groups).
pub fn has_nccl() -> bool {
    unsafe { dim_dist_has_nccl() != 0 }
}

/// Runs a shim call with an error buffer; a failure becomes [`DistError::C10d`].
fn call(
    what: &'static str,
    rank: usize,
    f: impl FnOnce(*mut c_char, usize) -> c_int,
) -> Result<()> {
    let mut err = vec![0 as c_char; ERR_LEN];
    if f(err.as_mut_ptr(), ERR_LEN) == 0 {
        return Ok(());
    }
    let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
        .to_string_lossy()
        .trim()
        .to_string();
    Err(DistError::C10d { what, rank, msg })
}

fn handles(ts: &[&Tensor]) -> Vec<*mut c_void> {
    ts.iter().map(|t| t.as_ptr() as *mut c_void).collect()
}

/// The torchrun environment contract: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
/// `MASTER_ADDR`, `MASTER_PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank in `0..world_size`.
    pub rank: usize,
    /// Number of processes over all nodes.
    pub world_size: usize,
    /// Rank within this node: the GPU index this process uses.
    pub local_rank: usize,
    /// Host of rank 0's TCPStore.
    pub master_addr: String,
    /// Port of rank 0's TCPStore.
    pub master_port: u16,
}

impl DistEnv {
    /// Reads the torchrun variables; `Ok(None)` when `WORLD_SIZE` is unset
    /// (a single-process run). `MASTER_ADDR` defaults to `127.0.0.1`,
    /// `MASTER_PORT` to 29500 and `LOCAL_RANK` to `RANK`.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`DistEnv::from_env`] over any variable source (testable).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(world) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        fn num<T: std::str::FromStr>(var: &'static str, v: &str) -> Result<T> {
            v.trim().parse().map_err(|_| DistError::Env {
                var,
                msg: format!("`{v}` is not a non-negative integer"),
            })
        }
        let world_size: usize = num("WORLD_SIZE", &world)?;
        if world_size == 0 {
            return Err(DistError::Env {
                var: "WORLD_SIZE",
                msg: "must be at least 1".into(),
            });
        }
        let rank: usize = match get("RANK") {
            Some(r) => num("RANK", &r)?,
            None => {
                return Err(DistError::Env {
                    var: "RANK",
                    msg: "missing (WORLD_SIZE is set)".into(),
                })
            }
        };
        if rank >= world_size {
            return Err(DistError::Env {
                var: "RANK",
                msg: format!("{rank} is not below WORLD_SIZE {world_size}"),
            });
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(r) => num("LOCAL_RANK", &r)?,
            None => rank,
        };
        let master_port = match get("MASTER_PORT") {
            Some(p) => num("MASTER_PORT", &p)?,
            None => 29500,
        };
        Ok(Some(Self {
            rank,
            world_size,
            local_rank,
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
        }))
    }
}

/// A c10d process group over all ranks: Gloo for CPU tensors and, with a
/// CUDA device, NCCL for CUDA tensors (NCCL is then the default backend).
#[derive(Debug)]
pub struct ProcessGroup {
    raw: *mut c_void,
    rank: usize,
    world_size: usize,
    timeout: Duration,
}

// The c10d group is used from the training thread only; the heartbeat has its
// own store connection.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Rendezvous at `env.master_addr:master_port` and build the group.
    /// `cuda`: this rank's CUDA device index (made the current device), or
    /// `None` for a CPU-only (Gloo) group. `timeout` bounds the rendezvous
    /// and every collective: a peer that dies or hangs makes the others fail
    /// within it.
    pub fn new(env: &DistEnv, cuda: Option<usize>, timeout: Duration) -> Result<Self> {
        let host = CString::new(env.master_addr.clone()).map_err(|_| DistError::Env {
            var: "MASTER_ADDR",
            msg: "contains a NUL byte".into(),
        })?;
        let mut raw = std::ptr::null_mut();
        call("rendezvous", env.rank, |e, l| unsafe {
            dim_dist_group_new(
                host.as_ptr(),
                env.master_port as c_int,
                env.rank as c_int,
                env.world_size as c_int,
                cuda.map_or(-1, |i| i as c_int),
                timeout.as_millis() as i64,
                &mut raw,
                e,
                l,
            )
        })?;
        tracing::info!(
            rank = env.rank,
            world_size = env.world_size,
            backend = if cuda.is_some() { "nccl" } else { "gloo" },
            "process group ready"
        );
        Ok(Self {
            raw,
            rank: env.rank,
            world_size: env.world_size,
            timeout,
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The collective timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Copies rank `root`'s values of `tensors` (any shapes, one device) into
    /// every rank's, in place; waits for the result.
    pub fn broadcast(&self, tensors: &[&Tensor], root: usize) -> Result<()> {
        let h = handles(tensors);
        call("broadcast", self.rank, |e, l| unsafe {
            dim_dist_broadcast(self.raw, h.as_ptr(), h.len(), root as c_int, e, l)
        })
    }

    /// Sums (or, with `average`, averages) `tensors` over the ranks in place;
    /// waits for the result.
    pub fn all_reduce(&self, tensors: &[&Tensor], average: bool) -> Result<()> {
        let h = handles(tensors);
        call("all-reduce", self.rank, |e, l| unsafe {
            dim_dist_allreduce(self.raw, h.as_ptr(), h.len(), average as c_int, e, l)
        })
    }

    /// Waits until every rank gets here.
    pub fn barrier(&self) -> Result<()> {
        call("barrier", self.rank, |e, l| unsafe {
            dim_dist_barrier(self.raw, e, l)
        })
    }

    /// Waits for every rank, then ends the group cleanly (NCCL
    /// communicators finalised). Dropping a group without it aborts the
    /// communicators instead (the path taken after a failure).
    pub fn shutdown(self) -> Result<()> {
        self.barrier()?;
        call(
            "shutting the process group down",
            self.rank,
            |e, l| unsafe { dim_dist_group_shutdown(self.raw, e, l) },
        )
    }

    /// Starts a [`Heartbeat`] on its own store connection.
    pub fn heartbeat(&self) -> Result<Heartbeat> {
        Heartbeat::start(self)
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        unsafe { dim_dist_group_free(self.raw) }
    }
}

/// How gradients travel over the wire in the all-reduce.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    /// f32, as computed: the result equals one process's to rounding.
    #[default]
    None,
    /// f16 (half the bytes): 11-bit significand, range to 65,504 (the
    /// bucket is averaged before the sum, so it overflows only where a
    /// gradient itself would).
    F16,
    /// bf16 (half the bytes): f32's range, 8-bit significand.
    Bf16,
}

/// The knobs of [`Reducer`], as DDP's constructor arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct ReducerOptions {
    /// Gradient bucket size, MiB (DDP's `bucket_cap_mb`, 25).
    pub bucket_mib: f64,
    /// The first bucket (the last layers' gradients, which the backward
    /// produces first), MiB, so communication starts early.
    pub first_bucket_mib: f64,
    /// DDP's `gradient_as_bucket_view`: `.grad` becomes a view into its
    /// bucket, saving a copy of every gradient per step (default true).
    pub grad_as_bucket_view: bool,
    /// Wire type of the all-reduce (a communication hook when not f32).
    pub compress: Compress,
}

impl Default for ReducerOptions {
    fn default() -> Self {
        Self {
            bucket_mib: 25.0,
            first_bucket_mib: 1.0,
            // Unlike DDP (false, for old user code that swaps `.grad`):
            // nothing here does, and on 2 H200s it trains DiT-XL/2 2-3%
            // faster (docs/benchmarks/distributed.md).
            grad_as_bucket_view: true,
            compress: Compress::None,
        }
    }
}

/// DDP's gradient reducer (c10d `Reducer`) over a model's parameters.
///
/// Per optimizer step: run the forward and backward of every micro-batch but
/// the last as usual (gradients accumulate locally, nothing is sent), call
/// [`Reducer::prepare_for_backward`] with the last micro-batch's loss, then
/// its backward: bucketed all-reduces start from autograd hooks as buckets
/// fill, and when `backward()` returns each `.grad` holds the average over
/// the ranks of the accumulated gradients.
#[derive(Debug)]
pub struct Reducer {
    raw: *mut c_void,
    rank: usize,
    // Keeps the parameters alive as long as the reducer's hooks point at them.
    _params: Vec<Tensor>,
}

impl Reducer {
    /// `params`: `(name, leaf tensor requiring grad)` in creation order, the
    /// same on every rank (checked); `opts`: bucket sizes, gradient views,
    /// compression ([`ReducerOptions`]).
    pub fn new(
        group: &ProcessGroup,
        params: &[(String, Tensor)],
        opts: &ReducerOptions,
    ) -> Result<Self> {
        let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
        let refs: Vec<&Tensor> = tensors.iter().collect();
        let h = handles(&refs);
        let names: Vec<CString> = params
            .iter()
            .map(|(n, _)| CString::new(n.replace('\0', "")).unwrap_or_default())
            .collect();
        let name_ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
        let mib = |m: f64| (m * 1024.0 * 1024.0) as i64;
        let compress = match opts.compress {
            Compress::None => 0,
            Compress::F16 => 1,
            Compress::Bf16 => 2,
        };
        let mut raw = std::ptr::null_mut();
        call("creating the gradient reducer", group.rank, |e, l| unsafe {
            dim_dist_reducer_new(
                group.raw,
                h.as_ptr(),
                h.len(),
                name_ptrs.as_ptr(),
                mib(opts.bucket_mib),
                mib(opts.first_bucket_mib),
                c_int::from(opts.grad_as_bucket_view),
                compress,
                &mut raw,
                e,
                l,
            )
        })?;
        Ok(Self {
            raw,
            rank: group.rank,
            _params: tensors,
        })
    }

    /// Arms the gradient hooks for the next backward, whose root is `loss`.
    pub fn prepare_for_backward(&self, loss: &Tensor) -> Result<()> {
        call("gradient all-reduce", self.rank, |e, l| unsafe {
            dim_dist_reducer_prepare(self.raw, loss.as_ptr() as *mut c_void, e, l)
        })
    }
}

impl Drop for Reducer {
    fn drop(&mut self) {
        unsafe { dim_dist_reducer_free(self.raw) }
    }
}

/// Liveness counters in the rendezvous store: a thread bumps
/// `hb/<rank>` every [`Heartbeat::PERIOD`]. After a failed collective,
/// [`Heartbeat::stalled_ranks`] tells which peers stopped.
#[derive(Debug)]
pub struct Heartbeat {
    store: Arc<StoreConn>,
    rank: usize,
    world_size: usize,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct StoreConn(*mut c_void);
// One request at a time: the heartbeat thread and `stalled_ranks` take turns
// through the mutex in `add`.
unsafe impl Send for StoreConn {}
unsafe impl Sync for StoreConn {}

static STORE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl StoreConn {
    fn add(&self, key: &str, delta: i64) -> std::result::Result<i64, String> {
        let _g = STORE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let key = CString::new(key).map_err(|e| e.to_string())?;
        let mut value = 0i64;
        let mut err = vec![0 as c_char; ERR_LEN];
        let rc = unsafe {
            dim_dist_store_add(
                self.0,
                key.as_ptr(),
                delta,
                &mut value,
                err.as_mut_ptr(),
                ERR_LEN,
            )
        };
        if rc == 0 {
            Ok(value)
        } else {
            Err(unsafe { CStr::from_ptr(err.as_ptr()) }
                .to_string_lossy()
                .into_owned())
        }
    }
}

impl Drop for StoreConn {
    fn drop(&mut self) {
        unsafe { dim_dist_store_free(self.0) }
    }
}

impl Heartbeat {
    /// How often each rank bumps its counter.
    pub const PERIOD: Duration = Duration::from_millis(500);

    fn start(group: &ProcessGroup) -> Result<Self> {
        let mut raw = std::ptr::null_mut();
        call("connecting to the store", group.rank, |e, l| unsafe {
            dim_dist_store_clone(group.raw, &mut raw, e, l)
        })?;
        let store = Arc::new(StoreConn(raw));
        let stop = Arc::new(AtomicBool::new(false));
        let key = group.rank.to_string();
        let thread = {
            let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("dim-heartbeat".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if store.add(&key, 1).is_err() {
                            break;
                        }
                        std::thread::sleep(Self::PERIOD);
                    }
                })
                .map_err(|e| DistError::C10d {
                    what: "starting the heartbeat",
                    rank: group.rank,
                    msg: e.to_string(),
                })?
        };
        Ok(Self {
            store,
            rank: group.rank,
            world_size: group.world_size,
            stop,
            thread: Some(thread),
        })
    }

    /// The peers whose counters did not move for four periods, or `Err`
    /// naming rank 0 when the store (which rank 0 hosts) is unreachable.
    pub fn stalled_ranks(&self) -> std::result::Result<Vec<usize>, DistError> {
        let read = |r: usize| self.store.add(&r.to_string(), 0);
        let peers: Vec<usize> = (0..self.world_size).filter(|&r| r != self.rank).collect();
        let lost = |msg: String| DistError::PeerLost {
            rank: 0,
            msg: format!(
                "the rendezvous store that rank 0 hosts is unreachable ({msg}): rank 0 has stopped"
            ),
        };
        let before: Vec<i64> = peers
            .iter()
            .map(|&r| read(r))
            .collect::<std::result::Result<_, _>>()
            .map_err(lost)?;
        let deadline = Instant::now() + Self::PERIOD * 4;
        while Instant::now() < deadline {
            std::thread::sleep(Self::PERIOD / 2);
        }
        let after: Vec<i64> = peers
            .iter()
            .map(|&r| read(r))
            .collect::<std::result::Result<_, _>>()
            .map_err(lost)?;
        Ok(peers
            .into_iter()
            .zip(before.into_iter().zip(after))
            .filter(|(_, (b, a))| a == b)
            .map(|(r, _)| r)
            .collect())
    }

    /// Turns a failed collective into an error that names the stopped
    /// rank(s) when the heartbeat finds them.
    pub fn explain(&self, err: DistError) -> DistError {
        match self.stalled_ranks() {
            Ok(stalled) if !stalled.is_empty() => {
                let names: Vec<String> = stalled.iter().map(|r| r.to_string()).collect();
                DistError::PeerLost {
                    rank: stalled[0],
                    msg: format!(
                        "rank(s) {} stopped responding (crashed, killed or hung); this rank ({}) gives up: {err}",
                        names.join(", "),
                        self.rank
                    ),
                }
            }
            Ok(_) => err,
            Err(lost) => DistError::PeerLost {
                rank: 0,
                msg: format!("{lost}; this rank ({}) gives up: {err}", self.rank),
            },
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Option<DistEnv>> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_lookup(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn torchrun_env_contract() {
        assert_eq!(env(&[]).unwrap(), None);
        let e = env(&[
            ("WORLD_SIZE", "8"),
            ("RANK", "5"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            e,
            DistEnv {
                rank: 5,
                world_size: 8,
                local_rank: 1,
                master_addr: "node0".into(),
                master_port: 1234
            }
        );
        let e = env(&[("WORLD_SIZE", "2"), ("RANK", "1")]).unwrap().unwrap();
        assert_eq!(
            (e.local_rank, e.master_port, e.master_addr.as_str()),
            (1, 29500, "127.0.0.1")
        );
        assert!(env(&[("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string()
            .contains("RANK"));
        assert!(env(&[("WORLD_SIZE", "2"), ("RANK", "2")]).is_err());
        assert!(env(&[("WORLD_SIZE", "x"), ("RANK", "0")])
            .unwrap_err()
            .to_string()
            .contains("WORLD_SIZE"));
    }

    /// A one-rank group exercises the whole shim (store, Gloo, reducer) in
    /// one process; the two-process behaviour is tested by `dim`'s
    /// `tests/distributed.rs`.
    #[test]
    fn single_rank_group_reduces_gradients() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let env = DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        };
        let pg = ProcessGroup::new(&env, None, Duration::from_secs(20)).unwrap();
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        pg.all_reduce(&[&t], false).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, 2.0, 3.0]);
        pg.broadcast(&[&t], 0).unwrap();
        pg.barrier().unwrap();

        // Every wire type and both gradient layouts; the tolerance is the
        // wire type's rounding of gradients of size ~10.
        let variants = [
            (false, Compress::None, 1e-5),
            (true, Compress::None, 1e-5),
            (false, Compress::F16, 2e-2),
            (true, Compress::Bf16, 2e-1),
        ];
        for (grad_as_bucket_view, compress, tol) in variants {
            let w = Tensor::randn([5, 3], tch::kind::FLOAT_CPU).set_requires_grad(true);
            let b = Tensor::randn([5], tch::kind::FLOAT_CPU).set_requires_grad(true);
            let opts = ReducerOptions {
                grad_as_bucket_view,
                compress,
                ..ReducerOptions::default()
            };
            let reducer = Reducer::new(
                &pg,
                &[
                    ("w".into(), w.shallow_clone()),
                    ("b".into(), b.shallow_clone()),
                ],
                &opts,
            )
            .unwrap();
            let x = Tensor::randn([4, 3], tch::kind::FLOAT_CPU);
            for step in 0..3 {
                // Two micro-batches; only the second is reduced.
                let l1 = (x.matmul(&w.tr()) + &b).square().sum(tch::Kind::Float);
                l1.backward();
                let l2 = (x.matmul(&w.tr()) + &b).sin().sum(tch::Kind::Float);
                reducer.prepare_for_backward(&l2).unwrap();
                l2.backward();
                // Reference: both losses' gradients, by autograd directly.
                let (gw, gb) = {
                    let wr = w.detach().set_requires_grad(true);
                    let br = b.detach().set_requires_grad(true);
                    let l = (x.matmul(&wr.tr()) + &br).square().sum(tch::Kind::Float)
                        + (x.matmul(&wr.tr()) + &br).sin().sum(tch::Kind::Float);
                    l.backward();
                    (wr.grad(), br.grad())
                };
                let err = (w.grad() - gw).abs().max().double_value(&[])
                    + (b.grad() - gb).abs().max().double_value(&[]);
                assert!(err < tol, "{opts:?}, step {step}: grad error {err}");
                tch::no_grad(|| {
                    let _ = w.grad().zero_();
                    let _ = b.grad().zero_();
                });
            }
            drop(reducer);
        }
        let hb = pg.heartbeat().unwrap();
        assert_eq!(hb.stalled_ranks().unwrap(), Vec::<usize>::new());
        drop(hb);
        pg.shutdown().unwrap();
    }
}

//! The batch loader: background workers, a bounded prefetch window, batches
//! in a deterministic order, exact resume and multi-GPU sharding.
//!
//! Everything random is a function of (seed, epoch, index): the epoch's
//! permutation of the dataset and each sample's augmentation seed. Workers
//! load whole batches and the loader re-orders their results by sequence
//! number, so the batches do not depend on the worker count or on timing.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::dataset::Dataset;
use crate::error::{DataError, Result};
use crate::rng::{derive, Rng};

/// What to do when one sample cannot be read or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorPolicy {
    /// Yield the error (naming the file) and end the stream.
    #[default]
    Stop,
    /// Log the file, drop the sample from its batch (which then holds fewer
    /// samples) and count it; see [`Loader::skipped`].
    Skip,
}

/// Loader settings, usually the `[loader]` table of a training config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoaderConfig {
    /// Samples per batch on this rank.
    pub batch_size: usize,
    /// Background worker threads; 0 loads on the calling thread.
    pub workers: usize,
    /// Batches loaded ahead of the consumer (bounded queue depth, ≥ 1).
    pub prefetch: usize,
    /// Seed of the shuffles and of every sample's augmentation.
    pub seed: u64,
    /// Shuffle each epoch (a new permutation per epoch).
    pub shuffle: bool,
    /// Drop the last incomplete batch (and, across ranks, the remainder that
    /// does not divide evenly) instead of yielding a short batch (padding the
    /// ranks by repeating samples, as PyTorch's `DistributedSampler`).
    pub drop_last: bool,
    /// This process's rank in `0..world_size`.
    pub rank: usize,
    /// Number of data-parallel processes.
    pub world_size: usize,
    /// Bad-sample policy.
    pub on_error: ErrorPolicy,
    /// Put batches in pinned (page-locked) memory when CUDA is available, so
    /// host-to-device copies can run asynchronously.
    pub pin_memory: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 64,
            workers: 2,
            prefetch: 4,
            seed: 0,
            shuffle: true,
            drop_last: true,
            rank: 0,
            world_size: 1,
            on_error: ErrorPolicy::Stop,
            pin_memory: true,
        }
    }
}

impl LoaderConfig {
    /// Checks the settings; errors name the key under `prefix` (e.g. `loader`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        DataError::require_counts(
            prefix,
            &[
                ("batch_size", self.batch_size),
                ("prefetch", self.prefetch),
                ("world_size", self.world_size),
            ],
        )?;
        if self.rank >= self.world_size {
            return Err(DataError::config(
                format!("{prefix}.rank"),
                format!("{} is not below world_size {}", self.rank, self.world_size),
            ));
        }
        Ok(())
    }
}

/// A saved loader position: the next batch to yield. Serialise it with the
/// checkpoint and pass it to [`Loader::resume`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// Epoch of the next batch.
    pub epoch: u64,
    /// Index of the next batch within the epoch.
    pub step: u64,
    /// The loader seed (must match on resume).
    pub seed: u64,
    /// Dataset length when saved (must match on resume).
    pub dataset_len: u64,
    /// Batch size when saved (must match on resume).
    pub batch_size: u64,
    /// Rank when saved (must match on resume).
    pub rank: u64,
    /// World size when saved (must match on resume).
    pub world_size: u64,
}

/// One batch.
#[derive(Debug)]
pub struct Batch {
    /// Stacked samples, `(B, C, H, W)` or `(B, C, T, H, W)`, `f32` in `[-1, 1]`.
    pub x: Tensor,
    /// Labels `(B)` `i64`, when the source has them.
    pub y: Option<Tensor>,
    /// Dataset index of each row of `x`.
    pub indices: Vec<usize>,
    /// Epoch this batch belongs to.
    pub epoch: u64,
    /// Position of this batch within the epoch.
    pub step: u64,
    /// Samples of this batch dropped under [`ErrorPolicy::Skip`].
    pub skipped: usize,
}

struct Job {
    seq: u64,
    epoch: u64,
    step: u64,
    indices: Vec<usize>,
}

/// A loaded batch (`None` when every sample was skipped) and its skip count.
type Loaded = Result<(Option<Batch>, u64)>;
type Done = (u64, Loaded);

/// Loads batches from a [`Dataset`] as an endless stream across epochs.
///
/// Pull batches with [`Loader::next_batch`] (an endless stream, so that
/// [`Loader::position`] can be read between batches), or iterate one epoch
/// with [`Loader::epoch_batches`]. `Loader` is deliberately not an
/// `Iterator`: `Iterator::position` would shadow [`Loader::position`].
/// Dropping the loader stops its workers.
pub struct Loader {
    dataset: Arc<dyn Dataset>,
    config: LoaderConfig,
    len: usize,
    batches_per_epoch: u64,
    /// Next (epoch, step) to dispatch and to yield.
    dispatch_pos: (u64, u64),
    yield_pos: (u64, u64),
    next_seq: u64,
    yield_seq: u64,
    in_flight: usize,
    pending: BTreeMap<u64, Loaded>,
    plan: Option<(u64, Arc<Vec<usize>>)>,
    jobs: Option<Sender<Job>>,
    results: Option<Receiver<Done>>,
    handles: Vec<JoinHandle<()>>,
    skipped: u64,
    skipped_logged: u64,
    failed: bool,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("dataset", &self.dataset.describe())
            .field("config", &self.config)
            .field("position", &self.position())
            .finish()
    }
}

impl Loader {
    /// Starts `config.workers` threads over `dataset`. Fails on an invalid
    /// config or when the dataset yields no batch at all.
    pub fn new(dataset: Arc<dyn Dataset>, config: LoaderConfig) -> Result<Self> {
        config.validate("loader")?;
        let len = dataset.len();
        let per_rank = if config.drop_last {
            len / config.world_size
        } else {
            len.div_ceil(config.world_size)
        };
        let batches_per_epoch = if config.drop_last {
            per_rank / config.batch_size
        } else {
            per_rank.div_ceil(config.batch_size)
        } as u64;
        if batches_per_epoch == 0 {
            return Err(DataError::config(
                "loader.batch_size",
                format!(
                    "{} has {len} samples: no batch of {} per rank on {} rank(s) (lower batch_size or set drop_last = false)",
                    dataset.describe(),
                    config.batch_size,
                    config.world_size
                ),
            ));
        }
        let (jobs, results, handles) = if config.workers == 0 {
            (None, None, Vec::new())
        } else {
            let (job_tx, job_rx) = channel::<Job>();
            let (done_tx, done_rx) = channel::<Done>();
            let job_rx = Arc::new(Mutex::new(job_rx));
            let handles = (0..config.workers)
                .map(|w| {
                    let job_rx = Arc::clone(&job_rx);
                    let done_tx = done_tx.clone();
                    let dataset = Arc::clone(&dataset);
                    let config = config.clone();
                    std::thread::Builder::new()
                        .name(format!("dim-data-{w}"))
                        .spawn(move || worker(job_rx, done_tx, dataset, config))
                        .map_err(|e| DataError::Worker(format!("cannot spawn a thread: {e}")))
                })
                .collect::<Result<Vec<_>>>()?;
            (Some(job_tx), Some(done_rx), handles)
        };
        tracing::info!(
            dataset = %dataset.describe(),
            len,
            batches_per_epoch,
            workers = config.workers,
            "loader ready"
        );
        Ok(Self {
            dataset,
            config,
            len,
            batches_per_epoch,
            dispatch_pos: (0, 0),
            yield_pos: (0, 0),
            next_seq: 0,
            yield_seq: 0,
            in_flight: 0,
            pending: BTreeMap::new(),
            plan: None,
            jobs,
            results,
            handles,
            skipped: 0,
            skipped_logged: 0,
            failed: false,
        })
    }

    /// Batches per epoch on this rank.
    pub fn batches_per_epoch(&self) -> u64 {
        self.batches_per_epoch
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }

    /// The settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// Samples dropped under [`ErrorPolicy::Skip`] in the batches yielded so
    /// far (prefetched batches are not counted until they are yielded).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The position of the next batch; save it to resume later.
    pub fn position(&self) -> LoaderState {
        LoaderState {
            epoch: self.yield_pos.0,
            step: self.yield_pos.1,
            seed: self.config.seed,
            dataset_len: self.len as u64,
            batch_size: self.config.batch_size as u64,
            rank: self.config.rank as u64,
            world_size: self.config.world_size as u64,
        }
    }

    /// Continues from a saved position: the next batch is exactly the one an
    /// uninterrupted run would have yielded there. Batches already prefetched
    /// are discarded. Fails if the state was saved with a different seed,
    /// dataset size, batch size or sharding.
    pub fn resume(&mut self, state: &LoaderState) -> Result<()> {
        let mine = self.position();
        let checks = [
            ("seed", state.seed, mine.seed),
            ("dataset length", state.dataset_len, mine.dataset_len),
            ("batch size", state.batch_size, mine.batch_size),
            ("rank", state.rank, mine.rank),
            ("world size", state.world_size, mine.world_size),
        ];
        for (what, saved, now) in checks {
            if saved != now {
                return Err(DataError::Resume(format!(
                    "the state was saved with {what} {saved}, this loader has {now}"
                )));
            }
        }
        if state.step > self.batches_per_epoch {
            return Err(DataError::Resume(format!(
                "step {} is past the {} batches of an epoch",
                state.step, self.batches_per_epoch
            )));
        }
        let pos = normalise((state.epoch, state.step), self.batches_per_epoch);
        self.dispatch_pos = pos;
        self.yield_pos = pos;
        // Results of earlier jobs still in flight are recognised by their
        // sequence numbers and dropped.
        self.yield_seq = self.next_seq;
        self.pending.clear();
        self.failed = false;
        Ok(())
    }

    /// This rank's dataset indices for `epoch`, in order.
    pub fn epoch_indices(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.config.shuffle {
            Rng::new(derive(self.config.seed, &[epoch])).shuffle(&mut order);
        }
        let ws = self.config.world_size;
        if self.config.drop_last {
            order.truncate(self.len / ws * ws);
        } else {
            let padded = self.len.div_ceil(ws) * ws;
            for i in 0..padded - self.len {
                order.push(order[i % self.len]);
            }
        }
        order
            .into_iter()
            .skip(self.config.rank)
            .step_by(ws)
            .collect()
    }

    fn make_job(&mut self) -> Job {
        let (epoch, step) = self.dispatch_pos;
        let plan = match &self.plan {
            Some((e, p)) if *e == epoch => Arc::clone(p),
            _ => {
                let p = Arc::new(self.epoch_indices(epoch));
                self.plan = Some((epoch, Arc::clone(&p)));
                p
            }
        };
        let bs = self.config.batch_size;
        let start = step as usize * bs;
        let end = (start + bs).min(plan.len());
        let job = Job {
            seq: self.next_seq,
            epoch,
            step,
            indices: plan[start..end].to_vec(),
        };
        self.next_seq += 1;
        self.dispatch_pos = normalise((epoch, step + 1), self.batches_per_epoch);
        job
    }

    /// The next batch, crossing into the next epoch at the end of one.
    /// `None` only after an error under [`ErrorPolicy::Stop`] (until
    /// [`Loader::resume`]).
    pub fn next_batch(&mut self) -> Option<Result<Batch>> {
        if self.failed {
            return None;
        }
        loop {
            let outcome = if self.jobs.is_none() {
                let job = self.make_job();
                self.yield_seq = self.next_seq;
                load_batch(&*self.dataset, &self.config, job)
            } else {
                match self.next_from_workers() {
                    Ok(r) => r,
                    Err(e) => {
                        self.failed = true;
                        return Some(Err(e));
                    }
                }
            };
            let (epoch, step) = self.yield_pos;
            self.yield_pos = normalise((epoch, step + 1), self.batches_per_epoch);
            if let Ok((_, skipped)) = &outcome {
                self.skipped += skipped;
            }
            if self.yield_pos.0 != epoch {
                self.log_skips(epoch);
            }
            match outcome {
                Ok((Some(batch), _)) => return Some(Ok(batch)),
                // Every sample of the batch was skipped: go on to the next.
                Ok((None, _)) => continue,
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }

    fn next_from_workers(&mut self) -> Result<Loaded> {
        let want = self.yield_seq;
        loop {
            if let Some(r) = self.pending.remove(&want) {
                self.yield_seq += 1;
                return Ok(r);
            }
            // Top up inside the loop: after a resume the window may be full of
            // stale jobs, and the wanted one is only sent as they drain.
            while self.in_flight < self.config.prefetch {
                let job = self.make_job();
                self.in_flight += 1;
                if let Some(tx) = &self.jobs {
                    tx.send(job)
                        .map_err(|_| DataError::Worker("all loader workers have exited".into()))?;
                }
            }
            let rx = self.results.as_ref().expect("workers exist when jobs do");
            let (seq, r) = rx
                .recv()
                .map_err(|_| DataError::Worker("all loader workers have exited".into()))?;
            self.in_flight -= 1;
            if seq >= want {
                self.pending.insert(seq, r);
            }
        }
    }

    fn log_skips(&mut self, epoch: u64) {
        let total = self.skipped();
        if total > self.skipped_logged {
            tracing::warn!(
                epoch,
                skipped = total - self.skipped_logged,
                total,
                "bad samples skipped"
            );
            self.skipped_logged = total;
        }
    }

    /// The remaining batches of the current epoch.
    pub fn epoch_batches(&mut self) -> EpochBatches<'_> {
        let epoch = self.yield_pos.0;
        EpochBatches {
            loader: self,
            epoch,
        }
    }
}

/// Iterator over the rest of one epoch; see [`Loader::epoch_batches`].
#[derive(Debug)]
pub struct EpochBatches<'a> {
    loader: &'a mut Loader,
    epoch: u64,
}

impl Iterator for EpochBatches<'_> {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.loader.yield_pos.0 != self.epoch {
            return None;
        }
        let r = self.loader.next_batch()?;
        // A fully skipped tail batch may carry us into the next epoch.
        if let Ok(b) = &r {
            if b.epoch != self.epoch {
                return None;
            }
        }
        Some(r)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the job channel ends each worker after its current batch.
        self.jobs = None;
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn normalise((epoch, step): (u64, u64), per_epoch: u64) -> (u64, u64) {
    if step >= per_epoch {
        (epoch + step / per_epoch, step % per_epoch)
    } else {
        (epoch, step)
    }
}

fn worker(
    jobs: Arc<Mutex<Receiver<Job>>>,
    done: Sender<Done>,
    dataset: Arc<dyn Dataset>,
    config: LoaderConfig,
) {
    loop {
        let job = {
            let Ok(rx) = jobs.lock() else { return };
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let seq = job.seq;
        // A panic in a decoder must not leave the consumer waiting forever.
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| load_batch(&*dataset, &config, job)))
            .unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(DataError::Worker(format!(
                    "panic while loading batch {seq}: {msg}"
                )))
            });
        if done.send((seq, r)).is_err() {
            return;
        }
    }
}

/// The augmentation seed of dataset `index` in `epoch`.
pub fn sample_seed(seed: u64, epoch: u64, index: usize) -> u64 {
    derive(seed, &[epoch, index as u64])
}

fn load_batch(dataset: &dyn Dataset, config: &LoaderConfig, job: Job) -> Loaded {
    let mut skipped = 0u64;
    let mut xs = Vec::with_capacity(job.indices.len());
    let mut ys = Vec::with_capacity(job.indices.len());
    let mut indices = Vec::with_capacity(job.indices.len());
    for &i in &job.indices {
        match dataset.get(i, sample_seed(config.seed, job.epoch, i)) {
            Ok(s) => {
                xs.push(s.data);
                ys.push(s.label);
                indices.push(i);
            }
            Err(e) if config.on_error == ErrorPolicy::Skip && e.is_sample_error() => {
                tracing::warn!(index = i, error = %e, "skipping bad sample");
                skipped += 1;
            }
            Err(e) => return Err(e),
        }
    }
    if xs.is_empty() {
        return Ok((None, skipped));
    }
    if let Some(k) = xs.iter().position(|x| x.size() != xs[0].size()) {
        return Err(DataError::Worker(format!(
            "{}: samples {} and {} have shapes {:?} and {:?}; add a center_crop_resize transform so a batch can be stacked",
            dataset.describe(),
            indices[0],
            indices[k],
            xs[0].size(),
            xs[k].size()
        )));
    }
    let mut x = Tensor::f_stack(&xs, 0)?;
    let y = match ys.iter().copied().collect::<Option<Vec<i64>>>() {
        Some(v) => Some(Tensor::from_slice(&v)),
        None if ys.iter().all(Option::is_none) => None,
        None => {
            return Err(DataError::Worker(format!(
                "{}: some samples have labels and some do not",
                dataset.describe()
            )))
        }
    };
    if config.pin_memory && tch::Cuda::is_available() {
        // `_pin_memory`: libtorch 2.11 warns on every `pin_memory(device)`, the only form tch has.
        x = x.f_internal_pin_memory(tch::Device::Cuda(0))?;
    }
    Ok((
        Some(Batch {
            x,
            y,
            indices,
            epoch: job.epoch,
            step: job.step,
            skipped: skipped as usize,
        }),
        skipped,
    ))
}

//! Latent cache: precomputed latents (from any encoder) written as
//! safetensors shards plus an `index.json`, read back one sample at a time
//! with positioned reads so the cache may be far larger than memory.
//!
//! Shard `shard-NNNNN.safetensors` (`k`) holds samples `k·shard_size ..`:
//! `latents` `(n, ...)` in the dtype written and, when labels were given,
//! `labels` `(n)` i64. Shards are written and read by `dim_io` (the header
//! read from the file's first bytes only, a sample by one positioned read).
//! Each shard is written whole and renamed, so
//! several processes can fill one cache ([`ShardWriter`], [`begin_cache`],
//! [`finish_cache`]); [`LatentWriter`] is the one-process form.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dim_io::{dtype_of, kind_of, save_bytes, IoError, RawTensor, TensorFile};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::dataset::{check_index, Dataset, RawSample, Sample};
use crate::error::{DataError, Result};

/// Name of the index file in a latent cache folder.
pub const LATENT_INDEX: &str = "index.json";

/// Name of the progress file of an unfinished cache: the index of the shards
/// written so far, so that an interrupted writer can resume after them.
pub const LATENT_PROGRESS: &str = "progress.json";

/// The safetensors dtype named `name` (`F32`, `I64`, ...).
fn parse_dtype(name: &str) -> Option<Dtype> {
    use serde::de::{value::StrDeserializer, IntoDeserializer};
    let de: StrDeserializer<'_, serde::de::value::Error> = name.into_deserializer();
    Dtype::deserialize(de).ok()
}

/// One shard in the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name relative to the cache folder.
    pub file: String,
    /// Samples in the shard.
    pub count: usize,
}

/// The `index.json` of a latent cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatentIndex {
    /// Format version (1).
    pub version: u32,
    /// Total samples.
    pub count: usize,
    /// Shape of one latent, e.g. `[4, 32, 32]`.
    pub sample_shape: Vec<usize>,
    /// Stored dtype: `F32`, `F16` or `BF16`.
    pub dtype: String,
    /// Whether every shard has `labels`.
    pub has_labels: bool,
    /// Shards in sample order.
    pub shards: Vec<ShardInfo>,
    /// Free-form facts about how the latents were made (`scaling_factor`,
    /// `vae`, `image_size`, `flip`, `source`), checked before training.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
}

/// File name of shard `k` of a cache (samples `k·shard_size ..`).
pub fn shard_file_name(k: usize) -> String {
    format!("shard-{k:05}.safetensors")
}

/// What every sample of a cache shares: dtype, per-sample shape, labelling.
#[derive(Debug, Clone, PartialEq)]
struct Layout {
    kind: Kind,
    sample_shape: Vec<usize>,
    has_labels: bool,
}

/// Writes one shard file, `shard-k`, from batches of latents. Its bytes are
/// held once (the shard's samples), then written whole under a temporary
/// name and renamed, so a shard under its final name is always complete:
/// several processes may each write their own shards of one cache.
#[derive(Debug)]
pub struct ShardWriter {
    path: PathBuf,
    capacity: usize,
    layout: Option<Layout>,
    buffer: Vec<u8>,
    labels: Vec<i64>,
    count: usize,
}

impl ShardWriter {
    /// A writer of shard `k` in `dir` for at most `capacity` samples.
    pub fn new(dir: impl AsRef<Path>, k: usize, capacity: usize) -> Self {
        Self {
            path: dir.as_ref().join(shard_file_name(k)),
            capacity,
            layout: None,
            buffer: Vec::new(),
            labels: Vec::new(),
            count: 0,
        }
    }

    fn with_layout(mut self, layout: Option<Layout>) -> Self {
        self.layout = layout;
        self
    }

    /// Samples written so far.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no sample was written.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether the shard holds `capacity` samples.
    pub fn is_full(&self) -> bool {
        self.count >= self.capacity
    }

    /// Appends latents `(B, ...)` (f32, f16 or bf16, any device) with labels
    /// `(B)` if the shard is labelled. Every batch must have the per-sample
    /// shape, dtype and labelling of the first, and fit the capacity.
    pub fn write(&mut self, latents: &Tensor, labels: Option<&Tensor>) -> Result<()> {
        let shape = latents.size();
        let kind = latents.kind();
        let err = |m: String| DataError::corrupt(&self.path, m);
        if shape.is_empty() {
            return Err(err("latents must have a batch dimension".into()));
        }
        if !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16) {
            return Err(err(format!(
                "latents must be f32, f16 or bf16, got {kind:?}"
            )));
        }
        let b = shape[0] as usize;
        if self.count + b > self.capacity {
            return Err(err(format!(
                "{b} more samples overflow the shard's {} ({} written)",
                self.capacity, self.count
            )));
        }
        let layout = Layout {
            kind,
            sample_shape: shape[1..].iter().map(|&d| d as usize).collect(),
            has_labels: labels.is_some(),
        };
        let first = self.layout.get_or_insert_with(|| layout.clone());
        if *first != layout {
            return Err(err(format!(
                "batch {layout:?} differs from the first batch {first:?}"
            )));
        }
        let item = kind.elt_size_in_bytes() * layout.sample_shape.iter().product::<usize>();
        let cpu = latents.to_device(tch::Device::Cpu).contiguous();
        let at = self.buffer.len();
        self.buffer.resize(at + b * item, 0);
        // Raw bytes of the tensor in its own dtype (little-endian on x86/ARM).
        let flat = cpu.view_dtype(Kind::Uint8).reshape([-1]);
        flat.f_copy_data(&mut self.buffer[at..], b * item)?;
        if let Some(y) = labels {
            if y.size() != [b as i64] {
                self.buffer.truncate(at);
                return Err(err(format!(
                    "labels have shape {:?}, expected [{b}]",
                    y.size()
                )));
            }
            let y = y
                .to_device(tch::Device::Cpu)
                .to_kind(Kind::Int64)
                .contiguous();
            let from = self.labels.len();
            self.labels.resize(from + b, 0);
            y.f_copy_data(&mut self.labels[from..], b)?;
        }
        self.count += b;
        Ok(())
    }

    /// Writes the shard (at least one sample) and returns its index entry.
    pub fn finish(self) -> Result<ShardInfo> {
        let Some(layout) = &self.layout else {
            return Err(DataError::corrupt(&self.path, "no latents were written"));
        };
        let mut shape = vec![self.count];
        shape.extend_from_slice(&layout.sample_shape);
        let label_bytes: Vec<u8> = self.labels.iter().flat_map(|y| y.to_le_bytes()).collect();
        let mut tensors = vec![RawTensor {
            name: "latents",
            dtype: dtype_of(layout.kind).expect("checked"),
            shape: &shape,
            bytes: &self.buffer,
        }];
        if layout.has_labels {
            tensors.push(RawTensor {
                name: "labels",
                dtype: Dtype::I64,
                shape: &shape[..1],
                bytes: &label_bytes,
            });
        }
        save_bytes(&self.path, &tensors, &BTreeMap::new())?;
        let file = self
            .path
            .file_name()
            .expect("a shard file name")
            .to_string_lossy()
            .into_owned();
        Ok(ShardInfo {
            file,
            count: self.count,
        })
    }
}

/// Samples in shard `k` of the cache in `dir`, if that file is there (its
/// header checked), `None` if not: what a resumed writer may skip.
pub fn shard_len(dir: impl AsRef<Path>, k: usize) -> Result<Option<usize>> {
    let path = dir.as_ref().join(shard_file_name(k));
    let file = match TensorFile::open(&path) {
        Ok(f) => f,
        Err(IoError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(e.into()),
    };
    let lat = file
        .get("latents")
        .ok_or_else(|| DataError::corrupt(&path, "no `latents` tensor"))?;
    Ok(lat.shape.first().map(|&n| n as usize))
}

/// Begins, or checks before resuming, a cache in `dir` that several writers
/// fill shard by shard ([`ShardWriter`]): `plan` (shards empty) is recorded
/// as `progress.json`; if one is there, its `meta` must equal `plan`'s
/// except for the keys in `may_change`. A finished cache is an error.
pub fn begin_cache(dir: impl AsRef<Path>, plan: &LatentIndex, may_change: &[&str]) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    if dir.join(LATENT_INDEX).exists() {
        return Err(DataError::corrupt(
            dir,
            "already holds a latent cache (index.json); remove it first",
        ));
    }
    let ppath = dir.join(LATENT_PROGRESS);
    if ppath.exists() {
        let old = read_progress(&ppath)?;
        let keys: std::collections::BTreeSet<&String> =
            old.meta.keys().chain(plan.meta.keys()).collect();
        for k in keys {
            let (was, now) = (old.meta.get(k), plan.meta.get(k));
            if was != now && !may_change.contains(&k.as_str()) {
                return Err(DataError::corrupt(
                    &ppath,
                    format!(
                        "was begun with {k} = {:?}, now {:?}: resume with the same arguments, or write to a new folder",
                        was.map_or("", String::as_str),
                        now.map_or("", String::as_str)
                    ),
                ));
            }
        }
    }
    write_json(dir, LATENT_PROGRESS, plan)
}

/// Finishes a cache written shard by shard: `index` lists every shard; each
/// is checked ([`LatentDataset::open`]), then `index.json` is written, and
/// `progress.json` and any other shard file (of an earlier, longer plan) removed.
pub fn finish_cache(dir: impl AsRef<Path>, index: &LatentIndex) -> Result<LatentDataset> {
    let dir = dir.as_ref();
    write_json(dir, LATENT_INDEX, index)?;
    let ds = match LatentDataset::open(dir) {
        Ok(ds) => ds,
        Err(e) => {
            // Not a cache until every shard is right.
            let _ = std::fs::remove_file(dir.join(LATENT_INDEX));
            return Err(e);
        }
    };
    let keep: Vec<&str> = index.shards.iter().map(|s| s.file.as_str()).collect();
    remove_unlisted_shards(dir, &keep)?;
    let ppath = dir.join(LATENT_PROGRESS);
    if ppath.exists() {
        std::fs::remove_file(&ppath).map_err(|e| DataError::io(&ppath, e))?;
    }
    tracing::info!(dir = %dir.display(), count = index.count, shards = index.shards.len(), "latent cache written");
    Ok(ds)
}

fn read_progress(ppath: &Path) -> Result<LatentIndex> {
    let text = std::fs::read(ppath).map_err(|e| DataError::io(ppath, e))?;
    serde_json::from_slice(&text)
        .map_err(|e| DataError::corrupt(ppath, format!("bad progress file: {e}")))
}

/// Writes `dir/name` as JSON through a temporary file and a rename.
fn write_json(dir: &Path, name: &str, value: &LatentIndex) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let json = serde_json::to_vec_pretty(value).expect("plain struct");
    std::fs::write(&tmp, json).map_err(|e| DataError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| DataError::io(&path, e))
}

/// Removes shard files not in `keep` and the temporary files of writes that
/// were cut off (`dim_io::is_temporary`).
fn remove_unlisted_shards(dir: &Path, keep: &[&str]) -> Result<()> {
    for e in std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if (name.starts_with("shard-") && !keep.contains(&name.as_str()))
            || dim_io::is_temporary(&name)
        {
            std::fs::remove_file(e.path()).map_err(|err| DataError::io(e.path(), err))?;
        }
    }
    Ok(())
}

/// Writes latents to a cache folder in shards of `shard_size` samples, in
/// order, from one process (`dim latents` fills shards from several
/// processes with [`ShardWriter`], [`begin_cache`] and [`finish_cache`]).
#[derive(Debug)]
pub struct LatentWriter {
    dir: PathBuf,
    shard_size: usize,
    current: ShardWriter,
    shards: Vec<ShardInfo>,
    meta: BTreeMap<String, String>,
}

impl LatentWriter {
    /// Creates `dir` (which must not already hold an index).
    pub fn create(dir: impl AsRef<Path>, shard_size: usize) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if shard_size == 0 {
            return Err(DataError::config("shard_size", "must be at least 1"));
        }
        std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
        if dir.join(LATENT_INDEX).exists() {
            return Err(DataError::corrupt(
                &dir,
                "already holds a latent cache (index.json); remove it first",
            ));
        }
        Ok(Self {
            current: ShardWriter::new(&dir, 0, shard_size),
            dir,
            shard_size,
            shards: Vec::new(),
            meta: BTreeMap::new(),
        })
    }

    /// Opens `dir` to continue an interrupted cache: the shards listed in its
    /// `progress.json` are kept, anything after them (a half-written shard) is
    /// dropped, and the number of samples kept is returned: the caller
    /// resumes its input there, so no sample is written twice. Without a
    /// `progress.json` this is [`LatentWriter::create`] and returns 0. A
    /// finished cache (with `index.json`) is an error.
    pub fn resume(dir: impl AsRef<Path>, shard_size: usize) -> Result<(Self, usize)> {
        let dir = dir.as_ref().to_path_buf();
        let ppath = dir.join(LATENT_PROGRESS);
        if dir.join(LATENT_INDEX).exists() || !ppath.exists() {
            return Ok((Self::create(&dir, shard_size)?, 0));
        }
        let p = read_progress(&ppath)?;
        if p.shards.iter().any(|s| s.count != shard_size) {
            return Err(DataError::corrupt(
                &ppath,
                format!("was written with another shard size than {shard_size}: resume with the same one"),
            ));
        }
        for s in &p.shards {
            if !dir.join(&s.file).is_file() {
                return Err(DataError::corrupt(
                    &dir,
                    format!("{} listed in progress.json is missing", s.file),
                ));
            }
        }
        // Shards after the recorded ones were cut off mid-way: drop them.
        let keep: Vec<&str> = p.shards.iter().map(|s| s.file.as_str()).collect();
        remove_unlisted_shards(&dir, &keep)?;
        let layout = parse_dtype(&p.dtype)
            .and_then(kind_of)
            .filter(|_| !p.shards.is_empty())
            .map(|kind| Layout {
                kind,
                sample_shape: p.sample_shape.clone(),
                has_labels: p.has_labels,
            });
        let w = Self {
            current: ShardWriter::new(&dir, p.shards.len(), shard_size).with_layout(layout),
            dir,
            shard_size,
            shards: p.shards,
            meta: p.meta,
        };
        tracing::info!(dir = %w.dir.display(), kept = p.count, "resuming the latent cache");
        Ok((w, p.count))
    }

    /// Records facts about the latents in the index (`scaling_factor`, ...).
    pub fn set_meta(&mut self, key: &str, value: impl Into<String>) {
        self.meta.insert(key.into(), value.into());
    }

    /// The facts recorded so far (those of the interrupted run when resumed).
    pub fn meta(&self) -> &BTreeMap<String, String> {
        &self.meta
    }

    /// Samples written so far (including those of a resumed run).
    pub fn count(&self) -> usize {
        self.shards.iter().map(|s| s.count).sum::<usize>() + self.current.len()
    }

    /// The index of the shards written so far (`None` before the first batch).
    fn index_so_far(&self) -> Option<LatentIndex> {
        let layout = self.current.layout.as_ref()?;
        Some(LatentIndex {
            version: 1,
            count: self.shards.iter().map(|s| s.count).sum(),
            sample_shape: layout.sample_shape.clone(),
            dtype: dtype_of(layout.kind)?.to_string(),
            has_labels: layout.has_labels,
            shards: self.shards.clone(),
            meta: self.meta.clone(),
        })
    }

    /// Appends a batch of latents `(B, ...)` (f32, f16 or bf16, any device)
    /// with labels `(B)` if the cache is labelled. Every batch must have the
    /// same per-sample shape, dtype and labelling as the first.
    pub fn write(&mut self, latents: &Tensor, labels: Option<&Tensor>) -> Result<()> {
        let b = latents.size().first().copied().unwrap_or(0);
        if let Some(y) = labels {
            if y.size() != [b] {
                return Err(DataError::corrupt(
                    &self.dir,
                    format!("labels have shape {:?}, expected [{b}]", y.size()),
                ));
            }
        }
        let mut at = 0;
        loop {
            // Split the batch at shard boundaries (one write for an empty batch: its checks).
            let take = (b - at).min((self.shard_size - self.current.len()) as i64);
            self.current.write(
                &latents.narrow(0, at, take),
                labels.map(|y| y.narrow(0, at, take)).as_ref(),
            )?;
            at += take;
            if self.current.is_full() {
                self.flush()?;
            }
            if at >= b {
                return Ok(());
            }
        }
    }

    fn flush(&mut self) -> Result<()> {
        if self.current.is_empty() {
            return Ok(());
        }
        let next = ShardWriter::new(&self.dir, self.shards.len() + 1, self.shard_size)
            .with_layout(self.current.layout.clone());
        let full = std::mem::replace(&mut self.current, next);
        self.shards.push(full.finish()?);
        // Progress after the shard is in place: a crash in between only
        // costs the shard, which a resumed run writes again.
        let progress = self.index_so_far().expect("a shard was written");
        write_json(&self.dir, LATENT_PROGRESS, &progress)
    }

    /// Writes the last shard and `index.json`; returns the index.
    pub fn finish(mut self) -> Result<LatentIndex> {
        self.flush()?;
        let Some(index) = self.index_so_far() else {
            return Err(DataError::corrupt(&self.dir, "no latents were written"));
        };
        finish_cache(&self.dir, &index)?;
        Ok(index)
    }
}

#[derive(Debug)]
struct OpenShard {
    file: TensorFile,
    first: usize,
    count: usize,
    labels: Option<Vec<i64>>,
}

/// Reads a latent cache; samples are the stored latents converted to f32
/// with the stored per-sample shape (e.g. `(4, 32, 32)`), not rescaled.
#[derive(Debug)]
pub struct LatentDataset {
    dir: PathBuf,
    index: LatentIndex,
    kind: Kind,
    item_bytes: usize,
    shards: Vec<OpenShard>,
}

impl LatentDataset {
    /// Opens the cache in `dir` and checks every shard against the index.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let ipath = dir.join(LATENT_INDEX);
        let text = std::fs::read(&ipath).map_err(|e| DataError::io(&ipath, e))?;
        let index: LatentIndex = serde_json::from_slice(&text)
            .map_err(|e| DataError::corrupt(&ipath, format!("bad index: {e}")))?;
        let kind = parse_dtype(&index.dtype)
            .and_then(kind_of)
            .filter(|k| matches!(k, Kind::Float | Kind::Half | Kind::BFloat16))
            .ok_or_else(|| {
                DataError::corrupt(&ipath, format!("unsupported dtype {}", index.dtype))
            })?;
        let item_bytes = kind.elt_size_in_bytes() * index.sample_shape.iter().product::<usize>();
        let mut shards = Vec::with_capacity(index.shards.len());
        let mut first = 0;
        for s in &index.shards {
            let path = dir.join(&s.file);
            let file = TensorFile::open(&path)?;
            let lat = file
                .get("latents")
                .ok_or_else(|| DataError::corrupt(&path, "no `latents` tensor"))?;
            let dtype =
                dtype_of(lat.kind).map_or_else(|| format!("{:?}", lat.kind), |d| d.to_string());
            let mut want = vec![s.count as i64];
            want.extend(index.sample_shape.iter().map(|&d| d as i64));
            if dtype != index.dtype || lat.shape != want {
                return Err(DataError::corrupt(
                    &path,
                    format!(
                        "latents are {dtype} {:?}, the index says {} {want:?}",
                        lat.shape, index.dtype
                    ),
                ));
            }
            let labels = if index.has_labels {
                file.get("labels")
                    .filter(|l| l.kind == Kind::Int64 && l.shape == [s.count as i64])
                    .ok_or_else(|| {
                        DataError::corrupt(&path, format!("no `labels` I64 [{}] tensor", s.count))
                    })?;
                Some(
                    file.read_bytes("labels")?
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                        .collect(),
                )
            } else {
                None
            };
            shards.push(OpenShard {
                file,
                first,
                count: s.count,
                labels,
            });
            first += s.count;
        }
        if first != index.count {
            return Err(DataError::corrupt(
                &ipath,
                format!(
                    "shards hold {first} samples, the index says {}",
                    index.count
                ),
            ));
        }
        tracing::info!(dir = %dir.display(), count = index.count, "latent cache opened");
        Ok(Self {
            dir,
            index,
            kind,
            item_bytes,
            shards,
        })
    }

    /// The index.
    pub fn index(&self) -> &LatentIndex {
        &self.index
    }
}

impl Dataset for LatentDataset {
    fn len(&self) -> usize {
        self.index.count
    }

    fn get_raw(&self, _index: usize, _seed: u64) -> Result<RawSample> {
        Err(DataError::corrupt(
            &self.dir,
            "latents are not pixels; pixel transforms do not apply",
        ))
    }

    fn get(&self, index: usize, _seed: u64) -> Result<Sample> {
        check_index(index, self.index.count)?;
        let s = &self.shards[self.shards.partition_point(|s| s.first + s.count <= index)];
        let k = index - s.first;
        let mut bytes = vec![0u8; self.item_bytes];
        s.file
            .read_bytes_at("latents", k * self.item_bytes, &mut bytes)?;
        let shape: Vec<i64> = self.index.sample_shape.iter().map(|&d| d as i64).collect();
        let data = Tensor::f_from_data_size(&bytes, &shape, self.kind)?.to_kind(Kind::Float);
        Ok(Sample {
            data,
            label: s.labels.as_ref().map(|l| l[k]),
        })
    }

    fn num_classes(&self) -> Option<usize> {
        let max = self
            .shards
            .iter()
            .filter_map(|s| s.labels.as_ref()?.iter().max())
            .max()?;
        Some(*max as usize + 1)
    }

    fn describe(&self) -> String {
        format!("latent cache {}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latents_round_trip_across_shards_and_dtypes() {
        for kind in [Kind::Float, Kind::Half] {
            let dir = tempfile::tempdir().unwrap();
            let cache = dir.path().join("lat");
            let mut w = LatentWriter::create(&cache, 4).unwrap();
            let x = Tensor::randn([10, 2, 3, 3], (Kind::Float, tch::Device::Cpu)).to_kind(kind);
            let y = Tensor::arange(10, (Kind::Int64, tch::Device::Cpu)) * 3;
            w.write(&x.narrow(0, 0, 7), Some(&y.narrow(0, 0, 7)))
                .unwrap();
            w.write(&x.narrow(0, 7, 3), Some(&y.narrow(0, 7, 3)))
                .unwrap();
            let index = w.finish().unwrap();
            assert_eq!(
                index.shards.iter().map(|s| s.count).collect::<Vec<_>>(),
                [4, 4, 2]
            );
            let ds = LatentDataset::open(&cache).unwrap();
            assert_eq!(ds.len(), 10);
            for i in 0..10 {
                let s = ds.get(i, 0).unwrap();
                assert_eq!(s.label, Some(3 * i as i64));
                assert!(
                    s.data.equal(&x.get(i as i64).to_kind(Kind::Float)),
                    "sample {i}"
                );
            }
            // The independent `safetensors` crate reads our shards.
            let bytes = std::fs::read(cache.join("shard-00002.safetensors")).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            assert_eq!(st.tensor("latents").unwrap().shape(), [2, 2, 3, 3]);
            assert_eq!(st.tensor("labels").unwrap().data().len(), 16);
        }
    }

    #[test]
    fn interrupted_writer_resumes_without_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("lat");
        let x = Tensor::randn([11, 3, 2, 2], (Kind::Float, tch::Device::Cpu)).to_kind(Kind::Half);
        let y = Tensor::arange(11, (Kind::Int64, tch::Device::Cpu));
        let (mut w, start) = LatentWriter::resume(&cache, 3).unwrap();
        assert_eq!(start, 0);
        w.set_meta("scaling_factor", "0.18215");
        // 7 written: two full shards on disk, one sample only buffered; then a "crash".
        w.write(&x.narrow(0, 0, 7), Some(&y.narrow(0, 0, 7)))
            .unwrap();
        drop(w);
        // What a writer killed mid-shard leaves: dim_io's temporary file.
        let cut = cache.join(".shard-00002.safetensors.Xy12ab.tmp");
        std::fs::write(&cut, b"junk").unwrap();
        let (mut w, start) = LatentWriter::resume(&cache, 3).unwrap();
        assert_eq!(start, 6);
        assert!(!cut.exists());
        assert!(LatentWriter::resume(&cache, 4).is_err());
        w.write(&x.narrow(0, 6, 5), Some(&y.narrow(0, 6, 5)))
            .unwrap();
        let index = w.finish().unwrap();
        assert_eq!(index.count, 11);
        assert_eq!(index.meta["scaling_factor"], "0.18215");
        assert!(!cache.join(LATENT_PROGRESS).exists());
        let ds = LatentDataset::open(&cache).unwrap();
        for i in 0..11 {
            let s = ds.get(i, 0).unwrap();
            assert_eq!(s.label, Some(i as i64), "sample {i}");
            assert!(s.data.equal(&x.get(i as i64).to_kind(Kind::Float)));
        }
        // A finished cache is not resumed.
        assert!(LatentWriter::resume(&cache, 3).is_err());
    }

    #[test]
    fn truncated_shard_and_mixed_batches_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LatentWriter::create(dir.path(), 8).unwrap();
        w.write(
            &Tensor::zeros([3, 4], (Kind::Float, tch::Device::Cpu)),
            None,
        )
        .unwrap();
        let e = w
            .write(
                &Tensor::zeros([3, 5], (Kind::Float, tch::Device::Cpu)),
                None,
            )
            .unwrap_err();
        assert!(e.to_string().contains("differs"), "{e}");
        w.finish().unwrap();
        let shard = dir.path().join("shard-00000.safetensors");
        let bytes = std::fs::read(&shard).unwrap();
        std::fs::write(&shard, &bytes[..bytes.len() - 5]).unwrap();
        let e = LatentDataset::open(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("shard-00000.safetensors") && e.contains("truncated"),
            "{e}"
        );
        assert!(LatentWriter::create(dir.path(), 8).is_err());
    }

    #[test]
    fn shard_that_disagrees_with_the_index_names_file_and_fault() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LatentWriter::create(dir.path(), 4).unwrap();
        let x = Tensor::randn([4, 2, 2], (Kind::Float, tch::Device::Cpu));
        w.write(&x, Some(&Tensor::from_slice(&[0i64, 1, 2, 3])))
            .unwrap();
        w.finish().unwrap();
        let shard = dir.path().join("shard-00000.safetensors");
        let good = std::fs::read(&shard).unwrap();
        // The index says F16: the F32 shard is refused, naming both.
        let ipath = dir.path().join(LATENT_INDEX);
        let index = std::fs::read_to_string(&ipath).unwrap();
        std::fs::write(&ipath, index.replace("\"F32\"", "\"F16\"")).unwrap();
        let e = LatentDataset::open(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("shard-00000") && e.contains("F32") && e.contains("F16"),
            "{e}"
        );
        std::fs::write(&ipath, &index).unwrap();
        // A header length beyond the file.
        let mut bad = good.clone();
        bad[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        std::fs::write(&shard, &bad).unwrap();
        let e = LatentDataset::open(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("shard-00000") && e.contains("header length"),
            "{e}"
        );
        // Offsets that do not tile the data (the safetensors crate's check).
        let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(good[8..8 + n].to_vec()).unwrap();
        let moved = header.replacen("[0,", "[8,", 1);
        assert_ne!(moved, header);
        let mut bad = good[..8].to_vec();
        bad.extend_from_slice(moved.as_bytes());
        bad.extend_from_slice(&good[8 + n..]);
        std::fs::write(&shard, &bad).unwrap();
        let e = LatentDataset::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("shard-00000") && e.contains("header"), "{e}");
    }

    #[test]
    fn shards_written_out_of_order_make_the_same_cache() {
        let x = Tensor::randn([7, 2, 3], (Kind::Float, tch::Device::Cpu)).to_kind(Kind::Half);
        let y = Tensor::arange(7, (Kind::Int64, tch::Device::Cpu));
        let dir = tempfile::tempdir().unwrap();
        let seq = dir.path().join("seq");
        let mut w = LatentWriter::create(&seq, 3).unwrap();
        w.set_meta("seed", "1");
        w.write(&x, Some(&y)).unwrap();
        let index = w.finish().unwrap();
        // The same shards from "other processes", last first, in a resumed folder.
        let par = dir.path().join("par");
        let mut plan = index.clone();
        plan.shards.clear();
        begin_cache(&par, &plan, &[]).unwrap();
        let mut changed = plan.clone();
        changed.meta.insert("seed".into(), "2".into());
        let e = begin_cache(&par, &changed, &[]).unwrap_err().to_string();
        assert!(e.contains("progress.json") && e.contains("seed"), "{e}");
        begin_cache(&par, &changed, &["seed"]).unwrap();
        begin_cache(&par, &plan, &["seed"]).unwrap();
        for k in [2usize, 0, 1] {
            assert_eq!(shard_len(&par, k).unwrap(), None);
            let n = (7 - 3 * k).min(3);
            let mut s = ShardWriter::new(&par, k, 3);
            s.write(
                &x.narrow(0, 3 * k as i64, n as i64),
                Some(&y.narrow(0, 3 * k as i64, n as i64)),
            )
            .unwrap();
            assert!(s
                .write(&x.narrow(0, 0, 3), Some(&y.narrow(0, 0, 3)))
                .is_err());
            s.finish().unwrap();
            assert_eq!(shard_len(&par, k).unwrap(), Some(n));
        }
        std::fs::write(par.join("shard-00009.safetensors"), b"stale").unwrap();
        finish_cache(&par, &index).unwrap();
        assert!(!par.join("shard-00009.safetensors").exists());
        assert!(!par.join(LATENT_PROGRESS).exists());
        for f in [
            "index.json",
            "shard-00000.safetensors",
            "shard-00001.safetensors",
            "shard-00002.safetensors",
        ] {
            assert_eq!(
                std::fs::read(seq.join(f)).unwrap(),
                std::fs::read(par.join(f)).unwrap(),
                "{f}"
            );
        }
    }
}

//! Safetensors files read and written one tensor at a time.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use tch::{Device, Kind, Tensor};

use crate::error::{IoError, Result};

/// Bytes of the little-endian header length that opens a safetensors file.
const LEN_BYTES: u64 = 8;
/// Largest header accepted (the safetensors crate's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// The safetensors dtype that stores a libtorch kind, if any.
pub fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// The libtorch kind of a safetensors dtype, if libtorch has one.
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn format_err(path: &Path, detail: impl Into<String>) -> IoError {
    IoError::Format {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IoError + '_ {
    move |source| IoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn torch_err(path: &Path) -> impl FnOnce(tch::TchError) -> IoError + '_ {
    move |source| IoError::Torch {
        path: path.to_path_buf(),
        source,
    }
}

/// Dtype and shape of one tensor in a file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMeta {
    /// Element kind.
    pub kind: Kind,
    /// Shape (row-major).
    pub shape: Vec<i64>,
    /// Byte offset of the data in the file.
    offset: u64,
    /// Byte length of the data.
    len: usize,
}

impl TensorMeta {
    /// Bytes of the tensor's data (elements times element size).
    pub fn byte_len(&self) -> usize {
        self.len
    }
}

/// An open safetensors file whose header has been checked against its
/// length; tensors are read one at a time ([`TensorFile::read`]), so loading
/// never holds the file's bytes and the tensors at once.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    file: File,
    metadata: BTreeMap<String, String>,
    tensors: BTreeMap<String, TensorMeta>,
}

/// String metadata and tensors of a header.
pub(crate) type Header = (BTreeMap<String, String>, BTreeMap<String, TensorMeta>);

/// The tensors and string metadata a header describes, checked against the
/// file's length: `len` is the whole file, `header` the bytes after the
/// 8-byte length. Errors say what is wrong, never panic (fuzzed in tests).
pub(crate) fn parse_header(header: &[u8], file_len: u64) -> std::result::Result<Header, String> {
    let meta: Metadata = serde_json::from_slice(header).map_err(|e| format!("bad header: {e}"))?;
    let data_start = LEN_BYTES + header.len() as u64;
    let data_len = meta.data_len() as u64;
    if data_start.checked_add(data_len) != Some(file_len) {
        return Err(format!(
            "the header describes {data_len} bytes of tensor data but the file holds {} after its header (truncated or corrupt)",
            file_len.saturating_sub(data_start)
        ));
    }
    let mut tensors = BTreeMap::new();
    for (name, info) in meta.tensors() {
        let kind = kind_of(info.dtype).ok_or_else(|| {
            format!(
                "tensor `{name}` has dtype {:?}, which libtorch has not",
                info.dtype
            )
        })?;
        let shape = info
            .shape
            .iter()
            .map(|&d| {
                i64::try_from(d).map_err(|_| format!("tensor `{name}`: dimension {d} too large"))
            })
            .collect::<std::result::Result<Vec<i64>, String>>()?;
        let (start, end) = info.data_offsets;
        tensors.insert(
            name,
            TensorMeta {
                kind,
                shape,
                offset: data_start + start as u64,
                len: end - start,
            },
        );
    }
    let metadata = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    Ok((metadata, tensors))
}

impl TensorFile {
    /// Opens `path` and checks its header: the header length, the JSON, the
    /// dtypes, and that the offsets tile exactly the rest of the file (so a
    /// truncated file is an error here, not a short read later).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(io_err(path))?;
        let file_len = file.metadata().map_err(io_err(path))?.len();
        if file_len < LEN_BYTES {
            return Err(format_err(
                path,
                format!(
                    "{file_len} bytes, shorter than the 8-byte header length (empty or truncated)"
                ),
            ));
        }
        let mut len = [0u8; LEN_BYTES as usize];
        file.read_exact_at(&mut len, 0).map_err(io_err(path))?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER || LEN_BYTES + n > file_len {
            return Err(format_err(
                path,
                format!("header length {n} does not fit a file of {file_len} bytes (not safetensors, or truncated)"),
            ));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, LEN_BYTES)
            .map_err(io_err(path))?;
        let (metadata, tensors) =
            parse_header(&header, file_len).map_err(|d| format_err(path, d))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            metadata,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The string metadata of the header (`__metadata__`).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Dtype and shape of tensor `name`, if the file has it.
    pub fn get(&self, name: &str) -> Option<&TensorMeta> {
        self.tensors.get(name)
    }

    /// Reads tensor `name` into a new CPU tensor of its dtype and shape.
    pub fn read(&self, name: &str) -> Result<Tensor> {
        let meta = self.meta(name)?;
        let bytes = self.read_bytes(name)?;
        Tensor::f_from_data_size(&bytes, &meta.shape, meta.kind).map_err(torch_err(&self.path))
    }

    /// The raw little-endian bytes of tensor `name`.
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; self.meta(name)?.len];
        self.read_bytes_at(name, 0, &mut bytes)?;
        Ok(bytes)
    }

    /// Fills `buf` with the bytes of tensor `name` from byte `start` of its
    /// data on (one positioned read: a row of a tensor far larger than
    /// memory). A range outside the tensor is an error.
    pub fn read_bytes_at(&self, name: &str, start: usize, buf: &mut [u8]) -> Result<()> {
        let meta = self.meta(name)?;
        if start
            .checked_add(buf.len())
            .is_none_or(|end| end > meta.len)
        {
            return Err(format_err(
                &self.path,
                format!(
                    "bytes {start}..{} of tensor `{name}` asked for, it has {}",
                    start.saturating_add(buf.len()),
                    meta.len
                ),
            ));
        }
        self.file
            .read_exact_at(buf, meta.offset + start as u64)
            .map_err(io_err(&self.path))
    }

    fn meta(&self, name: &str) -> Result<&TensorMeta> {
        self.tensors.get(name).ok_or_else(|| {
            let names: Vec<&str> = self.names().take(12).collect();
            let more = if self.tensors.len() > names.len() {
                " ..."
            } else {
                ""
            };
            format_err(
                &self.path,
                format!("no tensor `{name}`; it holds: {}{more}", names.join(" ")),
            )
        })
    }
}

/// Test hook: `DIM_IO_TEST_WRITE_DELAY_MS` pauses after each tensor written,
/// so that fault tests can kill a process in the middle of a write.
fn test_write_delay() -> Option<std::time::Duration> {
    let ms: u64 = std::env::var("DIM_IO_TEST_WRITE_DELAY_MS")
        .ok()?
        .parse()
        .ok()?;
    Some(std::time::Duration::from_millis(ms))
}

/// Whether `file_name` is one of [`save`]'s temporary files (`.NAME.XXXX.tmp`),
/// left behind only by a process killed in the middle of a write; a writer
/// that resumes in the folder may remove them.
pub fn is_temporary(file_name: &str) -> bool {
    file_name.starts_with('.') && file_name.ends_with(".tmp")
}

/// Writes `tensors` (any device and storable dtype) and `metadata` to the
/// safetensors file `path`. Each tensor is copied to the host and written
/// alone, so the extra memory is one tensor. The data goes to a temporary
/// file in the same folder that is synced and then renamed over `path` (and
/// the folder synced): a crash or a full disk leaves the old `path` as it
/// was and no temporary file behind.
pub fn save(
    path: &Path,
    tensors: impl IntoIterator<Item = (String, Tensor)>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut entries = Vec::with_capacity(tensors.len());
    for (name, t) in &tensors {
        let dtype = dtype_of(t.kind()).ok_or_else(|| {
            format_err(
                path,
                format!(
                    "tensor `{name}` has kind {:?}, which safetensors cannot store",
                    t.kind()
                ),
            )
        })?;
        let len = t.numel() * t.kind().elt_size_in_bytes();
        let shape = t.size().iter().map(|&d| d as usize).collect();
        entries.push((name.clone(), dtype, shape, len));
    }
    write_file(path, entries, metadata, |i| {
        let host = tensors[i]
            .1
            .f_detach()
            .and_then(|t| t.f_to_device(Device::Cpu))
            .and_then(|t| t.f_contiguous())
            .map_err(torch_err(path))?;
        let numel = host.numel();
        let mut bytes = vec![0u8; numel * host.kind().elt_size_in_bytes()];
        host.f_copy_data_u8(&mut bytes, numel)
            .map_err(torch_err(path))?;
        Ok(Cow::Owned(bytes))
    })
}

/// One tensor for [`save_bytes`]: its name, dtype, shape and raw
/// little-endian data (`shape`'s product times the dtype's size in bytes).
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    /// Name in the file.
    pub name: &'a str,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (row-major).
    pub shape: &'a [usize],
    /// The data.
    pub bytes: &'a [u8],
}

/// [`save`] for data already in bytes (no libtorch tensors): the tensors are
/// written in the order given, atomically as in [`save`]. A data length that
/// does not match its dtype and shape is an error naming the tensor.
pub fn save_bytes(
    path: &Path,
    tensors: &[RawTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut entries = Vec::with_capacity(tensors.len());
    for t in tensors {
        let want = (t.shape.iter().product::<usize>() * t.dtype.bitsize()).div_ceil(8);
        if t.bytes.len() != want {
            return Err(format_err(
                path,
                format!(
                    "tensor `{}`: {} bytes of data for {:?} {:?} ({want} bytes)",
                    t.name,
                    t.bytes.len(),
                    t.dtype,
                    t.shape
                ),
            ));
        }
        entries.push((t.name.to_string(), t.dtype, t.shape.to_vec(), want));
    }
    write_file(path, entries, metadata, |i| {
        Ok(Cow::Borrowed(tensors[i].bytes))
    })
}

/// The one safetensors writer: the header of `entries` (name, dtype, shape,
/// byte length, in data order), then entry `i`'s bytes from `data(i)`, one
/// entry at a time; through a synced temporary file renamed over `path`.
fn write_file<'b>(
    path: &Path,
    entries: Vec<(String, Dtype, Vec<usize>, usize)>,
    metadata: &BTreeMap<String, String>,
    mut data: impl FnMut(usize) -> Result<Cow<'b, [u8]>>,
) -> Result<()> {
    let count = entries.len();
    let mut infos = Vec::with_capacity(count);
    let mut offset = 0usize;
    for (name, dtype, shape, len) in entries {
        infos.push((
            name,
            TensorInfo {
                dtype,
                shape,
                data_offsets: (offset, offset + len),
            },
        ));
        offset += len;
    }
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    let header = Metadata::new((!meta.is_empty()).then_some(meta), infos)
        .map_err(|e| format_err(path, e.to_string()))?;
    let mut header = serde_json::to_vec(&header).map_err(|e| format_err(path, e.to_string()))?;
    // Tensor data starts 8-byte aligned, as the format asks.
    header.resize(header.len().next_multiple_of(LEN_BYTES as usize), b' ');

    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("tensors");
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    let tmp_path = tmp.path().to_path_buf();
    {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io_err(&tmp_path))?;
        w.write_all(&header).map_err(io_err(&tmp_path))?;
        for i in 0..count {
            w.write_all(&data(i)?).map_err(io_err(&tmp_path))?;
            if let Some(pause) = test_write_delay() {
                std::thread::sleep(pause);
            }
        }
        w.flush().map_err(io_err(&tmp_path))?;
    }
    // Temporary files are private (0600); the result is an ordinary file.
    std::fs::set_permissions(
        &tmp_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .map_err(io_err(&tmp_path))?;
    tmp.as_file().sync_all().map_err(io_err(&tmp_path))?;
    tmp.persist(path).map_err(|e| io_err(path)(e.error))?;
    // The rename is durable only once the folder entry is on disk.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    tracing::debug!(path = %path.display(), tensors = count, bytes = offset, "saved tensors");
    Ok(())
}

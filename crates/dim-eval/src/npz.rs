//! NumPy `.npz` files as the ADM evaluator uses them: sample batches
//! (`arr_0`, uint8 `(N, H, W, 3)`) and reference batches
//! (`VIRTUAL_imagenet256_labeled.npz`: `arr_0`, plus the precomputed `mu`,
//! `sigma`, `mu_s`, `sigma_s` in f64).
//!
//! Arrays are stored uncompressed (`np.savez`), C order. [`NpzWriter`]
//! streams `arr_0` batch by batch (zip64, so 50,000 images of 256² fit);
//! [`NpzReader`] reads whole small arrays or row ranges of large ones.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::{EvalError, Result};

fn bad(path: &Path, detail: impl Into<String>) -> EvalError {
    EvalError::Format {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// The `.npy` header of a C-order array.
fn npy_header(descr: &str, shape: &[i64]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + dict + '\n', padded to 64.
    let total = (10 + dict.len() + 1).next_multiple_of(64);
    while 10 + dict.len() + 1 < total {
        dict.push(' ');
    }
    dict.push('\n');
    let mut h = b"\x93NUMPY\x01\x00".to_vec();
    h.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h
}

/// Writes an ADM sample batch: `arr_0` uint8 `(N, H, W, 3)`, appended in
/// batches, plus optional small extra arrays (e.g. `arr_1`, the labels).
pub struct NpzWriter {
    zip: zip::ZipWriter<BufWriter<File>>,
    path: PathBuf,
    tmp: PathBuf,
    expected: i64,
    row: Vec<i64>,
    written: i64,
}

impl std::fmt::Debug for NpzWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NpzWriter({})", self.path.display())
    }
}

impl NpzWriter {
    /// Starts `path` (written next to it, renamed on [`NpzWriter::finish`])
    /// for `n` images of `(h, w, c)` bytes each.
    pub fn create(path: &Path, n: i64, h: i64, w: i64, c: i64) -> Result<Self> {
        let tmp = path.with_extension("npz.partial");
        let f = File::create(&tmp).map_err(|source| EvalError::Io {
            path: tmp.clone(),
            source,
        })?;
        let mut zip = zip::ZipWriter::new(BufWriter::new(f));
        let opts = zip::write::FileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        zip.start_file("arr_0.npy", opts)
            .map_err(|e| bad(&tmp, e.to_string()))?;
        zip.write_all(&npy_header("|u1", &[n, h, w, c]))
            .map_err(|source| EvalError::Io {
                path: tmp.clone(),
                source,
            })?;
        Ok(Self {
            zip,
            path: path.to_path_buf(),
            tmp,
            expected: n,
            row: vec![h, w, c],
            written: 0,
        })
    }

    /// Appends images `(B, H, W, C)` uint8.
    pub fn append(&mut self, images: &Tensor) -> Result<()> {
        let s = images.size();
        if s.len() != 4 || s[1..] != self.row[..] || images.kind() != Kind::Uint8 {
            return Err(EvalError::Shape {
                what: "npz images",
                detail: format!(
                    "expected (B, {:?}) u8, got {s:?} {:?}",
                    self.row,
                    images.kind()
                ),
            });
        }
        if self.written + s[0] > self.expected {
            return Err(EvalError::Shape {
                what: "npz images",
                detail: format!("more than the {} images announced", self.expected),
            });
        }
        let t = images.to_device(Device::Cpu).contiguous();
        let mut buf = vec![0u8; t.numel()];
        t.copy_data_u8(&mut buf, t.numel());
        self.zip.write_all(&buf).map_err(|source| EvalError::Io {
            path: self.tmp.clone(),
            source,
        })?;
        self.written += s[0];
        Ok(())
    }

    /// Adds a small i64 array (e.g. `arr_1`: class labels `(N)`), after `arr_0`.
    pub fn finish(mut self, labels: Option<&[i64]>) -> Result<()> {
        if self.written != self.expected {
            return Err(EvalError::Shape {
                what: "npz images",
                detail: format!("{} written, {} announced", self.written, self.expected),
            });
        }
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| EvalError::Io { path: p, source }
        };
        if let Some(y) = labels {
            let opts = zip::write::FileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            self.zip
                .start_file("arr_1.npy", opts)
                .map_err(|e| bad(&self.tmp, e.to_string()))?;
            self.zip
                .write_all(&npy_header("<i8", &[y.len() as i64]))
                .map_err(io(&self.tmp))?;
            let bytes: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.zip.write_all(&bytes).map_err(io(&self.tmp))?;
        }
        let mut w = self
            .zip
            .finish()
            .map_err(|e| bad(&self.tmp, e.to_string()))?;
        w.flush().map_err(io(&self.tmp))?;
        drop(w);
        std::fs::rename(&self.tmp, &self.path).map_err(io(&self.path))
    }
}

/// One array's description in an `.npz`.
#[derive(Debug, Clone)]
pub struct NpyInfo {
    /// Element kind (`u1`, `f4`, `f8`, `i8`).
    pub kind: Kind,
    /// C-order shape.
    pub shape: Vec<i64>,
    /// Offset of the data in the zip entry.
    data_offset: usize,
}

fn parse_header(path: &Path, name: &str, head: &[u8]) -> Result<NpyInfo> {
    let err = |d: &str| bad(path, format!("`{name}`: {d}"));
    if head.len() < 10 || &head[..6] != b"\x93NUMPY" {
        return Err(err("not a .npy array"));
    }
    let (len, start) = match head[6] {
        1 => (u16::from_le_bytes([head[8], head[9]]) as usize, 10),
        2 | 3 => {
            if head.len() < 12 {
                return Err(err("truncated header"));
            }
            (
                u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize,
                12,
            )
        }
        v => return Err(err(&format!("npy version {v} is not supported"))),
    };
    let dict = std::str::from_utf8(
        head.get(start..start + len)
            .ok_or_else(|| err("truncated header"))?,
    )
    .map_err(|_| err("header is not text"))?;
    let field = |key: &str| -> Option<&str> {
        let i = dict.find(&format!("'{key}'"))?;
        let rest = &dict[i + key.len() + 2..];
        Some(rest[rest.find(':')? + 1..].trim_start())
    };
    let descr = field("descr").ok_or_else(|| err("no descr"))?;
    let descr = descr.trim_start_matches('\'');
    let descr = &descr[..descr.find('\'').ok_or_else(|| err("bad descr"))?];
    let kind = match descr {
        "|u1" | "u1" => Kind::Uint8,
        "<f4" => Kind::Float,
        "<f8" => Kind::Double,
        "<i8" => Kind::Int64,
        other => {
            return Err(err(&format!(
                "dtype {other} is not supported (u1, <f4, <f8, <i8)"
            )))
        }
    };
    if field("fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err(err("Fortran order is not supported"));
    }
    let shape = field("shape").ok_or_else(|| err("no shape"))?;
    let shape = &shape[1..shape.find(')').ok_or_else(|| err("bad shape"))?];
    let shape: Vec<i64> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<i64>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| err("bad shape"))?;
    Ok(NpyInfo {
        kind,
        shape,
        data_offset: start + len,
    })
}

fn elem_size(k: Kind) -> usize {
    match k {
        Kind::Uint8 => 1,
        Kind::Float => 4,
        _ => 8,
    }
}

/// Reads arrays of an uncompressed `.npz`.
pub struct NpzReader {
    zip: zip::ZipArchive<BufReader<File>>,
    path: PathBuf,
}

impl std::fmt::Debug for NpzReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NpzReader({})", self.path.display())
    }
}

impl NpzReader {
    /// Opens `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|source| EvalError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let zip = zip::ZipArchive::new(BufReader::new(f))
            .map_err(|e| bad(path, format!("not an .npz (zip) file: {e}")))?;
        Ok(Self {
            zip,
            path: path.to_path_buf(),
        })
    }

    /// Names of the arrays (`arr_0`, `mu`, ...).
    pub fn names(&self) -> Vec<String> {
        self.zip
            .file_names()
            .map(|n| n.trim_end_matches(".npy").to_string())
            .collect()
    }

    /// Shape and dtype of array `name`, if present.
    pub fn info(&mut self, name: &str) -> Result<Option<NpyInfo>> {
        let path = self.path.clone();
        let Ok(mut e) = self.zip.by_name(&format!("{name}.npy")) else {
            return Ok(None);
        };
        let mut head = vec![0u8; 4096.min(e.size() as usize)];
        e.read_exact(&mut head).map_err(|source| EvalError::Io {
            path: path.clone(),
            source,
        })?;
        parse_header(&path, name, &head).map(Some)
    }

    /// [`NpzReader::info`] of an array that must be there; the error lists
    /// the arrays the file has.
    fn require(&mut self, name: &str) -> Result<NpyInfo> {
        self.info(name)?.ok_or_else(|| {
            bad(
                &self.path,
                format!("no array `{name}` (it has: {})", self.names().join(" ")),
            )
        })
    }

    /// Rows `first .. first + n` of array `name` (along its first axis) as a
    /// tensor of its dtype on the CPU.
    pub fn rows(&mut self, name: &str, first: i64, n: i64) -> Result<Tensor> {
        let path = self.path.clone();
        let info = self.require(name)?;
        let total = info.shape.first().copied().unwrap_or(1);
        if first < 0 || n < 0 || first + n > total {
            return Err(bad(
                &path,
                format!(
                    "`{name}` has {total} rows, asked for {first}..{}",
                    first + n
                ),
            ));
        }
        let row: i64 = info.shape.iter().skip(1).product();
        let bytes_per_row = row as usize * elem_size(info.kind);
        let io = |source| EvalError::Io {
            path: path.clone(),
            source,
        };
        let mut e = self
            .zip
            .by_name(&format!("{name}.npy"))
            .map_err(|e| bad(&path, e.to_string()))?;
        // Stored entries are read through; skip to the first row.
        let skip = info.data_offset as u64 + first as u64 * bytes_per_row as u64;
        std::io::copy(&mut (&mut e).take(skip), &mut std::io::sink()).map_err(io)?;
        let mut buf = vec![0u8; n as usize * bytes_per_row];
        e.read_exact(&mut buf).map_err(io)?;
        let mut shape = info.shape.clone();
        if shape.is_empty() {
            shape.push(1);
        }
        shape[0] = n;
        Ok(Tensor::f_from_data_size(&buf, &shape, info.kind)?)
    }

    /// The whole array `name`.
    pub fn array(&mut self, name: &str) -> Result<Tensor> {
        let info = self.require(name)?;
        let n = info.shape.first().copied().unwrap_or(1);
        let t = self.rows(name, 0, n)?;
        Ok(if info.shape.is_empty() {
            t.reshape([] as [i64; 0])
        } else {
            t
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_padded_and_parses_back() {
        let h = npy_header("|u1", &[7, 5, 3, 3]);
        assert_eq!(h.len() % 64, 0);
        let i = parse_header(Path::new("x"), "a", &h).unwrap();
        assert_eq!(i.shape, [7, 5, 3, 3]);
        assert_eq!(i.kind, Kind::Uint8);
        let h = npy_header("<f8", &[4]);
        let i = parse_header(Path::new("x"), "a", &h).unwrap();
        assert_eq!(i.shape, [4]);
        assert_eq!(i.kind, Kind::Double);
    }

    #[test]
    fn written_batches_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.npz");
        let x = Tensor::randint(256, [5, 4, 6, 3], (Kind::Uint8, Device::Cpu));
        let mut w = NpzWriter::create(&p, 5, 4, 6, 3).unwrap();
        w.append(&x.narrow(0, 0, 2)).unwrap();
        w.append(&x.narrow(0, 2, 3)).unwrap();
        w.finish(Some(&[1, 2, 3, 4, 5])).unwrap();
        let mut r = NpzReader::open(&p).unwrap();
        assert!(r.array("arr_0").unwrap().equal(&x));
        assert!(r.rows("arr_0", 3, 2).unwrap().equal(&x.narrow(0, 3, 2)));
        assert_eq!(
            Vec::<i64>::try_from(r.array("arr_1").unwrap()).unwrap(),
            [1, 2, 3, 4, 5]
        );
        assert!(r.array("mu").is_err());
    }
}

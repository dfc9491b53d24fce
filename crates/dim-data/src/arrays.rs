//! Whole datasets stored as one array in a `.npy` or safetensors file.

use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::dataset::{check_index, class_count, Dataset, RawSample, Sample};
use crate::error::{DataError, Result};
use crate::frames::Frames;

#[derive(Debug, Clone)]
enum Pixels {
    /// `(N, H, W, C)` bytes: pixels, transforms apply.
    U8 {
        h: usize,
        w: usize,
        c: usize,
        data: Vec<u8>,
    },
    /// Floats already in `[-1, 1]`, used as given; `shape` excludes N.
    F32 { shape: Vec<i64>, data: Vec<f32> },
}

/// Images from an array file, held in memory.
///
/// * `u8` arrays are pixels `(N, H, W)` or `(N, H, W, C)` with C = 1 or 3
///   (the NumPy image convention); samples are `(C, H, W)` and transforms
///   apply.
/// * Float arrays (f16, bf16, f32, f64) are samples already in `[-1, 1]`,
///   `(N, ...)` with any per-sample shape (e.g. `(N, C, H, W)`), used as is.
///
/// Labels, when given, are an integer array `(N)`.
#[derive(Debug, Clone)]
pub struct ArrayDataset {
    path: PathBuf,
    n: usize,
    pixels: Pixels,
    labels: Option<Vec<i64>>,
}

/// Reads a `.npy` file (format versions 1 to 3, C order, little-endian or
/// byte-sized dtypes). The header is checked against the data length before
/// any tensor is made: libtorch would read past a short buffer.
fn read_npy(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    parse_npy(&bytes).map_err(|why| DataError::corrupt(path, format!("cannot read .npy: {why}")))
}

fn parse_npy(bytes: &[u8]) -> std::result::Result<Tensor, String> {
    let rest = bytes
        .strip_prefix(b"\x93NUMPY")
        .ok_or("no .npy magic (\\x93NUMPY)")?;
    let (major, rest) = rest.split_at_checked(2).ok_or("truncated header")?;
    let (len, rest) = match major[0] {
        1 => rest
            .split_at_checked(2)
            .map(|(l, r)| (u16::from_le_bytes([l[0], l[1]]) as usize, r)),
        2 | 3 => rest
            .split_at_checked(4)
            .map(|(l, r)| (u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize, r)),
        v => return Err(format!("format version {v} is not 1, 2 or 3")),
    }
    .ok_or("truncated header")?;
    let (header, data) = rest.split_at_checked(len).ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    // The header is a Python dict literal: 'descr', 'fortran_order', 'shape'.
    let field = |key: &str| -> std::result::Result<&str, String> {
        let at = header
            .find(&format!("'{key}'"))
            .ok_or(format!("header has no '{key}'"))?;
        let after = header[at + key.len() + 2..].trim_start();
        Ok(after
            .strip_prefix(':')
            .ok_or(format!("bad '{key}'"))?
            .trim_start())
    };
    let descr = field("descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or("bad 'descr'")?;
    // Byte order first ('<' little, '|' not applicable, '=' native), then the type.
    let (order, code) = match descr.chars().next() {
        Some(c @ ('<' | '>' | '|' | '=')) => (c, &descr[1..]),
        _ => ('=', descr),
    };
    let kind = match code {
        "u1" => Kind::Uint8,
        "i1" => Kind::Int8,
        "b1" => Kind::Bool,
        "i2" => Kind::Int16,
        "i4" => Kind::Int,
        "i8" => Kind::Int64,
        "f2" => Kind::Half,
        "f4" => Kind::Float,
        "f8" => Kind::Double,
        _ => {
            return Err(format!(
                "dtype {descr:?} is not supported (u1, i1, b1, i2, i4, i8, f2, f4, f8)"
            ))
        }
    };
    if order == '>' && kind.elt_size_in_bytes() > 1 {
        return Err(format!(
            "big-endian dtype {descr:?} is not supported: save with .astype('<{code}')"
        ));
    }
    if field("fortran_order")?.starts_with("True") {
        return Err(
            "Fortran-ordered arrays are not supported: save with np.ascontiguousarray".into(),
        );
    }
    let shape = field("shape")?;
    let shape = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("bad 'shape'")?;
    let dims: Vec<i64> = shape
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| {
            d.parse::<i64>()
                .map_err(|_| format!("bad dimension {d:?} in 'shape'"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let numel = dims.iter().try_fold(1usize, |a, &d| {
        usize::try_from(d).ok().and_then(|d| a.checked_mul(d))
    });
    let want = numel.and_then(|n| n.checked_mul(kind.elt_size_in_bytes()));
    if want != Some(data.len()) {
        return Err(format!(
            "shape {dims:?} of {descr} needs {} data bytes, the file has {} (truncated?)",
            want.map_or("more than 2^64".into(), |w| w.to_string()),
            data.len()
        ));
    }
    Tensor::f_from_data_size(data, &dims, kind).map_err(|e| e.to_string())
}

impl ArrayDataset {
    /// Images from `images` (`.npy`) and labels from an optional `.npy`.
    pub fn from_npy(images: impl AsRef<Path>, labels: Option<&Path>) -> Result<Self> {
        let path = images.as_ref();
        let x = read_npy(path)?;
        let y = labels
            .map(|l| read_npy(l).map(|t| (l.to_path_buf(), t)))
            .transpose()?;
        Self::from_tensors(path, &x, y.as_ref().map(|(p, t)| (p.as_path(), t)))
    }

    /// Images under key `images_key` of a safetensors file, labels under
    /// `labels_key` if given.
    pub fn from_safetensors(
        path: impl AsRef<Path>,
        images_key: &str,
        labels_key: Option<&str>,
    ) -> Result<Self> {
        let path = path.as_ref();
        // Only the tensors asked for are read.
        let file = dim_io::TensorFile::open(path)?;
        let x = file.read(images_key)?;
        let y = labels_key.map(|k| file.read(k)).transpose()?;
        Self::from_tensors(path, &x, y.as_ref().map(|t| (path, t)))
    }

    /// From in-memory tensors; `path` names the origin in errors.
    pub fn from_tensors(path: &Path, x: &Tensor, labels: Option<(&Path, &Tensor)>) -> Result<Self> {
        let shape = x.size();
        let bad = |why: String| DataError::corrupt(path, why);
        if shape.is_empty() || shape[0] == 0 {
            return Err(bad(format!("array of shape {shape:?} holds no samples")));
        }
        let n = shape[0] as usize;
        let x = x.contiguous();
        let numel = x.numel();
        let pixels = match x.kind() {
            Kind::Uint8 => {
                let (h, w, c) = match shape[1..] {
                    [h, w] => (h, w, 1),
                    [h, w, c] if c == 1 || c == 3 => (h, w, c),
                    _ => {
                        return Err(bad(format!(
                            "u8 images must be (N, H, W) or (N, H, W, C) with C = 1 or 3, got {shape:?}"
                        )))
                    }
                };
                let mut data = vec![0u8; numel];
                x.f_copy_data(&mut data, numel)?;
                Pixels::U8 {
                    h: h as usize,
                    w: w as usize,
                    c: c as usize,
                    data,
                }
            }
            Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double => {
                let xf = x.to_kind(Kind::Float);
                let mut data = vec![0f32; numel];
                xf.f_copy_data(&mut data, numel)?;
                // A little slack for rounding in half precision.
                if let Some(v) = data.iter().find(|v| v.is_nan() || v.abs() > 1.001) {
                    return Err(bad(format!(
                        "float samples must already be in [-1, 1] (found {v}); store u8 pixels to have them scaled"
                    )));
                }
                Pixels::F32 {
                    shape: shape[1..].to_vec(),
                    data,
                }
            }
            k => {
                return Err(bad(format!(
                    "unsupported element type {k:?} (use u8 pixels or floats)"
                )))
            }
        };
        let labels = match labels {
            None => None,
            Some((lp, y)) => {
                if y.size() != [n as i64]
                    || !matches!(
                        y.kind(),
                        Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
                    )
                {
                    return Err(DataError::corrupt(
                        lp,
                        format!(
                            "labels must be integers of shape [{n}], got {:?} {:?}",
                            y.kind(),
                            y.size()
                        ),
                    ));
                }
                let y = y.to_kind(Kind::Int64).contiguous();
                let mut v = vec![0i64; n];
                y.f_copy_data(&mut v, n)?;
                Some(v)
            }
        };
        tracing::info!(path = %path.display(), n, "array dataset");
        Ok(Self {
            path: path.to_path_buf(),
            n,
            pixels,
            labels,
        })
    }

    fn label(&self, index: usize) -> Option<i64> {
        self.labels.as_ref().map(|l| l[index])
    }
}

impl Dataset for ArrayDataset {
    fn len(&self) -> usize {
        self.n
    }

    fn get_raw(&self, index: usize, _seed: u64) -> Result<RawSample> {
        check_index(index, self.n)?;
        match &self.pixels {
            Pixels::U8 { h, w, c, data } => {
                let k = h * w * c;
                Ok(RawSample {
                    frames: Frames::image(*h, *w, *c, data[index * k..(index + 1) * k].to_vec()),
                    label: self.label(index),
                })
            }
            Pixels::F32 { .. } => Err(DataError::corrupt(
                &self.path,
                "float arrays are used as stored; pixel transforms need u8 arrays",
            )),
        }
    }

    fn get(&self, index: usize, seed: u64) -> Result<Sample> {
        check_index(index, self.n)?;
        match &self.pixels {
            Pixels::F32 { shape, data } => {
                let k = data.len() / self.n;
                let t =
                    Tensor::from_slice(&data[index * k..(index + 1) * k]).view(shape.as_slice());
                Ok(Sample {
                    data: t,
                    label: self.label(index),
                })
            }
            Pixels::U8 { .. } => {
                let raw = self.get_raw(index, seed)?;
                Ok(Sample {
                    data: raw.frames.to_tensor(),
                    label: raw.label,
                })
            }
        }
    }

    fn num_classes(&self) -> Option<usize> {
        class_count(self.labels.as_deref())
    }

    fn describe(&self) -> String {
        format!("array {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_and_safetensors_round_trip_u8_and_float() {
        let dir = tempfile::tempdir().unwrap();
        let x = Tensor::arange(2 * 3 * 4 * 3, (Kind::Uint8, tch::Device::Cpu)).view([2, 3, 4, 3]);
        let y = Tensor::from_slice(&[4i64, 9]);
        let xp = dir.path().join("x.npy");
        let yp = dir.path().join("y.npy");
        x.write_npy(&xp).unwrap();
        y.write_npy(&yp).unwrap();
        let ds = ArrayDataset::from_npy(&xp, Some(&yp)).unwrap();
        assert_eq!(ds.len(), 2);
        let s = ds.get(1, 0).unwrap();
        assert_eq!(s.label, Some(9));
        assert_eq!(s.data.size(), [3, 3, 4]);
        // Channel 1, row 2, column 3 of image 1 is byte 36 + (2*4+3)*3 + 1 = 70.
        let v = s.data.double_value(&[1, 2, 3]);
        assert!((v - (70.0 / 127.5 - 1.0)).abs() < 1e-6, "{v}");

        let f =
            Tensor::linspace(-1.0, 1.0, 2 * 2 * 2, (Kind::Float, tch::Device::Cpu)).view([2, 2, 2]);
        let sp = dir.path().join("a.safetensors");
        Tensor::write_safetensors(&[("images", &f), ("labels", &y)], &sp).unwrap();
        let ds = ArrayDataset::from_safetensors(&sp, "images", Some("labels")).unwrap();
        let s = ds.get(1, 0).unwrap();
        assert_eq!(s.data.size(), [2, 2]);
        assert!(s.data.allclose(&f.get(1), 0.0, 0.0, false));
        assert_eq!(s.label, Some(9));
        let e = ArrayDataset::from_safetensors(&sp, "pixels", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no tensor `pixels`"), "{e}");
    }

    #[test]
    fn bad_arrays_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.npy");
        std::fs::write(&p, b"\x93NUMPY garbage").unwrap();
        let e = ArrayDataset::from_npy(&p, None).unwrap_err().to_string();
        assert!(e.contains("bad.npy"), "{e}");
        let big = dir.path().join("big.npy");
        Tensor::from_slice(&[0.5f32, 3.0])
            .view([2, 1])
            .write_npy(&big)
            .unwrap();
        let e = ArrayDataset::from_npy(&big, None).unwrap_err().to_string();
        assert!(e.contains("big.npy") && e.contains("[-1, 1]"), "{e}");
        let e = ArrayDataset::from_npy(dir.path().join("missing.npy"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.npy"), "{e}");
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// `.npy` files with arbitrary bytes, or a valid header cut or
        /// corrupted, are errors or data, never panics.
        #[test]
        fn npy_reader_never_panics(
            raw in proptest::collection::vec(any::<u8>(), 0..200),
            cut in any::<prop::sample::Index>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("f.npy");
            std::fs::write(&p, &raw).unwrap();
            let _ = ArrayDataset::from_npy(&p, None);
            Tensor::ones([2, 3, 4, 4], (Kind::Uint8, tch::Device::Cpu)).write_npy(&p).unwrap();
            let mut bytes = std::fs::read(&p).unwrap();
            for (at, v) in flips {
                let i = at.index(bytes.len());
                bytes[i] = v;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            std::fs::write(&p, &bytes).unwrap();
            if let Err(e) = ArrayDataset::from_npy(&p, None) {
                prop_assert!(e.to_string().contains("f.npy"), "{}", e);
            }
        }
    }
}

//! IDX files (MNIST, Fashion-MNIST), raw or gzipped.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::dataset::{check_index, class_count, Dataset, RawSample};
use crate::error::{DataError, Result};
use crate::frames::Frames;

/// Where Debian's `dataset-fashion-mnist` package installs the files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The folder of the Fashion-MNIST files when a config names none:
/// `$DIM_FASHION_MNIST_DIR` if set (a copy elsewhere, e.g. on a machine
/// without the Debian package), else [`FASHION_MNIST_DIR`].
pub fn fashion_mnist_dir() -> PathBuf {
    std::env::var_os("DIM_FASHION_MNIST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| FASHION_MNIST_DIR.into())
}

/// Which half of a train/test dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// The training set.
    Train,
    /// The test set.
    Test,
}

/// Reads a whole file, gunzipping it when it starts with the gzip magic.
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(bytes.len() * 4);
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::corrupt(path, format!("bad gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(bytes)
    }
}

/// A parsed `u8` IDX array: its dimensions and data.
fn parse_idx(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>)> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(DataError::corrupt(path, "not an IDX file (bad magic)"));
    }
    if bytes[2] != 0x08 {
        return Err(DataError::corrupt(
            path,
            format!(
                "IDX element type 0x{:02x} is not unsigned byte (0x08)",
                bytes[2]
            ),
        ));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if ndim == 0 || bytes.len() < header {
        return Err(DataError::corrupt(path, "truncated IDX header"));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            let b = &bytes[4 + 4 * i..8 + 4 * i];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        })
        .collect();
    let body = &bytes[header..];
    // Dimensions are the file's word: their product may overflow.
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if count != Some(body.len()) {
        return Err(DataError::corrupt(
            path,
            format!(
                "IDX header {dims:?} promises {} bytes, the file has {} (truncated?)",
                count.map_or("more than 2^64".into(), |c| c.to_string()),
                body.len()
            ),
        ));
    }
    Ok((dims, body.to_vec()))
}

/// Greyscale images from an IDX3 file, with labels from an optional IDX1
/// file. Samples are `(1, H, W)`; everything is held in memory (47 MB for
/// Fashion-MNIST's training set).
#[derive(Debug, Clone)]
pub struct IdxDataset {
    path: PathBuf,
    h: usize,
    w: usize,
    pixels: Vec<u8>,
    labels: Option<Vec<u8>>,
}

impl IdxDataset {
    /// Opens `images` (`(N, H, W)` IDX3) and optional `labels` (`(N)` IDX1).
    pub fn open(images: impl AsRef<Path>, labels: Option<&Path>) -> Result<Self> {
        let path = images.as_ref().to_path_buf();
        let (dims, pixels) = parse_idx(&path, &read_maybe_gz(&path)?)?;
        if dims.len() != 3 {
            return Err(DataError::corrupt(
                &path,
                format!("expected 3 IDX dimensions (N, H, W), found {dims:?}"),
            ));
        }
        let labels = match labels {
            None => None,
            Some(lp) => {
                let (ldims, l) = parse_idx(lp, &read_maybe_gz(lp)?)?;
                if ldims.len() != 1 || ldims[0] != dims[0] {
                    return Err(DataError::corrupt(
                        lp,
                        format!(
                            "labels have shape {ldims:?}, expected [{}] to match {}",
                            dims[0],
                            path.display()
                        ),
                    ));
                }
                Some(l)
            }
        };
        tracing::debug!(path = %path.display(), n = dims[0], "opened IDX images");
        Ok(Self {
            path,
            h: dims[1],
            w: dims[2],
            pixels,
            labels,
        })
    }

    /// Fashion-MNIST (or MNIST: same file names) from `dir`, e.g.
    /// [`FASHION_MNIST_DIR`]; takes `*-ubyte.gz` or uncompressed `*-ubyte`.
    pub fn mnist_layout(dir: impl AsRef<Path>, split: Split) -> Result<Self> {
        let dir = dir.as_ref();
        let prefix = match split {
            Split::Train => "train",
            Split::Test => "t10k",
        };
        let find = |stem: String| -> Result<PathBuf> {
            let gz = dir.join(format!("{stem}.gz"));
            let raw = dir.join(&stem);
            if gz.exists() {
                Ok(gz)
            } else if raw.exists() {
                Ok(raw)
            } else {
                Err(DataError::io(
                    &gz,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "IDX file not found (for Fashion-MNIST install Debian's dataset-fashion-mnist with cargo xtask setup, or point DIM_FASHION_MNIST_DIR at a copy)",
                    ),
                ))
            }
        };
        let images = find(format!("{prefix}-images-idx3-ubyte"))?;
        let labels = find(format!("{prefix}-labels-idx1-ubyte"))?;
        Self::open(images, Some(&labels))
    }

    /// Image height and width.
    pub fn image_size(&self) -> (usize, usize) {
        (self.h, self.w)
    }

    /// Raw `(H, W)` pixels of image `index` (no bounds check beyond slicing).
    pub fn pixels(&self, index: usize) -> &[u8] {
        let n = self.h * self.w;
        &self.pixels[index * n..(index + 1) * n]
    }

    /// Label of `index`, if labels were given.
    pub fn label(&self, index: usize) -> Option<i64> {
        self.labels.as_ref().map(|l| l[index] as i64)
    }
}

impl Dataset for IdxDataset {
    fn len(&self) -> usize {
        self.pixels.len() / (self.h * self.w).max(1)
    }

    fn get_raw(&self, index: usize, _seed: u64) -> Result<RawSample> {
        check_index(index, self.len())?;
        Ok(RawSample {
            frames: Frames::image(self.h, self.w, 1, self.pixels(index).to_vec()),
            label: self.label(index),
        })
    }

    fn num_classes(&self) -> Option<usize> {
        class_count(self.labels.as_deref())
    }

    fn describe(&self) -> String {
        format!("IDX {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn reads_raw_and_gzipped_idx() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..2 * 3 * 4).map(|i| i as u8).collect();
        let raw = dir.path().join("img");
        std::fs::write(&raw, idx_bytes(&[2, 3, 4], &data)).unwrap();
        let gz = dir.path().join("img.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &idx_bytes(&[2, 3, 4], &data)).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        let labels = dir.path().join("lab");
        std::fs::write(&labels, idx_bytes(&[2], &[7, 3])).unwrap();
        for p in [&raw, &gz] {
            let ds = IdxDataset::open(p, Some(&labels)).unwrap();
            assert_eq!(ds.len(), 2);
            assert_eq!(ds.image_size(), (3, 4));
            let s = ds.get_raw(1, 0).unwrap();
            assert_eq!(s.label, Some(3));
            assert_eq!(s.frames.data, data[12..].to_vec());
            assert!(ds.get_raw(2, 0).is_err());
        }
    }

    #[test]
    fn truncated_and_garbage_idx_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("short-idx3");
        let mut b = idx_bytes(&[2, 3, 4], &[1; 24]);
        b.truncate(30);
        std::fs::write(&p, &b).unwrap();
        let e = IdxDataset::open(&p, None).unwrap_err().to_string();
        assert!(e.contains("short-idx3") && e.contains("truncated"), "{e}");
        let g = dir.path().join("garbage.gz");
        std::fs::write(&g, [0x1f, 0x8b, 1, 2, 3, 4, 5]).unwrap();
        let e = IdxDataset::open(&g, None).unwrap_err().to_string();
        assert!(e.contains("garbage.gz") && e.contains("gzip"), "{e}");
        let m = dir.path().join("label-mismatch");
        std::fs::write(&p, idx_bytes(&[2, 3, 4], &[1; 24])).unwrap();
        std::fs::write(&m, idx_bytes(&[3], &[1, 2, 3])).unwrap();
        let e = IdxDataset::open(&p, Some(&m)).unwrap_err().to_string();
        assert!(e.contains("label-mismatch"), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Arbitrary bytes, and IDX headers with any type code, rank and
        /// dimensions over any payload, are errors or data, never panics.
        #[test]
        fn parse_idx_never_panics(
            raw in proptest::collection::vec(any::<u8>(), 0..64),
            code in any::<u8>(),
            dims in proptest::collection::vec(any::<u32>(), 0..5),
            small in proptest::collection::vec(0u32..6, 0..5),
            payload in 0usize..200,
            pick_small in any::<bool>(),
        ) {
            let p = Path::new("fuzz.idx");
            let _ = parse_idx(p, &raw);
            let dims = if pick_small { small } else { dims };
            let code = if pick_small { 8 } else { code };
            let mut bytes = vec![0, 0, code, dims.len() as u8];
            for d in &dims {
                bytes.extend(d.to_be_bytes());
            }
            bytes.extend(std::iter::repeat_n(7u8, payload));
            if let Ok((shape, data)) = parse_idx(p, &bytes) {
                prop_assert_eq!(shape.iter().product::<usize>(), data.len());
            }
        }
    }
}

//! `DataConfig`: the `[data]` table of a training config, typed and
//! validated, and the dataset it describes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::arrays::ArrayDataset;
use crate::dataset::{Dataset, Transformed};
use crate::error::{DataError, Result};
use crate::frames::Transform;
use crate::idx::{fashion_mnist_dir, IdxDataset, Split};
use crate::image_folder::ImageFolder;
use crate::latents::LatentDataset;
use crate::moving::{MovingConfig, MovingFashionMnist};
use crate::video::{ClipSampling, VideoDataset};

fn yes() -> bool {
    true
}
fn default_fold() -> u8 {
    1
}
fn default_images_key() -> String {
    "images".into()
}

/// Which dataset to build, with its options. In TOML the variant is chosen
/// by `kind`:
///
/// ```toml
/// [data]
/// kind = "image_folder"
/// root = "/data/imagenet/train"
/// transforms = [{ op = "center_crop_resize", size = 256 }, { op = "random_flip", p = 0.5 }]
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DataConfig {
    /// Fashion-MNIST from its IDX files (`(1, 28, 28)`).
    FashionMnist(FashionMnistConfig),
    /// Any `u8` IDX3 image file with optional IDX1 labels.
    Idx(ImageFileConfig),
    /// JPEG/PNG images, class sub-folders or flat.
    ImageFolder(ImageFolderConfig),
    /// A `.npy` array of images.
    Npy(ImageFileConfig),
    /// An image tensor in a safetensors file.
    Safetensors(SafetensorsConfig),
    /// The generated Moving Fashion-MNIST clips (`(1, T, 64, 64)` by default).
    MovingFashionMnist(MovingFashionMnistConfig),
    /// A folder of video files or frame-image folders.
    VideoFolder(VideoFolderConfig),
    /// UCF-101 with its official split files.
    Ucf101(Ucf101Config),
    /// A latent cache written by [`crate::LatentWriter`].
    Latents(LatentsConfig),
}

/// `kind = "fashion_mnist"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FashionMnistConfig {
    /// Folder of the IDX files (default: `$DIM_FASHION_MNIST_DIR`, else Debian's
    /// `/usr/share/datasets/fashion-mnist`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// `train` (default) or `test`.
    #[serde(default = "train")]
    pub split: Split,
    /// Pixel transforms, in order.
    #[serde(default)]
    pub transforms: Vec<Transform>,
}

fn train() -> Split {
    Split::Train
}

/// `kind = "idx"` and `kind = "npy"`: an image file with an optional label
/// file beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFileConfig {
    /// Images: IDX3 `u8`, raw or gzipped (`idx`); `.npy` `u8` `(N, H, W[, C])`
    /// or floats in `[-1, 1]` (`npy`).
    pub images: PathBuf,
    /// Integer labels `(N)`: IDX1, raw or gzipped (`idx`); `.npy` (`npy`).
    #[serde(default)]
    pub labels: Option<PathBuf>,
    /// Pixel transforms (u8 images only), in order.
    #[serde(default)]
    pub transforms: Vec<Transform>,
}

/// `kind = "image_folder"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFolderConfig {
    /// The folder.
    pub root: PathBuf,
    /// Sub-folders are classes (true, default) or all images are unlabelled.
    #[serde(default = "yes")]
    pub classes: bool,
    /// Pixel transforms, in order.
    #[serde(default)]
    pub transforms: Vec<Transform>,
}

/// `kind = "safetensors"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SafetensorsConfig {
    /// The file.
    pub path: PathBuf,
    /// Tensor holding the images (default `images`).
    #[serde(default = "default_images_key")]
    pub images_key: String,
    /// Tensor holding integer labels, if any.
    #[serde(default)]
    pub labels_key: Option<String>,
    /// Pixel transforms (u8 arrays only), in order.
    #[serde(default)]
    pub transforms: Vec<Transform>,
}

/// `kind = "moving_fashion_mnist"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MovingFashionMnistConfig {
    /// Folder of the Fashion-MNIST IDX files (default: Debian's).
    #[serde(default)]
    pub source_dir: Option<PathBuf>,
    /// Cache file (safetensors), generated on first use; none: generate on the fly.
    #[serde(default)]
    pub cache: Option<PathBuf>,
    /// Generator settings (`[data.moving]`).
    #[serde(default)]
    pub moving: MovingConfig,
    /// Pixel transforms, in order.
    #[serde(default)]
    pub transforms: Vec<Transform>,
}

/// `kind = "video_folder"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VideoFolderConfig {
    /// The folder.
    pub root: PathBuf,
    /// Sub-folders are classes (true, default) or all clips are unlabelled.
    #[serde(default = "yes")]
    pub classes: bool,
    /// Clip sampling (`[data.clip]`).
    #[serde(default)]
    pub clip: ClipSampling,
    /// Pixel transforms, applied alike to all frames of a clip.
    #[serde(default)]
    pub transforms: Vec<Transform>,
}

/// `kind = "ucf101"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ucf101Config {
    /// The `UCF-101` folder of class folders.
    pub root: PathBuf,
    /// The `ucfTrainTestlist` folder (`classInd.txt`, `trainlist0N.txt`, `testlist0N.txt`).
    pub splits: PathBuf,
    /// Official fold 1, 2 or 3 (default 1).
    #[serde(default = "default_fold")]
    pub fold: u8,
    /// `train` (default) or `test`.
    #[serde(default = "train")]
    pub split: Split,
    /// Clip sampling (`[data.clip]`).
    #[serde(default)]
    pub clip: ClipSampling,
    /// Pixel transforms, applied alike to all frames of a clip.
    #[serde(default)]
    pub transforms: Vec<Transform>,
}

/// `kind = "latents"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatentsConfig {
    /// The cache folder (with `index.json`).
    pub dir: PathBuf,
}

fn wrap<D: Dataset + 'static>(d: D, transforms: &[Transform]) -> Arc<dyn Dataset> {
    if transforms.is_empty() {
        Arc::new(d)
    } else {
        Arc::new(Transformed::new(d, transforms.to_vec()))
    }
}

fn need_path(key: &str, p: &Path) -> Result<()> {
    if p.as_os_str().is_empty() {
        Err(DataError::config(key, "must not be empty"))
    } else {
        Ok(())
    }
}

impl DataConfig {
    /// Parses a TOML table whose keys are those of the config (`kind`, ...).
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let c: Self = toml::from_str(text).map_err(|e| DataError::config("data", e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// Reads the `[data]` table of a TOML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let mut doc: toml::Table = toml::from_str(&text)
            .map_err(|e| DataError::config("data", format!("{}: {e}", path.display())))?;
        let data = doc.remove("data").ok_or_else(|| {
            DataError::config("data", format!("{} has no [data] table", path.display()))
        })?;
        let c: Self = data.try_into().map_err(|e: toml::de::Error| {
            DataError::config("data", format!("{}: {e}", path.display()))
        })?;
        c.validate()?;
        Ok(c)
    }

    fn transforms(&self) -> &[Transform] {
        match self {
            DataConfig::FashionMnist(c) => &c.transforms,
            DataConfig::Idx(c) | DataConfig::Npy(c) => &c.transforms,
            DataConfig::ImageFolder(c) => &c.transforms,
            DataConfig::Safetensors(c) => &c.transforms,
            DataConfig::MovingFashionMnist(c) => &c.transforms,
            DataConfig::VideoFolder(c) => &c.transforms,
            DataConfig::Ucf101(c) => &c.transforms,
            DataConfig::Latents(_) => &[],
        }
    }

    /// Checks values that parse but make no sense; errors name the key.
    pub fn validate(&self) -> Result<()> {
        for (i, t) in self.transforms().iter().enumerate() {
            t.validate(&format!("data.transforms[{i}]"))?;
        }
        match self {
            DataConfig::FashionMnist(_) => Ok(()),
            DataConfig::Idx(c) | DataConfig::Npy(c) => need_path("data.images", &c.images),
            DataConfig::ImageFolder(c) => need_path("data.root", &c.root),
            DataConfig::Safetensors(c) => need_path("data.path", &c.path),
            // Item size is known once the source is open: 28 for Fashion-MNIST.
            DataConfig::MovingFashionMnist(c) => c.moving.validate("data.moving", 28),
            DataConfig::VideoFolder(c) => {
                need_path("data.root", &c.root)?;
                c.clip.validate("data.clip")
            }
            DataConfig::Ucf101(c) => {
                need_path("data.root", &c.root)?;
                need_path("data.splits", &c.splits)?;
                if !(1..=3).contains(&c.fold) {
                    return Err(DataError::config(
                        "data.fold",
                        format!("must be 1, 2 or 3, got {}", c.fold),
                    ));
                }
                c.clip.validate("data.clip")
            }
            DataConfig::Latents(c) => need_path("data.dir", &c.dir),
        }
    }

    /// Opens the dataset (with its transforms applied).
    pub fn build(&self) -> Result<Arc<dyn Dataset>> {
        self.validate()?;
        let t = self.transforms();
        Ok(match self {
            DataConfig::FashionMnist(c) => {
                let dir = c.dir.clone().unwrap_or_else(fashion_mnist_dir);
                wrap(IdxDataset::mnist_layout(dir, c.split)?, t)
            }
            DataConfig::Idx(c) => wrap(IdxDataset::open(&c.images, c.labels.as_deref())?, t),
            DataConfig::ImageFolder(c) => {
                if c.classes {
                    wrap(ImageFolder::with_classes(&c.root)?, t)
                } else {
                    wrap(ImageFolder::unlabeled(&c.root)?, t)
                }
            }
            DataConfig::Npy(c) => wrap(ArrayDataset::from_npy(&c.images, c.labels.as_deref())?, t),
            DataConfig::Safetensors(c) => wrap(
                ArrayDataset::from_safetensors(&c.path, &c.images_key, c.labels_key.as_deref())?,
                t,
            ),
            DataConfig::MovingFashionMnist(c) => {
                let dir = c.source_dir.clone().unwrap_or_else(fashion_mnist_dir);
                let source = IdxDataset::mnist_layout(dir, Split::Train)?;
                match &c.cache {
                    Some(p) => wrap(
                        MovingFashionMnist::with_cache(source, c.moving.clone(), p)?,
                        t,
                    ),
                    None => wrap(MovingFashionMnist::new(source, c.moving.clone())?, t),
                }
            }
            DataConfig::VideoFolder(c) => {
                wrap(VideoDataset::folder(&c.root, c.classes, c.clip.clone())?, t)
            }
            DataConfig::Ucf101(c) => wrap(
                VideoDataset::ucf101(&c.root, &c.splits, c.fold, c.split, c.clip.clone())?,
                t,
            ),
            DataConfig::Latents(c) => Arc::new(LatentDataset::open(&c.dir)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind_with_defaults() {
        let c = DataConfig::from_toml_str(
            "kind = \"fashion_mnist\"\ntransforms = [{ op = \"pad\", size = 32 }]",
        )
        .unwrap();
        assert_eq!(
            c,
            DataConfig::FashionMnist(FashionMnistConfig {
                dir: None,
                split: Split::Train,
                transforms: vec![Transform::Pad { size: 32, value: 0 }],
            })
        );
        let c = DataConfig::from_toml_str(
            "kind = \"ucf101\"\nroot = \"/d/UCF-101\"\nsplits = \"/d/lists\"\nsplit = \"test\"\n[clip]\nframes = 8\nfps = 5.0\nstart = \"center\"",
        )
        .unwrap();
        let DataConfig::Ucf101(u) = c else {
            panic!("wrong kind")
        };
        assert_eq!(
            (u.fold, u.split, u.clip.frames, u.clip.fps),
            (1, Split::Test, 8, Some(5.0))
        );
        let c = DataConfig::from_toml_str("kind = \"moving_fashion_mnist\"\n[moving]\nframes = 8")
            .unwrap();
        let DataConfig::MovingFashionMnist(m) = c else {
            panic!("wrong kind")
        };
        assert_eq!((m.moving.frames, m.moving.canvas), (8, 64));
        for kind in [
            "idx\"\nimages = \"a",
            "image_folder\"\nroot = \"a",
            "npy\"\nimages = \"a",
            "safetensors\"\npath = \"a",
            "video_folder\"\nroot = \"a",
            "latents\"\ndir = \"a",
        ] {
            DataConfig::from_toml_str(&format!("kind = \"{kind}\"")).unwrap();
        }
    }

    #[test]
    fn errors_name_the_key() {
        for (toml, key) in [
            ("kind = \"imagenet\"", "imagenet"),
            (
                "kind = \"image_folder\"\nroot = \"x\"\nclases = false",
                "clases",
            ),
            ("kind = \"image_folder\"", "root"),
            (
                "kind = \"ucf101\"\nroot = \"r\"\nsplits = \"s\"\nfold = 4",
                "data.fold",
            ),
            (
                "kind = \"video_folder\"\nroot = \"r\"\n[clip]\nframes = 0",
                "data.clip.frames",
            ),
            (
                "kind = \"npy\"\nimages = \"a\"\ntransforms = [{ op = \"random_flip\", p = 2.0 }]",
                "data.transforms[0].p",
            ),
            (
                "kind = \"moving_fashion_mnist\"\n[moving]\ncanvas = 20",
                "data.moving.canvas",
            ),
            ("kind = \"idx\"\nimages = \"\"", "data.images"),
        ] {
            let e = DataConfig::from_toml_str(toml).unwrap_err().to_string();
            assert!(e.contains(key), "{toml:?}: {e}");
        }
    }

    #[test]
    fn missing_sources_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let c = DataConfig::Ucf101(Ucf101Config {
            root: dir.path().into(),
            splits: dir.path().join("lists"),
            fold: 1,
            split: Split::Train,
            clip: ClipSampling::default(),
            transforms: vec![],
        });
        let e = c.build().unwrap_err().to_string();
        assert!(
            e.contains("classInd.txt") && e.contains("split file"),
            "{e}"
        );
        let c = DataConfig::ImageFolder(ImageFolderConfig {
            root: dir.path().into(),
            classes: true,
            transforms: vec![],
        });
        let e = c.build().unwrap_err().to_string();
        assert!(e.contains("no JPEG/PNG images"), "{e}");
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// `[data]` tables built from the config's own keys with values of
        /// any type, and arbitrary text, are configs or errors, never panics.
        #[test]
        fn data_config_toml_never_panics(
            entries in proptest::collection::vec((
                prop::sample::select(vec!["kind", "path", "root", "split", "frames", "size", "stride",
                    "seed", "transforms", "images", "labels", "image_size", "num_videos", "digits",
                    "fps", "extensions", "channels", "images_key", "labels_key", "latent"]),
                prop::sample::select(vec!["\"fashion_mnist\"", "\"idx\"", "\"npy\"", "\"image_folder\"",
                    "\"moving_fashion_mnist\"", "\"video_folder\"", "\"ucf101\"", "\"latents\"",
                    "\"safetensors\"", "-1", "0", "3", "18446744073709551615", "-9223372036854775808",
                    "1e308", "nan", "true", "[]", "[0, -5]", "[{ op = \"pad\", size = -3 }]",
                    "[{ op = \"resize\", size = 0 }]", "[{ op = \"crop\" }]", "{}", "\"\""]),
            ), 0..6),
            noise in "\\PC{0,40}",
        ) {
            let mut text = String::new();
            let mut seen = std::collections::BTreeSet::new();
            for (k, v) in entries {
                if seen.insert(k) {
                    text.push_str(&format!("{k} = {v}\n"));
                }
            }
            let _ = DataConfig::from_toml_str(&text);
            let _ = DataConfig::from_toml_str(&noise);
        }
    }
}

//! Folders of JPEG/PNG images: ImageNet-style (one sub-folder per class) or
//! flat and unlabelled.

use std::path::{Path, PathBuf};

use crate::dataset::{check_index, Dataset, RawSample};
use crate::error::{DataError, Result};
use crate::files::{has_extension, list_dir, IMAGE_EXTENSIONS};
use crate::frames::Frames;

/// Decodes a JPEG or PNG file to RGB `(H, W, 3)`.
///
/// Truncated files are errors: the `image` crate's JPEG decoder fills a
/// missing tail with grey rather than failing, so a JPEG must also end with
/// its end-of-image marker.
pub fn decode_rgb(path: &Path) -> Result<Frames> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let format = image::guess_format(&bytes)
        .map_err(|_| DataError::corrupt(path, "not a JPEG or PNG image (unknown signature)"))?;
    if format == image::ImageFormat::Jpeg {
        // Some writers pad after the marker; allow trailing zero bytes.
        let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        if end < 2 || bytes[end - 2..end] != [0xFF, 0xD9] {
            return Err(DataError::corrupt(
                path,
                "truncated JPEG (no end-of-image marker)",
            ));
        }
    }
    let img = image::load_from_memory_with_format(&bytes, format)
        .map_err(|e| DataError::corrupt(path, format!("cannot decode image: {e}")))?
        .into_rgb8();
    let (w, h) = img.dimensions();
    Ok(Frames::image(h as usize, w as usize, 3, img.into_raw()))
}

fn images_under(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for p in list_dir(dir)? {
        if p.is_dir() {
            images_under(&p, out)?;
        } else if has_extension(&p, IMAGE_EXTENSIONS) {
            out.push(p);
        }
    }
    Ok(())
}

/// JPEG/PNG images decoded on access; samples are `(3, H, W)` at the file's
/// size (add a `center_crop_resize` transform to batch them).
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    files: Vec<(PathBuf, Option<i64>)>,
    classes: Vec<String>,
}

impl ImageFolder {
    /// ImageNet layout: each sub-folder of `root` is a class (sorted names,
    /// labels `0..`); images are found recursively inside it.
    pub fn with_classes(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let mut files = Vec::new();
        let mut classes = Vec::new();
        for dir in list_dir(&root)?.into_iter().filter(|p| p.is_dir()) {
            let label = classes.len() as i64;
            classes.push(
                dir.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
            let mut imgs = Vec::new();
            images_under(&dir, &mut imgs)?;
            files.extend(imgs.into_iter().map(|p| (p, Some(label))));
        }
        Self::checked(root, files, classes, "JPEG/PNG images in class sub-folders")
    }

    /// Every image under `root` (recursively), unlabelled.
    pub fn unlabeled(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let mut imgs = Vec::new();
        images_under(&root, &mut imgs)?;
        let files = imgs.into_iter().map(|p| (p, None)).collect();
        Self::checked(root, files, Vec::new(), "JPEG/PNG images")
    }

    fn checked(
        root: PathBuf,
        files: Vec<(PathBuf, Option<i64>)>,
        classes: Vec<String>,
        what: &str,
    ) -> Result<Self> {
        if files.is_empty() {
            return Err(DataError::Empty {
                path: root,
                what: what.into(),
            });
        }
        tracing::info!(root = %root.display(), images = files.len(), classes = classes.len(), "image folder");
        Ok(Self {
            root,
            files,
            classes,
        })
    }

    /// Class names, indexed by label.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Image paths and labels, in index order.
    pub fn files(&self) -> &[(PathBuf, Option<i64>)] {
        &self.files
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn get_raw(&self, index: usize, _seed: u64) -> Result<RawSample> {
        check_index(index, self.files.len())?;
        let (path, label) = &self.files[index];
        Ok(RawSample {
            frames: decode_rgb(path)?,
            label: *label,
        })
    }

    fn num_classes(&self) -> Option<usize> {
        (!self.classes.is_empty()).then_some(self.classes.len())
    }

    fn describe(&self) -> String {
        format!("image folder {}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32, seed: u8) {
        let img =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8 ^ seed, y as u8, seed]));
        img.save(path).unwrap();
    }

    #[test]
    fn class_folders_give_sorted_labels_and_decode() {
        let dir = tempfile::tempdir().unwrap();
        for (class, n) in [("b_cat", 2), ("a_dog", 3)] {
            std::fs::create_dir(dir.path().join(class)).unwrap();
            for i in 0..n {
                write_png(
                    &dir.path().join(class).join(format!("{i}.png")),
                    5,
                    4,
                    i as u8,
                );
            }
        }
        std::fs::write(dir.path().join("a_dog/notes.txt"), "not an image").unwrap();
        let ds = ImageFolder::with_classes(dir.path()).unwrap();
        assert_eq!(ds.classes(), ["a_dog", "b_cat"]);
        assert_eq!(ds.len(), 5);
        let labels: Vec<_> = (0..5).map(|i| ds.get_raw(i, 0).unwrap().label).collect();
        assert_eq!(labels, [Some(0), Some(0), Some(0), Some(1), Some(1)]);
        let s = ds.get_raw(4, 0).unwrap().frames;
        assert_eq!((s.h, s.w, s.c), (4, 5, 3));
        // Pixel (x=2, y=3) of image "1.png": [2 ^ 1, 3, 1].
        let p = (3 * 5 + 2) * 3;
        assert_eq!(&s.data[p..p + 3], &[3, 3, 1]);
        assert_eq!(ImageFolder::unlabeled(dir.path()).unwrap().len(), 5);
    }

    #[test]
    fn empty_truncated_and_garbage_images_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = ImageFolder::with_classes(dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no JPEG/PNG images"), "{e}");
        let jpg = dir.path().join("x.jpg");
        let img =
            image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8 * 8, y as u8 * 8, 0]));
        img.save(&jpg).unwrap();
        assert!(decode_rgb(&jpg).is_ok());
        let bytes = std::fs::read(&jpg).unwrap();
        std::fs::write(&jpg, &bytes[..bytes.len() / 2]).unwrap();
        let e = decode_rgb(&jpg).unwrap_err().to_string();
        assert!(e.contains("x.jpg") && e.contains("truncated"), "{e}");
        let png = dir.path().join("y.png");
        write_png(&png, 16, 16, 3);
        let bytes = std::fs::read(&png).unwrap();
        std::fs::write(&png, &bytes[..bytes.len() - 30]).unwrap();
        let e = decode_rgb(&png).unwrap_err().to_string();
        assert!(e.contains("y.png"), "{e}");
        let junk = dir.path().join("z.png");
        std::fs::write(&junk, b"definitely not an image").unwrap();
        let e = decode_rgb(&junk).unwrap_err().to_string();
        assert!(e.contains("z.png") && e.contains("corrupt"), "{e}");
    }
}

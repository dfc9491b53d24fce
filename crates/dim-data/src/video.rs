//! Clip sampling and the video datasets: a folder of video files or frame
//! folders, and UCF-101 with its official split files. Video files are
//! decoded by [`crate::ffmpeg`] (the `video` feature); frame folders need no
//! FFmpeg.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::dataset::{check_index, Dataset, RawSample};
pub use crate::decode::{DecodeOptions, VideoInfo};
use crate::error::{DataError, Result};
pub use crate::ffmpeg::{decode_each, probe, write_mp4};
use crate::files::{has_extension, sorted_entries};
pub use crate::files::{IMAGE_EXTENSIONS, VIDEO_EXTENSIONS};
use crate::frames::Frames;
use crate::idx::Split;
use crate::rng::{derive, Rng};

/// Decodes the frames at the sorted positions `wanted` (0-based, in decode
/// order, repeats allowed) of `path` as RGB24 and returns them as a clip
/// `(T, H, W, 3)`. Decoding stops after the last wanted frame.
///
/// Conversion uses swscale with the bicubic flag, as the `ffmpeg` program
/// does by default, so frames are byte-identical to
/// `ffmpeg -i FILE -fps_mode passthrough -f rawvideo -pix_fmt rgb24 -`.
pub fn decode_frames(path: &Path, wanted: &[usize], options: DecodeOptions) -> Result<Frames> {
    let mut out = Vec::new();
    let (mut w, mut h) = (0, 0);
    decode_each(path, wanted, options, |rgb, fw, fh| {
        if out.is_empty() {
            // One allocation for the whole clip.
            out.reserve(wanted.len() * rgb.len());
        }
        (w, h) = (fw, fh);
        out.extend_from_slice(rgb);
    })?;
    Ok(Frames::clip(wanted.len(), h, w, 3, out))
}

/// Where a clip starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipStart {
    /// Uniformly random over all starts that fit (from the sample seed).
    #[default]
    Random,
    /// The middle of the video (for evaluation).
    Center,
}

/// How to cut a clip from a video.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClipSampling {
    /// Frames per clip (T).
    pub frames: usize,
    /// Take every `stride`-th source frame. Exclusive with `fps`.
    pub stride: usize,
    /// Resample to this frame rate instead of a fixed stride.
    pub fps: Option<f64>,
    /// Where the clip starts.
    pub start: ClipStart,
    /// Frame rate assumed for frame-image folders (they carry none).
    pub frame_folder_fps: f64,
}

impl Default for ClipSampling {
    fn default() -> Self {
        Self {
            frames: 16,
            stride: 1,
            fps: None,
            start: ClipStart::Random,
            frame_folder_fps: 25.0,
        }
    }
}

impl ClipSampling {
    /// Checks the settings; errors name keys under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        DataError::require_counts(prefix, &[("frames", self.frames), ("stride", self.stride)])?;
        if let Some(f) = self.fps {
            if !(f > 0.0 && f.is_finite()) {
                return Err(DataError::config(
                    format!("{prefix}.fps"),
                    format!("must be positive, got {f}"),
                ));
            }
            if self.stride != 1 {
                return Err(DataError::config(
                    format!("{prefix}.fps"),
                    "give either fps or stride, not both",
                ));
            }
        }
        if self.frame_folder_fps.is_nan() || self.frame_folder_fps <= 0.0 {
            return Err(DataError::config(
                format!("{prefix}.frame_folder_fps"),
                "must be positive",
            ));
        }
        Ok(())
    }

    /// Source frame positions of one clip from a video of `total` frames at
    /// `fps`, or `Err(needed)` with the frames a clip needs when too short.
    pub fn indices(
        &self,
        total: usize,
        fps: f64,
        rng: &mut Rng,
    ) -> std::result::Result<Vec<usize>, usize> {
        let step = match self.fps {
            Some(target) if fps > 0.0 => fps / target,
            _ => self.stride as f64,
        };
        let offset = |i: usize| (i as f64 * step).round() as usize;
        let needed = offset(self.frames - 1) + 1;
        if total < needed {
            return Err(needed);
        }
        let slack = total - needed;
        let start = match self.start {
            ClipStart::Random => rng.below(slack as u64 + 1) as usize,
            ClipStart::Center => slack / 2,
        };
        Ok((0..self.frames).map(|i| start + offset(i)).collect())
    }
}

/// One clip on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClipSource {
    /// A video file decoded with FFmpeg.
    File(PathBuf),
    /// A folder of frame images (JPEG/PNG), in natural name order.
    FrameFolder(PathBuf),
}

impl ClipSource {
    /// The file or folder.
    pub fn path(&self) -> &Path {
        match self {
            ClipSource::File(p) | ClipSource::FrameFolder(p) => p,
        }
    }
}

fn frame_images(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(sorted_entries(dir)?
        .into_iter()
        .filter(|p| p.is_file() && has_extension(p, IMAGE_EXTENSIONS))
        .collect())
}

/// Clips of one folder: video files and sub-folders of frame images.
fn clips_in(dir: &Path) -> Result<Vec<ClipSource>> {
    let mut clips = Vec::new();
    for p in sorted_entries(dir)? {
        if p.is_dir() {
            if !frame_images(&p)?.is_empty() {
                clips.push(ClipSource::FrameFolder(p));
            }
        } else if has_extension(&p, VIDEO_EXTENSIONS) {
            clips.push(ClipSource::File(p));
        }
    }
    Ok(clips)
}

/// Video clips with optional class labels; every sample is `(3, T, H, W)`.
#[derive(Debug, Clone)]
pub struct VideoDataset {
    name: String,
    clips: Vec<(ClipSource, Option<i64>)>,
    classes: Vec<String>,
    sampling: ClipSampling,
    decode: DecodeOptions,
}

impl VideoDataset {
    /// Clips given directly, with `classes` naming label values.
    pub fn from_clips(
        name: impl Into<String>,
        clips: Vec<(ClipSource, Option<i64>)>,
        classes: Vec<String>,
        sampling: ClipSampling,
    ) -> Result<Self> {
        sampling.validate("clip")?;
        Ok(Self {
            name: name.into(),
            clips,
            classes,
            sampling,
            decode: DecodeOptions::default(),
        })
    }

    /// A folder of clips (video files or frame-image folders). With
    /// `classes`, each sub-folder of `root` is a class (sorted names, labels
    /// `0..`); without, the clips of `root` itself, unlabelled.
    pub fn folder(root: impl AsRef<Path>, classes: bool, sampling: ClipSampling) -> Result<Self> {
        let root = root.as_ref();
        let mut clips = Vec::new();
        let mut names = Vec::new();
        if classes {
            for p in sorted_entries(root)?.into_iter().filter(|p| p.is_dir()) {
                let label = names.len() as i64;
                names.push(
                    p.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned(),
                );
                clips.extend(clips_in(&p)?.into_iter().map(|c| (c, Some(label))));
            }
        } else {
            clips = clips_in(root)?.into_iter().map(|c| (c, None)).collect();
        }
        if clips.is_empty() {
            return Err(DataError::Empty {
                path: root.to_path_buf(),
                what: format!(
                    "video files ({}) or frame folders{}",
                    VIDEO_EXTENSIONS.join(", "),
                    if classes { " in class sub-folders" } else { "" }
                ),
            });
        }
        tracing::info!(root = %root.display(), clips = clips.len(), classes = names.len(), "video folder");
        Self::from_clips(
            format!("video folder {}", root.display()),
            clips,
            names,
            sampling,
        )
    }

    /// UCF-101: `root/<Class>/v_<Class>_gXX_cYY.avi` (or a folder of frame
    /// images with the same path minus `.avi`), and `splits` holding
    /// `classInd.txt`, `trainlist0N.txt` and `testlist0N.txt`. `fold` is 1–3.
    /// Labels are `classInd` indices minus one.
    pub fn ucf101(
        root: impl AsRef<Path>,
        splits: impl AsRef<Path>,
        fold: u8,
        split: Split,
        sampling: ClipSampling,
    ) -> Result<Self> {
        let (root, splits) = (root.as_ref(), splits.as_ref());
        if !(1..=3).contains(&fold) {
            return Err(DataError::config(
                "data.fold",
                format!("UCF-101 has folds 1, 2, 3; got {fold}"),
            ));
        }
        let read = |name: &str| -> Result<(PathBuf, String)> {
            let p = splits.join(name);
            let text = std::fs::read_to_string(&p).map_err(|e| {
                DataError::io(
                    &p,
                    std::io::Error::new(
                        e.kind(),
                        format!("missing or unreadable UCF-101 split file: {e}"),
                    ),
                )
            })?;
            Ok((p, text))
        };
        let (ind_path, ind) = read("classInd.txt")?;
        let mut classes = BTreeMap::new();
        for (n, line) in ind
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let mut it = line.split_whitespace();
            let (Some(id), Some(name), None) = (it.next(), it.next(), it.next()) else {
                return Err(DataError::corrupt(
                    &ind_path,
                    format!("line {}: expected `<index> <class>`", n + 1),
                ));
            };
            let id: i64 = id.parse().map_err(|_| {
                DataError::corrupt(&ind_path, format!("line {}: bad class index `{id}`", n + 1))
            })?;
            classes.insert(name.to_string(), id - 1);
        }
        if classes.is_empty() {
            return Err(DataError::corrupt(&ind_path, "no classes"));
        }
        let list = match split {
            Split::Train => format!("trainlist0{fold}.txt"),
            Split::Test => format!("testlist0{fold}.txt"),
        };
        let (list_path, text) = read(&list)?;
        let mut clips = Vec::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let rel = line.split_whitespace().next().expect("non-empty line");
            let class = rel.split('/').next().unwrap_or_default();
            let label = *classes.get(class).ok_or_else(|| {
                DataError::corrupt(
                    &list_path,
                    format!("line {}: class `{class}` is not in classInd.txt", n + 1),
                )
            })?;
            let file = root.join(rel);
            let source = if file.is_file() {
                ClipSource::File(file)
            } else if file.with_extension("").is_dir() {
                ClipSource::FrameFolder(file.with_extension(""))
            } else {
                return Err(DataError::io(
                    &file,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!(
                            "listed in {} line {} but neither the video nor a frame folder exists",
                            list_path.display(),
                            n + 1
                        ),
                    ),
                ));
            };
            clips.push((source, Some(label)));
        }
        if clips.is_empty() {
            return Err(DataError::corrupt(&list_path, "the split lists no clips"));
        }
        // Names indexed by label, in classInd order (not name order).
        let mut by_label: Vec<(i64, String)> = classes.into_iter().map(|(n, l)| (l, n)).collect();
        by_label.sort();
        let names = by_label.into_iter().map(|(_, n)| n).collect::<Vec<_>>();
        tracing::info!(list = %list_path.display(), clips = clips.len(), "UCF-101");
        Self::from_clips(
            format!("UCF-101 {}", list_path.display()),
            clips,
            names,
            sampling,
        )
    }

    /// Sets decoder options (threads per clip).
    pub fn with_decode_options(mut self, options: DecodeOptions) -> Self {
        self.decode = options;
        self
    }

    /// The clips and labels.
    pub fn clips(&self) -> &[(ClipSource, Option<i64>)] {
        &self.clips
    }

    /// Class names, indexed by label.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The clip of `index`, `(T, H, W, 3)` at the source resolution.
    pub fn load_clip(&self, index: usize, seed: u64) -> Result<Frames> {
        check_index(index, self.clips.len())?;
        let source = &self.clips[index].0;
        let mut rng = Rng::new(derive(seed, &[0x636c6970]));
        match source {
            ClipSource::File(path) => {
                let info = probe(path)?;
                let wanted = self
                    .sampling
                    .indices(info.frames, info.fps, &mut rng)
                    .map_err(|needed| DataError::VideoTooShort {
                        path: path.clone(),
                        frames: info.frames,
                        needed,
                    })?;
                decode_frames(path, &wanted, self.decode)
            }
            ClipSource::FrameFolder(dir) => {
                let files = frame_images(dir)?;
                let wanted = self
                    .sampling
                    .indices(files.len(), self.sampling.frame_folder_fps, &mut rng)
                    .map_err(|needed| DataError::VideoTooShort {
                        path: dir.clone(),
                        frames: files.len(),
                        needed,
                    })?;
                let mut data = Vec::new();
                let mut size = None;
                for &i in &wanted {
                    let img = crate::image_folder::decode_rgb(&files[i])?;
                    let dims = (img.h, img.w);
                    if *size.get_or_insert(dims) != dims {
                        return Err(DataError::corrupt(
                            &files[i],
                            format!(
                                "frame is {}x{}, earlier frames of the clip are {}x{}",
                                dims.1,
                                dims.0,
                                size.unwrap().1,
                                size.unwrap().0
                            ),
                        ));
                    }
                    data.extend_from_slice(&img.data);
                }
                let (h, w) = size.unwrap_or((0, 0));
                Ok(Frames::clip(wanted.len(), h, w, 3, data))
            }
        }
    }
}

impl Dataset for VideoDataset {
    fn len(&self) -> usize {
        self.clips.len()
    }

    fn get_raw(&self, index: usize, seed: u64) -> Result<RawSample> {
        let frames = self.load_clip(index, seed)?;
        Ok(RawSample {
            frames,
            label: self.clips[index].1,
        })
    }

    fn num_classes(&self) -> Option<usize> {
        (!self.classes.is_empty()).then_some(self.classes.len())
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::natural_key;

    #[test]
    fn clip_indices_respect_stride_fps_and_start() {
        let mut rng = Rng::new(1);
        let s = ClipSampling {
            frames: 4,
            stride: 2,
            start: ClipStart::Center,
            ..Default::default()
        };
        // Needs 7 frames; 11 frames leave slack 4, centre start 2.
        assert_eq!(s.indices(11, 25.0, &mut rng), Ok(vec![2, 4, 6, 8]));
        assert_eq!(s.indices(6, 25.0, &mut rng), Err(7));
        let f = ClipSampling {
            frames: 3,
            fps: Some(10.0),
            start: ClipStart::Center,
            ..Default::default()
        };
        // 30 fps to 10 fps: every third frame; needs 7; slack 0.
        assert_eq!(f.indices(7, 30.0, &mut rng), Ok(vec![0, 3, 6]));
        let r = ClipSampling {
            frames: 2,
            ..Default::default()
        };
        let starts: std::collections::BTreeSet<usize> = (0..200)
            .map(|_| r.indices(5, 25.0, &mut rng).unwrap()[0])
            .collect();
        assert_eq!(starts.into_iter().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn clip_sampling_validation_names_keys() {
        let d = ClipSampling::default;
        for (bad, key) in [
            (
                ClipSampling {
                    fps: Some(8.0),
                    stride: 2,
                    ..d()
                },
                "data.clip.fps",
            ),
            (ClipSampling { frames: 0, ..d() }, "data.clip.frames"),
            (ClipSampling { stride: 0, ..d() }, "data.clip.stride"),
            (
                ClipSampling {
                    frame_folder_fps: f64::NAN,
                    ..d()
                },
                "data.clip.frame_folder_fps",
            ),
        ] {
            let e = bad.validate("data.clip").unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        assert!(d().validate("data.clip").is_ok());
    }

    #[test]
    fn natural_order_puts_2_before_10() {
        let mut v = vec!["f10.jpg", "f2.jpg", "f1.jpg"];
        v.sort_by_cached_key(|s| natural_key(s));
        assert_eq!(v, vec!["f1.jpg", "f2.jpg", "f10.jpg"]);
    }
}

//! Throughput benchmark: images/s from Fashion-MNIST and from a JPEG folder
//! through the loader, and decoded video frames/s against the `ffmpeg`
//! program decoding the same file in the same run.
//!
//! Run: `cargo bench -p dim-data --bench data` (prints a table; results are
//! recorded in docs/benchmarks/data.md).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use dim_data::video::{decode_frames, probe};
use dim_data::{
    Dataset, DecodeOptions, IdxDataset, ImageFolder, Loader, LoaderConfig, Split, Transform, Transformed,
    FASHION_MNIST_DIR,
};

fn require(p: impl AsRef<Path>) -> PathBuf {
    let p = p.as_ref().to_path_buf();
    assert!(p.exists(), "{} is missing: run cargo xtask setup", p.display());
    p
}

/// Images per second through a loader, over `batches` batches after one warm-up batch.
fn loader_rate(ds: Arc<dyn Dataset>, batch: usize, workers: usize, batches: usize) -> f64 {
    let cfg = LoaderConfig { batch_size: batch, workers, prefetch: 2 * workers.max(1), pin_memory: false, ..Default::default() };
    let mut loader = Loader::new(ds, cfg).expect("loader");
    loader.next_batch().expect("batch").expect("batch");
    let t = Instant::now();
    let mut n = 0;
    for _ in 0..batches {
        n += loader.next_batch().expect("batch").expect("batch").indices.len();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// Frames per second of the ffmpeg program decoding `path` to RGB24 (best of `reps`).
fn ffmpeg_rate(path: &Path, threads: usize, frames: usize, reps: usize) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            let st = Command::new("ffmpeg")
                .args(["-v", "error", "-nostdin", "-threads", &threads.to_string(), "-i"])
                .arg(path)
                .args(["-an", "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-y", "/dev/null"])
                .stdout(Stdio::null())
                .status()
                .expect("ffmpeg program (run cargo xtask setup)");
            assert!(st.success());
            frames as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// Frames per second of our in-process decode of all frames (best of `reps`),
/// with `clips` decodes running in parallel threads.
fn our_rate(path: &Path, frames: usize, clips: usize, reps: usize) -> f64 {
    let wanted: Vec<usize> = (0..frames).collect();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..clips {
                    s.spawn(|| decode_frames(path, &wanted, DecodeOptions::default()).expect("decode"));
                }
            });
            (frames * clips) as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would too: only
    // run when asked to benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("machine: {cores} cores");

    // Fashion-MNIST: pad to 32, random flip, batch 256.
    let fm = IdxDataset::mnist_layout(require(FASHION_MNIST_DIR), Split::Train).expect("fashion-mnist");
    let fm: Arc<dyn Dataset> = Arc::new(Transformed::new(
        fm,
        vec![Transform::Pad { size: 32, value: 0 }, Transform::RandomFlip { p: 0.5 }],
    ));
    for workers in [1, 2] {
        println!(
            "fashion-mnist  pad32+flip  batch 256  workers {workers}: {:>9.0} images/s",
            loader_rate(fm.clone(), 256, workers, 60)
        );
    }

    // JPEG folder: the opencv-doc sample photos (59 JPEGs, 512x384 to
    // 1280x960), linked into 10 class folders, ADM crop to 256 + flip.
    let src = require("/usr/share/doc/opencv-doc/examples/data");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut jpegs: Vec<PathBuf> = std::fs::read_dir(&src)
        .expect("opencv-doc data")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    jpegs.sort();
    for class in 0..10 {
        let d = dir.path().join(format!("class{class}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        for j in &jpegs {
            std::os::unix::fs::symlink(j, d.join(j.file_name().expect("name"))).expect("link");
        }
    }
    let folder = ImageFolder::with_classes(dir.path()).expect("jpeg folder");
    let n = folder.len();
    let folder: Arc<dyn Dataset> = Arc::new(Transformed::new(
        folder,
        vec![Transform::CenterCropResize { size: 256 }, Transform::RandomFlip { p: 0.5 }],
    ));
    for workers in [1, 2] {
        println!(
            "jpeg folder ({n} photos) crop256+flip batch 32 workers {workers}: {:>7.1} images/s",
            loader_rate(folder.clone(), 32, workers, 8)
        );
    }

    // Video: full decode to RGB24 of real clips, us against the program.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.dim/video");
    for path in [require(root.join("bigbuckbunny.mp4")), require(root.join("bikes.mp4")), require("/usr/share/doc/opencv-doc/examples/data/Megamind.avi")] {
        let info = probe(&path).expect("probe");
        let name = path.file_name().expect("name").to_string_lossy().into_owned();
        let ours1 = our_rate(&path, info.frames, 1, 3);
        let ff1 = ffmpeg_rate(&path, 1, info.frames, 3);
        let ours2 = our_rate(&path, info.frames, 2, 3);
        let ff2 = ffmpeg_rate(&path, 2, info.frames, 3);
        println!(
            "{name} ({}x{}, {} frames): 1 core: dim-data {ours1:.1} fps, ffmpeg -threads 1 {ff1:.1} fps, ratio {:.2}; \
             2 cores: dim-data (2 clips) {ours2:.1} fps, ffmpeg -threads 2 {ff2:.1} fps, ratio {:.2}",
            info.width,
            info.height,
            info.frames,
            ours1 / ff1,
            ours2 / ff2
        );
    }
}

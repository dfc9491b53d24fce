//! Throughput benchmark: images/s from Fashion-MNIST and from a JPEG folder
//! through the loader, and decoded video frames/s against the `ffmpeg`
//! program decoding the same file in the same run.
//!
//! Run: `cargo bench -p dim-data --bench data` (prints a table; results are
//! recorded in docs/benchmarks/data.md).

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use dim_data::video::{decode_each, decode_frames, probe};
use dim_data::{
    Dataset, DecodeOptions, IdxDataset, ImageFolder, Loader, LoaderConfig, Split, Transform,
    Transformed,
};

#[path = "../tests/common/mod.rs"]
mod common;

/// Images per second through a loader, over `batches` batches after one warm-up batch.
fn loader_rate(ds: Arc<dyn Dataset>, batch: usize, workers: usize, batches: usize) -> f64 {
    let cfg = LoaderConfig {
        batch_size: batch,
        workers,
        prefetch: 2 * workers.max(1),
        pin_memory: false,
        ..Default::default()
    };
    let mut loader = Loader::new(ds, cfg).expect("loader");
    loader.next_batch().expect("batch").expect("batch");
    let t = Instant::now();
    let mut n = 0;
    for _ in 0..batches {
        n += loader
            .next_batch()
            .expect("batch")
            .expect("batch")
            .indices
            .len();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// Frames per second of the ffmpeg program decoding `path` to RGB24 (best of `reps`).
fn ffmpeg_rate(path: &Path, threads: usize, frames: usize, reps: usize) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            let threads = threads.to_string();
            let st =
                common::ffmpeg_rgb24(path, &["-threads", &threads], &["-an", "-y"], "/dev/null")
                    .stdout(Stdio::null())
                    .status()
                    .expect("ffmpeg program (run cargo xtask setup)");
            assert!(st.success());
            frames as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// Frames per second of our in-process decode of all frames (best of `reps`),
/// with `clips` decodes running in parallel threads. `collect`: keep every
/// frame in one clip buffer (`decode_frames`); otherwise stream them
/// (`decode_each`), as the program streams to /dev/null.
fn our_rate(path: &Path, frames: usize, clips: usize, reps: usize, collect: bool) -> f64 {
    let wanted: Vec<usize> = (0..frames).collect();
    let decode = || {
        if collect {
            let f = decode_frames(path, &wanted, DecodeOptions::default()).expect("decode");
            std::hint::black_box(f.data.len());
        } else {
            let mut sum = 0u64;
            decode_each(path, &wanted, DecodeOptions::default(), |rgb, _, _| {
                sum += rgb[rgb.len() / 2] as u64;
            })
            .expect("decode");
            std::hint::black_box(sum);
        }
    };
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..clips {
                    s.spawn(decode);
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
    // Optional section filter: `cargo bench --bench data -- video`.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let run = |section: &str| only.is_empty() || only.iter().any(|o| o == section);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine: {cores} cores, load average at start: {}",
        load.trim()
    );

    if run("fashion") {
        fashion();
    }
    if run("jpeg") {
        jpeg();
    }
    if run("video") {
        video();
    }
    if run("jpeg-parts") {
        jpeg_parts();
    }
}

/// Where the JPEG pipeline spends its time, per image, on one thread.
fn jpeg_parts() {
    let jpegs = common::opencv_jpegs();
    let (mut dec, mut crop, mut conv) = (0f64, 0f64, 0f64);
    for p in &jpegs {
        let t = Instant::now();
        let mut f = dim_data::decode_rgb(p).expect("decode");
        dec += t.elapsed().as_secs_f64();
        let t = Instant::now();
        f.center_crop_resize(256);
        crop += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = std::hint::black_box(f.to_tensor());
        conv += t.elapsed().as_secs_f64();
    }
    let n = jpegs.len() as f64;
    println!(
        "jpeg parts per image: decode {:.2} ms, center_crop_resize {:.2} ms, to_tensor {:.2} ms",
        1e3 * dec / n,
        1e3 * crop / n,
        1e3 * conv / n
    );
}

/// Prints the loader's images/s over `ds` with `transforms` in batches of
/// `batch`, with 1 and 2 workers.
fn loader_rates(
    label: &str,
    ds: impl Dataset + 'static,
    transforms: Vec<Transform>,
    batch: usize,
    batches: usize,
) {
    let ds: Arc<dyn Dataset> = Arc::new(Transformed::new(ds, transforms));
    for workers in [1, 2] {
        println!(
            "{label} batch {batch} workers {workers}: {:>9.1} images/s",
            loader_rate(ds.clone(), batch, workers, batches)
        );
    }
}

fn fashion() {
    // Fashion-MNIST: pad to 32, random flip, batch 256.
    let fm = IdxDataset::mnist_layout(common::fashion_dir(), Split::Train).expect("fashion-mnist");
    let transforms = vec![
        Transform::Pad { size: 32, value: 0 },
        Transform::RandomFlip { p: 0.5 },
    ];
    loader_rates("fashion-mnist  pad32+flip ", fm, transforms, 256, 60);
}

fn jpeg() {
    // JPEG folder: the opencv-doc sample photos, linked into 10 class
    // folders, ADM crop to 256 + flip.
    let jpegs = common::opencv_jpegs();
    let dir = tempfile::tempdir().expect("tempdir");
    for class in 0..10 {
        let d = dir.path().join(format!("class{class}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        for j in &jpegs {
            std::os::unix::fs::symlink(j, d.join(j.file_name().expect("name"))).expect("link");
        }
    }
    let folder = ImageFolder::with_classes(dir.path()).expect("jpeg folder");
    let label = format!("jpeg folder ({} photos) crop256+flip", folder.len());
    let transforms = vec![
        Transform::CenterCropResize { size: 256 },
        Transform::RandomFlip { p: 0.5 },
    ];
    loader_rates(&label, folder, transforms, 32, 8);
}

fn video() {
    // Video: full decode to RGB24 of real clips, us against the program,
    // alternating runs so both see the same machine load.
    for path in [
        common::video("bigbuckbunny.mp4"),
        common::video("bikes.mp4"),
        common::opencv_sample("Megamind.avi"),
    ] {
        let info = probe(&path).expect("probe");
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let (mut ours1, mut kept1, mut ff1, mut ours2, mut ff2) = (0f64, 0f64, 0f64, 0f64, 0f64);
        for _ in 0..5 {
            ours1 = ours1.max(our_rate(&path, info.frames, 1, 1, false));
            ff1 = ff1.max(ffmpeg_rate(&path, 1, info.frames, 1));
            kept1 = kept1.max(our_rate(&path, info.frames, 1, 1, true));
        }
        for _ in 0..3 {
            ours2 = ours2.max(our_rate(&path, info.frames, 2, 1, false));
            ff2 = ff2.max(ffmpeg_rate(&path, 2, info.frames, 1));
        }
        println!(
            "{name} ({}x{}, {} frames)\n  1 core : dim-data {ours1:6.1} fps (collecting the whole clip: {kept1:6.1}), ffmpeg -threads 1 {ff1:6.1} fps, ratio {:.2}\n  2 cores: dim-data 2 clips {ours2:6.1} fps, ffmpeg -threads 2 {ff2:6.1} fps, ratio {:.2}",
            info.width,
            info.height,
            info.frames,
            ours1 / ff1,
            ours2 / ff2
        );
    }
}

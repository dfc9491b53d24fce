//! Compiles the autograd shim (`csrc/scan_op.cpp`, against the venv's libtorch
//! headers) and, with the `cuda` feature and an nvcc at hand, every
//! `kernels/*.cu` into one static library.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dim_cuda)");
    dim_build::link_libtorch();
    let Some(libtorch) = dim_build::libtorch_dir() else {
        // Nothing to compile against; the crate's own build will then fail
        // in torch-sys with its message. Keep ours short.
        return;
    };
    let manifest = dim_build::manifest_dir();
    let kernels = manifest.join("../../kernels");
    let kernels = kernels.canonicalize().unwrap_or(kernels);

    let cuda = if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let found = dim_build::find_nvcc();
        if found.is_none() {
            println!(
                "cargo:warning=dim-scan: nvcc not found (run `cargo xtask setup`); building without CUDA kernels"
            );
            if std::env::var_os("DIM_REQUIRE_CUDA").is_some() {
                panic!("DIM_REQUIRE_CUDA is set but nvcc was not found");
            }
        }
        found
    } else {
        None
    };
    println!("cargo:rerun-if-env-changed=DIM_REQUIRE_CUDA");

    // The shim first: it references the kernels' symbols, and GNU ld resolves
    // static libraries in order.
    let cuda = cuda.filter(|nvcc| compile_kernels(nvcc, &kernels));
    if cuda.is_some() {
        // The shim uses libtorch's CUDA stream and allocator (libc10_cuda).
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-cfg=dim_cuda");
    }
    compile_shim(&manifest, &libtorch, &kernels, cuda.as_deref());
}

/// Compiles the kernels; on failure, warns and builds CPU-only unless
/// `DIM_REQUIRE_CUDA` is set (CI and the GPU bundle set it).
fn compile_kernels(nvcc: &Path, kernels: &Path) -> bool {
    let mut files: Vec<PathBuf> = std::fs::read_dir(kernels)
        .expect("kernels/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    files.sort();
    println!("cargo:rerun-if-changed={}", kernels.display());
    for entry in std::fs::read_dir(kernels).unwrap().flatten() {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
    let cuda_home = nvcc
        .parent()
        .and_then(Path::parent)
        .expect("nvcc in <cuda>/bin");
    println!(
        "cargo:rustc-link-search=native={}",
        cuda_home.join("lib").display()
    );
    let mut build = cc::Build::new();
    // cc finds nvcc through NVCC; handing the path to `.compiler()` would make
    // it treat nvcc as gcc.
    std::env::set_var("NVCC", nvcc);
    build
        .cuda(true)
        .cudart("static")
        .include(kernels)
        .flag("-std=c++17")
        .flag("-O3")
        .flag("--expt-relaxed-constexpr")
        // Five device images: compressed, they add ~2 MB to a binary instead
        // of ~25 (line info for the profiler lives in the harness build).
        .flag("--compress-mode=size")
        // SASS for A100 (sm_80), A10 / RTX 3090 (sm_86), L40 / RTX 4090
        // (sm_89) and H100 / H200 (sm_90), plus sm_80 PTX that any later card
        // can JIT. The kernels use no Hopper-only instructions; sm_90 adds
        // float4 atomics, behind __CUDA_ARCH__.
        .flag("-gencode=arch=compute_80,code=sm_80")
        .flag("-gencode=arch=compute_86,code=sm_86")
        .flag("-gencode=arch=compute_89,code=sm_89")
        .flag("-gencode=arch=compute_90,code=sm_90")
        .flag("-gencode=arch=compute_80,code=compute_80")
        .flag("-diag-suppress=177")
        .warnings(false)
        // cc would pass -G (device debug) in dev builds: slow kernels, slow builds.
        .debug(false)
        .files(&files);
    if let Ok(jobs) = std::env::var("NUM_JOBS") {
        // nvcc can compile several device architectures in parallel.
        build.flag(format!(
            "--threads={}",
            jobs.parse::<u32>().unwrap_or(1).min(4)
        ));
    }
    match build.try_compile("dim_scan_cuda") {
        Ok(()) => true,
        Err(e) if std::env::var_os("DIM_REQUIRE_CUDA").is_some() => {
            panic!("compiling kernels/*.cu failed: {e}")
        }
        Err(e) => {
            println!("cargo:warning=dim-scan: kernels/*.cu failed to compile ({e}); building without CUDA kernels");
            false
        }
    }
}

fn compile_shim(manifest: &Path, libtorch: &Path, kernels: &Path, nvcc: Option<&Path>) {
    let mut build = dim_build::cpp_shim(libtorch, &manifest.join("csrc/scan_op.cpp"));
    // The profiler bridge (src/profiler.rs) rides in the same library.
    let profiler = manifest.join("csrc/profiler.cpp");
    println!("cargo:rerun-if-changed={}", profiler.display());
    build.file(&profiler).include(kernels);
    if let Some(nvcc) = nvcc {
        let cuda_home = nvcc.parent().and_then(Path::parent).unwrap();
        build
            .include(cuda_home.join("include"))
            .define("DIM_WITH_CUDA", None);
    }
    build.compile("dim_scan_shim");
}

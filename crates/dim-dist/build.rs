//! Compiles `csrc/dist.cpp` against the venv's libtorch headers (c10d), with
//! NCCL when CUDA and NCCL headers are at hand, and links it.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dim_nccl)");
    dim_build::link_libtorch();
    let Some(libtorch) = dim_build::libtorch_dir() else {
        return;
    };
    let csrc = dim_build::manifest_dir().join("csrc");
    // The Gloo declarations too, not only dist.cpp.
    println!("cargo:rerun-if-changed={}", csrc.display());
    let mut build = dim_build::cpp_shim(&libtorch, &csrc.join("dist.cpp"));
    build
        // Gloo's own headers are not in the wheel: declarations suffice (see
        // csrc/gloo_decl/gloo/README.md).
        .include(csrc.join("gloo_decl"))
        .define("USE_C10D_GLOO", None)
        .define("USE_DISTRIBUTED", None);
    if let Some(nccl) = nccl_include(&libtorch) {
        let cuda = dim_build::cuda_home().expect("checked by nccl_include");
        build
            .include(cuda.join("include"))
            .include(nccl)
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .define("DIM_WITH_NCCL", None);
        println!("cargo:rustc-cfg=dim_nccl");
        // ProcessGroupNCCL lives in libtorch_cuda; its streams in libc10_cuda.
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    } else {
        println!(
            "cargo:warning=dim-dist: CUDA or NCCL headers not found; building Gloo (CPU) only"
        );
    }
    build.compile("dim_dist_shim");
    // c10d lives in libtorch_cpu; the shim is linked before it.
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// The NCCL header folder, when a CUDA toolkit is found too: the venv's
/// `nvidia/nccl` wheel next to torch, or `NCCL_INCLUDE_DIR`.
fn nccl_include(libtorch: &Path) -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=NCCL_INCLUDE_DIR");
    dim_build::cuda_home()?;
    let candidates = [
        std::env::var_os("NCCL_INCLUDE_DIR").map(PathBuf::from),
        libtorch.parent().map(|p| p.join("nvidia/nccl/include")),
        Some(PathBuf::from("/usr/include")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|d| d.join("nccl.h").exists())
}

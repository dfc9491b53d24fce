//! Compiles `csrc/dist.cpp` against the venv's libtorch headers (c10d), with
//! NCCL when CUDA and NCCL headers are at hand, and links it.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dim_nccl)");
    dim_build::link_libtorch();
    let Some(libtorch) = dim_build::libtorch_dir() else {
        return;
    };
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let csrc = manifest.join("csrc");
    println!("cargo:rerun-if-changed={}", csrc.display());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .std("c++17")
        .includes(dim_build::libtorch_includes(&libtorch))
        .include(dim_build::shim_include_dir())
        // Gloo's own headers are not in the wheel: declarations suffice (see
        // csrc/gloo_decl/gloo/README.md).
        .include(csrc.join("gloo_decl"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .define("USE_DISTRIBUTED", None)
        .flag("-O2")
        .warnings(false)
        .file(csrc.join("dist.cpp"));
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

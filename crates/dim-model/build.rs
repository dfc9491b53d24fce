//! Links libtorch and compiles the multi-tensor shim (`csrc/foreach.cpp`)
//! against the venv's libtorch headers.
use std::path::PathBuf;

fn main() {
    dim_build::link_libtorch();
    let Some(libtorch) = dim_build::libtorch_dir() else {
        // torch-sys fails the build with its own message.
        return;
    };
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let shim = manifest.join("csrc/foreach.cpp");
    println!("cargo:rerun-if-changed={}", shim.display());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .includes(dim_build::libtorch_includes(&libtorch))
        .include(dim_build::shim_include_dir())
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag("-O2")
        .warnings(false)
        .file(&shim)
        .compile("dim_model_foreach");
}

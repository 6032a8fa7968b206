//! Compiles the C++ shim over libtorch's c10d (TCPStore, PrefixStore, ProcessGroupGloo) and links
//! it with libtorch_cpu and c10, finding libtorch as tch's torch-sys does: through `LIBTORCH`
//! (set to `.libtorch` by `.cargo/config.toml`).
//!
//! The torch wheel ships no gloo headers, so `cxx/gloo_decls` declares the few gloo names that
//! `ProcessGroupGloo.hpp` mentions; the shim never touches a gloo object (docs/distributed.md).

#[path = "../../build/libtorch_cxx.rs"]
mod cxx;
#[path = "../../build/link_libtorch.rs"]
mod shared;

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=cxx");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        // The same message torch-sys would give, but before a C++ compiler error about headers.
        println!("cargo:warning=LIBTORCH is not set; run `cargo xtask setup` (it links .libtorch)");
        std::process::exit(1);
    };
    let libtorch = PathBuf::from(libtorch);
    cxx::libtorch_cxx_build(&libtorch)
        .include("cxx/gloo_decls")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .file("cxx/vh_dist.cpp")
        .compile("vh_dist_shim");
    if std::env::var_os("CARGO_FEATURE_NCCL").is_some() {
        build_nccl(&libtorch);
    }
    cxx::link_torch_cpu(&libtorch);
    // Run without LD_LIBRARY_PATH, and keep libtorch_cuda loaded so CUDA devices stay visible.
    shared::link_libtorch();
}

/// The NCCL half: libtorch's ProcessGroupNCCL.hpp needs the CUDA runtime headers (with `crt/`
/// and CCCL's `nv/target`, which only a CUDA toolkit has) and nccl.h (the nvidia-nccl wheel
/// beside torch has it).
fn build_nccl(libtorch: &std::path::Path) {
    println!("cargo:rerun-if-env-changed=VH_DIST_CUDA_INCLUDE");
    let site = libtorch.join("..");
    let mut build = cxx::libtorch_cxx_build(libtorch);
    if let Some(dirs) = std::env::var_os("VH_DIST_CUDA_INCLUDE") {
        for d in std::env::split_paths(&dirs) {
            build.include(d);
        }
    } else {
        build.include("/usr/local/cuda/include");
    }
    build
        .include(site.join("nvidia/cu13/include"))
        .include(site.join("nvidia/nccl/include"))
        .define("GLOG_USE_GLOG_EXPORT", None)
        .file("cxx/vh_dist_nccl.cpp")
        .compile("vh_dist_nccl_shim");
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
}

//! Compiles the C++ shim over libtorch's c10d (TCPStore, PrefixStore, ProcessGroupGloo) and links
//! it with libtorch_cpu and c10, finding libtorch as tch's torch-sys does: through `LIBTORCH`
//! (set to `.libtorch` by `.cargo/config.toml`).
//!
//! The torch wheel ships no gloo headers, so `cxx/gloo_decls` declares the few gloo names that
//! `ProcessGroupGloo.hpp` mentions; the shim never touches a gloo object (docs/distributed.md).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=cxx");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        // The same message torch-sys would give, but before a C++ compiler error about headers.
        println!("cargo:warning=LIBTORCH is not set; run `cargo xtask setup` (it links .libtorch)");
        std::process::exit(1);
    };
    let libtorch = PathBuf::from(libtorch);
    let include = libtorch.join("include");
    let lib = libtorch.join("lib");
    // PyTorch wheels since 2.7 are built with the C++11 ABI, as torch-sys assumes by default.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include("cxx/gloo_decls")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("cxx/vh_dist.cpp")
        .compile("vh_dist_shim");
    if std::env::var_os("CARGO_FEATURE_NCCL").is_some() {
        build_nccl(&libtorch, &abi);
    }
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    // As build/link_libtorch.rs: run without LD_LIBRARY_PATH, and keep libtorch_cuda loaded so
    // CUDA devices stay visible where the wheel has them.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// The NCCL half: libtorch's ProcessGroupNCCL.hpp needs the CUDA runtime headers (with `crt/`
/// and CCCL's `nv/target`, which only a CUDA toolkit has) and nccl.h (the nvidia-nccl wheel
/// beside torch has it).
fn build_nccl(libtorch: &std::path::Path, abi: &str) {
    println!("cargo:rerun-if-env-changed=VH_DIST_CUDA_INCLUDE");
    let site = libtorch.join("..");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"));
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
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("cxx/vh_dist_nccl.cpp")
        .compile("vh_dist_nccl_shim");
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
}

//! Shared by the build scripts that compile a C++ shim against libtorch's headers (vh-train's
//! fused AdamW, vh-dist's c10d): the compiler settings that must match the torch wheel, and the
//! libraries a shim links. Included with `#[path]`, as build/link_libtorch.rs is.

use std::path::Path;

/// A C++17 build against the headers of `libtorch` with the wheel's C++ ABI
/// (`LIBTORCH_CXX11_ABI`, default 1: PyTorch wheels since 2.7 use the C++11 ABI, as torch-sys
/// assumes).
pub fn libtorch_cxx_build(libtorch: &Path) -> cc::Build {
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    let include = libtorch.join("include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .std("c++17")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str());
    build
}

/// Links a shim's libtorch dependencies: libtorch_cpu and c10 from `libtorch`/lib.
pub fn link_torch_cpu(libtorch: &Path) {
    println!("cargo:rustc-link-search=native={}", libtorch.join("lib").display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

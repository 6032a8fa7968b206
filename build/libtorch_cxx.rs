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

/// An optional shim of crate `krate`: compiled from `source` into library `lib` when `LIBTORCH`
/// names a libtorch whose include folder has `header`, and then announced as `--cfg {cfg}`;
/// otherwise a cargo warning, and the crate builds without it (its Rust side falls back or
/// reports a typed error). Returns whether it was built.
#[allow(dead_code)] // vh-dist includes this file and always needs its shim.
///
/// With `openmp`, the source's `at::parallel_for` runs on libtorch's own OpenMP threads: ATen's
/// OpenMP build defines that loop in its headers with `#pragma omp`, which a compiler without
/// `-fopenmp` drops (one thread). It links the libgomp that libtorch itself loads (its lib
/// folder's libgomp.so.1), never a second OpenMP runtime; without that file the loop stays serial.
pub fn optional_shim(krate: &str, source: &str, header: &str, lib: &str, cfg: &str, openmp: bool) -> bool {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed={source}");
    // build/shim_guard.h: the error plumbing every optional shim shares.
    let guard_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build");
    println!("cargo:rerun-if-changed={}", guard_dir.join("shim_guard.h").display());
    println!("cargo:rustc-check-cfg=cfg({cfg})");
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(std::path::PathBuf::from) else {
        println!("cargo:warning={krate}: LIBTORCH is not set, building without {source}");
        return false;
    };
    let include = libtorch.join("include");
    if !include.join(header).is_file() {
        println!(
            "cargo:warning={krate}: {} has no {header}, building without {source}",
            include.display()
        );
        return false;
    }
    let gomp = libtorch.join("lib").join("libgomp.so.1");
    let with_openmp = openmp && gomp.is_file();
    let mut build = libtorch_cxx_build(&libtorch);
    build.include(&guard_dir).file(source).flag_if_supported("-w");
    if with_openmp {
        build.flag("-fopenmp");
    }
    build.compile(lib);
    link_torch_cpu(&libtorch);
    if with_openmp {
        println!("cargo:rustc-link-lib=dylib:+verbatim=libgomp.so.1");
    } else if openmp {
        println!(
            "cargo:warning={krate}: {} is missing, {source}'s loops run on one thread",
            gomp.display()
        );
    }
    println!("cargo:rustc-cfg={cfg}");
    true
}

//! Compiles the C++ shim over libtorch's `at::cuda::CUDAGraph` (csrc/shim.cpp) when the
//! libtorch headers, libtorch_cuda and the CUDA runtime headers are all found, and a stub with
//! the same functions (each answering "CUDA graphs unavailable") otherwise, so the crate builds
//! on every machine: CPU-only ones and CI included. Running graphs needs a GPU; building never
//! does.
//!
//! libtorch comes from `LIBTORCH` (the workspace's `.cargo/config.toml` points it at the setup's
//! torch package). The CUDA runtime headers come from `VH_CUDA_INCLUDE` when set, else from the
//! nvidia wheels next to that torch package (`nvidia/cu13/include`, `nvidia/cuda_runtime/include`),
//! else `$CUDA_HOME/include` or `/usr/local/cuda/include`; the compiler-internal `crt/` headers
//! the runtime wheels lack come from `VH_CUDA_CRT_INCLUDE` or triton's copy (see `crt_include`).
//! `VH_CUDA_GRAPH_STUB=1` builds the stub even where the real shim could be built.

use std::path::{Path, PathBuf};

fn cuda_include(libtorch: &Path) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("VH_CUDA_INCLUDE") {
        candidates.push(PathBuf::from(dir));
    }
    // .libtorch is usually a link to site-packages/torch: its nvidia wheels sit beside it.
    let torch = libtorch.canonicalize().unwrap_or_else(|_| libtorch.to_path_buf());
    if let Some(site) = torch.parent() {
        for wheel in ["cu13", "cuda_runtime", "cu12"] {
            candidates.push(site.join("nvidia").join(wheel).join("include"));
        }
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        candidates.push(PathBuf::from(home).join("include"));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    candidates
        .into_iter()
        .find(|dir| dir.join("cuda_runtime_api.h").is_file())
}

/// The folder holding `crt/host_config.h` and the other compiler-internal headers that
/// `cuda_runtime.h` includes: next to it in a full CUDA install; the nvidia runtime wheels leave
/// them out, and triton (a dependency of torch on Linux) carries a complete set.
fn crt_include(cuda: &Path, libtorch: &Path) -> Option<PathBuf> {
    let mut candidates = vec![cuda.to_path_buf()];
    if let Some(dir) = std::env::var_os("VH_CUDA_CRT_INCLUDE") {
        candidates.insert(0, PathBuf::from(dir));
    }
    let torch = libtorch.canonicalize().unwrap_or_else(|_| libtorch.to_path_buf());
    if let Some(site) = torch.parent() {
        candidates.push(site.join("triton/backends/nvidia/include"));
    }
    candidates
        .into_iter()
        .find(|dir| dir.join("crt/host_config.h").is_file())
}

/// Why the real shim cannot be built here, or the include folders and library folder it needs.
fn locate() -> Result<(Vec<PathBuf>, PathBuf), String> {
    if std::env::var_os("VH_CUDA_GRAPH_STUB").is_some_and(|v| !v.is_empty() && v != "0") {
        return Err("VH_CUDA_GRAPH_STUB is set".to_string());
    }
    let libtorch = std::env::var_os("LIBTORCH")
        .map(PathBuf::from)
        .ok_or_else(|| "LIBTORCH is not set".to_string())?;
    let include = libtorch.join("include");
    if !include.join("ATen/cuda/CUDAGraph.h").is_file() {
        return Err(format!("{} has no ATen/cuda/CUDAGraph.h", include.display()));
    }
    let lib = libtorch.join("lib");
    if !lib.join("libtorch_cuda.so").is_file() || !lib.join("libc10_cuda.so").is_file() {
        return Err(format!(
            "{} has no libtorch_cuda.so / libc10_cuda.so (a CPU-only libtorch)",
            lib.display()
        ));
    }
    let cuda =
        cuda_include(&libtorch).ok_or_else(|| "no CUDA runtime headers (cuda_runtime_api.h) found".to_string())?;
    let crt = crt_include(&cuda, &libtorch).ok_or_else(|| {
        format!(
            "{} has no crt/host_config.h and no other copy was found",
            cuda.display()
        )
    })?;
    let mut includes = vec![include.clone(), include.join("torch/csrc/api/include"), cuda.clone()];
    if crt != cuda {
        includes.push(crt);
    }
    Ok((includes, lib))
}

fn main() {
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-changed=csrc/stub.cpp");
    for var in [
        "LIBTORCH",
        "VH_CUDA_INCLUDE",
        "VH_CUDA_CRT_INCLUDE",
        "CUDA_HOME",
        "LIBTORCH_CXX11_ABI",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    match locate() {
        Ok((includes, lib)) => {
            let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
            let mut build = cc::Build::new();
            build
                .cpp(true)
                .std("c++17")
                .file("csrc/shim.cpp")
                .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
                .warnings(false)
                .flag_if_supported("-w");
            for dir in &includes {
                build.include(dir);
            }
            build.compile("vh_cuda_graph_shim");
            println!("cargo:rustc-link-search=native={}", lib.display());
            // This crate's own test binary finds libtorch without LD_LIBRARY_PATH (dependents
            // embed the same path through build/link_libtorch.rs).
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
            for name in ["torch_cuda", "c10_cuda", "torch_cpu", "c10"] {
                println!("cargo:rustc-link-lib=dylib={name}");
            }
            println!("cargo:rustc-cfg=vh_cuda_graph_shim");
        }
        Err(reason) => {
            println!("cargo:warning=vh-cuda-graph: building the stub (CUDA graphs unavailable): {reason}");
            cc::Build::new()
                .cpp(true)
                .file("csrc/stub.cpp")
                .define("VH_CG_REASON", format!("\"{}\"", reason.replace('"', "'")).as_str())
                .compile("vh_cuda_graph_shim");
        }
    }
    println!("cargo:rustc-check-cfg=cfg(vh_cuda_graph_shim)");
}

//! Links libtorch as every crate of ours does (build/link_libtorch.rs) and compiles the C++ shim
//! over libtorch's fused AdamW (csrc/fused_adamw.cpp) against the headers of the same libtorch
//! (`LIBTORCH`, which the workspace's .cargo/config.toml sets). Without `LIBTORCH` (tch fetching
//! its own libtorch) there are no headers to build against: the crate then builds without the
//! fused optimiser and asking for it is a typed error.

#[path = "../../build/link_libtorch.rs"]
mod shared;

use std::path::PathBuf;

fn main() {
    shared::link_libtorch();
    println!("cargo:rerun-if-changed=csrc/fused_adamw.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rustc-check-cfg=cfg(vh_fused_adamw)");
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        println!("cargo:warning=vh-train: LIBTORCH is not set, building without the fused AdamW shim");
        return;
    };
    let include = libtorch.join("include");
    if !include.join("ATen/ops/_fused_adamw.h").is_file() {
        println!(
            "cargo:warning=vh-train: {} has no ATen/ops/_fused_adamw.h, building without the fused AdamW shim",
            include.display()
        );
        return;
    }
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("csrc/fused_adamw.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .warnings(false)
        .flag_if_supported("-w")
        .compile("vh_fused_adamw");
    println!("cargo:rustc-link-search=native={}", libtorch.join("lib").display());
    for name in ["torch_cpu", "c10"] {
        println!("cargo:rustc-link-lib=dylib={name}");
    }
    println!("cargo:rustc-cfg=vh_fused_adamw");
}

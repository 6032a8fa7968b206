//! Links libtorch as every crate of ours does (build/link_libtorch.rs) and compiles the C++ shim
//! over libtorch's fused AdamW (csrc/fused_adamw.cpp) against the headers of the same libtorch
//! (`LIBTORCH`, which the workspace's .cargo/config.toml sets). Without `LIBTORCH` (tch fetching
//! its own libtorch) there are no headers to build against: the crate then builds without the
//! fused optimiser and asking for it is a typed error.

#[path = "../../build/libtorch_cxx.rs"]
mod cxx;
#[path = "../../build/link_libtorch.rs"]
mod shared;

use std::path::PathBuf;

fn main() {
    shared::link_libtorch();
    println!("cargo:rerun-if-changed=csrc/fused_adamw.cpp");
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
    cxx::libtorch_cxx_build(&libtorch)
        .file("csrc/fused_adamw.cpp")
        .flag_if_supported("-w")
        .compile("vh_fused_adamw");
    cxx::link_torch_cpu(&libtorch);
    println!("cargo:rustc-cfg=vh_fused_adamw");
}

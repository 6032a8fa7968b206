//! Links libtorch as every crate of ours does (build/link_libtorch.rs) and compiles the C++ shim
//! over oneDNN's dense linear (csrc/linear_pointwise.cpp) against the headers of the same
//! libtorch (`LIBTORCH`, which the workspace's .cargo/config.toml sets). Without `LIBTORCH`
//! there are no headers: few-row products then reach oneDNN through tch's `mkldnn_linear` and
//! two layout conversions instead.

#[path = "../../build/libtorch_cxx.rs"]
mod cxx;
#[path = "../../build/link_libtorch.rs"]
mod shared;

use std::path::PathBuf;

fn main() {
    shared::link_libtorch();
    println!("cargo:rerun-if-changed=csrc/linear_pointwise.cpp");
    println!("cargo:rustc-check-cfg=cfg(vh_linear_pointwise)");
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        println!("cargo:warning=vh-core: LIBTORCH is not set, building without the oneDNN linear shim");
        return;
    };
    if !libtorch.join("include/ATen/core/dispatch/Dispatcher.h").is_file() {
        println!(
            "cargo:warning=vh-core: no libtorch headers under {}, building without the oneDNN linear shim",
            libtorch.display()
        );
        return;
    }
    cxx::libtorch_cxx_build(&libtorch)
        .file("csrc/linear_pointwise.cpp")
        .flag_if_supported("-w")
        .compile("vh_linear_pointwise");
    cxx::link_torch_cpu(&libtorch);
    println!("cargo:rustc-cfg=vh_linear_pointwise");
}

//! Links libtorch as every crate of ours does (build/link_libtorch.rs) and compiles the C++ shim
//! over oneDNN's dense linear (csrc/linear_pointwise.cpp) against the headers of the same
//! libtorch (`LIBTORCH`, which the workspace's .cargo/config.toml sets). Without those headers,
//! few-row products reach oneDNN through tch's `mkldnn_linear` and two layout conversions.

#[path = "../../build/libtorch_cxx.rs"]
mod cxx;
#[path = "../../build/link_libtorch.rs"]
mod shared;

fn main() {
    shared::link_libtorch();
    cxx::optional_shim(
        "vh-core",
        "csrc/linear_pointwise.cpp",
        "ATen/core/dispatch/Dispatcher.h",
        "vh_linear_pointwise",
        "vh_linear_pointwise",
        true,
    );
}

//! Links libtorch as every crate of ours does (build/link_libtorch.rs) and compiles the C++ shim
//! over libtorch's fused AdamW (csrc/fused_adamw.cpp) against the headers of the same libtorch
//! (`LIBTORCH`, which the workspace's .cargo/config.toml sets). Without `LIBTORCH` (tch fetching
//! its own libtorch) there are no headers to build against: the crate then builds without the
//! fused optimiser and asking for it is a typed error.

#[path = "../../build/libtorch_cxx.rs"]
mod cxx;
#[path = "../../build/link_libtorch.rs"]
mod shared;

fn main() {
    shared::link_libtorch();
    cxx::optional_shim(
        "vh-train",
        "csrc/fused_adamw.cpp",
        "ATen/ops/_fused_adamw.h",
        "vh_fused_adamw",
        "vh_fused_adamw",
        false,
    );
}

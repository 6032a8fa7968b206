//! Build script shared by every crate whose binaries link libtorch.
//!
//! It embeds the libtorch folder in the binaries' run path, so tests and `vh` run without
//! LD_LIBRARY_PATH, and keeps libtorch_cuda linked even though no symbol of it is referenced
//! directly: without it CUDA devices are invisible, and with it the binaries still run on
//! machines without a GPU.

use std::path::PathBuf;

#[allow(dead_code)] // a crate with a build script of its own includes this as a module
fn main() {
    link_libtorch();
}

/// Embeds libtorch's folder in the run path and keeps libtorch_cuda linked (see above).
pub fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        return;
    };
    let lib = PathBuf::from(libtorch).join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

//! The shim's C ABI (cxx/vh_dist.cpp). Tensors travel as tch's `C_tensor` pointers, which are
//! `at::Tensor*` on the C++ side.

use std::ffi::c_void;
use std::os::raw::{c_char, c_int};

/// An `at::Tensor*` (tch does not re-export torch-sys' `C_tensor`, so pointers are cast).
#[allow(non_camel_case_types)]
pub(crate) type C_tensor = c_void;

/// Opaque process group (store + Gloo backend) owned by the shim.
#[repr(C)]
pub(crate) struct VhdPg {
    _private: [u8; 0],
}

extern "C" {
    pub(crate) fn vhd_free_string(s: *mut c_char);
    pub(crate) fn vhd_init(
        addr: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        out: *mut *mut VhdPg,
        err: *mut *mut c_char,
    ) -> c_int;
    #[cfg(feature = "nccl")]
    pub(crate) fn vhd_init_nccl(
        addr: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        out: *mut *mut VhdPg,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn vhd_free(pg: *mut VhdPg);
    pub(crate) fn vhd_all_reduce_sum(pg: *mut VhdPg, t: *mut C_tensor, err: *mut *mut c_char) -> c_int;
    pub(crate) fn vhd_broadcast(pg: *mut VhdPg, t: *mut C_tensor, root: c_int, err: *mut *mut c_char) -> c_int;
    pub(crate) fn vhd_barrier(pg: *mut VhdPg, err: *mut *mut c_char) -> c_int;
    pub(crate) fn vhd_all_gather(
        pg: *mut VhdPg,
        t: *mut C_tensor,
        world: c_int,
        outs: *mut *mut C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
}

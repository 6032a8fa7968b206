//! A c10d process group (TCPStore rendezvous + ProcessGroupGloo) and its collectives.

use crate::env::DistEnv;
use crate::error::{DistError, FailureKind, Result};
use crate::ffi;
use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int};
use std::ptr;
use std::time::Duration;
use tch::Tensor;

/// The c10d backend that carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// ProcessGroupGloo: CPU tensors (the tested path).
    #[default]
    Gloo,
    /// ProcessGroupNCCL: CUDA tensors; needs the `nccl` cargo feature and is untested here.
    Nccl,
}

/// One rank's membership of a Gloo group on PyTorch's c10d; collectives must be issued in the
/// same order on every rank.
pub struct ProcessGroup {
    raw: *mut ffi::VhdPg,
    rank: usize,
    world_size: usize,
    local_rank: usize,
    timeout: Duration,
}

// c10d's backends may be driven from any thread (Python's releases the GIL around them); the
// group is not Sync because collectives from two threads at once would interleave differently
// on different ranks.
unsafe impl Send for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("local_rank", &self.local_rank)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Turns a shim return code and message into a typed error.
fn check(op: &'static str, code: c_int, err: *mut c_char) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    let message = if err.is_null() {
        "(no message)".to_owned()
    } else {
        // SAFETY: the shim returns a NUL-terminated malloc'ed string, freed right after.
        let m = unsafe { CStr::from_ptr(err) }.to_string_lossy().trim().to_owned();
        unsafe { ffi::vhd_free_string(err) };
        m
    };
    Err(DistError::Collective {
        op,
        kind: FailureKind::from_code(code),
        message,
    })
}

/// Refuses tensors that Gloo cannot use, before they reach C++.
fn check_tensor(op: &str, t: &Tensor) -> Result<()> {
    if !t.defined() {
        return Err(DistError::InvalidArgument(format!("{op}: undefined tensor")));
    }
    if !t.is_contiguous() {
        return Err(DistError::InvalidArgument(format!(
            "{op}: the tensor must be contiguous (call .contiguous() and copy back)"
        )));
    }
    Ok(())
}

impl ProcessGroup {
    /// Joins the group the torchrun variables describe (see [`DistEnv::from_env`]).
    pub fn from_env() -> Result<Self> {
        Self::new(&DistEnv::from_env()?)
    }

    /// Rendezvous at `env.master_addr:master_port` (rank 0 hosts the TCPStore) and builds the
    /// Gloo group; fails with a timeout error if some rank does not arrive within `env.timeout`.
    pub fn new(env: &DistEnv) -> Result<Self> {
        Self::with_backend(env, Backend::Gloo)
    }

    /// As [`ProcessGroup::new`], on the chosen backend.
    pub fn with_backend(env: &DistEnv, backend: Backend) -> Result<Self> {
        env.validate()?;
        let init = match backend {
            Backend::Gloo => ffi::vhd_init,
            #[cfg(feature = "nccl")]
            Backend::Nccl => ffi::vhd_init_nccl,
            #[cfg(not(feature = "nccl"))]
            Backend::Nccl => {
                return Err(DistError::InvalidArgument(
                    "the NCCL backend is not compiled in: build vh-dist with the `nccl` feature".into(),
                ))
            }
        };
        let addr = CString::new(env.master_addr.as_str())
            .map_err(|_| DistError::InvalidArgument("MASTER_ADDR contains a NUL byte".into()))?;
        let timeout_ms = i64::try_from(env.timeout.as_millis())
            .map_err(|_| DistError::InvalidArgument("timeout too large".into()))?
            .max(1);
        let mut raw = ptr::null_mut();
        let mut err = ptr::null_mut();
        // SAFETY: valid C string, out-pointers to locals; the shim catches every exception.
        let code = unsafe {
            init(
                addr.as_ptr(),
                c_int::from(env.master_port),
                env.rank as c_int,
                env.world_size as c_int,
                timeout_ms,
                &mut raw,
                &mut err,
            )
        };
        check("init", code, err)?;
        Ok(Self {
            raw,
            rank: env.rank,
            world_size: env.world_size,
            local_rank: env.local_rank,
            timeout: env.timeout,
        })
    }

    /// This process's global rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Rank within this machine.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Whether this is rank 0 (the one that saves and logs).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Timeout of every collective.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sums `t` in place over all ranks.
    pub fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        check_tensor("all_reduce", t)?;
        let mut err = ptr::null_mut();
        // SAFETY: `t` is a live tensor; the C++ side copies the handle, not the pointer.
        let code = unsafe { ffi::vhd_all_reduce_sum(self.raw, t.as_mut_ptr() as *mut ffi::C_tensor, &mut err) };
        check("all_reduce", code, err)
    }

    /// Averages `t` in place over all ranks (sum, then division by the world size, as DDP does).
    pub fn all_reduce_mean(&self, t: &mut Tensor) -> Result<()> {
        if t.defined() && !t.is_floating_point() {
            return Err(DistError::InvalidArgument(format!(
                "all_reduce_mean needs a floating-point tensor, got {:?}",
                t.kind()
            )));
        }
        self.all_reduce_sum(t)?;
        // Leaves that require grad refuse in-place ops under autograd; this is data, not graph.
        let _ = tch::no_grad(|| t.f_div_scalar_(self.world_size as f64))?;
        Ok(())
    }

    /// Overwrites `t` on every rank with rank `root`'s.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        check_tensor("broadcast", t)?;
        if root >= self.world_size {
            return Err(DistError::InvalidArgument(format!(
                "broadcast root {root} is not below the world size {}",
                self.world_size
            )));
        }
        let mut err = ptr::null_mut();
        // SAFETY: as in all_reduce_sum.
        let code =
            unsafe { ffi::vhd_broadcast(self.raw, t.as_mut_ptr() as *mut ffi::C_tensor, root as c_int, &mut err) };
        check("broadcast", code, err)
    }

    /// Waits until every rank has reached this point.
    pub fn barrier(&self) -> Result<()> {
        let mut err = ptr::null_mut();
        // SAFETY: the group is live.
        let code = unsafe { ffi::vhd_barrier(self.raw, &mut err) };
        check("barrier", code, err)
    }

    /// Every rank's `t` (same shape and kind on all ranks), in rank order.
    pub fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        check_tensor("all_gather", t)?;
        let mut outs: Vec<*mut ffi::C_tensor> = vec![ptr::null_mut(); self.world_size];
        let mut err = ptr::null_mut();
        // SAFETY: `outs` has world_size slots; the shim fills them only on success.
        let code = unsafe {
            ffi::vhd_all_gather(
                self.raw,
                t.as_ptr() as *mut ffi::C_tensor,
                self.world_size as c_int,
                outs.as_mut_ptr(),
                &mut err,
            )
        };
        // Take ownership of whatever was allocated, so nothing leaks on a partial failure.
        let tensors: Vec<Tensor> = outs
            .into_iter()
            .filter(|p| !p.is_null())
            .map(|p| unsafe { Tensor::from_ptr(p as *mut _) })
            .collect();
        check("all_gather", code, err)?;
        Ok(tensors)
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: created by vhd_init, freed once; the shim swallows destructor exceptions.
        unsafe { ffi::vhd_free(self.raw) }
    }
}

//! CUDA graphs for valuehead: capture a sequence of libtorch operations once and replay it with
//! one launch, through a small C++ shim over libtorch's `at::cuda::CUDAGraph` (tch has no binding
//! for it).
//!
//! Capture runs on a side stream taken from libtorch's pool, into the graph's own private memory
//! pool, as `torch.cuda.graph` does; replay runs on the current stream. Tensors the captured
//! operations read or write must keep their storage (same addresses) for as long as the graph is
//! replayed: copy new inputs into them in place.
//!
//! The crate builds everywhere: where the libtorch CUDA headers and libraries or the CUDA
//! runtime headers are missing, a stub is compiled instead and every call returns
//! [`GraphError::Unavailable`]. Errors from libtorch (C++ exceptions) come back as
//! [`GraphError::Cuda`], never as an abort.

use std::ffi::{c_char, c_int, c_void, CStr};

mod ffi {
    use super::*;
    extern "C" {
        pub fn vh_cg_available() -> c_int;
        pub fn vh_cg_device_count(count: *mut c_int, err: *mut c_char, len: usize) -> c_int;
        pub fn vh_cg_create(out: *mut *mut c_void, err: *mut c_char, len: usize) -> c_int;
        pub fn vh_cg_destroy(handle: *mut c_void);
        pub fn vh_cg_capture_begin(handle: *mut c_void, device: c_int, err: *mut c_char, len: usize) -> c_int;
        pub fn vh_cg_capture_end(handle: *mut c_void, err: *mut c_char, len: usize) -> c_int;
        pub fn vh_cg_replay(handle: *mut c_void, err: *mut c_char, len: usize) -> c_int;
        pub fn vh_cg_synchronize(device: c_int, err: *mut c_char, len: usize) -> c_int;
        pub fn vh_cg_memory_stats(
            device: c_int,
            allocated_peak: *mut u64,
            reserved_peak: *mut u64,
            err: *mut c_char,
            len: usize,
        ) -> c_int;
        pub fn vh_cg_reset_peak_memory(device: c_int, err: *mut c_char, len: usize) -> c_int;
    }
}

/// What can go wrong with a CUDA graph.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum GraphError {
    /// This build or machine cannot run CUDA graphs (no CUDA libtorch or headers at build time,
    /// no CUDA device).
    #[error("{0}")]
    Unavailable(String),
    /// libtorch or the CUDA runtime reported an error (e.g. an operation that is not allowed
    /// while capturing, such as a host synchronisation).
    #[error("CUDA graph error: {0}")]
    Cuda(String),
    /// The graph was used out of order (replay before capture, capture twice).
    #[error("CUDA graph misuse: {0}")]
    Usage(String),
}

/// The result of a graph operation.
pub type Result<T> = std::result::Result<T, GraphError>;

const MESSAGE_LEN: usize = 2048;

/// Calls a shim function with an error buffer and turns its code into a `Result`.
fn call(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut buffer = vec![0 as c_char; MESSAGE_LEN];
    let code = f(buffer.as_mut_ptr(), buffer.len());
    if code == 0 {
        return Ok(());
    }
    // SAFETY: the shim writes a NUL-terminated string of at most `len` bytes (snprintf), and the
    // buffer starts zeroed, so there is a NUL within it either way.
    let message = unsafe { CStr::from_ptr(buffer.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    Err(match code {
        2 => GraphError::Unavailable(message),
        _ => GraphError::Cuda(message),
    })
}

/// Whether this build has the real shim (compiled against libtorch's CUDA headers). A GPU is
/// still needed to run graphs: see [`is_available`].
pub fn is_compiled() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { ffi::vh_cg_available() != 0 }
}

/// CUDA devices libtorch sees (0 without the shim or a GPU).
pub fn device_count() -> usize {
    let mut count: c_int = 0;
    // SAFETY: `count` outlives the call; the buffer is provided by `call`.
    match call(|err, len| unsafe { ffi::vh_cg_device_count(&mut count, err, len) }) {
        Ok(()) => count.max(0) as usize,
        Err(_) => 0,
    }
}

/// Whether CUDA graphs can run here: the shim is compiled in and a CUDA device exists.
pub fn is_available() -> bool {
    is_compiled() && device_count() > 0
}

/// The reason graphs cannot run here, or `None` when they can.
pub fn unavailable_reason() -> Option<String> {
    if !is_compiled() {
        let mut handle = std::ptr::null_mut();
        // SAFETY: the stub only writes the message and a null handle.
        return Some(
            match call(|err, len| unsafe { ffi::vh_cg_create(&mut handle, err, len) }) {
                Err(e) => e.to_string(),
                Ok(()) => "CUDA graphs unavailable".to_string(),
            },
        );
    }
    (device_count() == 0).then(|| "CUDA graphs unavailable: no CUDA device".to_string())
}

/// Waits for every queued operation on a CUDA device.
pub fn synchronize(device: usize) -> Result<()> {
    let device = device_index(device)?;
    // SAFETY: plain values and the buffer from `call`.
    call(|err, len| unsafe { ffi::vh_cg_synchronize(device, err, len) })
}

/// Peak bytes allocated and reserved by libtorch's CUDA caching allocator on `device` since the
/// last [`reset_peak_memory`] (what `torch.cuda.max_memory_allocated` / `max_memory_reserved`
/// report).
pub fn peak_memory(device: usize) -> Result<(u64, u64)> {
    let device = device_index(device)?;
    let (mut allocated, mut reserved) = (0u64, 0u64);
    // SAFETY: both outputs outlive the call.
    call(|err, len| unsafe { ffi::vh_cg_memory_stats(device, &mut allocated, &mut reserved, err, len) })?;
    Ok((allocated, reserved))
}

/// Resets the peaks [`peak_memory`] reports.
pub fn reset_peak_memory(device: usize) -> Result<()> {
    let device = device_index(device)?;
    // SAFETY: plain values and the buffer from `call`.
    call(|err, len| unsafe { ffi::vh_cg_reset_peak_memory(device, err, len) })
}

fn device_index(device: usize) -> Result<c_int> {
    c_int::try_from(device).map_err(|_| GraphError::Usage(format!("no CUDA device {device}")))
}

/// One CUDA graph: captured once, replayed any number of times.
#[derive(Debug)]
pub struct CudaGraph {
    handle: *mut c_void,
    device: usize,
    captured: bool,
}

// SAFETY: the handle owns a heap-allocated at::cuda::CUDAGraph that no other object refers to;
// libtorch allows using and destroying it from any thread (one at a time, which `&mut` and
// ownership guarantee: the type is not `Sync`).
unsafe impl Send for CudaGraph {}

impl CudaGraph {
    /// Captures what `body` queues on CUDA `device` as a graph. Nothing `body` queues runs
    /// during capture: replay to run it. `body` must not read device data on the host (that
    /// invalidates the capture, reported as [`GraphError::Cuda`]) and must leave the tensors it
    /// writes alive for every replay. The capture always ends, whether `body` fails or not; a
    /// failure of `body` is returned as `Ok(Err(..))` after the capture is discarded.
    pub fn capture<T, E>(
        device: usize,
        body: impl FnOnce() -> std::result::Result<T, E>,
    ) -> Result<std::result::Result<(CudaGraph, T), E>> {
        let mut handle = std::ptr::null_mut();
        // SAFETY: `handle` outlives the call; on success it owns a new graph.
        call(|err, len| unsafe { ffi::vh_cg_create(&mut handle, err, len) })?;
        let mut graph = CudaGraph {
            handle,
            device,
            captured: false,
        };
        let index = device_index(device)?;
        // SAFETY: `graph.handle` is a live graph.
        call(|err, len| unsafe { ffi::vh_cg_capture_begin(graph.handle, index, err, len) })?;
        let result = body();
        // SAFETY: as above; capture_end always leaves capture mode and restores the stream.
        let ended = call(|err, len| unsafe { ffi::vh_cg_capture_end(graph.handle, err, len) });
        match (result, ended) {
            (Ok(value), Ok(())) => {
                graph.captured = true;
                Ok(Ok((graph, value)))
            }
            (Err(e), _) => Ok(Err(e)),
            (Ok(_), Err(e)) => Err(e),
        }
    }

    /// Runs the captured operations again, on the current stream.
    pub fn replay(&self) -> Result<()> {
        if !self.captured {
            return Err(GraphError::Usage("replay of a graph that was not captured".into()));
        }
        // SAFETY: `self.handle` is a live, captured graph.
        call(|err, len| unsafe { ffi::vh_cg_replay(self.handle, err, len) })
    }

    /// The CUDA device the graph was captured on.
    pub fn device(&self) -> usize {
        self.device
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: the handle came from vh_cg_create and is destroyed once.
        unsafe { ffi::vh_cg_destroy(self.handle) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_everything_is_a_typed_error() {
        if is_available() {
            return;
        }
        assert!(unavailable_reason().is_some());
        let captured = CudaGraph::capture(0, || Ok::<(), ()>(()));
        assert!(
            matches!(captured, Err(GraphError::Unavailable(_) | GraphError::Cuda(_))),
            "{captured:?}"
        );
        assert!(peak_memory(0).is_err() || is_compiled());
        assert!(device_index(usize::MAX).is_err());
    }
}

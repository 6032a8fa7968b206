//! Data-parallel training for valuehead on PyTorch's own distributed engine.
//!
//! A small C++ shim (cxx/vh_dist.cpp) drives libtorch's c10d — the `TCPStore` rendezvous and
//! `ProcessGroupGloo` — exactly as `torch.distributed` does, so a Rust rank and a Python rank
//! can share one group. Processes find each other through torchrun's variables:
//!
//! ```no_run
//! # fn main() -> vh_dist::Result<()> {
//! let pg = vh_dist::ProcessGroup::from_env()?; // RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
//! let vs = tch::nn::VarStore::new(tch::Device::Cpu);
//! // ... build the model in `vs` ...
//! vh_dist::broadcast_parameters(&pg, &vs, 0)?; // every rank starts from rank 0's weights
//! // per step: forward/backward on this rank's batch, then
//! vh_dist::all_reduce_gradients(&pg, &vs, vh_dist::DEFAULT_BUCKET_BYTES)?;
//! // ... optimizer step ...
//! # Ok(())
//! # }
//! ```

pub mod ddp;
pub mod env;
pub mod error;
mod ffi;
pub mod group;

pub use ddp::{all_reduce_gradients, broadcast_parameters, reduce_mean_scalars, DEFAULT_BUCKET_BYTES};
pub use env::{DistEnv, DEFAULT_TIMEOUT};
pub use error::{DistError, FailureKind, Result};
pub use group::{Backend, ProcessGroup};

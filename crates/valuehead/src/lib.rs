//! TRL-compatible value-head language models in Rust on libtorch.
//!
//! [`CausalLmWithValueHead`] wraps a causal LM (GPT-2) with TRL's `ValueHead`, giving logits,
//! the LM loss and one value per token, and loads checkpoints that Python TRL saves.

pub mod causal;
pub mod error;
pub mod options;

pub use causal::{CausalBackbone, CausalLmInput, CausalLmOutput, CausalLmWithValueHead};
pub use error::{Error, Result};
pub use options::{parse_device, parse_dtype, LoadOptions};
pub use vh_core::{InitStrategy, ValueHead, ValueHeadConfig, ValueHeadOptions};
pub use vh_models::{Cache, LayerCache};

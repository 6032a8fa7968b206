//! TRL-compatible value-head language models in Rust on libtorch.
//!
//! [`CausalLmWithValueHead`] wraps a causal LM (GPT-2) with TRL's `ValueHead`, giving logits,
//! the LM loss and one value per token, and loads checkpoints that Python TRL saves.
//!
//! ```no_run
//! use tch::Tensor;
//! use valuehead::{CausalLmWithValueHead, LoadOptions};
//!
//! # fn main() -> valuehead::Result<()> {
//! let model = CausalLmWithValueHead::from_folder("my-trl-model", &LoadOptions::default())?;
//! let input_ids = Tensor::from_slice2(&[[0i64, 0, 464, 2068], [318, 257, 1332, 13]]);
//! let attention_mask = Tensor::from_slice2(&[[0i64, 0, 1, 1], [1, 1, 1, 1]]); // left padding
//! let out = tch::no_grad(|| model.forward(&input_ids, Some(&attention_mask), None, None))?;
//! assert_eq!(out.values.size(), vec![2, 4]);
//!
//! // One more token per row, through the cache.
//! let next = Tensor::from_slice2(&[[11i64], [11]]);
//! let mask = Tensor::from_slice2(&[[0i64, 0, 1, 1, 1], [1, 1, 1, 1, 1]]);
//! let step = tch::no_grad(|| model.forward(&next, Some(&mask), Some(&out.past), None))?;
//! assert_eq!(step.past.seq_len(), 5);
//! # Ok(())
//! # }
//! ```

pub mod causal;
pub mod error;
pub mod options;

pub use causal::{CausalBackbone, CausalLmInput, CausalLmOutput, CausalLmWithValueHead};
pub use error::{Error, Result};
pub use options::{parse_device, parse_dtype, LoadOptions};
pub use vh_core::{InitStrategy, ValueHead, ValueHeadConfig, ValueHeadOptions};
pub use vh_models::{Cache, LayerCache};

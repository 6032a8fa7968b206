//! Value-head math, shared tensor utilities and errors for the valuehead crates.

pub mod alloc;
pub mod error;
pub mod lora;
pub mod ops;
pub mod param;
pub mod state;
pub mod tensor;
pub mod value_head;

pub use error::{Error, Result};
pub use value_head::{InitStrategy, ValueHead, ValueHeadConfig, ValueHeadOptions};

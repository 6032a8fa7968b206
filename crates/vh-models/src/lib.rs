//! Transformer backbones with explicit KV caches, their parameters named as in HF state dicts.

pub mod activation;
pub mod cache;
pub mod gpt2;
pub mod llama;
pub mod t5;

pub use activation::Activation;
pub use cache::{Cache, LayerCache};
pub use vh_core::{Error, Result};

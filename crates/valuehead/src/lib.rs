//! TRL-compatible value-head language models in Rust on libtorch.
//!
//! [`CausalLmWithValueHead`] wraps a causal LM (GPT-2) and [`Seq2SeqLmWithValueHead`] an
//! encoder-decoder (T5) with TRL's `ValueHead`, giving logits, the LM loss and one value per
//! token, and both load the checkpoints that Python TRL saves.
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
pub mod chat;
pub mod cli_io;
pub mod error;
pub mod generation;
pub mod options;
pub mod seq2seq;
mod wrapper;

pub use causal::{CausalBackbone, CausalLmInput, CausalLmOutput, CausalLmWithValueHead};
pub use chat::{apply_chat_template, Message};
pub use error::{Error, Result};
pub use generation::{GenerateOutput, GenerationConfig};
pub use options::{parse_device, parse_dtype, LoadOptions};
pub use seq2seq::{Seq2SeqLmInput, Seq2SeqLmOutput, Seq2SeqLmWithValueHead};
pub use vh_core::{InitStrategy, ValueHead, ValueHeadConfig, ValueHeadOptions};
pub use vh_models::t5::{EncoderOutput, Seq2SeqCache};
pub use vh_models::{AttnImplementation, Cache, LayerCache};
pub use wrapper::V_HEAD_PREFIX;

use std::path::Path;

/// Either kind of value-head model, chosen by config.json's `model_type`.
#[derive(Debug)]
pub enum ValueHeadModel {
    /// A decoder-only model (`gpt2`).
    Causal(CausalLmWithValueHead),
    /// An encoder-decoder model (`t5`).
    Seq2Seq(Seq2SeqLmWithValueHead),
}

/// Whether a `model_type` is an encoder-decoder architecture.
pub fn is_seq2seq_model_type(model_type: &str) -> bool {
    matches!(model_type, "t5")
}

impl ValueHeadModel {
    /// Loads a local folder or a Hub repo id (see the wrappers' `from_pretrained`).
    pub fn from_pretrained(id_or_path: &str, options: &LoadOptions) -> Result<Self> {
        Self::from_folder(vh_hub::resolve_model(id_or_path, &options.hub)?, options)
    }

    /// Loads a local checkpoint folder as the wrapper its `model_type` calls for.
    pub fn from_folder(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let config = vh_hub::ModelFolder::open(dir.as_ref())?.config()?;
        let seq2seq = config
            .get("model_type")
            .and_then(serde_json::Value::as_str)
            .is_some_and(is_seq2seq_model_type);
        Ok(if seq2seq {
            Self::Seq2Seq(Seq2SeqLmWithValueHead::from_folder(dir, options)?)
        } else {
            Self::Causal(CausalLmWithValueHead::from_folder(dir, options)?)
        })
    }
}

impl ValueHeadModel {
    /// Generates from `input_ids` (see the wrappers' `generate`).
    pub fn generate(
        &self,
        input_ids: &tch::Tensor,
        attention_mask: Option<&tch::Tensor>,
        config: &GenerationConfig,
    ) -> Result<GenerateOutput> {
        match self {
            Self::Causal(m) => m.generate(input_ids, attention_mask, config),
            Self::Seq2Seq(m) => m.generate(input_ids, attention_mask, config),
        }
    }

    /// The model's generation defaults.
    pub fn default_generation_config(&self) -> Result<GenerationConfig> {
        match self {
            Self::Causal(m) => m.default_generation_config(),
            Self::Seq2Seq(m) => m.default_generation_config(),
        }
    }
}

/// Loads the folder's tokenizer.json, if it has one.
pub fn load_tokenizer(dir: impl AsRef<Path>) -> Result<Option<tokenizers::Tokenizer>> {
    let path = dir.as_ref().join("tokenizer.json");
    if !path.exists() {
        return Ok(None);
    }
    let bytes = vh_hub::files::read_capped(&path, vh_hub::files::MAX_TOKENIZER_BYTES)?;
    tokenizers::Tokenizer::from_bytes(&bytes).map(Some).map_err(|e| {
        Error::Hub(vh_hub::HubError::Json {
            path,
            message: e.to_string(),
        })
    })
}

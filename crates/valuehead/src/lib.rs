//! TRL-compatible value-head language models in Rust on libtorch.
//!
//! [`CausalLmWithValueHead`] wraps any decoder-only model of the registry
//! ([`vh_models::ARCHITECTURES`]: GPT-2, Llama, Qwen2, ...) and [`Seq2SeqLmWithValueHead`] any
//! encoder-decoder (T5, Bart) with TRL's `ValueHead`, giving logits, the LM loss and one value per
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
//!
//! # Threads
//!
//! A model is `Send` but not `Sync`: its parameters are libtorch tensors, which tch lets move
//! between threads but not be used from two threads at once. So use one model per thread
//! (load one per worker, or move it into the thread), or share one behind a `Mutex` (one thread
//! at a time). Sharing a plain `&model` between threads does not compile:
//!
//! ```compile_fail,E0277
//! fn share(model: &valuehead::CausalLmWithValueHead) {
//!     std::thread::scope(|s| {
//!         s.spawn(|| model.config().clone());
//!         s.spawn(|| model.config().clone());
//!     });
//! }
//! ```
//!
//! What compiles instead (grad mode is per thread, so `tch::no_grad` goes inside the worker; the
//! intra-op thread pool is shared, see `tch::set_num_threads`):
//!
//! ```no_run
//! use std::sync::Mutex;
//! use tch::Tensor;
//! use valuehead::{CausalLmWithValueHead, LoadOptions};
//!
//! # fn main() -> valuehead::Result<()> {
//! let load = || CausalLmWithValueHead::from_folder("my-trl-model", &LoadOptions::default());
//! let ids = Tensor::from_slice2(&[[464i64, 2068]]);
//! // One model per thread: each worker owns the model moved into it.
//! let models = vec![load()?, load()?];
//! std::thread::scope(|s| {
//!     for model in models {
//!         let ids = ids.shallow_clone();
//!         s.spawn(move || tch::no_grad(|| model.forward(&ids, None, None, None).map(|o| o.values)));
//!     }
//! });
//! // One model for every thread, behind a Mutex.
//! let shared = Mutex::new(load()?);
//! std::thread::scope(|s| {
//!     for _ in 0..2 {
//!         let ids = ids.shallow_clone();
//!         let shared = &shared;
//!         s.spawn(move || {
//!             let model = shared.lock().expect("no thread panicked holding the model");
//!             tch::no_grad(|| model.forward(&ids, None, None, None).map(|o| o.values))
//!         });
//!     }
//! });
//! # Ok(())
//! # }
//! ```

pub mod causal;
pub mod chat;
pub mod cli_io;
pub mod error;
pub mod generation;
pub mod lora;
pub mod options;
pub mod reference;
pub mod reward;
pub mod seq2seq;
mod static_decode;
mod wrapper;

pub use causal::{CausalLmInput, CausalLmOutput, CausalLmWithValueHead};
pub use chat::{apply_chat_template, Message};
pub use error::{Error, Result};
pub use generation::{last_generate_host_syncs, Decoding, GenerateOutput, GenerateTimings, GenerationConfig};
pub use lora::{LoraBias, LoraConfig, PolicyAdapter, TargetModules, REWARD_ADAPTER};
pub use options::{parse_device, parse_dtype, LoadOptions};
pub use reference::{create_reference_model, create_seq2seq_reference_model, SharedParameters, LAYER_PATTERNS};
pub use reward::{SequenceClassifier, SequenceClassifierOutput};
pub use seq2seq::{Seq2SeqLmInput, Seq2SeqLmOutput, Seq2SeqLmWithValueHead};
pub use vh_core::alloc::{keep_freed_tensor_memory, AllocatorTuning};
pub use vh_core::tensor::{
    dense_onednn_linear_available, position_ids_from_attention_mask, set_onednn_linear, set_small_rows_linear,
    small_rows_linear_applies,
};
pub use vh_core::{InitStrategy, ValueHead, ValueHeadConfig, ValueHeadOptions};
pub use vh_models::{AttnImplementation, Cache, LayerCache, ARCHITECTURES};
pub use vh_models::{EncoderOutput, Seq2SeqCache};
pub use wrapper::V_HEAD_PREFIX;

use std::path::Path;

/// Either kind of value-head model, chosen by config.json's `model_type` (see
/// [`vh_models::ARCHITECTURES`]).
#[derive(Debug)]
pub enum ValueHeadModel {
    /// A decoder-only model (GPT-2, Llama, Qwen2, ...).
    Causal(CausalLmWithValueHead),
    /// An encoder-decoder model (T5, Bart).
    Seq2Seq(Seq2SeqLmWithValueHead),
}

/// Whether a `model_type` is an encoder-decoder architecture (asks the registry).
pub fn is_seq2seq_model_type(model_type: &str) -> bool {
    vh_models::architecture(model_type).is_some_and(|a| a.is_seq2seq())
}

impl ValueHeadModel {
    /// Loads a local folder or a Hub repo id (see the wrappers' `from_pretrained`).
    pub fn from_pretrained(id_or_path: &str, options: &LoadOptions) -> Result<Self> {
        Self::from_folder(vh_hub::resolve_model(id_or_path, &options.hub)?, options)
    }

    /// Loads a local checkpoint folder as the wrapper its `model_type` calls for.
    pub fn from_folder(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        Ok(if Self::is_seq2seq_folder(dir.as_ref())? {
            Self::Seq2Seq(Seq2SeqLmWithValueHead::from_folder(dir, options)?)
        } else {
            Self::Causal(CausalLmWithValueHead::from_folder(dir, options)?)
        })
    }

    /// Loads the base folder `base` with the peft LoRA adapter folder `adapter`, as the wrapper
    /// the base's `model_type` calls for (see the wrappers' `from_folder_with_adapter`).
    pub fn from_folder_with_adapter(
        base: impl AsRef<Path>,
        adapter: impl AsRef<Path>,
        options: &LoadOptions,
    ) -> Result<Self> {
        Ok(if Self::is_seq2seq_folder(base.as_ref())? {
            Self::Seq2Seq(Seq2SeqLmWithValueHead::from_folder_with_adapter(
                base, adapter, options,
            )?)
        } else {
            Self::Causal(CausalLmWithValueHead::from_folder_with_adapter(base, adapter, options)?)
        })
    }

    /// Whether the folder's config.json names an encoder-decoder `model_type`.
    fn is_seq2seq_folder(dir: &Path) -> Result<bool> {
        let config = vh_hub::ModelFolder::open(dir)?.config()?;
        Ok(config
            .get("model_type")
            .and_then(serde_json::Value::as_str)
            .is_some_and(is_seq2seq_model_type))
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

    /// Generates from `input_ids`, continuing the decoder prompt `decoder_input_ids` for
    /// encoder-decoder models (see [`Seq2SeqLmWithValueHead::generate_from`]); a decoder-only
    /// model refuses decoder ids.
    pub fn generate_from(
        &self,
        input_ids: &tch::Tensor,
        attention_mask: Option<&tch::Tensor>,
        decoder_input_ids: Option<&tch::Tensor>,
        config: &GenerationConfig,
    ) -> Result<GenerateOutput> {
        match (self, decoder_input_ids) {
            (Self::Causal(m), None) => m.generate(input_ids, attention_mask, config),
            (Self::Causal(_), Some(_)) => Err(Error::InvalidOption(
                "decoder_input_ids are for encoder-decoder models; this model is decoder-only".into(),
            )),
            (Self::Seq2Seq(m), decoder) => m.generate_from(input_ids, attention_mask, decoder, config),
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

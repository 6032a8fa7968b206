//! The one table of architectures: every `model_type` this library implements, how to build it
//! from config.json, and what the rest of the project needs to know about it. The facade, the
//! value head, the command line, the bench worker and the tests ask this table; nothing else
//! keeps a list of architectures.
//!
//! Adding an architecture = one model file implementing [`CausalLm`] or [`Seq2SeqLm`], one line
//! in [`ARCHITECTURES`], one parity entry.

use crate::attention::AttnImplementation;
use crate::cache::Cache;
use crate::cache::Seq2SeqCache;
use crate::inputs::CausalInputs;
use serde_json::Value;
use tch::{nn, Tensor};
use vh_core::{Error, Result};

/// The output of a decoder-only pass.
#[derive(Debug)]
pub struct CausalLmOutput {
    /// Next-token logits [B, K, vocab] in the model's dtype, for the last K positions asked for.
    pub logits: Tensor,
    /// The final hidden states [B, T, hidden] (HF's `hidden_states[-1]`), what the value head reads.
    pub last_hidden_state: Tensor,
    /// Keys and values of the cached and new positions.
    pub cache: Cache,
}

/// A decoder-only language model with its LM head, as HF's `*ForCausalLM`.
pub trait CausalLm: std::fmt::Debug + Send {
    /// Its registry entry's `model_type`.
    fn model_type(&self) -> &'static str;
    /// Vocabulary size (rows of the LM head).
    fn vocab_size(&self) -> i64;
    /// Width of `last_hidden_state`.
    fn hidden_size(&self) -> i64;
    /// Decoder layers (entries of a cache).
    fn num_layers(&self) -> usize;
    /// The longest sequence, cache included, that learned absolute positions allow; `None` for
    /// rotary or relative positions (HF enforces no limit there).
    fn max_positions(&self) -> Option<i64>;
    /// Runs the decoder on inputs checked by [`crate::inputs::prepare_causal`]: the final
    /// hidden states [B, T, hidden] (after the final norm, HF's `hidden_states[-1]`) and the cache.
    fn forward_hidden(&self, inputs: &CausalInputs<'_>, train: bool) -> Result<(Tensor, Cache)>;
    /// The LM head's weight [vocab, hidden] (the embedding matrix when tied), or `None` for a
    /// model built without one ([`BuildOptions::lm_head`], e.g. under a classification head).
    fn lm_head(&self) -> Option<&Tensor>;
    /// The LM head's logits as the architecture finishes them (Gemma2's final soft-capping,
    /// Cohere's `logit_scale`); the identity for most. The default [`CausalLm::forward`] applies it.
    fn finish_logits(&self, logits: Tensor) -> Result<Tensor> {
        Ok(logits)
    }
    /// Runs the model on inputs checked by [`crate::inputs::prepare_causal`], with logits for the
    /// last `logits_to_keep` positions only (0 = all, as HF's argument of that name).
    fn forward(&self, inputs: &CausalInputs<'_>, train: bool, logits_to_keep: i64) -> Result<CausalLmOutput> {
        let (last_hidden_state, cache) = self.forward_hidden(inputs, train)?;
        let head = self
            .lm_head()
            .ok_or_else(|| Error::Config("this model was built without a language-model head".into()))?;
        let logits = self.finish_logits(vh_core::tensor::lm_logits(&last_hidden_state, head, logits_to_keep)?)?;
        Ok(CausalLmOutput {
            logits,
            last_hidden_state,
            cache,
        })
    }
    /// The parameter a checkpoint tensor fills (HF's names, legacy spellings mapped), or `None`
    /// for tensors that hold no parameter (buffers, the LM head of a tied model).
    fn parameter_name(&self, key: &str) -> Option<String>;
    /// Aliases HF's state dict lists besides the parameters (alias, parameter): tied weights.
    fn tied_aliases(&self) -> Vec<(&'static str, &'static str)>;
    /// Whether a parameter is only indexed by a lookup (an input embedding not shared with the
    /// LM head, learned positions), so a decode step does not stream it.
    fn is_lookup_only(&self, name: &str) -> bool;
    /// Whether a one-token decode step can run over a static cache ([`crate::Cache::to_static`]
    /// with [`crate::inputs::StaticKeys`]) and so be captured as a CUDA graph: its arithmetic
    /// must depend on nothing the host computes per step (dynamic-NTK and LongRoPE rotary
    /// scaling read the sequence length, so those models answer false).
    fn supports_static_decode(&self) -> bool {
        false
    }
    /// The cached length at which `generate` drops the cache and runs the whole sequence again
    /// before decoding on, or `None` (most models). HF's Phi3 does this where LongRoPE switches
    /// from its short to its long factors (`prepare_inputs_for_generation`: once the cache holds
    /// `original_max_position_embeddings` positions), so that every cached key is rotated with
    /// the long factors the later steps use.
    fn recompute_cache_at(&self) -> Option<i64> {
        None
    }
    /// Called once the checkpoint's tensors are in place (and after a dtype change), to lay out
    /// weights for the fastest kernel of their dtype.
    fn after_load(&self) -> Result<()> {
        Ok(())
    }
    /// Where PyTorch's `named_parameters()` lists a parameter (HF name) relative to the decoder
    /// layers, which `create_reference_model` splits the model at. The default knows the
    /// layer lists `h`, `layers` and `blocks` and registers embeddings (`wte`, `wpe`,
    /// `embed_tokens`, `embed_in`, `embed_positions`) before them and everything else after; an
    /// architecture that registers other modules before its layers (OPT's projections and final
    /// norm) says so here.
    fn parameter_position(&self, name: &str) -> ParamPosition {
        ParamPosition::by_name(name)
    }
}

/// The checkpoint facts of a decoder whose LM head is `lm_head.weight` and may be tied to
/// `model.embed_tokens.weight` (the Llama family: Llama, Mistral, Qwen3, Gemma, Gemma2, Phi3, Cohere), in one
/// place for their `CausalLm` impls.
#[derive(Debug, Clone, Copy)]
pub struct EmbedTokensHead {
    /// config.json's `tie_word_embeddings`.
    pub tied: bool,
    /// Whether the model was built with an LM head.
    pub has_head: bool,
}

impl EmbedTokensHead {
    /// [`CausalLm::parameter_name`]: rotary buffers of old checkpoints hold no parameter; a tied
    /// head reads the embedding, and a model without a head has no place for one.
    pub fn parameter_name(self, key: &str) -> Option<String> {
        let no_head_parameter = self.tied || !self.has_head;
        if key.ends_with("rotary_emb.inv_freq") || (no_head_parameter && key == "lm_head.weight") {
            return None;
        }
        Some(key.to_string())
    }

    /// [`CausalLm::tied_aliases`].
    pub fn tied_aliases(self) -> Vec<(&'static str, &'static str)> {
        if self.tied && self.has_head {
            vec![("lm_head.weight", "model.embed_tokens.weight")]
        } else {
            vec![]
        }
    }

    /// [`CausalLm::is_lookup_only`]: the input embedding, unless the head reads it.
    pub fn is_lookup_only(self, name: &str) -> bool {
        !(self.tied && self.has_head) && name == "model.embed_tokens.weight"
    }
}

/// Where a parameter comes in PyTorch's `named_parameters()` order, at the granularity of the
/// decoder layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ParamPosition {
    /// Registered before the decoder layers (embeddings).
    BeforeLayers,
    /// In decoder layer `i`.
    Layer(usize),
    /// Registered after the layers (final norm, LM head).
    AfterLayers,
}

impl ParamPosition {
    /// The default rule of [`CausalLm::parameter_position`].
    pub fn by_name(name: &str) -> Self {
        let parts: Vec<&str> = name.split('.').collect();
        for pair in parts.windows(2) {
            if matches!(pair[0], "h" | "layers" | "blocks") {
                if let Ok(i) = pair[1].parse::<usize>() {
                    return Self::Layer(i);
                }
            }
        }
        let embedding = ["wte", "wpe", "embed_tokens", "embed_in", "embed_positions"];
        if parts.iter().any(|p| embedding.contains(p)) {
            Self::BeforeLayers
        } else {
            Self::AfterLayers
        }
    }
}

/// The output of a decoder pass of an encoder-decoder model.
#[derive(Debug)]
pub struct Seq2SeqLmOutput {
    /// Logits [B, T, vocab] in the model's dtype.
    pub logits: Tensor,
    /// The decoder's final hidden states [B, T, hidden], what the value head reads.
    pub last_hidden_state: Tensor,
    /// The caches for the next pass.
    pub cache: Seq2SeqCache,
}

/// The encoder's output, reusable across decoder passes.
#[derive(Debug)]
pub struct EncoderOutput {
    /// The encoder's final hidden states, [B, S, d_model].
    pub last_hidden_state: Tensor,
    /// The encoder's padding mask as bool [B, S] (true = attend), if one was given.
    pub attention_mask: Option<Tensor>,
}

impl EncoderOutput {
    /// A cheap copy sharing storage.
    pub fn shallow_clone(&self) -> Self {
        Self {
            last_hidden_state: self.last_hidden_state.shallow_clone(),
            attention_mask: self.attention_mask.as_ref().map(Tensor::shallow_clone),
        }
    }
}

/// An encoder-decoder language model with its LM head, as HF's `*ForConditionalGeneration`.
pub trait Seq2SeqLm: std::fmt::Debug + Send {
    /// Its registry entry's `model_type`.
    fn model_type(&self) -> &'static str;
    /// Vocabulary size.
    fn vocab_size(&self) -> i64;
    /// Width of the decoder's hidden states.
    fn hidden_size(&self) -> i64;
    /// The first decoder input (config.json's `decoder_start_token_id`), if set.
    fn decoder_start_token_id(&self) -> Option<i64>;
    /// Runs the encoder over `input_ids` [B, S] with an optional padding mask [B, S].
    fn encode(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, train: bool) -> Result<EncoderOutput>;
    /// Runs the decoder over `decoder_input_ids` [B, T] after the cached positions, attending to
    /// `encoder`; `decoder_attention_mask` [B, past + T] covers cached and new tokens.
    fn decode(
        &self,
        decoder_input_ids: &Tensor,
        decoder_attention_mask: Option<&Tensor>,
        encoder: &EncoderOutput,
        past: Option<&Seq2SeqCache>,
        train: bool,
    ) -> Result<Seq2SeqLmOutput>;
    /// Decoder inputs from labels, as HF's `_shift_right`.
    fn shift_right(&self, labels: &Tensor) -> Result<Tensor>;
    /// Decoder inputs for a pass given neither decoder inputs nor labels: HF's Bart shifts the
    /// encoder's `input_ids` right (its denoising pre-training setup); `None` where HF requires
    /// decoder inputs (T5).
    fn decoder_inputs_from_input_ids(&self, _input_ids: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Buffers HF creates as zeros and does not require from a checkpoint
    /// (`_keys_to_ignore_on_load_missing`, e.g. Bart's `final_logits_bias`), with their shapes: a
    /// checkpoint without them loads them as zeros.
    fn zero_default_buffers(&self) -> Vec<(&'static str, Vec<i64>)> {
        Vec::new()
    }
    /// The parameter a checkpoint tensor fills, or `None` for tensors that hold no parameter.
    fn parameter_name(&self, key: &str) -> Option<String>;
    /// Aliases HF's state dict lists besides the parameters (alias, parameter).
    fn tied_aliases(&self) -> Vec<(&'static str, &'static str)>;
    /// Whether a parameter is not streamed by a decode step (the encoder, lookup-only tables).
    fn is_lookup_only(&self, name: &str) -> bool;
    /// Tied aliases (alias, parameter) a saved checkpoint must store besides the parameters for
    /// transformers to load it back; none by default (transformers reties them itself).
    fn saved_aliases(&self) -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }
}

/// Choices made when building a model that are not part of config.json.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildOptions {
    /// How attention is computed; `None` takes the architecture's default.
    pub attn_implementation: Option<AttnImplementation>,
    /// Leave out the language-model head (and its `lm_head.weight` parameter), for a backbone
    /// under another head, e.g. HF's `*ForSequenceClassification`.
    pub without_lm_head: bool,
}

/// Builds a decoder-only model's parameters under a var-store path from config.json.
pub type CausalBuilder = fn(nn::Path, &Value, &BuildOptions) -> Result<Box<dyn CausalLm>>;
/// Builds an encoder-decoder model's parameters under a var-store path from config.json.
pub type Seq2SeqBuilder = fn(nn::Path, &Value, &BuildOptions) -> Result<Box<dyn Seq2SeqLm>>;

/// Decoder-only or encoder-decoder, with the matching builder.
#[derive(Debug, Clone, Copy)]
pub enum Family {
    /// A decoder-only model (wrapped by `CausalLmWithValueHead`).
    Causal(CausalBuilder),
    /// An encoder-decoder model (wrapped by `Seq2SeqLmWithValueHead`).
    Seq2Seq(Seq2SeqBuilder),
}

/// One implemented architecture.
#[derive(Debug, Clone, Copy)]
pub struct Architecture {
    /// config.json's `model_type`.
    pub model_type: &'static str,
    /// The name people call it by.
    pub name: &'static str,
    /// How it is built, and which wrapper takes it.
    pub family: Family,
    /// The attention implementation used on CPU when the caller picks none: the faster one
    /// measured there (`cargo xtask bench`). On CUDA the default is always the fused kernel
    /// (see [`Architecture::default_attention_on`]).
    pub default_attention: AttnImplementation,
    /// A tiny config.json for tests and fixtures (random weights of this config load and run).
    pub tiny_config: fn() -> Value,
}

impl Architecture {
    /// The attention implementation used on `device` when the caller picks none: the fused
    /// kernel (sdpa) on CUDA, where it was 1.8x faster than eager for GPT-2's bf16 forward on an
    /// H200 and avoids materialising the score matrix; on CPU the table's `default_attention`,
    /// measured there. An explicit choice always wins. T5 runs eager everywhere, as in HF.
    pub fn default_attention_on(&self, device: tch::Device) -> AttnImplementation {
        match device {
            tch::Device::Cuda(_) if !self.is_seq2seq() => AttnImplementation::Sdpa,
            _ => self.default_attention,
        }
    }

    /// Whether it is an encoder-decoder model.
    pub fn is_seq2seq(&self) -> bool {
        matches!(self.family, Family::Seq2Seq(_))
    }
}

/// Every architecture this library implements.
pub const ARCHITECTURES: &[Architecture] = &[
    crate::gpt2::ARCHITECTURE,
    crate::llama::ARCHITECTURE,
    crate::llama::QWEN2_ARCHITECTURE,
    crate::mistral::ARCHITECTURE,
    crate::qwen3::ARCHITECTURE,
    crate::gpt_neox::ARCHITECTURE,
    crate::opt::ARCHITECTURE,
    crate::gemma::ARCHITECTURE,
    crate::gemma2::ARCHITECTURE,
    crate::phi3::ARCHITECTURE,
    crate::bloom::ARCHITECTURE,
    crate::cohere::ARCHITECTURE,
    crate::dbrx::ARCHITECTURE,
    crate::t5::ARCHITECTURE,
    crate::bart::ARCHITECTURE,
];

/// The registry entry of a `model_type`, if implemented.
pub fn architecture(model_type: &str) -> Option<&'static Architecture> {
    ARCHITECTURES.iter().find(|a| a.model_type == model_type)
}

/// The `model_type`s this library implements, in table order.
pub fn model_types() -> Vec<&'static str> {
    ARCHITECTURES.iter().map(|a| a.model_type).collect()
}

/// The registry entry for config.json's `model_type`, or a typed error naming what is supported.
pub fn architecture_of(config: &Value) -> Result<&'static Architecture> {
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::Config("config.json has no `model_type` string".to_string()))?;
    architecture(model_type).ok_or_else(|| {
        Error::Config(format!(
            "unsupported model_type `{model_type}` (supported: {})",
            model_types().join(", ")
        ))
    })
}

/// Builds the decoder-only model config.json describes under `vs`.
pub fn build_causal(vs: nn::Path, config: &Value, options: &BuildOptions) -> Result<Box<dyn CausalLm>> {
    let arch = architecture_of(config)?;
    match arch.family {
        Family::Causal(build) => build(vs, config, options),
        Family::Seq2Seq(_) => Err(Error::Config(format!(
            "model_type `{}` is an encoder-decoder model: load it as a seq2seq model",
            arch.model_type
        ))),
    }
}

/// Builds the encoder-decoder model config.json describes under `vs`.
pub fn build_seq2seq(vs: nn::Path, config: &Value, options: &BuildOptions) -> Result<Box<dyn Seq2SeqLm>> {
    let arch = architecture_of(config)?;
    match arch.family {
        Family::Seq2Seq(build) => build(vs, config, options),
        Family::Causal(_) => Err(Error::Config(format!(
            "model_type `{}` is a decoder-only model: load it as a causal model",
            arch.model_type
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;

    #[test]
    fn every_architecture_builds_from_its_tiny_config_and_runs() {
        for arch in ARCHITECTURES {
            let config = (arch.tiny_config)();
            assert_eq!(config["model_type"], arch.model_type, "{}", arch.name);
            let vs = VarStore::new(tch::Device::Cpu);
            let ids = Tensor::from_slice2(&[[1i64, 2, 3]]);
            match arch.family {
                Family::Causal(build) => {
                    let model = build(vs.root(), &config, &BuildOptions::default()).unwrap();
                    assert_eq!(model.model_type(), arch.model_type);
                    crate::test_util::randomize(&vs, 1, 0.1);
                    let limits = crate::inputs::CausalLimits {
                        vocab_size: model.vocab_size(),
                        num_layers: model.num_layers(),
                        max_positions: model.max_positions(),
                    };
                    let inputs = crate::inputs::prepare_causal(&ids, None, None, None, limits, vs.device()).unwrap();
                    let out = model.forward(&inputs, false, 0).unwrap();
                    assert_eq!(out.logits.size(), vec![1, 3, model.vocab_size()], "{}", arch.name);
                    assert_eq!(out.last_hidden_state.size()[2], model.hidden_size(), "{}", arch.name);
                }
                Family::Seq2Seq(build) => {
                    let model = build(vs.root(), &config, &BuildOptions::default()).unwrap();
                    crate::test_util::randomize(&vs, 1, 0.1);
                    let encoder = model.encode(&ids, None, false).unwrap();
                    let out = model.decode(&ids, None, &encoder, None, false).unwrap();
                    assert_eq!(out.logits.size(), vec![1, 3, model.vocab_size()], "{}", arch.name);
                }
            }
        }
        assert!(architecture("nope").is_none());
        let err = architecture_of(&serde_json::json!({"model_type": "nope"})).unwrap_err();
        assert!(err.to_string().contains("gpt2"), "{err}");
    }
}

//! `CausalLmWithValueHead`: a causal language model plus a value head, as TRL's
//! `AutoModelForCausalLMWithValueHead`.

use crate::error::{Error, Result};
use crate::generation::{
    decode_loop, generation_capacity, reserve_cache, GenerateOutput, GenerationConfig, StepOutput,
};
use crate::options::LoadOptions;
use crate::wrapper::{check_before_load, model_type, read_folder, wrapper_accessors, Wrapped};
use serde_json::Value;
use std::path::Path;
use tch::{nn::VarStore, Kind, Tensor};
use vh_core::error::invalid;
use vh_core::tensor::{causal_lm_loss, check_labels, expect_rank};
use vh_models::gpt2::{Gpt2Config, Gpt2LmHeadModel};
use vh_models::llama::{LlamaConfig, LlamaForCausalLM};
use vh_models::{AttnImplementation, Cache};

/// The causal backbones this library implements.
#[derive(Debug)]
pub enum CausalBackbone {
    /// GPT-2 (`model_type` "gpt2").
    Gpt2(Gpt2LmHeadModel),
    /// The Llama family (`model_type` "llama", e.g. SmolLM2, or "qwen2").
    Llama(LlamaForCausalLM),
}

/// What a backbone pass gives the wrapper.
struct BackboneOutput {
    logits: Tensor,
    last_hidden_state: Tensor,
    cache: Cache,
}

impl CausalBackbone {
    fn build(vs: &VarStore, config: &Value, options: &LoadOptions) -> Result<Self> {
        match model_type(config)? {
            "gpt2" => {
                let mut cfg = Gpt2Config::from_json(config)?;
                // Measured on CPU: the fused kernel made batched f32 GPT-2 passes slower.
                cfg.attn_implementation = options.attn_implementation.unwrap_or(AttnImplementation::Eager);
                Ok(Self::Gpt2(Gpt2LmHeadModel::new(vs.root(), &cfg)?))
            }
            "llama" | "qwen2" => {
                let mut cfg = LlamaConfig::from_json(config)?;
                // Measured on CPU: the fused kernel, with grouped key/value heads, is faster.
                cfg.attn_implementation = options.attn_implementation.unwrap_or(AttnImplementation::Sdpa);
                Ok(Self::Llama(LlamaForCausalLM::new(vs.root(), &cfg)?))
            }
            other => Err(Error::UnsupportedModel(other.to_string())),
        }
    }

    fn parameter_name(&self, key: &str) -> Option<String> {
        match self {
            Self::Gpt2(m) => m.parameter_name(key),
            Self::Llama(m) => m.parameter_name(key),
        }
    }

    fn vocab_size(&self) -> i64 {
        match self {
            Self::Gpt2(m) => m.transformer.config().vocab_size,
            Self::Llama(m) => m.config().vocab_size,
        }
    }

    /// The longest sequence (cache included) the model accepts, if it has a limit.
    fn max_positions(&self) -> Option<i64> {
        match self {
            Self::Gpt2(m) => Some(m.transformer.config().n_positions),
            // Rotary positions have no hard limit (HF enforces none); rope_scaling governs quality.
            Self::Llama(_) => None,
        }
    }

    fn forward(&self, input: &CausalLmInput<'_>, train: bool) -> Result<BackboneOutput> {
        let i = input;
        // Both backbones take the same arguments and return the same three fields, in their own types.
        macro_rules! run {
            ($model:expr) => {{
                let out = $model.forward_keeping(
                    i.input_ids,
                    i.attention_mask,
                    i.position_ids,
                    i.past,
                    train,
                    i.logits_to_keep,
                )?;
                BackboneOutput {
                    logits: out.logits,
                    last_hidden_state: out.last_hidden_state,
                    cache: out.cache,
                }
            }};
        }
        Ok(match self {
            Self::Gpt2(m) => run!(m),
            Self::Llama(m) => run!(m),
        })
    }

    /// The tied-weight aliases HF's state dict lists besides the parameters: (alias, parameter).
    fn tied_aliases(&self) -> Vec<(&'static str, &'static str)> {
        match self {
            Self::Gpt2(m) if m.is_tied() => vec![("lm_head.weight", "transformer.wte.weight")],
            Self::Gpt2(_) => vec![],
            Self::Llama(m) if m.config().tie_word_embeddings => vec![("lm_head.weight", "model.embed_tokens.weight")],
            Self::Llama(_) => vec![],
        }
    }
}

/// The inputs of a forward pass; only `input_ids` is required.
#[derive(Debug, Clone, Copy)]
pub struct CausalLmInput<'a> {
    /// Token ids, i64 [batch, seq].
    pub input_ids: &'a Tensor,
    /// 1 for tokens to attend, 0 for padding, [batch, past + seq].
    pub attention_mask: Option<&'a Tensor>,
    /// Explicit positions [batch, seq]; by default derived from the attention mask.
    pub position_ids: Option<&'a Tensor>,
    /// The cache returned by the previous pass.
    pub past: Option<&'a Cache>,
    /// Targets [batch, seq] for the shifted LM loss; -100 is ignored.
    pub labels: Option<&'a Tensor>,
    /// Logits for the last this many positions only; 0 (the default) keeps all, as HF's
    /// `logits_to_keep`. Values are always given for every position.
    pub logits_to_keep: i64,
}

impl<'a> CausalLmInput<'a> {
    /// Inputs with only token ids.
    pub fn new(input_ids: &'a Tensor) -> Self {
        Self {
            input_ids,
            attention_mask: None,
            position_ids: None,
            past: None,
            labels: None,
            logits_to_keep: 0,
        }
    }
    /// Sets the attention mask.
    pub fn attention_mask(mut self, mask: &'a Tensor) -> Self {
        self.attention_mask = Some(mask);
        self
    }
    /// Sets explicit position ids.
    pub fn position_ids(mut self, position_ids: &'a Tensor) -> Self {
        self.position_ids = Some(position_ids);
        self
    }
    /// Continues from a cache.
    pub fn past(mut self, past: &'a Cache) -> Self {
        self.past = Some(past);
        self
    }
    /// Sets labels for the loss.
    pub fn labels(mut self, labels: &'a Tensor) -> Self {
        self.labels = Some(labels);
        self
    }
    /// Computes logits for the last `n` positions only (0 = all).
    pub fn logits_to_keep(mut self, n: i64) -> Self {
        self.logits_to_keep = n;
        self
    }
}

/// The outputs of a forward pass.
#[derive(Debug)]
pub struct CausalLmOutput {
    /// Next-token logits, f32 [batch, seq, vocab].
    pub logits: Tensor,
    /// Mean shifted cross-entropy, f32 scalar, when labels were given.
    pub loss: Option<Tensor>,
    /// One value per token, f32 [batch, seq].
    pub values: Tensor,
    /// Keys and values of every position so far, to pass as `past` to the next pass.
    pub past: Cache,
}

/// A causal language model with a value head.
#[derive(Debug)]
pub struct CausalLmWithValueHead {
    wrapped: Wrapped,
    backbone: CausalBackbone,
}

wrapper_accessors!(CausalLmWithValueHead);

impl CausalLmWithValueHead {
    /// Loads a local checkpoint folder (config.json and model.safetensors, pytorch_model.bin, or
    /// a sharded index of either, plus generation_config.json when present). The value head comes
    /// from the checkpoint's `v_head.*` tensors when it has them; otherwise a fresh head is
    /// initialised from the options and a warning is logged.
    pub fn from_folder(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let contents = read_folder(dir.as_ref())?;
        let mut model = Self::from_parts(contents.config, contents.tensors, options)?;
        model.wrapped.generation_config = contents.generation_config;
        model.wrapped.source_dir = Some(dir.as_ref().to_path_buf());
        Ok(model)
    }

    /// Builds the model from a parsed config.json and the checkpoint's named tensors, whose data
    /// the parameters take over (no copy where kind and device match: do not write to them
    /// afterwards). Every tensor's shape is checked against the config before anything of the
    /// config's size is allocated.
    pub fn from_parts(config: Value, tensors: Vec<(String, Tensor)>, options: &LoadOptions) -> Result<Self> {
        check_before_load(&config, options)?;
        let vs = VarStore::new(options.device);
        // Placeholders until the checkpoint fills them (see `vh_core::param`).
        let backbone =
            vh_core::param::deferred_for_checkpoint(tensors.len(), || CausalBackbone::build(&vs, &config, options))?;
        let wrapped = Wrapped::load(vs, config, tensors, options, |key| backbone.parameter_name(key))?;
        if let CausalBackbone::Gpt2(m) = &backbone {
            m.arrange_weights()?;
        }
        Ok(Self { wrapped, backbone })
    }

    /// Runs the model. `attention_mask` covers cached and new tokens; `labels` add the loss.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        past: Option<&Cache>,
        labels: Option<&Tensor>,
    ) -> Result<CausalLmOutput> {
        self.forward_with(&CausalLmInput {
            input_ids,
            attention_mask,
            position_ids: None,
            past,
            labels,
            logits_to_keep: 0,
        })
    }

    /// Runs the model on the given inputs.
    pub fn forward_with(&self, input: &CausalLmInput<'_>) -> Result<CausalLmOutput> {
        expect_rank(input.input_ids, "input_ids", 2)?;
        if let Some(labels) = input.labels {
            let size = input.input_ids.size();
            check_labels(labels, size[0], size[1], self.backbone.vocab_size())?;
        }
        let train = self.wrapped.train;
        let out = self.backbone.forward(input, train)?;
        let values = self.wrapped.v_head.forward(&out.last_hidden_state, train)?;
        let logits = if out.logits.kind() == Kind::Float {
            out.logits
        } else {
            out.logits.f_to_kind(Kind::Float)?
        };
        let loss = input.labels.map(|labels| causal_lm_loss(&logits, labels)).transpose()?;
        Ok(CausalLmOutput {
            logits,
            loss,
            values,
            past: out.cache,
        })
    }

    /// Generates up to `max_new_tokens` per row after `input_ids` [batch, prompt] (left-padded,
    /// with `attention_mask`), feeding only the new token through the cache at each step, and
    /// returns, with the tokens, each new token's value and log-probability from the same passes.
    ///
    /// A row whose mask is all padding, a prompt with no room left before the position limit,
    /// and invalid settings (see [`GenerationConfig::validate`]) are errors.
    pub fn generate(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        config: &GenerationConfig,
    ) -> Result<GenerateOutput> {
        config.validate(self.vocab_size())?;
        let (batch, prompt_len) = vh_core::tensor::check_input_ids(input_ids, self.vocab_size())?;
        let device = self.wrapped.vs.device();
        let mut mask = match attention_mask {
            Some(m) => vh_core::tensor::attention_mask_to_bool(m, "attention_mask", &[batch, prompt_len])?,
            None => Tensor::f_ones([batch, prompt_len], (Kind::Bool, device))?,
        }
        .f_to_device(device)?
        .f_to_kind(Kind::Int64)?;
        if mask
            .f_sum_dim_intlist(1, false, Kind::Int64)?
            .f_eq(0)?
            .f_any()?
            .f_int64_value(&[])?
            != 0
        {
            return Err(invalid("a prompt row is all padding: there is nothing to continue").into());
        }
        let max_new = config.new_tokens(prompt_len as usize)?;
        let capacity = generation_capacity(prompt_len, max_new)?;
        if let Some(limit) = self.backbone.max_positions() {
            if capacity > limit {
                return Err(invalid(format!(
                    "prompt of {prompt_len} tokens plus {max_new} new ones exceeds the model's {limit} positions"
                ))
                .into());
            }
        }
        let input_ids = input_ids.f_to_device(device)?;
        // Without padding the mask changes nothing (positions count from 0, only the causal
        // rule hides keys), so the steps skip rebuilding and checking it.
        let padded = mask.f_eq(0)?.f_any()?.f_int64_value(&[])? != 0;
        let mut past: Option<Cache> = None;
        decode_loop(&input_ids, max_new, config, |next| {
            let ids = match next {
                None => &input_ids,
                Some(next) => {
                    if padded {
                        mask = Tensor::f_cat(&[&mask, &Tensor::f_ones([batch, 1], (Kind::Int64, device))?], 1)?;
                    }
                    next
                }
            };
            let mut input = CausalLmInput::new(ids).logits_to_keep(1);
            if padded {
                input = input.attention_mask(&mask);
            }
            if let Some(past) = &past {
                input = input.past(past);
            }
            let out = self.forward_with(&input)?;
            // Room for every step's keys and values: each step then writes its own in place
            // instead of copying the whole cache.
            past = Some(match next {
                None => reserve_cache(&out.past, capacity, device)?,
                Some(_) => out.past,
            });
            Ok(StepOutput {
                logits: out.logits.f_select(1, -1)?,
                values: out.values.f_select(1, -1)?,
            })
        })
    }

    /// The backbone.
    pub fn backbone(&self) -> &CausalBackbone {
        &self.backbone
    }

    /// The vocabulary size.
    pub fn vocab_size(&self) -> i64 {
        self.backbone.vocab_size()
    }

    fn tied_aliases(&self) -> Vec<(&'static str, &'static str)> {
        self.backbone.tied_aliases()
    }
}

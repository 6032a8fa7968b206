//! `CausalLmWithValueHead`: a causal language model plus a value head, as TRL's
//! `AutoModelForCausalLMWithValueHead`.

use crate::error::Result;
use crate::generation::{
    decode_loop, eos_in_vocab, eos_tensor, finish_output, generation_capacity, inferred_attention_mask, pad_column,
    reserve_cache, reset_host_syncs, trim_finished, Decoding, GenerateOutput, GenerateTimings, GenerationConfig,
    StepOutput,
};
use crate::options::LoadOptions;
use crate::static_decode::{GraphSession, GraphSlot, SessionKey, Start, StaticState};
use crate::wrapper::{check_before_load, read_folder, wrapper_accessors, Wrapped};
use serde_json::Value;
use std::cell::RefCell;
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};
use vh_core::error::invalid;
use vh_core::ops::ScalarOps;
use vh_core::tensor::{causal_lm_loss, check_labels, expect_rank};
use vh_models::inputs::{prepare_causal, CausalInputs, CausalLimits};
use vh_models::{BuildOptions, Cache, CausalLm};

/// The inputs of a forward pass; only `input_ids` is required.
#[derive(Debug, Clone, Copy)]
pub struct CausalLmInput<'a> {
    /// Token ids, i64 [batch, seq].
    pub input_ids: &'a Tensor,
    /// 1 for tokens to attend, 0 for padding, [batch, past + seq].
    pub attention_mask: Option<&'a Tensor>,
    /// Explicit positions [batch, seq]. By default `past..past + seq` for every row, as HF's and
    /// TRL's forward; [`crate::position_ids_from_attention_mask`] gives HF generate's
    /// mask-derived positions instead.
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
    pub(crate) wrapped: Wrapped,
    backbone: Box<dyn CausalLm>,
    /// The last static-cache decode (buffers and, with CUDA graphs, the captured step), reused
    /// by the next call with the same shapes.
    session: RefCell<Option<Box<GraphSession>>>,
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
        Self::from_parts_with(config, tensors, options, None)
    }

    /// [`Self::from_parts`] with a LoRA adapter built into the targeted layers: its tensors
    /// among `tensors` (our names), or fresh ones (peft's initialisation) when `fresh`.
    pub(crate) fn from_parts_with(
        config: Value,
        mut tensors: Vec<(String, Tensor)>,
        options: &LoadOptions,
        adapter: Option<crate::lora::AdapterSpec<'_>>,
    ) -> Result<Self> {
        check_before_load(&config, options)?;
        let vs = VarStore::new(options.device);
        let build = BuildOptions {
            attn_implementation: options.attn_implementation,
            ..Default::default()
        };
        // Placeholders until the checkpoint fills them (see `vh_core::param`); an adapter adds
        // up to two parameters per adapted layer.
        let cap = if adapter.is_some() {
            tensors.len() * 4
        } else {
            tensors.len()
        };
        let build_backbone = || {
            vh_core::param::deferred_for_checkpoint(cap, || {
                vh_models::registry::build_causal(vs.root(), &config, &build)
            })
        };
        let (backbone, built) = match adapter {
            None => (build_backbone()?, None),
            Some(spec) => {
                let mut named = vec![(vh_core::lora::DEFAULT_ADAPTER, spec.policy)];
                if let Some((reward, _)) = &spec.reward {
                    named.push((crate::lora::REWARD_ADAPTER, reward));
                }
                let (backbone, built) = vh_core::lora::with_adapters(&named, build_backbone)?;
                if spec.fresh {
                    let fresh = crate::lora::fresh_adapter_tensors(&vs, &tensors, options.device)?;
                    tensors.extend(fresh);
                }
                (backbone, Some((spec, built)))
            }
        };
        let hidden_size = backbone.hidden_size();
        let mut wrapped = Wrapped::load(vs, config, tensors, options, hidden_size, |key| {
            if vh_core::lora::is_lora_parameter(key) {
                Some(key.to_string())
            } else {
                backbone.parameter_name(key)
            }
        })?;
        backbone.after_load()?;
        if let Some((spec, built)) = built {
            wrapped.adapter = Some(crate::lora::Adapter::new(spec, built, &wrapped.vs)?);
        }
        Ok(Self {
            wrapped,
            backbone,
            session: RefCell::new(None),
        })
    }

    /// The backbone's last hidden state [B, T, hidden] (after the final norm, HF's
    /// `hidden_states[-1]`) with TRL's default position ids, in eval mode.
    pub(crate) fn last_hidden_state(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        expect_rank(input_ids, "input_ids", 2)?;
        let inputs = prepare_causal(
            input_ids,
            attention_mask,
            None,
            None,
            self.limits(),
            self.wrapped.vs.device(),
        )?;
        Ok(self.backbone.forward_hidden(&inputs, false)?.0)
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
            check_labels(labels, size[0], size[1], self.vocab_size())?;
        }
        let inputs = prepare_causal(
            input.input_ids,
            input.attention_mask,
            input.position_ids,
            input.past,
            self.limits(),
            self.wrapped.vs.device(),
        )?;
        let train = self.wrapped.train;
        let out = self.backbone.forward(&inputs, train, input.logits_to_keep)?;
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

    /// What the backbone's inputs are checked against.
    fn limits(&self) -> CausalLimits {
        CausalLimits {
            vocab_size: self.backbone.vocab_size(),
            num_layers: self.backbone.num_layers(),
            max_positions: self.backbone.max_positions(),
        }
    }

    /// Generates up to `max_new_tokens` per row after `input_ids` [batch, prompt] (left-padded,
    /// with `attention_mask`), feeding only the new token through the cache at each step, and
    /// returns, with the tokens, each new token's value and log-probability from the same passes.
    ///
    /// Without `attention_mask`, the mask is inferred as HF's `generate` infers it: the pad token
    /// marks padding when it occurs in the prompt and is no eos token (OPT's pad token 1, say);
    /// otherwise every token is attended.
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
        let mask = match attention_mask {
            Some(m) => vh_core::tensor::attention_mask_to_bool(m, "attention_mask", &[batch, prompt_len])?,
            None => match inferred_attention_mask(input_ids, config)? {
                Some(m) => m,
                None => Tensor::f_ones([batch, prompt_len], (Kind::Bool, device))?,
            },
        }
        .f_to_device(device)?
        .f_to_kind(Kind::Int64)?;
        if mask
            .f_sum_dim_intlist(1, false, Kind::Int64)?
            .s_eq(0)?
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
        let input_ids = input_ids.f_to_device(device)?.f_to_kind(Kind::Int64)?;
        // Everything is checked here, once: the steps build their inputs directly, so a decode
        // step reads nothing back from the device (the stop test aside, in the loop).
        let mut key_mask = mask.s_eq(1)?;
        // Without padding the mask changes nothing (positions count from 0, only the causal
        // rule hides keys), so the steps skip it.
        let padded = mask.s_eq(0)?.f_any()?.f_int64_value(&[])? != 0;
        // HF's generate numbers each row from its first attended token (the forward's default
        // numbers from the first column); without padding the two agree.
        let mut positions = if padded {
            vh_core::tensor::position_ids_from_mask(&key_mask, prompt_len)?
        } else {
            Tensor::f_arange(prompt_len, (Kind::Int64, device))?.f_unsqueeze(0)?
        };
        // The largest position id (dynamic and LongRoPE rotary scaling read it), known on the host
        // from here.
        let longest = mask
            .f_sum_dim_intlist(1, false, Kind::Int64)?
            .f_max()?
            .f_int64_value(&[])?;
        let mut max_position = longest - 1;
        if let Some(graphs) = self.static_decoding(config) {
            let prompt = Prompt {
                input_ids: &input_ids,
                key_mask: &key_mask,
                padded,
                positions: &positions,
                max_position,
            };
            return self.generate_static(&prompt, max_new, config, graphs);
        }
        let mut past: Option<Cache> = None;
        let mut past_len = 0;
        let train = self.wrapped.train;
        // A model that recomputes its cache mid-way (HF's Phi3 with LongRoPE) needs every token
        // fed so far; others keep none.
        let recompute_at = self.backbone.recompute_cache_at();
        let mut sequence = recompute_at.map(|_| input_ids.shallow_clone());
        decode_loop(&input_ids, max_new, config, |next| {
            let mut fresh_cache = next.is_none();
            let ids = match next {
                None => input_ids.shallow_clone(),
                Some(next) => {
                    if padded {
                        key_mask = Tensor::f_cat(&[&key_mask, &Tensor::f_ones([batch, 1], (Kind::Bool, device))?], 1)?;
                    }
                    // The new token sits one past each row's last position.
                    positions = positions.f_narrow(1, positions.size()[1] - 1, 1)?.s_add(1)?;
                    max_position += 1;
                    if let Some(sequence) = sequence.as_mut() {
                        *sequence = Tensor::f_cat(&[&*sequence, next], 1)?;
                    }
                    match sequence.as_ref().filter(|_| recompute_at == Some(past_len)) {
                        // HF's Phi3 drops the cache here and runs the whole sequence (its mask
                        // and mask-derived positions) again, so every key gets the factors the
                        // following steps use; the next step continues from its last position.
                        Some(sequence) => {
                            past = None;
                            past_len = 0;
                            fresh_cache = true;
                            let total = sequence.size()[1];
                            positions = if padded {
                                vh_core::tensor::position_ids_from_mask(&key_mask, total)?
                            } else {
                                Tensor::f_arange(total, (Kind::Int64, device))?.f_unsqueeze(0)?
                            };
                            sequence.shallow_clone()
                        }
                        None => next.shallow_clone(),
                    }
                }
            };
            let new_len = ids.size()[1];
            let inputs = CausalInputs {
                input_ids: ids,
                batch,
                new_len,
                past_len,
                past: past.as_ref(),
                key_mask: padded.then(|| key_mask.shallow_clone()),
                position_ids: positions.shallow_clone(),
                max_position,
                // HF's generate passes position ids (from the mask) to every model's forward.
                explicit_positions: true,
                static_keys: None,
            };
            let out = self.backbone.forward(&inputs, train, 1)?;
            drop(inputs);
            past_len += new_len;
            let values = self.wrapped.v_head.forward(&out.last_hidden_state, train)?;
            let out = CausalLmOutput {
                logits: out.logits.f_to_kind(Kind::Float)?,
                loss: None,
                values,
                past: out.cache,
            };
            // Room for every step's keys and values: each step then writes its own in place
            // instead of copying the whole cache.
            past = Some(if fresh_cache {
                reserve_cache(&out.past, capacity, device)?
            } else {
                out.past
            });
            Ok(StepOutput {
                logits: out.logits.f_select(1, -1)?,
                values: out.values.f_select(1, -1)?,
            })
        })
    }

    /// Whether this generation runs over a static cache (`Some(with CUDA graphs)`), or eagerly:
    /// the static path does greedy decoding of models whose steps need nothing from the host;
    /// other settings fall back with a warning.
    fn static_decoding(&self, config: &GenerationConfig) -> Option<bool> {
        if config.decoding == Decoding::Eager {
            return None;
        }
        let unsupported = if config.do_sample {
            Some("sampling")
        } else if config.repetition_penalty != 1.0 {
            Some("the repetition penalty")
        } else if config.forced_bos_token_id.is_some() || !config.forced_eos_token_id.is_empty() {
            Some("forced BOS/EOS tokens")
        } else if self.wrapped.train {
            Some("train mode (dropout)")
        } else if !self.backbone.supports_static_decode() || self.backbone.recompute_cache_at().is_some() {
            Some("this model's positions (dynamic or LongRoPE rotary scaling reads the length on the host)")
        } else {
            None
        };
        if let Some(what) = unsupported {
            log::warn!(
                "{:?} decoding does not support {what}: decoding eagerly",
                config.decoding
            );
            return None;
        }
        Some(config.decoding == Decoding::CudaGraphs)
    }

    /// Greedy generation over a static cache (see [`Decoding::StaticCache`]), with the decode
    /// step captured as a CUDA graph when `graphs` and the device allows it.
    fn generate_static(
        &self,
        prompt: &Prompt<'_>,
        max_new: usize,
        config: &GenerationConfig,
        graphs: bool,
    ) -> Result<GenerateOutput> {
        let device = self.wrapped.vs.device();
        let (batch, prompt_len) = (prompt.input_ids.size()[0], prompt.input_ids.size()[1]);
        let pad = pad_column(config, batch, device)?;
        let mut timings = GenerateTimings::default();
        reset_host_syncs();
        let started = std::time::Instant::now();
        let inputs = CausalInputs {
            input_ids: prompt.input_ids.shallow_clone(),
            batch,
            new_len: prompt_len,
            past_len: 0,
            past: None,
            key_mask: prompt.padded.then(|| prompt.key_mask.shallow_clone()),
            position_ids: prompt.positions.shallow_clone(),
            max_position: prompt.max_position,
            // HF's generate passes position ids (from the mask) to every model's forward.
            explicit_positions: true,
            static_keys: None,
        };
        let out = self.backbone.forward(&inputs, false, 1)?;
        drop(inputs);
        let values = self.wrapped.v_head.forward(&out.last_hidden_state, false)?;
        let first = StepOutput {
            logits: out.logits.f_to_kind(Kind::Float)?.f_select(1, -1)?,
            values: values.f_select(1, -1)?,
        };
        timings.prompt = started.elapsed();
        let vocab = first.logits.size()[1];
        let eos = eos_tensor(config, vocab, device)?;
        let last = prompt.positions.size()[1] - 1;
        let next_positions = prompt.positions.f_narrow(1, last, 1)?.s_add(1)?;
        let start = Start {
            prefix: &out.cache,
            prompt_mask: prompt.padded.then_some(prompt.key_mask),
            next_positions: &next_positions,
            prompt_len,
            max_new,
        };
        let key = SessionKey {
            batch,
            prompt_len,
            max_new,
            min_new: config.min_new_tokens,
            eos: eos_in_vocab(config, vocab),
            pad: config.pad(),
            padded: prompt.padded,
            device,
        };
        let use_graphs = graphs && graphs_available(device);
        let mut kept_session = self.session.borrow_mut();
        let reusable = use_graphs && kept_session.as_ref().is_some_and(|s| s.key == key);
        let mut session = match kept_session.take() {
            Some(session) if reusable => {
                session.state.reset(&start)?;
                session
            }
            old => {
                // The previous session's buffers go before the new ones are allocated.
                drop(old);
                Box::new(GraphSession {
                    key,
                    state: StaticState::new(&start, batch, eos, pad, config.min_new_tokens)?,
                    graph: if use_graphs { GraphSlot::Pending } else { GraphSlot::Off },
                })
            }
        };
        drop(out);
        let train = false;
        let forward = |inputs: &CausalInputs<'_>| -> Result<StepOutput> {
            let out = self.backbone.forward(inputs, train, 1)?;
            let values = self.wrapped.v_head.forward(&out.last_hidden_state, train)?;
            Ok(StepOutput {
                logits: out.logits.f_to_kind(Kind::Float)?.f_select(1, -1)?,
                values: values.f_select(1, -1)?,
            })
        };
        let produced = crate::static_decode::run(&mut session, &first, &forward, config, max_new, &mut timings)?;
        let can_finish = !session.key.eos.is_empty() && config.min_new_tokens < max_new;
        let kept = trim_finished(
            config,
            can_finish,
            produced,
            &session.state.generated_mask().f_narrow(1, 0, produced as i64)?,
        )?;
        let [tokens, values, logprobs, sample_logprobs, generated_mask] = session.state.outputs(kept)?;
        if use_graphs {
            *kept_session = Some(session);
        }
        finish_output(
            prompt.input_ids,
            &tokens,
            &values,
            &logprobs,
            &sample_logprobs,
            &generated_mask,
            kept,
            timings,
        )
    }

    /// The backbone (its `model_type`, sizes, and forward on checked inputs).
    pub fn backbone(&self) -> &dyn CausalLm {
        self.backbone.as_ref()
    }

    /// The vocabulary size.
    pub fn vocab_size(&self) -> i64 {
        self.backbone.vocab_size()
    }

    fn tied_aliases(&self) -> Vec<(&'static str, &'static str)> {
        self.backbone.tied_aliases()
    }

    /// Tied names a saved checkpoint stores (none: transformers reties decoder-only models).
    fn saved_aliases(&self) -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }
}

/// A checked prompt, as the decode paths start from it.
struct Prompt<'a> {
    /// Token ids, i64 [batch, prompt] on the device.
    input_ids: &'a Tensor,
    /// Keys to attend, bool [batch, prompt].
    key_mask: &'a Tensor,
    /// Whether any key is padding.
    padded: bool,
    /// Position ids, i64 [batch or 1, prompt].
    positions: &'a Tensor,
    /// The largest position id.
    max_position: i64,
}

/// Whether CUDA graphs can run on `device`; on a CUDA device where they cannot, says why once.
fn graphs_available(device: Device) -> bool {
    if !matches!(device, Device::Cuda(_)) {
        return false;
    }
    if vh_cuda_graph::is_available() {
        return true;
    }
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        log::warn!(
            "{}; decoding over the static cache eagerly",
            vh_cuda_graph::unavailable_reason().unwrap_or_default()
        )
    });
    false
}

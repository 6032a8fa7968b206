//! `Seq2SeqLmWithValueHead`: an encoder-decoder language model plus a value head on the
//! decoder, as TRL's `AutoModelForSeq2SeqLMWithValueHead`.

use crate::error::{Error, Result};
use crate::generation::{
    decode_loop, generation_capacity, reserve_cache, GenerateOutput, GenerationConfig, StepOutput,
};
use crate::options::LoadOptions;
use crate::wrapper::{check_before_load, read_folder, wrapper_accessors, Wrapped};
use serde_json::Value;
use std::path::Path;
use tch::{nn::VarStore, Kind, Tensor};
use vh_core::error::invalid;
use vh_core::ops::ScalarOps;
use vh_core::tensor::{check_labels, expect_rank, seq2seq_lm_loss};
use vh_models::{BuildOptions, Seq2SeqLm};
use vh_models::{EncoderOutput, Seq2SeqCache};

/// The inputs of a seq2seq forward pass. The encoder side is `input_ids` (with
/// `attention_mask`) or precomputed `encoder_outputs`; the decoder side is `decoder_input_ids`,
/// or `labels` shifted right.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seq2SeqLmInput<'a> {
    /// Encoder token ids, i64 [batch, src].
    pub input_ids: Option<&'a Tensor>,
    /// Encoder padding mask [batch, src] (1 = attend); also masks cross-attention.
    pub attention_mask: Option<&'a Tensor>,
    /// Decoder token ids [batch, tgt].
    pub decoder_input_ids: Option<&'a Tensor>,
    /// Decoder mask [batch, past + tgt].
    pub decoder_attention_mask: Option<&'a Tensor>,
    /// The encoder's output from an earlier pass, reused instead of running the encoder.
    pub encoder_outputs: Option<&'a EncoderOutput>,
    /// The caches returned by the previous pass.
    pub past: Option<&'a Seq2SeqCache>,
    /// Targets [batch, tgt]; -100 is ignored.
    pub labels: Option<&'a Tensor>,
}

/// The outputs of a seq2seq forward pass.
#[derive(Debug)]
pub struct Seq2SeqLmOutput {
    /// Next-token logits, f32 [batch, tgt, vocab].
    pub logits: Tensor,
    /// Mean cross-entropy, f32 scalar, when labels were given.
    pub loss: Option<Tensor>,
    /// One value per decoder token, f32 [batch, tgt].
    pub values: Tensor,
    /// Decoder self- and cross-attention caches for the next pass.
    pub past: Seq2SeqCache,
    /// The encoder's output, to pass back as `encoder_outputs`.
    pub encoder_outputs: EncoderOutput,
}

/// An encoder-decoder language model with a value head on the decoder.
#[derive(Debug)]
pub struct Seq2SeqLmWithValueHead {
    pub(crate) wrapped: Wrapped,
    model: Box<dyn Seq2SeqLm>,
}

wrapper_accessors!(Seq2SeqLmWithValueHead);

impl Seq2SeqLmWithValueHead {
    /// Loads a local checkpoint folder (formats as for [`crate::CausalLmWithValueHead::from_folder`]), the value head as for
    /// [`crate::CausalLmWithValueHead::from_folder`].
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
        let build_model = || {
            vh_core::param::deferred_for_checkpoint(cap, || {
                vh_models::registry::build_seq2seq(vs.root(), &config, &build)
            })
        };
        let (model, built) = match adapter {
            None => (build_model()?, None),
            Some(spec) => {
                if spec.reward.is_some() {
                    return Err(crate::Error::InvalidOption(
                        "TRL's reward adapter is for decoder-only models".into(),
                    ));
                }
                let named = [(vh_core::lora::DEFAULT_ADAPTER, spec.policy)];
                let (model, built) = vh_core::lora::with_adapters(&named, build_model)?;
                if spec.fresh {
                    let fresh = crate::lora::fresh_adapter_tensors(&vs, &tensors, options.device)?;
                    tensors.extend(fresh);
                }
                (model, Some((spec, built)))
            }
        };
        // Buffers HF fills with zeros when a checkpoint lacks them (Bart's final_logits_bias):
        // one zero expanded to the buffer's shape, so nothing of the config's size is allocated
        // before the checkpoint's shapes are checked; made real once they are.
        let mut defaulted = Vec::new();
        for (name, shape) in model.zero_default_buffers() {
            if !tensors
                .iter()
                .any(|(key, _)| model.parameter_name(key).as_deref() == Some(name))
            {
                let zero = Tensor::f_zeros([] as [i64; 0], (Kind::Float, tch::Device::Cpu))?;
                tensors.push((name.to_string(), zero.f_expand(shape.as_slice(), false)?));
                defaulted.push(name);
            }
        }
        let hidden_size = model.hidden_size();
        let mut wrapped = Wrapped::load(vs, config, tensors, options, hidden_size, |key| {
            if vh_core::lora::is_lora_parameter(key) {
                Some(key.to_string())
            } else {
                model.parameter_name(key)
            }
        })?;
        let variables = wrapped.vs.variables();
        for name in defaulted {
            if let Some(buffer) = variables.get(name) {
                let real = buffer.f_contiguous()?;
                tch::no_grad(|| buffer.shallow_clone().f_set_data(&real))?;
            }
        }
        if let Some((spec, built)) = built {
            wrapped.adapter = Some(crate::lora::Adapter::new(spec, built, &wrapped.vs)?);
        }
        Ok(Self { wrapped, model })
    }

    /// Runs the model; see [`Seq2SeqLmInput`] for what each argument may be.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        input_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        decoder_input_ids: Option<&Tensor>,
        decoder_attention_mask: Option<&Tensor>,
        encoder_outputs: Option<&EncoderOutput>,
        past: Option<&Seq2SeqCache>,
        labels: Option<&Tensor>,
    ) -> Result<Seq2SeqLmOutput> {
        self.forward_with(&Seq2SeqLmInput {
            input_ids,
            attention_mask,
            decoder_input_ids,
            decoder_attention_mask,
            encoder_outputs,
            past,
            labels,
        })
    }

    /// Runs the encoder alone, e.g. once before decoding step by step.
    pub fn encode(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<EncoderOutput> {
        Ok(self.model.encode(input_ids, attention_mask, self.wrapped.train)?)
    }

    /// Runs the model on the given inputs.
    pub fn forward_with(&self, input: &Seq2SeqLmInput<'_>) -> Result<Seq2SeqLmOutput> {
        let train = self.wrapped.train;
        let encoder_outputs = match (input.encoder_outputs, input.input_ids) {
            (Some(enc), _) => {
                let mut enc = enc.shallow_clone();
                if enc.attention_mask.is_none() {
                    if let Some(mask) = input.attention_mask {
                        let size = enc.last_hidden_state.size();
                        let mask = vh_core::tensor::attention_mask_to_bool(mask, "attention_mask", &size[..2])?;
                        enc.attention_mask = Some(mask.f_to_device(enc.last_hidden_state.device())?);
                    }
                }
                enc
            }
            (None, Some(ids)) => self.encode(ids, input.attention_mask)?,
            (None, None) => {
                return Err(invalid("a decoder pass needs encoder input: `input_ids` or `encoder_outputs`").into())
            }
        };
        let shifted;
        let decoder_input_ids = match (input.decoder_input_ids, input.labels) {
            (Some(ids), _) => ids,
            (None, Some(labels)) => {
                // Checked before shifting, which allocates [batch, 1] from the labels' shape:
                // labels of shape [2^32, 0] (a few bytes in a `vh forward` file) made that a 32 GB
                // allocation, whose failure tch 0.24 turns into a panic (found by fuzzing).
                expect_rank(labels, "labels", 2)?;
                let (batch, seq) = (labels.size()[0], labels.size()[1]);
                let encoder_batch = encoder_outputs.last_hidden_state.size()[0];
                if batch != encoder_batch || seq == 0 {
                    return Err(invalid(format!(
                        "`labels` must have shape [{encoder_batch}, seq] with seq > 0 (the encoder's batch), got {:?}",
                        labels.size()
                    ))
                    .into());
                }
                shifted = self.model.shift_right(labels)?;
                &shifted
            }
            (None, None) => {
                // Bart's HF forward shifts the encoder ids right when given no decoder inputs;
                // T5's requires them.
                let derived = match input.input_ids {
                    Some(ids) => self.model.decoder_inputs_from_input_ids(ids)?,
                    None => None,
                };
                shifted = derived.ok_or_else(|| invalid("`decoder_input_ids` or `labels` is required"))?;
                &shifted
            }
        };
        expect_rank(decoder_input_ids, "decoder_input_ids", 2)?;
        if let Some(labels) = input.labels {
            let size = decoder_input_ids.size();
            check_labels(labels, size[0], size[1], self.model.vocab_size())?;
        }
        let out = self.model.decode(
            decoder_input_ids,
            input.decoder_attention_mask,
            &encoder_outputs,
            input.past,
            train,
        )?;
        let values = self.wrapped.v_head.forward(&out.last_hidden_state, train)?;
        let logits = if out.logits.kind() == Kind::Float {
            out.logits
        } else {
            out.logits.f_to_kind(Kind::Float)?
        };
        let loss = input
            .labels
            .map(|labels| seq2seq_lm_loss(&logits, labels))
            .transpose()?;
        Ok(Seq2SeqLmOutput {
            logits,
            loss,
            values,
            past: out.cache,
            encoder_outputs,
        })
    }

    /// Generates up to `max_new_tokens` decoder tokens per row for the encoder input
    /// `input_ids` [batch, src] (padded, with `attention_mask`): the encoder runs once, then the
    /// decoder from `decoder_start_token_id`, one new token per step through the caches. Returns,
    /// with the tokens, each new token's value and log-probability from the same passes.
    pub fn generate(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        config: &GenerationConfig,
    ) -> Result<GenerateOutput> {
        self.generate_from(input_ids, attention_mask, None, config)
    }

    /// [`Seq2SeqLmWithValueHead::generate`] continuing a decoder prompt `decoder_input_ids`
    /// [batch, len] (unpadded), as HF's `generate(..., decoder_input_ids=...)`: when no row
    /// starts with `decoder_start_token_id`, it is put in front; `sequences` returns the decoder
    /// prompt followed by the new tokens, and `max_length` counts the decoder prompt.
    pub fn generate_from(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        decoder_input_ids: Option<&Tensor>,
        config: &GenerationConfig,
    ) -> Result<GenerateOutput> {
        let vocab_size = self.model.vocab_size();
        config.validate(vocab_size)?;
        if config.decoding != crate::generation::Decoding::Eager {
            log::warn!(
                "{:?} decoding is for decoder-only models: encoder-decoder models decode eagerly",
                config.decoding
            );
        }
        let start = config
            .decoder_start_token_id
            .or(self.model.decoder_start_token_id())
            .ok_or_else(|| {
                Error::InvalidOption(
                    "decoder_start_token_id is set neither in the generation config nor in config.json".into(),
                )
            })?;
        let (batch, src_len) = vh_core::tensor::check_input_ids(input_ids, vocab_size)?;
        if let Some(mask) = attention_mask {
            let mask = vh_core::tensor::attention_mask_to_bool(mask, "attention_mask", &[batch, src_len])?;
            if mask.f_any_dim(1, false)?.f_logical_not()?.f_any()?.f_int64_value(&[])? != 0 {
                return Err(invalid("an encoder row is all padding: there is nothing to condition on").into());
            }
        }
        let prompt = match decoder_input_ids {
            None => None,
            Some(ids) => {
                let (rows, _) = vh_core::tensor::check_input_ids(ids, vocab_size)?;
                if rows != batch {
                    return Err(invalid(format!("decoder_input_ids has {rows} rows, input_ids {batch}")).into());
                }
                Some(ids.f_to_kind(Kind::Int64)?)
            }
        };
        let start_column = |device| Tensor::f_full([batch, 1], start, (Kind::Int64, device));
        let device = self.wrapped.vs.device();
        // HF puts the start token in front unless some row already begins with it.
        let start_ids = match prompt {
            None => start_column(device)?,
            Some(ids) => {
                let ids = ids.f_to_device(device)?;
                let begins = ids.f_narrow(1, 0, 1)?.s_eq(start)?.f_any()?.f_int64_value(&[])? != 0;
                if begins {
                    ids
                } else {
                    Tensor::f_cat(&[&start_column(device)?, &ids], 1)?
                }
            }
        };
        let decoder_len = start_ids.size()[1];
        let max_new = config.new_tokens(decoder_len as usize)?;
        let capacity = generation_capacity(decoder_len, max_new)?;
        // A mask without padding changes nothing; dropping it spares every step the
        // cross-attention padding bias.
        let attention_mask = match attention_mask {
            Some(m) if m.s_eq(0)?.f_any()?.f_int64_value(&[])? == 0 => None,
            other => other,
        };
        let encoder = self.encode(input_ids, attention_mask)?;
        let mut past: Option<Seq2SeqCache> = None;
        decode_loop(&start_ids, max_new, config, |next| {
            let ids = next.unwrap_or(&start_ids);
            let out = self.forward_with(&Seq2SeqLmInput {
                decoder_input_ids: Some(ids),
                encoder_outputs: Some(&encoder),
                past: past.as_ref(),
                ..Default::default()
            })?;
            // Room for every step's self-attention keys and values, written in place.
            past = Some(match next {
                None => Seq2SeqCache {
                    self_attention: reserve_cache(&out.past.self_attention, capacity, device)?,
                    cross_attention: out.past.cross_attention,
                },
                Some(_) => out.past,
            });
            Ok(StepOutput {
                logits: out.logits.f_select(1, -1)?,
                values: out.values.f_select(1, -1)?,
            })
        })
    }

    /// The encoder-decoder backbone.
    pub fn model(&self) -> &dyn Seq2SeqLm {
        self.model.as_ref()
    }

    /// The vocabulary size.
    pub fn vocab_size(&self) -> i64 {
        self.model.vocab_size()
    }

    fn tied_aliases(&self) -> Vec<(&'static str, &'static str)> {
        self.model.tied_aliases()
    }

    fn saved_aliases(&self) -> Vec<(&'static str, &'static str)> {
        self.model.saved_aliases()
    }
}

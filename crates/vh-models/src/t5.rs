//! T5 (v1.0, v1.1, flan-t5), as HF's `modeling_t5.py`: an encoder and a decoder sharing one
//! embedding, relative position buckets instead of absolute positions, RMS layer norms, and
//! parameters named like HF's state dict (`encoder.block.0.layer.0.SelfAttention.q.weight`, ...).

use crate::activation::Activation;
use crate::attention::{padding_bias, AttentionSpec, AttnImplementation, MaskSpec, SoftmaxPrecision};
use crate::cache::{Cache, LayerCache, Seq2SeqCache};
use crate::inputs::shift_tokens_right;
use crate::layers::{merge_heads, split_heads, Linear, RmsNorm, RmsNormStyle};
use crate::registry::EncoderOutput;
use crate::registry::{Architecture, BuildOptions, Family, Seq2SeqLm, Seq2SeqLmOutput};
use serde::Deserialize;
use tch::{nn, Device, Kind, Tensor};
use vh_core::error::invalid;
use vh_core::error::{check_epsilons, check_positive, check_probabilities, parse_config};
use vh_core::ops::ScalarOps;
use vh_core::tensor::{attention_mask_to_bool, check_input_ids, expect_rank, lm_logits, min_value, TrainDropout};
use vh_core::{Error, Result};

fn default_vocab_size() -> i64 {
    32128
}
fn default_d_model() -> i64 {
    512
}
fn default_d_kv() -> i64 {
    64
}
fn default_d_ff() -> i64 {
    2048
}
fn default_num_layers() -> i64 {
    6
}
fn default_num_heads() -> i64 {
    8
}
fn default_num_buckets() -> i64 {
    32
}
fn default_max_distance() -> i64 {
    128
}
fn default_dropout_rate() -> f64 {
    0.1
}
fn default_layer_norm_epsilon() -> f64 {
    1e-6
}
fn default_feed_forward_proj() -> String {
    "relu".to_string()
}
fn default_true() -> bool {
    true
}
fn default_pad_token_id() -> Option<i64> {
    Some(0)
}
fn default_eos_token_id() -> Option<i64> {
    Some(1)
}

/// HF's `T5Config`: the fields that change the math, with HF's defaults.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct T5Config {
    /// Vocabulary size.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: i64,
    /// Hidden size.
    #[serde(default = "default_d_model")]
    pub d_model: i64,
    /// Width of each attention head.
    #[serde(default = "default_d_kv")]
    pub d_kv: i64,
    /// Feed-forward inner width.
    #[serde(default = "default_d_ff")]
    pub d_ff: i64,
    /// Encoder blocks.
    #[serde(default = "default_num_layers")]
    pub num_layers: i64,
    /// Decoder blocks; `None` means `num_layers`.
    #[serde(default)]
    pub num_decoder_layers: Option<i64>,
    /// Attention heads.
    #[serde(default = "default_num_heads")]
    pub num_heads: i64,
    /// Number of relative-position buckets.
    #[serde(default = "default_num_buckets")]
    pub relative_attention_num_buckets: i64,
    /// Distance beyond which relative positions share the last bucket.
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: i64,
    /// Dropout everywhere (train mode).
    #[serde(default = "default_dropout_rate")]
    pub dropout_rate: f64,
    /// RMS-norm epsilon.
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    /// Feed-forward kind: `ACT` or `gated-ACT` ("relu", "gated-gelu", "gated-silu", ...).
    #[serde(default = "default_feed_forward_proj")]
    pub feed_forward_proj: String,
    /// The LM head shares the embedding (and the decoder output is scaled by d_model^-0.5).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// The first decoder input; labels are shifted right behind it.
    #[serde(default)]
    pub decoder_start_token_id: Option<i64>,
    /// Padding token; replaces -100 in shifted labels.
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: Option<i64>,
    /// End-of-sequence token.
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: Option<i64>,
}

impl T5Config {
    /// Parses a config.json value and checks it.
    pub fn from_json(config: &serde_json::Value) -> Result<Self> {
        let cfg: Self = parse_config(config, "T5")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks sizes, the feed-forward name and the dropout rate.
    pub fn validate(&self) -> Result<()> {
        check_positive(&[
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_decoder_layers", self.decoder_layers()),
            ("num_heads", self.num_heads),
            ("relative_attention_num_buckets", self.relative_attention_num_buckets),
        ])?;
        if self.relative_attention_num_buckets < 4
            || self.relative_attention_max_distance <= self.relative_attention_num_buckets / 4
        {
            return Err(Error::Config(format!(
                "relative_attention_num_buckets ({}) must be >= 4 and relative_attention_max_distance ({}) larger than a quarter of it",
                self.relative_attention_num_buckets, self.relative_attention_max_distance
            )));
        }
        // The attention projections are num_heads * d_kv wide: sizes from config.json may make
        // that product overflow (found by fuzzing: a panic in debug builds).
        if self.num_heads.checked_mul(self.d_kv).is_none() {
            return Err(Error::Config(format!(
                "num_heads * d_kv overflows ({} * {})",
                self.num_heads, self.d_kv
            )));
        }
        check_probabilities(&[("dropout_rate", self.dropout_rate)])?;
        check_epsilons(&[("layer_norm_epsilon", self.layer_norm_epsilon)])?;
        self.feed_forward()?;
        Ok(())
    }

    /// Decoder blocks.
    pub fn decoder_layers(&self) -> i64 {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    /// The feed-forward activation and whether it is gated, parsed as HF does
    /// ("gated-gelu" means the tanh-approximated `gelu_new`).
    pub fn feed_forward(&self) -> Result<(Activation, bool)> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let (name, gated) = match parts[..] {
            [act] => (act, false),
            ["gated", act] => (act, true),
            _ => {
                return Err(Error::Config(format!(
                    "feed_forward_proj `{}` must be `ACT` or `gated-ACT`",
                    self.feed_forward_proj
                )))
            }
        };
        let name = if self.feed_forward_proj == "gated-gelu" {
            "gelu_new"
        } else {
            name
        };
        Ok((name.parse()?, gated))
    }
}

/// A bias-free projection (T5 has no biases), the shared [`Linear`] so LoRA adapters reach it.
fn linear(vs: &nn::Path, name: &str, in_dim: i64, out_dim: i64) -> Result<Linear> {
    Linear::new(vs.sub(name), in_dim, out_dim, false)
}

/// The feed-forward network: `wi`, activation, `wo`, or the gated form `act(wi_0) * wi_1`, `wo`.
#[derive(Debug)]
pub struct DenseReluDense {
    wi: Vec<Linear>,
    wo: Linear,
    act: Activation,
    dropout: f64,
}

impl DenseReluDense {
    /// Creates `wi` (or `wi_0`, `wi_1`) and `wo` under `vs`.
    pub fn new(vs: nn::Path, cfg: &T5Config) -> Result<Self> {
        let (act, gated) = cfg.feed_forward()?;
        let wi = if gated {
            vec![
                linear(&vs, "wi_0", cfg.d_model, cfg.d_ff)?,
                linear(&vs, "wi_1", cfg.d_model, cfg.d_ff)?,
            ]
        } else {
            vec![linear(&vs, "wi", cfg.d_model, cfg.d_ff)?]
        };
        Ok(Self {
            wi,
            wo: linear(&vs, "wo", cfg.d_ff, cfg.d_model)?,
            act,
            dropout: cfg.dropout_rate,
        })
    }

    /// [B, T, d_model] -> [B, T, d_model].
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = self.act.forward(&self.wi[0].forward(x)?)?;
        if let Some(wi_1) = self.wi.get(1) {
            h = h.f_mul(&wi_1.forward(x)?)?;
        }
        let mut h = h.train_dropout(self.dropout, train)?;
        if h.kind() != self.wo.weight.kind() {
            h = h.f_to_kind(self.wo.weight.kind())?;
        }
        self.wo.forward(&h)
    }
}

/// Maps relative positions (key - query) to bucket ids, as HF's `_relative_position_bucket`:
/// exact buckets for near positions, log-spaced ones up to `max_distance`; bidirectional
/// buckets (the encoder's) split the range by sign, unidirectional ones (the decoder's) see only
/// the past.
pub fn relative_position_bucket(
    relative_position: &Tensor,
    bidirectional: bool,
    num_buckets: i64,
    max_distance: i64,
) -> Result<Tensor> {
    let mut num_buckets = num_buckets;
    let (mut buckets, position) = if bidirectional {
        num_buckets /= 2;
        let sign = relative_position.s_gt(0)?.f_to_kind(Kind::Int64)?.s_mul(num_buckets)?;
        (sign, relative_position.f_abs()?)
    } else {
        (
            relative_position.f_zeros_like()?,
            relative_position.f_neg()?.s_clamp_min(0)?,
        )
    };
    let max_exact = num_buckets / 2;
    let is_small = position.s_lt(max_exact)?;
    let scale = (max_distance as f64 / max_exact as f64).ln();
    let large = position
        .f_to_kind(Kind::Float)?
        .s_div(max_exact as f64)?
        .f_log()?
        .s_div(scale)?
        .s_mul((num_buckets - max_exact) as f64)?
        .f_to_kind(Kind::Int64)?
        .s_add(max_exact)?
        .s_clamp_max(num_buckets - 1)?;
    buckets = buckets.f_add(&position.f_where_self(&is_small, &large)?)?;
    Ok(buckets)
}

/// Multi-head attention without score scaling (T5 folds it into the weights). Self-attention
/// in block 0 of each stack also owns the relative position bias table.
#[derive(Debug)]
pub struct T5Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// `relative_attention_bias.weight` [num_buckets, heads], block 0's self-attention only.
    relative_attention_bias: Option<Tensor>,
    n_heads: i64,
    d_kv: i64,
    bidirectional: bool,
    num_buckets: i64,
    max_distance: i64,
    dropout: f64,
}

impl T5Attention {
    /// Creates `q`, `k`, `v`, `o` (and the bias table when `has_relative_attention_bias`).
    pub fn new(vs: nn::Path, cfg: &T5Config, is_decoder: bool, has_relative_attention_bias: bool) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        let relative_attention_bias = if has_relative_attention_bias {
            Some(vh_core::param::var(
                &vs.sub("relative_attention_bias"),
                "weight",
                &[cfg.relative_attention_num_buckets, cfg.num_heads],
                nn::Init::Const(0.0),
            )?)
        } else {
            None
        };
        Ok(Self {
            q: linear(&vs, "q", cfg.d_model, inner)?,
            k: linear(&vs, "k", cfg.d_model, inner)?,
            v: linear(&vs, "v", cfg.d_model, inner)?,
            o: linear(&vs, "o", inner, cfg.d_model)?,
            relative_attention_bias,
            n_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
            bidirectional: !is_decoder,
            num_buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
            dropout: cfg.dropout_rate,
        })
    }

    /// The position bias [1, heads, T, S] for queries at `query_positions` [T] over keys
    /// 0..key_len, from this layer's bias table.
    pub fn compute_bias(&self, query_positions: &Tensor, key_len: i64) -> Result<Tensor> {
        let table = self
            .relative_attention_bias
            .as_ref()
            .ok_or_else(|| invalid("this attention layer has no relative position bias"))?;
        let keys = Tensor::f_arange(key_len, (Kind::Int64, table.device()))?.f_unsqueeze(0)?;
        let relative = keys.f_sub(&query_positions.f_unsqueeze(1)?)?;
        let buckets = relative_position_bucket(&relative, self.bidirectional, self.num_buckets, self.max_distance)?;
        let values = Tensor::f_embedding(table, &buckets, -1, false, false)?;
        Ok(values.f_permute([2, 0, 1])?.f_unsqueeze(0)?)
    }

    fn heads(&self, x: &Tensor) -> Result<Tensor> {
        split_heads(x, self.n_heads, self.d_kv)
    }

    /// Keys and values of `states` [B, S, d_model], [B, heads, S, d_kv] each.
    pub fn project_kv(&self, states: &Tensor) -> Result<LayerCache> {
        Ok(LayerCache::new(
            self.heads(&self.k.forward(states)?)?,
            self.heads(&self.v.forward(states)?)?,
        ))
    }

    /// Attends from `x` [B, T, d_model] over `kv` with `bias` added to the scores: no score
    /// scaling (T5 folds it into the weights), softmax in f32, always eager as in HF (the
    /// position bias rides on every score); causality and padding are in the bias.
    fn attend(&self, x: &Tensor, kv: &LayerCache, bias: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let q = self.heads(&self.q.forward(x)?)?;
        let spec = AttentionSpec {
            implementation: AttnImplementation::Eager,
            score_ops: Vec::new(),
            softmax: SoftmaxPrecision::F32,
            dropout: self.dropout,
            future: min_value(q.kind()),
            causal: false,
        };
        let attended = spec.attend(&q, &kv.keys, &kv.values, bias, train)?;
        self.o.forward(&merge_heads(&attended)?)
    }

    /// Self-attention over the cached and new positions; returns the output and the grown cache.
    pub fn forward_self(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        past: Option<&LayerCache>,
        train: bool,
    ) -> Result<(Tensor, LayerCache)> {
        let mut kv = self.project_kv(x)?;
        if let Some(past) = past {
            kv = past.append(&kv.keys, &kv.values)?;
        }
        let out = self.attend(x, &kv, bias, train)?;
        Ok((out, kv))
    }

    /// Cross-attention over precomputed encoder keys and values.
    pub fn forward_cross(&self, x: &Tensor, kv: &LayerCache, bias: Option<&Tensor>, train: bool) -> Result<Tensor> {
        self.attend(x, kv, bias, train)
    }
}

/// Keeps f16 activations finite between sublayers, as HF's T5 does.
fn clamp_half(x: Tensor) -> Result<Tensor> {
    if x.kind() != Kind::Half {
        return Ok(x);
    }
    let max = 65504.0;
    let limit = if x.f_isinf()?.f_any()?.f_int64_value(&[])? != 0 {
        max - 1000.0
    } else {
        max
    };
    x.s_clamp(-limit, limit)
}

/// One T5 block: self-attention, cross-attention (decoder only), feed-forward, each pre-normed
/// with a residual.
#[derive(Debug)]
pub struct T5Block {
    self_attention: T5Attention,
    self_norm: RmsNorm,
    cross: Option<(T5Attention, RmsNorm)>,
    ff: DenseReluDense,
    ff_norm: RmsNorm,
    dropout: f64,
}

impl T5Block {
    /// Creates block `idx` under `vs` (`layer.0` self-attention, `layer.1` cross-attention for
    /// the decoder, then the feed-forward layer).
    pub fn new(vs: nn::Path, cfg: &T5Config, is_decoder: bool, idx: i64) -> Result<Self> {
        let layer = vs.sub("layer");
        let l0 = layer.sub(0);
        let self_attention = T5Attention::new(l0.sub("SelfAttention"), cfg, is_decoder, idx == 0)?;
        let self_norm = RmsNorm::new(
            l0.sub("layer_norm"),
            cfg.d_model,
            cfg.layer_norm_epsilon,
            RmsNormStyle::T5,
        )?;
        let cross = if is_decoder {
            let l1 = layer.sub(1);
            Some((
                T5Attention::new(l1.sub("EncDecAttention"), cfg, true, false)?,
                RmsNorm::new(
                    l1.sub("layer_norm"),
                    cfg.d_model,
                    cfg.layer_norm_epsilon,
                    RmsNormStyle::T5,
                )?,
            ))
        } else {
            None
        };
        let lf = layer.sub(if is_decoder { 2 } else { 1 });
        Ok(Self {
            self_attention,
            self_norm,
            cross,
            ff: DenseReluDense::new(lf.sub("DenseReluDense"), cfg)?,
            ff_norm: RmsNorm::new(
                lf.sub("layer_norm"),
                cfg.d_model,
                cfg.layer_norm_epsilon,
                RmsNormStyle::T5,
            )?,
            dropout: cfg.dropout_rate,
        })
    }

    /// Runs the block; `cross_kv` is this layer's encoder keys and values (decoder only).
    fn forward(
        &self,
        x: &Tensor,
        self_bias: Option<&Tensor>,
        past: Option<&LayerCache>,
        cross_kv: Option<&LayerCache>,
        cross_bias: Option<&Tensor>,
        train: bool,
    ) -> Result<(Tensor, LayerCache)> {
        let (attn, cache) = self
            .self_attention
            .forward_self(&self.self_norm.forward(x)?, self_bias, past, train)?;
        let mut h = clamp_half(x.f_add(&attn.train_dropout(self.dropout, train)?)?)?;
        if let (Some((attention, norm)), Some(kv)) = (&self.cross, cross_kv) {
            let out = attention.forward_cross(&norm.forward(&h)?, kv, cross_bias, train)?;
            h = clamp_half(h.f_add(&out.train_dropout(self.dropout, train)?)?)?;
        }
        let ff = self.ff.forward(&self.ff_norm.forward(&h)?, train)?;
        Ok((clamp_half(h.f_add(&ff.train_dropout(self.dropout, train)?)?)?, cache))
    }
}

/// An encoder or decoder stack: blocks and a final RMS norm.
#[derive(Debug)]
pub struct T5Stack {
    blocks: Vec<T5Block>,
    final_layer_norm: RmsNorm,
    dropout: f64,
}

impl T5Stack {
    /// Creates `block.{i}` and `final_layer_norm` under `vs`.
    pub fn new(vs: nn::Path, cfg: &T5Config, is_decoder: bool) -> Result<Self> {
        let layers = if is_decoder {
            cfg.decoder_layers()
        } else {
            cfg.num_layers
        };
        let blocks = (0..layers)
            .map(|i| T5Block::new(vs.sub("block").sub(i), cfg, is_decoder, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            blocks,
            final_layer_norm: RmsNorm::new(
                vs.sub("final_layer_norm"),
                cfg.d_model,
                cfg.layer_norm_epsilon,
                RmsNormStyle::T5,
            )?,
            dropout: cfg.dropout_rate,
        })
    }

    fn first_attention(&self) -> &T5Attention {
        &self.blocks[0].self_attention
    }
}

/// T5 with its LM head (`T5ForConditionalGeneration`).
#[derive(Debug)]
pub struct T5ForConditionalGeneration {
    /// `shared.weight` [vocab, d_model], the embedding of both stacks.
    pub shared: Tensor,
    encoder: T5Stack,
    decoder: T5Stack,
    /// `lm_head.weight`; the same tensor as `shared.weight` when tied.
    pub lm_head: Tensor,
    cfg: T5Config,
}

impl T5ForConditionalGeneration {
    /// Creates `shared`, `encoder.*`, `decoder.*` and, unless tied, `lm_head.weight` under `vs`.
    pub fn new(vs: nn::Path, cfg: &T5Config) -> Result<Self> {
        cfg.validate()?;
        let shared = vh_core::param::var(
            &vs.sub("shared"),
            "weight",
            &[cfg.vocab_size, cfg.d_model],
            nn::Init::Const(0.0),
        )?;
        let encoder = T5Stack::new(vs.sub("encoder"), cfg, false)?;
        let decoder = T5Stack::new(vs.sub("decoder"), cfg, true)?;
        let lm_head = if cfg.tie_word_embeddings {
            shared.shallow_clone()
        } else {
            vh_core::param::var(
                &vs.sub("lm_head"),
                "weight",
                &[cfg.vocab_size, cfg.d_model],
                nn::Init::Const(0.0),
            )?
        };
        Ok(Self {
            shared,
            encoder,
            decoder,
            lm_head,
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    /// Maps a checkpoint key to a parameter name: the stacks' embedding aliases are the shared
    /// embedding; a tied model's `lm_head.weight` is read from `shared.weight` instead.
    pub fn parameter_name(&self, key: &str) -> Option<String> {
        match key {
            "encoder.embed_tokens.weight" | "decoder.embed_tokens.weight" => Some("shared.weight".to_string()),
            "lm_head.weight" if self.cfg.tie_word_embeddings => None,
            other => Some(other.to_string()),
        }
    }

    fn device(&self) -> Device {
        self.shared.device()
    }

    /// Runs the encoder over `input_ids` [B, S] with an optional padding mask [B, S].
    pub fn encode(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, train: bool) -> Result<EncoderOutput> {
        let (batch, len) = check_input_ids(input_ids, self.cfg.vocab_size)?;
        let device = self.device();
        let mask = attention_mask
            .map(|m| {
                attention_mask_to_bool(m, "attention_mask", &[batch, len])?
                    .f_to_device(device)
                    .map_err(Error::from)
            })
            .transpose()?;
        let kind = self.shared.kind();
        let positions = Tensor::f_arange(len, (Kind::Int64, device))?;
        let mut bias = self.encoder.first_attention().compute_bias(&positions, len)?;
        if let Some(mask) = &mask {
            bias = bias.f_add(&padding_bias(mask, kind)?)?;
        }
        let embeds = Tensor::f_embedding(
            &self.shared,
            &input_ids.f_to_device(device)?.f_to_kind(Kind::Int64)?,
            -1,
            false,
            false,
        )?;
        let mut h = embeds.train_dropout(self.encoder.dropout, train)?;
        for block in &self.encoder.blocks {
            h = block.forward(&h, Some(&bias), None, None, None, train)?.0;
        }
        let h = self
            .encoder
            .final_layer_norm
            .forward(&h)?
            .train_dropout(self.encoder.dropout, train)?;
        Ok(EncoderOutput {
            last_hidden_state: h,
            attention_mask: mask,
        })
    }

    /// Runs the decoder over `decoder_input_ids` [B, T] after the cached positions, attending
    /// to `encoder`. `decoder_attention_mask` [B, past + T] covers cached and new tokens. The
    /// cross-attention keys and values come from `past` when it has them, else from the encoder.
    pub fn decode(
        &self,
        decoder_input_ids: &Tensor,
        decoder_attention_mask: Option<&Tensor>,
        encoder: &EncoderOutput,
        past: Option<&Seq2SeqCache>,
        train: bool,
    ) -> Result<Seq2SeqLmOutput> {
        let (batch, new_len) = check_input_ids(decoder_input_ids, self.cfg.vocab_size)?;
        let enc = &encoder.last_hidden_state;
        expect_rank(enc, "encoder hidden states", 3)?;
        if enc.size()[0] != batch || enc.size()[2] != self.cfg.d_model {
            return Err(invalid(format!(
                "encoder hidden states {:?} do not fit decoder_input_ids of batch {batch} and d_model {}",
                enc.size(),
                self.cfg.d_model
            )));
        }
        let past = past.filter(|c| !c.is_empty());
        let layers = self.decoder.blocks.len();
        if let Some(p) = past {
            if p.self_attention.layers.len() != layers || p.cross_attention.layers.len() != layers {
                return Err(invalid(format!("cache does not have the decoder's {layers} layers")));
            }
            if p.self_attention.batch_size() != Some(batch) {
                return Err(invalid("cache batch size differs from decoder_input_ids'"));
            }
        }
        let past_len = past.map_or(0, Seq2SeqCache::seq_len);
        let total = past_len + new_len;
        let device = self.device();
        let kind = self.shared.kind();

        // Self-attention bias: relative positions of the new queries, plus causal and padding
        // masks, computed once and shared by every layer as in HF.
        let queries = Tensor::f_arange_start(past_len, total, (Kind::Int64, device))?;
        let mut self_bias = self.decoder.first_attention().compute_bias(&queries, total)?;
        let key_mask = decoder_attention_mask
            .map(|m| {
                attention_mask_to_bool(m, "decoder_attention_mask", &[batch, total])?
                    .f_to_device(device)
                    .map_err(Error::from)
            })
            .transpose()?;
        let mask = MaskSpec {
            key_mask: key_mask.as_ref(),
            batch,
            new_len,
            past_len,
            future: min_value(kind),
            sliding_window: None,
        };
        if let Some(mask_bias) = mask.bias(kind, device)? {
            self_bias = self_bias.f_add(&mask_bias)?;
        }
        let cross_bias = encoder
            .attention_mask
            .as_ref()
            .map(|m| padding_bias(m, kind))
            .transpose()?;

        let embeds = Tensor::f_embedding(
            &self.shared,
            &decoder_input_ids.f_to_device(device)?.f_to_kind(Kind::Int64)?,
            -1,
            false,
            false,
        )?;
        let mut h = embeds.train_dropout(self.decoder.dropout, train)?;
        let mut self_layers = Vec::with_capacity(layers);
        let mut cross_layers = Vec::with_capacity(layers);
        for (i, block) in self.decoder.blocks.iter().enumerate() {
            // Encoder keys and values are projected once, on the first pass, then reused.
            let cross_kv = match (past, &block.cross) {
                (Some(p), _) => p.cross_attention.layers[i].shallow_clone(),
                (None, Some((attention, _))) => attention.project_kv(enc)?,
                (None, None) => return Err(invalid("decoder block without cross-attention")),
            };
            let layer_past = past.map(|p| &p.self_attention.layers[i]);
            let (out, cache) = block.forward(
                &h,
                Some(&self_bias),
                layer_past,
                Some(&cross_kv),
                cross_bias.as_ref(),
                train,
            )?;
            h = out;
            self_layers.push(cache);
            cross_layers.push(cross_kv);
        }
        let h = self
            .decoder
            .final_layer_norm
            .forward(&h)?
            .train_dropout(self.decoder.dropout, train)?;
        let scaled = if self.cfg.tie_word_embeddings {
            h.s_mul((self.cfg.d_model as f64).powf(-0.5))?
        } else {
            h.shallow_clone()
        };
        let logits = lm_logits(&scaled, &self.lm_head, 0)?;
        Ok(Seq2SeqLmOutput {
            logits,
            last_hidden_state: h,
            cache: Seq2SeqCache {
                self_attention: Cache { layers: self_layers },
                cross_attention: Cache { layers: cross_layers },
            },
        })
    }

    /// Decoder inputs from labels, as HF's `_shift_right`: the decoder start token, then the
    /// labels but the last, with -100 replaced by the pad token.
    pub fn shift_right(&self, labels: &Tensor) -> Result<Tensor> {
        shift_tokens_right(labels, self.cfg.pad_token_id, self.cfg.decoder_start_token_id)
    }
}

impl Seq2SeqLm for T5ForConditionalGeneration {
    fn model_type(&self) -> &'static str {
        "t5"
    }

    fn vocab_size(&self) -> i64 {
        self.cfg.vocab_size
    }

    fn hidden_size(&self) -> i64 {
        self.cfg.d_model
    }

    fn decoder_start_token_id(&self) -> Option<i64> {
        self.cfg.decoder_start_token_id
    }

    fn encode(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, train: bool) -> Result<EncoderOutput> {
        T5ForConditionalGeneration::encode(self, input_ids, attention_mask, train)
    }

    fn decode(
        &self,
        decoder_input_ids: &Tensor,
        decoder_attention_mask: Option<&Tensor>,
        encoder: &EncoderOutput,
        past: Option<&Seq2SeqCache>,
        train: bool,
    ) -> Result<Seq2SeqLmOutput> {
        T5ForConditionalGeneration::decode(self, decoder_input_ids, decoder_attention_mask, encoder, past, train)
    }

    fn shift_right(&self, labels: &Tensor) -> Result<Tensor> {
        T5ForConditionalGeneration::shift_right(self, labels)
    }

    fn parameter_name(&self, key: &str) -> Option<String> {
        T5ForConditionalGeneration::parameter_name(self, key)
    }

    fn tied_aliases(&self) -> Vec<(&'static str, &'static str)> {
        let mut aliases = vec![
            ("encoder.embed_tokens.weight", "shared.weight"),
            ("decoder.embed_tokens.weight", "shared.weight"),
        ];
        if self.cfg.tie_word_embeddings {
            aliases.push(("lm_head.weight", "shared.weight"));
        }
        aliases
    }

    fn is_lookup_only(&self, name: &str) -> bool {
        name.starts_with("encoder.") || (!self.cfg.tie_word_embeddings && name == "shared.weight")
    }
}

/// T5's registry entry (v1.0, v1.1, flan-t5).
pub const ARCHITECTURE: Architecture = Architecture {
    model_type: "t5",
    name: "T5",
    family: Family::Seq2Seq(build),
    // HF's T5 runs eager attention (its position bias is added to the scores).
    default_attention: AttnImplementation::Eager,
    tiny_config,
};

fn build(vs: nn::Path, config: &serde_json::Value, _options: &BuildOptions) -> Result<Box<dyn Seq2SeqLm>> {
    Ok(Box::new(T5ForConditionalGeneration::new(
        vs,
        &T5Config::from_json(config)?,
    )?))
}

fn tiny_config() -> serde_json::Value {
    serde_json::json!({
        "model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": 40, "d_model": 16,
        "d_kv": 4, "d_ff": 24, "num_layers": 2, "num_heads": 4, "decoder_start_token_id": 0, "pad_token_id": 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tch::nn::VarStore;

    fn tiny(extra: serde_json::Value) -> T5Config {
        let mut cfg = json!({"vocab_size": 40, "d_model": 16, "d_kv": 4, "d_ff": 24, "num_layers": 2, "num_heads": 4,
                             "decoder_start_token_id": 0, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 20});
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        T5Config::from_json(&cfg).unwrap()
    }

    fn random_model(cfg: &T5Config) -> (VarStore, T5ForConditionalGeneration) {
        let vs = VarStore::new(Device::Cpu);
        let model = T5ForConditionalGeneration::new(vs.root(), cfg).unwrap();
        crate::test_util::randomize(&vs, 5, 0.3);
        (vs, model)
    }

    #[test]
    fn config_parses_feed_forward_like_hf() {
        let cfg = T5Config::from_json(&json!({})).unwrap();
        assert_eq!((cfg.vocab_size, cfg.d_model, cfg.decoder_layers()), (32128, 512, 6));
        assert_eq!(cfg.feed_forward().unwrap(), (Activation::Relu, false));
        assert_eq!(
            tiny(json!({"feed_forward_proj": "gated-gelu"})).feed_forward().unwrap(),
            (Activation::GeluNew, true)
        );
        assert_eq!(
            tiny(json!({"feed_forward_proj": "gated-silu"})).feed_forward().unwrap(),
            (Activation::Silu, true)
        );
        assert_eq!(
            tiny(json!({"feed_forward_proj": "gelu"})).feed_forward().unwrap(),
            (Activation::Gelu, false)
        );
        assert!(T5Config::from_json(&json!({"feed_forward_proj": "fancy-gelu"})).is_err());
        assert!(T5Config::from_json(&json!({"feed_forward_proj": "gated-relu-x"})).is_err());
        assert!(T5Config::from_json(&json!({"d_kv": 0})).is_err());
        // Fuzzing regression: num_heads * d_kv overflowed i64 and panicked while building the
        // attention (crates/vh-fuzz/regressions/config/t5-heads-times-d-kv-overflow.json).
        let err = T5Config::from_json(&json!({"d_kv": 1i64 << 62})).unwrap_err();
        assert!(err.to_string().contains("num_heads * d_kv overflows"), "{err}");
    }

    #[test]
    fn buckets_match_values_from_hf() {
        let rel = Tensor::from_slice(&[-20i64, -9, -8, -7, -1, 0, 1, 7, 8, 9, 20, 200]);
        let uni = relative_position_bucket(&rel, false, 32, 128).unwrap();
        // Values from HF's `_relative_position_bucket`. Unidirectional: the past is exact below 16,
        // log-spaced beyond; the future is bucket 0.
        assert_eq!(
            Vec::<i64>::try_from(uni).unwrap(),
            vec![17, 9, 8, 7, 1, 0, 0, 0, 0, 0, 0, 0]
        );
        let bi = relative_position_bucket(&rel, true, 32, 128).unwrap();
        // Bidirectional: 16 buckets per sign, exact below 8.
        assert_eq!(
            Vec::<i64>::try_from(bi).unwrap(),
            vec![10, 8, 8, 7, 1, 0, 17, 23, 24, 24, 26, 31]
        );
    }

    #[test]
    fn incremental_decoding_equals_full_decoder_pass() {
        let cfg = tiny(json!({"feed_forward_proj": "gated-gelu", "tie_word_embeddings": false}));
        let (_vs, model) = random_model(&cfg);
        let enc_ids = Tensor::from_slice2(&[[3i64, 4, 5, 6, 0], [7, 8, 9, 10, 11]]);
        let enc_mask = Tensor::from_slice2(&[[1i64, 1, 1, 1, 0], [1, 1, 1, 1, 1]]);
        let encoder = model.encode(&enc_ids, Some(&enc_mask), false).unwrap();
        let dec = Tensor::from_slice2(&[
            [0i64, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
        ]);
        let full = model.decode(&dec, None, &encoder, None, false).unwrap();
        let mut cache = model
            .decode(&dec.narrow(1, 0, 2), None, &encoder, None, false)
            .unwrap()
            .cache;
        for t in 2..12 {
            let step = model
                .decode(&dec.narrow(1, t, 1), None, &encoder, Some(&cache), false)
                .unwrap();
            let diff = (step.logits.squeeze_dim(1) - full.logits.select(1, t))
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff < 1e-5, "step {t}: {diff}");
            cache = step.cache;
        }
        assert_eq!(cache.seq_len(), 12);
    }

    #[test]
    fn encoder_padding_does_not_change_real_positions() {
        let cfg = tiny(json!({}));
        let (_vs, model) = random_model(&cfg);
        let plain = model
            .encode(&Tensor::from_slice2(&[[3i64, 4, 5]]), None, false)
            .unwrap();
        let padded = model
            .encode(
                &Tensor::from_slice2(&[[3i64, 4, 5, 0, 0]]),
                Some(&Tensor::from_slice2(&[[1i64, 1, 1, 0, 0]])),
                false,
            )
            .unwrap();
        let diff = (padded.last_hidden_state.narrow(1, 0, 3) - &plain.last_hidden_state)
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
        let dec = Tensor::from_slice2(&[[0i64, 6, 7]]);
        let a = model.decode(&dec, None, &plain, None, false).unwrap().logits;
        let b = model.decode(&dec, None, &padded, None, false).unwrap().logits;
        assert!((a - b).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn shift_right_follows_hf() {
        let cfg = tiny(json!({"pad_token_id": 0, "decoder_start_token_id": 2}));
        let (_vs, model) = random_model(&cfg);
        let shifted = model.shift_right(&Tensor::from_slice2(&[[5i64, -100, 7, 8]])).unwrap();
        assert_eq!(Vec::<i64>::try_from(shifted.reshape([-1])).unwrap(), vec![2, 5, 0, 7]);
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        let cfg = tiny(json!({}));
        let (_vs, model) = random_model(&cfg);
        let encoder = model
            .encode(&Tensor::from_slice2(&[[3i64, 4, 5]]), None, false)
            .unwrap();
        assert!(
            model
                .decode(&Tensor::from_slice2(&[[0i64], [0]]), None, &encoder, None, false)
                .is_err(),
            "batch"
        );
        assert!(
            model
                .decode(&Tensor::from_slice2(&[[0i64, 40]]), None, &encoder, None, false)
                .is_err(),
            "id"
        );
        assert!(model
            .decode(
                &Tensor::from_slice2(&[[0i64, 1]]),
                Some(&Tensor::from_slice2(&[[1i64]])),
                &encoder,
                None,
                false
            )
            .is_err());
        assert!(model
            .encode(
                &Tensor::from_slice2(&[[3i64, 4]]),
                Some(&Tensor::from_slice2(&[[1i64, 1, 1]])),
                false
            )
            .is_err());
    }
}

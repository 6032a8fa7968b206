//! Bart, as HF's `modeling_bart.py`: an encoder and a decoder sharing one token embedding
//! (optionally scaled by sqrt(d_model)), learned positions offset by 2, a LayerNorm on the
//! embeddings of each stack, post-LayerNorm layers, the activation the config names, an LM head
//! tied to the embedding unless `tie_word_embeddings` is false, and `final_logits_bias` added to
//! the logits. Parameters are named like HF's state dict (`model.encoder.layers.0.fc1.weight`,
//! `model.decoder.layers.0.encoder_attn.k_proj.bias`, ...).

use crate::activation::Activation;
use crate::attention::{padding_bias, AttentionSpec, AttnImplementation, MaskSpec, ScoreOp, SoftmaxPrecision};
use crate::cache::{Cache, LayerCache, Seq2SeqCache};
use crate::inputs::shift_tokens_right;
use crate::layers::{embedding_padding_idx, layer_dropped, merge_heads, split_heads, LayerNorm, Linear};
use crate::registry::{Architecture, BuildOptions, EncoderOutput, Family, Seq2SeqLm, Seq2SeqLmOutput};
use serde::Deserialize;
use serde_json::Value;
use tch::{nn, Device, Kind, Tensor};
use vh_core::error::{check_positive, check_probabilities, invalid, parse_config};
use vh_core::ops::ScalarOps;
use vh_core::tensor::{attention_mask_to_bool, check_input_ids, expect_rank, lm_logits, min_value, TrainDropout};
use vh_core::{Error, Result};

/// Bart's position tables have this many rows before position 0 (HF's
/// `BartLearnedPositionalEmbedding.offset`, a fairseq legacy).
pub const POSITION_OFFSET: i64 = 2;

/// The epsilon of every Bart LayerNorm (torch's default; the config has none).
const LAYER_NORM_EPS: f64 = 1e-5;

mod defaults {
    pub fn vocab_size() -> i64 {
        50265
    }
    pub fn max_position_embeddings() -> i64 {
        1024
    }
    pub fn layers() -> i64 {
        12
    }
    pub fn ffn_dim() -> i64 {
        4096
    }
    pub fn attention_heads() -> i64 {
        16
    }
    pub fn activation_function() -> String {
        "gelu".to_string()
    }
    pub fn d_model() -> i64 {
        1024
    }
    pub fn dropout() -> f64 {
        0.1
    }
    pub fn pad_token_id() -> Option<i64> {
        Some(1)
    }
    pub fn eos_token_id() -> Option<i64> {
        Some(2)
    }
    pub fn decoder_start_token_id() -> Option<i64> {
        Some(2)
    }
    pub fn yes() -> bool {
        true
    }
}

/// HF's `BartConfig`: the fields that change the math, with transformers 4.57's defaults.
/// (`add_final_layer_norm`, `normalize_before` and `add_bias_logits` left BartConfig long before
/// 4.57; HF ignores them in config.json and so does this.)
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BartConfig {
    /// Vocabulary size.
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: i64,
    /// Learned positions of each stack (the tables have 2 more rows, see [`POSITION_OFFSET`]).
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: i64,
    /// Hidden size of both stacks (what TRL's value head reads, as `hidden_size`).
    #[serde(default = "defaults::d_model")]
    pub d_model: i64,
    /// Encoder layers.
    #[serde(default = "defaults::layers")]
    pub encoder_layers: i64,
    /// Encoder feed-forward width.
    #[serde(default = "defaults::ffn_dim")]
    pub encoder_ffn_dim: i64,
    /// Encoder attention heads.
    #[serde(default = "defaults::attention_heads")]
    pub encoder_attention_heads: i64,
    /// Decoder layers.
    #[serde(default = "defaults::layers")]
    pub decoder_layers: i64,
    /// Decoder feed-forward width.
    #[serde(default = "defaults::ffn_dim")]
    pub decoder_ffn_dim: i64,
    /// Decoder attention heads (self- and cross-attention).
    #[serde(default = "defaults::attention_heads")]
    pub decoder_attention_heads: i64,
    /// The probability of skipping each encoder layer in train mode (LayerDrop).
    #[serde(default)]
    pub encoder_layerdrop: f64,
    /// The probability of skipping each decoder layer in train mode (LayerDrop).
    #[serde(default)]
    pub decoder_layerdrop: f64,
    /// The feed-forward activation's name.
    #[serde(default = "defaults::activation_function")]
    pub activation_function: String,
    /// Dropout on embeddings and sublayer outputs (train mode).
    #[serde(default = "defaults::dropout")]
    pub dropout: f64,
    /// Dropout on attention probabilities (train mode).
    #[serde(default)]
    pub attention_dropout: f64,
    /// Dropout after the feed-forward activation (train mode).
    #[serde(default)]
    pub activation_dropout: f64,
    /// Token embeddings are multiplied by sqrt(d_model).
    #[serde(default)]
    pub scale_embedding: bool,
    /// The LM head shares the token embedding (transformers' default).
    #[serde(default = "defaults::yes")]
    pub tie_word_embeddings: bool,
    /// The embedding's `padding_idx`, and what -100 becomes in shifted labels.
    #[serde(default = "defaults::pad_token_id")]
    pub pad_token_id: Option<i64>,
    /// End-of-sequence token.
    #[serde(default = "defaults::eos_token_id")]
    pub eos_token_id: Option<i64>,
    /// The first decoder input; labels are shifted right behind it.
    #[serde(default = "defaults::decoder_start_token_id")]
    pub decoder_start_token_id: Option<i64>,
    /// How attention is computed (not part of config.json; HF's default is sdpa).
    #[serde(skip)]
    pub attn_implementation: AttnImplementation,
}

impl BartConfig {
    /// Parses a config.json value and checks it.
    pub fn from_json(config: &Value) -> Result<Self> {
        let cfg: Self = parse_config(config, "Bart")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks sizes, names and ranges: positive sizes, each stack's heads dividing d_model (HF's
    /// `BartAttention` raises otherwise), a known activation, probabilities in [0, 1], a position
    /// table whose row count does not overflow.
    pub fn validate(&self) -> Result<()> {
        check_positive(&[
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("d_model", self.d_model),
            ("encoder_layers", self.encoder_layers),
            ("encoder_ffn_dim", self.encoder_ffn_dim),
            ("encoder_attention_heads", self.encoder_attention_heads),
            ("decoder_layers", self.decoder_layers),
            ("decoder_ffn_dim", self.decoder_ffn_dim),
            ("decoder_attention_heads", self.decoder_attention_heads),
        ])?;
        for (name, heads) in [
            ("encoder_attention_heads", self.encoder_attention_heads),
            ("decoder_attention_heads", self.decoder_attention_heads),
        ] {
            if self.d_model % heads != 0 {
                return Err(Error::Config(format!(
                    "d_model ({}) must be divisible by {name} ({heads})",
                    self.d_model
                )));
            }
        }
        if self.max_position_embeddings.checked_add(POSITION_OFFSET).is_none() {
            return Err(Error::Config("max_position_embeddings is too large".into()));
        }
        check_probabilities(&[
            ("dropout", self.dropout),
            ("attention_dropout", self.attention_dropout),
            ("activation_dropout", self.activation_dropout),
            ("encoder_layerdrop", self.encoder_layerdrop),
            ("decoder_layerdrop", self.decoder_layerdrop),
        ])?;
        self.activation()?;
        Ok(())
    }

    /// The feed-forward activation.
    pub fn activation(&self) -> Result<Activation> {
        self.activation_function.parse()
    }

    /// What token embeddings are multiplied by: sqrt(d_model) with `scale_embedding`, else 1.
    pub fn embed_scale(&self) -> f64 {
        if self.scale_embedding {
            (self.d_model as f64).sqrt()
        } else {
            1.0
        }
    }
}

/// Maps a Bart checkpoint key to this model's parameter name: keys saved from the bare
/// `BartModel` (`shared.*`, `encoder.*`, `decoder.*`) get the `model.` prefix, the stacks'
/// `embed_tokens` are the shared embedding, and fairseq's `*.version` markers (which HF ignores)
/// hold nothing.
pub fn parameter_name(key: &str) -> Option<String> {
    if key.ends_with(".version") {
        return None;
    }
    let key = if key.starts_with("shared.") || key.starts_with("encoder.") || key.starts_with("decoder.") {
        format!("model.{key}")
    } else {
        key.to_string()
    };
    match key.as_str() {
        "model.encoder.embed_tokens.weight" | "model.decoder.embed_tokens.weight" => {
            Some("model.shared.weight".to_string())
        }
        _ => Some(key),
    }
}

/// Multi-head attention (`BartAttention`): self-attention of either stack or the decoder's
/// cross-attention, scores scaled by head_dim^-0.5 after the product and softmaxed in their own
/// dtype, as HF's eager path.
#[derive(Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: i64,
    head_dim: i64,
    dropout: f64,
    causal: bool,
    attn_implementation: AttnImplementation,
}

impl Attention {
    /// Creates the q/k/v/out projections (with biases) under `vs`; `causal` for the decoder's
    /// self-attention.
    pub fn new(vs: nn::Path, cfg: &BartConfig, heads: i64, causal: bool) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            k_proj: Linear::new(vs.sub("k_proj"), d, d, true)?,
            v_proj: Linear::new(vs.sub("v_proj"), d, d, true)?,
            q_proj: Linear::new(vs.sub("q_proj"), d, d, true)?,
            out_proj: Linear::new(vs.sub("out_proj"), d, d, true)?,
            heads,
            head_dim: d / heads,
            dropout: cfg.attention_dropout,
            causal,
            attn_implementation: cfg.attn_implementation,
        })
    }

    /// HF's `eager_attention_forward`: `q @ k^T * scaling`, plus the mask, softmax in the scores'
    /// dtype (no f32 upcast in Bart), dropout, `@ v`. The fused kernel gets the same scale.
    fn spec(&self, kind: Kind) -> AttentionSpec {
        AttentionSpec {
            implementation: self.attn_implementation,
            score_ops: vec![ScoreOp::Mul((self.head_dim as f64).powf(-0.5))],
            softmax: SoftmaxPrecision::Scores,
            dropout: self.dropout,
            future: min_value(kind),
            causal: self.causal,
        }
    }

    /// Keys and values of `states` [B, S, d_model], [B, heads, S, head_dim] each.
    pub fn project_kv(&self, states: &Tensor) -> Result<LayerCache> {
        Ok(LayerCache::new(
            split_heads(&self.k_proj.forward(states)?, self.heads, self.head_dim)?,
            split_heads(&self.v_proj.forward(states)?, self.heads, self.head_dim)?,
        ))
    }

    /// Attends from `x` [B, T, d_model] over `kv`, adding `bias` [B or 1, 1, T or 1, S] to the
    /// scores (`None`: nothing hidden, or for causal self-attention the causal rule alone).
    pub fn attend(&self, x: &Tensor, kv: &LayerCache, bias: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let q = split_heads(&self.q_proj.forward(x)?, self.heads, self.head_dim)?;
        let attended = self.spec(q.kind()).attend(&q, &kv.keys, &kv.values, bias, train)?;
        self.out_proj.forward(&merge_heads(&attended)?)
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
}

/// The feed-forward block of a layer: `fc2(dropout(act(fc1(x))))`.
#[derive(Debug)]
struct FeedForward {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    activation_dropout: f64,
}

impl FeedForward {
    fn new(vs: &nn::Path, cfg: &BartConfig, ffn_dim: i64) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(vs.sub("fc1"), cfg.d_model, ffn_dim, true)?,
            fc2: Linear::new(vs.sub("fc2"), ffn_dim, cfg.d_model, true)?,
            act: cfg.activation()?,
            activation_dropout: cfg.activation_dropout,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self
            .act
            .forward(&self.fc1.forward(x)?)?
            .train_dropout(self.activation_dropout, train)?;
        self.fc2.forward(&h)
    }
}

/// HF's encoder-layer guard for f16: when a layer's output holds inf or NaN, clamp it to the
/// f16 range less 1000. Other dtypes pass unchanged (and without the host read of the test).
fn clamp_half_overflow(x: Tensor) -> Result<Tensor> {
    if x.kind() != Kind::Half {
        return Ok(x);
    }
    let overflow = x.f_isinf()?.f_any()?.f_logical_or(&x.f_isnan()?.f_any()?)?;
    if overflow.f_int64_value(&[])? == 0 {
        return Ok(x);
    }
    let limit = 65504.0 - 1000.0;
    x.s_clamp(-limit, limit)
}

/// One encoder layer (`BartEncoderLayer`): self-attention and feed-forward, each followed by
/// its residual and then a LayerNorm (post-LN).
#[derive(Debug)]
pub struct EncoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    ffn: FeedForward,
    final_layer_norm: LayerNorm,
    dropout: f64,
}

impl EncoderLayer {
    /// Creates the layer's parameters under `vs`.
    pub fn new(vs: nn::Path, cfg: &BartConfig) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::new(vs.sub("self_attn"), cfg, cfg.encoder_attention_heads, false)?,
            self_attn_layer_norm: LayerNorm::new(vs.sub("self_attn_layer_norm"), cfg.d_model, LAYER_NORM_EPS)?,
            ffn: FeedForward::new(&vs, cfg, cfg.encoder_ffn_dim)?,
            final_layer_norm: LayerNorm::new(vs.sub("final_layer_norm"), cfg.d_model, LAYER_NORM_EPS)?,
            dropout: cfg.dropout,
        })
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let attn = self.self_attn.attend(x, &self.self_attn.project_kv(x)?, bias, train)?;
        let h = self
            .self_attn_layer_norm
            .forward(&x.f_add(&attn.train_dropout(self.dropout, train)?)?)?;
        let ff = self.ffn.forward(&h, train)?.train_dropout(self.dropout, train)?;
        clamp_half_overflow(self.final_layer_norm.forward(&h.f_add(&ff)?)?)
    }
}

/// One decoder layer (`BartDecoderLayer`): causal self-attention, cross-attention over the
/// encoder output and feed-forward, each post-LN.
#[derive(Debug)]
pub struct DecoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    encoder_attn: Attention,
    encoder_attn_layer_norm: LayerNorm,
    ffn: FeedForward,
    final_layer_norm: LayerNorm,
    dropout: f64,
}

impl DecoderLayer {
    /// Creates the layer's parameters under `vs`.
    pub fn new(vs: nn::Path, cfg: &BartConfig) -> Result<Self> {
        let (d, heads) = (cfg.d_model, cfg.decoder_attention_heads);
        Ok(Self {
            self_attn: Attention::new(vs.sub("self_attn"), cfg, heads, true)?,
            self_attn_layer_norm: LayerNorm::new(vs.sub("self_attn_layer_norm"), d, LAYER_NORM_EPS)?,
            encoder_attn: Attention::new(vs.sub("encoder_attn"), cfg, heads, false)?,
            encoder_attn_layer_norm: LayerNorm::new(vs.sub("encoder_attn_layer_norm"), d, LAYER_NORM_EPS)?,
            ffn: FeedForward::new(&vs, cfg, cfg.decoder_ffn_dim)?,
            final_layer_norm: LayerNorm::new(vs.sub("final_layer_norm"), d, LAYER_NORM_EPS)?,
            dropout: cfg.dropout,
        })
    }

    /// Runs the layer; `cross_kv` is this layer's projection of the encoder output.
    fn forward(
        &self,
        x: &Tensor,
        self_bias: Option<&Tensor>,
        past: Option<&LayerCache>,
        cross_kv: &LayerCache,
        cross_bias: Option<&Tensor>,
        train: bool,
    ) -> Result<(Tensor, LayerCache)> {
        let (attn, cache) = self.self_attn.forward_self(x, self_bias, past, train)?;
        let h = self
            .self_attn_layer_norm
            .forward(&x.f_add(&attn.train_dropout(self.dropout, train)?)?)?;
        let cross = self.encoder_attn.attend(&h, cross_kv, cross_bias, train)?;
        let h = self
            .encoder_attn_layer_norm
            .forward(&h.f_add(&cross.train_dropout(self.dropout, train)?)?)?;
        let ff = self.ffn.forward(&h, train)?.train_dropout(self.dropout, train)?;
        Ok((self.final_layer_norm.forward(&h.f_add(&ff)?)?, cache))
    }
}

/// What both stacks have besides their layers: a position table and the LayerNorm on the
/// embeddings.
#[derive(Debug)]
struct StackEmbeddings {
    /// `embed_positions.weight` [max_position_embeddings + 2, d_model].
    embed_positions: Tensor,
    layernorm_embedding: LayerNorm,
}

impl StackEmbeddings {
    fn new(vs: &nn::Path, cfg: &BartConfig) -> Result<Self> {
        let rows = cfg.max_position_embeddings + POSITION_OFFSET;
        Ok(Self {
            embed_positions: vh_core::param::var(
                &vs.sub("embed_positions"),
                "weight",
                &[rows, cfg.d_model],
                nn::Init::Const(0.0),
            )?,
            layernorm_embedding: LayerNorm::new(vs.sub("layernorm_embedding"), cfg.d_model, LAYER_NORM_EPS)?,
        })
    }

    /// `layernorm_embedding(tokens + positions[past..past + T])` with dropout: the input of
    /// the first layer. HF numbers positions `past..past + T` whatever the padding.
    fn forward(&self, tokens: &Tensor, past_len: i64, dropout: f64, train: bool) -> Result<Tensor> {
        let len = tokens.size()[1];
        let ids = Tensor::f_arange_start(
            past_len + POSITION_OFFSET,
            past_len + len + POSITION_OFFSET,
            (Kind::Int64, tokens.device()),
        )?;
        let positions = Tensor::f_embedding(&self.embed_positions, &ids, -1, false, false)?;
        let h = self.layernorm_embedding.forward(&tokens.f_add(&positions)?)?;
        h.train_dropout(dropout, train)
    }
}

/// Bart with its LM head (`BartForConditionalGeneration`).
#[derive(Debug)]
pub struct BartForConditionalGeneration {
    /// `model.shared.weight` [vocab, d_model], the token embedding of both stacks.
    pub shared: Tensor,
    encoder: StackEmbeddings,
    encoder_layers: Vec<EncoderLayer>,
    decoder: StackEmbeddings,
    decoder_layers: Vec<DecoderLayer>,
    /// `lm_head.weight` [vocab, d_model]; the same tensor as `model.shared.weight` when tied.
    pub lm_head: Tensor,
    /// The `final_logits_bias` buffer [1, vocab], added to the logits (not trained).
    pub final_logits_bias: Tensor,
    cfg: BartConfig,
}

impl BartForConditionalGeneration {
    /// Creates `model.shared`, `model.encoder.*`, `model.decoder.*`, `final_logits_bias` and,
    /// unless tied, `lm_head.weight` under `vs`.
    pub fn new(vs: nn::Path, cfg: &BartConfig) -> Result<Self> {
        cfg.validate()?;
        let model = vs.sub("model");
        let zeros = nn::Init::Const(0.0);
        let shared = vh_core::param::var(&model.sub("shared"), "weight", &[cfg.vocab_size, cfg.d_model], zeros)?;
        let encoder_path = model.sub("encoder");
        let encoder = StackEmbeddings::new(&encoder_path, cfg)?;
        let encoder_layers = (0..cfg.encoder_layers)
            .map(|i| EncoderLayer::new(encoder_path.sub("layers").sub(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let decoder_path = model.sub("decoder");
        let decoder = StackEmbeddings::new(&decoder_path, cfg)?;
        let decoder_layers = (0..cfg.decoder_layers)
            .map(|i| DecoderLayer::new(decoder_path.sub("layers").sub(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_logits_bias = vh_core::param::buffer(&vs, "final_logits_bias", &[1, cfg.vocab_size])?;
        let lm_head = if cfg.tie_word_embeddings {
            shared.shallow_clone()
        } else {
            vh_core::param::var(&vs.sub("lm_head"), "weight", &[cfg.vocab_size, cfg.d_model], zeros)?
        };
        Ok(Self {
            shared,
            encoder,
            encoder_layers,
            decoder,
            decoder_layers,
            lm_head,
            final_logits_bias,
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BartConfig {
        &self.cfg
    }

    /// Maps a checkpoint key to a parameter of this model (see [`parameter_name`]); a tied
    /// model reads its head from the shared embedding.
    pub fn parameter_name(&self, key: &str) -> Option<String> {
        let name = parameter_name(key)?;
        if self.cfg.tie_word_embeddings && name == "lm_head.weight" {
            return None;
        }
        Some(name)
    }

    fn device(&self) -> Device {
        self.shared.device()
    }

    /// The (scaled) token embeddings of `ids` [B, T], checked against the vocabulary.
    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.f_to_device(self.device())?.f_to_kind(Kind::Int64)?;
        let padding_idx = embedding_padding_idx(self.cfg.pad_token_id, self.cfg.vocab_size);
        let embeds = Tensor::f_embedding(&self.shared, &ids, padding_idx, false, false)?;
        // HF multiplies by a Python float; by 1.0 that is the identity, so it is skipped.
        if self.cfg.scale_embedding {
            embeds.s_mul(self.cfg.embed_scale())
        } else {
            Ok(embeds)
        }
    }

    /// A typed error when `total` positions do not fit the position tables.
    fn check_positions(&self, what: &str, total: i64) -> Result<()> {
        let limit = self.cfg.max_position_embeddings;
        if total > limit {
            return Err(invalid(format!(
                "{what} of {total} positions exceeds the model's {limit} positions (max_position_embeddings)"
            )));
        }
        Ok(())
    }

    /// Runs the encoder over `input_ids` [B, S] with an optional padding mask [B, S].
    pub fn encode(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, train: bool) -> Result<EncoderOutput> {
        let (batch, len) = check_input_ids(input_ids, self.cfg.vocab_size)?;
        self.check_positions("an encoder input", len)?;
        let device = self.device();
        let mask = attention_mask
            .map(|m| {
                attention_mask_to_bool(m, "attention_mask", &[batch, len])?
                    .f_to_device(device)
                    .map_err(Error::from)
            })
            .transpose()?;
        let kind = self.shared.kind();
        let bias = mask.as_ref().map(|m| padding_bias(m, kind)).transpose()?;
        let mut h = self
            .encoder
            .forward(&self.embed_tokens(input_ids)?, 0, self.cfg.dropout, train)?;
        for layer in &self.encoder_layers {
            // HF draws the LayerDrop number for every layer in train mode; a dropped layer is
            // skipped whole.
            if layer_dropped(self.cfg.encoder_layerdrop, train)? {
                continue;
            }
            h = layer.forward(&h, bias.as_ref(), train)?;
        }
        Ok(EncoderOutput {
            last_hidden_state: h,
            attention_mask: mask,
        })
    }

    /// Runs the decoder over `decoder_input_ids` [B, T] after the cached positions, attending
    /// to `encoder`. `decoder_attention_mask` [B, past + T] covers cached and new tokens. The
    /// cross-attention keys and values come from `past` when it has them, else they are projected
    /// from the encoder output once, here.
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
        let layers = self.decoder_layers.len();
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
        self.check_positions(
            &format!("a decoder sequence ({past_len} cached + {new_len} new)"),
            total,
        )?;
        let device = self.device();
        let kind = self.shared.kind();

        // Self-attention: with a decoder mask, HF's combined bias (the dtype's minimum on future
        // and padded keys), built once for every layer; without one, the layers apply the causal
        // rule themselves (the fused kernel's causal flag, or the same bias built in eager).
        let key_mask = decoder_attention_mask
            .map(|m| {
                attention_mask_to_bool(m, "decoder_attention_mask", &[batch, total])?
                    .f_to_device(device)
                    .map_err(Error::from)
            })
            .transpose()?;
        let self_bias = MaskSpec {
            key_mask: key_mask.as_ref(),
            batch,
            new_len,
            past_len,
            future: min_value(kind),
            sliding_window: None,
        }
        .bias_beyond_causal(kind, device)?;
        let cross_bias = encoder
            .attention_mask
            .as_ref()
            .map(|m| padding_bias(m, kind))
            .transpose()?;

        let mut h = self.decoder.forward(
            &self.embed_tokens(decoder_input_ids)?,
            past_len,
            self.cfg.dropout,
            train,
        )?;
        let mut self_layers = Vec::with_capacity(layers);
        let mut cross_layers = Vec::with_capacity(layers);
        for (i, layer) in self.decoder_layers.iter().enumerate() {
            // Encoder keys and values are projected once, on the first pass, then reused.
            let cross_kv = match past {
                Some(p) => p.cross_attention.layers[i].shallow_clone(),
                None => layer.encoder_attn.project_kv(enc)?,
            };
            let layer_past = past.map(|p| &p.self_attention.layers[i]);
            if layer_dropped(self.cfg.decoder_layerdrop, train)? {
                // HF skips the layer whole. The cache still gets this layer's keys and values
                // (projections only, no random draws), so it keeps one entry per layer.
                let kv = layer.self_attn.project_kv(&h)?;
                let cache = match layer_past {
                    Some(p) => p.append(&kv.keys, &kv.values)?,
                    None => kv,
                };
                self_layers.push(cache);
                cross_layers.push(cross_kv);
                continue;
            }
            let (out, cache) = layer.forward(
                &h,
                self_bias.as_ref(),
                layer_past,
                &cross_kv,
                cross_bias.as_ref(),
                train,
            )?;
            h = out;
            self_layers.push(cache);
            cross_layers.push(cross_kv);
        }
        // HF: `lm_head(hidden) + final_logits_bias`, the bias added after the product.
        let logits = lm_logits(&h, &self.lm_head, 0)?.f_add(&self.final_logits_bias)?;
        Ok(Seq2SeqLmOutput {
            logits,
            last_hidden_state: h,
            cache: Seq2SeqCache {
                self_attention: Cache { layers: self_layers },
                cross_attention: Cache { layers: cross_layers },
            },
        })
    }

    /// Decoder inputs from labels, as HF's `shift_tokens_right`.
    pub fn shift_right(&self, labels: &Tensor) -> Result<Tensor> {
        shift_tokens_right(labels, self.cfg.pad_token_id, self.cfg.decoder_start_token_id)
    }
}

impl Seq2SeqLm for BartForConditionalGeneration {
    fn model_type(&self) -> &'static str {
        "bart"
    }

    fn vocab_size(&self) -> i64 {
        self.cfg.vocab_size
    }

    fn hidden_size(&self) -> i64 {
        // BartConfig maps `hidden_size` to `d_model`, which TRL's value head reads.
        self.cfg.d_model
    }

    fn decoder_start_token_id(&self) -> Option<i64> {
        self.cfg.decoder_start_token_id
    }

    fn encode(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, train: bool) -> Result<EncoderOutput> {
        BartForConditionalGeneration::encode(self, input_ids, attention_mask, train)
    }

    fn decode(
        &self,
        decoder_input_ids: &Tensor,
        decoder_attention_mask: Option<&Tensor>,
        encoder: &EncoderOutput,
        past: Option<&Seq2SeqCache>,
        train: bool,
    ) -> Result<Seq2SeqLmOutput> {
        BartForConditionalGeneration::decode(self, decoder_input_ids, decoder_attention_mask, encoder, past, train)
    }

    fn shift_right(&self, labels: &Tensor) -> Result<Tensor> {
        BartForConditionalGeneration::shift_right(self, labels)
    }

    /// HF's `BartModel.forward` without decoder inputs: `shift_tokens_right(input_ids)`.
    fn decoder_inputs_from_input_ids(&self, input_ids: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.shift_right(input_ids)?))
    }

    fn zero_default_buffers(&self) -> Vec<(&'static str, Vec<i64>)> {
        vec![("final_logits_bias", vec![1, self.cfg.vocab_size])]
    }

    fn parameter_name(&self, key: &str) -> Option<String> {
        BartForConditionalGeneration::parameter_name(self, key)
    }

    fn tied_aliases(&self) -> Vec<(&'static str, &'static str)> {
        // Both stacks' embeddings are the shared one in HF whatever `tie_word_embeddings` says
        // (BartModel hands its `shared` weight to both); the LM head only when tied.
        let mut aliases = vec![
            ("model.encoder.embed_tokens.weight", "model.shared.weight"),
            ("model.decoder.embed_tokens.weight", "model.shared.weight"),
        ];
        if self.cfg.tie_word_embeddings {
            aliases.push(("lm_head.weight", "model.shared.weight"));
        }
        aliases
    }

    /// Untied, transformers 4.57.6 loads the stacks' embed_tokens from their own keys and
    /// re-initialises them when those are missing, yet its own save stores them only as
    /// `model.shared.weight` (so its untied saves do not load back). Storing them makes our saves
    /// load in transformers as they are.
    fn saved_aliases(&self) -> Vec<(&'static str, &'static str)> {
        if self.cfg.tie_word_embeddings {
            Vec::new()
        } else {
            vec![
                ("model.encoder.embed_tokens.weight", "model.shared.weight"),
                ("model.decoder.embed_tokens.weight", "model.shared.weight"),
            ]
        }
    }

    fn is_lookup_only(&self, name: &str) -> bool {
        name.starts_with("model.encoder.")
            || name == "model.decoder.embed_positions.weight"
            || (!self.cfg.tie_word_embeddings && name == "model.shared.weight")
    }
}

/// Bart's registry entry.
pub const ARCHITECTURE: Architecture = Architecture {
    model_type: "bart",
    name: "Bart",
    family: Family::Seq2Seq(build),
    // HF's default for Bart.
    default_attention: AttnImplementation::Sdpa,
    tiny_config,
};

fn build(vs: nn::Path, config: &Value, options: &BuildOptions) -> Result<Box<dyn Seq2SeqLm>> {
    let mut cfg = BartConfig::from_json(config)?;
    cfg.attn_implementation = options
        .attn_implementation
        .unwrap_or_else(|| ARCHITECTURE.default_attention_on(vs.device()));
    Ok(Box::new(BartForConditionalGeneration::new(vs, &cfg)?))
}

fn tiny_config() -> Value {
    serde_json::json!({
        "model_type": "bart", "architectures": ["BartForConditionalGeneration"], "vocab_size": 40, "d_model": 16,
        "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
        "encoder_ffn_dim": 24, "decoder_ffn_dim": 24, "max_position_embeddings": 32, "pad_token_id": 1,
        "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2, "is_encoder_decoder": true
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tch::nn::VarStore;

    fn tiny(extra: Value) -> BartConfig {
        let mut cfg = tiny_config();
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        let mut cfg = BartConfig::from_json(&cfg).unwrap();
        cfg.attn_implementation = AttnImplementation::Eager;
        cfg
    }

    fn random_model(cfg: &BartConfig) -> (VarStore, BartForConditionalGeneration) {
        let vs = VarStore::new(Device::Cpu);
        let model = BartForConditionalGeneration::new(vs.root(), cfg).unwrap();
        crate::test_util::randomize(&vs, 11, 0.3);
        (vs, model)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn config_defaults_match_hf() {
        let cfg = BartConfig::from_json(&json!({})).unwrap();
        assert_eq!(
            (cfg.vocab_size, cfg.max_position_embeddings, cfg.d_model),
            (50265, 1024, 1024)
        );
        assert_eq!(
            (cfg.encoder_layers, cfg.encoder_ffn_dim, cfg.encoder_attention_heads),
            (12, 4096, 16)
        );
        assert_eq!(
            (cfg.decoder_layers, cfg.decoder_ffn_dim, cfg.decoder_attention_heads),
            (12, 4096, 16)
        );
        assert_eq!(cfg.activation_function, "gelu");
        assert_eq!(
            (cfg.dropout, cfg.attention_dropout, cfg.activation_dropout),
            (0.1, 0.0, 0.0)
        );
        assert_eq!((cfg.encoder_layerdrop, cfg.decoder_layerdrop), (0.0, 0.0));
        assert!(!cfg.scale_embedding && cfg.tie_word_embeddings);
        assert_eq!(
            (cfg.pad_token_id, cfg.eos_token_id, cfg.decoder_start_token_id),
            (Some(1), Some(2), Some(2))
        );
        assert_eq!(cfg.embed_scale(), 1.0);
        let scaled = BartConfig::from_json(&json!({"scale_embedding": true, "d_model": 64})).unwrap();
        assert_eq!(scaled.embed_scale(), 8.0);
        // Keys BartConfig dropped long ago are ignored, as HF ignores them.
        assert!(BartConfig::from_json(&json!({"add_final_layer_norm": true, "normalize_before": true})).is_ok());
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let bad = |extra: Value| {
            let mut cfg = tiny_config();
            for (k, v) in extra.as_object().unwrap() {
                cfg[k] = v.clone();
            }
            match BartConfig::from_json(&cfg) {
                Err(Error::Config(msg)) => msg,
                other => panic!("{extra}: expected a config error, got {other:?}"),
            }
        };
        assert!(bad(json!({"encoder_attention_heads": 3})).contains("divisible"));
        assert!(bad(json!({"decoder_attention_heads": 5})).contains("decoder_attention_heads"));
        assert!(bad(json!({"d_model": 0})).contains("d_model"));
        assert!(bad(json!({"decoder_layers": -1})).contains("decoder_layers"));
        assert!(bad(json!({"activation_function": "nope"})).contains("nope"));
        assert!(bad(json!({"dropout": 1.5})).contains("dropout"));
        assert!(bad(json!({"decoder_layerdrop": -0.1})).contains("decoder_layerdrop"));
        assert!(bad(json!({"max_position_embeddings": i64::MAX})).contains("max_position_embeddings"));
        assert!(bad(json!({"d_model": null})).contains("Bart"));
        assert!(bad(json!({"encoder_ffn_dim": "wide"})).contains("Bart"));
        assert!(bad(json!({"scale_embedding": 1})).contains("Bart"));
    }

    #[test]
    fn parameter_names_follow_hf() {
        let vs = VarStore::new(Device::Cpu);
        let model = BartForConditionalGeneration::new(vs.root(), &tiny(json!({}))).unwrap();
        let names = vs.variables();
        for n in [
            "model.shared.weight",
            "model.encoder.embed_positions.weight",
            "model.encoder.layernorm_embedding.bias",
            "model.encoder.layers.1.self_attn.out_proj.bias",
            "model.encoder.layers.0.self_attn_layer_norm.weight",
            "model.encoder.layers.0.fc1.weight",
            "model.encoder.layers.0.final_layer_norm.bias",
            "model.decoder.embed_positions.weight",
            "model.decoder.layernorm_embedding.weight",
            "model.decoder.layers.1.encoder_attn.k_proj.bias",
            "model.decoder.layers.0.encoder_attn_layer_norm.weight",
            "model.decoder.layers.0.fc2.bias",
            "final_logits_bias",
        ] {
            assert!(names.contains_key(n), "{n}");
        }
        assert!(!names.contains_key("lm_head.weight"), "tied by default");
        assert_eq!(names["model.encoder.embed_positions.weight"].size(), vec![34, 16]);
        assert_eq!(names["final_logits_bias"].size(), vec![1, 40]);
        assert!(!names["final_logits_bias"].requires_grad(), "a buffer, not trained");
        assert_eq!(model.parameter_name("lm_head.weight"), None);
        assert_eq!(
            model.parameter_name("model.decoder.embed_tokens.weight").unwrap(),
            "model.shared.weight"
        );
        assert_eq!(
            parameter_name("encoder.layers.0.fc1.weight").unwrap(),
            "model.encoder.layers.0.fc1.weight"
        );
        assert_eq!(
            parameter_name("encoder.embed_tokens.weight").unwrap(),
            "model.shared.weight"
        );
        assert_eq!(parameter_name("model.encoder.version"), None);
        let vs = VarStore::new(Device::Cpu);
        let untied =
            BartForConditionalGeneration::new(vs.root(), &tiny(json!({"tie_word_embeddings": false}))).unwrap();
        assert!(vs.variables().contains_key("lm_head.weight"));
        assert_eq!(untied.parameter_name("lm_head.weight").unwrap(), "lm_head.weight");
        assert_eq!(Seq2SeqLm::tied_aliases(&untied).len(), 2);
    }

    #[test]
    fn incremental_decoding_equals_full_decoder_pass_for_each_layout() {
        for extra in [
            json!({}),
            json!({"scale_embedding": true, "tie_word_embeddings": false, "activation_function": "relu"}),
            json!({"decoder_layers": 3, "encoder_layers": 1, "decoder_attention_heads": 2}),
        ] {
            for implementation in [AttnImplementation::Eager, AttnImplementation::Sdpa] {
                let mut cfg = tiny(extra.clone());
                cfg.attn_implementation = implementation;
                let (_vs, model) = random_model(&cfg);
                let enc_ids = Tensor::from_slice2(&[[3i64, 4, 5, 6, 1], [7, 8, 9, 10, 11]]);
                let enc_mask = Tensor::from_slice2(&[[1i64, 1, 1, 1, 0], [1, 1, 1, 1, 1]]);
                let encoder = model.encode(&enc_ids, Some(&enc_mask), false).unwrap();
                let dec =
                    Tensor::from_slice2(&[[2i64, 5, 6, 7, 8, 9, 10, 11, 12, 13], [2, 0, 3, 4, 5, 6, 7, 8, 9, 10]]);
                // Right padding on the decoder side: the mask matters only after the padding.
                let dec_mask = Tensor::from_slice2(&[[1i64, 1, 1, 1, 1, 1, 1, 1, 0, 0], [1; 10]]);
                let full = model.decode(&dec, Some(&dec_mask), &encoder, None, false).unwrap();
                let mut cache = model
                    .decode(
                        &dec.narrow(1, 0, 3),
                        Some(&dec_mask.narrow(1, 0, 3)),
                        &encoder,
                        None,
                        false,
                    )
                    .unwrap()
                    .cache;
                for t in 3..10 {
                    let step = model
                        .decode(
                            &dec.narrow(1, t, 1),
                            Some(&dec_mask.narrow(1, 0, t + 1)),
                            &encoder,
                            Some(&cache),
                            false,
                        )
                        .unwrap();
                    let diff = max_diff(&step.logits.squeeze_dim(1), &full.logits.select(1, t));
                    assert!(diff < 1e-5, "{extra} {implementation:?}, step {t}: {diff}");
                    cache = step.cache;
                }
                assert_eq!(cache.seq_len(), 10);
                // Without a decoder mask, full and incremental passes agree too.
                let plain = model.decode(&dec, None, &encoder, None, false).unwrap();
                let first = model.decode(&dec.narrow(1, 0, 9), None, &encoder, None, false).unwrap();
                let last = model
                    .decode(&dec.narrow(1, 9, 1), None, &encoder, Some(&first.cache), false)
                    .unwrap();
                let diff = max_diff(&last.logits.squeeze_dim(1), &plain.logits.select(1, 9));
                assert!(diff < 1e-5, "{extra} {implementation:?}, unmasked: {diff}");
            }
        }
    }

    #[test]
    fn eager_and_fused_attention_agree() {
        let mut cfg = tiny(json!({}));
        let (vs, eager) = random_model(&cfg);
        cfg.attn_implementation = AttnImplementation::Sdpa;
        let fused_vs = VarStore::new(Device::Cpu);
        let fused = BartForConditionalGeneration::new(fused_vs.root(), &cfg).unwrap();
        tch::no_grad(|| {
            for (name, mut v) in fused_vs.variables() {
                v.copy_(&vs.variables()[&name]);
            }
        });
        let ids = Tensor::from_slice2(&[[3i64, 4, 5, 1], [7, 8, 9, 10]]);
        let mask = Tensor::from_slice2(&[[1i64, 1, 1, 0], [1, 1, 1, 1]]);
        let dec = Tensor::from_slice2(&[[2i64, 5, 6], [2, 7, 8]]);
        let a = eager.encode(&ids, Some(&mask), false).unwrap();
        let b = fused.encode(&ids, Some(&mask), false).unwrap();
        let la = eager.decode(&dec, None, &a, None, false).unwrap().logits;
        let lb = fused.decode(&dec, None, &b, None, false).unwrap().logits;
        assert!(max_diff(&la, &lb) < 1e-5);
    }

    #[test]
    fn encoder_padding_does_not_change_real_positions() {
        let (_vs, model) = random_model(&tiny(json!({})));
        let plain = model
            .encode(&Tensor::from_slice2(&[[3i64, 4, 5]]), None, false)
            .unwrap();
        let padded = model
            .encode(
                &Tensor::from_slice2(&[[3i64, 4, 5, 1, 1]]),
                Some(&Tensor::from_slice2(&[[1i64, 1, 1, 0, 0]])),
                false,
            )
            .unwrap();
        let diff = max_diff(&padded.last_hidden_state.narrow(1, 0, 3), &plain.last_hidden_state);
        assert!(diff < 1e-5, "{diff}");
        let dec = Tensor::from_slice2(&[[2i64, 6, 7]]);
        let a = model.decode(&dec, None, &plain, None, false).unwrap().logits;
        let b = model.decode(&dec, None, &padded, None, false).unwrap().logits;
        assert!(max_diff(&a, &b) < 1e-5);
        // The padded positions themselves are not ignored without the mask.
        let unmasked = model
            .encode(&Tensor::from_slice2(&[[3i64, 4, 5, 1, 1]]), None, false)
            .unwrap();
        let c = model.decode(&dec, None, &unmasked, None, false).unwrap().logits;
        assert!(max_diff(&a, &c) > 1e-4);
    }

    #[test]
    fn final_logits_bias_and_embedding_scale_enter_the_logits() {
        let (_vs, model) = random_model(&tiny(json!({})));
        let ids = Tensor::from_slice2(&[[3i64, 4, 5]]);
        let dec = Tensor::from_slice2(&[[2i64, 6]]);
        let encoder = model.encode(&ids, None, false).unwrap();
        let before = model.decode(&dec, None, &encoder, None, false).unwrap().logits;
        let bias = Tensor::arange(40, (Kind::Float, Device::Cpu)).view([1, 40]) * 0.5;
        let old = model.final_logits_bias.copy();
        tch::no_grad(|| model.final_logits_bias.shallow_clone().copy_(&bias));
        let after = model.decode(&dec, None, &encoder, None, false).unwrap().logits;
        let shift = (bias - old).expand([1, 2, 40], false);
        assert!(max_diff(&(after - before), &shift) < 1e-5);

        let (vs, plain) = random_model(&tiny(json!({})));
        let mut cfg = tiny(json!({"scale_embedding": true}));
        cfg.attn_implementation = AttnImplementation::Eager;
        let scaled_vs = VarStore::new(Device::Cpu);
        let scaled = BartForConditionalGeneration::new(scaled_vs.root(), &cfg).unwrap();
        tch::no_grad(|| {
            for (name, mut v) in scaled_vs.variables() {
                v.copy_(&vs.variables()[&name]);
            }
        });
        let a = plain.encode(&ids, None, false).unwrap().last_hidden_state;
        let b = scaled.encode(&ids, None, false).unwrap().last_hidden_state;
        assert!(max_diff(&a, &b) > 1e-3, "scale_embedding changes the encoder");
    }

    #[test]
    fn shift_right_follows_hf() {
        let (_vs, model) = random_model(&tiny(json!({})));
        let shifted = model.shift_right(&Tensor::from_slice2(&[[5i64, -100, 7, 8]])).unwrap();
        assert_eq!(Vec::<i64>::try_from(shifted.reshape([-1])).unwrap(), vec![2, 5, 1, 7]);
        let from_ids = Seq2SeqLm::decoder_inputs_from_input_ids(&model, &Tensor::from_slice2(&[[5i64, 6, 7]]))
            .unwrap()
            .unwrap();
        assert_eq!(Vec::<i64>::try_from(from_ids.reshape([-1])).unwrap(), vec![2, 5, 6]);
        let (_vs, no_start) = random_model(&tiny(json!({"decoder_start_token_id": null})));
        assert!(matches!(
            no_start.shift_right(&Tensor::from_slice2(&[[5i64]])),
            Err(Error::Config(_))
        ));
        let (_vs, no_pad) = random_model(&tiny(json!({"pad_token_id": null})));
        assert!(matches!(
            no_pad.shift_right(&Tensor::from_slice2(&[[5i64]])),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn positions_beyond_the_tables_and_mismatched_inputs_are_typed_errors() {
        let (_vs, model) = random_model(&tiny(json!({})));
        let long = Tensor::ones([1, 33], (Kind::Int64, Device::Cpu));
        assert!(matches!(model.encode(&long, None, false), Err(Error::InvalidInput(_))));
        let fits = Tensor::ones([1, 32], (Kind::Int64, Device::Cpu));
        let encoder = model.encode(&fits, None, false).unwrap();
        assert!(matches!(
            model.decode(&long, None, &encoder, None, false),
            Err(Error::InvalidInput(_))
        ));
        let cache = model
            .decode(&fits.narrow(1, 0, 31), None, &encoder, None, false)
            .unwrap()
            .cache;
        let two = Tensor::ones([1, 2], (Kind::Int64, Device::Cpu));
        assert!(matches!(
            model.decode(&two, None, &encoder, Some(&cache), false),
            Err(Error::InvalidInput(_))
        ));
        assert!(model
            .decode(&two.narrow(1, 0, 1), None, &encoder, Some(&cache), false)
            .is_ok());
        let batch2 = Tensor::ones([2, 1], (Kind::Int64, Device::Cpu));
        assert!(model.decode(&batch2, None, &encoder, None, false).is_err(), "batch");
        assert!(
            model
                .decode(&Tensor::from_slice2(&[[2i64, 40]]), None, &encoder, None, false)
                .is_err(),
            "id"
        );
        assert!(model
            .decode(&two, Some(&Tensor::from_slice2(&[[1i64]])), &encoder, None, false)
            .is_err());
    }

    #[test]
    fn dropout_and_layerdrop_act_only_in_train_mode() {
        let (_vs, model) = random_model(&tiny(json!({"encoder_layerdrop": 0.5, "decoder_layerdrop": 0.5})));
        let ids = Tensor::from_slice2(&[[3i64, 4, 5, 6]]);
        let dec = Tensor::from_slice2(&[[2i64, 7, 8]]);
        let run = |train: bool| {
            let encoder = model.encode(&ids, None, train).unwrap();
            model.decode(&dec, None, &encoder, None, train).unwrap()
        };
        let a = run(false);
        assert!(a.logits.equal(&run(false).logits));
        tch::manual_seed(3);
        let trained = run(true);
        assert!(!a.logits.equal(&trained.logits));
        assert_eq!(trained.cache.self_attention.layers.len(), 2, "one entry per layer");
        assert_eq!(trained.cache.cross_attention.layers.len(), 2);
    }

    #[test]
    fn half_precision_overflow_is_clamped_as_hf() {
        let x = Tensor::from_slice(&[1.0f32, f32::INFINITY, -3.0]).to_kind(Kind::Half);
        let clamped = Vec::<f32>::try_from(clamp_half_overflow(x).unwrap().to_kind(Kind::Float)).unwrap();
        // 65504 - 1000 rounded to f16 (spacing 32 there), as torch.clamp on a half tensor.
        assert_eq!((clamped[0], clamped[2]), (1.0, -3.0));
        assert!((clamped[1] - 64504.0).abs() <= 16.0, "{}", clamped[1]);
        let fine = Tensor::from_slice(&[1.0f32, 2.0]).to_kind(Kind::Half);
        assert!(clamp_half_overflow(fine.shallow_clone()).unwrap().equal(&fine));
    }
}

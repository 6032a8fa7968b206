//! Phi-3, as HF's `modeling_phi3.py`: Llama's decoder (RMS norms, grouped-query attention, a
//! gated MLP, no biases) with the query, key and value projections fused into one `qkv_proj` and
//! the MLP's gate and up projections into one `gate_up_proj` (HF's tensor names; split in the
//! forward as HF splits them: queries, keys, values in that order; gate, then up), rotary
//! positions on the first `int(head_dim * partial_rotary_factor)` dimensions of each head,
//! LongRoPE scaling (`rope_scaling.type` `longrope`, or its legacy names `su` and `yarn`), an
//! optional sliding window (Mistral's rule) and dropout on both residual branches
//! (`resid_pdrop`). `embd_pdrop` is read and checked but, as in transformers 4.57.6, applied
//! nowhere. Parameters are named like HF's state dict (`model.layers.0.self_attn.qkv_proj.weight`).
//!
//! LongRoPE picks its factors per pass, from the pass's largest position id (HF's
//! `longrope_frequency_update`), so a cache filled within `original_max_position_embeddings`
//! holds keys rotated with the short factors while later passes use the long ones. HF's
//! `Phi3ForCausalLM.prepare_inputs_for_generation` therefore drops the cache during `generate`
//! once it holds exactly `original_max_position_embeddings` positions and runs the whole sequence
//! again; [`CausalLm::recompute_cache_at`] tells our `generate` to do the same.
//!
//! HF's cache keeps only the last `sliding_window - 1` positions of each layer; ours keeps them
//! all and hides the older ones with the mask, which gives the same attention.

use crate::activation::Activation;
use crate::attention::{check_sliding_window, AttentionSpec, AttnImplementation, MaskSpec, ScoreOp, SoftmaxPrecision};
use crate::cache::{Cache, LayerCache};
use crate::inputs::{CausalInputs, CausalLimits};
use crate::layers::{embedding_padding_idx, merge_heads, split_heads, Linear, RmsNorm, RmsNormStyle};
use crate::registry::{Architecture, BuildOptions, CausalLm, EmbedTokensHead, Family};
use crate::rotary::{apply_partial_rotary, RopeScaling, RotaryConfig, RotaryEmbedding};
use serde::Deserialize;
use serde_json::Value;
use tch::{nn, Kind, Tensor};
use vh_core::error::{check_epsilons, check_positive, check_probabilities, parse_config};
use vh_core::tensor::{min_value, TrainDropout};
use vh_core::{Error, Result};

/// config.json of a `phi3` model, with `Phi3Config`'s defaults in transformers 4.57.
#[derive(Deserialize)]
struct Phi3Json {
    #[serde(default = "defaults::vocab_size")]
    vocab_size: i64,
    #[serde(default = "defaults::hidden_size")]
    hidden_size: i64,
    #[serde(default = "defaults::intermediate_size")]
    intermediate_size: i64,
    #[serde(default = "defaults::layers")]
    num_hidden_layers: i64,
    #[serde(default = "defaults::heads")]
    num_attention_heads: i64,
    /// Absent or null: as many as the query heads.
    #[serde(default)]
    num_key_value_heads: Option<i64>,
    /// Not in `Phi3Config`'s signature, but kept as an extra attribute that HF's attention reads
    /// (`getattr(config, "head_dim", hidden_size // num_attention_heads)`); null is refused
    /// before parsing (HF fails on it).
    #[serde(default)]
    head_dim: Option<i64>,
    #[serde(default)]
    resid_pdrop: f64,
    #[serde(default)]
    embd_pdrop: f64,
    #[serde(default)]
    attention_dropout: f64,
    #[serde(default = "defaults::silu")]
    hidden_act: String,
    #[serde(default = "defaults::max_position_embeddings")]
    max_position_embeddings: i64,
    /// 4096 when absent; null is accepted without rope scaling (nothing reads it then).
    #[serde(default = "defaults::original_max_position_embeddings")]
    original_max_position_embeddings: Option<i64>,
    #[serde(default = "defaults::rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default = "defaults::rope_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default = "defaults::partial_rotary_factor")]
    partial_rotary_factor: f64,
    /// 32000 when absent (outside a small vocabulary it marks no embedding row); null: none.
    #[serde(default = "defaults::pad_token_id")]
    pad_token_id: Option<i64>,
    /// Null (the default): full causal attention.
    #[serde(default)]
    sliding_window: Option<i64>,
    #[serde(default)]
    tie_word_embeddings: bool,
}

mod defaults {
    pub fn vocab_size() -> i64 {
        32064
    }
    pub fn hidden_size() -> i64 {
        3072
    }
    pub fn intermediate_size() -> i64 {
        8192
    }
    pub fn layers() -> i64 {
        32
    }
    pub fn heads() -> i64 {
        32
    }
    pub fn silu() -> String {
        "silu".to_string()
    }
    pub fn max_position_embeddings() -> i64 {
        4096
    }
    pub fn original_max_position_embeddings() -> Option<i64> {
        Some(4096)
    }
    pub fn rms_norm_eps() -> f64 {
        1e-5
    }
    pub fn rope_theta() -> f64 {
        10000.0
    }
    pub fn partial_rotary_factor() -> f64 {
        1.0
    }
    pub fn pad_token_id() -> Option<i64> {
        Some(32000)
    }
}

/// HF's `Phi3Config`: the fields that change the math, with HF's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Phi3Config {
    /// How attention is computed (not part of config.json; HF's default is sdpa).
    pub attn_implementation: AttnImplementation,
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Hidden size.
    pub hidden_size: i64,
    /// MLP inner width (`gate_up_proj` is twice as wide).
    pub intermediate_size: i64,
    /// Decoder layers.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: i64,
    /// Width of each head (`hidden_size // num_attention_heads` unless config.json sets it).
    pub head_dim: i64,
    /// The MLP activation's name.
    pub hidden_act: String,
    /// The extended context length (LongRoPE's scaling factor is this over the original).
    pub max_position_embeddings: i64,
    /// The pretraining context length, where LongRoPE switches to its long factors.
    pub original_max_position_embeddings: Option<i64>,
    /// RMS-norm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling: none or LongRoPE.
    pub rope_scaling: RopeScaling,
    /// The fraction of each head that rotates.
    pub partial_rotary_factor: f64,
    /// How many positions a query sees, itself included; `None` for full causal attention.
    pub sliding_window: Option<i64>,
    /// The LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Dropout on attention probabilities (train mode).
    pub attention_dropout: f64,
    /// Dropout on the attention and MLP outputs before each residual sum (train mode).
    pub resid_pdrop: f64,
    /// Embedding dropout as config.json names it; transformers 4.57.6 applies it nowhere.
    pub embd_pdrop: f64,
    /// The padding token, HF's `padding_idx` of `embed_tokens`: its row gets no gradient.
    pub pad_token_id: Option<i64>,
}

/// HF's rotary width rule: `int(head_dim * partial_rotary_factor)` (truncated, as Python's `int`).
fn rotary_dim_of(head_dim: i64, partial_rotary_factor: f64) -> i64 {
    (head_dim as f64 * partial_rotary_factor).trunc() as i64
}

/// `Phi3Config`'s `_rope_scaling_adjustment` and `_rope_scaling_validation`, then LongRoPE's
/// parameters. HF accepts a dictionary of exactly three entries, `type` (`longrope`, or the
/// legacy `su` and `yarn` it renames to `longrope`; the `rope_type` spelling other models accept
/// is refused here, as HF refuses it), `short_factor` and `long_factor`, each factor list as long
/// as half of `int(hidden_size // num_attention_heads * partial_rotary_factor)` (HF checks the
/// lengths against that width even when config.json sets another `head_dim`; the rotary
/// embedding then needs one factor per frequency of the real width, so both must agree).
fn phi3_rope_scaling(raw: &Phi3Json, rotary_dim: i64) -> Result<RopeScaling> {
    let Some(value) = raw.rope_scaling.as_ref().filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::Default);
    };
    if value.as_object().is_none_or(|m| m.len() != 3) {
        return Err(Error::Config(format!(
            "Phi3 rope_scaling must be a dictionary with three fields, `type`, `short_factor` and `long_factor`, \
             got {value}"
        )));
    }
    let kind = match value.get("type").and_then(Value::as_str) {
        Some("su" | "yarn") => Some("longrope"),
        other => other,
    };
    if kind != Some("longrope") {
        return Err(Error::Config(format!(
            "unsupported Phi3 rope_scaling type {} (supported: longrope, or its legacy names su and yarn)",
            value.get("type").map_or("(none)".to_string(), Value::to_string)
        )));
    }
    let config_rotary = rotary_dim_of(raw.hidden_size / raw.num_attention_heads, raw.partial_rotary_factor);
    for key in ["short_factor", "long_factor"] {
        let len = value.get(key).and_then(Value::as_array).map(Vec::len);
        match len {
            None => {
                return Err(Error::Config(format!(
                    "Phi3 rope_scaling `{key}` must be a list of numbers"
                )))
            }
            Some(len) if len as i64 != config_rotary / 2 => {
                return Err(Error::Config(format!(
                    "Phi3 rope_scaling `{key}` must have length {}, got {len}",
                    config_rotary / 2
                )))
            }
            Some(_) => {}
        }
    }
    RopeScaling::longrope(
        value,
        rotary_dim,
        raw.max_position_embeddings,
        raw.original_max_position_embeddings,
    )
}

impl Phi3Config {
    /// Parses a config.json value and checks it.
    pub fn from_json(config: &Value) -> Result<Self> {
        if config.get("head_dim").is_some_and(Value::is_null) {
            // HF's attention takes the attribute as it is (`getattr` with a default only for a
            // missing one) and fails on None.
            return Err(Error::Config(
                "Phi3 head_dim is null (transformers fails on it: leave it out for hidden_size // heads)".into(),
            ));
        }
        let raw: Phi3Json = parse_config(config, "Phi3")?;
        check_positive(&[
            ("hidden_size", raw.hidden_size),
            ("num_attention_heads", raw.num_attention_heads),
        ])?;
        if !(0.0..=1.0).contains(&raw.partial_rotary_factor) {
            return Err(Error::Config(format!(
                "partial_rotary_factor must be in [0, 1], got {}",
                raw.partial_rotary_factor
            )));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads);
        let rope_scaling = phi3_rope_scaling(&raw, rotary_dim_of(head_dim, raw.partial_rotary_factor))?;
        let cfg = Self {
            attn_implementation: AttnImplementation::default(),
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim,
            hidden_act: raw.hidden_act,
            max_position_embeddings: raw.max_position_embeddings,
            original_max_position_embeddings: raw.original_max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta,
            rope_scaling,
            partial_rotary_factor: raw.partial_rotary_factor,
            sliding_window: raw.sliding_window,
            tie_word_embeddings: raw.tie_word_embeddings,
            attention_dropout: raw.attention_dropout,
            resid_pdrop: raw.resid_pdrop,
            embd_pdrop: raw.embd_pdrop,
            pad_token_id: raw.pad_token_id,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// HF's `int(head_dim * partial_rotary_factor)`: the width the rotary frequencies are
    /// computed for.
    pub fn rotary_dim(&self) -> i64 {
        rotary_dim_of(self.head_dim, self.partial_rotary_factor)
    }

    /// Dimensions that actually rotate: one frequency per pair, so an odd rotary dim rotates one
    /// more (cos and sin are twice the number of frequencies wide, as HF's).
    pub fn rotary_width(&self) -> i64 {
        (self.rotary_dim().max(0) + 1) / 2 * 2
    }

    /// Checks sizes, heads, the rotary width, names, probabilities and the window.
    pub fn validate(&self) -> Result<()> {
        check_positive(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ])?;
        // The projections are heads * head_dim wide (qkv_proj adds two key/value blocks, the MLP
        // doubles its width): sizes from config.json may overflow that.
        let qkv = self
            .num_key_value_heads
            .checked_mul(2)
            .and_then(|kv| kv.checked_add(self.num_attention_heads))
            .and_then(|heads| heads.checked_mul(self.head_dim));
        if qkv.is_none() || self.intermediate_size.checked_mul(2).is_none() {
            return Err(Error::Config(format!(
                "the fused projections overflow ((num_attention_heads {} + 2 * num_key_value_heads {}) * head_dim {}, \
                 2 * intermediate_size {})",
                self.num_attention_heads, self.num_key_value_heads, self.head_dim, self.intermediate_size
            )));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(Error::Config(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if !(0.0..=1.0).contains(&self.partial_rotary_factor) {
            return Err(Error::Config(format!(
                "partial_rotary_factor must be in [0, 1], got {}",
                self.partial_rotary_factor
            )));
        }
        // HF rotates as many dimensions as cos/sin have: the rotary dim rounded up to even, which
        // must fit in the head (HF's broadcast fails otherwise).
        if self.rotary_width() > self.head_dim {
            return Err(Error::Config(format!(
                "partial_rotary_factor {} rotates {} dimensions, more than head_dim {}",
                self.partial_rotary_factor,
                self.rotary_width(),
                self.head_dim
            )));
        }
        check_sliding_window(self.sliding_window)?;
        check_epsilons(&[("rms_norm_eps", self.rms_norm_eps)])?;
        check_probabilities(&[
            ("attention_dropout", self.attention_dropout),
            ("resid_pdrop", self.resid_pdrop),
            ("embd_pdrop", self.embd_pdrop),
        ])?;
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return Err(Error::Config(format!(
                "rope_theta must be positive, got {}",
                self.rope_theta
            )));
        }
        if !matches!(self.rope_scaling, RopeScaling::Default | RopeScaling::LongRope { .. }) {
            return Err(Error::Config("Phi3 supports no rope scaling or longrope only".into()));
        }
        self.activation()?;
        Ok(())
    }

    /// The MLP activation.
    pub fn activation(&self) -> Result<Activation> {
        self.hidden_act.parse()
    }
}

/// Grouped-query self-attention with one fused `qkv_proj`, partial rotary positions and no
/// biases.
#[derive(Debug)]
struct Attention {
    qkv_proj: Linear,
    o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    dropout: f64,
    implementation: AttnImplementation,
}

impl Attention {
    fn new(vs: nn::Path, cfg: &Phi3Config) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            qkv_proj: Linear::new(vs.sub("qkv_proj"), h, (heads + 2 * kv_heads) * d, false)?,
            o_proj: Linear::new(vs.sub("o_proj"), heads * d, h, false)?,
            heads,
            kv_heads,
            head_dim: d,
            dropout: cfg.attention_dropout,
            implementation: cfg.attn_implementation,
        })
    }

    /// HF's eager order (`q @ k^T * head_dim^-0.5`, the mask added, softmax in f32), or the
    /// fused kernel with the same scale.
    fn spec(&self, kind: Kind) -> AttentionSpec {
        AttentionSpec {
            implementation: self.implementation,
            score_ops: vec![ScoreOp::Mul((self.head_dim as f64).powf(-0.5))],
            softmax: SoftmaxPrecision::F32,
            dropout: self.dropout,
            future: min_value(kind),
            causal: true,
        }
    }

    /// Attends from `x` [B, T, hidden] over cached and new positions with `bias` (the window and
    /// padding; `None`: the causal rule alone); `cos`/`sin` [B, 1, T, rotary width] rotate the
    /// first dimensions of each query and key head. Returns the output and the grown cache.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: Option<&Tensor>,
        past: Option<&LayerCache>,
        train: bool,
    ) -> Result<(Tensor, LayerCache)> {
        let d = self.head_dim;
        let qkv = self.qkv_proj.forward(x)?;
        // HF's slices of the fused output: the query heads, then the key heads, then the values.
        let (q_width, kv_width) = (self.heads * d, self.kv_heads * d);
        let q = split_heads(&qkv.f_narrow(-1, 0, q_width)?, self.heads, d)?;
        let k = split_heads(&qkv.f_narrow(-1, q_width, kv_width)?, self.kv_heads, d)?;
        let v = split_heads(&qkv.f_narrow(-1, q_width + kv_width, kv_width)?, self.kv_heads, d)?;
        let q = apply_partial_rotary(&q, cos, sin)?;
        let k = apply_partial_rotary(&k, cos, sin)?;
        let cache = match past {
            Some(past) => past.append(&k, &v)?,
            None => LayerCache::new(k, v),
        };
        let attended = self
            .spec(q.kind())
            .attend(&q, &cache.keys, &cache.values, bias, train)?;
        Ok((self.o_proj.forward(&merge_heads(&attended)?)?, cache))
    }
}

/// HF's `Phi3MLP`: one fused `gate_up_proj` whose output is split in half (gate first), then
/// `down_proj(up * act(gate))`.
#[derive(Debug)]
struct Mlp {
    gate_up_proj: Linear,
    down_proj: Linear,
    intermediate: i64,
    act: Activation,
}

impl Mlp {
    fn new(vs: nn::Path, cfg: &Phi3Config) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_up_proj: Linear::new(vs.sub("gate_up_proj"), h, 2 * i, false)?,
            down_proj: Linear::new(vs.sub("down_proj"), i, h, false)?,
            intermediate: i,
            act: cfg.activation()?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let up_states = self.gate_up_proj.forward(x)?;
        let gate = up_states.f_narrow(-1, 0, self.intermediate)?;
        let up = up_states.f_narrow(-1, self.intermediate, self.intermediate)?;
        self.down_proj.forward(&up.f_mul(&self.act.forward(&gate)?)?)
    }
}

/// One decoder layer: pre-norm attention and MLP, each output dropped out (train mode) before its
/// residual sum.
#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    resid_pdrop: f64,
}

impl DecoderLayer {
    fn new(vs: nn::Path, cfg: &Phi3Config) -> Result<Self> {
        let norm = |name: &str| RmsNorm::new(vs.sub(name), cfg.hidden_size, cfg.rms_norm_eps, RmsNormStyle::Llama);
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::new(vs.sub("self_attn"), cfg)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: Mlp::new(vs.sub("mlp"), cfg)?,
            resid_pdrop: cfg.resid_pdrop,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: Option<&Tensor>,
        past: Option<&LayerCache>,
        train: bool,
    ) -> Result<(Tensor, LayerCache)> {
        let (attn, cache) = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, cos, sin, bias, past, train)?;
        let h = x.f_add(&attn.train_dropout(self.resid_pdrop, train)?)?;
        let mlp = self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?;
        let out = h.f_add(&mlp.train_dropout(self.resid_pdrop, train)?)?;
        Ok((out, cache))
    }
}

/// HF's `Phi3ForCausalLM`.
#[derive(Debug)]
pub struct Phi3ForCausalLM {
    /// `model.embed_tokens.weight` [vocab, hidden].
    pub embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `lm_head.weight`; the embedding matrix when tied; `None` when built without an LM head.
    pub lm_head: Option<Tensor>,
    rotary: RotaryEmbedding,
    cfg: Phi3Config,
}

impl Phi3ForCausalLM {
    /// Creates `model.*` and, unless tied, `lm_head.weight` under `vs`.
    pub fn new(vs: nn::Path, cfg: &Phi3Config) -> Result<Self> {
        Self::with_head(vs, cfg, true)
    }

    /// [`Phi3ForCausalLM::new`], with or without the LM head (`model.*` alone, for a backbone
    /// under another head).
    pub fn with_head(vs: nn::Path, cfg: &Phi3Config, lm_head: bool) -> Result<Self> {
        cfg.validate()?;
        let model = vs.sub("model");
        let embed_tokens = vh_core::param::var(
            &model.sub("embed_tokens"),
            "weight",
            &[cfg.vocab_size, cfg.hidden_size],
            nn::Init::Const(0.0),
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(model.sub("layers").sub(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(
            model.sub("norm"),
            cfg.hidden_size,
            cfg.rms_norm_eps,
            RmsNormStyle::Llama,
        )?;
        let lm_head = match (lm_head, cfg.tie_word_embeddings) {
            (false, _) => None,
            (true, true) => Some(embed_tokens.shallow_clone()),
            (true, false) => Some(vh_core::param::var(
                &vs.sub("lm_head"),
                "weight",
                &[cfg.vocab_size, cfg.hidden_size],
                nn::Init::Const(0.0),
            )?),
        };
        let rotary = RotaryEmbedding::new(
            &RotaryConfig {
                head_dim: cfg.rotary_dim(),
                rope_theta: cfg.rope_theta,
                rope_scaling: cfg.rope_scaling.clone(),
                max_position_embeddings: cfg.max_position_embeddings,
            },
            vs.device(),
        )?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary,
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Phi3Config {
        &self.cfg
    }

    /// What the inputs of a pass are checked against.
    pub fn limits(&self) -> CausalLimits {
        CausalLimits {
            vocab_size: self.cfg.vocab_size,
            num_layers: self.layers.len(),
            max_positions: None,
        }
    }

    /// Its LM-head checkpoint facts (shared by the Llama family).
    fn head_facts(&self) -> EmbedTokensHead {
        EmbedTokensHead {
            tied: self.cfg.tie_word_embeddings,
            has_head: self.lm_head.is_some(),
        }
    }
}

impl CausalLm for Phi3ForCausalLM {
    fn model_type(&self) -> &'static str {
        ARCHITECTURE.model_type
    }

    fn vocab_size(&self) -> i64 {
        self.cfg.vocab_size
    }

    fn hidden_size(&self) -> i64 {
        self.cfg.hidden_size
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn max_positions(&self) -> Option<i64> {
        // Rotary positions have no hard limit (HF enforces none).
        None
    }

    fn forward_hidden(&self, inputs: &CausalInputs<'_>, train: bool) -> Result<(Tensor, Cache)> {
        let device = self.embed_tokens.device();
        let kind = self.embed_tokens.kind();
        // LongRoPE's factors follow this pass's largest position id, as HF's per-forward update.
        let (cos, sin) = self.rotary.cos_sin(&inputs.position_ids, inputs.max_position, kind)?;
        let (cos, sin) = (cos.f_unsqueeze(1)?, sin.f_unsqueeze(1)?);
        // HF's eager mask, one for every layer: the dtype's minimum on future keys, keys the
        // window left behind and padding; built whenever it hides more than the causal rule.
        let bias = MaskSpec {
            key_mask: inputs.key_mask.as_ref(),
            batch: inputs.batch,
            new_len: inputs.new_len,
            past_len: inputs.past_len,
            future: min_value(kind),
            sliding_window: self.cfg.sliding_window,
        }
        .bias_beyond_causal(kind, device)?;

        // No embedding dropout: `Phi3Model` in transformers 4.57.6 has none, `embd_pdrop` or not.
        let padding_idx = embedding_padding_idx(self.cfg.pad_token_id, self.cfg.vocab_size);
        let mut h = Tensor::f_embedding(&self.embed_tokens, &inputs.input_ids, padding_idx, false, false)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let past = inputs.past.map(|p| &p.layers[i]);
            let (out, cache) = layer.forward(&h, &cos, &sin, bias.as_ref(), past, train)?;
            h = out;
            layers.push(cache);
        }
        Ok((self.norm.forward(&h)?, Cache { layers }))
    }

    fn lm_head(&self) -> Option<&Tensor> {
        self.lm_head.as_ref()
    }

    fn parameter_name(&self, key: &str) -> Option<String> {
        self.head_facts().parameter_name(key)
    }

    fn tied_aliases(&self) -> Vec<(&'static str, &'static str)> {
        self.head_facts().tied_aliases()
    }

    fn is_lookup_only(&self, name: &str) -> bool {
        self.head_facts().is_lookup_only(name)
    }

    fn recompute_cache_at(&self) -> Option<i64> {
        // HF's condition is `config.rope_scaling` (always LongRoPE for Phi3) and a cache holding
        // `original_max_position_embeddings` positions when the next token arrives.
        match self.cfg.rope_scaling {
            RopeScaling::LongRope {
                original_max_position_embeddings,
                ..
            } => Some(original_max_position_embeddings),
            _ => None,
        }
    }
}

/// Phi3's registry entry.
pub const ARCHITECTURE: Architecture = Architecture {
    model_type: "phi3",
    name: "Phi-3",
    family: Family::Causal(build),
    // As for Llama and Mistral: the fused kernel, with grouped key/value heads, is the faster on
    // CPU.
    default_attention: AttnImplementation::Sdpa,
    tiny_config,
};

fn build(vs: nn::Path, config: &Value, options: &BuildOptions) -> Result<Box<dyn CausalLm>> {
    let mut cfg = Phi3Config::from_json(config)?;
    cfg.attn_implementation = options
        .attn_implementation
        .unwrap_or_else(|| ARCHITECTURE.default_attention_on(vs.device()));
    Ok(Box::new(Phi3ForCausalLM::with_head(
        vs,
        &cfg,
        !options.without_lm_head,
    )?))
}

/// Half of each 8-wide head rotates; LongRoPE with a pretraining length of 4, so a 5-token test
/// row already runs on the long factors.
fn tiny_config() -> Value {
    serde_json::json!({
        "model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "vocab_size": 50, "hidden_size": 32,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "original_max_position_embeddings": 4, "partial_rotary_factor": 0.5,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 5.0]},
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inputs::prepare_causal;
    use crate::mistral::{MistralConfig, MistralForCausalLM};
    use crate::registry::CausalLmOutput;
    use serde_json::json;
    use tch::nn::VarStore;
    use tch::Device;

    fn config_json(extra: Value) -> Value {
        let mut cfg = tiny_config();
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        cfg
    }

    fn config(extra: Value) -> Result<Phi3Config> {
        Phi3Config::from_json(&config_json(extra))
    }

    fn random_model(cfg: &Phi3Config) -> (VarStore, Phi3ForCausalLM) {
        let vs = VarStore::new(Device::Cpu);
        let model = Phi3ForCausalLM::new(vs.root(), cfg).unwrap();
        crate::test_util::randomize(&vs, 7, 0.3);
        (vs, model)
    }

    fn run(
        model: &Phi3ForCausalLM,
        ids: &Tensor,
        mask: Option<&Tensor>,
        positions: Option<&Tensor>,
        past: Option<&Cache>,
    ) -> CausalLmOutput {
        let inputs = prepare_causal(ids, mask, positions, past, model.limits(), Device::Cpu).unwrap();
        CausalLm::forward(model, &inputs, false, 0).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    fn longrope(short: &[f64], long: &[f64]) -> Value {
        json!({"type": "longrope", "short_factor": short, "long_factor": long})
    }

    #[test]
    fn config_defaults_follow_hf() {
        let cfg = Phi3Config::from_json(&json!({"model_type": "phi3"})).unwrap();
        assert_eq!(
            (
                cfg.vocab_size,
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_hidden_layers,
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim,
            ),
            (32064, 3072, 8192, 32, 32, 32, 96)
        );
        assert_eq!(
            (
                cfg.max_position_embeddings,
                cfg.original_max_position_embeddings,
                cfg.pad_token_id,
                cfg.sliding_window,
                cfg.tie_word_embeddings,
            ),
            (4096, Some(4096), Some(32000), None, false)
        );
        assert_eq!(
            (
                cfg.rms_norm_eps,
                cfg.rope_theta,
                cfg.partial_rotary_factor,
                cfg.resid_pdrop,
                cfg.embd_pdrop,
                cfg.attention_dropout
            ),
            (1e-5, 10000.0, 1.0, 0.0, 0.0, 0.0)
        );
        assert_eq!(cfg.rope_scaling, RopeScaling::Default);
        assert_eq!(cfg.hidden_act, "silu");
        // Null key/value heads: as many as the query heads; an explicit head_dim wins.
        assert_eq!(
            config(json!({"num_key_value_heads": null}))
                .unwrap()
                .num_key_value_heads,
            4
        );
        assert_eq!(
            config(json!({"head_dim": 12, "rope_scaling": null})).unwrap().head_dim,
            12
        );
        // Without rope scaling a null original length is never read.
        assert!(config(json!({"rope_scaling": null, "original_max_position_embeddings": null})).is_ok());
        // hidden_size not a multiple of the heads: HF floors the head width and runs.
        let floored = config(json!({"hidden_size": 30, "rope_scaling": null})).unwrap();
        assert_eq!((floored.head_dim, floored.rotary_dim()), (7, 3));
    }

    #[test]
    fn longrope_parameters_follow_hf() {
        // The tiny config: factor 64 / 4 = 16, attention factor sqrt(1 + ln 16 / ln 4) = sqrt(3).
        let cfg = config(json!({})).unwrap();
        let RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            attention_factor,
        } = &cfg.rope_scaling
        else {
            panic!("not longrope: {:?}", cfg.rope_scaling);
        };
        assert_eq!(
            (short_factor.as_slice(), long_factor.as_slice()),
            (&[1.0, 1.5][..], &[2.0, 5.0][..])
        );
        assert_eq!(*original_max_position_embeddings, 4);
        assert_eq!(*attention_factor, (1.0 + 16f64.ln() / 4f64.ln()).sqrt());
        // A factor of at most 1 (max <= original) leaves cos and sin unscaled.
        let unscaled = config(json!({"max_position_embeddings": 4})).unwrap();
        assert!(
            matches!(unscaled.rope_scaling, RopeScaling::LongRope { attention_factor, .. } if attention_factor == 1.0)
        );
        // The legacy names `su` and `yarn` are LongRoPE (Phi3Config renames them).
        for legacy in ["su", "yarn"] {
            let renamed = config(json!({"rope_scaling": {"type": legacy, "short_factor": [1.0, 1.5],
                                                          "long_factor": [2.0, 5.0]}}))
            .unwrap();
            assert_eq!(renamed.rope_scaling, cfg.rope_scaling, "{legacy}");
        }
        // Full rotary on 8-wide heads: four factors each.
        assert!(config(json!({"partial_rotary_factor": 1.0, "rope_scaling": longrope(&[1.0; 4], &[2.0; 4])})).is_ok());
        // An odd rotary dim (int(8 * 0.375) = 3) rotates 4 dimensions without scaling, as HF.
        let odd = config(json!({"partial_rotary_factor": 0.375, "rope_scaling": null})).unwrap();
        assert_eq!((odd.rotary_dim(), odd.rotary_width()), (3, 4));
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let bad = |extra: Value, what: &str| {
            let err = config(extra).expect_err(what);
            assert!(matches!(err, Error::Config(_)), "{what}: {err}");
        };
        bad(json!({"num_key_value_heads": 3}), "heads not a multiple of kv heads");
        bad(json!({"num_attention_heads": 0}), "no heads");
        bad(json!({"num_key_value_heads": 0}), "no kv heads");
        bad(json!({"hidden_size": -32}), "negative width");
        bad(json!({"head_dim": 0, "rope_scaling": null}), "zero head_dim");
        bad(json!({"head_dim": null}), "null head_dim");
        bad(json!({"vocab_size": null}), "null vocabulary");
        bad(json!({"hidden_size": "32"}), "width of the wrong type");
        bad(json!({"intermediate_size": i64::MAX}), "overflowing MLP");
        bad(
            json!({"num_attention_heads": 1, "hidden_size": i64::MAX, "rope_scaling": null}),
            "overflowing qkv",
        );
        bad(json!({"partial_rotary_factor": 1.5}), "partial rotary above 1");
        bad(
            json!({"partial_rotary_factor": -0.5, "rope_scaling": null}),
            "negative partial rotary",
        );
        bad(
            json!({"hidden_size": 28, "partial_rotary_factor": 1.0, "rope_scaling": null}),
            "odd head, full rotary",
        );
        bad(json!({"sliding_window": 0}), "zero window");
        bad(json!({"rms_norm_eps": -1.0}), "negative epsilon");
        bad(json!({"resid_pdrop": 1.5}), "residual dropout above 1");
        bad(json!({"embd_pdrop": -0.1}), "negative embedding dropout");
        bad(json!({"attention_dropout": 2.0}), "attention dropout above 1");
        bad(json!({"hidden_act": "nope"}), "unknown activation");
        bad(json!({"rope_theta": 0.0}), "zero theta");
        // rope_scaling: HF's three fields exactly, type longrope (or su / yarn).
        bad(json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}}), "dynamic");
        bad(
            json!({"rope_scaling": {"type": "linear", "short_factor": [1.0, 1.0], "long_factor": [1.0, 1.0]}}),
            "unknown rope type",
        );
        bad(
            json!({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 5.0]}}),
            "rope_type spelling (HF reads `type`)",
        );
        bad(
            json!({"rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 5.0],
                                    "factor": 2.0}}),
            "a fourth field",
        );
        bad(
            json!({"rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.5]}}),
            "missing long_factor",
        );
        bad(
            json!({"rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.5], "factor": [2.0, 5.0]}}),
            "missing long_factor, three fields",
        );
        bad(
            json!({"rope_scaling": longrope(&[1.0], &[2.0, 5.0])}),
            "short factors too few",
        );
        bad(
            json!({"rope_scaling": longrope(&[1.0, 1.5], &[2.0, 5.0, 1.0])}),
            "long factors too many",
        );
        bad(
            json!({"rope_scaling": {"type": "longrope", "short_factor": [1.0, "x"], "long_factor": [2.0, 5.0]}}),
            "text",
        );
        bad(
            json!({"rope_scaling": longrope(&[1.0, 0.0], &[2.0, 5.0])}),
            "a zero factor",
        );
        bad(json!({"rope_scaling": "longrope"}), "not a dictionary");
        bad(
            json!({"original_max_position_embeddings": null}),
            "longrope without an original length",
        );
        bad(
            json!({"original_max_position_embeddings": 0}),
            "longrope with an original length of 0",
        );
        bad(
            json!({"original_max_position_embeddings": 1}),
            "ln(1) = 0 in the attention factor",
        );
        // HF checks the factor count against hidden_size // heads, the rotary embedding against
        // the real head_dim: an explicit head_dim of 12 rotates 6 with 3 frequencies.
        bad(json!({"head_dim": 12}), "factors for hidden // heads, not head_dim");
    }

    #[test]
    fn fused_projections_split_as_separate_ones() {
        // Phi3 without LongRoPE, full rotary and no window is Mistral (no window) with q/k/v and
        // gate/up fused: the same weights, split in HF's order, give the same outputs (up to the
        // order a wider matmul accumulates in); split in another order, they do not.
        let phi3 = config(json!({"rope_scaling": null, "partial_rotary_factor": 1.0})).unwrap();
        let (vs, model) = random_model(&phi3);
        let ids = Tensor::from_slice2(&[[0i64, 0, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12, 14]]);
        let mask = Tensor::from_slice2(&[[0i64, 0, 1, 1, 1, 1, 1], [1; 7]]);
        let ours = run(&model, &ids, Some(&mask), None, None);
        let weights = vs.variables();
        let mistral_with = |swap_gate_up: bool| {
            let cfg = MistralConfig::from_json(&json!({
                "vocab_size": 50, "hidden_size": 32, "intermediate_size": 24, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "sliding_window": null,
                "pad_token_id": 0
            }))
            .unwrap();
            let mistral_vs = VarStore::new(Device::Cpu);
            let mistral = MistralForCausalLM::new(mistral_vs.root(), &cfg).unwrap();
            let (gate, up) = if swap_gate_up { (24, 0) } else { (0, 24) };
            // Mistral's parameter -> (Phi3's fused parameter, first row, rows): queries, keys and
            // values in that order in qkv_proj (4 heads and 2 + 2 key/value heads of 8), the gate
            // then the up projection in gate_up_proj (24 rows each).
            let split = |name: &str| -> Option<(String, i64, i64)> {
                [
                    ("q_proj", "qkv_proj", 0, 32),
                    ("k_proj", "qkv_proj", 32, 16),
                    ("v_proj", "qkv_proj", 48, 16),
                    ("gate_proj", "gate_up_proj", gate, 24),
                    ("up_proj", "gate_up_proj", up, 24),
                ]
                .iter()
                .find(|(part, ..)| name.contains(&format!(".{part}.")))
                .map(|(part, fused, start, len)| (name.replace(part, fused), *start, *len))
            };
            tch::no_grad(|| {
                for (name, mut var) in mistral_vs.variables() {
                    let value = match split(&name) {
                        Some((fused, start, len)) => weights[&fused].narrow(0, start, len),
                        None => weights[&name].shallow_clone(),
                    };
                    var.copy_(&value);
                }
            });
            let inputs = prepare_causal(&ids, Some(&mask), None, None, mistral.limits(), Device::Cpu).unwrap();
            CausalLm::forward(&mistral, &inputs, false, 0).unwrap()
        };
        let same = mistral_with(false);
        assert!(max_diff(&ours.logits, &same.logits) < 1e-5);
        assert!(max_diff(&ours.last_hidden_state, &same.last_hidden_state) < 1e-5);
        assert!(max_diff(&ours.logits, &mistral_with(true).logits) > 1e-3);
    }

    #[test]
    fn longrope_switches_factors_per_pass_and_incremental_decoding_matches_within_a_regime() {
        let ids = Tensor::from_slice2(&[
            [0i64, 0, 5, 7, 9, 11, 3, 8, 13, 4],
            [2, 4, 6, 8, 10, 12, 14, 16, 18, 20],
        ]);
        let mask = Tensor::from_slice2(&[[0i64, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1; 10]]);
        for (original, window) in [(2, None), (16, None), (6, None), (2, Some(3))] {
            for implementation in [AttnImplementation::Eager, AttnImplementation::Sdpa] {
                let mut cfg =
                    config(json!({"original_max_position_embeddings": original, "sliding_window": window})).unwrap();
                cfg.attn_implementation = implementation;
                let (_vs, model) = random_model(&cfg);
                let full = run(&model, &ids, Some(&mask), None, None);
                let prompt = 4;
                let mut past = run(
                    &model,
                    &ids.narrow(1, 0, prompt),
                    Some(&mask.narrow(1, 0, prompt)),
                    None,
                    None,
                )
                .cache;
                let mut worst: f64 = 0.0;
                for t in prompt..10 {
                    let step = run(
                        &model,
                        &ids.narrow(1, t, 1),
                        Some(&mask.narrow(1, 0, t + 1)),
                        None,
                        Some(&past),
                    );
                    worst = worst.max(max_diff(&step.logits.squeeze_dim(1), &full.logits.select(1, t)));
                    past = step.cache;
                }
                let label = format!("original {original}, window {window:?}, {implementation:?}");
                if original == 6 {
                    // The prompt and the first steps ran on the short factors, the full pass (10
                    // positions > 6) on the long ones: HF's own cache differs from its full pass here.
                    assert!(worst > 1e-3, "{label}: the switch changes nothing ({worst})");
                } else {
                    assert!(worst < 1e-5, "{label}: {worst}");
                }
            }
        }
        let (_vs, model) = random_model(&config(json!({"original_max_position_embeddings": 2})).unwrap());
        assert_eq!(model.recompute_cache_at(), Some(2));
        let plain = config(json!({"rope_scaling": null})).unwrap();
        assert_eq!(random_model(&plain).1.recompute_cache_at(), None);
    }

    #[test]
    fn partial_rotary_leaves_the_other_dimensions_unrotated() {
        // With no rotary dimensions at all, positions do not matter: moving them changes nothing.
        let none = config(json!({"partial_rotary_factor": 0.0, "rope_scaling": null})).unwrap();
        let (_vs, model) = random_model(&none);
        let ids = Tensor::from_slice2(&[[3i64, 5, 7, 9]]);
        // Rotary attention depends on distances between positions, so these are spread out.
        let shifted = Tensor::from_slice2(&[[0i64, 3, 7, 12]]);
        let a = run(&model, &ids, None, None, None);
        let b = run(&model, &ids, None, Some(&shifted), None);
        assert!(max_diff(&a.logits, &b.logits) < 1e-6);
        // Half the head rotating: positions matter.
        let half = config(json!({"rope_scaling": null})).unwrap();
        let (_vs2, model) = random_model(&half);
        let a = run(&model, &ids, None, None, None);
        let b = run(&model, &ids, None, Some(&shifted), None);
        assert!(max_diff(&a.logits, &b.logits) > 1e-3);
    }

    #[test]
    fn bf16_runs_close_to_f32() {
        let cfg = config(json!({"sliding_window": 3})).unwrap();
        let (mut vs, model) = random_model(&cfg);
        let ids = Tensor::from_slice2(&[[0i64, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12]]);
        let mask = Tensor::from_slice2(&[[0i64, 1, 1, 1, 1, 1], [1; 6]]);
        let f32_logits = run(&model, &ids, Some(&mask), None, None).logits;
        vs.bfloat16();
        let out = run(&model, &ids, Some(&mask), None, None);
        assert_eq!(out.logits.kind(), Kind::BFloat16);
        let logits = out.logits.to_kind(Kind::Float);
        assert!(logits.isfinite().all().int64_value(&[]) != 0);
        let scale = f32_logits.abs().max().double_value(&[]);
        let err = max_diff(&logits, &f32_logits);
        assert!(err < 0.05 * scale.max(1.0), "bf16 vs f32: {err} (logits up to {scale})");
    }

    #[test]
    fn tied_and_untied_heads_follow_the_config() {
        let tied = config(json!({"tie_word_embeddings": true})).unwrap();
        let (vs, model) = random_model(&tied);
        assert!(!vs.variables().contains_key("lm_head.weight"));
        assert_eq!(
            model.tied_aliases(),
            vec![("lm_head.weight", "model.embed_tokens.weight")]
        );
        assert_eq!(model.parameter_name("lm_head.weight"), None);
        let (vs, model) = random_model(&config(json!({})).unwrap());
        assert!(vs.variables().contains_key("lm_head.weight"));
        assert!(vs.variables().contains_key("model.layers.1.self_attn.qkv_proj.weight"));
        assert!(vs.variables().contains_key("model.layers.1.mlp.gate_up_proj.weight"));
        assert_eq!(
            vs.variables()["model.layers.0.self_attn.qkv_proj.weight"].size(),
            vec![64, 32]
        );
        assert_eq!(
            vs.variables()["model.layers.0.mlp.gate_up_proj.weight"].size(),
            vec![48, 32]
        );
        assert!(model.tied_aliases().is_empty());
        assert!(model.is_lookup_only("model.embed_tokens.weight"));
    }
}

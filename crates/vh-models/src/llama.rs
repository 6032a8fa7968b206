//! The Llama family (Llama, SmolLM2, Qwen2), as HF's `modeling_llama.py` / `modeling_qwen2.py`:
//! RMS norms, rotary positions (with linear, dynamic-NTK and llama3 scaling), grouped-query
//! attention and a gated SiLU MLP, parameters named like HF's state dict
//! (`model.layers.0.self_attn.q_proj.weight`, ...).

use crate::activation::Activation;
use crate::attention::{AttentionSpec, AttnImplementation, ScoreOp, SoftmaxPrecision};
use crate::cache::{Cache, LayerCache};
use crate::inputs::{prepare_causal, CausalInputs, CausalLimits};
use crate::layers::{merge_heads, split_heads, GatedMlp, Linear, RmsNorm, RmsNormStyle};
use crate::registry::{Architecture, BuildOptions, CausalLm, CausalLmOutput, Family};
use crate::rotary::{apply_rotary, check_rotary_heads, RopeScaling, RotaryConfig, RotaryEmbedding};
use serde::Deserialize;
use serde_json::Value;
use tch::{nn, Kind, Tensor};
use vh_core::error::{check_epsilons, check_positive, check_probabilities, parse_config};
use vh_core::tensor::min_value;
use vh_core::{Error, Result};

/// Which member of the family a config describes: same layers, different defaults and biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlamaFlavour {
    /// `LlamaForCausalLM` (Llama 2/3, SmolLM2, ...).
    Llama,
    /// `Qwen2ForCausalLM` (Qwen2, Qwen2.5): q/k/v biases always, no o or MLP bias.
    Qwen2,
}

impl LlamaFlavour {
    /// config.json's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }
}

fn default_silu() -> String {
    "silu".to_string()
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10000.0
}

/// config.json of a `llama` model, with `LlamaConfig`'s defaults in transformers 4.57.
#[derive(Deserialize)]
struct LlamaJson {
    #[serde(default = "llama_defaults::vocab_size")]
    vocab_size: i64,
    #[serde(default = "llama_defaults::hidden_size")]
    hidden_size: i64,
    #[serde(default = "llama_defaults::intermediate_size")]
    intermediate_size: i64,
    #[serde(default = "llama_defaults::layers")]
    num_hidden_layers: i64,
    #[serde(default = "llama_defaults::heads")]
    num_attention_heads: i64,
    /// `None` means as many as the query heads.
    #[serde(default)]
    num_key_value_heads: Option<i64>,
    /// `None` means hidden_size / num_attention_heads.
    #[serde(default)]
    head_dim: Option<i64>,
    #[serde(default = "default_silu")]
    hidden_act: String,
    #[serde(default = "llama_defaults::max_position_embeddings")]
    max_position_embeddings: i64,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_dropout: f64,
    #[serde(default)]
    pad_token_id: Option<i64>,
}

mod llama_defaults {
    pub fn vocab_size() -> i64 {
        32000
    }
    pub fn hidden_size() -> i64 {
        4096
    }
    pub fn intermediate_size() -> i64 {
        11008
    }
    pub fn layers() -> i64 {
        32
    }
    pub fn heads() -> i64 {
        32
    }
    pub fn max_position_embeddings() -> i64 {
        2048
    }
}

/// config.json of a `qwen2` model, with `Qwen2Config`'s defaults in transformers 4.57.
#[derive(Deserialize)]
struct Qwen2Json {
    #[serde(default = "qwen2_defaults::vocab_size")]
    vocab_size: i64,
    #[serde(default = "llama_defaults::hidden_size")]
    hidden_size: i64,
    #[serde(default = "qwen2_defaults::intermediate_size")]
    intermediate_size: i64,
    #[serde(default = "llama_defaults::layers")]
    num_hidden_layers: i64,
    #[serde(default = "llama_defaults::heads")]
    num_attention_heads: i64,
    /// Qwen2's signature default is 32 (not "as many as the query heads"); null means as many.
    #[serde(default = "qwen2_defaults::kv_heads")]
    num_key_value_heads: Option<i64>,
    /// Read when present (Qwen2's attention uses `getattr(config, "head_dim", ...)`).
    #[serde(default)]
    head_dim: Option<i64>,
    #[serde(default = "default_silu")]
    hidden_act: String,
    #[serde(default = "qwen2_defaults::max_position_embeddings")]
    max_position_embeddings: i64,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_dropout: f64,
    #[serde(default)]
    use_sliding_window: bool,
    #[serde(default)]
    pad_token_id: Option<i64>,
}

mod qwen2_defaults {
    pub fn vocab_size() -> i64 {
        151936
    }
    pub fn intermediate_size() -> i64 {
        22016
    }
    pub fn kv_heads() -> Option<i64> {
        Some(32)
    }
    pub fn max_position_embeddings() -> i64 {
        32768
    }
}

/// HF's `LlamaConfig` / `Qwen2Config`: the fields that change the math, with HF's defaults for
/// the flavour.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Llama or Qwen2.
    pub flavour: LlamaFlavour,
    /// How attention is computed (not part of config.json; HF's default is sdpa).
    pub attn_implementation: AttnImplementation,
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Hidden size.
    pub hidden_size: i64,
    /// MLP inner width.
    pub intermediate_size: i64,
    /// Decoder layers.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: i64,
    /// Width of each head.
    pub head_dim: i64,
    /// The MLP activation's name.
    pub hidden_act: String,
    /// The context length the rotary scaling refers to.
    pub max_position_embeddings: i64,
    /// RMS-norm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Biases on q/k/v (and o for Llama); Qwen2 always has q/k/v biases and no o bias.
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
    /// The LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Dropout on attention probabilities (train mode).
    pub attention_dropout: f64,
    /// The padding token, HF's `padding_idx` of `embed_tokens`: its embedding row gets no
    /// gradient (forward outputs do not depend on it).
    pub pad_token_id: Option<i64>,
}

/// hidden_size / num_attention_heads, or a config error (checked before dividing).
fn heads_width(hidden_size: i64, heads: i64) -> Result<i64> {
    check_positive(&[("hidden_size", hidden_size), ("num_attention_heads", heads)])?;
    Ok(hidden_size / heads)
}

impl LlamaConfig {
    /// Parses a config.json value (`model_type` "llama" or "qwen2"; absent means llama) and
    /// checks it.
    pub fn from_json(config: &Value) -> Result<Self> {
        let model_type = config.get("model_type").and_then(Value::as_str).unwrap_or("llama");
        let cfg = match model_type {
            "llama" => {
                let raw: LlamaJson = parse_config(config, "Llama")?;
                Self {
                    flavour: LlamaFlavour::Llama,
                    attn_implementation: AttnImplementation::default(),
                    vocab_size: raw.vocab_size,
                    hidden_size: raw.hidden_size,
                    intermediate_size: raw.intermediate_size,
                    num_hidden_layers: raw.num_hidden_layers,
                    num_attention_heads: raw.num_attention_heads,
                    num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
                    head_dim: match raw.head_dim {
                        Some(d) => d,
                        None => heads_width(raw.hidden_size, raw.num_attention_heads)?,
                    },
                    hidden_act: raw.hidden_act,
                    max_position_embeddings: raw.max_position_embeddings,
                    rms_norm_eps: raw.rms_norm_eps,
                    rope_theta: raw.rope_theta,
                    rope_scaling: RopeScaling::from_json(raw.rope_scaling.as_ref())?,
                    attention_bias: raw.attention_bias,
                    mlp_bias: raw.mlp_bias,
                    tie_word_embeddings: raw.tie_word_embeddings,
                    attention_dropout: raw.attention_dropout,
                    pad_token_id: raw.pad_token_id,
                }
            }
            "qwen2" => {
                let raw: Qwen2Json = parse_config(config, "Qwen2")?;
                if raw.use_sliding_window {
                    return Err(Error::Config("Qwen2 sliding-window attention is not supported".into()));
                }
                Self {
                    flavour: LlamaFlavour::Qwen2,
                    attn_implementation: AttnImplementation::default(),
                    vocab_size: raw.vocab_size,
                    hidden_size: raw.hidden_size,
                    intermediate_size: raw.intermediate_size,
                    num_hidden_layers: raw.num_hidden_layers,
                    num_attention_heads: raw.num_attention_heads,
                    num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
                    head_dim: match raw.head_dim {
                        Some(d) => d,
                        None => heads_width(raw.hidden_size, raw.num_attention_heads)?,
                    },
                    hidden_act: raw.hidden_act,
                    max_position_embeddings: raw.max_position_embeddings,
                    rms_norm_eps: raw.rms_norm_eps,
                    rope_theta: raw.rope_theta,
                    rope_scaling: RopeScaling::from_json(raw.rope_scaling.as_ref())?,
                    attention_bias: true,
                    mlp_bias: false,
                    tie_word_embeddings: raw.tie_word_embeddings,
                    attention_dropout: raw.attention_dropout,
                    pad_token_id: raw.pad_token_id,
                }
            }
            other => {
                return Err(Error::Config(format!(
                    "model_type `{other}` is not a Llama-family model"
                )))
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks sizes and names.
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
        check_rotary_heads(self.num_attention_heads, self.num_key_value_heads, self.head_dim)?;
        check_epsilons(&[("rms_norm_eps", self.rms_norm_eps)])?;
        check_probabilities(&[("attention_dropout", self.attention_dropout)])?;
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return Err(Error::Config(format!(
                "rope_theta must be positive, got {}",
                self.rope_theta
            )));
        }
        self.activation()?;
        Ok(())
    }

    /// The MLP activation.
    pub fn activation(&self) -> Result<Activation> {
        self.hidden_act.parse()
    }

    /// Query heads per key/value head.
    pub fn groups(&self) -> i64 {
        self.num_attention_heads / self.num_key_value_heads
    }
}

/// Grouped-query self-attention with rotary positions.
#[derive(Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    dropout: f64,
    attn_implementation: AttnImplementation,
}

impl Attention {
    /// Creates the q/k/v/o projections under `vs`.
    pub fn new(vs: nn::Path, cfg: &LlamaConfig) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let qwen = cfg.flavour == LlamaFlavour::Qwen2;
        let qkv_bias = cfg.attention_bias;
        Ok(Self {
            q_proj: Linear::new(vs.sub("q_proj"), h, cfg.num_attention_heads * d, qkv_bias)?,
            k_proj: Linear::new(vs.sub("k_proj"), h, cfg.num_key_value_heads * d, qkv_bias)?,
            v_proj: Linear::new(vs.sub("v_proj"), h, cfg.num_key_value_heads * d, qkv_bias)?,
            o_proj: Linear::new(
                vs.sub("o_proj"),
                cfg.num_attention_heads * d,
                h,
                cfg.attention_bias && !qwen,
            )?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: d,
            dropout: cfg.attention_dropout,
            attn_implementation: cfg.attn_implementation,
        })
    }

    /// HF's eager order (`q @ k^T * head_dim^-0.5`, the dtype's minimum on future keys, softmax
    /// in f32), or the fused kernel with the same scale.
    fn spec(&self, kind: Kind) -> AttentionSpec {
        AttentionSpec {
            implementation: self.attn_implementation,
            score_ops: vec![ScoreOp::Mul((self.head_dim as f64).powf(-0.5))],
            softmax: SoftmaxPrecision::F32,
            dropout: self.dropout,
            future: min_value(kind),
            causal: true,
        }
    }

    /// Attends from `x` [B, T, hidden] over cached and new positions; `bias` [B or 1, 1, T, S]
    /// is added to the scores (`None`: the causal rule alone). Returns the output and the grown
    /// cache (keys after rotation).
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: Option<&Tensor>,
        past: Option<&LayerCache>,
        train: bool,
    ) -> Result<(Tensor, LayerCache)> {
        let (cos, sin) = (cos.f_unsqueeze(1)?, sin.f_unsqueeze(1)?);
        let d = self.head_dim;
        let q = apply_rotary(&split_heads(&self.q_proj.forward(x)?, self.heads, d)?, &cos, &sin)?;
        let k = apply_rotary(&split_heads(&self.k_proj.forward(x)?, self.kv_heads, d)?, &cos, &sin)?;
        let v = split_heads(&self.v_proj.forward(x)?, self.kv_heads, d)?;
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

/// One decoder layer: pre-norm attention and MLP with residuals.
#[derive(Debug)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: GatedMlp,
}

impl DecoderLayer {
    /// Creates layer parameters under `vs`.
    pub fn new(vs: nn::Path, cfg: &LlamaConfig) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::new(
                vs.sub("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
                RmsNormStyle::Llama,
            )?,
            self_attn: Attention::new(vs.sub("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::new(
                vs.sub("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
                RmsNormStyle::Llama,
            )?,
            mlp: GatedMlp::new(
                vs.sub("mlp"),
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.mlp_bias,
                cfg.activation()?,
            )?,
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
        let h = x.f_add(&attn)?;
        let out = h.f_add(&self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?)?;
        Ok((out, cache))
    }
}

/// A Llama-family causal LM (`LlamaForCausalLM`, `Qwen2ForCausalLM`).
#[derive(Debug)]
pub struct LlamaForCausalLM {
    /// `model.embed_tokens.weight` [vocab, hidden].
    pub embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `lm_head.weight`; the embedding matrix when tied; `None` when built without an LM head.
    pub lm_head: Option<Tensor>,
    rotary: RotaryEmbedding,
    cfg: LlamaConfig,
}

impl LlamaForCausalLM {
    /// Creates `model.*` and, unless tied, `lm_head.weight` under `vs`.
    pub fn new(vs: nn::Path, cfg: &LlamaConfig) -> Result<Self> {
        Self::with_head(vs, cfg, true)
    }

    /// [`LlamaForCausalLM::new`], with or without the LM head (`model.*` alone, as under
    /// `LlamaForSequenceClassification`'s `score`).
    pub fn with_head(vs: nn::Path, cfg: &LlamaConfig, lm_head: bool) -> Result<Self> {
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
                head_dim: cfg.head_dim,
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

    /// `embed_tokens`' padding index as `nn.Embedding(vocab, hidden, pad_token_id)` normalises
    /// it (a negative id counts from the end), or -1 (none) without a pad token. An id outside
    /// the vocabulary, which HF refuses when it builds the model, is ignored.
    fn padding_idx(&self) -> i64 {
        let vocab = self.cfg.vocab_size;
        match self.cfg.pad_token_id {
            Some(p) if (0..vocab).contains(&p) => p,
            Some(p) if (-vocab..0).contains(&p) => p + vocab,
            _ => -1,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Maps a checkpoint key to a parameter name: rotary buffers of old checkpoints carry no
    /// parameters, and a tied model reads its head from the embedding.
    pub fn parameter_name(&self, key: &str) -> Option<String> {
        let head_is_embedding = self.cfg.tie_word_embeddings || self.lm_head.is_none();
        if key.ends_with("rotary_emb.inv_freq") || (head_is_embedding && key == "lm_head.weight") {
            return None;
        }
        Some(key.to_string())
    }

    /// What the inputs of a pass are checked against.
    pub fn limits(&self) -> CausalLimits {
        CausalLimits {
            vocab_size: self.cfg.vocab_size,
            num_layers: self.layers.len(),
            max_positions: None,
        }
    }

    /// Runs the model over `input_ids` [B, T] after the cached positions; `attention_mask`
    /// [B, past + T] and `position_ids` as in [`crate::inputs::prepare_causal`] (by default
    /// `past..past + T`, as HF's forward).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        past: Option<&Cache>,
        train: bool,
    ) -> Result<CausalLmOutput> {
        self.forward_keeping(input_ids, attention_mask, position_ids, past, train, 0)
    }

    /// [`LlamaForCausalLM::forward`] with logits for the last `logits_to_keep` positions only
    /// (0 = all), as HF's `logits_to_keep`: generation needs one position's logits.
    pub fn forward_keeping(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        past: Option<&Cache>,
        train: bool,
        logits_to_keep: i64,
    ) -> Result<CausalLmOutput> {
        let device = self.embed_tokens.device();
        let inputs = prepare_causal(input_ids, attention_mask, position_ids, past, self.limits(), device)?;
        CausalLm::forward(self, &inputs, train, logits_to_keep)
    }
}

impl CausalLm for LlamaForCausalLM {
    fn model_type(&self) -> &'static str {
        self.cfg.flavour.model_type()
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
        // Rotary positions have no hard limit (HF enforces none); rope_scaling governs quality.
        None
    }

    fn forward_hidden(&self, inputs: &CausalInputs<'_>, train: bool) -> Result<(Tensor, Cache)> {
        let device = self.embed_tokens.device();
        let kind = self.embed_tokens.kind();
        let (position_ids, max_position, past) = (&inputs.position_ids, inputs.max_position, inputs.past);
        let (cos, sin) = self.rotary.cos_sin(position_ids, max_position, kind)?;

        // HF's eager mask: the dtype's minimum wherever a key is in the future or padding.
        // Without padding the layers apply the causal rule themselves.
        let bias = inputs.attention_bias(kind, device, min_value(kind))?;

        let mut h = Tensor::f_embedding(&self.embed_tokens, &inputs.input_ids, self.padding_idx(), false, false)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let (out, cache) = layer.forward(&h, &cos, &sin, bias.as_ref(), past.map(|p| &p.layers[i]), train)?;
            h = out;
            layers.push(cache);
        }
        Ok((self.norm.forward(&h)?, Cache { layers }))
    }

    fn lm_head(&self) -> Option<&Tensor> {
        self.lm_head.as_ref()
    }

    fn parameter_name(&self, key: &str) -> Option<String> {
        LlamaForCausalLM::parameter_name(self, key)
    }

    fn tied_aliases(&self) -> Vec<(&'static str, &'static str)> {
        if self.cfg.tie_word_embeddings && self.lm_head.is_some() {
            vec![("lm_head.weight", "model.embed_tokens.weight")]
        } else {
            vec![]
        }
    }

    fn supports_static_decode(&self) -> bool {
        !matches!(self.cfg.rope_scaling, RopeScaling::Dynamic { .. })
    }

    fn is_lookup_only(&self, name: &str) -> bool {
        let head_reads_embedding = self.cfg.tie_word_embeddings && self.lm_head.is_some();
        !head_reads_embedding && name == "model.embed_tokens.weight"
    }
}

/// Llama's registry entry (also SmolLM2 and other `LlamaForCausalLM` checkpoints).
pub const ARCHITECTURE: Architecture = Architecture {
    model_type: "llama",
    name: "Llama",
    family: Family::Causal(build),
    // Measured on CPU: the fused kernel, with grouped key/value heads, is faster.
    default_attention: AttnImplementation::Sdpa,
    tiny_config: tiny_llama_config,
};

/// Qwen2's registry entry (Qwen2 and Qwen2.5 checkpoints).
pub const QWEN2_ARCHITECTURE: Architecture = Architecture {
    model_type: "qwen2",
    name: "Qwen2",
    family: Family::Causal(build),
    default_attention: AttnImplementation::Sdpa,
    tiny_config: tiny_qwen2_config,
};

fn build(vs: nn::Path, config: &Value, options: &BuildOptions) -> Result<Box<dyn CausalLm>> {
    let mut cfg = LlamaConfig::from_json(config)?;
    let entry = match cfg.flavour {
        LlamaFlavour::Llama => ARCHITECTURE,
        LlamaFlavour::Qwen2 => QWEN2_ARCHITECTURE,
    };
    cfg.attn_implementation = options
        .attn_implementation
        .unwrap_or_else(|| entry.default_attention_on(vs.device()));
    Ok(Box::new(LlamaForCausalLM::with_head(
        vs,
        &cfg,
        !options.without_lm_head,
    )?))
}

fn tiny_llama_config() -> Value {
    serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 50, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "eos_token_id": 2, "pad_token_id": 0
    })
}

fn tiny_qwen2_config() -> Value {
    serde_json::json!({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 50, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "tie_word_embeddings": true, "eos_token_id": 2, "pad_token_id": 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tch::nn::VarStore;
    use tch::Device;

    fn tiny(extra: Value) -> LlamaConfig {
        let mut cfg = json!({"model_type": "llama", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 32});
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        LlamaConfig::from_json(&cfg).unwrap()
    }

    fn random_model(cfg: &LlamaConfig) -> (VarStore, LlamaForCausalLM) {
        let vs = VarStore::new(Device::Cpu);
        let model = LlamaForCausalLM::new(vs.root(), cfg).unwrap();
        crate::test_util::randomize(&vs, 9, 0.3);
        (vs, model)
    }

    #[test]
    fn config_defaults_and_errors() {
        let llama = LlamaConfig::from_json(&json!({"model_type": "llama"})).unwrap();
        assert_eq!(
            (
                llama.vocab_size,
                llama.num_key_value_heads,
                llama.head_dim,
                llama.tie_word_embeddings
            ),
            (32000, 32, 128, false)
        );
        let qwen = LlamaConfig::from_json(&json!({"model_type": "qwen2", "attention_bias": false})).unwrap();
        assert!(qwen.attention_bias, "Qwen2 always has q/k/v biases");
        let bad = |v: Value| LlamaConfig::from_json(&v).is_err();
        assert!(
            bad(json!({"num_attention_heads": 6, "num_key_value_heads": 4})),
            "heads not a multiple of kv heads"
        );
        assert!(
            bad(json!({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})),
            "unknown rope type"
        );
        assert!(bad(json!({"rope_scaling": {"type": "linear"}})), "missing factor");
        assert!(bad(
            json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 64}})
        ));
        assert!(bad(json!({"hidden_act": "nope"})));
        assert!(bad(json!({"model_type": "qwen2", "use_sliding_window": true})));
        assert!(bad(json!({"head_dim": 7})));
        // Fuzzing regression: heads * head_dim overflowed i64 and panicked while building the
        // projections (crates/vh-fuzz/regressions/config/llama-heads-times-head-dim-overflow.json).
        let err = LlamaConfig::from_json(&json!({"head_dim": 1i64 << 62, "num_attention_heads": 4})).unwrap_err();
        assert!(
            err.to_string().contains("num_attention_heads * head_dim overflows"),
            "{err}"
        );
        assert_eq!(
            LlamaConfig::from_json(&json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}}))
                .unwrap()
                .rope_scaling,
            RopeScaling::Dynamic { factor: 2.0 }
        );
    }

    #[test]
    fn incremental_decoding_and_left_padding_match_full_forward() {
        let cfg = tiny(json!({}));
        let (_vs, model) = random_model(&cfg);
        let ids = Tensor::from_slice2(&[[1i64, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12]]);
        let full = model.forward(&ids, None, None, None, false).unwrap();
        let mut cache = model
            .forward(&ids.narrow(1, 0, 3), None, None, None, false)
            .unwrap()
            .cache;
        for t in 3..6 {
            let step = model
                .forward(&ids.narrow(1, t, 1), None, None, Some(&cache), false)
                .unwrap();
            let diff = (step.logits.squeeze_dim(1) - full.logits.select(1, t))
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff < 1e-5, "step {t}: {diff}");
            cache = step.cache;
        }
        let padded = Tensor::from_slice2(&[[0i64, 0, 1, 5, 7]]);
        let mask = Tensor::from_slice2(&[[0i64, 0, 1, 1, 1]]);
        let out = model.forward(&padded, Some(&mask), None, None, false).unwrap();
        let plain = model
            .forward(&ids.narrow(1, 0, 3).narrow(0, 0, 1), None, None, None, false)
            .unwrap();
        assert!(
            (out.logits.narrow(1, 2, 3) - plain.logits)
                .abs()
                .max()
                .double_value(&[])
                < 1e-5
        );
    }
}

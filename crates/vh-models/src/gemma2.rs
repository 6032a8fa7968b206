//! Gemma 2, as HF's `modeling_gemma2.py`: Gemma's decoder (embeddings times `sqrt(hidden_size)`
//! in the model's dtype, `1 + weight` RMS norms, GeGLU with `hidden_activation`, head_dim from the
//! config, tied head) with Gemma 2's changes: attention scores scaled by
//! `query_pre_attn_scalar^-0.5` and soft-capped (`tanh(s / cap) * cap`) before the mask, so those
//! layers always run the eager computation; sliding-window layers alternating with full ones
//! (`layer_types`, by default every even layer slides); norms after attention and before and
//! after the MLP; and the final logits soft-capped. Parameters are named like HF's state dict.
//!
//! HF's cache keeps only the last `sliding_window - 1` positions of a sliding layer; ours keeps
//! them all and hides the older ones with the mask, which gives the same attention.

use crate::activation::Activation;
use crate::attention::{
    check_sliding_window, layer_windows, AttentionSpec, AttnImplementation, MaskSpec, ScoreOp, SoftmaxPrecision,
};
use crate::cache::{Cache, LayerCache};
use crate::gemma::embedding_normalizer;
use crate::inputs::{CausalInputs, CausalLimits};
use crate::layers::{embedding_padding_idx, merge_heads, split_heads, GatedMlp, Linear, RmsNorm, RmsNormStyle};
use crate::registry::{Architecture, BuildOptions, CausalLm, Family};
use crate::rotary::{apply_rotary, check_rotary_heads, RopeScaling, RotaryConfig, RotaryEmbedding};
use serde::Deserialize;
use serde_json::Value;
use tch::{nn, Kind, Tensor};
use vh_core::error::{check_epsilons, check_positive, check_probabilities, parse_config};
use vh_core::ops::ScalarOps;
use vh_core::tensor::min_value;
use vh_core::{Error, Result};

/// config.json of a `gemma2` model, with `Gemma2Config`'s defaults in transformers 4.57.
#[derive(Deserialize)]
struct Gemma2Json {
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
    #[serde(default = "defaults::kv_heads")]
    num_key_value_heads: i64,
    /// HF reads it as is (no fallback to hidden / heads): null is refused.
    #[serde(default = "defaults::head_dim")]
    head_dim: i64,
    /// What `Gemma2MLP` reads (a `hidden_act` key is kept by HF but unused).
    #[serde(default = "defaults::gelu_pytorch_tanh")]
    hidden_activation: String,
    #[serde(default = "defaults::max_position_embeddings")]
    max_position_embeddings: i64,
    #[serde(default = "defaults::rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default = "defaults::rope_theta")]
    rope_theta: f64,
    /// Not in `Gemma2Config`'s signature, but HF keeps it and its rotary embedding reads it.
    #[serde(default)]
    rope_scaling: Option<Value>,
    /// Read by HF's rotary initialisation when present; only 1 is supported.
    #[serde(default)]
    partial_rotary_factor: Option<f64>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default = "defaults::tie")]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_dropout: f64,
    #[serde(default = "defaults::pad_token_id")]
    pad_token_id: Option<i64>,
    /// The attention scale is its inverse square root.
    #[serde(default = "defaults::query_pre_attn_scalar")]
    query_pre_attn_scalar: f64,
    /// 4096 when absent; null is allowed only without sliding layers.
    #[serde(default = "defaults::sliding_window")]
    sliding_window: Option<i64>,
    /// Per layer `sliding_attention` or `full_attention`; null: even layers slide.
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    /// 30 when absent; null switches the final soft-capping off.
    #[serde(default = "defaults::final_logit_softcapping")]
    final_logit_softcapping: Option<f64>,
    /// 50 when absent; null switches the attention soft-capping off.
    #[serde(default = "defaults::attn_logit_softcapping")]
    attn_logit_softcapping: Option<f64>,
}

mod defaults {
    pub fn vocab_size() -> i64 {
        256000
    }
    pub fn hidden_size() -> i64 {
        2304
    }
    pub fn intermediate_size() -> i64 {
        9216
    }
    pub fn layers() -> i64 {
        26
    }
    pub fn heads() -> i64 {
        8
    }
    pub fn kv_heads() -> i64 {
        4
    }
    pub fn head_dim() -> i64 {
        256
    }
    pub fn gelu_pytorch_tanh() -> String {
        "gelu_pytorch_tanh".to_string()
    }
    pub fn max_position_embeddings() -> i64 {
        8192
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn rope_theta() -> f64 {
        10000.0
    }
    pub fn tie() -> bool {
        true
    }
    pub fn pad_token_id() -> Option<i64> {
        Some(0)
    }
    pub fn query_pre_attn_scalar() -> f64 {
        256.0
    }
    pub fn sliding_window() -> Option<i64> {
        Some(4096)
    }
    pub fn final_logit_softcapping() -> Option<f64> {
        Some(30.0)
    }
    pub fn attn_logit_softcapping() -> Option<f64> {
        Some(50.0)
    }
}

/// HF's `Gemma2Config`: the fields that change the math, with HF's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma2Config {
    /// How attention is computed (not part of config.json); soft-capped layers run eager.
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
    /// The MLP activation (`hidden_activation`).
    pub hidden_activation: Activation,
    /// The context length the rotary scaling refers to.
    pub max_position_embeddings: i64,
    /// RMS-norm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Biases on the attention projections.
    pub attention_bias: bool,
    /// The LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Dropout on attention probabilities (train mode).
    pub attention_dropout: f64,
    /// The padding token, HF's `padding_idx` of `embed_tokens`: its row gets no gradient.
    pub pad_token_id: Option<i64>,
    /// Scores are multiplied by `query_pre_attn_scalar^-0.5`.
    pub query_pre_attn_scalar: f64,
    /// Each layer's sliding window (`None`: full causal attention), from `layer_types`.
    pub layer_windows: Vec<Option<i64>>,
    /// Soft cap of the final logits, if any.
    pub final_logit_softcapping: Option<f64>,
    /// Soft cap of the attention scores, if any.
    pub attn_logit_softcapping: Option<f64>,
}

impl Gemma2Config {
    /// Parses a config.json value and checks it.
    pub fn from_json(config: &Value) -> Result<Self> {
        let raw: Gemma2Json = parse_config(config, "Gemma2")?;
        if let Some(factor) = raw.partial_rotary_factor.filter(|f| *f != 1.0) {
            return Err(Error::Config(format!(
                "partial_rotary_factor {factor} is not supported (only 1.0)"
            )));
        }
        check_positive(&[("num_hidden_layers", raw.num_hidden_layers)])?;
        check_sliding_window(raw.sliding_window)?;
        // HF's default: layers 0, 2, 4, ... slide, the others attend to everything.
        let types = raw.layer_types.unwrap_or_else(|| {
            (0..raw.num_hidden_layers)
                .map(|i| {
                    if i % 2 == 0 {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                    .to_string()
                })
                .collect()
        });
        let windows = layer_windows(Some(&types), raw.sliding_window, 0, raw.num_hidden_layers)?;
        let cfg = Self {
            attn_implementation: AttnImplementation::default(),
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads,
            head_dim: raw.head_dim,
            hidden_activation: raw.hidden_activation.parse()?,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta,
            rope_scaling: RopeScaling::from_json(raw.rope_scaling.as_ref())?,
            attention_bias: raw.attention_bias,
            tie_word_embeddings: raw.tie_word_embeddings,
            attention_dropout: raw.attention_dropout,
            pad_token_id: raw.pad_token_id,
            query_pre_attn_scalar: raw.query_pre_attn_scalar,
            layer_windows: windows,
            final_logit_softcapping: raw.final_logit_softcapping,
            attn_logit_softcapping: raw.attn_logit_softcapping,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks sizes, ranges and caps.
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
        if self.layer_windows.len() as i64 != self.num_hidden_layers {
            return Err(Error::Config(format!(
                "{} layer windows for {} layers",
                self.layer_windows.len(),
                self.num_hidden_layers
            )));
        }
        check_rotary_heads(self.num_attention_heads, self.num_key_value_heads, self.head_dim)?;
        check_epsilons(&[("rms_norm_eps", self.rms_norm_eps)])?;
        check_probabilities(&[("attention_dropout", self.attention_dropout)])?;
        for (name, value) in [
            ("rope_theta", Some(self.rope_theta)),
            ("query_pre_attn_scalar", Some(self.query_pre_attn_scalar)),
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
        ] {
            if let Some(v) = value.filter(|v| !(*v > 0.0 && v.is_finite())) {
                return Err(Error::Config(format!("{name} must be positive, got {v}")));
            }
        }
        Ok(())
    }
}

/// Grouped-query self-attention with rotary positions, scaled and soft-capped scores, and the
/// layer's window.
#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    scaling: f64,
    softcap: Option<f64>,
    dropout: f64,
    implementation: AttnImplementation,
}

impl Attention {
    fn new(vs: nn::Path, cfg: &Gemma2Config) -> Result<Self> {
        let (h, d, bias) = (cfg.hidden_size, cfg.head_dim, cfg.attention_bias);
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: Linear::new(vs.sub("q_proj"), h, heads * d, bias)?,
            k_proj: Linear::new(vs.sub("k_proj"), h, kv_heads * d, bias)?,
            v_proj: Linear::new(vs.sub("v_proj"), h, kv_heads * d, bias)?,
            o_proj: Linear::new(vs.sub("o_proj"), heads * d, h, bias)?,
            heads,
            kv_heads,
            head_dim: d,
            scaling: cfg.query_pre_attn_scalar.powf(-0.5),
            softcap: cfg.attn_logit_softcapping,
            dropout: cfg.attention_dropout,
            implementation: cfg.attn_implementation,
        })
    }

    /// HF's eager order (`q @ k^T * query_pre_attn_scalar^-0.5`, soft-capped, the mask added,
    /// softmax in f32); the fused kernel only when nothing is soft-capped.
    fn spec(&self, kind: Kind) -> AttentionSpec {
        let mut score_ops = vec![ScoreOp::Mul(self.scaling)];
        if let Some(cap) = self.softcap {
            score_ops.push(ScoreOp::SoftCap(cap));
        }
        AttentionSpec {
            implementation: self.implementation,
            score_ops,
            softmax: SoftmaxPrecision::F32,
            dropout: self.dropout,
            future: min_value(kind),
            causal: true,
        }
    }

    /// Attends from `x` [B, T, hidden] over cached and new positions with `bias` (the window and
    /// padding; `None`: the causal rule alone); returns the output and the grown cache.
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
        let q = apply_rotary(&split_heads(&self.q_proj.forward(x)?, self.heads, d)?, cos, sin)?;
        let k = apply_rotary(&split_heads(&self.k_proj.forward(x)?, self.kv_heads, d)?, cos, sin)?;
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

/// One decoder layer: attention and GeGLU MLP, each between a norm before and a norm after,
/// with residuals.
#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    mlp: GatedMlp,
    post_feedforward_layernorm: RmsNorm,
    sliding_window: Option<i64>,
}

impl DecoderLayer {
    fn new(vs: nn::Path, cfg: &Gemma2Config, sliding_window: Option<i64>) -> Result<Self> {
        let norm = |name: &str| RmsNorm::new(vs.sub(name), cfg.hidden_size, cfg.rms_norm_eps, RmsNormStyle::Gemma);
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::new(vs.sub("self_attn"), cfg)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            mlp: GatedMlp::new(
                vs.sub("mlp"),
                cfg.hidden_size,
                cfg.intermediate_size,
                false,
                cfg.hidden_activation,
            )?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
            sliding_window,
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
        let h = x.f_add(&self.post_attention_layernorm.forward(&attn)?)?;
        let mlp = self.mlp.forward(&self.pre_feedforward_layernorm.forward(&h)?)?;
        let out = h.f_add(&self.post_feedforward_layernorm.forward(&mlp)?)?;
        Ok((out, cache))
    }
}

/// HF's `Gemma2ForCausalLM`.
#[derive(Debug)]
pub struct Gemma2ForCausalLM {
    /// `model.embed_tokens.weight` [vocab, hidden].
    pub embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `lm_head.weight`; the embedding matrix when tied; `None` when built without an LM head.
    pub lm_head: Option<Tensor>,
    rotary: RotaryEmbedding,
    cfg: Gemma2Config,
}

impl Gemma2ForCausalLM {
    /// Creates `model.*` and, unless tied, `lm_head.weight` under `vs`.
    pub fn new(vs: nn::Path, cfg: &Gemma2Config) -> Result<Self> {
        Self::with_head(vs, cfg, true)
    }

    /// [`Gemma2ForCausalLM::new`], with or without the LM head (`model.*` alone, for a backbone
    /// under another head).
    pub fn with_head(vs: nn::Path, cfg: &Gemma2Config, lm_head: bool) -> Result<Self> {
        cfg.validate()?;
        let model = vs.sub("model");
        let embed_tokens = vh_core::param::var(
            &model.sub("embed_tokens"),
            "weight",
            &[cfg.vocab_size, cfg.hidden_size],
            nn::Init::Const(0.0),
        )?;
        let layers = cfg
            .layer_windows
            .iter()
            .enumerate()
            .map(|(i, window)| DecoderLayer::new(model.sub("layers").sub(i), cfg, *window))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(
            model.sub("norm"),
            cfg.hidden_size,
            cfg.rms_norm_eps,
            RmsNormStyle::Gemma,
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

    /// The configuration.
    pub fn config(&self) -> &Gemma2Config {
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
}

impl Gemma2ForCausalLM {
    /// Its LM-head checkpoint facts (shared by the Llama family).
    fn head_facts(&self) -> crate::registry::EmbedTokensHead {
        crate::registry::EmbedTokensHead {
            tied: self.cfg.tie_word_embeddings,
            has_head: self.lm_head.is_some(),
        }
    }
}

impl CausalLm for Gemma2ForCausalLM {
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
        let (cos, sin) = self.rotary.cos_sin(&inputs.position_ids, inputs.max_position, kind)?;
        let (cos, sin) = (cos.f_unsqueeze(1)?, sin.f_unsqueeze(1)?);
        // HF's eager masks, one per attention type, shared by the layers of that type: the
        // dtype's minimum on future keys, padding and (sliding layers) keys the window left
        // behind.
        let mask = |window: Option<i64>| {
            MaskSpec {
                key_mask: inputs.key_mask.as_ref(),
                batch: inputs.batch,
                new_len: inputs.new_len,
                past_len: inputs.past_len,
                future: min_value(kind),
                sliding_window: window,
            }
            .bias_beyond_causal(kind, device)
        };
        let mut biases: Vec<(Option<i64>, Option<Tensor>)> = Vec::new();
        for window in &self.cfg.layer_windows {
            if !biases.iter().any(|(w, _)| w == window) {
                biases.push((*window, mask(*window)?));
            }
        }
        let bias_of = |window: Option<i64>| biases.iter().find(|(w, _)| *w == window).and_then(|(_, b)| b.as_ref());

        let padding_idx = embedding_padding_idx(self.cfg.pad_token_id, self.cfg.vocab_size);
        let embedded = Tensor::f_embedding(&self.embed_tokens, &inputs.input_ids, padding_idx, false, false)?;
        let mut h = embedded.f_mul(&embedding_normalizer(self.cfg.hidden_size, kind, device)?)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let past = inputs.past.map(|p| &p.layers[i]);
            let bias = bias_of(layer.sliding_window);
            let (out, cache) = layer.forward(&h, &cos, &sin, bias, past, train)?;
            h = out;
            layers.push(cache);
        }
        Ok((self.norm.forward(&h)?, Cache { layers }))
    }

    fn lm_head(&self) -> Option<&Tensor> {
        self.lm_head.as_ref()
    }

    /// HF's final soft-capping, `tanh(logits / cap) * cap`, when the config sets a cap.
    fn finish_logits(&self, logits: Tensor) -> Result<Tensor> {
        match self.cfg.final_logit_softcapping {
            Some(cap) => Ok(logits.s_div(cap)?.f_tanh()?.s_mul(cap)?),
            None => Ok(logits),
        }
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
}

/// Gemma 2's registry entry.
pub const ARCHITECTURE: Architecture = Architecture {
    model_type: "gemma2",
    name: "Gemma2",
    family: Family::Causal(build),
    // Soft-capped layers always run eager; without caps the fused kernel is the faster on CPU.
    default_attention: AttnImplementation::Sdpa,
    tiny_config,
};

fn build(vs: nn::Path, config: &Value, options: &BuildOptions) -> Result<Box<dyn CausalLm>> {
    let mut cfg = Gemma2Config::from_json(config)?;
    cfg.attn_implementation = options
        .attn_implementation
        .unwrap_or_else(|| ARCHITECTURE.default_attention_on(vs.device()));
    Ok(Box::new(Gemma2ForCausalLM::with_head(
        vs,
        &cfg,
        !options.without_lm_head,
    )?))
}

fn tiny_config() -> Value {
    serde_json::json!({
        "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "vocab_size": 50, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "max_position_embeddings": 64, "sliding_window": 3, "query_pre_attn_scalar": 8,
        "final_logit_softcapping": 5.0, "attn_logit_softcapping": 2.0,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inputs::prepare_causal;
    use crate::registry::CausalLmOutput;
    use serde_json::json;
    use tch::nn::VarStore;
    use tch::Device;

    fn config(extra: Value) -> Result<Gemma2Config> {
        let mut cfg = tiny_config();
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        Gemma2Config::from_json(&cfg)
    }

    fn run(model: &Gemma2ForCausalLM, ids: &Tensor, mask: Option<&Tensor>, past: Option<&Cache>) -> CausalLmOutput {
        let inputs = prepare_causal(ids, mask, None, past, model.limits(), Device::Cpu).unwrap();
        CausalLm::forward(model, &inputs, false, 0).unwrap()
    }

    #[test]
    fn config_defaults_follow_hf() {
        let cfg = Gemma2Config::from_json(&json!({"model_type": "gemma2", "num_hidden_layers": 3})).unwrap();
        assert_eq!(
            (
                cfg.vocab_size,
                cfg.hidden_size,
                cfg.num_key_value_heads,
                cfg.head_dim,
                cfg.tie_word_embeddings,
                cfg.hidden_activation,
                cfg.query_pre_attn_scalar,
                cfg.final_logit_softcapping,
                cfg.attn_logit_softcapping
            ),
            (
                256000,
                2304,
                4,
                256,
                true,
                Activation::GeluPytorchTanh,
                256.0,
                Some(30.0),
                Some(50.0)
            )
        );
        assert_eq!(cfg.layer_windows, vec![Some(4096), None, Some(4096)]);
        let types = json!({"layer_types": ["full_attention", "sliding_attention"], "final_logit_softcapping": null});
        let cfg = config(types).unwrap();
        assert_eq!(
            (cfg.layer_windows, cfg.final_logit_softcapping),
            (vec![None, Some(3)], None)
        );
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let bad = |extra: Value, what: &str| {
            let err = config(extra).expect_err(what);
            assert!(matches!(err, Error::Config(_)), "{what}: {err}");
        };
        bad(json!({"num_key_value_heads": 3}), "heads not a multiple of kv heads");
        bad(json!({"head_dim": null}), "null head_dim");
        bad(
            json!({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}),
            "unknown rope type",
        );
        bad(json!({"hidden_activation": "nope"}), "unknown activation");
        bad(json!({"sliding_window": null}), "sliding layers without a window");
        bad(json!({"sliding_window": 0}), "zero window");
        bad(
            json!({"layer_types": ["full_attention"]}),
            "layer_types of the wrong length",
        );
        bad(
            json!({"layer_types": ["chunked_attention", "full_attention"]}),
            "unknown layer type",
        );
        bad(json!({"attn_logit_softcapping": 0.0}), "zero cap");
        bad(json!({"final_logit_softcapping": -1.0}), "negative cap");
        bad(json!({"query_pre_attn_scalar": 0}), "zero scalar");
        bad(json!({"num_hidden_layers": 0}), "no layers");
    }

    #[test]
    fn incremental_decoding_past_the_window_matches_the_full_pass() {
        for implementation in [AttnImplementation::Eager, AttnImplementation::Sdpa] {
            for caps in [json!({}), json!({"attn_logit_softcapping": null})] {
                let mut cfg = config(caps).unwrap();
                cfg.attn_implementation = implementation;
                let vs = VarStore::new(Device::Cpu);
                let model = Gemma2ForCausalLM::new(vs.root(), &cfg).unwrap();
                crate::test_util::randomize(&vs, 5, 0.3);
                let ids = Tensor::from_slice2(&[[0i64, 0, 5, 7, 9, 11, 3, 8], [2, 4, 6, 8, 10, 12, 14, 16]]);
                let mask = Tensor::from_slice2(&[[0i64, 0, 1, 1, 1, 1, 1, 1], [1; 8]]);
                let full = run(&model, &ids, Some(&mask), None);
                let cap = cfg.final_logit_softcapping.unwrap();
                assert!(full.logits.abs().max().double_value(&[]) <= cap);
                let mut past = run(&model, &ids.narrow(1, 0, 3), Some(&mask.narrow(1, 0, 3)), None).cache;
                for t in 3..8 {
                    let step = run(
                        &model,
                        &ids.narrow(1, t, 1),
                        Some(&mask.narrow(1, 0, t + 1)),
                        Some(&past),
                    );
                    let d = (step.logits.squeeze_dim(1) - full.logits.select(1, t))
                        .abs()
                        .max()
                        .double_value(&[]);
                    assert!(d < 1e-5, "{implementation:?} step {t}: {d}");
                    past = step.cache;
                }
            }
        }
    }
}

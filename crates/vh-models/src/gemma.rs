//! Gemma, as HF's `modeling_gemma.py`: Llama's decoder (rotary positions, grouped-query
//! attention, gated MLP) with Gemma's changes: the embeddings are multiplied by
//! `sqrt(hidden_size)` rounded to the model's dtype, every RMS norm scales by `1 + weight` in f32
//! before casting back, the MLP is GeGLU (`gelu_pytorch_tanh` by default), `head_dim` comes from
//! the config (256 by default, independent of the hidden size) and the LM head is tied by
//! default. Parameters are named like HF's state dict (`model.layers.0.self_attn.q_proj.weight`, ...).

use crate::activation::Activation;
use crate::attention::{AttentionSpec, AttnImplementation, MaskSpec, ScoreOp, SoftmaxPrecision};
use crate::cache::{Cache, LayerCache};
use crate::inputs::{CausalInputs, CausalLimits};
use crate::layers::{embedding_padding_idx, merge_heads, split_heads, GatedMlp, Linear, RmsNorm, RmsNormStyle};
use crate::registry::{Architecture, BuildOptions, CausalLm, Family};
use crate::rotary::{apply_rotary, check_rotary_heads, RopeScaling, RotaryConfig, RotaryEmbedding};
use serde::Deserialize;
use serde_json::Value;
use tch::{nn, Kind, Tensor};
use vh_core::error::{check_epsilons, check_positive, check_probabilities, parse_config};
use vh_core::tensor::min_value;
use vh_core::{Error, Result};

/// config.json of a `gemma` model, with `GemmaConfig`'s defaults in transformers 4.57.
#[derive(Deserialize)]
struct GemmaJson {
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
    #[serde(default = "defaults::heads")]
    num_key_value_heads: i64,
    /// HF reads it as is (no fallback to hidden / heads): null is refused.
    #[serde(default = "defaults::head_dim")]
    head_dim: i64,
    /// What `GemmaMLP` reads in transformers 4.57 (`hidden_activation` is stored but unused).
    #[serde(default = "defaults::gelu_pytorch_tanh")]
    hidden_act: String,
    #[serde(default = "defaults::max_position_embeddings")]
    max_position_embeddings: i64,
    #[serde(default = "defaults::rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default = "defaults::rope_theta")]
    rope_theta: f64,
    /// Not in `GemmaConfig`'s signature, but HF keeps it as an extra attribute and its rotary
    /// embedding reads it.
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
}

mod defaults {
    pub fn vocab_size() -> i64 {
        256000
    }
    pub fn hidden_size() -> i64 {
        3072
    }
    pub fn intermediate_size() -> i64 {
        24576
    }
    pub fn layers() -> i64 {
        28
    }
    pub fn heads() -> i64 {
        16
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
}

/// HF's `GemmaConfig`: the fields that change the math, with HF's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmaConfig {
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
    /// The MLP activation.
    pub hidden_act: Activation,
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
}

impl GemmaConfig {
    /// Parses a config.json value and checks it.
    pub fn from_json(config: &Value) -> Result<Self> {
        let raw: GemmaJson = parse_config(config, "Gemma")?;
        if let Some(factor) = raw.partial_rotary_factor.filter(|f| *f != 1.0) {
            return Err(Error::Config(format!(
                "partial_rotary_factor {factor} is not supported (only 1.0)"
            )));
        }
        let cfg = Self {
            attn_implementation: AttnImplementation::default(),
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads,
            head_dim: raw.head_dim,
            hidden_act: raw.hidden_act.parse()?,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta,
            rope_scaling: RopeScaling::from_json(raw.rope_scaling.as_ref())?,
            attention_bias: raw.attention_bias,
            tie_word_embeddings: raw.tie_word_embeddings,
            attention_dropout: raw.attention_dropout,
            pad_token_id: raw.pad_token_id,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks sizes and ranges.
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
        Ok(())
    }
}

/// Grouped-query self-attention with rotary positions.
#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    dropout: f64,
    implementation: AttnImplementation,
}

impl Attention {
    fn new(vs: nn::Path, cfg: &GemmaConfig) -> Result<Self> {
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

    /// Attends from `x` [B, T, hidden] over cached and new positions with `bias` (padding;
    /// `None`: the causal rule alone); returns the output and the grown cache.
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

/// One decoder layer: pre-norm attention and GeGLU MLP with residuals.
#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: GatedMlp,
}

impl DecoderLayer {
    fn new(vs: nn::Path, cfg: &GemmaConfig) -> Result<Self> {
        let norm = |name: &str| RmsNorm::new(vs.sub(name), cfg.hidden_size, cfg.rms_norm_eps, RmsNormStyle::Gemma);
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::new(vs.sub("self_attn"), cfg)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: GatedMlp::new(
                vs.sub("mlp"),
                cfg.hidden_size,
                cfg.intermediate_size,
                false,
                cfg.hidden_act,
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

/// The embedding normaliser `sqrt(hidden_size)` as a 0-dim tensor of `kind`: HF rounds it to the
/// model's dtype before multiplying (sqrt(3072) = 55.4256 becomes 55.5 in bf16).
pub fn embedding_normalizer(hidden_size: i64, kind: Kind, device: tch::Device) -> Result<Tensor> {
    Ok(Tensor::f_scalar_tensor((hidden_size as f64).sqrt(), (Kind::Double, device))?.f_to_kind(kind)?)
}

/// HF's `GemmaForCausalLM`.
#[derive(Debug)]
pub struct GemmaForCausalLM {
    /// `model.embed_tokens.weight` [vocab, hidden].
    pub embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `lm_head.weight`; the embedding matrix when tied; `None` when built without an LM head.
    pub lm_head: Option<Tensor>,
    rotary: RotaryEmbedding,
    cfg: GemmaConfig,
}

impl GemmaForCausalLM {
    /// Creates `model.*` and, unless tied, `lm_head.weight` under `vs`.
    pub fn new(vs: nn::Path, cfg: &GemmaConfig) -> Result<Self> {
        Self::with_head(vs, cfg, true)
    }

    /// [`GemmaForCausalLM::new`], with or without the LM head (`model.*` alone, for a backbone
    /// under another head).
    pub fn with_head(vs: nn::Path, cfg: &GemmaConfig, lm_head: bool) -> Result<Self> {
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
    pub fn config(&self) -> &GemmaConfig {
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

impl GemmaForCausalLM {
    /// Its LM-head checkpoint facts (shared by the Llama family).
    fn head_facts(&self) -> crate::registry::EmbedTokensHead {
        crate::registry::EmbedTokensHead {
            tied: self.cfg.tie_word_embeddings,
            has_head: self.lm_head.is_some(),
        }
    }
}

impl CausalLm for GemmaForCausalLM {
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
        // HF's eager mask, one for every layer: the dtype's minimum on future keys and padding,
        // built only when something is padded.
        let bias = MaskSpec {
            key_mask: inputs.key_mask.as_ref(),
            batch: inputs.batch,
            new_len: inputs.new_len,
            past_len: inputs.past_len,
            future: min_value(kind),
            sliding_window: None,
        }
        .bias_beyond_causal(kind, device)?;

        let padding_idx = embedding_padding_idx(self.cfg.pad_token_id, self.cfg.vocab_size);
        let embedded = Tensor::f_embedding(&self.embed_tokens, &inputs.input_ids, padding_idx, false, false)?;
        let mut h = embedded.f_mul(&embedding_normalizer(self.cfg.hidden_size, kind, device)?)?;
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
}

/// Gemma's registry entry.
pub const ARCHITECTURE: Architecture = Architecture {
    model_type: "gemma",
    name: "Gemma",
    family: Family::Causal(build),
    // As for Llama and Mistral: the fused kernel is the faster on CPU.
    default_attention: AttnImplementation::Sdpa,
    tiny_config,
};

fn build(vs: nn::Path, config: &Value, options: &BuildOptions) -> Result<Box<dyn CausalLm>> {
    let mut cfg = GemmaConfig::from_json(config)?;
    cfg.attn_implementation = options
        .attn_implementation
        .unwrap_or_else(|| ARCHITECTURE.default_attention_on(vs.device()));
    Ok(Box::new(GemmaForCausalLM::with_head(
        vs,
        &cfg,
        !options.without_lm_head,
    )?))
}

fn tiny_config() -> Value {
    serde_json::json!({
        "model_type": "gemma", "architectures": ["GemmaForCausalLM"], "vocab_size": 50, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "max_position_embeddings": 64, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0
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

    fn config(extra: Value) -> Result<GemmaConfig> {
        let mut cfg = tiny_config();
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        GemmaConfig::from_json(&cfg)
    }

    fn run(model: &GemmaForCausalLM, ids: &Tensor, mask: Option<&Tensor>, past: Option<&Cache>) -> CausalLmOutput {
        let inputs = prepare_causal(ids, mask, None, past, model.limits(), Device::Cpu).unwrap();
        CausalLm::forward(model, &inputs, false, 0).unwrap()
    }

    #[test]
    fn config_defaults_follow_hf() {
        let cfg = GemmaConfig::from_json(&json!({"model_type": "gemma"})).unwrap();
        assert_eq!(
            (
                cfg.vocab_size,
                cfg.hidden_size,
                cfg.num_key_value_heads,
                cfg.head_dim,
                cfg.max_position_embeddings,
                cfg.tie_word_embeddings,
                cfg.hidden_act,
                cfg.pad_token_id
            ),
            (256000, 3072, 16, 256, 8192, true, Activation::GeluPytorchTanh, Some(0))
        );
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let bad = |extra: Value, what: &str| {
            let err = config(extra).expect_err(what);
            assert!(matches!(err, Error::Config(_)), "{what}: {err}");
        };
        bad(json!({"num_key_value_heads": 3}), "heads not a multiple of kv heads");
        bad(json!({"num_attention_heads": 0}), "no heads");
        bad(json!({"head_dim": null}), "null head_dim (HF fails on it)");
        bad(json!({"head_dim": 7}), "odd head_dim");
        bad(
            json!({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}),
            "unknown rope type",
        );
        bad(json!({"hidden_act": "nope"}), "unknown activation");
        bad(json!({"rms_norm_eps": -1.0}), "negative epsilon");
        bad(json!({"partial_rotary_factor": 0.5}), "partial rotary");
        bad(json!({"vocab_size": null}), "null vocabulary");
        bad(json!({"num_attention_heads": i64::MAX}), "overflowing projection width");
    }

    #[test]
    fn the_normalizer_is_rounded_to_the_dtype() {
        let bf16 = embedding_normalizer(3072, Kind::BFloat16, Device::Cpu).unwrap();
        assert_eq!(bf16.double_value(&[]), 55.5);
        let f16 = embedding_normalizer(3072, Kind::Half, Device::Cpu).unwrap();
        assert_eq!(f16.double_value(&[]), 55.4375);
        let f32 = embedding_normalizer(3072, Kind::Float, Device::Cpu).unwrap();
        assert!((f32.double_value(&[]) - 3072f64.sqrt()).abs() < 1e-5);
    }

    #[test]
    fn incremental_decoding_with_padding_matches_the_full_pass() {
        for implementation in [AttnImplementation::Eager, AttnImplementation::Sdpa] {
            let mut cfg = config(json!({"attention_bias": true})).unwrap();
            cfg.attn_implementation = implementation;
            let vs = VarStore::new(Device::Cpu);
            let model = GemmaForCausalLM::new(vs.root(), &cfg).unwrap();
            crate::test_util::randomize(&vs, 5, 0.3);
            let ids = Tensor::from_slice2(&[[0i64, 0, 5, 7, 9, 11, 3, 8], [2, 4, 6, 8, 10, 12, 14, 16]]);
            let mask = Tensor::from_slice2(&[[0i64, 0, 1, 1, 1, 1, 1, 1], [1; 8]]);
            let full = run(&model, &ids, Some(&mask), None);
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

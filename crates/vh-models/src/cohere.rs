//! Cohere (Command-R), as HF's `modeling_cohere.py`: a *parallel* decoder block (attention and
//! the gated MLP both read the one `input_layernorm` output and are added to the residual
//! together), mean-centred LayerNorms with a weight and no bias (computed in f32), optional
//! per-head LayerNorms on queries and keys (`use_qk_norm`, weights [heads, head_dim]), rotary
//! positions that rotate *adjacent* pairs of dimensions (HF's Cohere `rotate_half` and
//! `repeat_interleave` of the frequencies, unlike Llama's two halves) applied in f32, grouped-query
//! attention, an LM head tied to the embedding by default, and logits multiplied by
//! `logit_scale`. Parameters are named like HF's state dict (`model.layers.0.self_attn.q_norm.weight`).

use crate::activation::Activation;
use crate::attention::{AttentionSpec, AttnImplementation, ScoreOp, SoftmaxPrecision};
use crate::cache::{Cache, LayerCache};
use crate::inputs::{prepare_causal, CausalInputs, CausalLimits};
use crate::layers::{embedding_padding_idx, merge_heads, GatedMlp, Linear};
use crate::registry::{Architecture, BuildOptions, CausalLm, CausalLmOutput, EmbedTokensHead, Family};
use crate::rotary::{apply_rotary_interleaved, check_rotary_heads, RopeScaling, RotaryConfig, RotaryEmbedding};
use serde::Deserialize;
use serde_json::Value;
use tch::{nn, Kind, Tensor};
use vh_core::error::{check_epsilons, check_positive, check_probabilities, parse_config};
use vh_core::ops::ScalarOps;
use vh_core::tensor::min_value;
use vh_core::{Error, Result};

/// config.json of a `cohere` model, with `CohereConfig`'s defaults in transformers 4.57.
#[derive(Deserialize)]
struct CohereJson {
    #[serde(default = "defaults::vocab_size")]
    vocab_size: i64,
    #[serde(default = "defaults::hidden_size")]
    hidden_size: i64,
    #[serde(default = "defaults::intermediate_size")]
    intermediate_size: i64,
    #[serde(default = "defaults::logit_scale")]
    logit_scale: f64,
    #[serde(default = "defaults::layers")]
    num_hidden_layers: i64,
    #[serde(default = "defaults::heads")]
    num_attention_heads: i64,
    /// Absent or null: as many as the query heads (`CohereConfig`'s backward compatibility).
    #[serde(default)]
    num_key_value_heads: Option<i64>,
    /// Not in `CohereConfig`'s signature, but kept as an extra attribute that HF's attention and
    /// rotary embedding read; null is refused before parsing (HF fails on it).
    #[serde(default)]
    head_dim: Option<i64>,
    /// Also an extra attribute only: HF's rotary embedding reads it, its attention does not.
    #[serde(default)]
    partial_rotary_factor: Option<f64>,
    #[serde(default = "defaults::silu")]
    hidden_act: String,
    #[serde(default = "defaults::max_position_embeddings")]
    max_position_embeddings: i64,
    #[serde(default = "defaults::layer_norm_eps")]
    layer_norm_eps: f64,
    /// 0 when absent; null: no padding row.
    #[serde(default = "defaults::pad_token_id")]
    pad_token_id: Option<i64>,
    #[serde(default = "defaults::tie_word_embeddings")]
    tie_word_embeddings: bool,
    #[serde(default = "defaults::rope_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    attention_dropout: f64,
    #[serde(default)]
    use_qk_norm: bool,
}

mod defaults {
    pub fn vocab_size() -> i64 {
        256000
    }
    pub fn hidden_size() -> i64 {
        8192
    }
    pub fn intermediate_size() -> i64 {
        22528
    }
    pub fn logit_scale() -> f64 {
        0.0625
    }
    pub fn layers() -> i64 {
        40
    }
    pub fn heads() -> i64 {
        64
    }
    pub fn silu() -> String {
        "silu".to_string()
    }
    pub fn max_position_embeddings() -> i64 {
        8192
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
    pub fn pad_token_id() -> Option<i64> {
        Some(0)
    }
    pub fn tie_word_embeddings() -> bool {
        true
    }
    pub fn rope_theta() -> f64 {
        10000.0
    }
}

/// HF's `CohereConfig`: the fields that change the math, with HF's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct CohereConfig {
    /// How attention is computed (not part of config.json; HF's default is sdpa).
    pub attn_implementation: AttnImplementation,
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Hidden size.
    pub hidden_size: i64,
    /// MLP inner width.
    pub intermediate_size: i64,
    /// Multiplies the LM head's logits (HF's `logits * logit_scale`).
    pub logit_scale: f64,
    /// Decoder layers.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: i64,
    /// Width of each head (`hidden_size // num_attention_heads` unless config.json sets it).
    pub head_dim: i64,
    /// The MLP activation.
    pub hidden_act: Activation,
    /// The context length the rotary scaling refers to.
    pub max_position_embeddings: i64,
    /// Epsilon of every LayerNorm (the layers', the final one and the q/k norms).
    pub layer_norm_eps: f64,
    /// The padding token, HF's `padding_idx` of `embed_tokens`: its row gets no gradient.
    pub pad_token_id: Option<i64>,
    /// The LM head shares the embedding matrix (Cohere's default).
    pub tie_word_embeddings: bool,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling (none, linear, dynamic NTK or llama3).
    pub rope_scaling: RopeScaling,
    /// Biases on the q/k/v/o projections.
    pub attention_bias: bool,
    /// Dropout on attention probabilities (train mode).
    pub attention_dropout: f64,
    /// Per-head LayerNorms on queries and keys before the rotation.
    pub use_qk_norm: bool,
}

impl CohereConfig {
    /// Parses a config.json value and checks it.
    pub fn from_json(config: &Value) -> Result<Self> {
        if config.get("head_dim").is_some_and(Value::is_null) {
            // HF reads the attribute with `getattr(config, "head_dim", default)`, which keeps a
            // null, and then fails multiplying by None.
            return Err(Error::Config(
                "Cohere head_dim is null (transformers fails on it: leave it out for hidden_size // heads)".into(),
            ));
        }
        let raw: CohereJson = parse_config(config, "Cohere")?;
        check_positive(&[
            ("hidden_size", raw.hidden_size),
            ("num_attention_heads", raw.num_attention_heads),
        ])?;
        // HF's rotary embedding rotates `head_dim * partial_rotary_factor` dimensions while its
        // attention multiplies the whole head by cos/sin: any other factor than 1 fails to
        // broadcast there.
        if let Some(factor) = raw.partial_rotary_factor.filter(|f| *f != 1.0) {
            return Err(Error::Config(format!(
                "Cohere rotates whole heads: partial_rotary_factor must be 1, got {factor}"
            )));
        }
        // `CohereConfig` validates rope_scaling without renaming the legacy `type` key (Llama's
        // config does rename it): any dictionary without `rope_type` fails there.
        if let Some(scaling) = raw.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            if scaling.get("rope_type").is_none() {
                return Err(Error::Config(format!(
                    "Cohere rope_scaling needs a `rope_type` key (transformers refuses the legacy `type` alone), \
                     got {scaling}"
                )));
            }
        }
        let cfg = Self {
            attn_implementation: AttnImplementation::default(),
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            logit_scale: raw.logit_scale,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads),
            hidden_act: raw.hidden_act.parse()?,
            max_position_embeddings: raw.max_position_embeddings,
            layer_norm_eps: raw.layer_norm_eps,
            pad_token_id: raw.pad_token_id,
            tie_word_embeddings: raw.tie_word_embeddings,
            rope_theta: raw.rope_theta,
            rope_scaling: RopeScaling::from_json(raw.rope_scaling.as_ref())?,
            attention_bias: raw.attention_bias,
            attention_dropout: raw.attention_dropout,
            use_qk_norm: raw.use_qk_norm,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks sizes, heads, the rotary width, epsilons, probabilities and scales.
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
        check_epsilons(&[("layer_norm_eps", self.layer_norm_eps)])?;
        check_probabilities(&[("attention_dropout", self.attention_dropout)])?;
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return Err(Error::Config(format!(
                "rope_theta must be positive, got {}",
                self.rope_theta
            )));
        }
        if !self.logit_scale.is_finite() {
            return Err(Error::Config(format!(
                "logit_scale must be finite, got {}",
                self.logit_scale
            )));
        }
        if matches!(self.rope_scaling, RopeScaling::LongRope { .. }) {
            return Err(Error::Config(
                "Cohere supports linear, dynamic and llama3 rope scaling".into(),
            ));
        }
        Ok(())
    }

    /// Query heads per key/value head.
    pub fn groups(&self) -> i64 {
        self.num_attention_heads / self.num_key_value_heads
    }
}

/// HF's `CohereLayerNorm`: mean-centred normalisation over the last dimension in f32, scaled by a
/// weight (no bias) and cast back to the input's kind. The weight may span more than the last
/// dimension ([heads, head_dim] for the q/k norms) and broadcasts over the leading ones.
#[derive(Debug)]
struct CohereLayerNorm {
    weight: Tensor,
    eps: f64,
}

impl CohereLayerNorm {
    fn new(vs: nn::Path, shape: &[i64], eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vh_core::param::var(&vs, "weight", shape, nn::Init::Const(1.0))?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // HF's own operations rather than torch's fused layer_norm, so the f32 results agree to
        // the bit: mean, mean of squared deviations (x * x, as pow(2)), rsqrt, then the weight.
        let h = x.f_to_kind(Kind::Float)?;
        let centred = h.f_sub(&h.f_mean_dim(-1, true, Kind::Float)?)?;
        let variance = centred.f_mul(&centred)?.f_mean_dim(-1, true, Kind::Float)?;
        let normed = centred.f_mul(&variance.s_add(self.eps)?.f_rsqrt()?)?;
        Ok(self
            .weight
            .f_to_kind(Kind::Float)?
            .f_mul(&normed)?
            .f_to_kind(x.kind())?)
    }
}

/// Grouped-query self-attention with optional q/k LayerNorms and interleaved rotary positions.
#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<CohereLayerNorm>,
    k_norm: Option<CohereLayerNorm>,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    dropout: f64,
    implementation: AttnImplementation,
}

impl Attention {
    fn new(vs: nn::Path, cfg: &CohereConfig) -> Result<Self> {
        let (h, d, bias) = (cfg.hidden_size, cfg.head_dim, cfg.attention_bias);
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (q_norm, k_norm) = if cfg.use_qk_norm {
            (
                Some(CohereLayerNorm::new(vs.sub("q_norm"), &[heads, d], cfg.layer_norm_eps)?),
                Some(CohereLayerNorm::new(
                    vs.sub("k_norm"),
                    &[kv_heads, d],
                    cfg.layer_norm_eps,
                )?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            q_proj: Linear::new(vs.sub("q_proj"), h, heads * d, bias)?,
            k_proj: Linear::new(vs.sub("k_proj"), h, kv_heads * d, bias)?,
            v_proj: Linear::new(vs.sub("v_proj"), h, kv_heads * d, bias)?,
            o_proj: Linear::new(vs.sub("o_proj"), heads * d, h, bias)?,
            q_norm,
            k_norm,
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

    /// [B, T, heads * head_dim] -> [B, heads, T, head_dim], normalised per head when `norm` is
    /// set (HF normalises before the transpose, over head_dim with a [heads, head_dim] weight),
    /// then rotated in f32 and cast back, as HF's Cohere `apply_rotary_pos_emb`.
    fn heads_of(
        &self,
        projected: &Tensor,
        heads: i64,
        norm: Option<&CohereLayerNorm>,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let (b, t) = (projected.size()[0], projected.size()[1]);
        let mut x = projected.f_view([b, t, heads, self.head_dim])?;
        if let Some(norm) = norm {
            x = norm.forward(&x)?;
        }
        let x = x.f_transpose(1, 2)?;
        let rotated = apply_rotary_interleaved(&x.f_to_kind(Kind::Float)?, cos, sin)?;
        Ok(rotated.f_to_kind(x.kind())?)
    }

    /// Attends from `x` [B, T, hidden] over cached and new positions; `cos`/`sin` [B, 1, T,
    /// head_dim] in f32 (HF's values in the model's kind, upcast); `bias` [B or 1, 1, T, S] is
    /// added to the scores (`None`: the causal rule alone). Returns the output and the grown
    /// cache (keys after normalisation and rotation).
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: Option<&Tensor>,
        past: Option<&LayerCache>,
        train: bool,
    ) -> Result<(Tensor, LayerCache)> {
        let q = self.heads_of(&self.q_proj.forward(x)?, self.heads, self.q_norm.as_ref(), cos, sin)?;
        let k = self.heads_of(&self.k_proj.forward(x)?, self.kv_heads, self.k_norm.as_ref(), cos, sin)?;
        let v = crate::layers::split_heads(&self.v_proj.forward(x)?, self.kv_heads, self.head_dim)?;
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

/// One parallel decoder layer: `x + attn(norm(x)) + mlp(norm(x))` with one shared norm.
#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: CohereLayerNorm,
    self_attn: Attention,
    mlp: GatedMlp,
}

impl DecoderLayer {
    fn new(vs: nn::Path, cfg: &CohereConfig) -> Result<Self> {
        Ok(Self {
            input_layernorm: CohereLayerNorm::new(vs.sub("input_layernorm"), &[cfg.hidden_size], cfg.layer_norm_eps)?,
            self_attn: Attention::new(vs.sub("self_attn"), cfg)?,
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
        let normed = self.input_layernorm.forward(x)?;
        let (attn, cache) = self.self_attn.forward(&normed, cos, sin, bias, past, train)?;
        let mlp = self.mlp.forward(&normed)?;
        // HF's order: (residual + attention) + MLP.
        Ok((x.f_add(&attn)?.f_add(&mlp)?, cache))
    }
}

/// A Cohere causal LM (`CohereForCausalLM`).
#[derive(Debug)]
pub struct CohereForCausalLM {
    /// `model.embed_tokens.weight` [vocab, hidden].
    pub embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: CohereLayerNorm,
    /// `lm_head.weight`; the embedding matrix when tied; `None` when built without an LM head.
    pub lm_head: Option<Tensor>,
    rotary: RotaryEmbedding,
    cfg: CohereConfig,
}

impl CohereForCausalLM {
    /// Creates `model.*` and, unless tied, `lm_head.weight` under `vs`.
    pub fn new(vs: nn::Path, cfg: &CohereConfig) -> Result<Self> {
        Self::with_head(vs, cfg, true)
    }

    /// [`CohereForCausalLM::new`], with or without the LM head (`model.*` alone, for a backbone
    /// under another head).
    pub fn with_head(vs: nn::Path, cfg: &CohereConfig, lm_head: bool) -> Result<Self> {
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
        let norm = CohereLayerNorm::new(model.sub("norm"), &[cfg.hidden_size], cfg.layer_norm_eps)?;
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
    pub fn config(&self) -> &CohereConfig {
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

    /// Runs the model over `input_ids` [B, T] after the cached positions; `attention_mask`
    /// [B, past + T] and `position_ids` as in [`crate::inputs::prepare_causal`].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        past: Option<&Cache>,
        train: bool,
    ) -> Result<CausalLmOutput> {
        let device = self.embed_tokens.device();
        let inputs = prepare_causal(input_ids, attention_mask, position_ids, past, self.limits(), device)?;
        CausalLm::forward(self, &inputs, train, 0)
    }

    /// Its LM-head checkpoint facts (shared by the Llama family).
    fn head_facts(&self) -> EmbedTokensHead {
        EmbedTokensHead {
            tied: self.cfg.tie_word_embeddings,
            has_head: self.lm_head.is_some(),
        }
    }
}

impl CausalLm for CohereForCausalLM {
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
        // HF casts cos/sin to the model's kind and its attention upcasts them with q and k: the
        // same rounding here, then f32 for the rotation.
        let (cos, sin) = self
            .rotary
            .cos_sin_interleaved(&inputs.position_ids, inputs.max_position, kind)?;
        let cos = cos.f_to_kind(Kind::Float)?.f_unsqueeze(1)?;
        let sin = sin.f_to_kind(Kind::Float)?.f_unsqueeze(1)?;
        // HF's eager mask: the dtype's minimum wherever a key is in the future or padding.
        let bias = inputs.attention_bias(kind, device, min_value(kind))?;

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

    /// The logits times `logit_scale`, in the model's kind, as HF's `CohereForCausalLM`.
    fn finish_logits(&self, logits: Tensor) -> Result<Tensor> {
        logits.s_mul(self.cfg.logit_scale)
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

    fn supports_static_decode(&self) -> bool {
        !self.cfg.rope_scaling.reads_positions()
    }
}

/// Cohere's registry entry (Command-R checkpoints).
pub const ARCHITECTURE: Architecture = Architecture {
    model_type: "cohere",
    name: "Cohere",
    family: Family::Causal(build),
    // As for Llama: the fused kernel, with grouped key/value heads, is the faster on CPU.
    default_attention: AttnImplementation::Sdpa,
    tiny_config,
};

fn build(vs: nn::Path, config: &Value, options: &BuildOptions) -> Result<Box<dyn CausalLm>> {
    let mut cfg = CohereConfig::from_json(config)?;
    cfg.attn_implementation = options
        .attn_implementation
        .unwrap_or_else(|| ARCHITECTURE.default_attention_on(vs.device()));
    Ok(Box::new(CohereForCausalLM::with_head(
        vs,
        &cfg,
        !options.without_lm_head,
    )?))
}

/// Tied (Cohere's default), q/k norms on, grouped key/value heads.
fn tiny_config() -> Value {
    serde_json::json!({
        "model_type": "cohere", "architectures": ["CohereForCausalLM"], "vocab_size": 50, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "use_qk_norm": true, "logit_scale": 0.5,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tch::nn::VarStore;
    use tch::Device;

    fn config(extra: Value) -> Result<CohereConfig> {
        let mut cfg = tiny_config();
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        CohereConfig::from_json(&cfg)
    }

    fn random_model(cfg: &CohereConfig) -> (VarStore, CohereForCausalLM) {
        let vs = VarStore::new(Device::Cpu);
        let model = CohereForCausalLM::new(vs.root(), cfg).unwrap();
        crate::test_util::randomize(&vs, 5, 0.3);
        (vs, model)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn config_defaults_follow_hf() {
        let cfg = CohereConfig::from_json(&json!({"model_type": "cohere"})).unwrap();
        assert_eq!(
            (
                cfg.vocab_size,
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_hidden_layers,
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim,
                cfg.max_position_embeddings,
                cfg.pad_token_id,
            ),
            (256000, 8192, 22528, 40, 64, 64, 128, 8192, Some(0))
        );
        assert_eq!(cfg.logit_scale, 0.0625);
        assert_eq!(cfg.layer_norm_eps, 1e-5);
        assert_eq!(cfg.hidden_act, Activation::Silu);
        assert!(cfg.tie_word_embeddings && !cfg.use_qk_norm && !cfg.attention_bias);
        assert_eq!(cfg.rope_scaling, RopeScaling::Default);
        let kv_null = config(json!({"num_key_value_heads": null})).unwrap();
        assert_eq!(kv_null.num_key_value_heads, 4);
        assert_eq!(config(json!({"head_dim": 6})).unwrap().head_dim, 6);
        assert_eq!(
            config(json!({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}))
                .unwrap()
                .rope_scaling,
            RopeScaling::Dynamic { factor: 2.0 }
        );
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let bad = |extra: Value, what: &str| {
            let err = config(extra).expect_err(what);
            assert!(matches!(err, Error::Config(_)), "{what}: {err}");
        };
        bad(
            json!({"num_attention_heads": 6, "num_key_value_heads": 4}),
            "kv heads do not divide",
        );
        bad(json!({"num_attention_heads": 0}), "no heads");
        bad(json!({"hidden_size": 12, "num_attention_heads": 4}), "odd head_dim 3");
        bad(json!({"head_dim": null}), "null head_dim");
        bad(json!({"head_dim": 1i64 << 62}), "overflowing projections");
        bad(json!({"partial_rotary_factor": 0.5}), "partial rotary");
        bad(
            json!({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}),
            "unknown rope type",
        );
        bad(
            json!({"rope_scaling": {"rope_type": "linear"}}),
            "linear without a factor",
        );
        bad(
            json!({"rope_scaling": {"type": "linear", "factor": 2.0}}),
            "legacy type without rope_type",
        );
        bad(json!({"hidden_act": "nope"}), "unknown activation");
        bad(json!({"logit_scale": null}), "null logit scale");
        bad(json!({"logit_scale": "big"}), "logit scale not a number");
        bad(json!({"layer_norm_eps": -1.0}), "negative epsilon");
        bad(json!({"attention_dropout": 1.5}), "dropout above 1");
        bad(json!({"rope_theta": 0.0}), "zero base");
        bad(json!({"vocab_size": -3}), "negative vocabulary");
    }

    #[test]
    fn a_width_the_heads_do_not_divide_runs_as_in_hf() {
        // HF takes head_dim = hidden // heads and builds 34 -> 32 projections (and runs them):
        // not an error there, so not here either.
        let cfg = config(json!({"hidden_size": 34})).unwrap();
        assert_eq!(cfg.head_dim, 8);
        let (vs, model) = random_model(&cfg);
        assert_eq!(
            vs.variables()["model.layers.0.self_attn.q_proj.weight"].size(),
            vec![32, 34]
        );
        assert_eq!(
            vs.variables()["model.layers.0.self_attn.o_proj.weight"].size(),
            vec![34, 32]
        );
        let out = model
            .forward(&Tensor::from_slice2(&[[1i64, 2, 3]]), None, None, None, false)
            .unwrap();
        assert_eq!(out.logits.size(), vec![1, 3, 50]);
    }

    #[test]
    fn parameters_are_named_and_shaped_as_hf() {
        let cfg = config(json!({"tie_word_embeddings": false, "attention_bias": true})).unwrap();
        let (vs, _model) = random_model(&cfg);
        let vars = vs.variables();
        let shape = |name: &str| vars.get(name).unwrap_or_else(|| panic!("no {name}")).size();
        assert_eq!(shape("model.layers.0.self_attn.q_norm.weight"), vec![4, 4]);
        assert_eq!(shape("model.layers.1.self_attn.k_norm.weight"), vec![2, 4]);
        assert_eq!(shape("model.layers.0.self_attn.o_proj.bias"), vec![16]);
        assert_eq!(shape("model.layers.0.input_layernorm.weight"), vec![16]);
        assert_eq!(shape("model.norm.weight"), vec![16]);
        assert_eq!(shape("lm_head.weight"), vec![50, 16]);
        assert!(!vars
            .keys()
            .any(|k| k.contains("post_attention_layernorm") || k.ends_with("norm.bias")));
        let plain = config(json!({"use_qk_norm": false})).unwrap();
        let (vs, _model) = random_model(&plain);
        assert!(!vs
            .variables()
            .keys()
            .any(|k| k.contains("q_norm") || k.contains("lm_head")));
    }

    #[test]
    fn interleaved_rotation_pairs_adjacent_dimensions() {
        // A head of width 4 at position 1 with base 1: frequencies 1 and 1^(-1/2) = 1, so both
        // pairs turn by one radian; (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin).
        let rotary = RotaryEmbedding::new(
            &RotaryConfig {
                head_dim: 4,
                rope_theta: 1.0,
                rope_scaling: RopeScaling::Default,
                max_position_embeddings: 8,
            },
            Device::Cpu,
        )
        .unwrap();
        let (cos, sin) = rotary
            .cos_sin_interleaved(&Tensor::from_slice2(&[[1i64]]), 1, Kind::Float)
            .unwrap();
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([1, 1, 1, 4]);
        let out = apply_rotary_interleaved(&x, &cos.unsqueeze(1), &sin.unsqueeze(1)).unwrap();
        let (c, s) = (1f64.cos(), 1f64.sin());
        let want = [c - 2.0 * s, 2.0 * c + s, 3.0 * c - 4.0 * s, 4.0 * c + 3.0 * s];
        for (i, w) in want.iter().enumerate() {
            assert!((out.double_value(&[0, 0, 0, i as i64]) - w).abs() < 1e-6, "dim {i}");
        }
    }

    #[test]
    fn incremental_decoding_and_left_padding_match_full_forward() {
        for extra in [
            json!({}),
            json!({"use_qk_norm": false, "num_key_value_heads": 4, "attention_bias": true}),
        ] {
            let cfg = config(extra).unwrap();
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
                let diff = max_diff(&step.logits.squeeze_dim(1), &full.logits.select(1, t));
                assert!(diff < 1e-5, "step {t}: {diff}");
                cache = step.cache;
            }
            let padded = Tensor::from_slice2(&[[0i64, 0, 1, 5, 7]]);
            let mask = Tensor::from_slice2(&[[0i64, 0, 1, 1, 1]]);
            let out = model.forward(&padded, Some(&mask), None, None, false).unwrap();
            let plain = model
                .forward(&ids.narrow(1, 0, 3).narrow(0, 0, 1), None, None, None, false)
                .unwrap();
            // Left padding shifts the default positions by 2: compare with the same positions.
            let positions = Tensor::from_slice2(&[[2i64, 3, 4]]);
            let shifted = model
                .forward(
                    &ids.narrow(1, 0, 3).narrow(0, 0, 1),
                    None,
                    Some(&positions),
                    None,
                    false,
                )
                .unwrap();
            assert!(max_diff(&out.logits.narrow(1, 2, 3), &shifted.logits) < 1e-5);
            // Rotary attention depends on relative positions only.
            assert!(max_diff(&shifted.logits, &plain.logits) < 1e-4);
        }
    }

    #[test]
    fn logit_scale_multiplies_the_logits() {
        for scale in [0.5, 1.0, -2.5] {
            let (_vs, model) = random_model(&config(json!({"logit_scale": scale})).unwrap());
            let ids = Tensor::from_slice2(&[[1i64, 5, 7]]);
            let out = model.forward(&ids, None, None, None, false).unwrap();
            let head = model.lm_head.as_ref().unwrap();
            let expected = out.last_hidden_state.matmul(&head.tr()) * scale;
            assert!(max_diff(&out.logits, &expected) < 1e-5, "scale {scale}");
        }
    }

    #[test]
    fn bf16_runs_close_to_f32() {
        let cfg = config(json!({})).unwrap();
        let (mut vs, model) = random_model(&cfg);
        let ids = Tensor::from_slice2(&[[1i64, 5, 7, 9]]);
        let f32 = model.forward(&ids, None, None, None, false).unwrap().logits;
        vs.bfloat16();
        let bf16 = model.forward(&ids, None, None, None, false).unwrap().logits;
        assert_eq!(bf16.kind(), Kind::BFloat16);
        let scale = f32.abs().max().double_value(&[]);
        assert!(max_diff(&bf16.to_kind(Kind::Float), &f32) < 0.05 * scale.max(1.0));
    }
}

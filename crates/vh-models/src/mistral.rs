//! Mistral, as HF's `modeling_mistral.py`: Llama's layers (RMS norms, rotary positions,
//! grouped-query attention, gated SiLU MLP, no biases) with sliding-window attention: each query
//! sees itself and the `sliding_window - 1` positions before it (cache indices, padding
//! included, as HF's `sliding_window_causal_mask_function`). Parameters are named like HF's
//! state dict (`model.layers.0.self_attn.q_proj.weight`, ...).
//!
//! HF's cache keeps only the last `sliding_window - 1` positions of each layer; ours keeps them
//! all and hides the older ones with the mask, which gives the same attention.

use crate::activation::Activation;
use crate::attention::{check_sliding_window, AttentionSpec, AttnImplementation, MaskSpec, ScoreOp, SoftmaxPrecision};
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

/// config.json of a `mistral` model, with `MistralConfig`'s defaults in transformers 4.57.
#[derive(Deserialize)]
struct MistralJson {
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
    /// 8 when absent; null means as many as the query heads.
    #[serde(default = "defaults::kv_heads")]
    num_key_value_heads: Option<i64>,
    /// Null or 0 means hidden_size / num_attention_heads (HF's `head_dim or hidden // heads`).
    #[serde(default)]
    head_dim: Option<i64>,
    #[serde(default = "defaults::silu")]
    hidden_act: String,
    #[serde(default = "defaults::max_position_embeddings")]
    max_position_embeddings: i64,
    #[serde(default = "defaults::rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default = "defaults::rope_theta")]
    rope_theta: f64,
    /// Not in `MistralConfig`'s signature, but HF keeps it as an extra attribute and its rotary
    /// embedding reads it.
    #[serde(default)]
    rope_scaling: Option<Value>,
    /// Read by HF's rotary initialisation when present; only 1 (rotate every dimension) is
    /// supported.
    #[serde(default)]
    partial_rotary_factor: Option<f64>,
    /// 4096 when absent; null means full attention.
    #[serde(default = "defaults::sliding_window")]
    sliding_window: Option<i64>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_dropout: f64,
    #[serde(default)]
    pad_token_id: Option<i64>,
}

mod defaults {
    pub fn vocab_size() -> i64 {
        32000
    }
    pub fn hidden_size() -> i64 {
        4096
    }
    pub fn intermediate_size() -> i64 {
        14336
    }
    pub fn layers() -> i64 {
        32
    }
    pub fn heads() -> i64 {
        32
    }
    pub fn kv_heads() -> Option<i64> {
        Some(8)
    }
    pub fn silu() -> String {
        "silu".to_string()
    }
    pub fn max_position_embeddings() -> i64 {
        4096 * 32
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn rope_theta() -> f64 {
        10000.0
    }
    pub fn sliding_window() -> Option<i64> {
        Some(4096)
    }
}

/// HF's `MistralConfig`: the fields that change the math, with HF's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct MistralConfig {
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
    /// How many positions a query sees, itself included; `None` for full causal attention.
    pub sliding_window: Option<i64>,
    /// The LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Dropout on attention probabilities (train mode).
    pub attention_dropout: f64,
    /// The padding token, HF's `padding_idx` of `embed_tokens`: its row gets no gradient.
    pub pad_token_id: Option<i64>,
}

impl MistralConfig {
    /// Parses a config.json value and checks it.
    pub fn from_json(config: &Value) -> Result<Self> {
        let raw: MistralJson = parse_config(config, "Mistral")?;
        if let Some(factor) = raw.partial_rotary_factor.filter(|f| *f != 1.0) {
            return Err(Error::Config(format!(
                "partial_rotary_factor {factor} is not supported (only 1.0)"
            )));
        }
        let rope_scaling = RopeScaling::from_json(raw.rope_scaling.as_ref())?;
        if matches!(rope_scaling, RopeScaling::Dynamic { .. }) && raw.head_dim.is_none_or(|d| d == 0) {
            // HF's dynamic-NTK initialisation reads `head_dim` without the fallback the other
            // rope types use, so transformers 4.57.6 cannot build this model: nothing to match.
            return Err(Error::Config(
                "Mistral with dynamic rope scaling needs an explicit head_dim (transformers fails without one)".into(),
            ));
        }
        let head_dim = match raw.head_dim.filter(|d| *d != 0) {
            Some(d) => d,
            None => {
                check_positive(&[
                    ("hidden_size", raw.hidden_size),
                    ("num_attention_heads", raw.num_attention_heads),
                ])?;
                raw.hidden_size / raw.num_attention_heads
            }
        };
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
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta,
            rope_scaling,
            sliding_window: raw.sliding_window,
            tie_word_embeddings: raw.tie_word_embeddings,
            attention_dropout: raw.attention_dropout,
            pad_token_id: raw.pad_token_id,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks sizes, names and the window.
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
        check_sliding_window(self.sliding_window)?;
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
}

/// Grouped-query self-attention with rotary positions and no biases.
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
    fn new(vs: nn::Path, cfg: &MistralConfig) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: Linear::new(vs.sub("q_proj"), h, heads * d, false)?,
            k_proj: Linear::new(vs.sub("k_proj"), h, kv_heads * d, false)?,
            v_proj: Linear::new(vs.sub("v_proj"), h, kv_heads * d, false)?,
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

/// One decoder layer: pre-norm attention and MLP with residuals.
#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: GatedMlp,
}

impl DecoderLayer {
    fn new(vs: nn::Path, cfg: &MistralConfig) -> Result<Self> {
        let norm = |name: &str| RmsNorm::new(vs.sub(name), cfg.hidden_size, cfg.rms_norm_eps, RmsNormStyle::Llama);
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::new(vs.sub("self_attn"), cfg)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: GatedMlp::new(
                vs.sub("mlp"),
                cfg.hidden_size,
                cfg.intermediate_size,
                false,
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

/// HF's `MistralForCausalLM`.
#[derive(Debug)]
pub struct MistralForCausalLM {
    /// `model.embed_tokens.weight` [vocab, hidden].
    pub embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `lm_head.weight`; the embedding matrix when tied; `None` when built without an LM head.
    pub lm_head: Option<Tensor>,
    rotary: RotaryEmbedding,
    cfg: MistralConfig,
}

impl MistralForCausalLM {
    /// Creates `model.*` and, unless tied, `lm_head.weight` under `vs`.
    pub fn new(vs: nn::Path, cfg: &MistralConfig) -> Result<Self> {
        Self::with_head(vs, cfg, true)
    }

    /// [`MistralForCausalLM::new`], with or without the LM head (`model.*` alone, for a backbone under
    /// another head).
    pub fn with_head(vs: nn::Path, cfg: &MistralConfig, lm_head: bool) -> Result<Self> {
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

    /// The configuration.
    pub fn config(&self) -> &MistralConfig {
        &self.cfg
    }
}

impl MistralForCausalLM {
    /// Its LM-head checkpoint facts (shared by the Llama family).
    fn head_facts(&self) -> crate::registry::EmbedTokensHead {
        crate::registry::EmbedTokensHead {
            tied: self.cfg.tie_word_embeddings,
            has_head: self.lm_head.is_some(),
        }
    }
}

impl CausalLm for MistralForCausalLM {
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
        // HF's eager mask, one for every layer: the dtype's minimum on future keys, keys the
        // window left behind and padding. Built whenever it hides more than the causal rule
        // (padding, or a window shorter than the keys: HF masks then even without padding).
        let bias = MaskSpec {
            key_mask: inputs.key_mask.as_ref(),
            batch: inputs.batch,
            new_len: inputs.new_len,
            past_len: inputs.past_len,
            future: min_value(kind),
            sliding_window: self.cfg.sliding_window,
        }
        .bias_beyond_causal(kind, device)?;

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
}

impl MistralForCausalLM {
    /// What the inputs of a pass are checked against.
    pub fn limits(&self) -> CausalLimits {
        CausalLimits {
            vocab_size: self.cfg.vocab_size,
            num_layers: self.layers.len(),
            max_positions: None,
        }
    }
}

/// Mistral's registry entry.
pub const ARCHITECTURE: Architecture = Architecture {
    model_type: "mistral",
    name: "Mistral",
    family: Family::Causal(build),
    // As for Llama: the fused kernel, with grouped key/value heads, is the faster on CPU.
    default_attention: AttnImplementation::Sdpa,
    tiny_config,
};

fn build(vs: nn::Path, config: &Value, options: &BuildOptions) -> Result<Box<dyn CausalLm>> {
    let mut cfg = MistralConfig::from_json(config)?;
    cfg.attn_implementation = options
        .attn_implementation
        .unwrap_or_else(|| ARCHITECTURE.default_attention_on(vs.device()));
    Ok(Box::new(MistralForCausalLM::with_head(
        vs,
        &cfg,
        !options.without_lm_head,
    )?))
}

fn tiny_config() -> Value {
    serde_json::json!({
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "vocab_size": 50, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "sliding_window": 4, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0
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

    fn config(extra: Value) -> Result<MistralConfig> {
        let mut cfg = tiny_config();
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        MistralConfig::from_json(&cfg)
    }

    fn random_model(cfg: &MistralConfig) -> (VarStore, MistralForCausalLM) {
        let vs = VarStore::new(Device::Cpu);
        let model = MistralForCausalLM::new(vs.root(), cfg).unwrap();
        crate::test_util::randomize(&vs, 5, 0.3);
        (vs, model)
    }

    fn run(
        model: &MistralForCausalLM,
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

    #[test]
    fn config_defaults_follow_hf() {
        let cfg = MistralConfig::from_json(&json!({"model_type": "mistral"})).unwrap();
        assert_eq!(
            (
                cfg.vocab_size,
                cfg.intermediate_size,
                cfg.num_key_value_heads,
                cfg.head_dim,
                cfg.max_position_embeddings,
                cfg.sliding_window,
                cfg.tie_word_embeddings
            ),
            (32000, 14336, 8, 128, 131072, Some(4096), false)
        );
        assert_eq!(config(json!({"sliding_window": null})).unwrap().sliding_window, None);
        assert_eq!(
            config(json!({"num_key_value_heads": null}))
                .unwrap()
                .num_key_value_heads,
            4
        );
        // HF's `head_dim or hidden // heads`: null and 0 both fall back.
        assert_eq!(config(json!({"head_dim": 0})).unwrap().head_dim, 4);
        assert_eq!(config(json!({"head_dim": 6})).unwrap().head_dim, 6);
        assert_eq!(
            config(json!({"rope_scaling": {"type": "linear", "factor": 2.0}}))
                .unwrap()
                .rope_scaling,
            RopeScaling::Linear { factor: 2.0 }
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
        bad(json!({"hidden_size": -16}), "negative width");
        bad(json!({"sliding_window": -4}), "negative window");
        bad(json!({"sliding_window": 0}), "zero window");
        bad(json!({"sliding_window": "four"}), "window of the wrong type");
        bad(
            json!({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}),
            "unknown rope type",
        );
        bad(json!({"rope_scaling": {"type": "linear"}}), "scaling without factor");
        bad(json!({"hidden_act": "nope"}), "unknown activation");
        bad(json!({"head_dim": 7}), "odd head_dim");
        bad(json!({"rms_norm_eps": -1.0}), "negative epsilon");
        bad(json!({"attention_dropout": 2.0}), "dropout above 1");
        bad(json!({"partial_rotary_factor": 0.5}), "partial rotary");
        bad(json!({"vocab_size": null}), "null vocabulary");
        bad(
            json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}}),
            "dynamic scaling without head_dim",
        );
        assert!(config(json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}, "head_dim": 4})).is_ok());
        assert!(config(json!({"partial_rotary_factor": 1.0})).is_ok());
    }

    #[test]
    fn the_window_hides_old_keys_without_padding() {
        let ids = Tensor::from_slice2(&[[1i64, 5, 7, 9, 11, 3, 8, 13, 4, 6]]);
        let windowed = config(json!({"sliding_window": 3})).unwrap();
        let (_vs, model) = random_model(&windowed);
        let out = run(&model, &ids, None, None, None);
        // A window shorter than the sequence: the last logits depend only on the last 3 tokens
        // (and their positions), so changing the first token changes nothing there.
        let other = Tensor::from_slice2(&[[17i64, 5, 7, 9, 11, 3, 8, 13, 4, 6]]);
        let out2 = run(&model, &other, None, None, None);
        let last = |o: &CausalLmOutput| o.logits.narrow(1, 5, 5);
        // Through two layers the window reaches 2 * (3 - 1) positions back: positions >= 5 are
        // out of the first token's reach.
        assert!(max_diff(&last(&out), &last(&out2)) < 1e-6);
        assert!(max_diff(&out.logits.narrow(1, 0, 3), &out2.logits.narrow(1, 0, 3)) > 1e-3);
        // Without the window the first token reaches every position.
        let full = config(json!({"sliding_window": null})).unwrap();
        let (_vs2, model_full) = random_model(&full);
        let a = run(&model_full, &ids, None, None, None);
        let b = run(&model_full, &other, None, None, None);
        assert!(max_diff(&a.logits.narrow(1, 9, 1), &b.logits.narrow(1, 9, 1)) > 1e-3);
    }

    #[test]
    fn incremental_decoding_past_the_window_and_padding_match_the_full_pass() {
        for implementation in [AttnImplementation::Eager, AttnImplementation::Sdpa] {
            let mut cfg = config(json!({"sliding_window": 4})).unwrap();
            cfg.attn_implementation = implementation;
            let (_vs, model) = random_model(&cfg);
            let ids = Tensor::from_slice2(&[
                [0i64, 0, 0, 5, 7, 9, 11, 3, 8, 13, 4, 6],
                [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24],
            ]);
            let mask = Tensor::from_slice2(&[[0i64, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1; 12]]);
            let full = run(&model, &ids, Some(&mask), None, None);
            let mut past = run(&model, &ids.narrow(1, 0, 3), Some(&mask.narrow(1, 0, 3)), None, None).cache;
            for t in 3..12 {
                let step = run(
                    &model,
                    &ids.narrow(1, t, 1),
                    Some(&mask.narrow(1, 0, t + 1)),
                    None,
                    Some(&past),
                );
                let d = max_diff(&step.logits.squeeze_dim(1), &full.logits.select(1, t));
                assert!(d < 1e-5, "{implementation:?} step {t}: {d}");
                past = step.cache;
            }
            // Unpadded, without a mask: the same numbers through a cache past the window.
            let row = ids.narrow(0, 1, 1);
            let whole = run(&model, &row, None, None, None);
            let mut past = run(&model, &row.narrow(1, 0, 5), None, None, None).cache;
            for t in 5..12 {
                let step = run(&model, &row.narrow(1, t, 1), None, None, Some(&past));
                let d = max_diff(&step.logits.squeeze_dim(1), &whole.logits.select(1, t));
                assert!(d < 1e-5, "{implementation:?} unpadded step {t}: {d}");
                past = step.cache;
            }
            // A left-padded row with mask-derived positions equals the row unpadded: the window
            // counts cache slots, padding included (as HF's), but left padding only shifts them.
            let positions = vh_core::tensor::position_ids_from_attention_mask(&mask, 12).unwrap();
            let padded = run(&model, &ids, Some(&mask), Some(&positions), None);
            let plain = run(&model, &ids.narrow(0, 0, 1).narrow(1, 3, 9), None, None, None);
            let tail = max_diff(&padded.logits.narrow(0, 0, 1).narrow(1, 3, 9), &plain.logits);
            assert!(tail < 1e-5, "{implementation:?}: {tail}");
        }
    }
}

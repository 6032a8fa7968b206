//! Qwen3, as HF's `modeling_qwen3.py`: Llama-style layers whose queries and keys are
//! RMS-normalised per head (`q_norm`, `k_norm` over `head_dim`, before the rotation), an explicit
//! `head_dim`, optional biases on all four attention projections, and optional sliding-window
//! layers (`use_sliding_window`, `max_window_layers`, `layer_types`). Parameters are named like
//! HF's state dict (`model.layers.0.self_attn.q_norm.weight`, ...).

use crate::activation::Activation;
use crate::attention::{
    check_sliding_window, layer_windows, AttentionSpec, AttnImplementation, MaskSpec, ScoreOp, SoftmaxPrecision,
};
use crate::cache::{Cache, LayerCache};
use crate::inputs::{CausalInputs, CausalLimits};
use crate::layers::{embedding_padding_idx, merge_heads, GatedMlp, Linear, RmsNorm, RmsNormStyle};
use crate::registry::{Architecture, BuildOptions, CausalLm, Family};
use crate::rotary::{apply_rotary, check_rotary_heads, RopeScaling, RotaryConfig, RotaryEmbedding};
use serde::Deserialize;
use serde_json::Value;
use tch::{nn, Kind, Tensor};
use vh_core::error::{check_epsilons, check_positive, check_probabilities, parse_config};
use vh_core::tensor::min_value;
use vh_core::{Error, Result};

/// config.json of a `qwen3` model, with `Qwen3Config`'s defaults in transformers 4.57.
#[derive(Deserialize)]
struct Qwen3Json {
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
    /// 32 when absent; null means as many as the query heads.
    #[serde(default = "defaults::heads_opt")]
    num_key_value_heads: Option<i64>,
    /// 128 when absent, whatever the hidden size; null is an error (HF fails on it too).
    #[serde(default = "defaults::head_dim")]
    head_dim: Option<i64>,
    #[serde(default = "defaults::silu")]
    hidden_act: String,
    #[serde(default = "defaults::max_position_embeddings")]
    max_position_embeddings: i64,
    #[serde(default = "defaults::rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default = "defaults::rope_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<Value>,
    /// Read by HF's rotary initialisation when present; only 1 is supported.
    #[serde(default)]
    partial_rotary_factor: Option<f64>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    use_sliding_window: bool,
    /// 4096 when absent; only used when `use_sliding_window` is set (HF drops it otherwise).
    #[serde(default = "defaults::sliding_window")]
    sliding_window: Option<i64>,
    #[serde(default = "defaults::max_window_layers")]
    max_window_layers: i64,
    /// Per-layer attention types; derived from the two fields above when absent.
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_dropout: f64,
    #[serde(default)]
    pad_token_id: Option<i64>,
}

mod defaults {
    pub fn vocab_size() -> i64 {
        151936
    }
    pub fn hidden_size() -> i64 {
        4096
    }
    pub fn intermediate_size() -> i64 {
        22016
    }
    pub fn layers() -> i64 {
        32
    }
    pub fn heads() -> i64 {
        32
    }
    pub fn heads_opt() -> Option<i64> {
        Some(32)
    }
    pub fn head_dim() -> Option<i64> {
        Some(128)
    }
    pub fn silu() -> String {
        "silu".to_string()
    }
    pub fn max_position_embeddings() -> i64 {
        32768
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
    pub fn max_window_layers() -> i64 {
        28
    }
}

/// HF's `Qwen3Config`: the fields that change the math, with HF's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen3Config {
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
    /// Width of each head (independent of hidden_size).
    pub head_dim: i64,
    /// The MLP activation's name.
    pub hidden_act: String,
    /// The context length the rotary scaling refers to.
    pub max_position_embeddings: i64,
    /// RMS-norm epsilon (hidden states, and queries and keys per head).
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Biases on the q/k/v/o projections.
    pub attention_bias: bool,
    /// Each layer's sliding window (`None`: full causal attention), from `layer_types`.
    pub layer_windows: Vec<Option<i64>>,
    /// The LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Dropout on attention probabilities (train mode).
    pub attention_dropout: f64,
    /// The padding token, HF's `padding_idx` of `embed_tokens`: its row gets no gradient.
    pub pad_token_id: Option<i64>,
}

impl Qwen3Config {
    /// Parses a config.json value and checks it.
    pub fn from_json(config: &Value) -> Result<Self> {
        let raw: Qwen3Json = parse_config(config, "Qwen3")?;
        if let Some(factor) = raw.partial_rotary_factor.filter(|f| *f != 1.0) {
            return Err(Error::Config(format!(
                "partial_rotary_factor {factor} is not supported (only 1.0)"
            )));
        }
        let head_dim = raw
            .head_dim
            .ok_or_else(|| Error::Config("Qwen3 config.json: head_dim must be a number, got null".into()))?;
        check_positive(&[("num_hidden_layers", raw.num_hidden_layers)])?;
        // HF keeps the window only when it is switched on.
        let sliding_window = raw.sliding_window.filter(|_| raw.use_sliding_window);
        check_sliding_window(sliding_window)?;
        let layer_windows = layer_windows(
            raw.layer_types.as_deref(),
            sliding_window,
            raw.max_window_layers,
            raw.num_hidden_layers,
        )?;
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
            rope_scaling: RopeScaling::from_json(raw.rope_scaling.as_ref())?,
            attention_bias: raw.attention_bias,
            layer_windows,
            tie_word_embeddings: raw.tie_word_embeddings,
            attention_dropout: raw.attention_dropout,
            pad_token_id: raw.pad_token_id,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks sizes, names and windows.
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
        if self.layer_windows.len() as i64 != self.num_hidden_layers {
            return Err(Error::Config(format!(
                "{} layer windows for {} layers",
                self.layer_windows.len(),
                self.num_hidden_layers
            )));
        }
        for window in &self.layer_windows {
            check_sliding_window(*window)?;
        }
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

/// Grouped-query self-attention with per-head q/k RMS norms and rotary positions.
#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    dropout: f64,
    implementation: AttnImplementation,
}

impl Attention {
    fn new(vs: nn::Path, cfg: &Qwen3Config) -> Result<Self> {
        let (h, d, bias) = (cfg.hidden_size, cfg.head_dim, cfg.attention_bias);
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: Linear::new(vs.sub("q_proj"), h, heads * d, bias)?,
            k_proj: Linear::new(vs.sub("k_proj"), h, kv_heads * d, bias)?,
            v_proj: Linear::new(vs.sub("v_proj"), h, kv_heads * d, bias)?,
            o_proj: Linear::new(vs.sub("o_proj"), heads * d, h, bias)?,
            q_norm: RmsNorm::new(vs.sub("q_norm"), d, cfg.rms_norm_eps, RmsNormStyle::Llama)?,
            k_norm: RmsNorm::new(vs.sub("k_norm"), d, cfg.rms_norm_eps, RmsNormStyle::Llama)?,
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

    /// `proj(x)` [B, T, heads * D] as heads [B, heads, T, D], normalised per head first when
    /// `norm` is given (HF views, normalises, then transposes).
    fn heads_of(proj: &Linear, x: &Tensor, heads: i64, d: i64, norm: Option<&RmsNorm>) -> Result<Tensor> {
        let (b, t) = (x.size()[0], x.size()[1]);
        let mut h = proj.forward(x)?.f_view([b, t, heads, d])?;
        if let Some(norm) = norm {
            h = norm.forward(&h)?;
        }
        Ok(h.f_transpose(1, 2)?)
    }

    /// Attends from `x` [B, T, hidden] over cached and new positions with `bias` (padding and
    /// this layer's window; `None`: the causal rule alone); returns the output and the grown
    /// cache (keys normalised and rotated).
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
        let q = Self::heads_of(&self.q_proj, x, self.heads, d, Some(&self.q_norm))?;
        let k = Self::heads_of(&self.k_proj, x, self.kv_heads, d, Some(&self.k_norm))?;
        let v = Self::heads_of(&self.v_proj, x, self.kv_heads, d, None)?;
        let (q, k) = (apply_rotary(&q, cos, sin)?, apply_rotary(&k, cos, sin)?);
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
    fn new(vs: nn::Path, cfg: &Qwen3Config) -> Result<Self> {
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

/// HF's `Qwen3ForCausalLM`.
#[derive(Debug)]
pub struct Qwen3ForCausalLM {
    /// `model.embed_tokens.weight` [vocab, hidden].
    pub embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `lm_head.weight`; the embedding matrix when tied; `None` when built without an LM head.
    pub lm_head: Option<Tensor>,
    rotary: RotaryEmbedding,
    cfg: Qwen3Config,
}

impl Qwen3ForCausalLM {
    /// Creates `model.*` and, unless tied, `lm_head.weight` under `vs`.
    pub fn new(vs: nn::Path, cfg: &Qwen3Config) -> Result<Self> {
        Self::with_head(vs, cfg, true)
    }

    /// [`Qwen3ForCausalLM::new`], with or without the LM head (`model.*` alone, for a backbone under
    /// another head).
    pub fn with_head(vs: nn::Path, cfg: &Qwen3Config, lm_head: bool) -> Result<Self> {
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
    pub fn config(&self) -> &Qwen3Config {
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

impl Qwen3ForCausalLM {
    /// Its LM-head checkpoint facts (shared by the Llama family).
    fn head_facts(&self) -> crate::registry::EmbedTokensHead {
        crate::registry::EmbedTokensHead {
            tied: self.cfg.tie_word_embeddings,
            has_head: self.lm_head.is_some(),
        }
    }
}

impl CausalLm for Qwen3ForCausalLM {
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
        // HF builds one mask per kind of layer, shared by the layers of that kind: the full
        // causal one, and the sliding one when a layer slides. Each is built only when it hides
        // more than the causal rule.
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
        let mut h = Tensor::f_embedding(&self.embed_tokens, &inputs.input_ids, padding_idx, false, false)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let past = inputs.past.map(|p| &p.layers[i]);
            let bias = bias_of(self.cfg.layer_windows[i]);
            let (out, cache) = layer.forward(&h, &cos, &sin, bias, past, train)?;
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

/// Qwen3's registry entry (dense Qwen3 checkpoints).
pub const ARCHITECTURE: Architecture = Architecture {
    model_type: "qwen3",
    name: "Qwen3",
    family: Family::Causal(build),
    // As for Llama: the fused kernel, with grouped key/value heads, is the faster on CPU.
    default_attention: AttnImplementation::Sdpa,
    tiny_config,
};

fn build(vs: nn::Path, config: &Value, options: &BuildOptions) -> Result<Box<dyn CausalLm>> {
    let mut cfg = Qwen3Config::from_json(config)?;
    cfg.attn_implementation = options
        .attn_implementation
        .unwrap_or_else(|| ARCHITECTURE.default_attention_on(vs.device()));
    Ok(Box::new(Qwen3ForCausalLM::with_head(
        vs,
        &cfg,
        !options.without_lm_head,
    )?))
}

fn tiny_config() -> Value {
    serde_json::json!({
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 50, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "max_position_embeddings": 64, "tie_word_embeddings": true, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0
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

    fn config(extra: Value) -> Result<Qwen3Config> {
        let mut cfg = tiny_config();
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        Qwen3Config::from_json(&cfg)
    }

    fn random_model(cfg: &Qwen3Config) -> (VarStore, Qwen3ForCausalLM) {
        let vs = VarStore::new(Device::Cpu);
        let model = Qwen3ForCausalLM::new(vs.root(), cfg).unwrap();
        crate::test_util::randomize(&vs, 7, 0.3);
        (vs, model)
    }

    fn run(model: &Qwen3ForCausalLM, ids: &Tensor, mask: Option<&Tensor>, past: Option<&Cache>) -> CausalLmOutput {
        let inputs = prepare_causal(ids, mask, None, past, model.limits(), Device::Cpu).unwrap();
        CausalLm::forward(model, &inputs, false, 0).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn config_defaults_follow_hf() {
        let cfg = Qwen3Config::from_json(&json!({"model_type": "qwen3"})).unwrap();
        assert_eq!(
            (
                cfg.vocab_size,
                cfg.intermediate_size,
                cfg.num_key_value_heads,
                cfg.head_dim,
                cfg.max_position_embeddings,
                cfg.attention_bias,
                cfg.tie_word_embeddings
            ),
            (151936, 22016, 32, 128, 32768, false, false)
        );
        assert_eq!(cfg.layer_windows, vec![None; 32], "no window unless use_sliding_window");
        // head_dim is its own field: 128 whatever hidden_size / heads is.
        assert_eq!(config(json!({"head_dim": null})).map(|c| c.head_dim).ok(), None);
        let tiny =
            Qwen3Config::from_json(&json!({"hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 4}))
                .unwrap();
        assert_eq!(tiny.head_dim, 128);
        // use_sliding_window with HF's layer rule: layers from max_window_layers on slide.
        let sliding = config(json!({"use_sliding_window": true, "sliding_window": 3, "max_window_layers": 1})).unwrap();
        assert_eq!(sliding.layer_windows, vec![None, Some(3)]);
        // Explicit layer_types win over max_window_layers (as a saved config.json has them).
        let typed = config(
            json!({"use_sliding_window": true, "sliding_window": 3, "max_window_layers": 1,
                                  "layer_types": ["sliding_attention", "full_attention"]}),
        )
        .unwrap();
        assert_eq!(typed.layer_windows, vec![Some(3), None]);
        // A window that is not switched on is dropped, as HF drops it.
        assert_eq!(
            config(json!({"sliding_window": 3, "max_window_layers": 0}))
                .unwrap()
                .layer_windows,
            vec![None, None]
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
        bad(json!({"head_dim": 5}), "odd head_dim");
        bad(json!({"head_dim": -8}), "negative head_dim");
        bad(json!({"num_hidden_layers": 0}), "no layers");
        bad(
            json!({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}),
            "unknown rope type",
        );
        bad(json!({"rope_scaling": {"type": "dynamic"}}), "scaling without factor");
        bad(
            json!({"use_sliding_window": true, "sliding_window": -1}),
            "negative window",
        );
        bad(json!({"use_sliding_window": true, "sliding_window": 0}), "zero window");
        bad(
            json!({"layer_types": ["sliding_attention", "full_attention"]}),
            "sliding layer, no window",
        );
        bad(
            json!({"layer_types": ["full_attention"]}),
            "layer_types of the wrong length",
        );
        bad(
            json!({"layer_types": ["chunked_attention", "full_attention"]}),
            "unsupported layer type",
        );
        bad(json!({"hidden_act": "nope"}), "unknown activation");
        bad(json!({"partial_rotary_factor": 0.25}), "partial rotary");
        bad(json!({"rms_norm_eps": "small"}), "epsilon of the wrong type");
    }

    #[test]
    fn per_head_norms_are_applied_before_rotation() {
        let cfg = config(json!({})).unwrap();
        let (vs, model) = random_model(&cfg);
        let ids = Tensor::from_slice2(&[[1i64, 5, 7, 9]]);
        let before = run(&model, &ids, None, None).logits;
        // Scaling q_norm's weight changes the logits: the norm is in the path.
        tch::no_grad(|| {
            let mut w = vs.variables()["model.layers.0.self_attn.q_norm.weight"].shallow_clone();
            let doubled = &w * 2.0;
            w.copy_(&doubled);
        });
        let after = run(&model, &ids, None, None).logits;
        assert!(max_diff(&before, &after) > 1e-3);
        // Scaling k_proj's weight does not: k_norm removes the scale before the rotation.
        let (vs2, model2) = random_model(&cfg);
        let base = run(&model2, &ids, None, None).logits;
        tch::no_grad(|| {
            let mut w = vs2.variables()["model.layers.0.self_attn.k_proj.weight"].shallow_clone();
            let tripled = &w * 3.0;
            w.copy_(&tripled);
        });
        let scaled = run(&model2, &ids, None, None).logits;
        assert!(max_diff(&base, &scaled) < 1e-4, "{}", max_diff(&base, &scaled));
    }

    #[test]
    fn mixed_layers_decode_through_the_cache_like_the_full_pass() {
        for implementation in [AttnImplementation::Eager, AttnImplementation::Sdpa] {
            let mut cfg = config(
                json!({"use_sliding_window": true, "sliding_window": 3, "max_window_layers": 1,
                                        "tie_word_embeddings": false, "attention_bias": true}),
            )
            .unwrap();
            cfg.attn_implementation = implementation;
            let (_vs, model) = random_model(&cfg);
            let ids = Tensor::from_slice2(&[
                [0i64, 0, 5, 7, 9, 11, 3, 8, 13, 4],
                [2, 4, 6, 8, 10, 12, 14, 16, 18, 20],
            ]);
            let mask = Tensor::from_slice2(&[[0i64, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1; 10]]);
            let full = run(&model, &ids, Some(&mask), None);
            let mut past = run(&model, &ids.narrow(1, 0, 4), Some(&mask.narrow(1, 0, 4)), None).cache;
            for t in 4..10 {
                let step = run(
                    &model,
                    &ids.narrow(1, t, 1),
                    Some(&mask.narrow(1, 0, t + 1)),
                    Some(&past),
                );
                let d = max_diff(&step.logits.squeeze_dim(1), &full.logits.select(1, t));
                assert!(d < 1e-5, "{implementation:?} step {t}: {d}");
                past = step.cache;
            }
            // The sliding layer matters: the same model with full attention differs late in the row.
            let mut unwindowed = cfg.clone();
            unwindowed.layer_windows = vec![None, None];
            let vs_full = VarStore::new(Device::Cpu);
            let model_full = Qwen3ForCausalLM::new(vs_full.root(), &unwindowed).unwrap();
            crate::test_util::randomize(&vs_full, 7, 0.3);
            let other = run(&model_full, &ids, Some(&mask), None);
            let early = max_diff(&other.logits.narrow(1, 0, 3), &full.logits.narrow(1, 0, 3));
            let late = max_diff(&other.logits.narrow(1, 9, 1), &full.logits.narrow(1, 9, 1));
            assert!(
                early < 1e-5 && late > 1e-3,
                "{implementation:?}: early {early}, late {late}"
            );
        }
    }
}

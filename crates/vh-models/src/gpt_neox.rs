//! GPT-NeoX (Pythia, GPT-NeoX-20B), as HF's `modeling_gpt_neox.py`: a fused `query_key_value`
//! projection laid out per head, partial rotary positions (`rotary_pct` of each head rotated),
//! parallel or sequential residuals, LayerNorms, and the LM head named `embed_out` (one of TRL's
//! `lm_head_namings`). Parameters are named like HF's state dict
//! (`gpt_neox.layers.0.attention.query_key_value.weight`, ...).

use crate::activation::Activation;
use crate::attention::{AttentionSpec, AttnImplementation, MaskSpec, ScoreOp, SoftmaxPrecision};
use crate::cache::{Cache, LayerCache};
use crate::inputs::{prepare_causal, CausalInputs, CausalLimits};
use crate::layers::{merge_heads, LayerNorm, Linear};
use crate::registry::{Architecture, BuildOptions, CausalLm, CausalLmOutput, Family};
use crate::rotary::{apply_partial_rotary, RopeScaling, RotaryConfig, RotaryEmbedding};
use serde::Deserialize;
use serde_json::Value;
use tch::{nn, Kind, Tensor};
use vh_core::error::{check_epsilons, check_positive, check_probabilities, parse_config};
use vh_core::tensor::{min_value, TrainDropout};
use vh_core::{Error, Result};

mod defaults {
    pub fn vocab_size() -> i64 {
        50432
    }
    pub fn hidden_size() -> i64 {
        6144
    }
    pub fn num_hidden_layers() -> i64 {
        44
    }
    pub fn num_attention_heads() -> i64 {
        64
    }
    pub fn intermediate_size() -> i64 {
        24576
    }
    pub fn hidden_act() -> String {
        "gelu".to_string()
    }
    pub fn rotary_pct() -> f64 {
        0.25
    }
    pub fn rotary_emb_base() -> f64 {
        10000.0
    }
    pub fn max_position_embeddings() -> i64 {
        2048
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
    pub fn yes() -> bool {
        true
    }
}

/// HF's `GPTNeoXConfig`: the fields that change the math, with transformers 4.57's defaults.
///
/// HF also writes `partial_rotary_factor` and `rope_theta` into config.json, but its constructor
/// sets them from `rotary_pct` and `rotary_emb_base`, so those two are what count (as here).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct GptNeoxConfig {
    /// Vocabulary size.
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: i64,
    /// Hidden size.
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: i64,
    /// Decoder layers.
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: i64,
    /// Attention heads (each `hidden_size / num_attention_heads` wide).
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: i64,
    /// MLP inner width.
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: i64,
    /// The MLP activation's name.
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    /// The fraction of each head that is rotated (`int(head_size * rotary_pct)` dimensions).
    #[serde(default = "defaults::rotary_pct")]
    pub rotary_pct: f64,
    /// RoPE base.
    #[serde(default = "defaults::rotary_emb_base")]
    pub rotary_emb_base: f64,
    /// Dropout on attention probabilities (train mode).
    #[serde(default)]
    pub attention_dropout: f64,
    /// Dropout after the embeddings, the attention and the MLP (train mode).
    #[serde(default)]
    pub hidden_dropout: f64,
    /// The context length the rotary scaling refers to (no hard limit: positions are rotary).
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: i64,
    /// LayerNorm epsilon.
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// `embed_out` shares the input embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// `x + attn(ln1(x)) + mlp(ln2(x))` (true) or `x + attn(ln1(x))` then `+ mlp(ln2(.))`.
    #[serde(default = "defaults::yes")]
    pub use_parallel_residual: bool,
    /// RoPE scaling (`rope_scaling`, null for none).
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// Biases on `query_key_value` and `dense`.
    #[serde(default = "defaults::yes")]
    pub attention_bias: bool,
    /// How attention is computed (not part of config.json; HF's default is sdpa).
    #[serde(skip)]
    pub attn_implementation: AttnImplementation,
}

impl GptNeoxConfig {
    /// Parses a config.json value and checks it.
    pub fn from_json(config: &Value) -> Result<Self> {
        let cfg: Self = parse_config(config, "GPT-NeoX")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks sizes, names and ranges: positive sizes, heads dividing the width, `rotary_pct`
    /// in [0, 1] with a rotated width that fits the head, a positive base, a known activation and
    /// rope scaling, probabilities in [0, 1].
    pub fn validate(&self) -> Result<()> {
        check_positive(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ])?;
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::Config(format!(
                "hidden_size ({}) must be divisible by num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if !(0.0..=1.0).contains(&self.rotary_pct) {
            return Err(Error::Config(format!(
                "rotary_pct must be in [0, 1], got {}",
                self.rotary_pct
            )));
        }
        // HF rotates as many dimensions as cos/sin have: the rotary dim rounded up to even.
        if self.rotary_width() > self.head_size() {
            return Err(Error::Config(format!(
                "rotary_pct {} rotates {} dimensions, more than the head width {}",
                self.rotary_pct,
                self.rotary_width(),
                self.head_size()
            )));
        }
        if !(self.rotary_emb_base > 0.0 && self.rotary_emb_base.is_finite()) {
            return Err(Error::Config(format!(
                "rotary_emb_base must be positive, got {}",
                self.rotary_emb_base
            )));
        }
        check_epsilons(&[("layer_norm_eps", self.layer_norm_eps)])?;
        check_probabilities(&[
            ("attention_dropout", self.attention_dropout),
            ("hidden_dropout", self.hidden_dropout),
        ])?;
        if matches!(self.rope_scaling()?, RopeScaling::Dynamic { .. }) && self.rotary_dim() <= 2 {
            // HF's dynamic NTK base uses dim / (dim - 2): it fails to build for these.
            return Err(Error::Config(format!(
                "dynamic rope scaling needs more than 2 rotary dimensions, got {}",
                self.rotary_dim()
            )));
        }
        self.activation()?;
        Ok(())
    }

    /// Width of each head.
    pub fn head_size(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    /// HF's `int(head_size * rotary_pct)`: the dimension the rotary frequencies are computed for.
    pub fn rotary_dim(&self) -> i64 {
        (self.head_size() as f64 * self.rotary_pct).trunc() as i64
    }

    /// Dimensions actually rotated per head: one frequency per pair, so an odd rotary dim rotates
    /// one more (as HF's cos/sin width decides).
    pub fn rotary_width(&self) -> i64 {
        let dim = self.rotary_dim().max(0);
        dim + dim % 2
    }

    /// The parsed `rope_scaling`.
    pub fn rope_scaling(&self) -> Result<RopeScaling> {
        RopeScaling::from_json(self.rope_scaling.as_ref())
    }

    /// The MLP activation.
    pub fn activation(&self) -> Result<Activation> {
        self.hidden_act.parse()
    }
}

/// Maps a GPT-NeoX checkpoint key to this model's parameter name: keys saved from the bare
/// `GPTNeoXModel` get the `gpt_neox.` prefix, and buffers old checkpoints carry
/// (`attention.bias`, `attention.masked_bias`, `rotary_emb.inv_freq`) map to `None`.
pub fn parameter_name(key: &str) -> Option<String> {
    if key.ends_with(".attention.bias")
        || key.ends_with(".attention.masked_bias")
        || key.ends_with("rotary_emb.inv_freq")
    {
        return None;
    }
    let bare = ["embed_in.", "layers.", "final_layer_norm."];
    if bare.iter().any(|p| key.starts_with(p)) {
        return Some(format!("gpt_neox.{key}"));
    }
    Some(key.to_string())
}

/// Self-attention with a fused, per-head q/k/v projection and partial rotary positions.
#[derive(Debug)]
pub struct Attention {
    query_key_value: Linear,
    dense: Linear,
    heads: i64,
    head_size: i64,
    dropout: f64,
    attn_implementation: AttnImplementation,
}

impl Attention {
    /// Creates `query_key_value` and `dense` under `vs`.
    pub fn new(vs: nn::Path, cfg: &GptNeoxConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            query_key_value: Linear::new(vs.sub("query_key_value"), h, 3 * h, cfg.attention_bias)?,
            dense: Linear::new(vs.sub("dense"), h, h, cfg.attention_bias)?,
            heads: cfg.num_attention_heads,
            head_size: cfg.head_size(),
            dropout: cfg.attention_dropout,
            attn_implementation: cfg.attn_implementation,
        })
    }

    /// HF's eager order (`q @ k^T * head_size^-0.5`, the dtype's minimum on future and padded
    /// keys, softmax in f32), or the fused kernel with the same scale.
    fn spec(&self, kind: Kind) -> AttentionSpec {
        AttentionSpec {
            implementation: self.attn_implementation,
            score_ops: vec![ScoreOp::Mul((self.head_size as f64).powf(-0.5))],
            softmax: SoftmaxPrecision::F32,
            dropout: self.dropout,
            future: min_value(kind),
            causal: true,
        }
    }

    /// Attends from `x` [B, T, hidden] over cached and new positions; `cos`/`sin` [B, T, rotary]
    /// rotate the first dimensions of each head, `bias` [B or 1, 1, T, S] is added to the scores
    /// (`None`: the causal rule alone). Returns the output and the grown cache (keys rotated).
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: Option<&Tensor>,
        past: Option<&LayerCache>,
        train: bool,
    ) -> Result<(Tensor, LayerCache)> {
        let (b, t) = (x.size()[0], x.size()[1]);
        // HF's layout: each head's q, k and v are adjacent ([B, T, heads, 3 * head_size]).
        let qkv = self
            .query_key_value
            .forward(x)?
            .f_view([b, t, self.heads, 3 * self.head_size])?
            .f_transpose(1, 2)?;
        let parts = qkv.f_chunk(3, -1)?;
        let (cos, sin) = (cos.f_unsqueeze(1)?, sin.f_unsqueeze(1)?);
        let q = apply_partial_rotary(&parts[0], &cos, &sin)?;
        let k = apply_partial_rotary(&parts[1], &cos, &sin)?;
        let v = parts[2].shallow_clone();
        let cache = match past {
            Some(past) => past.append(&k, &v)?,
            None => LayerCache::new(k, v),
        };
        let spec = self.spec(q.kind());
        let attended = if spec.is_fused() {
            // The fused CPU kernel is markedly slower on strided views (the values are a chunk).
            let (q, k, v) = (
                q.f_contiguous()?,
                cache.keys.f_contiguous()?,
                cache.values.f_contiguous()?,
            );
            spec.attend(&q, &k, &v, bias, train)?
        } else {
            spec.attend(&q, &cache.keys, &cache.values, bias, train)?
        };
        Ok((self.dense.forward(&merge_heads(&attended)?)?, cache))
    }
}

/// The feed-forward block: `dense_h_to_4h`, activation, `dense_4h_to_h` (both with biases).
#[derive(Debug)]
pub struct Mlp {
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
    act: Activation,
}

impl Mlp {
    /// Creates the two projections under `vs`.
    pub fn new(vs: nn::Path, cfg: &GptNeoxConfig) -> Result<Self> {
        Ok(Self {
            dense_h_to_4h: Linear::new(vs.sub("dense_h_to_4h"), cfg.hidden_size, cfg.intermediate_size, true)?,
            dense_4h_to_h: Linear::new(vs.sub("dense_4h_to_h"), cfg.intermediate_size, cfg.hidden_size, true)?,
            act: cfg.activation()?,
        })
    }

    /// [B, T, hidden] -> [B, T, hidden].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.dense_4h_to_h
            .forward(&self.act.forward(&self.dense_h_to_4h.forward(x)?)?)
    }
}

/// One layer (`GPTNeoXLayer`): attention and MLP, with parallel or sequential residuals.
#[derive(Debug)]
pub struct Layer {
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
    attention: Attention,
    mlp: Mlp,
    use_parallel_residual: bool,
    hidden_dropout: f64,
}

impl Layer {
    /// Creates the layer's parameters under `vs`.
    pub fn new(vs: nn::Path, cfg: &GptNeoxConfig) -> Result<Self> {
        Ok(Self {
            input_layernorm: LayerNorm::new(vs.sub("input_layernorm"), cfg.hidden_size, cfg.layer_norm_eps)?,
            post_attention_layernorm: LayerNorm::new(
                vs.sub("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.layer_norm_eps,
            )?,
            attention: Attention::new(vs.sub("attention"), cfg)?,
            mlp: Mlp::new(vs.sub("mlp"), cfg)?,
            use_parallel_residual: cfg.use_parallel_residual,
            hidden_dropout: cfg.hidden_dropout,
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
            .attention
            .forward(&self.input_layernorm.forward(x)?, cos, sin, bias, past, train)?;
        let attn = attn.train_dropout(self.hidden_dropout, train)?;
        // HF's association order, which the last bit depends on.
        let out = if self.use_parallel_residual {
            let mlp = self
                .mlp
                .forward(&self.post_attention_layernorm.forward(x)?)?
                .train_dropout(self.hidden_dropout, train)?;
            mlp.f_add(&attn)?.f_add(x)?
        } else {
            let attn = attn.f_add(x)?;
            let mlp = self
                .mlp
                .forward(&self.post_attention_layernorm.forward(&attn)?)?
                .train_dropout(self.hidden_dropout, train)?;
            mlp.f_add(&attn)?
        };
        Ok((out, cache))
    }
}

/// GPT-NeoX with its LM head (`GPTNeoXForCausalLM`).
#[derive(Debug)]
pub struct GptNeoxForCausalLM {
    /// `gpt_neox.embed_in.weight` [vocab, hidden].
    pub embed_in: Tensor,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    /// `embed_out.weight` [vocab, hidden]; the input embedding when tied; `None` when built
    /// without an LM head.
    pub embed_out: Option<Tensor>,
    rotary: RotaryEmbedding,
    cfg: GptNeoxConfig,
}

impl GptNeoxForCausalLM {
    /// Creates `gpt_neox.*` and, unless tied, `embed_out.weight` under `vs`.
    pub fn new(vs: nn::Path, cfg: &GptNeoxConfig) -> Result<Self> {
        Self::with_head(vs, cfg, true)
    }

    /// [`GptNeoxForCausalLM::new`], with or without the LM head (`gpt_neox.*` alone, as under
    /// `GPTNeoXForSequenceClassification`'s `score`).
    pub fn with_head(vs: nn::Path, cfg: &GptNeoxConfig, lm_head: bool) -> Result<Self> {
        cfg.validate()?;
        let model = vs.sub("gpt_neox");
        let zeros = nn::Init::Const(0.0);
        let embed_in = vh_core::param::var(
            &model.sub("embed_in"),
            "weight",
            &[cfg.vocab_size, cfg.hidden_size],
            zeros,
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(model.sub("layers").sub(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(model.sub("final_layer_norm"), cfg.hidden_size, cfg.layer_norm_eps)?;
        let embed_out = match (lm_head, cfg.tie_word_embeddings) {
            (false, _) => None,
            (true, true) => Some(embed_in.shallow_clone()),
            (true, false) => Some(vh_core::param::var(
                &vs.sub("embed_out"),
                "weight",
                &[cfg.vocab_size, cfg.hidden_size],
                zeros,
            )?),
        };
        let rotary = RotaryEmbedding::new(
            &RotaryConfig {
                head_dim: cfg.rotary_dim(),
                rope_theta: cfg.rotary_emb_base,
                rope_scaling: cfg.rope_scaling()?,
                max_position_embeddings: cfg.max_position_embeddings,
            },
            vs.device(),
        )?;
        Ok(Self {
            embed_in,
            layers,
            final_layer_norm,
            embed_out,
            rotary,
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &GptNeoxConfig {
        &self.cfg
    }

    /// Maps a checkpoint key to a parameter of this model (see [`parameter_name`]); a tied
    /// model reads its head from `embed_in`.
    pub fn parameter_name(&self, key: &str) -> Option<String> {
        let name = parameter_name(key)?;
        if (self.cfg.tie_word_embeddings || self.embed_out.is_none()) && name == "embed_out.weight" {
            return None;
        }
        Some(name)
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
        let device = self.embed_in.device();
        let inputs = prepare_causal(input_ids, attention_mask, position_ids, past, self.limits(), device)?;
        CausalLm::forward(self, &inputs, train, 0)
    }
}

impl CausalLm for GptNeoxForCausalLM {
    fn model_type(&self) -> &'static str {
        "gpt_neox"
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
        // Rotary positions: HF enforces no limit.
        None
    }

    fn forward_hidden(&self, inputs: &CausalInputs<'_>, train: bool) -> Result<(Tensor, Cache)> {
        let device = self.embed_in.device();
        let kind = self.embed_in.kind();
        let (batch, new_len, past_len) = (inputs.batch, inputs.new_len, inputs.past_len);
        let (cos, sin) = self.rotary.cos_sin(&inputs.position_ids, inputs.max_position, kind)?;
        // HF's eager mask (masking_utils): the dtype's minimum on future and padded keys alike.
        // Without padding the layers apply the causal rule themselves.
        let bias = match &inputs.key_mask {
            Some(mask) => MaskSpec {
                key_mask: Some(mask),
                batch,
                new_len,
                past_len,
                future: min_value(kind),
                sliding_window: None,
            }
            .bias(kind, device)?,
            None => None,
        };
        let mut h = Tensor::f_embedding(&self.embed_in, &inputs.input_ids, -1, false, false)?
            .train_dropout(self.cfg.hidden_dropout, train)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let past = inputs.past.map(|p| &p.layers[i]);
            let (out, cache) = layer.forward(&h, &cos, &sin, bias.as_ref(), past, train)?;
            h = out;
            layers.push(cache);
        }
        Ok((self.final_layer_norm.forward(&h)?, Cache { layers }))
    }

    fn lm_head(&self) -> Option<&Tensor> {
        self.embed_out.as_ref()
    }

    fn parameter_name(&self, key: &str) -> Option<String> {
        GptNeoxForCausalLM::parameter_name(self, key)
    }

    fn tied_aliases(&self) -> Vec<(&'static str, &'static str)> {
        if self.cfg.tie_word_embeddings && self.embed_out.is_some() {
            vec![("embed_out.weight", "gpt_neox.embed_in.weight")]
        } else {
            vec![]
        }
    }

    fn is_lookup_only(&self, name: &str) -> bool {
        let head_reads_embedding = self.cfg.tie_word_embeddings && self.embed_out.is_some();
        !head_reads_embedding && name == "gpt_neox.embed_in.weight"
    }
}

/// GPT-NeoX's registry entry (Pythia, GPT-NeoX-20B and other `GPTNeoXForCausalLM` checkpoints).
pub const ARCHITECTURE: Architecture = Architecture {
    model_type: "gpt_neox",
    name: "GPT-NeoX",
    family: Family::Causal(build),
    default_attention: AttnImplementation::Sdpa,
    tiny_config,
};

fn build(vs: nn::Path, config: &Value, options: &BuildOptions) -> Result<Box<dyn CausalLm>> {
    let mut cfg = GptNeoxConfig::from_json(config)?;
    cfg.attn_implementation = options
        .attn_implementation
        .unwrap_or_else(|| ARCHITECTURE.default_attention_on(vs.device()));
    Ok(Box::new(GptNeoxForCausalLM::with_head(
        vs,
        &cfg,
        !options.without_lm_head,
    )?))
}

fn tiny_config() -> Value {
    serde_json::json!({
        "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "vocab_size": 50, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "rotary_pct": 0.5,
        "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 2
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tch::nn::VarStore;
    use tch::Device;
    use vh_core::ops::ScalarOps;

    fn tiny(extra: Value) -> GptNeoxConfig {
        let mut cfg = tiny_config();
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        GptNeoxConfig::from_json(&cfg).unwrap()
    }

    fn random_model(cfg: &GptNeoxConfig) -> (VarStore, GptNeoxForCausalLM) {
        let vs = VarStore::new(Device::Cpu);
        let model = GptNeoxForCausalLM::new(vs.root(), cfg).unwrap();
        crate::test_util::randomize(&vs, 5, 0.3);
        (vs, model)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn config_defaults_match_hf() {
        let cfg = GptNeoxConfig::from_json(&json!({})).unwrap();
        assert_eq!(
            (
                cfg.vocab_size,
                cfg.hidden_size,
                cfg.num_hidden_layers,
                cfg.num_attention_heads,
                cfg.intermediate_size
            ),
            (50432, 6144, 44, 64, 24576)
        );
        assert_eq!((cfg.rotary_pct, cfg.rotary_emb_base), (0.25, 10000.0));
        assert_eq!((cfg.head_size(), cfg.rotary_dim(), cfg.rotary_width()), (96, 24, 24));
        assert_eq!(cfg.hidden_act, "gelu");
        assert!(cfg.use_parallel_residual && cfg.attention_bias && !cfg.tie_word_embeddings);
        assert_eq!(
            (cfg.attention_dropout, cfg.hidden_dropout, cfg.layer_norm_eps),
            (0.0, 0.0, 1e-5)
        );
        assert_eq!(cfg.rope_scaling().unwrap(), RopeScaling::Default);
        // An odd rotary dim rotates one more dimension, as HF's cos/sin width.
        let odd = tiny(json!({"rotary_pct": 0.75}));
        assert_eq!((odd.rotary_dim(), odd.rotary_width()), (3, 4));
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let bad = |extra: Value| {
            let mut cfg = tiny_config();
            for (k, v) in extra.as_object().unwrap() {
                cfg[k] = v.clone();
            }
            match GptNeoxConfig::from_json(&cfg) {
                Err(Error::Config(msg)) => msg,
                other => panic!("{extra}: expected a config error, got {other:?}"),
            }
        };
        assert!(bad(json!({"num_attention_heads": 3})).contains("divisible"));
        assert!(bad(json!({"rotary_pct": 1.5})).contains("rotary_pct"));
        assert!(bad(json!({"rotary_pct": -0.25})).contains("rotary_pct"));
        // Head width 5, all of it rotary: 6 dimensions would be rotated.
        assert!(bad(json!({"hidden_size": 20, "rotary_pct": 1.0})).contains("head width"));
        assert!(bad(json!({"rotary_emb_base": 0.0})).contains("rotary_emb_base"));
        assert!(bad(json!({"hidden_act": "nope"})).contains("nope"));
        assert!(bad(json!({"hidden_size": "wide"})).contains("GPT-NeoX"));
        assert!(bad(json!({"num_hidden_layers": 0})).contains("num_hidden_layers"));
        assert!(bad(json!({"hidden_dropout": 2.0})).contains("hidden_dropout"));
        assert!(bad(json!({"layer_norm_eps": -1.0})).contains("layer_norm_eps"));
        assert!(bad(json!({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})).contains("yarn"));
        assert!(
            bad(json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rotary_pct": 0.25})).contains("dynamic")
        );
        assert!(bad(json!({"vocab_size": null})).contains("GPT-NeoX"));
    }

    #[test]
    fn parameter_names_follow_hf() {
        let vs = VarStore::new(Device::Cpu);
        let _m = GptNeoxForCausalLM::new(vs.root(), &tiny(json!({}))).unwrap();
        let names = vs.variables();
        for n in [
            "gpt_neox.embed_in.weight",
            "gpt_neox.layers.1.attention.query_key_value.weight",
            "gpt_neox.layers.0.attention.dense.bias",
            "gpt_neox.layers.0.mlp.dense_h_to_4h.bias",
            "gpt_neox.layers.0.post_attention_layernorm.weight",
            "gpt_neox.final_layer_norm.bias",
            "embed_out.weight",
        ] {
            assert!(names.contains_key(n), "{n}");
        }
        assert_eq!(
            names["gpt_neox.layers.0.attention.query_key_value.weight"].size(),
            vec![48, 16]
        );
        assert_eq!(
            parameter_name("layers.0.attention.dense.weight").unwrap(),
            "gpt_neox.layers.0.attention.dense.weight"
        );
        assert_eq!(parameter_name("gpt_neox.layers.0.attention.bias"), None);
        assert_eq!(parameter_name("gpt_neox.layers.0.attention.masked_bias"), None);
        assert_eq!(parameter_name("gpt_neox.layers.0.attention.rotary_emb.inv_freq"), None);

        let vs = VarStore::new(Device::Cpu);
        let tied = GptNeoxForCausalLM::new(
            vs.root(),
            &tiny(json!({"tie_word_embeddings": true, "attention_bias": false})),
        )
        .unwrap();
        let names = vs.variables();
        assert!(!names.contains_key("embed_out.weight"));
        assert!(!names.contains_key("gpt_neox.layers.0.attention.dense.bias"));
        assert_eq!(tied.parameter_name("embed_out.weight"), None);
        assert_eq!(
            CausalLm::tied_aliases(&tied),
            vec![("embed_out.weight", "gpt_neox.embed_in.weight")]
        );
    }

    /// Rotation of every head's first `rotary_width` dimensions, written out independently of
    /// the model: what HF's `apply_rotary_pos_emb` computes for one position.
    #[test]
    fn partial_rotary_rotates_only_the_first_dimensions() {
        let cfg = tiny(json!({"rotary_pct": 0.5}));
        let rotary = RotaryEmbedding::new(
            &RotaryConfig {
                head_dim: cfg.rotary_dim(),
                rope_theta: cfg.rotary_emb_base,
                rope_scaling: RopeScaling::Default,
                max_position_embeddings: 64,
            },
            Device::Cpu,
        )
        .unwrap();
        let pos = Tensor::from_slice2(&[[3i64]]);
        let (cos, sin) = rotary.cos_sin(&pos, 3, Kind::Float).unwrap();
        let x = Tensor::arange(4, (Kind::Float, Device::Cpu))
            .s_add(1.0)
            .unwrap()
            .reshape([1, 1, 1, 4]);
        let out = apply_partial_rotary(&x, &cos.unsqueeze(1), &sin.unsqueeze(1)).unwrap();
        // rotary dim 2: one frequency (1.0), angle 3, rotating (x0, x1); x2, x3 pass through.
        let (c, s) = (3f64.cos(), 3f64.sin());
        let expected = [1.0 * c - 2.0 * s, 2.0 * c + 1.0 * s, 3.0, 4.0];
        let got = Vec::<f64>::try_from(out.reshape([-1]).to_kind(Kind::Double)).unwrap();
        for (g, e) in got.iter().zip(expected) {
            assert!((g - e).abs() < 1e-5, "{got:?} vs {expected:?}");
        }
    }

    #[test]
    fn incremental_decoding_equals_full_forward_both_residual_styles() {
        for parallel in [true, false] {
            let cfg = tiny(json!({"use_parallel_residual": parallel, "rotary_pct": 0.75}));
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
                assert!(diff < 1e-5, "parallel {parallel}, step {t}: {diff}");
                cache = step.cache;
            }
        }
    }

    #[test]
    fn residual_style_and_rotary_fraction_change_the_outputs() {
        let ids = Tensor::from_slice2(&[[1i64, 5, 7, 9]]);
        let run = |extra: Value| {
            let (_vs, model) = random_model(&tiny(extra));
            model.forward(&ids, None, None, None, false).unwrap().logits
        };
        let base = run(json!({}));
        assert!(max_diff(&base, &run(json!({"use_parallel_residual": false}))) > 1e-3);
        assert!(max_diff(&base, &run(json!({"rotary_pct": 1.0}))) > 1e-3);
        // No rotary dimension at all (HF rotates nothing) still runs.
        assert!(run(json!({"rotary_pct": 0.0})).isfinite().all().int64_value(&[]) != 0);
    }

    #[test]
    fn left_padding_with_mask_positions_matches_unpadded_rows() {
        let (_vs, model) = random_model(&tiny(json!({})));
        let plain = model
            .forward(&Tensor::from_slice2(&[[7i64, 8, 9]]), None, None, None, false)
            .unwrap();
        let padded = Tensor::from_slice2(&[[0i64, 0, 7, 8, 9]]);
        let mask = Tensor::from_slice2(&[[0i64, 0, 1, 1, 1]]);
        let positions = vh_core::tensor::position_ids_from_attention_mask(&mask, 5).unwrap();
        let out = model
            .forward(&padded, Some(&mask), Some(&positions), None, false)
            .unwrap();
        assert!(max_diff(&out.logits.narrow(1, 2, 3), &plain.logits) < 1e-5);
    }

    #[test]
    fn dropout_acts_only_in_train_mode() {
        let (_vs, model) = random_model(&tiny(json!({"hidden_dropout": 0.3})));
        let ids = Tensor::from_slice2(&[[1i64, 2, 3, 4]]);
        let a = model.forward(&ids, None, None, None, false).unwrap().logits;
        assert!(a.equal(&model.forward(&ids, None, None, None, false).unwrap().logits));
        assert!(!a.equal(&model.forward(&ids, None, None, None, true).unwrap().logits));
    }
}

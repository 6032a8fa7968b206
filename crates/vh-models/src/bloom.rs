//! Bloom, as HF's `modeling_bloom.py`: ALiBi instead of position embeddings (numbered from the
//! attention mask), a LayerNorm right after the token embedding, a fused `query_key_value`
//! projection laid out head by head (`[heads, 3, head_dim]`), residuals taken before or after
//! each LayerNorm (`apply_residual_connection_post_layernorm`), Bloom's own tanh GELU, and
//! Megatron's sliced output projections when `pretraining_tp > 1` and `slow_but_exact`.
//! Parameters are named like HF's state dict (`transformer.h.0.self_attention.query_key_value.weight`, ...).

use crate::activation::Activation;
use crate::attention::{Alibi, AttentionSpec, AttnImplementation, MaskSpec, SoftmaxPrecision};
use crate::cache::{Cache, LayerCache};
use crate::inputs::{prepare_causal, CausalInputs, CausalLimits};
use crate::layers::{merge_heads, LayerNorm, Linear};
use crate::registry::{Architecture, BuildOptions, CausalLm, CausalLmOutput, Family, ParamPosition};
use serde::Deserialize;
use serde_json::Value;
use tch::{nn, Kind, Tensor};
use vh_core::error::{check_positive, check_probabilities, parse_config};
use vh_core::tensor::{min_value, TrainDropout};
use vh_core::{Error, Result};

mod defaults {
    pub fn vocab_size() -> i64 {
        250880
    }
    pub fn hidden_size() -> i64 {
        64
    }
    pub fn n_layer() -> i64 {
        2
    }
    pub fn n_head() -> i64 {
        8
    }
    pub fn layer_norm_epsilon() -> f64 {
        1e-5
    }
    pub fn pretraining_tp() -> i64 {
        1
    }
    pub fn yes() -> bool {
        true
    }
}

/// HF's `BloomConfig`: the fields that change the math, with transformers 4.57's defaults.
/// HF's aliases are resolved as HF resolves them: `n_embed` overrides `hidden_size`, and the
/// attribute-map names `num_hidden_layers` / `num_attention_heads` override `n_layer` / `n_head`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BloomConfig {
    /// Vocabulary size.
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: i64,
    /// Width of the hidden states.
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: i64,
    /// Blocks.
    #[serde(default = "defaults::n_layer")]
    pub n_layer: i64,
    /// Attention heads.
    #[serde(default = "defaults::n_head")]
    pub n_head: i64,
    /// Epsilon of every LayerNorm.
    #[serde(default = "defaults::layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    /// The residual of each sub-block is its LayerNorm's output rather than its input.
    #[serde(default)]
    pub apply_residual_connection_post_layernorm: bool,
    /// Dropout on the attention and MLP outputs before their residual adds (train mode).
    #[serde(default)]
    pub hidden_dropout: f64,
    /// Dropout on attention probabilities (train mode).
    #[serde(default)]
    pub attention_dropout: f64,
    /// Megatron's tensor-parallel degree at pretraining; with `slow_but_exact` the output
    /// projections sum that many column slices (see [`TpLinear`]).
    #[serde(default = "defaults::pretraining_tp")]
    pub pretraining_tp: i64,
    /// Whether to reproduce pretraining's sliced projections (only with `pretraining_tp > 1`).
    #[serde(default)]
    pub slow_but_exact: bool,
    /// The LM head shares the token embedding matrix (transformers' default).
    #[serde(default = "defaults::yes")]
    pub tie_word_embeddings: bool,
    /// HF's older name for `hidden_size`, which wins when set.
    #[serde(default)]
    pub n_embed: Option<i64>,
    /// HF's attribute-map name for `n_layer`, which wins when set.
    #[serde(default)]
    pub num_hidden_layers: Option<i64>,
    /// HF's attribute-map name for `n_head`, which wins when set.
    #[serde(default)]
    pub num_attention_heads: Option<i64>,
    /// How attention is computed (not part of config.json; HF's Bloom has eager only).
    #[serde(skip)]
    pub attn_implementation: AttnImplementation,
}

impl BloomConfig {
    /// Parses a config.json value, resolves HF's aliases and checks it.
    pub fn from_json(config: &Value) -> Result<Self> {
        let mut cfg: Self = parse_config(config, "Bloom")?;
        if let Some(n) = cfg.n_embed {
            cfg.hidden_size = n;
        }
        if let Some(n) = cfg.num_hidden_layers {
            cfg.n_layer = n;
        }
        if let Some(n) = cfg.num_attention_heads {
            cfg.n_head = n;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks sizes and ranges: positive sizes, heads dividing the width (HF's `BloomAttention`
    /// refuses others), probabilities in [0, 1], a positive epsilon.
    pub fn validate(&self) -> Result<()> {
        check_positive(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ])?;
        if self.hidden_size % self.n_head != 0 {
            return Err(Error::Config(format!(
                "hidden_size ({}) must be divisible by n_head ({})",
                self.hidden_size, self.n_head
            )));
        }
        check_probabilities(&[
            ("hidden_dropout", self.hidden_dropout),
            ("attention_dropout", self.attention_dropout),
        ])?;
        if self.layer_norm_epsilon.is_nan() || self.layer_norm_epsilon <= 0.0 {
            return Err(Error::Config(format!(
                "layer_norm_epsilon must be positive, got {}",
                self.layer_norm_epsilon
            )));
        }
        Ok(())
    }

    /// Width of each head.
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.n_head
    }

    /// The number of column slices the output projections sum, when HF's slow path runs.
    fn tp_slices(&self) -> Option<i64> {
        (self.pretraining_tp > 1 && self.slow_but_exact).then_some(self.pretraining_tp)
    }
}

/// Maps a Bloom checkpoint key to this model's parameter name: keys saved from the bare
/// `BloomModel` (as the bigscience checkpoints) get the `transformer.` prefix.
pub fn parameter_name(key: &str) -> Option<String> {
    let legacy = ["word_embeddings.", "word_embeddings_layernorm.", "h.", "ln_f."];
    if legacy.iter().any(|p| key.starts_with(p)) {
        return Some(format!("transformer.{key}"));
    }
    Some(key.to_string())
}

/// A linear layer that, in HF's slow path (`pretraining_tp > 1` and `slow_but_exact`), sums the
/// products of `slices` column slices of its input and weight, as Megatron's tensor-parallel
/// ranks did, and then adds no bias (HF's slow path leaves it out).
#[derive(Debug)]
pub struct TpLinear {
    linear: Linear,
    slices: Option<i64>,
}

impl TpLinear {
    /// Creates `weight` and `bias` under `vs`.
    pub fn new(vs: nn::Path, in_dim: i64, out_dim: i64, slices: Option<i64>) -> Result<Self> {
        Ok(Self {
            linear: Linear::new(vs, in_dim, out_dim, true)?,
            slices,
        })
    }

    /// [..., in] -> [..., out].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some(tp) = self.slices else {
            return self.linear.forward(x);
        };
        let weight = &self.linear.weight;
        let width = weight.size()[1];
        // HF's bounds: `int(i * (width / tp))` in Python floats, truncated.
        let step = width as f64 / tp as f64;
        let bound = |i: i64| ((i as f64 * step) as i64).min(width);
        let mut out: Option<Tensor> = None;
        for i in 0..tp {
            let (start, end) = (bound(i), bound(i + 1));
            let part = x
                .f_slice(-1, start, end, 1)?
                .f_linear::<&Tensor>(&weight.f_slice(1, start, end, 1)?, None)?;
            out = Some(match out {
                Some(sum) => sum.f_add(&part)?,
                None => part,
            });
        }
        out.ok_or_else(|| Error::Config("pretraining_tp must be positive".into()))
    }
}

/// Self-attention with a fused, head-interleaved `query_key_value` projection and ALiBi.
#[derive(Debug)]
pub struct Attention {
    query_key_value: Linear,
    dense: TpLinear,
    heads: i64,
    head_dim: i64,
    attention_dropout: f64,
    attn_implementation: AttnImplementation,
}

impl Attention {
    /// Creates `query_key_value` and `dense` under `vs`.
    pub fn new(vs: nn::Path, cfg: &BloomConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            query_key_value: Linear::new(vs.sub("query_key_value"), h, 3 * h, true)?,
            dense: TpLinear::new(vs.sub("dense"), h, h, cfg.tp_slices())?,
            heads: cfg.n_head,
            head_dim: cfg.head_dim(),
            attention_dropout: cfg.attention_dropout,
            attn_implementation: cfg.attn_implementation,
        })
    }

    /// HF's order: raw scores times `head_dim^-0.5`, plus ALiBi and the mask (both in the bias);
    /// softmax in f32.
    fn spec(&self, kind: Kind) -> AttentionSpec {
        AttentionSpec {
            implementation: self.attn_implementation,
            score_ops: vec![crate::attention::ScoreOp::Mul(1.0 / (self.head_dim as f64).sqrt())],
            softmax: SoftmaxPrecision::F32,
            dropout: self.attention_dropout,
            future: min_value(kind),
            causal: true,
        }
    }

    /// Attends from `x` [B, T, hidden] over cached and new positions with `bias`
    /// [B or 1, H, T, S] (ALiBi, causality and padding); returns the projected output before
    /// dropout and residual.
    pub fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        past: Option<&LayerCache>,
        train: bool,
    ) -> Result<(Tensor, LayerCache)> {
        let size = x.size();
        let (b, t) = (size[0], size[1]);
        // HF's `_reshape`: the fused output is [heads, 3, head_dim] per position.
        let fused = self
            .query_key_value
            .forward(x)?
            .f_view([b, t, self.heads, 3, self.head_dim])?;
        let part = |i: i64| -> Result<Tensor> { Ok(fused.f_select(3, i)?.f_transpose(1, 2)?) };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let cache = match past {
            Some(past) => past.append(&k, &v)?,
            None => LayerCache::new(k, v),
        };
        let attended = self
            .spec(q.kind())
            .attend(&q, &cache.keys, &cache.values, Some(bias), train)?;
        Ok((self.dense.forward(&merge_heads(&attended)?)?, cache))
    }
}

/// The MLP: `dense_h_to_4h`, Bloom's GELU, `dense_4h_to_h`.
#[derive(Debug)]
pub struct Mlp {
    dense_h_to_4h: Linear,
    dense_4h_to_h: TpLinear,
}

impl Mlp {
    /// Creates the two projections under `vs`.
    pub fn new(vs: nn::Path, cfg: &BloomConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            dense_h_to_4h: Linear::new(vs.sub("dense_h_to_4h"), h, 4 * h, true)?,
            dense_4h_to_h: TpLinear::new(vs.sub("dense_4h_to_h"), 4 * h, h, cfg.tp_slices())?,
        })
    }

    /// [..., hidden] -> [..., hidden], before dropout and residual.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let inner = Activation::BloomGelu.forward(&self.dense_h_to_4h.forward(x)?)?;
        self.dense_4h_to_h.forward(&inner)
    }
}

/// One block (`BloomBlock`).
#[derive(Debug)]
pub struct Block {
    input_layernorm: LayerNorm,
    self_attention: Attention,
    post_attention_layernorm: LayerNorm,
    mlp: Mlp,
    residual_post_layernorm: bool,
    hidden_dropout: f64,
}

impl Block {
    /// Creates the block's parameters under `vs`.
    pub fn new(vs: nn::Path, cfg: &BloomConfig) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_epsilon);
        Ok(Self {
            input_layernorm: LayerNorm::new(vs.sub("input_layernorm"), h, eps)?,
            self_attention: Attention::new(vs.sub("self_attention"), cfg)?,
            post_attention_layernorm: LayerNorm::new(vs.sub("post_attention_layernorm"), h, eps)?,
            mlp: Mlp::new(vs.sub("mlp"), cfg)?,
            residual_post_layernorm: cfg.apply_residual_connection_post_layernorm,
            hidden_dropout: cfg.hidden_dropout,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        past: Option<&LayerCache>,
        train: bool,
    ) -> Result<(Tensor, LayerCache)> {
        let normed = self.input_layernorm.forward(x)?;
        let residual = if self.residual_post_layernorm { &normed } else { x };
        let (attn, cache) = self.self_attention.forward(&normed, bias, past, train)?;
        let attn_out = residual.f_add(&attn.train_dropout(self.hidden_dropout, train)?)?;
        let normed = self.post_attention_layernorm.forward(&attn_out)?;
        let residual = if self.residual_post_layernorm {
            &normed
        } else {
            &attn_out
        };
        let mlp = self.mlp.forward(&normed)?.train_dropout(self.hidden_dropout, train)?;
        Ok((residual.f_add(&mlp)?, cache))
    }
}

/// Bloom with its LM head (`BloomForCausalLM`).
#[derive(Debug)]
pub struct BloomForCausalLM {
    /// `transformer.word_embeddings.weight` [vocab, hidden].
    pub word_embeddings: Tensor,
    word_embeddings_layernorm: LayerNorm,
    h: Vec<Block>,
    ln_f: LayerNorm,
    /// `lm_head.weight` [vocab, hidden]; the token embedding when tied; `None` when built
    /// without an LM head.
    pub lm_head: Option<Tensor>,
    alibi: Alibi,
    cfg: BloomConfig,
}

impl BloomForCausalLM {
    /// Creates `transformer.*` and, unless tied, `lm_head.weight` under `vs`.
    pub fn new(vs: nn::Path, cfg: &BloomConfig) -> Result<Self> {
        Self::with_head(vs, cfg, true)
    }

    /// [`BloomForCausalLM::new`], with or without the LM head (`transformer.*` alone, for a
    /// backbone under another head).
    pub fn with_head(vs: nn::Path, cfg: &BloomConfig, lm_head: bool) -> Result<Self> {
        cfg.validate()?;
        let transformer = vs.sub("transformer");
        let (hidden, eps) = (cfg.hidden_size, cfg.layer_norm_epsilon);
        let zeros = nn::Init::Const(0.0);
        let word_embeddings = vh_core::param::var(
            &transformer.sub("word_embeddings"),
            "weight",
            &[cfg.vocab_size, hidden],
            zeros,
        )?;
        let word_embeddings_layernorm = LayerNorm::new(transformer.sub("word_embeddings_layernorm"), hidden, eps)?;
        let h = (0..cfg.n_layer)
            .map(|i| Block::new(transformer.sub("h").sub(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(transformer.sub("ln_f"), hidden, eps)?;
        let lm_head = match (lm_head, cfg.tie_word_embeddings) {
            (false, _) => None,
            (true, true) => Some(word_embeddings.shallow_clone()),
            (true, false) => Some(vh_core::param::var(
                &vs.sub("lm_head"),
                "weight",
                &[cfg.vocab_size, hidden],
                zeros,
            )?),
        };
        Ok(Self {
            word_embeddings,
            word_embeddings_layernorm,
            h,
            ln_f,
            lm_head,
            alibi: Alibi::new(cfg.n_head, vs.device())?,
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BloomConfig {
        &self.cfg
    }

    /// Maps a checkpoint key to a parameter of this model (see [`parameter_name`]); a tied
    /// model reads its head from the token embedding.
    pub fn parameter_name(&self, key: &str) -> Option<String> {
        let name = parameter_name(key)?;
        if (self.cfg.tie_word_embeddings || self.lm_head.is_none()) && name == "lm_head.weight" {
            return None;
        }
        Some(name)
    }

    /// What the inputs of a pass are checked against: ALiBi bounds no sequence length.
    pub fn limits(&self) -> CausalLimits {
        CausalLimits {
            vocab_size: self.cfg.vocab_size,
            num_layers: self.h.len(),
            max_positions: None,
        }
    }

    /// Runs the model over `input_ids` [B, T] after the cached positions; `attention_mask`
    /// [B, past + T]. Bloom has no position ids (HF ignores them): ALiBi numbers keys from the
    /// mask.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        past: Option<&Cache>,
        train: bool,
    ) -> Result<CausalLmOutput> {
        let device = self.word_embeddings.device();
        let inputs = prepare_causal(input_ids, attention_mask, None, past, self.limits(), device)?;
        CausalLm::forward(self, &inputs, train, 0)
    }
}

impl CausalLm for BloomForCausalLM {
    fn model_type(&self) -> &'static str {
        "bloom"
    }

    fn vocab_size(&self) -> i64 {
        self.cfg.vocab_size
    }

    fn hidden_size(&self) -> i64 {
        self.cfg.hidden_size
    }

    fn num_layers(&self) -> usize {
        self.h.len()
    }

    fn max_positions(&self) -> Option<i64> {
        None
    }

    fn forward_hidden(&self, inputs: &CausalInputs<'_>, train: bool) -> Result<(Tensor, Cache)> {
        let device = self.word_embeddings.device();
        let kind = self.word_embeddings.kind();
        // HF's eager mask (the dtype's minimum on future and padded keys) plus ALiBi, numbered
        // from the mask over cached and new keys; built once and shared by every block. Position
        // ids play no part (HF's Bloom ignores them).
        let bias = MaskSpec {
            key_mask: inputs.key_mask.as_ref(),
            batch: inputs.batch,
            new_len: inputs.new_len,
            past_len: inputs.past_len,
            future: min_value(kind),
            sliding_window: None,
        }
        .bias_with_alibi(&self.alibi, kind, device)?;
        let tokens = Tensor::f_embedding(&self.word_embeddings, &inputs.input_ids, -1, false, false)?;
        let mut hidden = self.word_embeddings_layernorm.forward(&tokens)?;
        let mut layers = Vec::with_capacity(self.h.len());
        for (i, block) in self.h.iter().enumerate() {
            let past = inputs.past.map(|p| &p.layers[i]);
            let (out, cache) = block.forward(&hidden, &bias, past, train)?;
            hidden = out;
            layers.push(cache);
        }
        Ok((self.ln_f.forward(&hidden)?, Cache { layers }))
    }

    fn lm_head(&self) -> Option<&Tensor> {
        self.lm_head.as_ref()
    }

    fn parameter_name(&self, key: &str) -> Option<String> {
        BloomForCausalLM::parameter_name(self, key)
    }

    fn tied_aliases(&self) -> Vec<(&'static str, &'static str)> {
        if self.cfg.tie_word_embeddings && self.lm_head.is_some() {
            vec![("lm_head.weight", "transformer.word_embeddings.weight")]
        } else {
            vec![]
        }
    }

    /// `BloomModel` registers `word_embeddings` and `word_embeddings_layernorm` before `h`.
    fn parameter_position(&self, name: &str) -> ParamPosition {
        if name.starts_with("transformer.word_embeddings") {
            ParamPosition::BeforeLayers
        } else {
            ParamPosition::by_name(name)
        }
    }

    fn is_lookup_only(&self, name: &str) -> bool {
        !(self.cfg.tie_word_embeddings && self.lm_head.is_some()) && name == "transformer.word_embeddings.weight"
    }
}

/// Bloom's registry entry. HF 4.57's Bloom implements eager attention only (no
/// `_supports_sdpa`), so eager is its default on CPU as in HF; the fused kernel stays available
/// and takes the ALiBi bias as its mask.
pub const ARCHITECTURE: Architecture = Architecture {
    model_type: "bloom",
    name: "Bloom",
    family: Family::Causal(build),
    default_attention: AttnImplementation::Eager,
    tiny_config,
};

fn build(vs: nn::Path, config: &Value, options: &BuildOptions) -> Result<Box<dyn CausalLm>> {
    let mut cfg = BloomConfig::from_json(config)?;
    cfg.attn_implementation = options
        .attn_implementation
        .unwrap_or_else(|| ARCHITECTURE.default_attention_on(vs.device()));
    Ok(Box::new(BloomForCausalLM::with_head(
        vs,
        &cfg,
        !options.without_lm_head,
    )?))
}

fn tiny_config() -> Value {
    serde_json::json!({
        "model_type": "bloom", "architectures": ["BloomForCausalLM"], "vocab_size": 50, "hidden_size": 16,
        "n_layer": 2, "n_head": 4, "pad_token_id": 3, "bos_token_id": 1, "eos_token_id": 2
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tch::nn::VarStore;
    use tch::Device;

    fn tiny(extra: Value) -> BloomConfig {
        let mut cfg = tiny_config();
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        BloomConfig::from_json(&cfg).unwrap()
    }

    fn random_model(cfg: &BloomConfig) -> (VarStore, BloomForCausalLM) {
        let vs = VarStore::new(Device::Cpu);
        let model = BloomForCausalLM::new(vs.root(), cfg).unwrap();
        crate::test_util::randomize(&vs, 11, 0.3);
        (vs, model)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn config_defaults_and_aliases_match_hf() {
        let cfg = BloomConfig::from_json(&json!({})).unwrap();
        assert_eq!(
            (
                cfg.vocab_size,
                cfg.hidden_size,
                cfg.n_layer,
                cfg.n_head,
                cfg.pretraining_tp
            ),
            (250880, 64, 2, 8, 1)
        );
        assert_eq!(cfg.layer_norm_epsilon, 1e-5);
        assert!(!cfg.apply_residual_connection_post_layernorm && !cfg.slow_but_exact && cfg.tie_word_embeddings);
        assert_eq!((cfg.hidden_dropout, cfg.attention_dropout), (0.0, 0.0));
        assert_eq!(cfg.tp_slices(), None);
        let aliased = BloomConfig::from_json(
            &json!({"hidden_size": 32, "n_embed": 48, "n_layer": 2, "num_hidden_layers": 3, "n_head": 8,
                    "num_attention_heads": 6}),
        )
        .unwrap();
        assert_eq!((aliased.hidden_size, aliased.n_layer, aliased.n_head), (48, 3, 6));
        assert_eq!(
            BloomConfig::from_json(&json!({"pretraining_tp": 2, "slow_but_exact": true}))
                .unwrap()
                .tp_slices(),
            Some(2)
        );
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let bad = |extra: Value| {
            let mut cfg = tiny_config();
            for (k, v) in extra.as_object().unwrap() {
                cfg[k] = v.clone();
            }
            match BloomConfig::from_json(&cfg) {
                Err(Error::Config(msg)) => msg,
                other => panic!("{extra}: expected a config error, got {other:?}"),
            }
        };
        assert!(bad(json!({"n_head": 3})).contains("divisible"));
        assert!(bad(json!({"n_embed": 18})).contains("divisible"));
        assert!(bad(json!({"n_layer": 0})).contains("n_layer"));
        assert!(bad(json!({"hidden_dropout": 1.5})).contains("hidden_dropout"));
        assert!(bad(json!({"layer_norm_epsilon": 0.0})).contains("layer_norm_epsilon"));
        assert!(bad(json!({"hidden_size": null})).contains("Bloom"));
        assert!(bad(json!({"n_head": "four"})).contains("Bloom"));
    }

    #[test]
    fn parameter_names_follow_hf() {
        let vs = VarStore::new(Device::Cpu);
        let model = BloomForCausalLM::new(vs.root(), &tiny(json!({}))).unwrap();
        let names = vs.variables();
        for n in [
            "transformer.word_embeddings.weight",
            "transformer.word_embeddings_layernorm.bias",
            "transformer.h.1.input_layernorm.weight",
            "transformer.h.0.self_attention.query_key_value.bias",
            "transformer.h.0.self_attention.dense.weight",
            "transformer.h.0.post_attention_layernorm.bias",
            "transformer.h.1.mlp.dense_h_to_4h.weight",
            "transformer.h.1.mlp.dense_4h_to_h.bias",
            "transformer.ln_f.weight",
        ] {
            assert!(names.contains_key(n), "{n}");
        }
        assert!(!names.contains_key("lm_head.weight"), "tied by default");
        assert_eq!(
            names["transformer.h.0.self_attention.query_key_value.weight"].size(),
            vec![48, 16]
        );
        assert_eq!(model.parameter_name("lm_head.weight"), None);
        assert_eq!(
            parameter_name("h.0.mlp.dense_h_to_4h.weight").unwrap(),
            "transformer.h.0.mlp.dense_h_to_4h.weight"
        );
        assert_eq!(
            parameter_name("word_embeddings_layernorm.weight").unwrap(),
            "transformer.word_embeddings_layernorm.weight"
        );
        assert_eq!(
            model.parameter_position("transformer.word_embeddings_layernorm.weight"),
            ParamPosition::BeforeLayers
        );
        assert_eq!(
            model.parameter_position("transformer.ln_f.weight"),
            ParamPosition::AfterLayers
        );
        let vs = VarStore::new(Device::Cpu);
        let untied = BloomForCausalLM::new(vs.root(), &tiny(json!({"tie_word_embeddings": false}))).unwrap();
        assert!(vs.variables().contains_key("lm_head.weight"));
        assert!(untied.is_lookup_only("transformer.word_embeddings.weight"));
    }

    /// ALiBi numbers keys from the mask, so a left-padded row gives its unpadded outputs.
    #[test]
    fn left_padding_gives_the_unpadded_outputs() {
        let (_vs, model) = random_model(&tiny(json!({"n_head": 2, "hidden_size": 12})));
        let plain = model
            .forward(&Tensor::from_slice2(&[[7i64, 8, 9]]), None, None, false)
            .unwrap();
        let padded = Tensor::from_slice2(&[[0i64, 0, 7, 8, 9]]);
        let mask = Tensor::from_slice2(&[[0i64, 0, 1, 1, 1]]);
        let out = model.forward(&padded, Some(&mask), None, false).unwrap();
        assert!(max_diff(&out.logits.narrow(1, 2, 3), &plain.logits) < 1e-5);
        // Without the mask the pads count as tokens and shift everything.
        let unmasked = model.forward(&padded, None, None, false).unwrap();
        assert!(max_diff(&unmasked.logits.narrow(1, 2, 3), &plain.logits) > 1e-4);
    }

    #[test]
    fn incremental_decoding_with_padding_equals_full_forward() {
        for extra in [
            json!({}),
            json!({"apply_residual_connection_post_layernorm": true, "n_head": 3, "hidden_size": 12}),
            json!({"pretraining_tp": 2, "slow_but_exact": true, "tie_word_embeddings": false}),
        ] {
            let (_vs, model) = random_model(&tiny(extra.clone()));
            let ids = Tensor::from_slice2(&[[0i64, 0, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12]]);
            let mask = Tensor::from_slice2(&[[0i64, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]);
            let full = model.forward(&ids, Some(&mask), None, false).unwrap();
            let mut cache = model
                .forward(&ids.narrow(1, 0, 3), Some(&mask.narrow(1, 0, 3)), None, false)
                .unwrap()
                .cache;
            for t in 3..6 {
                let step = model
                    .forward(
                        &ids.narrow(1, t, 1),
                        Some(&mask.narrow(1, 0, t + 1)),
                        Some(&cache),
                        false,
                    )
                    .unwrap();
                let diff = max_diff(&step.logits.squeeze_dim(1), &full.logits.select(1, t));
                assert!(diff < 1e-5, "{extra}, step {t}: {diff}");
                cache = step.cache;
            }
        }
    }

    /// The slow path sums sliced products without the bias: with a zero bias it equals the plain
    /// projection up to rounding, with a bias it differs by exactly the bias.
    #[test]
    fn sliced_projection_sums_slices_without_bias() {
        let vs = VarStore::new(Device::Cpu);
        let sliced = TpLinear::new(vs.root().sub("a"), 10, 4, Some(3)).unwrap();
        crate::test_util::randomize(&vs, 5, 0.5);
        let x = Tensor::linspace(-1.0, 1.0, 20, (Kind::Float, Device::Cpu)).view([2, 10]);
        let plain = sliced.linear.forward(&x).unwrap();
        let bias = sliced.linear.bias.as_ref().unwrap();
        let got = sliced.forward(&x).unwrap();
        assert!(max_diff(&(got + bias), &plain) < 1e-5);
    }
}

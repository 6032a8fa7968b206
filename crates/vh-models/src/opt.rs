//! OPT, as HF's `modeling_opt.py`: learned positions offset by 2 and numbered from the attention
//! mask, an optional projection between the embedding width (`word_embed_proj_dim`) and the
//! hidden width, pre- or post-LayerNorm blocks (`do_layer_norm_before`), queries scaled before
//! the score product, and a ReLU MLP. Parameters are named like HF's state dict
//! (`model.decoder.layers.0.self_attn.q_proj.weight`, ...).

use crate::activation::Activation;
use crate::attention::{AttentionSpec, AttnImplementation, MaskSpec, SoftmaxPrecision};
use crate::cache::{Cache, LayerCache};
use crate::inputs::{prepare_causal, CausalInputs, CausalLimits};
use crate::layers::{layer_dropped, merge_heads, split_heads, Linear, MaybeAffineLayerNorm};
use crate::registry::{Architecture, BuildOptions, CausalLm, CausalLmOutput, Family};
use serde::Deserialize;
use serde_json::Value;
use tch::{nn, Kind, Tensor};
use vh_core::error::{check_positive, check_probabilities, parse_config};
use vh_core::ops::ScalarOps;
use vh_core::tensor::{min_value, TrainDropout};
use vh_core::{Error, Result};

/// OPT's position table has this many rows before position 0 (HF's `OPTLearnedPositionalEmbedding`
/// offset): default positions at padding are -1, which reads row 1.
pub const POSITION_OFFSET: i64 = 2;

/// The epsilon of every OPT LayerNorm (torch's default; OPT's config has none).
const LAYER_NORM_EPS: f64 = 1e-5;

mod defaults {
    pub fn vocab_size() -> i64 {
        50272
    }
    pub fn hidden_size() -> i64 {
        768
    }
    pub fn num_hidden_layers() -> i64 {
        12
    }
    pub fn ffn_dim() -> i64 {
        3072
    }
    pub fn max_position_embeddings() -> i64 {
        2048
    }
    pub fn dropout() -> f64 {
        0.1
    }
    pub fn num_attention_heads() -> i64 {
        12
    }
    pub fn activation_function() -> String {
        "relu".to_string()
    }
    pub fn pad_token_id() -> Option<i64> {
        Some(1)
    }
    pub fn yes() -> bool {
        true
    }
}

/// HF's `OPTConfig`: the fields that change the math, with transformers 4.57's defaults.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct OptConfig {
    /// Vocabulary size.
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: i64,
    /// Width of the decoder layers.
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: i64,
    /// Decoder layers.
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: i64,
    /// MLP inner width.
    #[serde(default = "defaults::ffn_dim")]
    pub ffn_dim: i64,
    /// Learned positions (the table has 2 more rows, see [`POSITION_OFFSET`]).
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: i64,
    /// Pre-LayerNorm blocks (most OPT sizes) or post-LayerNorm (OPT-350m).
    #[serde(default = "defaults::yes")]
    pub do_layer_norm_before: bool,
    /// Drops the final LayerNorm of a pre-norm model (checkpoints fine-tuned before
    /// transformers 4.20.1).
    #[serde(default, rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    /// Width of the token embeddings and of the LM head; `None` means `hidden_size`. When it
    /// differs, `project_in` / `project_out` map between the two widths.
    #[serde(default)]
    pub word_embed_proj_dim: Option<i64>,
    /// Dropout after the attention and the MLP (train mode).
    #[serde(default = "defaults::dropout")]
    pub dropout: f64,
    /// Dropout on attention probabilities (train mode).
    #[serde(default)]
    pub attention_dropout: f64,
    /// Attention heads.
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: i64,
    /// The MLP activation's name.
    #[serde(default = "defaults::activation_function")]
    pub activation_function: String,
    /// The probability of skipping each layer in train mode (LayerDrop).
    #[serde(default)]
    pub layerdrop: f64,
    /// Biases on the attention projections and the MLP.
    #[serde(default = "defaults::yes")]
    pub enable_bias: bool,
    /// Whether the LayerNorms have a learnable scale and shift.
    #[serde(default = "defaults::yes")]
    pub layer_norm_elementwise_affine: bool,
    /// The LM head shares the token embedding matrix (transformers' default for every config).
    #[serde(default = "defaults::yes")]
    pub tie_word_embeddings: bool,
    /// The token embedding's `padding_idx` (its row gets no gradient); null for none.
    #[serde(default = "defaults::pad_token_id")]
    pub pad_token_id: Option<i64>,
    /// How attention is computed (not part of config.json; HF's default is sdpa).
    #[serde(skip)]
    pub attn_implementation: AttnImplementation,
}

impl OptConfig {
    /// Parses a config.json value and checks it.
    pub fn from_json(config: &Value) -> Result<Self> {
        let cfg: Self = parse_config(config, "OPT")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks sizes, names and ranges: positive sizes, heads dividing the width, a known
    /// activation, probabilities in [0, 1], a padding index inside the vocabulary (HF's
    /// embedding refuses others).
    pub fn validate(&self) -> Result<()> {
        check_positive(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("ffn_dim", self.ffn_dim),
            ("max_position_embeddings", self.max_position_embeddings),
            ("num_attention_heads", self.num_attention_heads),
            ("word_embed_proj_dim", self.embed_dim()),
        ])?;
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::Config(format!(
                "hidden_size ({}) must be divisible by num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            )));
        }
        check_probabilities(&[
            ("dropout", self.dropout),
            ("attention_dropout", self.attention_dropout),
            ("layerdrop", self.layerdrop),
        ])?;
        if let Some(pad) = self.pad_token_id {
            if !(-self.vocab_size..self.vocab_size).contains(&pad) {
                return Err(Error::Config(format!(
                    "pad_token_id {pad} is outside the vocabulary of {} tokens",
                    self.vocab_size
                )));
            }
        }
        self.activation()?;
        Ok(())
    }

    /// Width of the token embeddings, the LM head and `last_hidden_state` (what TRL's value head
    /// reads): `word_embed_proj_dim`, or `hidden_size` without one.
    pub fn embed_dim(&self) -> i64 {
        self.word_embed_proj_dim.unwrap_or(self.hidden_size)
    }

    /// Width of each head.
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    /// Whether the decoder ends with a LayerNorm.
    pub fn has_final_layer_norm(&self) -> bool {
        self.do_layer_norm_before && !self.remove_final_layer_norm
    }

    /// The MLP activation.
    pub fn activation(&self) -> Result<Activation> {
        self.activation_function.parse()
    }

    /// The token embedding's padding row as torch normalises it (negative counts from the end),
    /// or -1 (none).
    fn padding_idx(&self) -> i64 {
        match self.pad_token_id {
            Some(p) if p < 0 => p + self.vocab_size,
            Some(p) => p,
            None => -1,
        }
    }
}

/// Maps an OPT checkpoint key to this model's parameter name: keys saved from the bare
/// `OPTModel` (`decoder.*`, as the original facebook/opt checkpoints) get the `model.` prefix.
pub fn parameter_name(key: &str) -> Option<String> {
    if key.starts_with("decoder.") {
        return Some(format!("model.{key}"));
    }
    Some(key.to_string())
}

/// Multi-head self-attention whose queries are scaled before the score product.
#[derive(Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: i64,
    head_dim: i64,
    dropout: f64,
    attn_implementation: AttnImplementation,
}

impl Attention {
    /// Creates the q/k/v/out projections under `vs`.
    pub fn new(vs: nn::Path, cfg: &OptConfig) -> Result<Self> {
        let (h, bias) = (cfg.hidden_size, cfg.enable_bias);
        Ok(Self {
            k_proj: Linear::new(vs.sub("k_proj"), h, h, bias)?,
            v_proj: Linear::new(vs.sub("v_proj"), h, h, bias)?,
            q_proj: Linear::new(vs.sub("q_proj"), h, h, bias)?,
            out_proj: Linear::new(vs.sub("out_proj"), h, h, bias)?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            dropout: cfg.attention_dropout,
            attn_implementation: cfg.attn_implementation,
        })
    }

    /// HF's order: the queries already carry `head_dim^-0.5`, so the scores get no further
    /// scaling (HF passes `scaling=1.0`); the dtype's minimum on future and padded keys; softmax
    /// in f32.
    fn spec(&self, kind: Kind) -> AttentionSpec {
        AttentionSpec {
            implementation: self.attn_implementation,
            score_ops: vec![],
            softmax: SoftmaxPrecision::F32,
            dropout: self.dropout,
            future: min_value(kind),
            causal: true,
        }
    }

    /// Attends from `x` [B, T, hidden] over cached and new positions, adding `bias`
    /// [B or 1, 1, T, S] to the scores (`None`: the causal rule alone).
    pub fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        past: Option<&LayerCache>,
        train: bool,
    ) -> Result<(Tensor, LayerCache)> {
        let d = self.head_dim;
        let q = self.q_proj.forward(x)?.s_mul((d as f64).powf(-0.5))?;
        let q = split_heads(&q, self.heads, d)?;
        let k = split_heads(&self.k_proj.forward(x)?, self.heads, d)?;
        let v = split_heads(&self.v_proj.forward(x)?, self.heads, d)?;
        let cache = match past {
            Some(past) => past.append(&k, &v)?,
            None => LayerCache::new(k, v),
        };
        let attended = self
            .spec(q.kind())
            .attend(&q, &cache.keys, &cache.values, bias, train)?;
        Ok((self.out_proj.forward(&merge_heads(&attended)?)?, cache))
    }
}

/// One decoder layer (`OPTDecoderLayer`), pre- or post-LayerNorm.
#[derive(Debug)]
pub struct DecoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: MaybeAffineLayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: MaybeAffineLayerNorm,
    act: Activation,
    do_layer_norm_before: bool,
    dropout: f64,
}

impl DecoderLayer {
    /// Creates the layer's parameters under `vs`.
    pub fn new(vs: nn::Path, cfg: &OptConfig) -> Result<Self> {
        let (h, affine) = (cfg.hidden_size, cfg.layer_norm_elementwise_affine);
        Ok(Self {
            self_attn: Attention::new(vs.sub("self_attn"), cfg)?,
            self_attn_layer_norm: MaybeAffineLayerNorm::new(vs.sub("self_attn_layer_norm"), h, LAYER_NORM_EPS, affine)?,
            fc1: Linear::new(vs.sub("fc1"), h, cfg.ffn_dim, cfg.enable_bias)?,
            fc2: Linear::new(vs.sub("fc2"), cfg.ffn_dim, h, cfg.enable_bias)?,
            final_layer_norm: MaybeAffineLayerNorm::new(vs.sub("final_layer_norm"), h, LAYER_NORM_EPS, affine)?,
            act: cfg.activation()?,
            do_layer_norm_before: cfg.do_layer_norm_before,
            dropout: cfg.dropout,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        past: Option<&LayerCache>,
        train: bool,
    ) -> Result<(Tensor, LayerCache)> {
        let pre = self.do_layer_norm_before;
        let normed = if pre {
            self.self_attn_layer_norm.forward(x)?
        } else {
            x.shallow_clone()
        };
        let (attn, cache) = self.self_attn.forward(&normed, bias, past, train)?;
        let mut h = x.f_add(&attn.train_dropout(self.dropout, train)?)?;
        if !pre {
            h = self.self_attn_layer_norm.forward(&h)?;
        }
        // HF runs the MLP on [B * T, hidden] rows.
        let shape = h.size();
        let residual = h.f_reshape([-1, shape[2]])?;
        let normed = if pre {
            self.final_layer_norm.forward(&residual)?
        } else {
            residual.shallow_clone()
        };
        let mlp = self
            .fc2
            .forward(&self.act.forward(&self.fc1.forward(&normed)?)?)?
            .train_dropout(self.dropout, train)?;
        let mut out = residual.f_add(&mlp)?.f_view(shape.as_slice())?;
        if !pre {
            out = self.final_layer_norm.forward(&out)?;
        }
        Ok((out, cache))
    }
}

/// OPT with its LM head (`OPTForCausalLM`).
#[derive(Debug)]
pub struct OptForCausalLM {
    /// `model.decoder.embed_tokens.weight` [vocab, word_embed_proj_dim].
    pub embed_tokens: Tensor,
    /// `model.decoder.embed_positions.weight` [max_position_embeddings + 2, hidden].
    pub embed_positions: Tensor,
    project_in: Option<Linear>,
    project_out: Option<Linear>,
    layers: Vec<DecoderLayer>,
    final_layer_norm: Option<MaybeAffineLayerNorm>,
    /// `lm_head.weight` [vocab, word_embed_proj_dim]; the token embedding when tied; `None` when
    /// built without an LM head.
    pub lm_head: Option<Tensor>,
    cfg: OptConfig,
}

impl OptForCausalLM {
    /// Creates `model.decoder.*` and, unless tied, `lm_head.weight` under `vs`.
    pub fn new(vs: nn::Path, cfg: &OptConfig) -> Result<Self> {
        Self::with_head(vs, cfg, true)
    }

    /// [`OptForCausalLM::new`], with or without the LM head (`model.decoder.*` alone, for a
    /// backbone under another head).
    pub fn with_head(vs: nn::Path, cfg: &OptConfig, lm_head: bool) -> Result<Self> {
        cfg.validate()?;
        let decoder = vs.sub("model").sub("decoder");
        let zeros = nn::Init::Const(0.0);
        let (hidden, embed) = (cfg.hidden_size, cfg.embed_dim());
        let rows = cfg
            .max_position_embeddings
            .checked_add(POSITION_OFFSET)
            .ok_or_else(|| Error::Config("max_position_embeddings is too large".into()))?;
        let embed_tokens =
            vh_core::param::var(&decoder.sub("embed_tokens"), "weight", &[cfg.vocab_size, embed], zeros)?;
        let embed_positions = vh_core::param::var(&decoder.sub("embed_positions"), "weight", &[rows, hidden], zeros)?;
        let (project_in, project_out) = if embed != hidden {
            (
                Some(Linear::new(decoder.sub("project_in"), embed, hidden, false)?),
                Some(Linear::new(decoder.sub("project_out"), hidden, embed, false)?),
            )
        } else {
            (None, None)
        };
        let final_layer_norm = if cfg.has_final_layer_norm() {
            Some(MaybeAffineLayerNorm::new(
                decoder.sub("final_layer_norm"),
                hidden,
                LAYER_NORM_EPS,
                cfg.layer_norm_elementwise_affine,
            )?)
        } else {
            None
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(decoder.sub("layers").sub(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = match (lm_head, cfg.tie_word_embeddings) {
            (false, _) => None,
            (true, true) => Some(embed_tokens.shallow_clone()),
            (true, false) => Some(vh_core::param::var(
                &vs.sub("lm_head"),
                "weight",
                &[cfg.vocab_size, embed],
                zeros,
            )?),
        };
        Ok(Self {
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            layers,
            final_layer_norm,
            lm_head,
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &OptConfig {
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

    /// What the inputs of a pass are checked against: learned positions bound the sequence.
    pub fn limits(&self) -> CausalLimits {
        CausalLimits {
            vocab_size: self.cfg.vocab_size,
            num_layers: self.layers.len(),
            max_positions: Some(self.cfg.max_position_embeddings),
        }
    }

    /// Runs the model over `input_ids` [B, T] after the cached positions; `attention_mask`
    /// [B, past + T]. Without `position_ids`, positions are numbered from the mask as HF's OPT
    /// forward does (see [`mask_positions`]).
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
}

/// OPT's default position ids for the last `new_len` of `mask`'s positions (bool
/// [batch, past + new]): HF's `cumsum(mask) * mask - 1`, so each token's index among its row's
/// attended tokens, and -1 at padding (unlike HF generate's 1).
pub fn mask_positions(mask: &Tensor, new_len: i64) -> Result<Tensor> {
    let mask = mask.f_to_kind(Kind::Int64)?;
    let total = mask.size()[1];
    let positions = mask.f_cumsum(1, Kind::Int64)?.f_mul(&mask)?.s_sub(1)?;
    Ok(positions.f_narrow(1, total - new_len, new_len)?)
}

impl CausalLm for OptForCausalLM {
    fn model_type(&self) -> &'static str {
        "opt"
    }

    fn vocab_size(&self) -> i64 {
        self.cfg.vocab_size
    }

    fn hidden_size(&self) -> i64 {
        // last_hidden_state (HF's hidden_states[-1], after project_out) is this wide, and TRL's
        // value head reads `word_embed_proj_dim`.
        self.cfg.embed_dim()
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn max_positions(&self) -> Option<i64> {
        Some(self.cfg.max_position_embeddings)
    }

    fn forward_hidden(&self, inputs: &CausalInputs<'_>, train: bool) -> Result<(Tensor, Cache)> {
        let device = self.embed_tokens.device();
        let kind = self.embed_tokens.kind();
        let (batch, new_len, past_len) = (inputs.batch, inputs.new_len, inputs.past_len);
        // HF's OPT numbers default positions from the mask (its forward, not only generate);
        // without padding that is `past..past + T`, the prepared default.
        let positions = match (&inputs.key_mask, inputs.explicit_positions) {
            (Some(mask), false) => mask_positions(mask, new_len)?,
            _ => inputs.position_ids.shallow_clone(),
        };
        // HF's eager mask (its own `_update_causal_mask`): the dtype's minimum on future and
        // padded keys alike. Without padding the layers apply the causal rule themselves.
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
        let mut tokens = Tensor::f_embedding(
            &self.embed_tokens,
            &inputs.input_ids,
            self.cfg.padding_idx(),
            false,
            false,
        )?;
        let positions = Tensor::f_embedding(
            &self.embed_positions,
            &positions.s_add(POSITION_OFFSET)?,
            -1,
            false,
            false,
        )?;
        if let Some(project_in) = &self.project_in {
            tokens = project_in.forward(&tokens)?;
        }
        let mut h = tokens.f_add(&positions)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let past = inputs.past.map(|p| &p.layers[i]);
            let (out, cache) = layer.forward(&h, bias.as_ref(), past, train)?;
            // LayerDrop skips the layer's output, as HF; its keys and values still enter the
            // cache so that the cache keeps one entry per layer.
            if !layer_dropped(self.cfg.layerdrop, train)? {
                h = out;
            }
            layers.push(cache);
        }
        if let Some(norm) = &self.final_layer_norm {
            h = norm.forward(&h)?;
        }
        if let Some(project_out) = &self.project_out {
            h = project_out.forward(&h)?;
        }
        Ok((h, Cache { layers }))
    }

    fn lm_head(&self) -> Option<&Tensor> {
        self.lm_head.as_ref()
    }

    fn parameter_name(&self, key: &str) -> Option<String> {
        OptForCausalLM::parameter_name(self, key)
    }

    fn tied_aliases(&self) -> Vec<(&'static str, &'static str)> {
        if self.cfg.tie_word_embeddings && self.lm_head.is_some() {
            vec![("lm_head.weight", "model.decoder.embed_tokens.weight")]
        } else {
            vec![]
        }
    }

    /// `OPTDecoder` registers its embeddings, projections and final norm before its layers.
    fn parameter_position(&self, name: &str) -> crate::ParamPosition {
        match crate::ParamPosition::by_name(name) {
            crate::ParamPosition::AfterLayers if name.starts_with("model.decoder.") => {
                crate::ParamPosition::BeforeLayers
            }
            other => other,
        }
    }

    fn is_lookup_only(&self, name: &str) -> bool {
        name == "model.decoder.embed_positions.weight"
            || (!(self.cfg.tie_word_embeddings && self.lm_head.is_some())
                && name == "model.decoder.embed_tokens.weight")
    }
}

/// OPT's registry entry.
pub const ARCHITECTURE: Architecture = Architecture {
    model_type: "opt",
    name: "OPT",
    family: Family::Causal(build),
    default_attention: AttnImplementation::Sdpa,
    tiny_config,
};

fn build(vs: nn::Path, config: &Value, options: &BuildOptions) -> Result<Box<dyn CausalLm>> {
    let mut cfg = OptConfig::from_json(config)?;
    cfg.attn_implementation = options
        .attn_implementation
        .unwrap_or_else(|| ARCHITECTURE.default_attention_on(vs.device()));
    Ok(Box::new(OptForCausalLM::with_head(vs, &cfg, !options.without_lm_head)?))
}

fn tiny_config() -> Value {
    serde_json::json!({
        "model_type": "opt", "architectures": ["OPTForCausalLM"], "vocab_size": 50, "hidden_size": 16,
        "ffn_dim": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 32,
        "word_embed_proj_dim": 8, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tch::nn::VarStore;
    use tch::Device;

    fn tiny(extra: Value) -> OptConfig {
        let mut cfg = tiny_config();
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        OptConfig::from_json(&cfg).unwrap()
    }

    fn random_model(cfg: &OptConfig) -> (VarStore, OptForCausalLM) {
        let vs = VarStore::new(Device::Cpu);
        let model = OptForCausalLM::new(vs.root(), cfg).unwrap();
        crate::test_util::randomize(&vs, 7, 0.3);
        (vs, model)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn config_defaults_match_hf() {
        let cfg = OptConfig::from_json(&json!({})).unwrap();
        assert_eq!(
            (
                cfg.vocab_size,
                cfg.hidden_size,
                cfg.num_hidden_layers,
                cfg.ffn_dim,
                cfg.max_position_embeddings,
                cfg.num_attention_heads
            ),
            (50272, 768, 12, 3072, 2048, 12)
        );
        assert_eq!(cfg.embed_dim(), 768, "word_embed_proj_dim defaults to hidden_size");
        assert_eq!(cfg.activation_function, "relu");
        assert!(cfg.do_layer_norm_before && !cfg.remove_final_layer_norm && cfg.has_final_layer_norm());
        assert!(cfg.enable_bias && cfg.layer_norm_elementwise_affine && cfg.tie_word_embeddings);
        assert_eq!((cfg.dropout, cfg.attention_dropout, cfg.layerdrop), (0.1, 0.0, 0.0));
        assert_eq!(cfg.pad_token_id, Some(1));
        let explicit_null = OptConfig::from_json(&json!({"word_embed_proj_dim": null, "pad_token_id": null})).unwrap();
        assert_eq!((explicit_null.embed_dim(), explicit_null.padding_idx()), (768, -1));
        let removed = OptConfig::from_json(&json!({"_remove_final_layer_norm": true})).unwrap();
        assert!(!removed.has_final_layer_norm());
        assert!(!OptConfig::from_json(&json!({"do_layer_norm_before": false}))
            .unwrap()
            .has_final_layer_norm());
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let bad = |extra: Value| {
            let mut cfg = tiny_config();
            for (k, v) in extra.as_object().unwrap() {
                cfg[k] = v.clone();
            }
            match OptConfig::from_json(&cfg) {
                Err(Error::Config(msg)) => msg,
                other => panic!("{extra}: expected a config error, got {other:?}"),
            }
        };
        assert!(bad(json!({"num_attention_heads": 3})).contains("divisible"));
        assert!(bad(json!({"word_embed_proj_dim": 0})).contains("word_embed_proj_dim"));
        assert!(bad(json!({"activation_function": "nope"})).contains("nope"));
        assert!(bad(json!({"layerdrop": 1.5})).contains("layerdrop"));
        assert!(bad(json!({"dropout": -0.1})).contains("dropout"));
        assert!(bad(json!({"pad_token_id": 50})).contains("pad_token_id"));
        assert!(bad(json!({"max_position_embeddings": 0})).contains("max_position_embeddings"));
        assert!(bad(json!({"ffn_dim": "wide"})).contains("OPT"));
        assert!(bad(json!({"hidden_size": null})).contains("OPT"));
        // An embedding table whose rows overflow is refused before anything is allocated.
        let vs = VarStore::new(Device::Cpu);
        let huge = tiny(json!({"max_position_embeddings": i64::MAX}));
        assert!(matches!(OptForCausalLM::new(vs.root(), &huge), Err(Error::Config(_))));
    }

    #[test]
    fn parameter_names_follow_hf() {
        let vs = VarStore::new(Device::Cpu);
        let model = OptForCausalLM::new(vs.root(), &tiny(json!({}))).unwrap();
        let names = vs.variables();
        for n in [
            "model.decoder.embed_tokens.weight",
            "model.decoder.embed_positions.weight",
            "model.decoder.project_in.weight",
            "model.decoder.project_out.weight",
            "model.decoder.final_layer_norm.weight",
            "model.decoder.layers.1.self_attn.out_proj.bias",
            "model.decoder.layers.0.self_attn_layer_norm.bias",
            "model.decoder.layers.0.fc1.weight",
        ] {
            assert!(names.contains_key(n), "{n}");
        }
        assert!(!names.contains_key("lm_head.weight"), "tied by default");
        assert_eq!(names["model.decoder.embed_tokens.weight"].size(), vec![50, 8]);
        assert_eq!(names["model.decoder.embed_positions.weight"].size(), vec![34, 16]);
        assert_eq!(names["model.decoder.project_in.weight"].size(), vec![16, 8]);
        assert_eq!(
            CausalLm::hidden_size(&model),
            8,
            "the value head reads word_embed_proj_dim"
        );
        assert_eq!(model.parameter_name("lm_head.weight"), None);
        assert_eq!(
            parameter_name("decoder.layers.0.fc1.weight").unwrap(),
            "model.decoder.layers.0.fc1.weight"
        );

        let vs = VarStore::new(Device::Cpu);
        let _plain = OptForCausalLM::new(
            vs.root(),
            &tiny(
                json!({"word_embed_proj_dim": 16, "enable_bias": false, "layer_norm_elementwise_affine": false,
                         "do_layer_norm_before": false, "tie_word_embeddings": false}),
            ),
        )
        .unwrap();
        let names = vs.variables();
        assert!(names.contains_key("lm_head.weight"));
        for absent in [
            "model.decoder.project_in.weight",
            "model.decoder.final_layer_norm.weight",
            "model.decoder.layers.0.self_attn_layer_norm.weight",
            "model.decoder.layers.0.fc1.bias",
            "model.decoder.layers.0.self_attn.q_proj.bias",
        ] {
            assert!(!names.contains_key(absent), "{absent}");
        }
    }

    #[test]
    fn default_positions_follow_the_mask_and_explicit_ones_are_used_as_given() {
        let mask = Tensor::from_slice2(&[[false, false, true, true], [true, true, true, false]]);
        let all = Vec::<Vec<i64>>::try_from(mask_positions(&mask, 4).unwrap()).unwrap();
        assert_eq!(all, vec![vec![-1, -1, 0, 1], vec![0, 1, 2, -1]]);
        let last = Vec::<Vec<i64>>::try_from(mask_positions(&mask, 1).unwrap()).unwrap();
        assert_eq!(last, vec![vec![1], vec![-1]]);

        let (_vs, model) = random_model(&tiny(json!({})));
        let plain = model
            .forward(&Tensor::from_slice2(&[[7i64, 8, 9]]), None, None, None, false)
            .unwrap();
        let padded = Tensor::from_slice2(&[[0i64, 0, 7, 8, 9]]);
        let pad_mask = Tensor::from_slice2(&[[0i64, 0, 1, 1, 1]]);
        // The default call numbers the left-padded row from its first token: equal to unpadded.
        let default = model.forward(&padded, Some(&pad_mask), None, None, false).unwrap();
        assert!(max_diff(&default.logits.narrow(1, 2, 3), &plain.logits) < 1e-5);
        // Explicit 0..T positions are used as given, and shift the row.
        let counted = Tensor::arange(5, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let explicit = model
            .forward(&padded, Some(&pad_mask), Some(&counted), None, false)
            .unwrap();
        assert!(max_diff(&explicit.logits.narrow(1, 2, 3), &plain.logits) > 1e-3);
        // HF generate's positions differ from the default only at the padding (1 instead of -1).
        let generate_positions = vh_core::tensor::position_ids_from_attention_mask(&pad_mask, 5).unwrap();
        let gen = model
            .forward(&padded, Some(&pad_mask), Some(&generate_positions), None, false)
            .unwrap();
        assert!(max_diff(&gen.logits.narrow(1, 2, 3), &plain.logits) < 1e-5);
        assert!(max_diff(&gen.logits.narrow(1, 0, 2), &default.logits.narrow(1, 0, 2)) > 1e-4);
    }

    #[test]
    fn incremental_decoding_with_padding_equals_full_forward_for_each_layout() {
        for extra in [
            json!({}),
            json!({"do_layer_norm_before": false, "word_embed_proj_dim": 16}),
            json!({"_remove_final_layer_norm": true, "layer_norm_elementwise_affine": false, "enable_bias": false}),
        ] {
            let (_vs, model) = random_model(&tiny(extra.clone()));
            let ids = Tensor::from_slice2(&[[0i64, 0, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12]]);
            let mask = Tensor::from_slice2(&[[0i64, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]);
            let full = model.forward(&ids, Some(&mask), None, None, false).unwrap();
            let mut cache = model
                .forward(&ids.narrow(1, 0, 3), Some(&mask.narrow(1, 0, 3)), None, None, false)
                .unwrap()
                .cache;
            for t in 3..6 {
                let step = model
                    .forward(
                        &ids.narrow(1, t, 1),
                        Some(&mask.narrow(1, 0, t + 1)),
                        None,
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

    #[test]
    fn long_inputs_and_positions_are_typed_errors() {
        let (_vs, model) = random_model(&tiny(json!({})));
        let long = Tensor::zeros([1, 33], (Kind::Int64, Device::Cpu));
        assert!(matches!(
            model.forward(&long, None, None, None, false),
            Err(Error::InvalidInput(_))
        ));
        let ids = Tensor::from_slice2(&[[1i64, 2]]);
        let beyond = Tensor::from_slice2(&[[0i64, 32]]);
        assert!(model.forward(&ids, None, Some(&beyond), None, false).is_err());
        let negative = Tensor::from_slice2(&[[-1i64, 0]]);
        assert!(model.forward(&ids, None, Some(&negative), None, false).is_err());
        let cache = model
            .forward(
                &Tensor::zeros([1, 30], (Kind::Int64, Device::Cpu)),
                None,
                None,
                None,
                false,
            )
            .unwrap()
            .cache;
        let err = model.forward(
            &Tensor::zeros([1, 3], (Kind::Int64, Device::Cpu)),
            None,
            None,
            Some(&cache),
            false,
        );
        assert!(matches!(err, Err(Error::InvalidInput(_))), "{err:?}");
    }

    #[test]
    fn dropout_and_layerdrop_act_only_in_train_mode() {
        let (_vs, model) = random_model(&tiny(json!({"layerdrop": 0.5})));
        let ids = Tensor::from_slice2(&[[1i64, 2, 3, 4]]);
        let a = model.forward(&ids, None, None, None, false).unwrap();
        assert!(a
            .logits
            .equal(&model.forward(&ids, None, None, None, false).unwrap().logits));
        tch::manual_seed(3);
        let trained = model.forward(&ids, None, None, None, true).unwrap();
        assert!(!a.logits.equal(&trained.logits));
        assert_eq!(
            trained.cache.layers.len(),
            2,
            "one cache entry per layer, dropped or not"
        );
    }
}

//! GPT-2, as HF's `modeling_gpt2.py`: parameters named like its state dict
//! (`transformer.h.0.attn.c_attn.weight`, ...), Conv1D weights stored [in, out].

use crate::activation::Activation;
use crate::attention::{AttentionSpec, AttnImplementation, ScoreOp, SoftmaxPrecision};
use crate::cache::{Cache, LayerCache};
use crate::inputs::{prepare_causal, CausalInputs, CausalLimits};
use crate::layers::{merge_heads, split_heads, Conv1D, LayerNorm};
use crate::registry::{Architecture, BuildOptions, CausalLm, CausalLmOutput, Family};
use serde::Deserialize;
use tch::{nn, Kind, Tensor};
use vh_core::error::{check_epsilons, check_positive, check_probabilities, parse_config};
use vh_core::tensor::TrainDropout;
use vh_core::{Error, Result};

fn default_vocab_size() -> i64 {
    50257
}
fn default_n_positions() -> i64 {
    1024
}
fn default_n_embd() -> i64 {
    768
}
fn default_n_layer() -> i64 {
    12
}
fn default_n_head() -> i64 {
    12
}
fn default_activation() -> String {
    "gelu_new".to_string()
}
fn default_pdrop() -> f64 {
    0.1
}
fn default_layer_norm_epsilon() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

/// HF's `GPT2Config`: the fields that change the math, with HF's defaults.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Gpt2Config {
    /// Vocabulary size.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: i64,
    /// Longest sequence (cache included) the position embeddings cover.
    #[serde(default = "default_n_positions")]
    pub n_positions: i64,
    /// Hidden size.
    #[serde(default = "default_n_embd")]
    pub n_embd: i64,
    /// Number of blocks.
    #[serde(default = "default_n_layer")]
    pub n_layer: i64,
    /// Attention heads per block.
    #[serde(default = "default_n_head")]
    pub n_head: i64,
    /// MLP inner width; `None` means 4 * n_embd.
    #[serde(default)]
    pub n_inner: Option<i64>,
    /// The MLP activation's name.
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// Dropout after attention and MLP projections (train mode).
    #[serde(default = "default_pdrop")]
    pub resid_pdrop: f64,
    /// Dropout after the embeddings (train mode).
    #[serde(default = "default_pdrop")]
    pub embd_pdrop: f64,
    /// Dropout on attention probabilities (train mode).
    #[serde(default = "default_pdrop")]
    pub attn_pdrop: f64,
    /// LayerNorm epsilon.
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    /// Divide attention scores by sqrt(head_dim).
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    /// Also divide attention scores by (layer index + 1).
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Scale before the score product and compute scores and softmax in f32.
    #[serde(default)]
    pub reorder_and_upcast_attn: bool,
    /// The LM head shares the token embedding matrix.
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// How attention is computed (not part of config.json; HF's default is sdpa).
    #[serde(skip)]
    pub attn_implementation: AttnImplementation,
}

impl Gpt2Config {
    /// Parses a config.json value and checks that the sizes are consistent.
    pub fn from_json(config: &serde_json::Value) -> Result<Self> {
        let cfg: Self = parse_config(config, "GPT-2")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks sizes and names: positive sizes, heads dividing the width, a known activation,
    /// dropout probabilities in [0, 1].
    pub fn validate(&self) -> Result<()> {
        // The default MLP width is 4 * n_embd: an n_embd from config.json near i64::MAX would
        // overflow it (found by fuzzing: a panic in debug builds, a wrapped width in release).
        if self.n_inner.is_none() && self.n_embd.checked_mul(4).is_none() {
            return Err(Error::Config(format!(
                "n_embd ({}) is too large: the MLP width 4 * n_embd overflows",
                self.n_embd
            )));
        }
        check_positive(&[
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_inner", self.inner_dim()),
        ])?;
        if self.n_embd % self.n_head != 0 {
            return Err(Error::Config(format!(
                "n_embd ({}) must be divisible by n_head ({})",
                self.n_embd, self.n_head
            )));
        }
        check_probabilities(&[
            ("resid_pdrop", self.resid_pdrop),
            ("embd_pdrop", self.embd_pdrop),
            ("attn_pdrop", self.attn_pdrop),
        ])?;
        check_epsilons(&[("layer_norm_epsilon", self.layer_norm_epsilon)])?;
        self.activation()?;
        Ok(())
    }

    /// The MLP's inner width.
    pub fn inner_dim(&self) -> i64 {
        // Saturating, so that an unchecked config cannot panic here; `validate` refuses it.
        self.n_inner.unwrap_or(self.n_embd.saturating_mul(4))
    }

    /// The MLP activation.
    pub fn activation(&self) -> Result<Activation> {
        self.activation_function.parse()
    }
}

/// Maps a GPT-2 checkpoint key to this model's parameter name: legacy keys without the
/// `transformer.` prefix get it, and the attention buffers (`attn.bias`, `attn.masked_bias`),
/// which hold no parameters, map to `None`.
pub fn parameter_name(key: &str) -> Option<String> {
    if key.ends_with(".attn.bias") || key.ends_with(".attn.masked_bias") {
        return None;
    }
    let legacy = ["h.", "wte.", "wpe.", "ln_f."];
    if legacy.iter().any(|p| key.starts_with(p)) {
        return Some(format!("transformer.{key}"));
    }
    Some(key.to_string())
}

/// Causal self-attention with a fused q/k/v projection.
#[derive(Debug)]
pub struct Attention {
    c_attn: Conv1D,
    c_proj: Conv1D,
    n_head: i64,
    head_dim: i64,
    layer_idx: i64,
    scale_attn_weights: bool,
    scale_attn_by_inverse_layer_idx: bool,
    reorder_and_upcast_attn: bool,
    attn_pdrop: f64,
    resid_pdrop: f64,
    attn_implementation: AttnImplementation,
}

impl Attention {
    /// Creates `c_attn` and `c_proj` under `vs` for block `layer_idx`.
    pub fn new(vs: nn::Path, cfg: &Gpt2Config, layer_idx: i64) -> Result<Self> {
        Ok(Self {
            c_attn: Conv1D::new(vs.sub("c_attn"), cfg.n_embd, 3 * cfg.n_embd)?,
            c_proj: Conv1D::new(vs.sub("c_proj"), cfg.n_embd, cfg.n_embd)?,
            n_head: cfg.n_head,
            head_dim: cfg.n_embd / cfg.n_head,
            layer_idx,
            scale_attn_weights: cfg.scale_attn_weights,
            scale_attn_by_inverse_layer_idx: cfg.scale_attn_by_inverse_layer_idx,
            reorder_and_upcast_attn: cfg.reorder_and_upcast_attn,
            attn_pdrop: cfg.attn_pdrop,
            resid_pdrop: cfg.resid_pdrop,
            attn_implementation: cfg.attn_implementation,
        })
    }

    /// How this layer attends: HF's eager order of operations (divide by sqrt(head_dim), then by
    /// layer + 1, softmax in the scores' kind), or the fused kernel with the same scale. The
    /// upcast variant scales before the product and keeps f32 through the softmax, as HF's
    /// `_upcast_and_reordered_attn`, so half-precision scores cannot overflow: it stays eager.
    fn spec(&self) -> AttentionSpec {
        let mut score_ops = Vec::new();
        if self.scale_attn_weights {
            score_ops.push(ScoreOp::Div((self.head_dim as f64).sqrt()));
        }
        if self.scale_attn_by_inverse_layer_idx {
            score_ops.push(ScoreOp::Div((self.layer_idx + 1) as f64));
        }
        let mut spec = AttentionSpec {
            implementation: self.attn_implementation,
            score_ops,
            softmax: SoftmaxPrecision::Scores,
            dropout: self.attn_pdrop,
            // HF's causal fill (-inf) on top of its padding mask.
            future: f64::NEG_INFINITY,
            causal: true,
        };
        if self.reorder_and_upcast_attn {
            let scale = spec.scale();
            spec.implementation = AttnImplementation::Eager;
            spec.score_ops = vec![ScoreOp::Mul(scale)];
            spec.softmax = SoftmaxPrecision::F32;
        }
        spec
    }

    /// Attends from `x` [B, T, C] over the cached and new positions, adding `bias`
    /// [B or 1, 1, T, S] to the scores (see [`crate::attention::MaskSpec`]); `None` means the
    /// causal rule alone.
    pub fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        past: Option<&LayerCache>,
        train: bool,
    ) -> Result<(Tensor, LayerCache)> {
        let c = x.size()[2];
        let qkv = self.c_attn.forward(x)?;
        let parts = qkv.f_split(c, 2)?;
        let query = split_heads(&parts[0], self.n_head, self.head_dim)?;
        let key = split_heads(&parts[1], self.n_head, self.head_dim)?;
        let value = split_heads(&parts[2], self.n_head, self.head_dim)?;
        let cache = match past {
            Some(past) => past.append(&key, &value)?,
            None => LayerCache::new(key, value),
        };
        let spec = self.spec();
        let attended = if self.reorder_and_upcast_attn {
            let (q, k) = (query.f_to_kind(Kind::Float)?, cache.keys.f_to_kind(Kind::Float)?);
            spec.attend(&q, &k, &cache.values, bias, train)?
        } else if spec.implementation == AttnImplementation::Sdpa {
            // The fused CPU kernel is markedly slower on the strided views the qkv split gives.
            let (q, k, v) = (
                query.f_contiguous()?,
                cache.keys.f_contiguous()?,
                cache.values.f_contiguous()?,
            );
            spec.attend(&q, &k, &v, bias, train)?
        } else {
            spec.attend(&query, &cache.keys, &cache.values, bias, train)?
        };
        let out = self
            .c_proj
            .forward(&merge_heads(&attended)?)?
            .train_dropout(self.resid_pdrop, train)?;
        Ok((out, cache))
    }
}

/// The feed-forward block: `c_fc`, activation, `c_proj`, dropout.
#[derive(Debug)]
pub struct Mlp {
    c_fc: Conv1D,
    c_proj: Conv1D,
    act: Activation,
    resid_pdrop: f64,
}

impl Mlp {
    /// Creates `c_fc` and `c_proj` under `vs`.
    pub fn new(vs: nn::Path, cfg: &Gpt2Config) -> Result<Self> {
        Ok(Self {
            c_fc: Conv1D::new(vs.sub("c_fc"), cfg.n_embd, cfg.inner_dim())?,
            c_proj: Conv1D::new(vs.sub("c_proj"), cfg.inner_dim(), cfg.n_embd)?,
            act: cfg.activation()?,
            resid_pdrop: cfg.resid_pdrop,
        })
    }

    /// [B, T, C] -> [B, T, C].
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.act.forward(&self.c_fc.forward(x)?)?;
        self.c_proj.forward(&h)?.train_dropout(self.resid_pdrop, train)
    }
}

/// One transformer block: pre-norm attention and MLP with residuals.
#[derive(Debug)]
pub struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    /// Creates block `layer_idx` under `vs` (`ln_1`, `attn`, `ln_2`, `mlp`).
    pub fn new(vs: nn::Path, cfg: &Gpt2Config, layer_idx: i64) -> Result<Self> {
        Ok(Self {
            ln_1: LayerNorm::new(vs.sub("ln_1"), cfg.n_embd, cfg.layer_norm_epsilon)?,
            attn: Attention::new(vs.sub("attn"), cfg, layer_idx)?,
            ln_2: LayerNorm::new(vs.sub("ln_2"), cfg.n_embd, cfg.layer_norm_epsilon)?,
            mlp: Mlp::new(vs.sub("mlp"), cfg)?,
        })
    }

    /// [B, T, C] -> [B, T, C] and this layer's updated cache.
    pub fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        past: Option<&LayerCache>,
        train: bool,
    ) -> Result<(Tensor, LayerCache)> {
        let (attn, cache) = self.attn.forward(&self.ln_1.forward(x)?, bias, past, train)?;
        // Fallible additions throughout: an allocation that fails (a long input under a memory
        // limit) must come back as an error, not a panic inside tch's operator overloads.
        let x = x.f_add(&attn)?;
        let mlp = self.mlp.forward(&self.ln_2.forward(&x)?, train)?;
        Ok((x.f_add(&mlp)?, cache))
    }
}

/// The output of a GPT-2 backbone pass.
#[derive(Debug)]
pub struct Gpt2Output {
    /// The final LayerNorm's output, [B, T, C] (HF's `hidden_states[-1]`).
    pub last_hidden_state: Tensor,
    /// Keys and values for the cached and new positions.
    pub cache: Cache,
}

/// The GPT-2 transformer (`transformer.*`): embeddings, blocks, final LayerNorm.
#[derive(Debug)]
pub struct Gpt2Model {
    /// Token embeddings [vocab, C].
    pub wte: Tensor,
    /// Position embeddings [n_positions, C].
    pub wpe: Tensor,
    h: Vec<Block>,
    ln_f: LayerNorm,
    cfg: Gpt2Config,
}

impl Gpt2Model {
    /// Creates the transformer's parameters under `vs` (conventionally `transformer`).
    pub fn new(vs: nn::Path, cfg: &Gpt2Config) -> Result<Self> {
        cfg.validate()?;
        let zeros = nn::Init::Const(0.0);
        let wte = vh_core::param::var(&vs.sub("wte"), "weight", &[cfg.vocab_size, cfg.n_embd], zeros)?;
        let wpe = vh_core::param::var(&vs.sub("wpe"), "weight", &[cfg.n_positions, cfg.n_embd], zeros)?;
        let h = (0..cfg.n_layer)
            .map(|i| Block::new(vs.sub("h").sub(i), cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(vs.sub("ln_f"), cfg.n_embd, cfg.layer_norm_epsilon)?;
        Ok(Self {
            wte,
            wpe,
            h,
            ln_f,
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.cfg
    }

    /// What the inputs of a pass are checked against.
    pub fn limits(&self) -> CausalLimits {
        CausalLimits {
            vocab_size: self.cfg.vocab_size,
            num_layers: self.h.len(),
            max_positions: Some(self.cfg.n_positions),
        }
    }

    /// Runs the transformer over `input_ids` [B, T] after the positions in `past`; see
    /// [`crate::inputs::prepare_causal`] for the mask and the positions (by default
    /// `past..past + T`, as HF's forward).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        past: Option<&Cache>,
        train: bool,
    ) -> Result<Gpt2Output> {
        let inputs = prepare_causal(
            input_ids,
            attention_mask,
            position_ids,
            past,
            self.limits(),
            self.wte.device(),
        )?;
        self.forward_prepared(&inputs, train)
    }

    /// Runs the transformer on checked inputs.
    pub fn forward_prepared(&self, inputs: &CausalInputs<'_>, train: bool) -> Result<Gpt2Output> {
        let device = self.wte.device();
        let (input_ids, position_ids, past) = (&inputs.input_ids, &inputs.position_ids, inputs.past);
        // -inf for future keys: HF's causal fill plus its padding mask (see causal_attention_bias).
        // Without padding the layers apply the causal rule themselves.
        let bias = inputs.attention_bias(self.wte.kind(), device, f64::NEG_INFINITY)?;

        let tokens = Tensor::f_embedding(&self.wte, input_ids, -1, false, false)?;
        let positions = Tensor::f_embedding(&self.wpe, position_ids, -1, false, false)?;
        let mut hidden = tokens.f_add(&positions)?.train_dropout(self.cfg.embd_pdrop, train)?;
        let mut layers = Vec::with_capacity(self.h.len());
        for (i, block) in self.h.iter().enumerate() {
            let layer_past = past.map(|c| &c.layers[i]);
            let (out, layer_cache) = block.forward(&hidden, bias.as_ref(), layer_past, train)?;
            hidden = out;
            layers.push(layer_cache);
        }
        Ok(Gpt2Output {
            last_hidden_state: self.ln_f.forward(&hidden)?,
            cache: Cache { layers },
        })
    }
}

/// GPT-2 with its language-model head (`GPT2LMHeadModel`).
#[derive(Debug)]
pub struct Gpt2LmHeadModel {
    /// The transformer.
    pub transformer: Gpt2Model,
    /// `lm_head.weight` [vocab, C]; the same tensor as `transformer.wte.weight` when tied; `None`
    /// when built without an LM head.
    pub lm_head: Option<Tensor>,
    tied: bool,
}

impl Gpt2LmHeadModel {
    /// Creates `transformer.*` and, unless the embeddings are tied, `lm_head.weight` under `vs`.
    pub fn new(vs: nn::Path, cfg: &Gpt2Config) -> Result<Self> {
        Self::with_head(vs, cfg, true)
    }

    /// [`Gpt2LmHeadModel::new`], with or without the LM head (`transformer.*` alone, as under
    /// `GPT2ForSequenceClassification`'s `score`).
    pub fn with_head(vs: nn::Path, cfg: &Gpt2Config, lm_head: bool) -> Result<Self> {
        let transformer = Gpt2Model::new(vs.sub("transformer"), cfg)?;
        let lm_head = match (lm_head, cfg.tie_word_embeddings) {
            (false, _) => None,
            (true, true) => Some(transformer.wte.shallow_clone()),
            (true, false) => Some(vh_core::param::var(
                &vs.sub("lm_head"),
                "weight",
                &[cfg.vocab_size, cfg.n_embd],
                nn::Init::Const(0.0),
            )?),
        };
        Ok(Self {
            transformer,
            lm_head,
            tied: cfg.tie_word_embeddings,
        })
    }

    /// Lays out every Conv1D weight for the fastest kernel of its current dtype (see
    /// [`Conv1D::arrange_weight`]); call after changing the dtype.
    pub fn arrange_weights(&self) -> Result<()> {
        for block in &self.transformer.h {
            for conv in [
                &block.attn.c_attn,
                &block.attn.c_proj,
                &block.mlp.c_fc,
                &block.mlp.c_proj,
            ] {
                conv.arrange_weight()?;
            }
        }
        Ok(())
    }

    /// Whether the LM head shares the token embeddings.
    pub fn is_tied(&self) -> bool {
        self.tied
    }

    /// Maps a checkpoint key to a parameter name of this model (see [`parameter_name`]); a
    /// tied model's `lm_head.weight` is the embedding matrix, which it reads from `wte` instead.
    pub fn parameter_name(&self, key: &str) -> Option<String> {
        let name = parameter_name(key)?;
        if (self.tied || self.lm_head.is_none()) && name == "lm_head.weight" {
            return None;
        }
        Some(name)
    }

    /// Runs the transformer and the LM head; see [`Gpt2Model::forward`] for the arguments.
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

    /// [`Gpt2LmHeadModel::forward`] with logits for the last `logits_to_keep` positions only
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
        let inputs = prepare_causal(
            input_ids,
            attention_mask,
            position_ids,
            past,
            self.transformer.limits(),
            self.transformer.wte.device(),
        )?;
        CausalLm::forward(self, &inputs, train, logits_to_keep)
    }
}

impl CausalLm for Gpt2LmHeadModel {
    fn model_type(&self) -> &'static str {
        "gpt2"
    }

    fn vocab_size(&self) -> i64 {
        self.transformer.cfg.vocab_size
    }

    fn hidden_size(&self) -> i64 {
        self.transformer.cfg.n_embd
    }

    fn num_layers(&self) -> usize {
        self.transformer.h.len()
    }

    fn max_positions(&self) -> Option<i64> {
        Some(self.transformer.cfg.n_positions)
    }

    fn forward_hidden(&self, inputs: &CausalInputs<'_>, train: bool) -> Result<(Tensor, Cache)> {
        let out = self.transformer.forward_prepared(inputs, train)?;
        Ok((out.last_hidden_state, out.cache))
    }

    fn lm_head(&self) -> Option<&Tensor> {
        self.lm_head.as_ref()
    }

    fn parameter_name(&self, key: &str) -> Option<String> {
        Gpt2LmHeadModel::parameter_name(self, key)
    }

    fn tied_aliases(&self) -> Vec<(&'static str, &'static str)> {
        if self.tied && self.lm_head.is_some() {
            vec![("lm_head.weight", "transformer.wte.weight")]
        } else {
            vec![]
        }
    }

    fn supports_static_decode(&self) -> bool {
        true
    }

    fn is_lookup_only(&self, name: &str) -> bool {
        let head_reads_wte = self.tied && self.lm_head.is_some();
        name == "transformer.wpe.weight" || (!head_reads_wte && name == "transformer.wte.weight")
    }

    fn after_load(&self) -> Result<()> {
        self.arrange_weights()
    }
}

/// GPT-2's registry entry.
pub const ARCHITECTURE: Architecture = Architecture {
    model_type: "gpt2",
    name: "GPT-2",
    family: Family::Causal(build),
    // HF's default for GPT-2, so TRL's. Measured on this 2-core CPU it is also the faster one for
    // the passes training spends its time in (train step 1.00x PyTorch vs 0.91x with eager,
    // reward scoring 0.95x vs 0.82x; docs/bench.md); eager stays an explicit choice.
    default_attention: AttnImplementation::Sdpa,
    tiny_config,
};

fn build(vs: nn::Path, config: &serde_json::Value, options: &BuildOptions) -> Result<Box<dyn CausalLm>> {
    let mut cfg = Gpt2Config::from_json(config)?;
    cfg.attn_implementation = options
        .attn_implementation
        .unwrap_or_else(|| ARCHITECTURE.default_attention_on(vs.device()));
    Ok(Box::new(Gpt2LmHeadModel::with_head(
        vs,
        &cfg,
        !options.without_lm_head,
    )?))
}

fn tiny_config() -> serde_json::Value {
    serde_json::json!({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": 50, "n_positions": 16, "n_embd": 16, "n_layer": 2, "n_head": 4
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tch::nn::VarStore;
    use tch::Device;

    fn tiny() -> Gpt2Config {
        Gpt2Config::from_json(&json!({"vocab_size": 50, "n_positions": 16, "n_embd": 16, "n_layer": 2, "n_head": 4}))
            .unwrap()
    }

    fn random_model(cfg: &Gpt2Config) -> (VarStore, Gpt2LmHeadModel) {
        let vs = VarStore::new(Device::Cpu);
        let model = Gpt2LmHeadModel::new(vs.root(), cfg).unwrap();
        crate::test_util::randomize(&vs, 3, 0.2);
        (vs, model)
    }

    #[test]
    fn arranged_weights_keep_values_and_outputs() {
        let (vs, model) = random_model(&tiny());
        let ids = Tensor::from_slice2(&[[1i64, 7, 3, 9], [4, 4, 2, 8]]);
        let mut vs = vs;
        vs.bfloat16();
        let before: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
        let reference = model.forward(&ids, None, None, None, false).unwrap().logits;
        model.arrange_weights().unwrap();
        let w = &model.transformer.h[0].attn.c_attn.weight;
        assert_eq!(
            (w.size(), w.stride()),
            (vec![16, 48], vec![1, 16]),
            "[out, in] memory order"
        );
        for (name, t) in vs.variables() {
            let old = &before.iter().find(|(n, _)| *n == name).unwrap().1;
            assert!(t.equal(old), "{name} changed value");
        }
        let logits = model.forward(&ids, None, None, None, false).unwrap().logits;
        let scale = reference.abs().max().double_value(&[]);
        let diff = (logits - &reference).abs().max().double_value(&[]);
        assert!(diff <= 2e-2 * scale, "bf16 logits moved by {diff} (scale {scale})");
        // Back in f32 on CPU they keep [out, in] order, and the values.
        vs.float();
        model.arrange_weights().unwrap();
        let w = &model.transformer.h[0].attn.c_attn.weight;
        assert_eq!((w.stride(), w.kind()), (vec![1, 16], Kind::Float));
    }

    #[test]
    fn f32_arranged_weights_give_the_same_outputs_with_and_without_a_graph() {
        let (vs, model) = random_model(&tiny());
        let ids = Tensor::from_slice2(&[[1i64, 7, 3, 9], [4, 4, 2, 8]]);
        let reference = model.forward(&ids, None, None, None, false).unwrap().logits;
        model.arrange_weights().unwrap();
        let w = &model.transformer.h[0].mlp.c_fc.weight;
        assert_eq!(w.stride(), vec![1, 16], "[out, in] memory order");
        // Recorded (MKL's addmm over the arranged weight) and not recorded (oneDNN at 8 rows).
        let recorded = model.forward(&ids, None, None, None, false).unwrap().logits;
        assert!(recorded.requires_grad());
        let unrecorded = tch::no_grad(|| model.forward(&ids, None, None, None, false).unwrap().logits);
        assert!(!unrecorded.requires_grad());
        let scale = reference.abs().max().double_value(&[]);
        for (what, logits) in [("recorded", &recorded), ("not recorded", &unrecorded)] {
            let diff = (logits - &reference).abs().max().double_value(&[]);
            assert!(
                diff <= 1e-5 * scale,
                "{what}: f32 logits moved by {diff} (scale {scale})"
            );
        }
        drop(vs);
    }

    #[test]
    fn config_defaults_match_hf() {
        let cfg = Gpt2Config::from_json(&json!({})).unwrap();
        assert_eq!(
            (cfg.vocab_size, cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head),
            (50257, 1024, 768, 12, 12)
        );
        assert_eq!(cfg.inner_dim(), 3072);
        assert_eq!(cfg.activation_function, "gelu_new");
        assert!(cfg.scale_attn_weights && cfg.tie_word_embeddings && !cfg.reorder_and_upcast_attn);
        assert!(Gpt2Config::from_json(&json!({"n_embd": 10, "n_head": 3})).is_err());
        assert!(Gpt2Config::from_json(&json!({"activation_function": "nope"})).is_err());
        assert!(Gpt2Config::from_json(&json!({"n_layer": "two"})).is_err());
    }

    /// Fuzzing regression (crates/vh-fuzz/regressions/config/gpt2-n-embd-times-4-overflow.json):
    /// the default MLP width 4 * n_embd overflowed i64 and panicked, even with `n_inner` set.
    #[test]
    fn huge_widths_are_config_errors_not_overflows() {
        let err = Gpt2Config::from_json(&json!({"n_embd": i64::MAX, "n_head": 1})).unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains("4 * n_embd overflows")),
            "{err}"
        );
        let cfg = Gpt2Config::from_json(&json!({"n_embd": 1i64 << 61, "n_head": 4, "n_inner": 64})).unwrap();
        assert_eq!(cfg.inner_dim(), 64);
    }

    #[test]
    fn parameter_names_follow_hf() {
        let vs = VarStore::new(Device::Cpu);
        let _m = Gpt2LmHeadModel::new(vs.root(), &tiny()).unwrap();
        let names = vs.variables();
        for n in [
            "transformer.wte.weight",
            "transformer.h.1.attn.c_attn.weight",
            "transformer.h.0.mlp.c_proj.bias",
            "transformer.ln_f.weight",
        ] {
            assert!(names.contains_key(n), "{n}");
        }
        assert!(
            !names.contains_key("lm_head.weight"),
            "tied head is not a separate parameter"
        );
        assert_eq!(names["transformer.h.0.attn.c_attn.weight"].size(), vec![16, 48]);
        assert_eq!(
            parameter_name("h.0.ln_1.weight").unwrap(),
            "transformer.h.0.ln_1.weight"
        );
        assert_eq!(parameter_name("transformer.h.0.attn.bias"), None);
        assert_eq!(parameter_name("h.0.attn.masked_bias"), None);
        assert_eq!(
            parameter_name("transformer.h.0.attn.c_attn.bias").unwrap(),
            "transformer.h.0.attn.c_attn.bias"
        );
    }

    #[test]
    fn incremental_decoding_equals_full_forward() {
        let cfg = tiny();
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
            let diff = (&step.logits.squeeze_dim(1) - full.logits.select(1, t))
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff < 1e-5, "step {t}: {diff}");
            cache = step.cache;
        }
        assert_eq!(cache.seq_len(), 6);
    }

    #[test]
    fn left_padding_matches_unpadded_rows() {
        let cfg = tiny();
        let (_vs, model) = random_model(&cfg);
        let plain = model
            .forward(&Tensor::from_slice2(&[[7i64, 8, 9]]), None, None, None, false)
            .unwrap();
        let padded = Tensor::from_slice2(&[[0i64, 0, 7, 8, 9]]);
        let mask = Tensor::from_slice2(&[[0i64, 0, 1, 1, 1]]);
        // With HF generate's mask-derived positions the padded row equals the plain one ...
        let positions = vh_core::tensor::position_ids_from_attention_mask(&mask, 5).unwrap();
        let out = model
            .forward(&padded, Some(&mask), Some(&positions), None, false)
            .unwrap();
        let diff = (out.logits.narrow(1, 2, 3) - &plain.logits)
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
        // ... while the default positions (0..T, as HF's forward) shift learned positions.
        let default = model.forward(&padded, Some(&mask), None, None, false).unwrap();
        let shift = (default.logits.narrow(1, 2, 3) - &plain.logits)
            .abs()
            .max()
            .double_value(&[]);
        assert!(shift > 1e-3, "{shift}");
        assert!(
            out.logits.isfinite().all().int64_value(&[]) != 0,
            "padding positions must stay finite"
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        let cfg = tiny();
        let (_vs, model) = random_model(&cfg);
        let ids = Tensor::from_slice2(&[[1i64, 2, 3]]);
        assert!(model
            .forward(&Tensor::from_slice(&[1i64, 2]), None, None, None, false)
            .is_err());
        assert!(model
            .forward(&Tensor::from_slice2(&[[1i64, 50]]), None, None, None, false)
            .is_err());
        assert!(model
            .forward(&ids, Some(&Tensor::from_slice2(&[[1i64, 1]])), None, None, false)
            .is_err());
        let long = Tensor::zeros([1, 17], (Kind::Int64, Device::Cpu));
        assert!(model.forward(&long, None, None, None, false).is_err());
        let cache = model
            .forward(
                &Tensor::zeros([1, 10], (Kind::Int64, Device::Cpu)),
                None,
                None,
                None,
                false,
            )
            .unwrap()
            .cache;
        let err = model.forward(
            &Tensor::zeros([1, 7], (Kind::Int64, Device::Cpu)),
            None,
            None,
            Some(&cache),
            false,
        );
        assert!(
            matches!(err, Err(Error::InvalidInput(_))),
            "cache + new tokens over n_positions: {err:?}"
        );
        let err = model.forward(
            &Tensor::zeros([2, 1], (Kind::Int64, Device::Cpu)),
            None,
            None,
            Some(&cache),
            false,
        );
        assert!(err.is_err(), "batch differs from cache");
        let bad_pos = Tensor::from_slice2(&[[0i64, 1, 16]]);
        assert!(model.forward(&ids, None, Some(&bad_pos), None, false).is_err());
    }

    #[test]
    fn dropout_acts_only_in_train_mode() {
        let cfg = tiny();
        let (_vs, model) = random_model(&cfg);
        let ids = Tensor::from_slice2(&[[1i64, 2, 3, 4]]);
        let a = model.forward(&ids, None, None, None, false).unwrap().logits;
        let b = model.forward(&ids, None, None, None, false).unwrap().logits;
        assert!(a.equal(&b));
        let c = model.forward(&ids, None, None, None, true).unwrap().logits;
        assert!(!a.equal(&c));
    }
}

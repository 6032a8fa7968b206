//! DBRX, as HF's `modeling_dbrx.py`: pre-norm blocks of bias-free LayerNorms (`norm_1`, `norm_2`),
//! grouped-query attention through one fused `Wqkv` projection (optionally clamped to
//! `[-clip_qkv, clip_qkv]`) with rotary positions, and a mixture-of-experts GLU feed-forward: a
//! router (`ffn.router.layer`) picks the top-k experts of each token from a softmax, their weights
//! optionally divided by their p-norm (`moe_normalize_expert_weights`), and the experts' weights
//! live in three fused 2-D parameters `ffn.experts.mlp.{w1,v1,w2}` of shape
//! [experts * ffn_hidden_size, d_model]. Expert `e` reads rows `e*F .. (e+1)*F` of each; `w1` and
//! `v1` are applied transposed (`x @ w1_e^T`) and `w2` as stored (`h @ w2_e`), as HF does.
//!
//! Train mode: with `moe_jitter_eps` set, HF multiplies the FFN input in place by uniform noise in
//! `[1 - eps, 1 + eps]` before routing, so the experts read the jittered input too; ours does the
//! same with libtorch's global generator (one `uniform_` of the input's shape and kind per
//! layer), so a seeded run reproduces HF's seeded run. HF's router auxiliary loss
//! (`output_router_logits`, `load_balancing_loss_func`) is off by default and is not part of
//! TRL's value-head outputs, so it is not computed here.

use crate::activation::Activation;
use crate::attention::{AttentionSpec, AttnImplementation, MaskSpec, ScoreOp, SoftmaxPrecision};
use crate::cache::{Cache, LayerCache};
use crate::inputs::{CausalInputs, CausalLimits};
use crate::layers::{embedding_padding_idx, merge_heads, split_heads, Linear};
use crate::registry::{Architecture, BuildOptions, CausalLm, Family};
use crate::rotary::{apply_rotary, RopeScaling, RotaryConfig, RotaryEmbedding};
use serde::Deserialize;
use serde_json::Value;
use tch::{nn, Kind, Tensor};
use vh_core::error::{check_epsilons, check_positive, check_probabilities, parse_config};
use vh_core::tensor::min_value;
use vh_core::{Error, Result};

/// `attn_config` of a DBRX config.json, with `DbrxAttentionConfig`'s defaults.
#[derive(Deserialize)]
struct AttnJson {
    #[serde(default)]
    attn_pdrop: f64,
    #[serde(default)]
    clip_qkv: Option<f64>,
    #[serde(default = "defaults::kv_n_heads")]
    kv_n_heads: i64,
    #[serde(default = "defaults::rope_theta")]
    rope_theta: f64,
}

impl Default for AttnJson {
    fn default() -> Self {
        Self {
            attn_pdrop: 0.0,
            clip_qkv: None,
            kv_n_heads: defaults::kv_n_heads(),
            rope_theta: defaults::rope_theta(),
        }
    }
}

/// `ffn_act_fn`: HF reads only `name` (`ACT2FN[name]`, silu when absent) and ignores other keys.
#[derive(Deserialize)]
struct ActJson {
    #[serde(default = "defaults::silu")]
    name: String,
}

/// `ffn_config` of a DBRX config.json, with `DbrxFFNConfig`'s defaults.
#[derive(Deserialize)]
struct FfnJson {
    /// Null means `{"name": "silu"}`, as HF.
    #[serde(default)]
    ffn_act_fn: Option<ActJson>,
    #[serde(default = "defaults::ffn_hidden_size")]
    ffn_hidden_size: i64,
    #[serde(default = "defaults::moe_num_experts")]
    moe_num_experts: i64,
    #[serde(default = "defaults::moe_top_k")]
    moe_top_k: i64,
    #[serde(default)]
    moe_jitter_eps: Option<f64>,
    #[serde(default = "defaults::moe_loss_weight")]
    moe_loss_weight: f64,
    /// 1.0 when absent; null means no normalisation.
    #[serde(default = "defaults::moe_normalize_expert_weights")]
    moe_normalize_expert_weights: Option<f64>,
}

impl Default for FfnJson {
    fn default() -> Self {
        Self {
            ffn_act_fn: None,
            ffn_hidden_size: defaults::ffn_hidden_size(),
            moe_num_experts: defaults::moe_num_experts(),
            moe_top_k: defaults::moe_top_k(),
            moe_jitter_eps: None,
            moe_loss_weight: defaults::moe_loss_weight(),
            moe_normalize_expert_weights: defaults::moe_normalize_expert_weights(),
        }
    }
}

/// config.json of a `dbrx` model, with `DbrxConfig`'s defaults in transformers 4.57.
#[derive(Deserialize)]
struct DbrxJson {
    #[serde(default = "defaults::d_model")]
    d_model: i64,
    #[serde(default = "defaults::n_heads")]
    n_heads: i64,
    #[serde(default = "defaults::n_layers")]
    n_layers: i64,
    #[serde(default = "defaults::max_seq_len")]
    max_seq_len: i64,
    #[serde(default = "defaults::vocab_size")]
    vocab_size: i64,
    #[serde(default)]
    resid_pdrop: f64,
    #[serde(default)]
    emb_pdrop: f64,
    /// Null or absent: `DbrxAttentionConfig()`.
    #[serde(default)]
    attn_config: Option<AttnJson>,
    /// Null or absent: `DbrxFFNConfig()`.
    #[serde(default)]
    ffn_config: Option<FfnJson>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    pad_token_id: Option<i64>,
}

mod defaults {
    pub fn d_model() -> i64 {
        2048
    }
    pub fn n_heads() -> i64 {
        16
    }
    pub fn n_layers() -> i64 {
        24
    }
    pub fn max_seq_len() -> i64 {
        2048
    }
    pub fn vocab_size() -> i64 {
        32000
    }
    pub fn kv_n_heads() -> i64 {
        1
    }
    pub fn rope_theta() -> f64 {
        10000.0
    }
    pub fn silu() -> String {
        "silu".to_string()
    }
    pub fn ffn_hidden_size() -> i64 {
        3584
    }
    pub fn moe_num_experts() -> i64 {
        4
    }
    pub fn moe_top_k() -> i64 {
        1
    }
    pub fn moe_loss_weight() -> f64 {
        0.01
    }
    pub fn moe_normalize_expert_weights() -> Option<f64> {
        Some(1.0)
    }
}

/// How the experts' outputs are computed; every choice gives HF's numbers up to float rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MoeDispatch {
    /// [`MoeDispatch::Dense`] in f32/f64 for small expert banks or when every expert takes every
    /// token, [`MoeDispatch::Gather`] otherwise (and always in bf16/f16, where HF's per-expert
    /// roundings are only reproduced by running the experts one by one as HF does).
    #[default]
    Auto,
    /// Each expert runs on the tokens routed to it only (sorted by expert, `index_select` in,
    /// `index_add` out, in expert order as HF). Finding how many tokens each expert takes costs
    /// one host sync per layer.
    Gather,
    /// Every expert runs on every token as one wide matmul and the outputs of experts a token was
    /// not routed to are multiplied by an exact zero: no host sync and no per-expert launches,
    /// `num_experts / top_k` times the arithmetic. Exact while the unrouted experts' outputs are
    /// finite (an overflow there would turn the zero into NaN).
    Dense,
}

/// Expert banks up to this many weights per projection (`num_experts * ffn_hidden_size *
/// d_model`) run dense under [`MoeDispatch::Auto`]: there the per-expert launches and the host
/// sync cost more on CPU than the extra arithmetic (one thread, 1 to 70 tokens: dense 2-10x
/// faster at 3K-33K weights, gather 2x faster from 262K on; docs/parity.md).
const DENSE_MAX_WEIGHTS: i64 = 1 << 16;

/// HF's `DbrxConfig` (with its nested attention and FFN configs): the fields that change the math.
#[derive(Debug, Clone, PartialEq)]
pub struct DbrxConfig {
    /// How attention is computed (not part of config.json; HF's default is sdpa).
    pub attn_implementation: AttnImplementation,
    /// How the experts are dispatched (not part of config.json).
    pub moe_dispatch: MoeDispatch,
    /// Hidden size (`d_model`).
    pub d_model: i64,
    /// Query heads.
    pub n_heads: i64,
    /// Blocks.
    pub n_layers: i64,
    /// The model's context length (rotary positions are not limited by it, as in HF).
    pub max_seq_len: i64,
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Dropout after attention and after the FFN (train mode).
    pub resid_pdrop: f64,
    /// Dropout on the embeddings (train mode).
    pub emb_pdrop: f64,
    /// Dropout on attention probabilities (train mode).
    pub attn_pdrop: f64,
    /// Clamp of the fused q/k/v projection's output, `None` for none.
    pub clip_qkv: Option<f64>,
    /// Key/value heads.
    pub kv_n_heads: i64,
    /// RoPE base.
    pub rope_theta: f64,
    /// The experts' activation (`ffn_act_fn.name`).
    pub ffn_act_fn: Activation,
    /// Each expert's inner width.
    pub ffn_hidden_size: i64,
    /// Experts per layer.
    pub moe_num_experts: i64,
    /// Experts per token.
    pub moe_top_k: i64,
    /// Router input noise in train mode, `None` for none.
    pub moe_jitter_eps: Option<f64>,
    /// The auxiliary loss weight (kept for completeness; the aux loss is not computed).
    pub moe_loss_weight: f64,
    /// The p of the p-norm the top-k weights are divided by, `None` for no normalisation.
    pub moe_normalize_expert_weights: Option<f64>,
    /// The padding token, HF's `padding_idx` of `wte`: its row gets no gradient.
    pub pad_token_id: Option<i64>,
}

impl DbrxConfig {
    /// Parses a config.json value and checks it.
    pub fn from_json(config: &Value) -> Result<Self> {
        let raw: DbrxJson = parse_config(config, "DBRX")?;
        if raw.tie_word_embeddings {
            // DbrxConfig raises on it: there is no tied DBRX to match.
            return Err(Error::Config(
                "tie_word_embeddings is not supported for DBRX models".into(),
            ));
        }
        let attn = raw.attn_config.unwrap_or_default();
        let ffn = raw.ffn_config.unwrap_or_default();
        let act_name = ffn.ffn_act_fn.map(|a| a.name).unwrap_or_else(defaults::silu);
        let cfg = Self {
            attn_implementation: AttnImplementation::default(),
            moe_dispatch: MoeDispatch::default(),
            d_model: raw.d_model,
            n_heads: raw.n_heads,
            n_layers: raw.n_layers,
            max_seq_len: raw.max_seq_len,
            vocab_size: raw.vocab_size,
            resid_pdrop: raw.resid_pdrop,
            emb_pdrop: raw.emb_pdrop,
            attn_pdrop: attn.attn_pdrop,
            clip_qkv: attn.clip_qkv,
            kv_n_heads: attn.kv_n_heads,
            rope_theta: attn.rope_theta,
            ffn_act_fn: act_name.parse()?,
            ffn_hidden_size: ffn.ffn_hidden_size,
            moe_num_experts: ffn.moe_num_experts,
            moe_top_k: ffn.moe_top_k,
            moe_jitter_eps: ffn.moe_jitter_eps,
            moe_loss_weight: ffn.moe_loss_weight,
            moe_normalize_expert_weights: ffn.moe_normalize_expert_weights,
            pad_token_id: raw.pad_token_id,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Width of each head.
    pub fn head_dim(&self) -> i64 {
        self.d_model / self.n_heads
    }

    /// Checks sizes, the routing and the probabilities.
    pub fn validate(&self) -> Result<()> {
        check_positive(&[
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_heads", self.n_heads),
            ("n_layers", self.n_layers),
            ("max_seq_len", self.max_seq_len),
            ("attn_config.kv_n_heads", self.kv_n_heads),
            ("ffn_config.ffn_hidden_size", self.ffn_hidden_size),
            ("ffn_config.moe_num_experts", self.moe_num_experts),
            ("ffn_config.moe_top_k", self.moe_top_k),
        ])?;
        if self.d_model % self.n_heads != 0 {
            return Err(Error::Config(format!(
                "d_model ({}) must be a multiple of n_heads ({})",
                self.d_model, self.n_heads
            )));
        }
        if self.n_heads % self.kv_n_heads != 0 {
            return Err(Error::Config(format!(
                "n_heads ({}) must be a multiple of attn_config.kv_n_heads ({})",
                self.n_heads, self.kv_n_heads
            )));
        }
        if self.head_dim() % 2 != 0 {
            return Err(Error::Config(format!(
                "d_model / n_heads must be even for rotary embeddings, got {}",
                self.head_dim()
            )));
        }
        if self.moe_top_k > self.moe_num_experts {
            return Err(Error::Config(format!(
                "ffn_config.moe_top_k ({}) exceeds moe_num_experts ({})",
                self.moe_top_k, self.moe_num_experts
            )));
        }
        if self
            .moe_num_experts
            .checked_mul(self.ffn_hidden_size)
            .and_then(|rows| rows.checked_mul(self.d_model))
            .is_none()
        {
            return Err(Error::Config(
                "moe_num_experts * ffn_hidden_size * d_model overflows".into(),
            ));
        }
        check_probabilities(&[
            ("resid_pdrop", self.resid_pdrop),
            ("emb_pdrop", self.emb_pdrop),
            ("attn_config.attn_pdrop", self.attn_pdrop),
        ])?;
        if let Some(clip) = self.clip_qkv {
            // A negative clip would make torch's clamp return its max everywhere: nothing a
            // checkpoint means.
            check_epsilons(&[("attn_config.clip_qkv", clip)])?;
        }
        if let Some(eps) = self.moe_jitter_eps {
            check_probabilities(&[("ffn_config.moe_jitter_eps", eps)])?;
        }
        if let Some(p) = self.moe_normalize_expert_weights {
            if !(p.is_finite() && p > 0.0) {
                return Err(Error::Config(format!(
                    "ffn_config.moe_normalize_expert_weights must be positive, got {p}"
                )));
            }
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return Err(Error::Config(format!(
                "attn_config.rope_theta must be positive, got {}",
                self.rope_theta
            )));
        }
        Ok(())
    }

    /// Whether [`MoeDispatch::Auto`] may pick the dense formulation (in f32/f64).
    fn dense_fits(&self) -> bool {
        self.moe_top_k == self.moe_num_experts
            || self.moe_num_experts * self.ffn_hidden_size * self.d_model <= DENSE_MAX_WEIGHTS
    }
}

/// `nn.LayerNorm(d, bias=False)`: a scale and torch's default epsilon.
#[derive(Debug)]
struct BiasFreeLayerNorm {
    weight: Tensor,
}

impl BiasFreeLayerNorm {
    fn new(vs: nn::Path, dim: i64) -> Result<Self> {
        Ok(Self {
            weight: vh_core::param::var(&vs, "weight", &[dim], nn::Init::Const(1.0))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_layer_norm(self.weight.size(), Some(&self.weight), None::<&Tensor>, 1e-5, true)?)
    }
}

/// Self-attention through the fused `Wqkv` projection.
#[derive(Debug)]
struct Attention {
    wqkv: Linear,
    out_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    clip_qkv: Option<f64>,
    dropout: f64,
    implementation: AttnImplementation,
}

impl Attention {
    fn new(vs: nn::Path, cfg: &DbrxConfig) -> Result<Self> {
        let (h, d, kv) = (cfg.d_model, cfg.head_dim(), cfg.kv_n_heads);
        Ok(Self {
            wqkv: Linear::new(vs.sub("Wqkv"), h, h + 2 * kv * d, false)?,
            out_proj: Linear::new(vs.sub("out_proj"), h, h, false)?,
            heads: cfg.n_heads,
            kv_heads: kv,
            head_dim: d,
            clip_qkv: cfg.clip_qkv,
            dropout: cfg.attn_pdrop,
            implementation: cfg.attn_implementation,
        })
    }

    /// HF's eager order (`q @ k^T / sqrt(head_dim)`, the mask added, softmax in f32), or the
    /// fused kernel with the same scale.
    fn spec(&self, kind: Kind) -> AttentionSpec {
        AttentionSpec {
            implementation: self.implementation,
            score_ops: vec![ScoreOp::Div((self.head_dim as f64).sqrt())],
            softmax: SoftmaxPrecision::F32,
            dropout: self.dropout,
            future: min_value(kind),
            causal: true,
        }
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
        let d = self.head_dim;
        let mut qkv = self.wqkv.forward(x)?;
        if let Some(clip) = self.clip_qkv {
            qkv = qkv.f_clamp(-clip, clip)?;
        }
        let parts = qkv.f_split_with_sizes([self.heads * d, self.kv_heads * d, self.kv_heads * d], -1)?;
        let q = apply_rotary(&split_heads(&parts[0], self.heads, d)?, cos, sin)?;
        let k = apply_rotary(&split_heads(&parts[1], self.kv_heads, d)?, cos, sin)?;
        let v = split_heads(&parts[2], self.kv_heads, d)?;
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

/// The router and the experts of one block (HF's `DbrxFFN`).
#[derive(Debug)]
struct MoeFfn {
    router: Linear,
    /// [experts * F, d_model], applied transposed.
    w1: Tensor,
    /// [experts * F, d_model], applied transposed.
    v1: Tensor,
    /// [experts * F, d_model], applied as stored.
    w2: Tensor,
    experts: i64,
    top_k: i64,
    ffn: i64,
    act: Activation,
    jitter: Option<f64>,
    normalize: Option<f64>,
    dispatch: MoeDispatch,
    dense_fits: bool,
}

impl MoeFfn {
    fn new(vs: nn::Path, cfg: &DbrxConfig) -> Result<Self> {
        let rows = cfg.moe_num_experts * cfg.ffn_hidden_size;
        let mlp = vs.sub("experts").sub("mlp");
        let bank = |name: &str| vh_core::param::var(&mlp, name, &[rows, cfg.d_model], nn::Init::Const(0.0));
        Ok(Self {
            router: Linear::new(vs.sub("router").sub("layer"), cfg.d_model, cfg.moe_num_experts, false)?,
            w1: bank("w1")?,
            v1: bank("v1")?,
            w2: bank("w2")?,
            experts: cfg.moe_num_experts,
            top_k: cfg.moe_top_k,
            ffn: cfg.ffn_hidden_size,
            act: cfg.ffn_act_fn,
            jitter: cfg.moe_jitter_eps,
            normalize: cfg.moe_normalize_expert_weights,
            dispatch: cfg.moe_dispatch,
            dense_fits: cfg.dense_fits(),
        })
    }

    /// HF's `DbrxRouter`: the top-k experts of each token [N, k] and their weights [N, k] in the
    /// input's kind (softmax in f32, then the optional p-norm division, then the cast).
    fn route(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let probs = self.router.forward(x)?.f_softmax(-1, Kind::Float)?;
        let (mut top_weights, top_experts) = probs.f_topk(self.top_k, -1, true, true)?;
        if let Some(p) = self.normalize {
            let norm = top_weights.f_norm_scalaropt_dim(p, [-1i64].as_slice(), true)?;
            top_weights = top_weights.f_div(&norm)?;
        }
        Ok((top_weights.f_to_kind(x.kind())?, top_experts))
    }

    /// The GLU of the experts whose rows `w1`, `v1`, `w2` are given, on `x` [n, d].
    fn glu(&self, x: &Tensor, w1: &Tensor, v1: &Tensor, w2: &Tensor) -> Result<Tensor> {
        let gate = self.act.forward(&x.f_matmul(&w1.f_tr()?)?)?;
        let up = x.f_matmul(&v1.f_tr()?)?;
        Ok(gate.f_mul(&up)?.f_matmul(w2)?)
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let shape = x.size();
        let d = shape[shape.len() - 1];
        let mut x = x.f_reshape([-1, d])?;
        if train {
            if let Some(eps) = self.jitter {
                // HF multiplies its FFN input in place, so the experts see the noise as well.
                let noise = x.f_empty_like()?.f_uniform_(1.0 - eps, 1.0 + eps)?;
                x = x.f_mul(&noise)?;
            }
        }
        let (top_weights, top_experts) = self.route(&x)?;
        let dense = match self.dispatch {
            MoeDispatch::Dense => true,
            MoeDispatch::Gather => false,
            MoeDispatch::Auto => self.dense_fits && matches!(x.kind(), Kind::Float | Kind::Double),
        };
        let out = if dense {
            self.dense_experts(&x, &top_weights, &top_experts)?
        } else {
            self.gathered_experts(&x, &top_weights, &top_experts)?
        };
        Ok(out.f_reshape(shape.as_slice())?)
    }

    /// [`MoeDispatch::Dense`]: all experts as one [N, E*F] product, unrouted ones zeroed.
    fn dense_experts(&self, x: &Tensor, top_weights: &Tensor, top_experts: &Tensor) -> Result<Tensor> {
        let n = x.size()[0];
        let gate = self.act.forward(&x.f_matmul(&self.w1.f_tr()?)?)?;
        let inner = gate.f_mul(&x.f_matmul(&self.v1.f_tr()?)?)?;
        let weights =
            Tensor::f_zeros([n, self.experts], (x.kind(), x.device()))?.f_scatter(1, top_experts, top_weights)?;
        let inner = inner
            .f_view([n, self.experts, self.ffn])?
            .f_mul(&weights.f_unsqueeze(-1)?)?
            .f_view([n, self.experts * self.ffn])?;
        Ok(inner.f_matmul(&self.w2)?)
    }

    /// [`MoeDispatch::Gather`]: (token, slot) pairs sorted by expert; each expert runs on its
    /// tokens and adds its weighted output into theirs, in expert order as HF's loop.
    fn gathered_experts(&self, x: &Tensor, top_weights: &Tensor, top_experts: &Tensor) -> Result<Tensor> {
        let flat_experts = top_experts.f_reshape([-1])?;
        let order = flat_experts.f_argsort_stable(true, 0, false)?;
        let tokens = order.f_floor_divide_scalar(self.top_k)?;
        let weights = top_weights.f_reshape([-1])?.f_index_select(0, &order)?;
        // The one host sync of the layer: how many pairs each expert takes.
        let counts = Vec::<i64>::try_from(
            flat_experts
                .f_bincount(None::<&Tensor>, self.experts)?
                .f_to_device(tch::Device::Cpu)?,
        )?;
        let mut out = x.f_zeros_like()?;
        let mut start = 0;
        for (e, &count) in counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let rows = e as i64 * self.ffn;
            let idx = tokens.f_narrow(0, start, count)?;
            let y = self.glu(
                &x.f_index_select(0, &idx)?,
                &self.w1.f_narrow(0, rows, self.ffn)?,
                &self.v1.f_narrow(0, rows, self.ffn)?,
                &self.w2.f_narrow(0, rows, self.ffn)?,
            )?;
            let y = y.f_mul(&weights.f_narrow(0, start, count)?.f_unsqueeze(-1)?)?;
            out = out.f_index_add(0, &idx, &y)?;
            start += count;
        }
        Ok(out)
    }
}

/// One DBRX block: norm, attention, residual, norm, experts, residual.
#[derive(Debug)]
struct Block {
    norm_1: BiasFreeLayerNorm,
    attn: Attention,
    norm_2: BiasFreeLayerNorm,
    ffn: MoeFfn,
    resid_pdrop: f64,
}

impl Block {
    fn new(vs: nn::Path, cfg: &DbrxConfig) -> Result<Self> {
        let nan = vs.sub("norm_attn_norm");
        Ok(Self {
            norm_1: BiasFreeLayerNorm::new(nan.sub("norm_1"), cfg.d_model)?,
            attn: Attention::new(nan.sub("attn"), cfg)?,
            norm_2: BiasFreeLayerNorm::new(nan.sub("norm_2"), cfg.d_model)?,
            ffn: MoeFfn::new(vs.sub("ffn"), cfg)?,
            resid_pdrop: cfg.resid_pdrop,
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
            .attn
            .forward(&self.norm_1.forward(x)?, cos, sin, bias, past, train)?;
        let h = attn.f_dropout(self.resid_pdrop, train)?.f_add(x)?;
        let ffn = self.ffn.forward(&self.norm_2.forward(&h)?, train)?;
        Ok((h.f_add(&ffn.f_dropout(self.resid_pdrop, train)?)?, cache))
    }
}

/// HF's `DbrxForCausalLM`.
#[derive(Debug)]
pub struct DbrxForCausalLM {
    /// `transformer.wte.weight` [vocab, d_model].
    pub wte: Tensor,
    blocks: Vec<Block>,
    norm_f: BiasFreeLayerNorm,
    /// `lm_head.weight` (DBRX is never tied); `None` when built without an LM head.
    pub lm_head: Option<Tensor>,
    rotary: RotaryEmbedding,
    cfg: DbrxConfig,
}

impl DbrxForCausalLM {
    /// Creates `transformer.*` and `lm_head.weight` under `vs`.
    pub fn new(vs: nn::Path, cfg: &DbrxConfig) -> Result<Self> {
        Self::with_head(vs, cfg, true)
    }

    /// [`DbrxForCausalLM::new`], with or without the LM head.
    pub fn with_head(vs: nn::Path, cfg: &DbrxConfig, lm_head: bool) -> Result<Self> {
        cfg.validate()?;
        let model = vs.sub("transformer");
        let wte = vh_core::param::var(
            &model.sub("wte"),
            "weight",
            &[cfg.vocab_size, cfg.d_model],
            nn::Init::Const(0.0),
        )?;
        let blocks = (0..cfg.n_layers)
            .map(|i| Block::new(model.sub("blocks").sub(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm_f = BiasFreeLayerNorm::new(model.sub("norm_f"), cfg.d_model)?;
        let lm_head = if lm_head {
            Some(vh_core::param::var(
                &vs.sub("lm_head"),
                "weight",
                &[cfg.vocab_size, cfg.d_model],
                nn::Init::Const(0.0),
            )?)
        } else {
            None
        };
        let rotary = RotaryEmbedding::new(
            &RotaryConfig {
                head_dim: cfg.head_dim(),
                rope_theta: cfg.rope_theta,
                rope_scaling: RopeScaling::Default,
                max_position_embeddings: cfg.max_seq_len,
            },
            vs.device(),
        )?;
        Ok(Self {
            wte,
            blocks,
            norm_f,
            lm_head,
            rotary,
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DbrxConfig {
        &self.cfg
    }

    /// What the inputs of a pass are checked against.
    pub fn limits(&self) -> CausalLimits {
        CausalLimits {
            vocab_size: self.cfg.vocab_size,
            num_layers: self.blocks.len(),
            max_positions: None,
        }
    }
}

impl CausalLm for DbrxForCausalLM {
    fn model_type(&self) -> &'static str {
        ARCHITECTURE.model_type
    }

    fn vocab_size(&self) -> i64 {
        self.cfg.vocab_size
    }

    fn hidden_size(&self) -> i64 {
        self.cfg.d_model
    }

    fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    fn max_positions(&self) -> Option<i64> {
        // Rotary positions have no hard limit (HF enforces none).
        None
    }

    fn forward_hidden(&self, inputs: &CausalInputs<'_>, train: bool) -> Result<(Tensor, Cache)> {
        let device = self.wte.device();
        let kind = self.wte.kind();
        let (cos, sin) = self.rotary.cos_sin(&inputs.position_ids, inputs.max_position, kind)?;
        let (cos, sin) = (cos.f_unsqueeze(1)?, sin.f_unsqueeze(1)?);
        // HF's eager mask (GPT-J's `_update_causal_mask`): the dtype's minimum on future keys and
        // padding, built when padding hides more than the causal rule.
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
        let mut h = Tensor::f_embedding(&self.wte, &inputs.input_ids, padding_idx, false, false)?
            .f_dropout(self.cfg.emb_pdrop, train)?;
        let mut layers = Vec::with_capacity(self.blocks.len());
        for (i, block) in self.blocks.iter().enumerate() {
            let past = inputs.past.map(|p| &p.layers[i]);
            let (out, cache) = block.forward(&h, &cos, &sin, bias.as_ref(), past, train)?;
            h = out;
            layers.push(cache);
        }
        Ok((self.norm_f.forward(&h)?, Cache { layers }))
    }

    fn lm_head(&self) -> Option<&Tensor> {
        self.lm_head.as_ref()
    }

    fn parameter_name(&self, key: &str) -> Option<String> {
        if key.ends_with("rotary_emb.inv_freq") || (self.lm_head.is_none() && key == "lm_head.weight") {
            return None;
        }
        Some(key.to_string())
    }

    fn tied_aliases(&self) -> Vec<(&'static str, &'static str)> {
        vec![]
    }

    fn is_lookup_only(&self, name: &str) -> bool {
        name == "transformer.wte.weight"
    }
}

/// DBRX's registry entry.
pub const ARCHITECTURE: Architecture = Architecture {
    model_type: "dbrx",
    name: "DBRX",
    family: Family::Causal(build),
    // HF's default (sdpa); the fused kernel with grouped heads is the faster on CPU too.
    default_attention: AttnImplementation::Sdpa,
    tiny_config,
};

fn build(vs: nn::Path, config: &Value, options: &BuildOptions) -> Result<Box<dyn CausalLm>> {
    let mut cfg = DbrxConfig::from_json(config)?;
    cfg.attn_implementation = options
        .attn_implementation
        .unwrap_or_else(|| ARCHITECTURE.default_attention_on(vs.device()));
    Ok(Box::new(DbrxForCausalLM::with_head(
        vs,
        &cfg,
        !options.without_lm_head,
    )?))
}

fn tiny_config() -> Value {
    serde_json::json!({
        "model_type": "dbrx", "architectures": ["DbrxForCausalLM"], "vocab_size": 50, "d_model": 16,
        "n_heads": 4, "n_layers": 2, "max_seq_len": 64,
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
        "ffn_config": {"ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2},
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0
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

    fn config(extra: Value) -> Result<DbrxConfig> {
        let mut cfg = tiny_config();
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        DbrxConfig::from_json(&cfg)
    }

    fn random_model(cfg: &DbrxConfig) -> (VarStore, DbrxForCausalLM) {
        let vs = VarStore::new(Device::Cpu);
        let model = DbrxForCausalLM::new(vs.root(), cfg).unwrap();
        crate::test_util::randomize(&vs, 5, 0.3);
        (vs, model)
    }

    fn run(model: &DbrxForCausalLM, ids: &Tensor, mask: Option<&Tensor>, past: Option<&Cache>) -> CausalLmOutput {
        let inputs = prepare_causal(ids, mask, None, past, model.limits(), Device::Cpu).unwrap();
        CausalLm::forward(model, &inputs, false, 0).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn config_defaults_follow_hf() {
        let cfg = DbrxConfig::from_json(&json!({"model_type": "dbrx"})).unwrap();
        assert_eq!(
            (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.vocab_size, cfg.kv_n_heads),
            (2048, 16, 24, 32000, 1)
        );
        assert_eq!(
            (
                cfg.ffn_hidden_size,
                cfg.moe_num_experts,
                cfg.moe_top_k,
                cfg.moe_jitter_eps
            ),
            (3584, 4, 1, None)
        );
        assert_eq!(cfg.moe_normalize_expert_weights, Some(1.0));
        assert_eq!(
            (cfg.clip_qkv, cfg.rope_theta, cfg.ffn_act_fn),
            (None, 10000.0, Activation::Silu)
        );
        let none = config(json!({"attn_config": {"clip_qkv": 1.0},
                                 "ffn_config": {"moe_normalize_expert_weights": null, "ffn_act_fn": {"name": "gelu"}}}))
        .unwrap();
        assert_eq!(
            (none.moe_normalize_expert_weights, none.ffn_act_fn),
            (None, Activation::Gelu)
        );
        // Unmentioned nested fields take the nested defaults.
        assert_eq!(
            (none.moe_num_experts, none.kv_n_heads, none.clip_qkv),
            (4, 1, Some(1.0))
        );
        let null_nested = config(json!({"attn_config": null, "ffn_config": {"ffn_act_fn": null}})).unwrap();
        assert_eq!((null_nested.kv_n_heads, null_nested.ffn_act_fn), (1, Activation::Silu));
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let bad = |extra: Value, what: &str| {
            let err = config(extra).expect_err(what);
            assert!(matches!(err, Error::Config(_)), "{what}: {err}");
        };
        bad(json!({"n_heads": 3}), "heads not dividing d_model");
        bad(
            json!({"attn_config": {"kv_n_heads": 3}}),
            "heads not a multiple of kv heads",
        );
        bad(json!({"n_heads": 0}), "no heads");
        bad(json!({"d_model": -16}), "negative width");
        bad(
            json!({"ffn_config": {"moe_top_k": 5, "moe_num_experts": 4}}),
            "top_k above experts",
        );
        bad(json!({"ffn_config": {"moe_top_k": 0}}), "top_k 0");
        bad(
            json!({"ffn_config": {"ffn_act_fn": {"name": "nope"}}}),
            "unknown activation",
        );
        bad(
            json!({"ffn_config": {"moe_normalize_expert_weights": -1.0}}),
            "negative p",
        );
        bad(json!({"attn_config": {"clip_qkv": -1.0}}), "negative clip");
        bad(json!({"attn_config": {"rope_theta": 0.0}}), "zero theta");
        bad(json!({"tie_word_embeddings": true}), "tied");
        bad(json!({"n_heads": 8, "d_model": 8}), "odd... head_dim 1");
        bad(json!({"vocab_size": null}), "null vocabulary");
        bad(json!({"ffn_config": {"moe_num_experts": "four"}}), "wrong type");
    }

    #[test]
    fn gathered_and_dense_experts_agree() {
        for top_k in [1, 2, 4] {
            for normalize in [json!(1.0), json!(null), json!(2.0)] {
                let ffn = json!({"ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": top_k,
                                 "moe_normalize_expert_weights": normalize});
                let mut gather = config(json!({ "ffn_config": ffn })).unwrap();
                gather.moe_dispatch = MoeDispatch::Gather;
                let mut dense = gather.clone();
                dense.moe_dispatch = MoeDispatch::Dense;
                let (_a, ga) = random_model(&gather);
                let (_b, de) = random_model(&dense);
                let ids = Tensor::from_slice2(&[[1i64, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12]]);
                let d = max_diff(&run(&ga, &ids, None, None).logits, &run(&de, &ids, None, None).logits);
                assert!(d < 1e-5, "top_k {top_k}, p {normalize}: {d}");
            }
        }
    }

    #[test]
    fn incremental_decoding_with_padding_matches_the_full_pass() {
        for dispatch in [MoeDispatch::Gather, MoeDispatch::Dense] {
            for implementation in [AttnImplementation::Eager, AttnImplementation::Sdpa] {
                let mut cfg = config(json!({})).unwrap();
                cfg.attn_implementation = implementation;
                cfg.moe_dispatch = dispatch;
                let (_vs, model) = random_model(&cfg);
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
                    let d = max_diff(&step.logits.squeeze_dim(1), &full.logits.select(1, t));
                    assert!(d < 1e-5, "{dispatch:?} {implementation:?} step {t}: {d}");
                    past = step.cache;
                }
            }
        }
    }

    #[test]
    fn clip_qkv_changes_the_outputs_and_jitter_only_in_train_mode() {
        let ids = Tensor::from_slice2(&[[1i64, 5, 7, 9, 11, 3]]);
        let clipped = config(json!({"attn_config": {"kv_n_heads": 2, "clip_qkv": 0.05}})).unwrap();
        let plain = config(json!({"attn_config": {"kv_n_heads": 2}})).unwrap();
        let (_a, a) = random_model(&clipped);
        let (_b, b) = random_model(&plain);
        assert!(max_diff(&run(&a, &ids, None, None).logits, &run(&b, &ids, None, None).logits) > 1e-3);
        let jitter = config(
            json!({"ffn_config": {"ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2,
                                                   "moe_jitter_eps": 0.5}}),
        )
        .unwrap();
        let (_c, c) = random_model(&jitter);
        let inputs = prepare_causal(&ids, None, None, None, c.limits(), Device::Cpu).unwrap();
        let eval1 = CausalLm::forward(&c, &inputs, false, 0).unwrap().logits;
        let eval2 = CausalLm::forward(&c, &inputs, false, 0).unwrap().logits;
        assert_eq!(max_diff(&eval1, &eval2), 0.0);
        tch::manual_seed(3);
        let train1 = CausalLm::forward(&c, &inputs, true, 0).unwrap().logits;
        tch::manual_seed(3);
        let train2 = CausalLm::forward(&c, &inputs, true, 0).unwrap().logits;
        assert_eq!(max_diff(&train1, &train2), 0.0, "seeded jitter must repeat");
        assert!(max_diff(&train1, &eval1) > 1e-4, "jitter changes nothing");
    }
}

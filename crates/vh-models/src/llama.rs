//! The Llama family (Llama, SmolLM2, Qwen2), as HF's `modeling_llama.py` / `modeling_qwen2.py`:
//! RMS norms, rotary positions (with linear, dynamic-NTK and llama3 scaling), grouped-query
//! attention and a gated SiLU MLP, parameters named like HF's state dict
//! (`model.layers.0.self_attn.q_proj.weight`, ...).

use crate::activation::Activation;
use crate::attention::{causal_bias_when_needed, drop_full_mask, fused_attention, AttnImplementation};
use crate::cache::{Cache, LayerCache};
use serde::Deserialize;
use serde_json::Value;
use tch::{nn, Device, Kind, Tensor};
use vh_core::error::invalid;
use vh_core::error::{check_epsilons, check_positive, check_probabilities, parse_config};
use vh_core::tensor::{
    attention_mask_to_bool, causal_attention_bias, check_input_ids, expect_integer, expect_shape, int_range, lm_logits,
    min_value, position_ids_from_mask, TrainDropout,
};
use vh_core::{Error, Result};

/// How rotary frequencies are scaled for long contexts (`rope_scaling`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor`.
    Linear {
        /// The scaling factor.
        factor: f64,
    },
    /// Dynamic NTK: the base grows with the sequence once it passes `max_position_embeddings`.
    Dynamic {
        /// The scaling factor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// The scaling factor.
        factor: f64,
        /// Wavelengths above original / low_freq_factor are fully scaled.
        low_freq_factor: f64,
        /// Wavelengths below original / high_freq_factor are not scaled.
        high_freq_factor: f64,
        /// The context length the model was trained with.
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    fn from_json(value: Option<&Value>) -> Result<Self> {
        let Some(v) = value.filter(|v| !v.is_null()) else {
            return Ok(Self::Default);
        };
        let kind = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |key: &str| -> Result<f64> {
            v.get(key)
                .and_then(Value::as_f64)
                .ok_or_else(|| Error::Config(format!("rope_scaling `{kind}` needs a numeric `{key}`")))
        };
        let scaling = match kind {
            "default" => Self::Default,
            "linear" => Self::Linear { factor: num("factor")? },
            "dynamic" => Self::Dynamic { factor: num("factor")? },
            "llama3" => Self::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            },
            other => {
                return Err(Error::Config(format!(
                    "unsupported rope_scaling type `{other}` (supported: linear, dynamic, llama3)"
                )))
            }
        };
        match &scaling {
            Self::Linear { factor } | Self::Dynamic { factor } | Self::Llama3 { factor, .. } if *factor < 1.0 => {
                Err(Error::Config(format!("rope_scaling factor must be >= 1, got {factor}")))
            }
            Self::Llama3 {
                low_freq_factor,
                high_freq_factor,
                ..
            } if high_freq_factor <= low_freq_factor => Err(Error::Config(
                "rope_scaling high_freq_factor must exceed low_freq_factor".into(),
            )),
            _ => Ok(scaling),
        }
    }
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<i64>,
    hidden_size: Option<i64>,
    intermediate_size: Option<i64>,
    num_hidden_layers: Option<i64>,
    num_attention_heads: Option<i64>,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<i64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    attention_dropout: Option<f64>,
    use_sliding_window: Option<bool>,
}

/// HF's `LlamaConfig` / `Qwen2Config`: the fields that change the math, with HF's defaults for
/// the model type.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// "llama" or "qwen2".
    pub model_type: String,
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
    /// Biases on q/k/v/o (Llama) or on q/k/v only (Qwen2, always).
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
    /// The LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Dropout on attention probabilities (train mode).
    pub attention_dropout: f64,
}

impl LlamaConfig {
    /// Parses a config.json value (`model_type` "llama" or "qwen2") and checks it.
    pub fn from_json(config: &Value) -> Result<Self> {
        let raw: RawConfig = parse_config(config, "Llama")?;
        let model_type = raw.model_type.clone().unwrap_or_else(|| "llama".to_string());
        let qwen = model_type == "qwen2";
        if !matches!(model_type.as_str(), "llama" | "qwen2") {
            return Err(Error::Config(format!(
                "model_type `{model_type}` is not a Llama-family model"
            )));
        }
        if qwen && raw.use_sliding_window == Some(true) {
            return Err(Error::Config("Qwen2 sliding-window attention is not supported".into()));
        }
        let hidden_size = raw.hidden_size.unwrap_or(4096);
        let num_attention_heads = raw.num_attention_heads.unwrap_or(32);
        if num_attention_heads <= 0 || hidden_size <= 0 {
            return Err(Error::Config(
                "hidden_size and num_attention_heads must be positive".into(),
            ));
        }
        let cfg = Self {
            vocab_size: raw.vocab_size.unwrap_or(if qwen { 151936 } else { 32000 }),
            hidden_size,
            intermediate_size: raw.intermediate_size.unwrap_or(if qwen { 22016 } else { 11008 }),
            num_hidden_layers: raw.num_hidden_layers.unwrap_or(32),
            num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(num_attention_heads),
            head_dim: raw.head_dim.unwrap_or(hidden_size / num_attention_heads),
            hidden_act: raw.hidden_act.unwrap_or_else(|| "silu".to_string()),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(if qwen { 32768 } else { 2048 }),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10000.0),
            rope_scaling: RopeScaling::from_json(raw.rope_scaling.as_ref())?,
            attention_bias: if qwen {
                true
            } else {
                raw.attention_bias.unwrap_or(false)
            },
            mlp_bias: if qwen { false } else { raw.mlp_bias.unwrap_or(false) },
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_dropout: raw.attention_dropout.unwrap_or(0.0),
            model_type,
            attn_implementation: AttnImplementation::default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks sizes and names.
    pub fn validate(&self) -> Result<()> {
        check_positive(&[
            ("vocab_size", self.vocab_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ])?;
        // The projections are heads * head_dim wide: sizes from config.json may make that
        // product overflow (found by fuzzing: a panic in debug builds, a wrapped width in release).
        for (name, heads) in [
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
        ] {
            if heads.checked_mul(self.head_dim).is_none() {
                return Err(Error::Config(format!(
                    "{name} * head_dim overflows ({heads} * {})",
                    self.head_dim
                )));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(Error::Config(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if self.head_dim % 2 != 0 {
            return Err(Error::Config(format!(
                "head_dim must be even for rotary embeddings, got {}",
                self.head_dim
            )));
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

    /// Query heads per key/value head.
    pub fn groups(&self) -> i64 {
        self.num_attention_heads / self.num_key_value_heads
    }
}

/// Rotary position embeddings: inverse frequencies per `rope_scaling`, computed in f32 with the
/// same operations as HF so the angles agree to the bit.
#[derive(Debug)]
pub struct RotaryEmbedding {
    inv_freq: Tensor,
    head_dim: i64,
    theta: f64,
    scaling: RopeScaling,
    max_position_embeddings: i64,
}

fn default_inv_freq(theta: &Tensor, head_dim: i64, device: Device) -> Result<Tensor> {
    let exponent = Tensor::f_arange_start_step(0, head_dim, 2, (Kind::Int64, device))?
        .f_to_kind(Kind::Float)?
        .f_div_scalar(head_dim as f64)?;
    Ok(theta.f_pow(&exponent)?.f_reciprocal()?)
}

impl RotaryEmbedding {
    /// Frequencies for `cfg` on `device`.
    pub fn new(cfg: &LlamaConfig, device: Device) -> Result<Self> {
        let theta = Tensor::f_from_slice(&[cfg.rope_theta as f32])?
            .f_to_device(device)?
            .f_squeeze()?;
        let mut inv_freq = default_inv_freq(&theta, cfg.head_dim, device)?;
        match &cfg.rope_scaling {
            RopeScaling::Default | RopeScaling::Dynamic { .. } => {}
            RopeScaling::Linear { factor } => inv_freq = inv_freq.f_div_scalar(*factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                let wavelen = inv_freq.f_reciprocal()?.f_mul_scalar(2.0 * std::f64::consts::PI)?;
                let scaled = inv_freq.f_div_scalar(*factor)?;
                let llama = scaled.f_where_self(&wavelen.f_gt(low_wavelen)?, &inv_freq)?;
                let smooth = wavelen
                    .f_reciprocal()?
                    .f_mul_scalar(old)?
                    .f_sub_scalar(*low_freq_factor)?
                    .f_div_scalar(high_freq_factor - low_freq_factor)?;
                let smoothed = smooth
                    .f_neg()?
                    .f_add_scalar(1.0)?
                    .f_mul(&llama)?
                    .f_div_scalar(*factor)?
                    .f_add(&smooth.f_mul(&llama)?)?;
                let medium = wavelen
                    .f_lt(high_wavelen)?
                    .f_logical_not()?
                    .f_logical_and(&wavelen.f_gt(low_wavelen)?.f_logical_not()?)?;
                inv_freq = smoothed.f_where_self(&medium, &llama)?;
            }
        }
        Ok(Self {
            inv_freq,
            head_dim: cfg.head_dim,
            theta: cfg.rope_theta,
            scaling: cfg.rope_scaling.clone(),
            max_position_embeddings: cfg.max_position_embeddings,
        })
    }

    /// Frequencies for a pass whose largest position is `max_position`: dynamic NTK scaling
    /// grows the base once the sequence passes `max_position_embeddings` (as HF recomputes it
    /// per forward; HF also keeps the largest length seen across calls, we derive it per call).
    fn inv_freq_for(&self, max_position: i64) -> Result<Tensor> {
        match self.scaling {
            RopeScaling::Dynamic { factor } if max_position + 1 > self.max_position_embeddings => {
                let device = self.inv_freq.device();
                let dim = self.head_dim as f64;
                let seq_len = Tensor::f_from_slice(&[max_position + 1])?
                    .f_to_device(device)?
                    .f_squeeze()?;
                let ratio = seq_len
                    .f_mul_scalar(factor)?
                    .f_div_scalar(self.max_position_embeddings as f64)?
                    .f_sub_scalar(factor - 1.0)?
                    .f_pow_tensor_scalar(dim / (dim - 2.0))?;
                let base = ratio.f_mul_scalar(self.theta)?;
                default_inv_freq(&base, self.head_dim, device)
            }
            _ => Ok(self.inv_freq.shallow_clone()),
        }
    }

    /// cos and sin [B, T, head_dim] for `position_ids` [B, T], in `kind`.
    pub fn cos_sin(&self, position_ids: &Tensor, max_position: i64, kind: Kind) -> Result<(Tensor, Tensor)> {
        let inv_freq = self.inv_freq_for(max_position)?;
        let freqs = position_ids.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?.f_mul(&inv_freq)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        Ok((emb.f_cos()?.f_to_kind(kind)?, emb.f_sin()?.f_to_kind(kind)?))
    }
}

/// x * cos + rotate_half(x) * sin, with cos/sin [B, T, D] broadcast over heads.
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.size()[3] / 2;
    let x1 = x.f_narrow(-1, 0, half)?;
    let x2 = x.f_narrow(-1, half, half)?;
    let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?;
    Ok(x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)?)
}

/// HF's `LlamaRMSNorm`: normalised in f32, cast back to the input kind, then scaled.
#[derive(Debug)]
pub struct RmsNorm {
    /// Scale, [hidden].
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Creates `weight` under `vs` (ones).
    pub fn new(vs: nn::Path, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vh_core::param::var(&vs, "weight", &[dim], nn::Init::Const(1.0))?,
            eps,
        })
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = x.f_to_kind(Kind::Float)?;
        let variance = h.f_pow_tensor_scalar(2.0)?.f_mean_dim(-1, true, Kind::Float)?;
        let normed = h
            .f_mul(&variance.f_add_scalar(self.eps)?.f_rsqrt()?)?
            .f_to_kind(x.kind())?;
        Ok(self.weight.f_mul(&normed)?)
    }
}

/// A linear layer `x @ weight^T (+ bias)` with HF's [out, in] weight.
#[derive(Debug)]
pub struct Linear {
    /// [out, in].
    pub weight: Tensor,
    /// [out], when the layer has one.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Creates `weight` (and `bias`) under `vs`, zero-filled until loaded.
    pub fn new(vs: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: vh_core::param::var(&vs, "weight", &[out_dim, in_dim], nn::Init::Const(0.0))?,
            bias: if bias {
                Some(vh_core::param::var(&vs, "bias", &[out_dim], nn::Init::Const(0.0))?)
            } else {
                None
            },
        })
    }

    /// [..., in] -> [..., out].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_linear(&self.weight, self.bias.as_ref())?)
    }
}

/// Grouped-query self-attention with rotary positions.
#[derive(Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    dropout: f64,
    attn_implementation: AttnImplementation,
}

impl Attention {
    /// Creates the q/k/v/o projections under `vs`.
    pub fn new(vs: nn::Path, cfg: &LlamaConfig) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let qwen = cfg.model_type == "qwen2";
        let qkv_bias = cfg.attention_bias;
        Ok(Self {
            q_proj: Linear::new(vs.sub("q_proj"), h, cfg.num_attention_heads * d, qkv_bias)?,
            k_proj: Linear::new(vs.sub("k_proj"), h, cfg.num_key_value_heads * d, qkv_bias)?,
            v_proj: Linear::new(vs.sub("v_proj"), h, cfg.num_key_value_heads * d, qkv_bias)?,
            o_proj: Linear::new(
                vs.sub("o_proj"),
                cfg.num_attention_heads * d,
                h,
                cfg.attention_bias && !qwen,
            )?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: d,
            dropout: cfg.attention_dropout,
            attn_implementation: cfg.attn_implementation,
        })
    }

    fn heads(&self, x: &Tensor, n: i64) -> Result<Tensor> {
        let (b, t) = (x.size()[0], x.size()[1]);
        Ok(x.f_view([b, t, n, self.head_dim])?.f_transpose(1, 2)?)
    }

    /// Repeats each key/value head for the query heads that share it: [B, kv, S, D] -> [B, heads, S, D].
    fn repeat_kv(&self, x: &Tensor) -> Result<Tensor> {
        let groups = self.heads / self.kv_heads;
        if groups == 1 {
            return Ok(x.shallow_clone());
        }
        let (b, s) = (x.size()[0], x.size()[2]);
        Ok(x.f_unsqueeze(2)?
            .f_expand([b, self.kv_heads, groups, s, self.head_dim], false)?
            .f_reshape([b, self.heads, s, self.head_dim])?)
    }

    /// Attends from `x` [B, T, hidden] over cached and new positions; `bias` [B or 1, 1, T, S]
    /// is added to the scores (`None`: the causal rule alone). Returns the output and the grown cache (keys after rotation).
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
        let (cos, sin) = (cos.f_unsqueeze(1)?, sin.f_unsqueeze(1)?);
        let q = apply_rotary(&self.heads(&self.q_proj.forward(x)?, self.heads)?, &cos, &sin)?;
        let k = apply_rotary(&self.heads(&self.k_proj.forward(x)?, self.kv_heads)?, &cos, &sin)?;
        let v = self.heads(&self.v_proj.forward(x)?, self.kv_heads)?;
        let cache = match past {
            Some(past) => past.append(&k, &v)?,
            None => LayerCache::new(k, v),
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let fused = self.attn_implementation == AttnImplementation::Sdpa;
        let (kind, device) = (q.kind(), q.device());
        let key_len = cache.keys.size()[2];
        let built = causal_bias_when_needed(bias, fused, t, key_len, kind, device, min_value(kind))?;
        let bias = bias.or(built.as_ref());
        let attended = match self.attn_implementation {
            AttnImplementation::Sdpa => {
                fused_attention(&q, &cache.keys, &cache.values, bias, scale, self.dropout, train)?
            }
            AttnImplementation::Eager => {
                let (keys, values) = (self.repeat_kv(&cache.keys)?, self.repeat_kv(&cache.values)?);
                let mut scores = q.f_matmul(&keys.f_transpose(2, 3)?)?.f_mul_scalar(scale)?;
                if let Some(bias) = bias {
                    scores = scores.f_add(bias)?;
                }
                let probs = scores
                    .f_softmax(-1, Kind::Float)?
                    .f_to_kind(q.kind())?
                    .train_dropout(self.dropout, train)?;
                probs.f_matmul(&values)?
            }
        };
        let out = attended
            .f_transpose(1, 2)?
            .f_contiguous()?
            .f_reshape([b, t, self.heads * self.head_dim])?;
        Ok((self.o_proj.forward(&out)?, cache))
    }
}

/// The gated MLP: `down_proj(act(gate_proj(x)) * up_proj(x))`.
#[derive(Debug)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

impl Mlp {
    /// Creates the projections under `vs`.
    pub fn new(vs: nn::Path, cfg: &LlamaConfig) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: Linear::new(vs.sub("gate_proj"), h, i, bias)?,
            up_proj: Linear::new(vs.sub("up_proj"), h, i, bias)?,
            down_proj: Linear::new(vs.sub("down_proj"), i, h, bias)?,
            act: cfg.activation()?,
        })
    }

    /// [B, T, hidden] -> [B, T, hidden].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = self
            .act
            .forward(&self.gate_proj.forward(x)?)?
            .f_mul(&self.up_proj.forward(x)?)?;
        self.down_proj.forward(&gated)
    }
}

/// One decoder layer: pre-norm attention and MLP with residuals.
#[derive(Debug)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    /// Creates layer parameters under `vs`.
    pub fn new(vs: nn::Path, cfg: &LlamaConfig) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::new(vs.sub("input_layernorm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            self_attn: Attention::new(vs.sub("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::new(
                vs.sub("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::new(vs.sub("mlp"), cfg)?,
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

/// The output of a Llama LM pass.
#[derive(Debug)]
pub struct LlamaOutput {
    /// Logits [B, T, vocab] in the model's dtype.
    pub logits: Tensor,
    /// The final norm's output [B, T, hidden] (HF's `hidden_states[-1]`).
    pub last_hidden_state: Tensor,
    /// Keys and values for the cached and new positions.
    pub cache: Cache,
}

/// A Llama-family causal LM (`LlamaForCausalLM`, `Qwen2ForCausalLM`).
#[derive(Debug)]
pub struct LlamaForCausalLM {
    /// `model.embed_tokens.weight` [vocab, hidden].
    pub embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `lm_head.weight`; the embedding matrix when tied.
    pub lm_head: Tensor,
    rotary: RotaryEmbedding,
    cfg: LlamaConfig,
}

impl LlamaForCausalLM {
    /// Creates `model.*` and, unless tied, `lm_head.weight` under `vs`.
    pub fn new(vs: nn::Path, cfg: &LlamaConfig) -> Result<Self> {
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
        let norm = RmsNorm::new(model.sub("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            vh_core::param::var(
                &vs.sub("lm_head"),
                "weight",
                &[cfg.vocab_size, cfg.hidden_size],
                nn::Init::Const(0.0),
            )?
        };
        let rotary = RotaryEmbedding::new(cfg, vs.device())?;
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
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Maps a checkpoint key to a parameter name: rotary buffers of old checkpoints carry no
    /// parameters, and a tied model reads its head from the embedding.
    pub fn parameter_name(&self, key: &str) -> Option<String> {
        if key.ends_with("rotary_emb.inv_freq") || (self.cfg.tie_word_embeddings && key == "lm_head.weight") {
            return None;
        }
        Some(key.to_string())
    }

    /// Runs the model over `input_ids` [B, T] after the cached positions; `attention_mask`
    /// [B, past + T] and `position_ids` as for GPT-2 (positions from the mask by default).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        past: Option<&Cache>,
        train: bool,
    ) -> Result<LlamaOutput> {
        self.forward_keeping(input_ids, attention_mask, position_ids, past, train, 0)
    }

    /// [`LlamaForCausalLM::forward`] with logits for the last `logits_to_keep` positions only
    /// (0 = all), as HF's `logits_to_keep`: generation needs one position's logits.
    pub fn forward_keeping(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        past: Option<&Cache>,
        train: bool,
        logits_to_keep: i64,
    ) -> Result<LlamaOutput> {
        let (batch, new_len) = check_input_ids(input_ids, self.cfg.vocab_size)?;
        let past = past.filter(|c| !c.is_empty());
        if let Some(p) = past {
            if p.layers.len() != self.layers.len() || p.batch_size() != Some(batch) {
                return Err(invalid(
                    "the cache does not match this model's layers or the batch size",
                ));
            }
        }
        let past_len = past.map_or(0, Cache::seq_len);
        let total = past_len + new_len;
        let device = self.embed_tokens.device();
        let kind = self.embed_tokens.kind();
        let key_mask = attention_mask
            .map(|m| {
                attention_mask_to_bool(m, "attention_mask", &[batch, total])?
                    .f_to_device(device)
                    .map_err(Error::from)
            })
            .transpose()?;
        let key_mask = drop_full_mask(key_mask)?;
        let position_ids = match (position_ids, &key_mask) {
            (Some(p), _) => {
                expect_shape(p, "position_ids", &[batch, new_len])?;
                expect_integer(p, "position_ids")?;
                if int_range(p)?.0 < 0 {
                    return Err(invalid("position_ids must be >= 0"));
                }
                p.f_to_device(device)?.f_to_kind(Kind::Int64)?
            }
            (None, Some(mask)) => position_ids_from_mask(mask, new_len)?,
            (None, None) => Tensor::f_arange_start(past_len, total, (Kind::Int64, device))?
                .f_unsqueeze(0)?
                .f_expand([batch, new_len], false)?,
        };
        let max_position = int_range(&position_ids)?.1;
        let (cos, sin) = self.rotary.cos_sin(&position_ids, max_position, kind)?;

        // HF's eager mask: the dtype's minimum wherever a key is in the future or padding.
        // Without padding the layers apply the causal rule themselves.
        let bias = match &key_mask {
            Some(mask) => causal_attention_bias(Some(mask), batch, new_len, past_len, kind, device, min_value(kind))?,
            None => None,
        };

        let mut h = Tensor::f_embedding(&self.embed_tokens, &input_ids.f_to_device(device)?, -1, false, false)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let (out, cache) = layer.forward(&h, &cos, &sin, bias.as_ref(), past.map(|p| &p.layers[i]), train)?;
            h = out;
            layers.push(cache);
        }
        let h = self.norm.forward(&h)?;
        let logits = lm_logits(&h, &self.lm_head, logits_to_keep)?;
        Ok(LlamaOutput {
            logits,
            last_hidden_state: h,
            cache: Cache { layers },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tch::nn::VarStore;

    fn tiny(extra: Value) -> LlamaConfig {
        let mut cfg = json!({"model_type": "llama", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 32});
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        LlamaConfig::from_json(&cfg).unwrap()
    }

    fn random_model(cfg: &LlamaConfig) -> (VarStore, LlamaForCausalLM) {
        let vs = VarStore::new(Device::Cpu);
        let model = LlamaForCausalLM::new(vs.root(), cfg).unwrap();
        crate::test_util::randomize(&vs, 9, 0.3);
        (vs, model)
    }

    #[test]
    fn config_defaults_and_errors() {
        let llama = LlamaConfig::from_json(&json!({"model_type": "llama"})).unwrap();
        assert_eq!(
            (
                llama.vocab_size,
                llama.num_key_value_heads,
                llama.head_dim,
                llama.tie_word_embeddings
            ),
            (32000, 32, 128, false)
        );
        let qwen = LlamaConfig::from_json(&json!({"model_type": "qwen2", "attention_bias": false})).unwrap();
        assert!(qwen.attention_bias, "Qwen2 always has q/k/v biases");
        let bad = |v: Value| LlamaConfig::from_json(&v).is_err();
        assert!(
            bad(json!({"num_attention_heads": 6, "num_key_value_heads": 4})),
            "heads not a multiple of kv heads"
        );
        assert!(
            bad(json!({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})),
            "unknown rope type"
        );
        assert!(bad(json!({"rope_scaling": {"type": "linear"}})), "missing factor");
        assert!(bad(
            json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 64}})
        ));
        assert!(bad(json!({"hidden_act": "nope"})));
        assert!(bad(json!({"model_type": "qwen2", "use_sliding_window": true})));
        assert!(bad(json!({"head_dim": 7})));
        // Fuzzing regression: heads * head_dim overflowed i64 and panicked while building the
        // projections (crates/vh-fuzz/regressions/config/llama-heads-times-head-dim-overflow.json).
        let err = LlamaConfig::from_json(&json!({"head_dim": 1i64 << 62, "num_attention_heads": 4})).unwrap_err();
        assert!(
            err.to_string().contains("num_attention_heads * head_dim overflows"),
            "{err}"
        );
        assert_eq!(
            LlamaConfig::from_json(&json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}}))
                .unwrap()
                .rope_scaling,
            RopeScaling::Dynamic { factor: 2.0 }
        );
    }

    #[test]
    fn incremental_decoding_and_left_padding_match_full_forward() {
        let cfg = tiny(json!({}));
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
            let diff = (step.logits.squeeze_dim(1) - full.logits.select(1, t))
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff < 1e-5, "step {t}: {diff}");
            cache = step.cache;
        }
        let padded = Tensor::from_slice2(&[[0i64, 0, 1, 5, 7]]);
        let mask = Tensor::from_slice2(&[[0i64, 0, 1, 1, 1]]);
        let out = model.forward(&padded, Some(&mask), None, None, false).unwrap();
        let plain = model
            .forward(&ids.narrow(1, 0, 3).narrow(0, 0, 1), None, None, None, false)
            .unwrap();
        assert!(
            (out.logits.narrow(1, 2, 3) - plain.logits)
                .abs()
                .max()
                .double_value(&[])
                < 1e-5
        );
    }
}

//! Rotary position embeddings (RoPE), as HF's `modeling_rope_utils.py`: inverse frequencies with
//! linear, dynamic-NTK and llama3 scaling, computed in f32 with the same operations as HF so the
//! angles agree to the bit, and their application to queries and keys.

use serde_json::Value;
use tch::{Device, Kind, Tensor};
use vh_core::ops::ScalarOps;
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
    /// Parses config.json's `rope_scaling` (null or absent: plain RoPE).
    pub fn from_json(value: Option<&Value>) -> Result<Self> {
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
        .s_div(head_dim as f64)?;
    Ok(theta.f_pow(&exponent)?.f_reciprocal()?)
}

/// What rotary positions need from a config.
#[derive(Debug, Clone, PartialEq)]
pub struct RotaryConfig {
    /// Dimensions rotated per head (all of `head_dim`, or a part for partial rotary models).
    pub head_dim: i64,
    /// The base (`rope_theta`).
    pub rope_theta: f64,
    /// `rope_scaling`.
    pub rope_scaling: RopeScaling,
    /// The context length the scaling refers to.
    pub max_position_embeddings: i64,
}

impl RotaryEmbedding {
    /// Frequencies for `cfg` on `device`.
    pub fn new(cfg: &RotaryConfig, device: Device) -> Result<Self> {
        let theta = Tensor::f_from_slice(&[cfg.rope_theta as f32])?
            .f_to_device(device)?
            .f_squeeze()?;
        let mut inv_freq = default_inv_freq(&theta, cfg.head_dim, device)?;
        match &cfg.rope_scaling {
            RopeScaling::Default | RopeScaling::Dynamic { .. } => {}
            RopeScaling::Linear { factor } => inv_freq = inv_freq.s_div(*factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                let wavelen = inv_freq.f_reciprocal()?.s_mul(2.0 * std::f64::consts::PI)?;
                let scaled = inv_freq.s_div(*factor)?;
                let llama = scaled.f_where_self(&wavelen.s_gt(low_wavelen)?, &inv_freq)?;
                let smooth = wavelen
                    .f_reciprocal()?
                    .s_mul(old)?
                    .s_sub(*low_freq_factor)?
                    .s_div(high_freq_factor - low_freq_factor)?;
                let smoothed = smooth
                    .f_neg()?
                    .s_add(1.0)?
                    .f_mul(&llama)?
                    .s_div(*factor)?
                    .f_add(&smooth.f_mul(&llama)?)?;
                let medium = wavelen
                    .s_lt(high_wavelen)?
                    .f_logical_not()?
                    .f_logical_and(&wavelen.s_gt(low_wavelen)?.f_logical_not()?)?;
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
                    .s_mul(factor)?
                    .s_div(self.max_position_embeddings as f64)?
                    .s_sub(factor - 1.0)?
                    .f_pow_tensor_scalar(dim / (dim - 2.0))?;
                let base = ratio.s_mul(self.theta)?;
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

/// `x * cos + rotate_half(x) * sin` for `x` [B, H, T, D], with cos/sin [B, 1, T, D] broadcast over
/// heads.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.size()[3] / 2;
    let x1 = x.f_narrow(-1, 0, half)?;
    let x2 = x.f_narrow(-1, half, half)?;
    let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?;
    Ok(x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)?)
}

/// Rotates the first `cos.size(-1)` dimensions of `x` [B, H, T, D] and passes the rest through,
/// as HF's partial-rotary models (GPT-NeoX's `rotary_pct`, Phi's `partial_rotary_factor`):
/// `cat(x_rot * cos + rotate_half(x_rot) * sin, x_pass)`. The full width is [`apply_rotary`].
pub fn apply_partial_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (width, rotary) = (x.size()[3], cos.size()[3]);
    if rotary == width {
        return apply_rotary(x, cos, sin);
    }
    if rotary == 0 {
        return Ok(x.shallow_clone());
    }
    if rotary > width {
        return Err(Error::InvalidInput(format!(
            "rotary width {rotary} exceeds the head width {width}"
        )));
    }
    let rotated = apply_rotary(&x.f_narrow(-1, 0, rotary)?, cos, sin)?;
    Ok(Tensor::f_cat(
        &[&rotated, &x.f_narrow(-1, rotary, width - rotary)?],
        -1,
    )?)
}

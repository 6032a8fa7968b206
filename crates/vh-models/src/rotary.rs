//! Rotary position embeddings (RoPE), as HF's `modeling_rope_utils.py`: inverse frequencies with
//! linear, dynamic-NTK, llama3 and LongRoPE scaling, computed in f32 with the same operations as
//! HF so the angles agree to the bit, and their application to queries and keys.

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
    /// LongRoPE (Phi-3's `longrope`, formerly `su`): each frequency divided by its own factor,
    /// `short_factor` while a pass fits the pretraining length and `long_factor` once it does not
    /// (HF's `longrope_frequency_update`: the largest position id + 1 of the pass against
    /// `original_max_position_embeddings`), and cos/sin multiplied by `attention_factor`. Built
    /// by [`RopeScaling::longrope`], which needs the model's context lengths.
    LongRope {
        /// Per-frequency divisors within the pretraining length.
        short_factor: Vec<f64>,
        /// Per-frequency divisors beyond it.
        long_factor: Vec<f64>,
        /// The pretraining length: a pass whose largest position id + 1 exceeds it uses
        /// `long_factor`.
        original_max_position_embeddings: i64,
        /// Multiplies cos and sin (HF's `attention_scaling`), whichever factors are in use.
        attention_factor: f64,
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
            // LongRoPE needs the model's context lengths, which only the model's config knows:
            // models that support it build it with `RopeScaling::longrope`.
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

    /// LongRoPE's parameters resolved as HF's `_compute_longrope_parameters` resolves them, from
    /// `rope_scaling` (`short_factor` and `long_factor`, one per rotary frequency, and optionally
    /// `factor` and `attention_factor`), the rotary width `rotary_dim` (dimensions per head that
    /// rotate) and the config's context lengths. With `original_max_position_embeddings` (Phi-3
    /// always has one), the scaling factor is `max_position_embeddings / original` whatever
    /// `rope_scaling.factor` says; without, the pretraining length is `max_position_embeddings`
    /// and the factor is `rope_scaling.factor`. Unless `attention_factor` is given, it is 1 for a
    /// factor <= 1 and `sqrt(1 + ln(factor) / ln(original))` otherwise.
    ///
    /// Where HF's own computation fails (no factor to derive the attention factor from, a
    /// pretraining length of 1 with a factor above 1: a division by zero) or silently yields
    /// NaN (a zero or non-finite per-frequency factor), this is an `Error::Config`; so is a
    /// factor list whose length is not the number of frequencies (HF's broadcast fails then,
    /// except for a single factor, which it would spread over every frequency).
    pub fn longrope(
        rope_scaling: &Value,
        rotary_dim: i64,
        max_position_embeddings: i64,
        original_max_position_embeddings: Option<i64>,
    ) -> Result<Self> {
        let frequencies = (rotary_dim.max(0) + 1) / 2;
        let factors = |key: &str| -> Result<Vec<f64>> {
            let list = rope_scaling
                .get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| Error::Config(format!("rope_scaling `longrope` needs a list `{key}`")))?;
            let values = list
                .iter()
                .map(|v| {
                    v.as_f64().filter(|f| f.is_finite() && *f != 0.0).ok_or_else(|| {
                        Error::Config(format!(
                            "rope_scaling `{key}` must hold finite, non-zero numbers, got {v}"
                        ))
                    })
                })
                .collect::<Result<Vec<f64>>>()?;
            if values.len() as i64 != frequencies {
                return Err(Error::Config(format!(
                    "rope_scaling `{key}` must have one entry per rotary frequency ({frequencies} for {rotary_dim} \
                     rotary dimensions), got {}",
                    values.len()
                )));
            }
            Ok(values)
        };
        let (short_factor, long_factor) = (factors("short_factor")?, factors("long_factor")?);
        let optional = |key: &str| -> Result<Option<f64>> {
            match rope_scaling.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|f| f.is_finite())
                    .map(Some)
                    .ok_or_else(|| Error::Config(format!("rope_scaling `{key}` must be a finite number, got {v}"))),
            }
        };
        // HF tests the attribute for truth: a missing, null or zero original length falls back.
        let (factor, original) = match original_max_position_embeddings.filter(|o| *o != 0) {
            Some(original) => (Some(max_position_embeddings as f64 / original as f64), original),
            None => (optional("factor")?, max_position_embeddings),
        };
        if original < 1 {
            return Err(Error::Config(format!(
                "longrope needs a positive original_max_position_embeddings, got {original}"
            )));
        }
        let attention_factor = match optional("attention_factor")? {
            Some(a) => a,
            None => match factor {
                None => {
                    return Err(Error::Config(
                        "rope_scaling `longrope` needs `factor` (or original_max_position_embeddings) to derive \
                         its attention factor"
                            .into(),
                    ))
                }
                Some(f) if f <= 1.0 => 1.0,
                Some(_) if original == 1 => {
                    return Err(Error::Config(
                        "longrope with original_max_position_embeddings 1 divides by ln(1) = 0".into(),
                    ))
                }
                Some(f) => (1.0 + f.ln() / (original as f64).ln()).sqrt(),
            },
        };
        Ok(Self::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings: original,
            attention_factor,
        })
    }

    /// Whether the frequencies depend on the pass's positions (dynamic NTK, LongRoPE), so the
    /// host decides them per pass.
    pub fn reads_positions(&self) -> bool {
        matches!(self, Self::Dynamic { .. } | Self::LongRope { .. })
    }
}

/// Rotary position embeddings: inverse frequencies per `rope_scaling`, computed in f32 with the
/// same operations as HF so the angles agree to the bit.
#[derive(Debug)]
pub struct RotaryEmbedding {
    inv_freq: Tensor,
    /// LongRoPE's frequencies with the long factors (`inv_freq` has the short ones); `inv_freq`
    /// itself for the other scalings.
    long_inv_freq: Tensor,
    /// Multiplies cos and sin (HF's `attention_scaling`; 1 except for LongRoPE).
    attention_scaling: f64,
    head_dim: i64,
    theta: f64,
    scaling: RopeScaling,
    max_position_embeddings: i64,
}

/// `theta ^ (2i / head_dim)` for each frequency i, in f32 as HF's `base ** (arange(0, dim, 2) / dim)`.
fn rope_powers(theta: &Tensor, head_dim: i64, device: Device) -> Result<Tensor> {
    let exponent = Tensor::f_arange_start_step(0, head_dim, 2, (Kind::Int64, device))?
        .f_to_kind(Kind::Float)?
        .s_div(head_dim as f64)?;
    Ok(theta.f_pow(&exponent)?)
}

fn default_inv_freq(theta: &Tensor, head_dim: i64, device: Device) -> Result<Tensor> {
    Ok(rope_powers(theta, head_dim, device)?.f_reciprocal()?)
}

/// LongRoPE's `1 / (factors * theta ^ (2i / head_dim))`, the factors rounded to f32 as HF's
/// `torch.tensor(factors, dtype=float32)`.
fn longrope_inv_freq(theta: &Tensor, head_dim: i64, factors: &[f64], device: Device) -> Result<Tensor> {
    let factors: Vec<f32> = factors.iter().map(|f| *f as f32).collect();
    let factors = Tensor::f_from_slice(&factors)?.f_to_device(device)?;
    Ok(factors.f_mul(&rope_powers(theta, head_dim, device)?)?.f_reciprocal()?)
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
        let (mut long_inv_freq, mut attention_scaling) = (None, 1.0);
        match &cfg.rope_scaling {
            RopeScaling::Default | RopeScaling::Dynamic { .. } => {}
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                attention_factor,
                ..
            } => {
                let frequencies = inv_freq.size()[0];
                if [short_factor, long_factor]
                    .iter()
                    .any(|f| f.len() as i64 != frequencies)
                {
                    return Err(Error::Config(format!(
                        "longrope factors must have one entry per rotary frequency ({frequencies})"
                    )));
                }
                inv_freq = longrope_inv_freq(&theta, cfg.head_dim, short_factor, device)?;
                long_inv_freq = Some(longrope_inv_freq(&theta, cfg.head_dim, long_factor, device)?);
                attention_scaling = *attention_factor;
            }
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
            long_inv_freq: long_inv_freq.unwrap_or_else(|| inv_freq.shallow_clone()),
            inv_freq,
            attention_scaling,
            head_dim: cfg.head_dim,
            theta: cfg.rope_theta,
            scaling: cfg.rope_scaling.clone(),
            max_position_embeddings: cfg.max_position_embeddings,
        })
    }

    /// Frequencies for a pass whose largest position is `max_position`: dynamic NTK scaling
    /// grows the base once the sequence passes `max_position_embeddings` (as HF recomputes it
    /// per forward; HF also keeps the largest length seen across calls, we derive it per call);
    /// LongRoPE takes the long factors once it passes `original_max_position_embeddings` (HF
    /// decides per forward too, from the pass's own position ids: keys already cached keep the
    /// factors they were computed with).
    fn inv_freq_for(&self, max_position: i64) -> Result<Tensor> {
        match self.scaling {
            RopeScaling::LongRope {
                original_max_position_embeddings,
                ..
            } if max_position + 1 > original_max_position_embeddings => Ok(self.long_inv_freq.shallow_clone()),
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
        self.cos_sin_laid_out(position_ids, max_position, kind, false)
    }

    /// [`RotaryEmbedding::cos_sin`] with each frequency repeated in place (`f0 f0 f1 f1 ...`, HF's
    /// `repeat_interleave(freqs, 2)`) instead of the two halves side by side, for models that
    /// rotate adjacent pairs of dimensions (Cohere; see [`apply_rotary_interleaved`]).
    pub fn cos_sin_interleaved(
        &self,
        position_ids: &Tensor,
        max_position: i64,
        kind: Kind,
    ) -> Result<(Tensor, Tensor)> {
        self.cos_sin_laid_out(position_ids, max_position, kind, true)
    }

    fn cos_sin_laid_out(
        &self,
        position_ids: &Tensor,
        max_position: i64,
        kind: Kind,
        interleaved: bool,
    ) -> Result<(Tensor, Tensor)> {
        let inv_freq = self.inv_freq_for(max_position)?;
        let freqs = position_ids.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?.f_mul(&inv_freq)?;
        let emb = if interleaved {
            freqs.f_repeat_interleave_self_int(2, -1, None::<i64>)?
        } else {
            Tensor::f_cat(&[&freqs, &freqs], -1)?
        };
        let (mut cos, mut sin) = (emb.f_cos()?, emb.f_sin()?);
        // HF multiplies by its attention scaling in f32 before the cast; by 1 that changes nothing.
        if self.attention_scaling != 1.0 {
            cos = cos.s_mul(self.attention_scaling)?;
            sin = sin.s_mul(self.attention_scaling)?;
        }
        Ok((cos.f_to_kind(kind)?, sin.f_to_kind(kind)?))
    }
}
/// Checks a rotary attention's head layout from config.json: `heads * head_dim` must not
/// overflow (the projections are that wide; fuzzing found a panic in debug builds and a wrapped
/// width in release), the query heads must be a multiple of the key/value heads (grouped-query
/// attention), and `head_dim` even (dimensions rotate in pairs: an odd width leaves HF's cos/sin
/// one short).
pub fn check_rotary_heads(num_attention_heads: i64, num_key_value_heads: i64, head_dim: i64) -> Result<()> {
    for (name, heads) in [
        ("num_attention_heads", num_attention_heads),
        ("num_key_value_heads", num_key_value_heads),
    ] {
        if heads.checked_mul(head_dim).is_none() {
            return Err(Error::Config(format!(
                "{name} * head_dim overflows ({heads} * {head_dim})"
            )));
        }
    }
    if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
        return Err(Error::Config(format!(
            "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
        )));
    }
    if head_dim % 2 != 0 {
        return Err(Error::Config(format!(
            "head_dim must be even for rotary embeddings, got {head_dim}"
        )));
    }
    Ok(())
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

/// `x * cos + rotate_pairs(x) * sin` for `x` [B, H, T, D], where dimensions (2i, 2i + 1) form a
/// pair rotated by frequency i (`rotate_pairs` maps (a, b) to (-b, a)), as HF Cohere's
/// `rotate_half`; cos/sin come from [`RotaryEmbedding::cos_sin_interleaved`].
pub fn apply_rotary_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let width = x.size()[3];
    let even = x.f_slice(-1, 0, width, 2)?;
    let odd = x.f_slice(-1, 1, width, 2)?;
    let rotated = Tensor::f_stack(&[&odd.f_neg()?, &even], -1)?.f_flatten(-2, -1)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn factors(short: &[f64], long: &[f64]) -> Value {
        json!({"type": "longrope", "short_factor": short, "long_factor": long})
    }

    #[test]
    fn longrope_resolves_its_parameters_as_hf() {
        // With an original length: factor = max / original (rope_scaling's factor ignored).
        let scaling = RopeScaling::longrope(&factors(&[1.0, 2.0], &[3.0, 4.0]), 4, 32, Some(8)).unwrap();
        let expected = (1.0 + 4f64.ln() / 8f64.ln()).sqrt();
        assert_eq!(
            scaling,
            RopeScaling::LongRope {
                short_factor: vec![1.0, 2.0],
                long_factor: vec![3.0, 4.0],
                original_max_position_embeddings: 8,
                attention_factor: expected,
            }
        );
        // Without one: the pretraining length is max_position_embeddings, the factor comes from
        // rope_scaling, an explicit attention factor wins.
        let mut v = factors(&[1.0, 2.0], &[3.0, 4.0]);
        v["factor"] = json!(2.0);
        let RopeScaling::LongRope {
            original_max_position_embeddings,
            attention_factor,
            ..
        } = RopeScaling::longrope(&v, 4, 32, None).unwrap()
        else {
            panic!("not longrope");
        };
        assert_eq!(original_max_position_embeddings, 32);
        assert_eq!(attention_factor, (1.0 + 2f64.ln() / 32f64.ln()).sqrt());
        v["attention_factor"] = json!(0.5);
        assert!(matches!(
            RopeScaling::longrope(&v, 4, 32, None).unwrap(),
            RopeScaling::LongRope { attention_factor, .. } if attention_factor == 0.5
        ));
        // A factor of at most 1: no attention scaling.
        assert!(matches!(
            RopeScaling::longrope(&factors(&[1.0, 2.0], &[3.0, 4.0]), 4, 8, Some(8)).unwrap(),
            RopeScaling::LongRope { attention_factor, .. } if attention_factor == 1.0
        ));
        // Where HF fails or yields NaN.
        let bad = |v: &Value, dim: i64, max: i64, original: Option<i64>, what: &str| {
            let err = RopeScaling::longrope(v, dim, max, original).expect_err(what);
            assert!(matches!(err, Error::Config(_)), "{what}: {err}");
        };
        let ok = factors(&[1.0, 2.0], &[3.0, 4.0]);
        bad(&ok, 4, 32, None, "no factor to derive the attention factor from");
        bad(&ok, 4, 32, Some(1), "ln(1) = 0");
        bad(&ok, 4, 32, Some(-3), "negative original length");
        bad(&ok, 6, 32, Some(8), "two factors for three frequencies");
        bad(&factors(&[1.0, 0.0], &[3.0, 4.0]), 4, 32, Some(8), "a zero factor");
        bad(
            &json!({"type": "longrope", "long_factor": [3.0, 4.0]}),
            4,
            32,
            Some(8),
            "no short factors",
        );
        // The generic parser leaves LongRoPE to the models that know their context lengths.
        assert!(RopeScaling::from_json(Some(&ok)).is_err());
        assert!(RopeScaling::LongRope {
            short_factor: vec![],
            long_factor: vec![],
            original_max_position_embeddings: 1,
            attention_factor: 1.0
        }
        .reads_positions());
        assert!(!RopeScaling::Linear { factor: 2.0 }.reads_positions());
    }

    #[test]
    fn longrope_switches_factors_past_the_original_length_and_scales_cos_and_sin() {
        let (short, long) = ([1.0, 2.0, 3.0], [4.0, 5.0, 6.5]);
        let scaling = RopeScaling::longrope(&factors(&short, &long), 6, 32, Some(8)).unwrap();
        let attention = (1.0 + 4f64.ln() / 8f64.ln()).sqrt();
        let rotary = RotaryEmbedding::new(
            &RotaryConfig {
                head_dim: 6,
                rope_theta: 100.0,
                rope_scaling: scaling,
                max_position_embeddings: 32,
            },
            Device::Cpu,
        )
        .unwrap();
        let positions = Tensor::arange(10, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        // HF's rule: the pass's largest position id + 1 against the original length (8).
        for (max_position, in_use) in [(6, short), (7, short), (8, long), (30, long)] {
            let (cos, sin) = rotary.cos_sin(&positions, max_position, Kind::Float).unwrap();
            assert_eq!(cos.size(), vec![1, 10, 6]);
            for p in 0..10 {
                for j in 0..6 {
                    let i = j % 3;
                    let angle = p as f64 / (in_use[i] * 100f64.powf(2.0 * i as f64 / 6.0));
                    let (c, s) = (cos.double_value(&[0, p, j as i64]), sin.double_value(&[0, p, j as i64]));
                    assert!(
                        (c - angle.cos() * attention).abs() < 1e-5,
                        "max {max_position} p {p} j {j}"
                    );
                    assert!(
                        (s - angle.sin() * attention).abs() < 1e-5,
                        "max {max_position} p {p} j {j}"
                    );
                }
            }
        }
        // Without scaling cos and sin are not scaled.
        let plain = RotaryEmbedding::new(
            &RotaryConfig {
                head_dim: 6,
                rope_theta: 100.0,
                rope_scaling: RopeScaling::Default,
                max_position_embeddings: 32,
            },
            Device::Cpu,
        )
        .unwrap();
        let (cos, _) = plain.cos_sin(&positions, 9, Kind::Float).unwrap();
        assert_eq!(cos.double_value(&[0, 0, 0]), 1.0);
    }
}

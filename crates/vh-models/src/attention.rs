//! How attention probabilities are computed, as HF's `attn_implementation`.

use crate::layers::repeat_kv;
use tch::{Device, Kind, Tensor};
use vh_core::ops::ScalarOps;
use vh_core::tensor::{min_value, TrainDropout};
use vh_core::{Error, Result};

/// `mask` [B, S] (bool) unless it keeps every position: a mask without padding changes nothing
/// (HF drops it too), and without one the fused kernel applies the causal rule itself.
pub fn drop_full_mask(mask: Option<Tensor>) -> Result<Option<Tensor>> {
    match mask {
        Some(m) if m.f_all()?.f_int64_value(&[])? != 0 => Ok(None),
        other => Ok(other),
    }
}

/// The attention computation: HF's `eager` or its default `sdpa`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttnImplementation {
    /// Scores, softmax and the weighted sum as separate operations, as HF's `eager` (the
    /// reference the parity suites compare with, to the bit).
    Eager,
    /// PyTorch's fused `scaled_dot_product_attention`, as HF's default `sdpa`: the same function
    /// with fewer passes over memory (no score matrix, no repeated key/value heads), equal to
    /// eager up to rounding.
    #[default]
    Sdpa,
}

impl std::str::FromStr for AttnImplementation {
    type Err = Error;
    fn from_str(name: &str) -> Result<Self> {
        match name {
            "eager" => Ok(Self::Eager),
            "sdpa" => Ok(Self::Sdpa),
            other => Err(Error::Config(format!(
                "unsupported attn_implementation `{other}` (expected `eager` or `sdpa`)"
            ))),
        }
    }
}

/// The additive padding bias [B, 1, 1, S] of a bool key mask [B, S] (true = attend): 0 for
/// attended keys, the kind's minimum for padding, as HF's `_prepare_4d_attention_mask` (the
/// encoders' and cross-attention's masks, which hide no future).
pub fn padding_bias(mask: &Tensor, kind: Kind) -> Result<Tensor> {
    let size = mask.size();
    Tensor::f_zeros([size[0], 1, 1, size[1]], (kind, mask.device()))?.s_masked_fill(
        &mask.f_logical_not()?.f_view([size[0], 1, 1, size[1]])?,
        min_value(kind),
    )
}

/// The causal bias [1, 1, T, S] (`future` on keys after each query) that attention needs when
/// the model passes none (no padding mask) for T > 1 new positions over S keys, unless the fused
/// kernel can apply the causal rule itself (no cache: T == S).
pub fn causal_bias_when_needed(
    bias: Option<&Tensor>,
    fused: bool,
    query_len: i64,
    key_len: i64,
    kind: Kind,
    device: Device,
    future: f64,
) -> Result<Option<Tensor>> {
    if bias.is_some() || query_len == 1 || (fused && query_len == key_len) {
        return Ok(None);
    }
    MaskSpec {
        key_mask: None,
        batch: 1,
        new_len: query_len,
        past_len: key_len - query_len,
        future,
        sliding_window: None,
    }
    .bias(kind, device)
}

/// What the additive attention bias of a pass hides: keys in a query's future and padded keys.
/// Built once per pass and shared by every layer, as HF does.
#[derive(Debug, Clone, Copy)]
pub struct MaskSpec<'a> {
    /// Keys to attend, bool [batch, past + new]; `None` when nothing is padded.
    pub key_mask: Option<&'a Tensor>,
    /// Rows.
    pub batch: i64,
    /// Queries in this pass.
    pub new_len: i64,
    /// Cached positions before them.
    pub past_len: i64,
    /// The score a future key gets. HF's eager attention ends with -inf for GPT-2 (its causal
    /// fill plus its padding mask) and the dtype's minimum for Llama and T5 (one combined mask);
    /// the outputs at fully padded query rows, which HF's loss reads, depend on that choice.
    pub future: f64,
    /// Sliding-window attention (Mistral, Qwen2's sliding layers, Gemma2's local layers): a query
    /// sees only keys less than this many positions behind it (HF's `kv_idx > q_idx - window`);
    /// older keys get the `future` score too.
    pub sliding_window: Option<i64>,
}

impl MaskSpec<'_> {
    /// The bias [B or 1, 1, new, past + new]: `future` where a key lies in a query's future,
    /// the kind's minimum where a visible key is padding, 0 elsewhere; `None` when nothing is
    /// hidden (one new token and no padding).
    pub fn bias(&self, kind: Kind, device: Device) -> Result<Option<Tensor>> {
        let (batch, new_len, past_len) = (self.batch, self.new_len, self.past_len);
        let total = past_len + new_len;
        let window = self.sliding_window.filter(|w| total > *w);
        if self.key_mask.is_none() && new_len == 1 && window.is_none() {
            return Ok(None);
        }
        let keys = Tensor::f_arange(total, (Kind::Int64, device))?.f_unsqueeze(0)?;
        let queries = Tensor::f_arange_start(past_len, total, (Kind::Int64, device))?.f_unsqueeze(1)?;
        let mut in_future = keys.f_gt_tensor(&queries)?;
        if let Some(window) = window {
            // Keys at or beyond `window` positions behind the query are hidden like future ones.
            let too_old = keys.f_le_tensor(&queries.s_sub(window)?)?;
            in_future = in_future.f_logical_or(&too_old)?;
        }
        let in_future = in_future.f_view([1, 1, new_len, total])?;
        let bias = match self.key_mask {
            Some(mask) => {
                let padding = mask.f_logical_not()?.f_view([batch, 1, 1, total])?;
                Tensor::f_zeros([batch, 1, new_len, total], (kind, device))?.s_masked_fill(&padding, min_value(kind))?
            }
            None => Tensor::f_zeros([1, 1, new_len, total], (kind, device))?,
        };
        Ok(Some(bias.s_masked_fill(&in_future, self.future)?))
    }

    /// The bias of [`MaskSpec::bias`], or `None` when the causal rule alone describes the pass
    /// (no padding, and no window that hides a key), so that a layer applies the rule itself
    /// (the fused kernel's causal flag). Once a window hides keys a bias is built even without
    /// padding, as HF's mask functions do, so eager and fused layers both see the window.
    pub fn bias_beyond_causal(&self, kind: Kind, device: Device) -> Result<Option<Tensor>> {
        let total = self.past_len + self.new_len;
        if self.key_mask.is_none() && self.sliding_window.is_none_or(|w| total <= w) {
            return Ok(None);
        }
        self.bias(kind, device)
    }
}

impl MaskSpec<'_> {
    /// [`MaskSpec::bias`] plus ALiBi's linear biases ([`Alibi::bias`]): [B or 1, H, new, keys].
    /// Always a tensor, since ALiBi biases every key; the causal rule and padding are in it, so a
    /// layer given it applies nothing itself. HF adds ALiBi to the scores before its mask; the
    /// sum here equals it at visible keys (mask 0) and stays the kind's minimum at hidden ones.
    pub fn bias_with_alibi(&self, alibi: &Alibi, kind: Kind, device: Device) -> Result<Tensor> {
        let linear = alibi.bias(self.key_mask, self.batch, self.past_len + self.new_len, kind, device)?;
        Ok(match self.bias(kind, device)? {
            Some(mask) => linear.f_add(&mask)?,
            None => linear,
        })
    }
}

/// ALiBi, attention with linear biases (Bloom): each head adds `slope * key position` to its
/// scores, as HF's `build_alibi_tensor`. Softmax ignores what is common to a row, so the query's
/// own position never enters.
#[derive(Debug)]
pub struct Alibi {
    /// f32 [heads]: HF's geometric slopes.
    slopes: Tensor,
}

impl Alibi {
    /// The slopes of `num_heads` heads, computed as HF does (f32 powers of an f32 base): for the
    /// largest power of two `p <= num_heads`, `base^1..base^p` with `base = 2^(-2^(3 - log2 p))`;
    /// the remaining heads take the odd powers of the next power of two's base.
    pub fn new(num_heads: i64, device: Device) -> Result<Self> {
        if num_heads < 1 {
            return Err(Error::Config(format!("ALiBi needs at least one head, got {num_heads}")));
        }
        let closest = 1i64 << (63 - num_heads.leading_zeros());
        let base_of = |p: i64| -> Result<Tensor> {
            let exponent = -(2f64.powf(-((p as f64).log2() - 3.0)));
            Ok(Tensor::f_from_slice(&[2f64.powf(exponent) as f32])?
                .f_to_device(device)?
                .f_squeeze()?)
        };
        let powers = Tensor::f_arange_start(1, 1 + closest, (Kind::Int, device))?;
        let mut slopes = base_of(closest)?.f_pow(&powers)?;
        if closest != num_heads {
            let remaining = closest.min(num_heads - closest);
            let odd = Tensor::f_arange_start_step(1, 1 + 2 * remaining, 2, (Kind::Int, device))?;
            let extra = base_of(2 * closest)?.f_pow(&odd)?;
            slopes = Tensor::f_cat(&[slopes, extra], 0)?;
        }
        Ok(Self { slopes })
    }

    /// The slopes, f32 [heads].
    pub fn slopes(&self) -> &Tensor {
        &self.slopes
    }

    /// The biases [B or 1, heads, 1, total] in `kind` for keys described by `key_mask` (bool
    /// [batch, total], `None`: nothing padded): `slope * ((cumsum(mask) - 1) * mask)`, each key's
    /// index among its row's attended tokens and 0 at padding, as HF numbers them from the
    /// attention mask (so a left-padded row gets its unpadded numbers); computed in f32, then
    /// cast, as HF.
    pub fn bias(
        &self,
        key_mask: Option<&Tensor>,
        batch: i64,
        total: i64,
        kind: Kind,
        device: Device,
    ) -> Result<Tensor> {
        let (rows, positions) = match key_mask {
            Some(mask) => {
                let mask = mask.f_to_kind(Kind::Int64)?;
                (batch, mask.f_cumsum(-1, Kind::Int64)?.s_sub(1)?.f_mul(&mask)?)
            }
            None => (1, Tensor::f_arange(total, (Kind::Int64, device))?.f_unsqueeze(0)?),
        };
        let heads = self.slopes.size()[0];
        let slopes = self.slopes.f_to_device(device)?.f_view([1, heads, 1])?;
        Ok(slopes
            .f_mul(&positions.f_view([rows, 1, total])?)?
            .f_view([rows, heads, 1, total])?
            .f_to_kind(kind)?)
    }
}

/// Each layer's sliding window from HF's per-layer attention types (`layer_types`, as Qwen2 and
/// Qwen3 configs spell them): `Some(window)` for a `"sliding_attention"` layer, `None` for a
/// `"full_attention"` one. Without `layer_types`, HF's rule applies: layers from
/// `max_window_layers` on slide when a window is set. Other types (chunked, linear) are
/// refused, as is a sliding layer without a window (HF fails on both when building masks).
pub fn layer_windows(
    layer_types: Option<&[String]>,
    sliding_window: Option<i64>,
    max_window_layers: i64,
    num_layers: i64,
) -> Result<Vec<Option<i64>>> {
    let Some(types) = layer_types else {
        return Ok((0..num_layers)
            .map(|i| sliding_window.filter(|_| i >= max_window_layers))
            .collect());
    };
    if types.len() as i64 != num_layers {
        return Err(Error::Config(format!(
            "layer_types has {} entries, num_hidden_layers is {num_layers}",
            types.len()
        )));
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            "full_attention" => Ok(None),
            "sliding_attention" => sliding_window.map(Some).ok_or_else(|| {
                Error::Config("layer_types has a sliding_attention layer but no sliding_window is set".into())
            }),
            other => Err(Error::Config(format!(
                "unsupported layer type `{other}` (supported: full_attention, sliding_attention)"
            ))),
        })
        .collect()
}

/// Checks a configured sliding window: HF's window `w` lets a query see itself and the `w - 1`
/// keys before it, so it must be at least 1.
pub fn check_sliding_window(window: Option<i64>) -> Result<()> {
    match window {
        Some(w) if w < 1 => Err(Error::Config(format!("sliding_window must be >= 1 (or null), got {w}"))),
        _ => Ok(()),
    }
}

/// One step of turning raw scores `q @ k^T` into logits, applied in order in eager attention
/// (HF's order of operations differs by model, and the last bit depends on it); the fused kernel
/// gets their product as its scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScoreOp {
    /// Multiply by the factor (Llama's `* head_dim^-0.5`).
    Mul(f64),
    /// Divide by the divisor (GPT-2's `/ sqrt(head_dim)`, `/ (layer + 1)`).
    Div(f64),
    /// Soft-capping, `tanh(x / cap) * cap` (Gemma2): no fused kernel applies it, so a layer with
    /// it always runs eager.
    SoftCap(f64),
}

/// Where the softmax runs in eager attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SoftmaxPrecision {
    /// In f32, then cast to the values' kind (Llama, T5, GPT-2's upcast variant).
    F32,
    /// In the scores' kind, then cast to the values' kind (GPT-2).
    Scores,
}

/// How one attention layer turns queries, keys and values into its output.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionSpec {
    /// Eager (HF's separate operations) or fused.
    pub implementation: AttnImplementation,
    /// Scaling of the raw scores, in HF's order.
    pub score_ops: Vec<ScoreOp>,
    /// The eager softmax's precision.
    pub softmax: SoftmaxPrecision,
    /// Dropout on the attention probabilities while training.
    pub dropout: f64,
    /// The score of future keys in a causal bias built here (see [`MaskSpec::future`]).
    pub future: f64,
    /// Whether the layer is causal (self-attention of a decoder): without a bias, the causal rule
    /// is applied (by the fused kernel, or a bias built here).
    pub causal: bool,
}

impl AttentionSpec {
    /// The product of the score operations: the scale the fused kernel applies.
    pub fn scale(&self) -> f64 {
        self.score_ops.iter().fold(1.0, |s, op| match op {
            ScoreOp::Mul(f) => s * f,
            ScoreOp::Div(d) => s / d,
            ScoreOp::SoftCap(_) => s,
        })
    }

    /// Whether the fused kernel runs: asked for, and nothing it cannot apply.
    pub fn is_fused(&self) -> bool {
        self.implementation == AttnImplementation::Sdpa
            && !self.score_ops.iter().any(|op| matches!(op, ScoreOp::SoftCap(_)))
    }

    /// Attends from `query` [B, H, T, D] over `key`/`value` [B, KV, S, D] (KV divides H: each
    /// key/value head serves H / KV query heads), adding `bias` [B or 1, 1 or H, T, S] to the
    /// scores; returns [B, H, T, D].
    pub fn attend(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        bias: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let fused = self.is_fused();
        let (t, s) = (query.size()[2], key.size()[2]);
        let built = if self.causal {
            causal_bias_when_needed(bias, fused, t, s, query.kind(), query.device(), self.future)?
        } else {
            None
        };
        let bias = bias.or(built.as_ref());
        if fused {
            let causal_in_kernel = self.causal && bias.is_none() && t > 1;
            let grouped = key.size()[1] != query.size()[1];
            return Ok(Tensor::f_scaled_dot_product_attention(
                query,
                key,
                value,
                bias,
                if train { self.dropout } else { 0.0 },
                causal_in_kernel,
                self.scale(),
                grouped,
            )?);
        }
        let groups = query.size()[1] / key.size()[1];
        let (key, value) = (repeat_kv(key, groups)?, repeat_kv(value, groups)?);
        let mut scores = query.f_matmul(&key.f_transpose(-1, -2)?)?;
        for op in &self.score_ops {
            scores = match op {
                ScoreOp::Mul(f) => scores.s_mul(*f)?,
                ScoreOp::Div(d) => scores.s_div(*d)?,
                ScoreOp::SoftCap(cap) => scores.s_div(*cap)?.f_tanh()?.s_mul(*cap)?,
            };
        }
        if let Some(bias) = bias {
            scores = scores.f_add(bias)?;
        }
        let probs = match self.softmax {
            SoftmaxPrecision::F32 => scores.f_softmax(-1, Kind::Float)?.f_to_kind(value.kind())?,
            SoftmaxPrecision::Scores => {
                let kind = scores.kind();
                scores.f_softmax(-1, kind)?.f_to_kind(value.kind())?
            }
        };
        Ok(probs.train_dropout(self.dropout, train)?.f_matmul(&value)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// HF 4.57's `sliding_window_causal_mask_function(w)` and its padding mask, written out:
    /// key `k` is visible from query `q` (both cache indices) when `k <= q`, `k > q - w` and
    /// the key is not padding.
    fn hf_visible(q: i64, k: i64, window: Option<i64>, padded: bool) -> bool {
        k <= q && window.is_none_or(|w| k > q - w) && !padded
    }

    #[test]
    fn sliding_window_bias_hides_what_hf_hides() {
        let min = min_value(Kind::Float);
        let pad = [true, false, false, false, false, false, false, false, false];
        let mask = Tensor::from_slice(&pad.map(|p| !p)).view([1, 9]);
        for window in [None, Some(1), Some(2), Some(4), Some(9), Some(20)] {
            for (past_len, new_len) in [(0, 9), (5, 4), (8, 1)] {
                for key_mask in [None, Some(&mask)] {
                    let spec = MaskSpec {
                        key_mask,
                        batch: 1,
                        new_len,
                        past_len,
                        future: min,
                        sliding_window: window,
                    };
                    let Some(bias) = spec.bias(Kind::Float, Device::Cpu).unwrap() else {
                        assert!(key_mask.is_none() && new_len == 1 && window.is_none_or(|w| w >= 9));
                        continue;
                    };
                    for qi in 0..new_len {
                        for k in 0..past_len + new_len {
                            let q = past_len + qi;
                            let padded = key_mask.is_some() && pad[k as usize];
                            let got = bias.double_value(&[0, 0, qi, k]);
                            let want = if hf_visible(q, k, window, padded) { 0.0 } else { min };
                            assert_eq!(got, want, "window {window:?} past {past_len} q {q} k {k}");
                        }
                    }
                    let beyond = spec.bias_beyond_causal(Kind::Float, Device::Cpu).unwrap();
                    let hides_more = key_mask.is_some() || window.is_some_and(|w| past_len + new_len > w);
                    assert_eq!(beyond.is_some(), hides_more, "window {window:?} past {past_len}");
                }
            }
        }
    }

    #[test]
    fn alibi_slopes_and_positions_follow_hf() {
        let slopes = |n: i64| Vec::<f32>::try_from(Alibi::new(n, Device::Cpu).unwrap().slopes()).unwrap();
        let pow2 = |e: i32| 2f32.powi(e);
        // Eight heads: 2^-1 .. 2^-8.
        assert_eq!(slopes(8), (1..=8).map(|e| pow2(-e)).collect::<Vec<_>>());
        // Six heads: four of base 2^-2, then the odd powers 1 and 3 of the eight-head base 2^-1.
        assert_eq!(
            slopes(6),
            vec![pow2(-2), pow2(-4), pow2(-6), pow2(-8), pow2(-1), pow2(-3)]
        );
        assert_eq!(slopes(1), vec![pow2(-8)]);
        assert_eq!(slopes(3).len(), 3);
        assert!(Alibi::new(0, Device::Cpu).is_err());
        // Left padding: keys numbered from each row's first attended token, 0 at padding.
        let mask = Tensor::from_slice2(&[[false, false, true, true], [true, true, true, false]]);
        let alibi = Alibi::new(2, Device::Cpu).unwrap();
        let bias = alibi.bias(Some(&mask), 2, 4, Kind::Float, Device::Cpu).unwrap();
        assert_eq!(bias.size(), vec![2, 2, 1, 4]);
        let row = |b: i64, h: i64| Vec::<f32>::try_from(bias.get(b).get(h).get(0)).unwrap();
        assert_eq!(row(0, 0), vec![0.0, 0.0, 0.0, 0.0625]);
        assert_eq!(row(1, 1), vec![0.0, 0.00390625, 0.0078125, 0.0]);
        let plain = alibi.bias(None, 2, 3, Kind::Float, Device::Cpu).unwrap();
        assert_eq!(plain.size(), vec![1, 2, 1, 3]);
    }

    #[test]
    fn layer_windows_follow_hf_layer_types() {
        let s = |v: &[&str]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        assert_eq!(
            layer_windows(None, Some(4), 1, 3).unwrap(),
            vec![None, Some(4), Some(4)]
        );
        assert_eq!(layer_windows(None, None, 0, 2).unwrap(), vec![None, None]);
        let types = s(&["sliding_attention", "full_attention"]);
        assert_eq!(layer_windows(Some(&types), Some(3), 9, 2).unwrap(), vec![Some(3), None]);
        assert!(
            layer_windows(Some(&types), None, 0, 2).is_err(),
            "sliding layer without a window"
        );
        assert!(layer_windows(Some(&types), Some(3), 0, 3).is_err(), "wrong count");
        let chunked = s(&["chunked_attention", "full_attention"]);
        assert!(layer_windows(Some(&chunked), Some(3), 0, 2).is_err());
        assert!(check_sliding_window(Some(0)).is_err() && check_sliding_window(Some(-4)).is_err());
        assert!(check_sliding_window(Some(1)).is_ok() && check_sliding_window(None).is_ok());
    }
}

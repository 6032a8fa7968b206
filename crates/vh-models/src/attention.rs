//! How attention probabilities are computed, as HF's `attn_implementation`.

use tch::{Device, Kind, Tensor};
use vh_core::tensor::causal_attention_bias;
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
    causal_attention_bias(None, 1, query_len, key_len - query_len, kind, device, future)
}

/// Fused attention of `query` [B, H, T, D] over `key`/`value` [B, KV, S, D] (KV divides H: each
/// key/value head serves H / KV query heads), adding `bias` [B or 1, 1, T, S] to the scores
/// scaled by `scale`, or, without a bias and for T > 1 (then T == S), applying the causal rule
/// in the kernel; dropout `p` on the probabilities while training.
pub fn fused_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
    p: f64,
    train: bool,
) -> Result<Tensor> {
    let grouped = key.size()[1] != query.size()[1];
    Ok(Tensor::f_scaled_dot_product_attention(
        query,
        key,
        value,
        bias,
        if train { p } else { 0.0 },
        bias.is_none() && query.size()[2] > 1,
        scale,
        grouped,
    )?)
}

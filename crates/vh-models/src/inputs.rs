//! Checking and preparing the inputs of a decoder-only forward pass, written once for every
//! causal architecture: token ids, the cache, the attention mask and the position ids.

use crate::attention::{drop_full_mask, MaskSpec};
use crate::cache::Cache;
use tch::{Device, Kind, Tensor};
use vh_core::error::invalid;
use vh_core::ops::ScalarOps;
use vh_core::tensor::{attention_mask_to_bool, check_input_ids, expect_integer, expect_shape, int_range, min_value};
use vh_core::{Error, Result};

/// Decoder inputs from labels (or, for Bart, from encoder ids) [B, T], as HF's
/// `shift_tokens_right` / T5's `_shift_right`: `decoder_start_token_id`, then the ids but the
/// last, with -100 replaced by `pad_token_id`. Either id unset is a config error (HF raises too).
pub fn shift_tokens_right(
    labels: &Tensor,
    pad_token_id: Option<i64>,
    decoder_start_token_id: Option<i64>,
) -> Result<Tensor> {
    let start = decoder_start_token_id.ok_or_else(|| {
        Error::Config("decoder_start_token_id must be set to derive decoder inputs from labels".into())
    })?;
    let pad = pad_token_id.ok_or_else(|| Error::Config("pad_token_id must be set to shift labels".into()))?;
    vh_core::tensor::expect_rank(labels, "labels", 2)?;
    let (b, t) = (labels.size()[0], labels.size()[1]);
    let first = Tensor::f_full([b, 1], start, (Kind::Int64, labels.device()))?;
    let rest = labels.f_to_kind(Kind::Int64)?.f_narrow(1, 0, t - 1)?;
    let shifted = Tensor::f_cat(&[&first, &rest], 1)?;
    shifted.s_masked_fill(&shifted.s_eq(vh_core::tensor::IGNORE_INDEX)?, pad)
}

/// What an architecture allows: its vocabulary, its layers and, for learned absolute position
/// embeddings, the number of positions.
#[derive(Debug, Clone, Copy)]
pub struct CausalLimits {
    /// Token ids must lie in `0..vocab_size`.
    pub vocab_size: i64,
    /// A cache must have one entry per layer.
    pub num_layers: usize,
    /// Cached plus new positions, and every position id, must stay below this (GPT-2's
    /// `n_positions`); `None` for rotary positions, which have no hard limit (HF enforces none).
    pub max_positions: Option<i64>,
}

/// The checked inputs of one pass.
#[derive(Debug)]
pub struct CausalInputs<'a> {
    /// Token ids, i64 [batch, new] on the model's device.
    pub input_ids: Tensor,
    /// Rows.
    pub batch: i64,
    /// New positions in this pass.
    pub new_len: i64,
    /// Positions already in the cache.
    pub past_len: i64,
    /// The cache to continue, when it holds anything.
    pub past: Option<&'a Cache>,
    /// Keys to attend, bool [batch, past + new] on the device; `None` when nothing is padded
    /// (HF drops a mask without padding too).
    pub key_mask: Option<Tensor>,
    /// Position ids, i64 [batch or 1, new] on the device.
    pub position_ids: Tensor,
    /// The largest position id (dynamic and LongRoPE rotary scaling read it; a static step's graph
    /// would bake it in, which is why such models do not decode over a static cache).
    pub max_position: i64,
    /// Whether the caller passed `position_ids` (false: the default `past..past + new`). Models
    /// whose HF forward derives default positions otherwise (OPT numbers them from the mask) read
    /// it to tell the two apart.
    pub explicit_positions: bool,
    /// A decode step over a static cache (`past` is one, see [`crate::Cache::to_static`]): which
    /// of its keys the new token sees. `None` for every other pass.
    pub static_keys: Option<StaticKeys>,
}

/// What a one-token step over a static cache of `capacity` positions sees, known on the device
/// only: the keys up to and including `slot` (where the step writes its own), less the padding.
#[derive(Debug)]
pub struct StaticKeys {
    /// The cache index of the new token, i64 [1] on the device.
    pub slot: Tensor,
    /// Keys that are not padding, bool [batch, capacity] on the device; `None` when nothing is
    /// padded.
    pub key_mask: Option<Tensor>,
    /// Positions in the static cache.
    pub capacity: i64,
}

impl CausalInputs<'_> {
    /// Cached plus new positions.
    pub fn total_len(&self) -> i64 {
        self.past_len + self.new_len
    }

    /// The additive attention bias of this pass, shared by every layer: `None` when nothing is
    /// hidden (no padding, and the layers apply the causal rule themselves); else [B or 1, 1,
    /// new, keys] with `future` on keys after each query and the kind's minimum on padding (see
    /// [`MaskSpec`]). A static step hides the keys after its slot the same way, built on the
    /// device from the slot, so its shape never changes.
    pub fn attention_bias(&self, kind: Kind, device: Device, future: f64) -> Result<Option<Tensor>> {
        if let Some(keys) = &self.static_keys {
            let index = Tensor::f_arange(keys.capacity, (Kind::Int64, device))?;
            let in_future = index.f_gt_tensor(&keys.slot)?.f_view([1, 1, 1, keys.capacity])?;
            let bias = match &keys.key_mask {
                Some(mask) => Tensor::f_zeros([self.batch, 1, 1, keys.capacity], (kind, device))?.s_masked_fill(
                    &mask.f_logical_not()?.f_view([self.batch, 1, 1, keys.capacity])?,
                    min_value(kind),
                )?,
                None => Tensor::f_zeros([1, 1, 1, keys.capacity], (kind, device))?,
            };
            return Ok(Some(bias.s_masked_fill(&in_future, future)?));
        }
        match &self.key_mask {
            Some(mask) => MaskSpec {
                key_mask: Some(mask),
                batch: self.batch,
                new_len: self.new_len,
                past_len: self.past_len,
                future,
                sliding_window: None,
            }
            .bias(kind, device),
            None => Ok(None),
        }
    }
}

/// Checks the inputs of a causal pass against `limits` and moves them to `device`.
///
/// `attention_mask` [batch, past + new] (1 = attend) covers cached and new tokens. Without
/// `position_ids`, positions are `past..past + new` for every row, whatever the mask, as HF's
/// forward numbers them (so a left-padded row's numbers differ from the unpadded row's for
/// learned absolute positions, exactly as in TRL); pass
/// [`vh_core::tensor::position_ids_from_mask`]'s positions to count from each row's first
/// attended token, as HF's `generate` does.
pub fn prepare_causal<'a>(
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    position_ids: Option<&Tensor>,
    past: Option<&'a Cache>,
    limits: CausalLimits,
    device: Device,
) -> Result<CausalInputs<'a>> {
    let (batch, new_len) = check_input_ids(input_ids, limits.vocab_size)?;
    let past = past.filter(|c| !c.is_empty());
    if let Some(past) = past {
        if past.layers.len() != limits.num_layers {
            return Err(invalid(format!(
                "the cache has {} layers, the model {}",
                past.layers.len(),
                limits.num_layers
            )));
        }
        if past.batch_size() != Some(batch) {
            return Err(invalid(format!(
                "the cache's batch size {:?} differs from input_ids' {batch}",
                past.batch_size()
            )));
        }
    }
    let past_len = past.map_or(0, Cache::seq_len);
    let total = past_len + new_len;
    if let Some(limit) = limits.max_positions {
        if total > limit {
            return Err(invalid(format!(
                "a sequence of {total} tokens ({past_len} cached + {new_len} new) exceeds the model's {limit} positions"
            )));
        }
    }
    // Embedding lookups take i64 indices; any validated integer kind is accepted.
    let input_ids = input_ids.f_to_device(device)?.f_to_kind(Kind::Int64)?;
    let key_mask = attention_mask
        .map(|m| {
            attention_mask_to_bool(m, "attention_mask", &[batch, total])?
                .f_to_device(device)
                .map_err(Error::from)
        })
        .transpose()?;
    let key_mask = drop_full_mask(key_mask)?;
    let position_ids_given = position_ids.is_some();
    let (position_ids, max_position) = match position_ids {
        Some(p) => {
            expect_shape(p, "position_ids", &[batch, new_len])?;
            expect_integer(p, "position_ids")?;
            let (lo, hi) = int_range(p)?;
            if lo < 0 {
                return Err(invalid(format!("position_ids must be >= 0, got {lo}")));
            }
            if let Some(limit) = limits.max_positions.filter(|l| hi >= *l) {
                return Err(invalid(format!("position_ids must be in 0..{limit}, got {hi}")));
            }
            (p.f_to_device(device)?.f_to_kind(Kind::Int64)?, hi)
        }
        None => (
            Tensor::f_arange_start(past_len, total, (Kind::Int64, device))?.f_unsqueeze(0)?,
            total - 1,
        ),
    };
    Ok(CausalInputs {
        input_ids,
        batch,
        new_len,
        past_len,
        past,
        key_mask,
        position_ids,
        max_position,
        explicit_positions: position_ids_given,
        static_keys: None,
    })
}

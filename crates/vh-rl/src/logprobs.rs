//! Per-token log-probabilities and entropies from logits, and TRL's index utilities
//! (`first_true_indices`, `truncate_response`, the index arithmetic of `get_reward`).

use crate::error::{expect_float, expect_integer, expect_shape, Result, RlError};
use tch::{Kind, Tensor};
use vh_core::ops::ScalarOps;

/// The log-probability of each chosen token, `log_softmax(logits)[..., index]`, as TRL's
/// `selective_log_softmax`: for f32/f64 logits the chosen logit minus each row's `logsumexp`
/// (computed one leading row at a time, to bound the peak memory), for half-precision logits a
/// row-wise `log_softmax` then gather (TRL's choice: the logsumexp form is unstable there).
///
/// `logits` is `[N, ..., vocab]` (at least 2-D) and `index` `[N, ...]`, integers in the
/// vocabulary; the result has `index`'s shape and `logits`' kind.
pub fn selective_log_softmax(logits: &Tensor, index: &Tensor) -> Result<Tensor> {
    let size = logits.size();
    if size.len() < 2 {
        return Err(RlError::InvalidArgument(format!(
            "`logits` must be [batch, ..., vocab], got shape {size:?}"
        )));
    }
    expect_float("logits", logits)?;
    expect_integer("index", index)?;
    expect_shape(
        "index",
        index,
        "logits without its last dimension",
        &size[..size.len() - 1],
    )?;
    let vocab = size[size.len() - 1];
    if index.numel() > 0 {
        let (lo, hi) = vh_core::tensor::int_range(index)?;
        if lo < 0 || hi >= vocab {
            return Err(RlError::InvalidArgument(format!(
                "token id {} in `index` is outside the vocabulary 0..{vocab}",
                if lo < 0 { lo } else { hi }
            )));
        }
    }
    let index = index.f_to_device(logits.device())?.f_to_kind(Kind::Int64)?;
    let rows = size[0];
    if matches!(logits.kind(), Kind::Float | Kind::Double) {
        let selected = logits.f_gather(-1, &index.f_unsqueeze(-1)?, false)?.f_squeeze_dim(-1)?;
        let mut lse = Vec::with_capacity(rows as usize);
        for r in 0..rows {
            lse.push(logits.f_get(r)?.f_logsumexp([-1i64].as_slice(), false)?);
        }
        let lse = if lse.is_empty() {
            selected.f_zeros_like()?
        } else {
            Tensor::f_stack(&lse, 0)?
        };
        Ok(selected.f_sub(&lse)?)
    } else {
        let mut out = Vec::with_capacity(rows as usize);
        for r in 0..rows {
            let row_logps = logits.f_get(r)?.f_log_softmax(-1, None::<Kind>)?;
            out.push(
                row_logps
                    .f_gather(-1, &index.f_get(r)?.f_unsqueeze(-1)?, false)?
                    .f_squeeze_dim(-1)?,
            );
        }
        if out.is_empty() {
            return Ok(Tensor::f_zeros(index.size(), (logits.kind(), logits.device()))?);
        }
        Ok(Tensor::f_stack(&out, 0)?)
    }
}

/// The Shannon entropy (nats) of the distribution each row of `logits` [..., vocab] defines, as
/// TRL's `entropy_from_logits`: the rows are flattened and processed `chunk_size` at a time
/// (TRL's default is 128) as `-(exp(logp) * logp).sum(-1)` with `logp = log_softmax(chunk)`.
pub fn entropy_from_logits(logits: &Tensor, chunk_size: i64) -> Result<Tensor> {
    let size = logits.size();
    if size.is_empty() {
        return Err(RlError::InvalidArgument(
            "`logits` must have a vocabulary dimension".into(),
        ));
    }
    expect_float("logits", logits)?;
    if chunk_size < 1 {
        return Err(RlError::InvalidArgument(format!(
            "chunk_size must be at least 1, got {chunk_size}"
        )));
    }
    let vocab = size[size.len() - 1];
    let leading = &size[..size.len() - 1];
    let flat = logits.f_reshape([-1, vocab])?;
    let mut parts = Vec::new();
    for chunk in flat.f_split(chunk_size, 0)? {
        let logps = chunk.f_log_softmax(-1, None::<Kind>)?;
        parts.push(
            logps
                .f_exp()?
                .f_mul(&logps)?
                .f_sum_dim_intlist(-1, false, None::<Kind>)?
                .f_neg()?,
        );
    }
    let entropies = if parts.is_empty() {
        Tensor::f_zeros([0], (logits.kind(), logits.device()))?
    } else {
        Tensor::f_cat(&parts, 0)?
    };
    Ok(entropies.f_reshape(leading)?)
}

/// The index of the first `true` of each row (last dimension) of a bool tensor, or the row's
/// length when it has none, as TRL's `first_true_indices` (i64).
pub fn first_true_indices(bools: &Tensor) -> Result<Tensor> {
    if bools.kind() != Kind::Bool || bools.dim() == 0 {
        return Err(RlError::InvalidArgument(format!(
            "`bools` must be a bool tensor with at least one dimension, got {:?} of shape {:?}",
            bools.kind(),
            bools.size()
        )));
    }
    let row_len = bools.size()[bools.dim() - 1];
    let not = bools.f_logical_not()?.f_to_kind(Kind::Int64)?;
    let zero_or_index = not
        .s_mul(row_len)?
        .f_add(&Tensor::f_arange(row_len, (Kind::Int64, bools.device()))?)?;
    Ok(zero_or_index.f_min_dim(-1, false)?.0)
}

/// Responses `[B, R]` with everything after the first `stop_token_id` replaced by
/// `pad_token_id`, as TRL's `truncate_response` (the stop token itself is kept).
pub fn truncate_response(stop_token_id: i64, pad_token_id: i64, responses: &Tensor) -> Result<Tensor> {
    expect_integer("responses", responses)?;
    vh_core::tensor::expect_rank(responses, "responses", 2)?;
    let trunc = first_true_indices(&responses.s_eq(stop_token_id)?)?.f_unsqueeze(-1)?;
    let idxs = Tensor::f_arange(responses.size()[1], (Kind::Int64, responses.device()))?.f_view([1, -1])?;
    Ok(responses.s_masked_fill(&idxs.f_gt_tensor(&trunc)?, pad_token_id)?)
}

/// What TRL's `forward` and `get_reward` feed a model for `query_responses` `[B, T]` padded with
/// `pad_token_id`: the attention mask (`!= pad`, bool), position ids (the exclusive cumulative
/// sum of the mask) and the ids with padding replaced by 0.
#[derive(Debug)]
pub struct PaddedInputs {
    /// Token ids, padding set to 0.
    pub input_ids: Tensor,
    /// True where the token is not padding.
    pub attention_mask: Tensor,
    /// `mask.cumsum(1) - mask`: each token's index among its row's non-pad tokens.
    pub position_ids: Tensor,
}

/// The inputs of TRL's `forward(model, query_responses, pad_token_id)` (also `get_reward`'s).
pub fn padded_inputs(query_responses: &Tensor, pad_token_id: i64) -> Result<PaddedInputs> {
    expect_integer("query_responses", query_responses)?;
    vh_core::tensor::expect_rank(query_responses, "query_responses", 2)?;
    let attention_mask = query_responses.s_ne(pad_token_id)?;
    let position_ids = attention_mask
        .f_cumsum(1, Kind::Int64)?
        .f_sub(&attention_mask.f_to_kind(Kind::Int64)?)?;
    let input_ids = query_responses.s_masked_fill(&attention_mask.f_logical_not()?, 0)?;
    Ok(PaddedInputs {
        input_ids,
        attention_mask,
        position_ids,
    })
}

/// The index of each row's last non-pad response token, as TRL's `get_reward` computes it:
/// `first_true_indices(query_responses[:, context_length:] == pad) - 1 + context_length` (so a
/// response that starts with padding points at the last query token, `context_length - 1`).
pub fn reward_sequence_lengths(query_responses: &Tensor, pad_token_id: i64, context_length: i64) -> Result<Tensor> {
    expect_integer("query_responses", query_responses)?;
    vh_core::tensor::expect_rank(query_responses, "query_responses", 2)?;
    let total = query_responses.size()[1];
    if !(1..=total).contains(&context_length) {
        return Err(RlError::InvalidArgument(format!(
            "context_length must be in 1..={total}, got {context_length}"
        )));
    }
    let responses = query_responses.f_narrow(1, context_length, total - context_length)?;
    Ok(first_true_indices(&responses.s_eq(pad_token_id)?)?.s_add(context_length - 1)?)
}

/// Each row's reward at its `sequence_lengths` index: `reward_logits[arange(B), sequence_lengths]`
/// squeezed, as `get_reward`'s final rewards (`reward_logits` `[B, T, 1]` gives `[B]`).
pub fn gather_final_rewards(reward_logits: &Tensor, sequence_lengths: &Tensor) -> Result<Tensor> {
    if reward_logits.dim() < 2 {
        return Err(RlError::InvalidArgument(format!(
            "`reward_logits` must be [batch, seq, ...], got shape {:?}",
            reward_logits.size()
        )));
    }
    let (batch, seq) = (reward_logits.size()[0], reward_logits.size()[1]);
    expect_integer("sequence_lengths", sequence_lengths)?;
    expect_shape("sequence_lengths", sequence_lengths, "[batch]", &[batch])?;
    if batch > 0 {
        let (lo, hi) = vh_core::tensor::int_range(sequence_lengths)?;
        if lo < 0 || hi >= seq {
            return Err(RlError::InvalidArgument(format!(
                "sequence length {} is outside 0..{seq}",
                if lo < 0 { lo } else { hi }
            )));
        }
    }
    let rows = Tensor::f_arange(batch, (Kind::Int64, reward_logits.device()))?;
    let seq_idx = sequence_lengths
        .f_to_device(reward_logits.device())?
        .f_to_kind(Kind::Int64)?;
    let picked = reward_logits.f_index(&[Some(rows), Some(seq_idx)])?;
    if picked.dim() >= 2 && picked.size()[picked.dim() - 1] == 1 {
        return Ok(picked.f_squeeze_dim(-1)?);
    }
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_of_chosen_tokens_both_branches() {
        let logits = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 3.0, 0.5, 0.5]).reshape([1, 2, 3]);
        let index = Tensor::from_slice2(&[[2i64, 0]]);
        let lp = selective_log_softmax(&logits, &index).unwrap();
        let naive = logits
            .log_softmax(-1, Kind::Float)
            .gather(-1, &index.unsqueeze(-1), false)
            .squeeze_dim(-1);
        assert!(lp.allclose(&naive, 1e-6, 1e-6, false));
        let bf = selective_log_softmax(&logits.to_kind(Kind::BFloat16), &index).unwrap();
        assert_eq!(bf.kind(), Kind::BFloat16);
        assert!((bf.to_kind(Kind::Float) - naive).abs().max().double_value(&[]) < 2e-2);
        assert!(selective_log_softmax(&logits, &Tensor::from_slice2(&[[3i64, 0]])).is_err());
        assert!(selective_log_softmax(&logits, &Tensor::from_slice2(&[[1i64]])).is_err());
        assert!(selective_log_softmax(&logits, &index.to_kind(Kind::Float)).is_err());
    }

    #[test]
    fn entropy_of_uniform_is_log_vocab() {
        let logits = Tensor::zeros([3, 5, 8], (Kind::Float, tch::Device::Cpu));
        let e = entropy_from_logits(&logits, 4).unwrap();
        assert_eq!(e.size(), vec![3, 5]);
        assert!((e - 8f64.ln()).abs().max().double_value(&[]) < 1e-6);
        assert!(entropy_from_logits(&logits, 0).is_err());
    }

    #[test]
    fn index_utilities_follow_trl() {
        let b = Tensor::from_slice2(&[[false, true, true], [false, false, false]]);
        assert_eq!(
            Vec::<i64>::try_from(first_true_indices(&b).unwrap()).unwrap(),
            vec![1, 3]
        );
        assert!(first_true_indices(&Tensor::from_slice(&[1i64])).is_err());
        let r = Tensor::from_slice2(&[[5i64, 9, 7, 9], [5, 5, 5, 5]]);
        let t = truncate_response(9, 0, &r).unwrap();
        assert_eq!(
            Vec::<Vec<i64>>::try_from(t).unwrap(),
            vec![vec![5, 9, 0, 0], vec![5, 5, 5, 5]]
        );
        let qr = Tensor::from_slice2(&[[0i64, 4, 5, 6, 0], [3, 4, 0, 0, 0]]);
        let p = padded_inputs(&qr, 0).unwrap();
        assert_eq!(
            Vec::<Vec<i64>>::try_from(p.position_ids).unwrap(),
            vec![vec![0, 0, 1, 2, 3], vec![0, 1, 2, 2, 2]]
        );
        let lens = reward_sequence_lengths(&qr, 0, 2).unwrap();
        assert_eq!(Vec::<i64>::try_from(&lens).unwrap(), vec![3, 1]);
        let logits = Tensor::arange(10, (Kind::Float, tch::Device::Cpu)).reshape([2, 5, 1]);
        let r = gather_final_rewards(&logits, &lens).unwrap();
        assert_eq!(Vec::<f32>::try_from(r).unwrap(), vec![3.0, 6.0]);
        assert!(reward_sequence_lengths(&qr, 0, 6).is_err());
        assert!(gather_final_rewards(&logits, &Tensor::from_slice(&[5i64, 0])).is_err());
    }
}

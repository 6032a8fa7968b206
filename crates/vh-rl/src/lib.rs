//! PPO's math as TRL 0.26.2 computes it, on tch tensors, under TRL's names.
//!
//! - From logits: [`selective_log_softmax`], [`entropy_from_logits`] (TRL's utilities), the
//!   tempered response log-probabilities and the entropy TRL's update loop logs.
//! - Masked statistics: [`masked_mean`], [`masked_var`], [`masked_whiten`] (TRL's
//!   `trl.experimental.ppo` functions, with errors where TRL's results are undefined).
//! - Index utilities: [`first_true_indices`], [`truncate_response`], and the index arithmetic of
//!   `get_reward` ([`reward_sequence_lengths`], [`gather_final_rewards`], [`padded_inputs`]).
//! - A rollout's targets ([`compute_rollout_targets`]): padding masks, the per-token KL penalty
//!   ([`KlEstimator::K1`] / [`KlEstimator::K3`]), the score at the last response token, GAE,
//!   whitening; then the clipped losses of an update ([`ppo_loss`]) and the statistics TRL logs
//!   ([`PpoStats`]).
//!
//! Parity with TRL's own functions and with the formulas inline in its `PPOTrainer.train` is
//! tested against a Python reference (`tests/parity_ppo.rs`).

pub mod error;
pub mod logprobs;
pub mod masked;
pub mod ppo;
pub mod stats;

pub use error::{Result, RlError};
pub use logprobs::{
    entropy_from_logits, first_true_indices, gather_final_rewards, padded_inputs, reward_sequence_lengths,
    selective_log_softmax, truncate_response, PaddedInputs,
};
pub use masked::{masked_mean, masked_var, masked_whiten};
pub use ppo::{
    apply_missing_eos_penalty, compute_rollout_targets, gae, kl_per_token, padding_masks, ppo_entropy, ppo_loss,
    response_logits, tempered_logprobs, KlEstimator, PpoBatch, PpoConfig, PpoLoss, Rollout, RolloutTargets,
    INVALID_LOGPROB,
};
pub use stats::{num_eos_tokens, PpoStats, UpdateStats};

use tch::Tensor;

/// `v` as a 0-dim CPU tensor of `like`'s kind: a Python number meeting a 0-dim tensor keeps the
/// tensor's kind, which a 0-dim f64 tensor would not (it would promote an f32 one to f64).
pub(crate) fn number_like(v: f64, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(&[v])?
        .f_to_kind(like.kind())?
        .f_reshape([] as [i64; 0])?)
}

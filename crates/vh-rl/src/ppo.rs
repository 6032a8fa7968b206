//! PPO's per-token math as TRL 0.26.2's `trl.experimental.ppo.PPOTrainer.train` computes it:
//! padding masks from sequence lengths, the KL penalty per token (`k1` or `k3`), the score added
//! at the last response token, GAE with returns, whitening, and the clipped policy and value
//! losses with the statistics TRL logs.
//!
//! Every formula follows the trainer's inline code operation for operation (the order of
//! additions, where Python numbers meet tensors, `torch.max` of the two losses), so the numbers
//! and their gradients match TRL's.

use crate::error::{expect_float, expect_integer, expect_shape, same_shape, Result, RlError};
use crate::logprobs::selective_log_softmax;
use crate::masked::{masked_mean, masked_whiten};
use crate::number_like;
use tch::{Kind, Tensor};
use vh_core::ops::ScalarOps;

/// The log-probability TRL writes at padded response positions (`INVALID_LOGPROB`).
pub const INVALID_LOGPROB: f64 = 1.0;

/// Which estimator of the per-token KL divergence penalises the reward (TRL's `kl_estimator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KlEstimator {
    /// `log pi - log pi_ref`: unbiased (TRL's default).
    #[default]
    K1,
    /// `(r - 1) - log r` with `r = pi_ref / pi`: unbiased, lower variance, never negative.
    K3,
}

impl std::str::FromStr for KlEstimator {
    type Err = RlError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "k1" => Ok(Self::K1),
            "k3" => Ok(Self::K3),
            other => Err(RlError::InvalidArgument(format!(
                "kl_estimator must be \"k1\" or \"k3\", got {other:?}"
            ))),
        }
    }
}

/// The PPO hyper-parameters this math uses, with `PPOConfig`'s defaults (TRL 0.26.2).
#[derive(Debug, Clone, PartialEq)]
pub struct PpoConfig {
    /// Weight of the KL penalty in the per-token reward (0.05).
    pub kl_coef: f64,
    /// The KL estimator (`k1`).
    pub kl_estimator: KlEstimator,
    /// Policy ratio clip range (0.2).
    pub cliprange: f64,
    /// Weight of the value loss in the total loss (0.1).
    pub vf_coef: f64,
    /// Value clip range around the rollout's values (0.2).
    pub cliprange_value: f64,
    /// Discount factor (1.0).
    pub gamma: f64,
    /// GAE lambda (0.95).
    pub lam: f64,
    /// Whiten the per-token rewards before GAE (false).
    pub whiten_rewards: bool,
    /// Sampling temperature; logits are divided by `temperature + 1e-7` (0.7).
    pub temperature: f64,
    /// Subtracted from the score of responses without an eos token (none).
    pub missing_eos_penalty: Option<f64>,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            cliprange: 0.2,
            vf_coef: 0.1,
            cliprange_value: 0.2,
            gamma: 1.0,
            lam: 0.95,
            whiten_rewards: false,
            temperature: 0.7,
            missing_eos_penalty: None,
        }
    }
}

impl PpoConfig {
    /// Checks that every number is finite, clip ranges and the temperature not negative.
    pub fn validate(&self) -> Result<()> {
        let finite = [
            ("kl_coef", self.kl_coef),
            ("cliprange", self.cliprange),
            ("vf_coef", self.vf_coef),
            ("cliprange_value", self.cliprange_value),
            ("gamma", self.gamma),
            ("lam", self.lam),
            ("temperature", self.temperature),
            ("missing_eos_penalty", self.missing_eos_penalty.unwrap_or(0.0)),
        ];
        if let Some((name, v)) = finite.iter().find(|(_, v)| !v.is_finite()) {
            return Err(RlError::InvalidArgument(format!("{name} must be finite, got {v}")));
        }
        for (name, v) in [
            ("cliprange", self.cliprange),
            ("cliprange_value", self.cliprange_value),
            ("temperature", self.temperature),
        ] {
            if v < 0.0 {
                return Err(RlError::InvalidArgument(format!("{name} must be >= 0, got {v}")));
            }
        }
        Ok(())
    }
}

/// `logits[:, context_length - 1 : -1]`: the logits `[B, T, V]` of a forward over query +
/// response that predict the response tokens.
pub fn response_logits(logits: &Tensor, context_length: i64) -> Result<Tensor> {
    if logits.dim() != 3 {
        return Err(RlError::InvalidArgument(format!(
            "`logits` must be [batch, seq, vocab], got {:?}",
            logits.size()
        )));
    }
    let seq = logits.size()[1];
    if !(1..seq).contains(&context_length) {
        return Err(RlError::InvalidArgument(format!(
            "context_length must be in 1..{seq}, got {context_length}"
        )));
    }
    Ok(logits.f_narrow(1, context_length - 1, seq - context_length)?)
}

/// The response tokens' log-probabilities at the sampling temperature: `logits / (temperature +
/// 1e-7)` then [`selective_log_softmax`], as TRL scores both the rollout and each update.
/// Returns the tempered logits too (TRL's entropy statistic reads them).
pub fn tempered_logprobs(logits: &Tensor, responses: &Tensor, temperature: f64) -> Result<(Tensor, Tensor)> {
    expect_float("logits", logits)?;
    let tempered = logits.s_div(temperature + 1e-7)?;
    let logprobs = selective_log_softmax(&tempered, responses)?;
    Ok((tempered, logprobs))
}

/// `scores` minus `penalty` for rows of `responses` `[B, R]` (postprocessed) without
/// `eos_token_id`, and which rows contain it, as TRL's "Response Processing 3".
pub fn apply_missing_eos_penalty(
    scores: &Tensor,
    responses: &Tensor,
    eos_token_id: i64,
    penalty: Option<f64>,
) -> Result<(Tensor, Tensor)> {
    expect_integer("responses", responses)?;
    vh_core::tensor::expect_rank(responses, "responses", 2)?;
    expect_shape("scores", scores, "[batch]", &[responses.size()[0]])?;
    let contain_eos = responses.s_eq(eos_token_id)?.f_any_dim(-1, false)?;
    let scores = match penalty {
        Some(p) => {
            let penalised = scores.s_sub(p)?;
            penalised.f_where_self(&contain_eos.f_logical_not()?, scores)?
        }
        None => scores.shallow_clone(),
    };
    Ok((scores, contain_eos))
}

/// The response padding masks of TRL's trainer for `sequence_lengths` `[B]` (each row's last
/// response index, -1 for an empty response) over `response_length` positions: `padding_mask`
/// (positions after the last token) and `padding_mask_p1` (positions more than one after it:
/// the values keep one position more, the state after the last token).
pub fn padding_masks(sequence_lengths: &Tensor, response_length: i64) -> Result<(Tensor, Tensor)> {
    expect_integer("sequence_lengths", sequence_lengths)?;
    vh_core::tensor::expect_rank(sequence_lengths, "sequence_lengths", 1)?;
    let batch = sequence_lengths.size()[0];
    if batch > 0 {
        let (lo, hi) = vh_core::tensor::int_range(sequence_lengths)?;
        if lo < -1 || hi >= response_length {
            return Err(RlError::InvalidArgument(format!(
                "sequence lengths must lie in -1..{response_length}, got {}",
                if lo < -1 { lo } else { hi }
            )));
        }
    }
    let lengths = sequence_lengths.f_to_kind(Kind::Int64)?;
    let idxs = Tensor::f_arange(response_length, (Kind::Int64, lengths.device()))?.f_repeat([batch, 1])?;
    let padding_mask = idxs.f_gt_tensor(&lengths.f_unsqueeze(1)?)?;
    let padding_mask_p1 = idxs.f_gt_tensor(&lengths.s_add(1)?.f_unsqueeze(1)?)?;
    Ok((padding_mask, padding_mask_p1))
}

/// The per-token KL estimate from the (masked) policy and reference log-probabilities:
/// `k1 = -(ref - logprobs)`, `k3 = (exp(ref - logprobs) - 1) - (ref - logprobs)`.
pub fn kl_per_token(logprobs: &Tensor, ref_logprobs: &Tensor, estimator: KlEstimator) -> Result<Tensor> {
    same_shape(("ref_logprobs", ref_logprobs), ("logprobs", logprobs))?;
    let logr = ref_logprobs.f_sub(logprobs)?;
    Ok(match estimator {
        KlEstimator::K1 => logr.f_neg()?,
        KlEstimator::K3 => logr.f_exp()?.s_sub(1.0)?.f_sub(&logr)?,
    })
}

/// GAE over the response positions, as TRL's loop from the last position back: `delta_t =
/// r_t + gamma * V_{t+1} - V_t` (with `V_R = 0`), `A_t = delta_t + gamma * lam * A_{t+1}`.
/// Returns the raw advantages and the returns `A + V`.
pub fn gae(rewards: &Tensor, values: &Tensor, gamma: f64, lam: f64) -> Result<(Tensor, Tensor)> {
    same_shape(("values", values), ("rewards", rewards))?;
    vh_core::tensor::expect_rank(rewards, "rewards", 2)?;
    let gen_length = rewards.size()[1];
    let mut lastgaelam: Option<Tensor> = None;
    let mut reversed = Vec::with_capacity(gen_length as usize);
    for t in (0..gen_length).rev() {
        let (r_t, v_t) = (rewards.f_select(1, t)?, values.f_select(1, t)?);
        // Python: `rewards[:, t] + args.gamma * nextvalues - values[:, t]`, where nextvalues is
        // the float 0.0 at the last position.
        let delta = if t < gen_length - 1 {
            r_t.f_add(&values.f_select(1, t + 1)?.s_mul(gamma)?)?
        } else {
            r_t.s_add(gamma * 0.0)?
        }
        .f_sub(&v_t)?;
        // Python: `delta + args.gamma * args.lam * lastgaelam`, lastgaelam the int 0 at first.
        let next = match &lastgaelam {
            Some(last) => delta.f_add(&last.s_mul(gamma * lam)?)?,
            None => delta.s_add(gamma * lam * 0.0)?,
        };
        reversed.push(next.shallow_clone());
        lastgaelam = Some(next);
    }
    reversed.reverse();
    let advantages = if reversed.is_empty() {
        rewards.f_zeros_like()?
    } else {
        Tensor::f_stack(&reversed, 1)?
    };
    let returns = advantages.f_add(values)?;
    Ok((advantages, returns))
}

/// A rollout's per-token tensors, as TRL has them after generation and scoring.
#[derive(Debug)]
pub struct Rollout<'a> {
    /// The policy's log-probabilities of the response tokens `[B, R]` (unmasked).
    pub logprobs: &'a Tensor,
    /// The reference policy's `[B, R]` (unmasked).
    pub ref_logprobs: &'a Tensor,
    /// The value of the state before each response token `[B, R]` (unmasked).
    pub values: &'a Tensor,
    /// The reward model's score per row `[B]` (after any missing-eos penalty).
    pub scores: &'a Tensor,
    /// Each row's last response index `[B]` (-1 for an empty response).
    pub sequence_lengths: &'a Tensor,
}

/// What TRL computes from a rollout before its PPO epochs (steps 3 to 6 of its loop).
#[derive(Debug)]
pub struct RolloutTargets {
    /// Positions after each row's last response token.
    pub padding_mask: Tensor,
    /// Positions more than one after it.
    pub padding_mask_p1: Tensor,
    /// Log-probabilities with [`INVALID_LOGPROB`] at padding.
    pub logprobs: Tensor,
    /// Reference log-probabilities with [`INVALID_LOGPROB`] at padding.
    pub ref_logprobs: Tensor,
    /// Values with 0 beyond `padding_mask_p1`.
    pub values: Tensor,
    /// The per-token KL estimate.
    pub kl: Tensor,
    /// `-kl_coef * kl`.
    pub non_score_reward: Tensor,
    /// The per-token rewards: the KL penalty plus the score at the last token (whitened if asked).
    pub rewards: Tensor,
    /// Whitened GAE advantages, 0 at padding.
    pub advantages: Tensor,
    /// GAE returns (`advantages + values` before whitening).
    pub returns: Tensor,
}

/// The rollout's masks, KL penalty, rewards, advantages and returns, as TRL's trainer computes
/// them: masks from the sequence lengths, masked log-probabilities and values, the per-token KL
/// reward, the score added at index `sequence_length + 1` (or `sequence_length` when that is
/// the last position), optional reward whitening, GAE, whitened advantages.
pub fn compute_rollout_targets(r: &Rollout<'_>, cfg: &PpoConfig) -> Result<RolloutTargets> {
    cfg.validate()?;
    vh_core::tensor::expect_rank(r.logprobs, "logprobs", 2)?;
    for (name, t) in [
        ("logprobs", r.logprobs),
        ("ref_logprobs", r.ref_logprobs),
        ("values", r.values),
        ("scores", r.scores),
    ] {
        expect_float(name, t)?;
    }
    same_shape(("ref_logprobs", r.ref_logprobs), ("logprobs", r.logprobs))?;
    same_shape(("values", r.values), ("logprobs", r.logprobs))?;
    let (batch, response_length) = (r.logprobs.size()[0], r.logprobs.size()[1]);
    expect_shape("scores", r.scores, "[batch]", &[batch])?;
    expect_shape("sequence_lengths", r.sequence_lengths, "[batch]", &[batch])?;
    let (padding_mask, padding_mask_p1) = padding_masks(r.sequence_lengths, response_length)?;
    let logprobs = r.logprobs.s_masked_fill(&padding_mask, INVALID_LOGPROB)?;
    let ref_logprobs = r.ref_logprobs.s_masked_fill(&padding_mask, INVALID_LOGPROB)?;
    let values = r.values.s_masked_fill(&padding_mask_p1, 0.0)?;

    let kl = kl_per_token(&logprobs, &ref_logprobs, cfg.kl_estimator)?;
    let non_score_reward = kl.s_mul(-cfg.kl_coef)?;
    let mut rewards = non_score_reward.f_zeros_like()?;
    rewards.f_copy_(&non_score_reward)?;
    let lengths = r.sequence_lengths.f_to_kind(Kind::Int64)?;
    let lengths_p1 = lengths.s_add(1)?;
    let actual_end = lengths_p1.f_where_self(&lengths_p1.s_lt(response_length)?, &lengths)?;
    let rows = Tensor::f_arange(batch, (Kind::Int64, rewards.device()))?;
    let index = [Some(rows), Some(actual_end)];
    let with_score = rewards.f_index(&index)?.f_add(r.scores)?;
    let _ = rewards.f_index_put_(&index, &with_score, false)?;

    if cfg.whiten_rewards {
        let kept = padding_mask_p1.f_logical_not()?;
        rewards = masked_whiten(&rewards, &kept, false)?.s_masked_fill(&padding_mask_p1, 0.0)?;
    }
    let (advantages, returns) = gae(&rewards, &values, cfg.gamma, cfg.lam)?;
    let advantages =
        masked_whiten(&advantages, &padding_mask.f_logical_not()?, true)?.s_masked_fill(&padding_mask, 0.0)?;
    Ok(RolloutTargets {
        padding_mask,
        padding_mask_p1,
        logprobs,
        ref_logprobs,
        values,
        kl,
        non_score_reward,
        rewards,
        advantages,
        returns,
    })
}

/// One micro-batch of a PPO update: the current policy's outputs and the rollout's targets for
/// the same rows, all `[B, R]`.
#[derive(Debug)]
pub struct PpoBatch<'a> {
    /// The current policy's log-probabilities of the response tokens (unmasked).
    pub new_logprobs: &'a Tensor,
    /// The current value predictions (unmasked).
    pub vpred: &'a Tensor,
    /// The rollout's masked log-probabilities ([`RolloutTargets::logprobs`]).
    pub old_logprobs: &'a Tensor,
    /// The rollout's masked values ([`RolloutTargets::values`]).
    pub old_values: &'a Tensor,
    /// The rollout's returns.
    pub returns: &'a Tensor,
    /// The rollout's whitened advantages.
    pub advantages: &'a Tensor,
    /// [`RolloutTargets::padding_mask`] rows.
    pub padding_mask: &'a Tensor,
    /// [`RolloutTargets::padding_mask_p1`] rows.
    pub padding_mask_p1: &'a Tensor,
}

/// The losses and statistics of one PPO micro-batch. `loss`, `pg_loss` and `vf_loss` carry the
/// graph; the statistics are detached.
#[derive(Debug)]
pub struct PpoLoss {
    /// `pg_loss + vf_coef * vf_loss`.
    pub loss: Tensor,
    /// The clipped policy loss (masked mean over response tokens; 0 when there are none).
    pub pg_loss: Tensor,
    /// `0.5 *` the clipped value loss (masked mean over `~padding_mask_p1`).
    pub vf_loss: Tensor,
    /// Share of value positions where the clipped loss was the larger.
    pub vf_clipfrac: Tensor,
    /// Share of response tokens where the clipped policy loss was the larger; `None` when the
    /// micro-batch has no response token.
    pub pg_clipfrac: Option<Tensor>,
    /// `0.5 * mean(logprobs_diff^2)` over every position (padding counts as 0, as in TRL).
    pub approxkl: Tensor,
    /// The mean probability ratio over every position (padding counts as 1, as in TRL).
    pub ratio_mean: Tensor,
}

/// `t` clamped to [lo, hi] as `torch.clamp(t, lo, hi)` with Python numbers: the bounds in `t`'s
/// kind, and clamp's gradient (full inside the bounds, 0 outside).
fn clamp_numbers(t: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    let bound = |v: f64| -> Result<Tensor> { Ok(number_like(v, t)?.f_to_device(t.device())?) };
    Ok(t.f_clamp_tensor(Some(&bound(lo)?), Some(&bound(hi)?))?)
}

/// The clipped PPO losses of TRL's update step and its statistics (`pg_clipfrac`, `approxkl`,
/// the ratio's mean). Positions in `padding_mask` get [`INVALID_LOGPROB`] before the ratio (so
/// their ratio is 1 against the rollout's), predictions beyond `padding_mask_p1` get 0.
///
/// A micro-batch whose responses are all empty (each ended at its first token) has no policy
/// term: `pg_loss` is 0 and `pg_clipfrac` `None`, and `loss` is the value term alone. TRL's masked
/// mean is NaN there and it would step every parameter with NaN gradients; a training run with
/// small micro-batches meets this whenever a policy learns to stop at once. A `padding_mask_p1`
/// that keeps nothing is an error (TRL's masks always keep each row's first value position).
pub fn ppo_loss(b: &PpoBatch<'_>, cfg: &PpoConfig) -> Result<PpoLoss> {
    cfg.validate()?;
    vh_core::tensor::expect_rank(b.new_logprobs, "new_logprobs", 2)?;
    for (name, t) in [
        ("vpred", b.vpred),
        ("old_logprobs", b.old_logprobs),
        ("old_values", b.old_values),
        ("returns", b.returns),
        ("advantages", b.advantages),
        ("padding_mask", b.padding_mask),
        ("padding_mask_p1", b.padding_mask_p1),
    ] {
        same_shape((name, t), ("new_logprobs", b.new_logprobs))?;
    }
    for (name, m) in [("padding_mask", b.padding_mask), ("padding_mask_p1", b.padding_mask_p1)] {
        if m.kind() != Kind::Bool {
            return Err(RlError::InvalidArgument(format!(
                "`{name}` must be a bool tensor, got {:?}",
                m.kind()
            )));
        }
    }
    let kept = b.padding_mask.f_logical_not()?;
    let kept_p1 = b.padding_mask_p1.f_logical_not()?;

    let new_logprobs = b.new_logprobs.s_masked_fill(b.padding_mask, INVALID_LOGPROB)?;
    let vpred = b.vpred.s_masked_fill(b.padding_mask_p1, 0.0)?;
    let vpredclipped = vpred.f_clamp_tensor(
        Some(&b.old_values.s_sub(cfg.cliprange_value)?),
        Some(&b.old_values.s_add(cfg.cliprange_value)?),
    )?;
    let vf_losses1 = vpred.f_sub(b.returns)?.f_square()?;
    let vf_losses2 = vpredclipped.f_sub(b.returns)?.f_square()?;
    let vf_loss_max = vf_losses1.f_maximum(&vf_losses2)?;
    let vf_mean = masked_mean(&vf_loss_max, &kept_p1, None)?;
    let vf_loss = vf_mean.f_mul(&number_like(0.5, &vf_mean)?)?;
    let vf_clipfrac = masked_mean(
        &vf_losses2.f_gt_tensor(&vf_losses1)?.f_to_kind(Kind::Float)?,
        &kept_p1,
        None,
    )?;

    let logprobs_diff = new_logprobs.f_sub(b.old_logprobs)?;
    let ratio = logprobs_diff.f_exp()?;
    let neg_adv = b.advantages.f_neg()?;
    let pg_losses = neg_adv.f_mul(&ratio)?;
    let pg_losses2 = neg_adv.f_mul(&clamp_numbers(&ratio, 1.0 - cfg.cliprange, 1.0 + cfg.cliprange)?)?;
    let pg_loss_max = pg_losses.f_maximum(&pg_losses2)?;
    let has_policy_tokens = kept.f_any()?.f_int64_value(&[])? != 0;
    let pg_loss = if has_policy_tokens {
        masked_mean(&pg_loss_max, &kept, None)?
    } else {
        vf_loss.f_zeros_like()?
    };
    let loss = pg_loss.f_add(&vf_loss.f_mul(&number_like(cfg.vf_coef, &vf_loss)?)?)?;

    let (pg_clipfrac, approxkl, ratio_mean) = tch::no_grad(|| -> Result<_> {
        let pg_clipfrac = if has_policy_tokens {
            Some(masked_mean(
                &pg_losses2.f_gt_tensor(&pg_losses)?.f_to_kind(Kind::Float)?,
                &kept,
                None,
            )?)
        } else {
            None
        };
        let mean_sq = logprobs_diff.f_square()?.f_mean(None::<Kind>)?;
        let approxkl = mean_sq.f_mul(&number_like(0.5, &mean_sq)?)?;
        Ok((pg_clipfrac, approxkl, ratio.f_mean(None::<Kind>)?))
    })?;
    Ok(PpoLoss {
        loss,
        pg_loss,
        vf_loss,
        vf_clipfrac: vf_clipfrac.f_detach()?,
        pg_clipfrac,
        approxkl,
        ratio_mean,
    })
}

/// The entropy TRL's update loop logs (`policy/entropy_avg`), from the tempered logits:
/// `logsumexp(logits) - sum(softmax(logits) * logits)` per position.
pub fn ppo_entropy(logits: &Tensor) -> Result<Tensor> {
    expect_float("logits", logits)?;
    let prob_dist = logits.f_softmax(-1, None::<Kind>)?;
    Ok(logits
        .f_logsumexp([-1i64].as_slice(), false)?
        .f_sub(&prob_dist.f_mul(logits)?.f_sum_dim_intlist(-1, false, None::<Kind>)?)?)
}

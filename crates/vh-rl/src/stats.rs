//! The statistics TRL's PPO trainer logs, under TRL's names.

use crate::error::{expect_shape, Result, RlError};
use crate::ppo::{PpoLoss, RolloutTargets};
use tch::{Kind, Tensor};

/// One PPO iteration's logged metrics, one field per key TRL's `PPOTrainer` logs (the key is in
/// each field's doc and in [`PpoStats::to_log`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PpoStats {
    /// `eps`: episodes per second since the start of training.
    pub eps: f64,
    /// `objective/kl`: the per-row sum of the per-token KL, averaged over rows.
    pub objective_kl: f64,
    /// `objective/entropy`: the per-row sum of `-logprobs` (padding counts `-INVALID_LOGPROB`, as
    /// in TRL), averaged over rows.
    pub objective_entropy: f64,
    /// `objective/non_score_reward`: the per-row sum of the KL penalty, averaged over rows.
    pub objective_non_score_reward: f64,
    /// `objective/rlhf_reward`: `objective/non_score_reward + objective/scores`.
    pub objective_rlhf_reward: f64,
    /// `objective/scores`: the mean score.
    pub objective_scores: f64,
    /// `policy/approxkl_avg`: mean `approxkl` over the micro-batches.
    pub policy_approxkl_avg: f64,
    /// `policy/clipfrac_avg`: mean policy clip fraction.
    pub policy_clipfrac_avg: f64,
    /// `loss/policy_avg`: mean policy loss.
    pub loss_policy_avg: f64,
    /// `loss/value_avg`: mean value loss.
    pub loss_value_avg: f64,
    /// `val/clipfrac_avg`: mean value clip fraction.
    pub val_clipfrac_avg: f64,
    /// `policy/entropy_avg`: mean entropy of the updates' tempered logits.
    pub policy_entropy_avg: f64,
    /// `val/ratio`: mean probability ratio.
    pub val_ratio: f64,
    /// `val/ratio_var`: unbiased variance of the micro-batches' mean ratios (NaN for a single
    /// micro-batch, as `torch.var`).
    pub val_ratio_var: f64,
    /// `val/num_eos_tokens`: eos tokens in the (untruncated) responses.
    pub val_num_eos_tokens: f64,
    /// `lr`: the learning rate of the iteration.
    pub lr: f64,
    /// `episode`: episodes seen so far.
    pub episode: f64,
}

impl PpoStats {
    /// TRL's keys, in the order it logs them.
    pub const NAMES: [&'static str; 17] = [
        "eps",
        "objective/kl",
        "objective/entropy",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "objective/scores",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "policy/entropy_avg",
        "val/ratio",
        "val/ratio_var",
        "val/num_eos_tokens",
        "lr",
        "episode",
    ];

    /// The metrics as (TRL key, value) pairs, in TRL's order.
    pub fn to_log(&self) -> Vec<(&'static str, f64)> {
        let values = [
            self.eps,
            self.objective_kl,
            self.objective_entropy,
            self.objective_non_score_reward,
            self.objective_rlhf_reward,
            self.objective_scores,
            self.policy_approxkl_avg,
            self.policy_clipfrac_avg,
            self.loss_policy_avg,
            self.loss_value_avg,
            self.val_clipfrac_avg,
            self.policy_entropy_avg,
            self.val_ratio,
            self.val_ratio_var,
            self.val_num_eos_tokens,
            self.lr,
            self.episode,
        ];
        Self::NAMES.into_iter().zip(values).collect()
    }

    /// Fills the `objective/*` metrics from a rollout, as TRL computes them after the update:
    /// `kl.sum(1).mean()`, `(-logprobs).sum(1).mean()`, `non_score_reward.sum(1).mean()`, their
    /// sum with `scores.mean()`.
    pub fn set_rollout(&mut self, targets: &RolloutTargets, scores: &Tensor) -> Result<()> {
        expect_shape("scores", scores, "[batch]", &[targets.kl.size()[0]])?;
        let row_mean =
            |t: &Tensor| -> Result<Tensor> { Ok(t.f_sum_dim_intlist(1, false, None::<Kind>)?.f_mean(None::<Kind>)?) };
        let mean_kl = row_mean(&targets.kl)?;
        let mean_entropy = row_mean(&targets.logprobs.f_neg()?)?;
        let mean_non_score_reward = row_mean(&targets.non_score_reward)?;
        let scores_mean = scores.f_mean(None::<Kind>)?;
        let rlhf_reward = mean_non_score_reward.f_add(&scores_mean)?;
        self.objective_kl = mean_kl.f_double_value(&[])?;
        self.objective_entropy = mean_entropy.f_double_value(&[])?;
        self.objective_non_score_reward = mean_non_score_reward.f_double_value(&[])?;
        self.objective_rlhf_reward = rlhf_reward.f_double_value(&[])?;
        self.objective_scores = scores_mean.f_double_value(&[])?;
        Ok(())
    }

    /// Fills the update metrics (`policy/*`, `loss/*`, `val/clipfrac_avg`, `val/ratio*`) from the
    /// micro-batches' statistics.
    pub fn set_updates(&mut self, updates: &UpdateStats) -> Result<()> {
        if updates.approxkl.is_empty() {
            return Err(RlError::InvalidArgument(
                "no micro-batch statistics were recorded".into(),
            ));
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        self.policy_approxkl_avg = mean(&updates.approxkl);
        self.policy_clipfrac_avg = mean(&updates.pg_clipfrac);
        self.loss_policy_avg = mean(&updates.pg_loss);
        self.loss_value_avg = mean(&updates.vf_loss);
        self.val_clipfrac_avg = mean(&updates.vf_clipfrac);
        self.policy_entropy_avg = mean(&updates.entropy);
        self.val_ratio = mean(&updates.ratio);
        let n = updates.ratio.len() as f64;
        self.val_ratio_var = if updates.ratio.len() < 2 {
            f64::NAN
        } else {
            updates.ratio.iter().map(|r| (r - self.val_ratio).powi(2)).sum::<f64>() / (n - 1.0)
        };
        Ok(())
    }
}

/// Each micro-batch's statistics over an iteration's PPO epochs (TRL's `*_stats` tensors,
/// flattened), to average into [`PpoStats`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpdateStats {
    /// `approxkl` per micro-batch.
    pub approxkl: Vec<f64>,
    /// `pg_clipfrac` per micro-batch.
    pub pg_clipfrac: Vec<f64>,
    /// `pg_loss` per micro-batch.
    pub pg_loss: Vec<f64>,
    /// `vf_loss` per micro-batch.
    pub vf_loss: Vec<f64>,
    /// `vf_clipfrac` per micro-batch.
    pub vf_clipfrac: Vec<f64>,
    /// Mean entropy per micro-batch.
    pub entropy: Vec<f64>,
    /// Mean ratio per micro-batch.
    pub ratio: Vec<f64>,
}

impl UpdateStats {
    /// Records one micro-batch: its losses and the entropy per position (`ppo_entropy`), whose
    /// mean over every position is recorded, as TRL's `entropy.mean()`. A micro-batch without
    /// response tokens adds no policy loss or clip fraction (it had no policy term).
    pub fn record(&mut self, loss: &PpoLoss, entropy: &Tensor) -> Result<()> {
        let v = |t: &Tensor| -> Result<f64> { Ok(t.f_detach()?.f_double_value(&[])?) };
        self.approxkl.push(v(&loss.approxkl)?);
        if let Some(clipfrac) = &loss.pg_clipfrac {
            self.pg_clipfrac.push(v(clipfrac)?);
            self.pg_loss.push(v(&loss.pg_loss)?);
        }
        self.vf_loss.push(v(&loss.vf_loss)?);
        self.vf_clipfrac.push(v(&loss.vf_clipfrac)?);
        self.entropy.push(v(&entropy.f_mean(None::<Kind>)?)?);
        self.ratio.push(v(&loss.ratio_mean)?);
        Ok(())
    }
}

/// `val/num_eos_tokens`: how many tokens of `responses` are `eos_token_id`.
pub fn num_eos_tokens(responses: &Tensor, eos_token_id: i64) -> Result<i64> {
    use vh_core::ops::ScalarOps;
    Ok(responses.s_eq(eos_token_id)?.f_sum(Kind::Int64)?.f_int64_value(&[])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trls_and_variance_is_unbiased() {
        let stats = PpoStats {
            objective_kl: 1.5,
            lr: 3e-6,
            ..Default::default()
        };
        let log = stats.to_log();
        assert_eq!(log.len(), 17);
        assert_eq!(log[1], ("objective/kl", 1.5));
        assert_eq!(log[15], ("lr", 3e-6));
        let mut updates = UpdateStats::default();
        let mut s = PpoStats::default();
        assert!(s.set_updates(&updates).is_err());
        updates.ratio = vec![1.0, 2.0, 3.0];
        for v in [
            &mut updates.approxkl,
            &mut updates.pg_clipfrac,
            &mut updates.pg_loss,
            &mut updates.vf_loss,
            &mut updates.vf_clipfrac,
            &mut updates.entropy,
        ] {
            *v = vec![0.0, 0.5, 1.0];
        }
        s.set_updates(&updates).unwrap();
        assert_eq!((s.val_ratio, s.val_ratio_var, s.loss_value_avg), (2.0, 1.0, 0.5));
        let r = Tensor::from_slice2(&[[2i64, 5, 2], [0, 0, 2]]);
        assert_eq!(num_eos_tokens(&r, 2).unwrap(), 3);
    }
}

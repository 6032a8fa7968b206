//! `PpoConfig`: TRL 0.26.2's `trl.experimental.ppo.PPOConfig` (with the `OnPolicyConfig` and
//! `TrainingArguments` fields its trainer reads), under the same names and defaults.

use crate::error::{PpoError, Result};
use serde::{Deserialize, Serialize};
use vh_rl::KlEstimator;

/// The AdamW implementation, under HF's `optim` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Optim {
    /// `torch.optim.AdamW(fused=True)`: libtorch's fused kernel, one pass per parameter. What
    /// TRL's trainers use by default on torch >= 2.8 (HF's `TrainingArguments.optim`).
    #[default]
    #[serde(rename = "adamw_torch_fused")]
    AdamwTorchFused,
    /// `torch.optim.AdamW()` on CPU tensors: the single-tensor path, an elementwise operation at a
    /// time (same results within rounding, several times slower on CPU).
    #[serde(rename = "adamw_torch")]
    AdamwTorch,
}

/// PPO's hyper-parameters, named and defaulted as TRL 0.26.2's `PPOConfig`. Sizes are per
/// process (this trainer runs one): TRL's `local_batch_size` is
/// `per_device_train_batch_size * gradient_accumulation_steps` rollouts per iteration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PpoConfig {
    /// AdamW's initial learning rate (5e-5), decayed linearly to 0 over the iterations.
    pub learning_rate: f64,
    /// Rollouts per micro-batch of the update (8).
    pub per_device_train_batch_size: usize,
    /// Micro-batches whose gradients are summed before each optimiser step (1).
    pub gradient_accumulation_steps: usize,
    /// Mini-batches (optimiser steps) per PPO epoch (1).
    pub num_mini_batches: usize,
    /// Passes over each rollout batch (4).
    pub num_ppo_epochs: usize,
    /// Episodes (prompts rolled out) to train on; `None` means `num_train_epochs` passes over
    /// the prompts (TRL's rule).
    pub total_episodes: Option<usize>,
    /// Passes over the prompts when `total_episodes` is not set (3.0).
    pub num_train_epochs: f64,
    /// Tokens generated per response (53).
    pub response_length: usize,
    /// Generation stops at this token and responses are truncated after it (none).
    pub stop_token_id: Option<i64>,
    /// Sampling temperature (0.7); log-probabilities use `temperature + 1e-7`, as TRL.
    pub temperature: f64,
    /// Subtracted from the score of responses without the eos token (none).
    pub missing_eos_penalty: Option<f64>,
    /// KL penalty coefficient (0.05).
    pub kl_coef: f64,
    /// KL estimator, `k1` or `k3` (`k1`).
    pub kl_estimator: String,
    /// Policy ratio clip range (0.2).
    pub cliprange: f64,
    /// Value loss coefficient (0.1).
    pub vf_coef: f64,
    /// Value clip range (0.2).
    pub cliprange_value: f64,
    /// Discount factor (1.0).
    pub gamma: f64,
    /// GAE lambda (0.95).
    pub lam: f64,
    /// Whiten the per-token rewards before GAE (false; needs mini-batches of at least 8).
    pub whiten_rewards: bool,
    /// AdamW weight decay (0.0), not applied to biases and norm weights (HF's groups).
    pub weight_decay: f64,
    /// AdamW beta1 (0.9).
    pub adam_beta1: f64,
    /// AdamW beta2 (0.999).
    pub adam_beta2: f64,
    /// AdamW epsilon (1e-8).
    pub adam_epsilon: f64,
    /// Which AdamW implementation steps (`adamw_torch_fused`, HF's and so TRL's default from
    /// torch 2.8 on; `adamw_torch` is torch's single-tensor path).
    pub optim: Optim,
    /// Linear warm-up iterations of the schedule (0).
    pub warmup_steps: usize,
    /// Gradient norm clip before each optimiser step; `None` (the default) as TRL's PPO loop,
    /// which calls `optimizer.step()` without clipping although `TrainingArguments` carries
    /// `max_grad_norm = 1.0`.
    pub max_grad_norm: Option<f64>,
    /// Seeds the prompt order, the sampling and the mini-batch shuffles (42).
    pub seed: u64,
    /// The padding token (TRL reads `processing_class.pad_token_id`); `None` takes config.json's
    /// `pad_token_id`, else its `eos_token_id`.
    pub pad_token_id: Option<i64>,
    /// The eos token counted by `val/num_eos_tokens` and the missing-eos penalty (TRL reads
    /// `processing_class.eos_token_id`); `None` takes `stop_token_id`, else config.json's.
    pub eos_token_id: Option<i64>,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            learning_rate: 5e-5,
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            num_mini_batches: 1,
            num_ppo_epochs: 4,
            total_episodes: None,
            num_train_epochs: 3.0,
            response_length: 53,
            stop_token_id: None,
            temperature: 0.7,
            missing_eos_penalty: None,
            kl_coef: 0.05,
            kl_estimator: "k1".into(),
            cliprange: 0.2,
            vf_coef: 0.1,
            cliprange_value: 0.2,
            gamma: 1.0,
            lam: 0.95,
            whiten_rewards: false,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            optim: Optim::AdamwTorchFused,
            warmup_steps: 0,
            max_grad_norm: None,
            seed: 42,
            pad_token_id: None,
            eos_token_id: None,
        }
    }
}

/// The sizes TRL derives from the configuration (its `args.local_batch_size`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSizes {
    /// Rollouts per iteration: `per_device_train_batch_size * gradient_accumulation_steps`.
    pub batch_size: usize,
    /// Rollouts per mini-batch (optimiser step): `batch_size / num_mini_batches`.
    pub mini_batch_size: usize,
    /// Rollouts per forward/backward: `per_device_train_batch_size`.
    pub micro_batch_size: usize,
    /// Micro-batches per mini-batch.
    pub micro_batches_per_mini_batch: usize,
    /// Iterations: `ceil(total_episodes / batch_size)`.
    pub num_total_batches: usize,
}

impl PpoConfig {
    /// Checks every value and derives the batch sizes for a prompt set of `num_prompts`: sizes
    /// that do not divide (as TRL's `exact_div`), zero sizes, non-finite numbers and an unknown
    /// KL estimator are errors.
    pub fn batch_sizes(&self, num_prompts: usize) -> Result<BatchSizes> {
        self.validate()?;
        let batch_size = self.per_device_train_batch_size * self.gradient_accumulation_steps;
        if !batch_size.is_multiple_of(self.num_mini_batches) {
            return Err(PpoError::Config(format!(
                "`batch_size` ({} = per_device_train_batch_size {} * gradient_accumulation_steps {}) must be a multiple of `num_mini_batches` ({})",
                batch_size, self.per_device_train_batch_size, self.gradient_accumulation_steps, self.num_mini_batches
            )));
        }
        let mini_batch_size = batch_size / self.num_mini_batches;
        if !mini_batch_size.is_multiple_of(self.per_device_train_batch_size) {
            return Err(PpoError::Config(format!(
                "the mini-batch size {mini_batch_size} (batch_size {batch_size} / num_mini_batches {}) must be a multiple of per_device_train_batch_size {}",
                self.num_mini_batches, self.per_device_train_batch_size
            )));
        }
        if self.whiten_rewards && mini_batch_size < 8 {
            return Err(PpoError::Config(format!(
                "whiten_rewards needs mini-batches of at least 8 rollouts, got {mini_batch_size}"
            )));
        }
        if num_prompts == 0 {
            return Err(PpoError::Input("there are no prompts to train on".into()));
        }
        let total_episodes = self.total_episodes_for(num_prompts);
        if total_episodes == 0 {
            return Err(PpoError::Config(
                "total_episodes is 0: there is nothing to train".into(),
            ));
        }
        Ok(BatchSizes {
            batch_size,
            mini_batch_size,
            micro_batch_size: self.per_device_train_batch_size,
            micro_batches_per_mini_batch: mini_batch_size / self.per_device_train_batch_size,
            num_total_batches: total_episodes.div_ceil(batch_size),
        })
    }

    /// The episodes of the whole run: `total_episodes`, else `num_train_epochs` passes over the
    /// prompts (TRL's `int(num_train_epochs * len(train_dataset))`).
    pub fn total_episodes_for(&self, num_prompts: usize) -> usize {
        match self.total_episodes {
            Some(n) => n,
            None => (self.num_train_epochs * num_prompts as f64) as usize,
        }
    }

    /// Checks ranges and finiteness (see [`PpoConfig::batch_sizes`] for the sizes' divisibility).
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("per_device_train_batch_size", self.per_device_train_batch_size),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps),
            ("num_mini_batches", self.num_mini_batches),
            ("num_ppo_epochs", self.num_ppo_epochs),
            ("response_length", self.response_length),
        ] {
            if v == 0 {
                return Err(PpoError::Config(format!("{name} must be at least 1")));
            }
        }
        self.kl_estimator()?;
        self.rl_config().validate()?;
        for (name, v) in [
            ("learning_rate", self.learning_rate),
            ("num_train_epochs", self.num_train_epochs),
            ("weight_decay", self.weight_decay),
            ("adam_epsilon", self.adam_epsilon),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(PpoError::Config(format!("{name} must be finite and >= 0, got {v}")));
            }
        }
        for (name, v) in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(PpoError::Config(format!("{name} must be in [0, 1), got {v}")));
            }
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(PpoError::Config(format!(
                "temperature must be > 0 (PPO samples its rollouts), got {}",
                self.temperature
            )));
        }
        if let Some(m) = self.max_grad_norm {
            if !(m.is_finite() && m > 0.0) {
                return Err(PpoError::Config(format!(
                    "max_grad_norm must be finite and > 0, got {m}"
                )));
            }
        }
        Ok(())
    }

    /// The KL estimator named by `kl_estimator`.
    pub fn kl_estimator(&self) -> Result<KlEstimator> {
        self.kl_estimator
            .parse()
            .map_err(|e: vh_rl::RlError| PpoError::Config(e.to_string()))
    }

    /// The subset PPO's math reads ([`vh_rl::PpoConfig`]).
    pub fn rl_config(&self) -> vh_rl::PpoConfig {
        vh_rl::PpoConfig {
            kl_coef: self.kl_coef,
            kl_estimator: self.kl_estimator().unwrap_or_default(),
            cliprange: self.cliprange,
            vf_coef: self.vf_coef,
            cliprange_value: self.cliprange_value,
            gamma: self.gamma,
            lam: self.lam,
            whiten_rewards: self.whiten_rewards,
            temperature: self.temperature,
            missing_eos_penalty: self.missing_eos_penalty,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_trls_and_sizes_divide() {
        let c = PpoConfig::default();
        assert_eq!(
            (c.learning_rate, c.per_device_train_batch_size, c.num_ppo_epochs),
            (5e-5, 8, 4)
        );
        assert_eq!((c.response_length, c.temperature, c.seed), (53, 0.7, 42));
        let s = c.batch_sizes(100).unwrap();
        assert_eq!((s.batch_size, s.mini_batch_size, s.num_total_batches), (8, 8, 38));
        let bad = PpoConfig {
            num_mini_batches: 3,
            ..Default::default()
        };
        assert!(
            matches!(bad.batch_sizes(10), Err(PpoError::Config(m)) if m.contains("multiple of `num_mini_batches`"))
        );
        let bad = PpoConfig {
            per_device_train_batch_size: 4,
            num_mini_batches: 2,
            gradient_accumulation_steps: 1,
            ..Default::default()
        };
        assert!(
            matches!(bad.batch_sizes(10), Err(PpoError::Config(m)) if m.contains("multiple of per_device_train_batch_size"))
        );
        assert!(PpoConfig {
            kl_estimator: "k2".into(),
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(PpoConfig {
            cliprange: f64::NAN,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(matches!(c.batch_sizes(0), Err(PpoError::Input(_))));
    }
}

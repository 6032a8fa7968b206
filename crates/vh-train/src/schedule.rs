//! Learning-rate schedules as PyTorch's `LambdaLR` drives them.

use crate::error::{Result, TrainError};
use crate::optim::AdamW;

/// A learning-rate multiplier per scheduler step, as the `lr_lambda` of PyTorch's `LambdaLR`.
pub trait LrLambda: Send {
    /// The factor applied to the base learning rate after `step` scheduler steps.
    fn factor(&self, step: u64) -> f64;
}

/// HF's `get_linear_schedule_with_warmup`: linear from 0 to 1 over `num_warmup_steps`, then
/// linear down to 0 at `num_training_steps`, and 0 after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearWarmup {
    /// Steps of the warm-up.
    pub num_warmup_steps: u64,
    /// Total optimiser steps of the run.
    pub num_training_steps: u64,
}

impl LrLambda for LinearWarmup {
    fn factor(&self, step: u64) -> f64 {
        // Same float operations as transformers' `_get_linear_schedule_with_warmup_lr_lambda`.
        if step < self.num_warmup_steps {
            return step as f64 / self.num_warmup_steps.max(1) as f64;
        }
        let remaining = self.num_training_steps as f64 - step as f64;
        (remaining / self.num_training_steps.saturating_sub(self.num_warmup_steps).max(1) as f64).max(0.0)
    }
}

/// Drives an optimiser's learning rate with a schedule, as PyTorch's `LambdaLR`: creating it sets
/// `base_lr * factor(0)` (so a warm-up's first step has learning rate 0, as in PyTorch), and each
/// [`LrScheduler::step`], called after the optimiser's step, moves to the next factor.
pub struct LrScheduler {
    schedule: Box<dyn LrLambda>,
    base_lr: f64,
    last_epoch: u64,
    last_lr: f64,
}

impl std::fmt::Debug for LrScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LrScheduler")
            .field("base_lr", &self.base_lr)
            .field("last_epoch", &self.last_epoch)
            .field("last_lr", &self.last_lr)
            .finish()
    }
}

impl LrScheduler {
    /// Starts the schedule from the optimiser's current learning rate, which becomes the base.
    pub fn new(optimizer: &mut AdamW, schedule: impl LrLambda + 'static) -> Result<Self> {
        let base_lr = optimizer.lr();
        let mut scheduler = Self {
            schedule: Box::new(schedule),
            base_lr,
            last_epoch: 0,
            last_lr: base_lr,
        };
        scheduler.apply(optimizer)?;
        Ok(scheduler)
    }

    fn apply(&mut self, optimizer: &mut AdamW) -> Result<()> {
        let factor = self.schedule.factor(self.last_epoch);
        if !factor.is_finite() {
            return Err(TrainError::InvalidArgument(format!(
                "the schedule gave a non-finite factor {factor} at step {}",
                self.last_epoch
            )));
        }
        self.last_lr = self.base_lr * factor;
        optimizer.set_lr(self.last_lr)
    }

    /// Advances one step and sets the new learning rate; returns it.
    pub fn step(&mut self, optimizer: &mut AdamW) -> Result<f64> {
        self.last_epoch += 1;
        self.apply(optimizer)?;
        Ok(self.last_lr)
    }

    /// The learning rate set last (PyTorch's `get_last_lr()[0]`).
    pub fn last_lr(&self) -> f64 {
        self.last_lr
    }

    /// How many times [`LrScheduler::step`] was called.
    pub fn steps(&self) -> u64 {
        self.last_epoch
    }
}

/// HF's `get_linear_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps)`.
pub fn get_linear_schedule_with_warmup(
    optimizer: &mut AdamW,
    num_warmup_steps: u64,
    num_training_steps: u64,
) -> Result<LrScheduler> {
    LrScheduler::new(
        optimizer,
        LinearWarmup {
            num_warmup_steps,
            num_training_steps,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_warmup_matches_hf_values() {
        let s = LinearWarmup {
            num_warmup_steps: 2,
            num_training_steps: 6,
        };
        let factors: Vec<f64> = (0..8).map(|i| s.factor(i)).collect();
        assert_eq!(factors, vec![0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]);
        let no_warmup = LinearWarmup {
            num_warmup_steps: 0,
            num_training_steps: 4,
        };
        assert_eq!(no_warmup.factor(0), 1.0);
        assert_eq!(no_warmup.factor(1), 0.75);
        // Degenerate totals as in HF (max(1, ...) in the denominators).
        let degenerate = LinearWarmup {
            num_warmup_steps: 3,
            num_training_steps: 3,
        };
        assert_eq!(degenerate.factor(3), 0.0);
    }

    #[test]
    fn scheduler_sets_the_optimiser_lr_like_lambda_lr() {
        let p = tch::Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let cfg = crate::AdamWConfig {
            lr: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), p)], cfg, crate::hf_no_decay).unwrap();
        let mut sched = get_linear_schedule_with_warmup(&mut opt, 2, 6).unwrap();
        assert_eq!(opt.lr(), 0.0, "the first warm-up step has learning rate 0");
        assert_eq!(sched.step(&mut opt).unwrap(), 0.1 * 0.5);
        assert_eq!(sched.step(&mut opt).unwrap(), 0.1);
        assert_eq!(opt.lr(), 0.1);
        assert_eq!((sched.steps(), sched.last_lr()), (2, 0.1));
    }
}

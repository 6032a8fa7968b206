//! Training utilities at parity with PyTorch and HF's Trainer: libtorch's AdamW with HF's
//! decay / no-decay parameter groups, `get_linear_schedule_with_warmup`, `clip_grad_norm_`,
//! gradient accumulation, the LM + value loss, and checks that refuse a NaN before it reaches the
//! weights.
//!
//! ```no_run
//! use vh_train::{AdamW, AdamWConfig, GradAccumulator};
//! # fn run(vs: &tch::nn::VarStore, micro_batches: &[tch::Tensor]) -> vh_train::Result<()> {
//! let mut opt = AdamW::hf(vs, AdamWConfig { lr: 1e-5, weight_decay: 0.01, ..Default::default() })?;
//! let mut sched = vh_train::get_linear_schedule_with_warmup(&mut opt, 10, 1000)?;
//! let mut acc = GradAccumulator::new(2)?;
//! for loss in micro_batches {
//!     if acc.backward(loss)? {
//!         let step = vh_train::optimizer_step(&mut opt, Some(&mut sched), Some(1.0))?;
//!         println!("grad norm {} at lr {}", step.grad_norm, step.lr);
//!     }
//! }
//! # Ok(())
//! # }
//! ```

pub mod clip;
pub mod error;
pub mod fused;
pub mod loss;
pub mod optim;
pub mod schedule;

pub use clip::{clip_grad_norm, total_grad_norm};
pub use error::{Result, TrainError};
pub use fused::{fused_adamw_, fused_adamw_available, FusedAdamWStep};
pub use loss::{backward, check_finite, lm_value_loss, masked_mse, GradAccumulator, LmValueLoss};
pub use optim::{hf_no_decay, named_parameters, AdamW, AdamWConfig, LAYER_NORM_MODULES};
pub use schedule::{get_linear_schedule_with_warmup, LinearWarmup, LrLambda, LrScheduler};

use tch::Tensor;

/// `v` as a 0-dim CPU tensor of `like`'s kind. A Python number combined with a 0-dim tensor
/// keeps the tensor's kind; a 0-dim f64 tensor would promote a 0-dim f32 one to f64, so numbers
/// that meet 0-dim results (losses, norms) are made in their kind first.
pub(crate) fn number_like(v: f64, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(&[v])?
        .f_to_kind(like.kind())?
        .f_reshape([] as [i64; 0])?)
}

/// What one [`optimizer_step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// The total gradient norm before clipping (what HF logs as `grad_norm`).
    pub grad_norm: f64,
    /// The learning rate this step used.
    pub lr: f64,
}

/// One optimiser step as HF's Trainer takes it: the gradients' total norm (clipped to
/// `max_grad_norm` when given, as `clip_grad_norm_`), AdamW's update, the schedule's step, and
/// the gradients zeroed. A non-finite gradient norm is refused: the parameters are left as they
/// were, the gradients are dropped (so the next step starts clean) and the error says
/// `gradient norm`.
pub fn optimizer_step(
    optimizer: &mut AdamW,
    scheduler: Option<&mut LrScheduler>,
    max_grad_norm: Option<f64>,
) -> Result<StepReport> {
    let params: Vec<&Tensor> = optimizer.parameters().iter().map(|(_, t)| t).collect();
    let norm = match max_grad_norm {
        Some(max) => clip_grad_norm(params, max)?,
        None => total_grad_norm(params)?,
    };
    if let Err(e) = check_finite("gradient norm", &norm) {
        optimizer.zero_grad()?;
        return Err(e);
    }
    let lr = optimizer.lr();
    optimizer.step()?;
    if let Some(s) = scheduler {
        s.step(optimizer)?;
    }
    optimizer.zero_grad()?;
    Ok(StepReport {
        grad_norm: norm.f_double_value(&[])?,
        lr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn a_nan_gradient_never_reaches_the_parameters() {
        let w = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let mut opt = AdamW::new(
            vec![("w".into(), w.shallow_clone())],
            AdamWConfig::default(),
            hf_no_decay,
        )
        .unwrap();
        // A loss that is finite while its gradient is not: d/dw sqrt(w - 1) at w = 1.
        let loss = (&w - 1.0).sqrt().sum(Kind::Float);
        backward(&loss).unwrap();
        let err = optimizer_step(&mut opt, None, Some(1.0)).unwrap_err();
        assert!(
            matches!(&err, TrainError::NonFinite { term, .. } if term == "gradient norm"),
            "{err}"
        );
        assert_eq!(
            Vec::<f32>::try_from(&w).unwrap(),
            vec![1.0, 2.0],
            "parameters untouched"
        );
        assert!(!w.grad().defined(), "gradients dropped");
        // The next, finite step goes through.
        backward(&(&w * 2.0).sum(Kind::Float)).unwrap();
        let report = optimizer_step(&mut opt, None, None).unwrap();
        assert!((report.grad_norm - 8f64.sqrt()).abs() < 1e-5);
        assert!(Vec::<f32>::try_from(&w).unwrap()[0] < 1.0);
    }

    #[test]
    fn numbers_keep_the_kind_of_zero_dim_tensors() {
        let x = Tensor::from(2.0f32);
        let y = x.f_add(&number_like(1e-6, &x).unwrap()).unwrap();
        assert_eq!(y.kind(), Kind::Float);
    }
}

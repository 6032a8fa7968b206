//! The LM + value loss, finiteness checks, backward passes and gradient accumulation.

use crate::error::{same_shape, Result, TrainError};
use crate::number_like;
use tch::{Kind, Tensor};

/// Fails with [`TrainError::NonFinite`] naming `term` when any element of `t` is NaN or infinite.
pub fn check_finite(term: &str, t: &Tensor) -> Result<()> {
    let finite = t.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0;
    if finite {
        return Ok(());
    }
    // The first offending value, for the message.
    let flat = t.f_reshape([-1])?.f_to_kind(Kind::Double)?;
    let bad = flat.f_isfinite()?.f_logical_not()?.f_nonzero()?;
    let value = match bad.size().first() {
        Some(&n) if n > 0 => flat.f_double_value(&[bad.f_int64_value(&[0, 0])?])?,
        _ => f64::NAN,
    };
    Err(TrainError::NonFinite {
        term: term.to_string(),
        value,
    })
}

/// `mean((values - targets)^2)` over the positions where `mask` is non-zero, computed as
/// `((values - targets)^2 * mask).sum() / mask.sum()` with the mask in the values' kind. Shapes
/// must be equal; a mask that selects nothing is an error (the mean would be NaN).
pub fn masked_mse(values: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    same_shape(("values", values), ("targets", targets))?;
    same_shape(("values", values), ("mask", mask))?;
    let mask = mask.f_to_device(values.device())?.f_to_kind(values.kind())?;
    let count = mask.f_sum(values.kind())?;
    if count.f_double_value(&[])? == 0.0 {
        return Err(TrainError::EmptyMask("mask".into()));
    }
    let targets = targets.f_to_device(values.device())?.f_to_kind(values.kind())?;
    let squared = values.f_sub(&targets)?.f_square()?;
    Ok(squared.f_mul(&mask)?.f_sum(values.kind())?.f_div(&count)?)
}

/// The terms of [`lm_value_loss`], each a 0-dim tensor.
#[derive(Debug)]
pub struct LmValueLoss {
    /// `lm_loss + value_coef * value_loss`, the tensor to call backward on.
    pub total: Tensor,
    /// The language-model loss as given.
    pub lm_loss: Tensor,
    /// The masked mean squared error of the values.
    pub value_loss: Tensor,
}

/// The loss of supervised value-head training: `lm_loss + value_coef * masked_mse(values,
/// targets, mask)`. Each term and the total are checked: a NaN or infinite one is a
/// [`TrainError::NonFinite`] naming it (`lm_loss`, `value_loss` or `loss`), so it never reaches a
/// backward pass or an optimiser.
pub fn lm_value_loss(
    lm_loss: &Tensor,
    values: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
    value_coef: f64,
) -> Result<LmValueLoss> {
    if !value_coef.is_finite() {
        return Err(TrainError::InvalidArgument(format!(
            "value_coef must be finite, got {value_coef}"
        )));
    }
    if lm_loss.numel() != 1 {
        return Err(TrainError::InvalidArgument(format!(
            "lm_loss must be a scalar, got shape {:?}",
            lm_loss.size()
        )));
    }
    check_finite("lm_loss", lm_loss)?;
    let value_loss = masked_mse(values, targets, mask)?;
    check_finite("value_loss", &value_loss)?;
    let total = lm_loss.f_add(&value_loss.f_mul(&number_like(value_coef, &value_loss)?)?)?;
    check_finite("loss", &total)?;
    Ok(LmValueLoss {
        total,
        lm_loss: lm_loss.shallow_clone(),
        value_loss,
    })
}

/// Runs the backward pass of a scalar `loss` into the gradients of the parameters it depends on
/// (adding to gradients already there). A loss without a graph ([`TrainError::NoGraph`]), a
/// non-scalar one, or a non-finite one ([`TrainError::NonFinite`]) is refused before anything
/// is accumulated; libtorch's own errors (a graph already freed by an earlier backward) come back
/// as [`TrainError::Torch`].
pub fn backward(loss: &Tensor) -> Result<()> {
    if loss.numel() != 1 {
        return Err(TrainError::InvalidArgument(format!(
            "backward needs a scalar loss, got shape {:?}",
            loss.size()
        )));
    }
    if !loss.requires_grad() {
        return Err(TrainError::NoGraph("loss".into()));
    }
    check_finite("loss", loss)?;
    Ok(loss.f_backward()?)
}

/// Gradient accumulation as HF's Trainer and accelerate do it: each micro-batch's loss is divided
/// by the number of micro-batches per optimiser step before its backward pass, so the
/// accumulated gradient is the mean over the micro-batches.
#[derive(Debug, Clone)]
pub struct GradAccumulator {
    steps: u64,
    done: u64,
}

impl GradAccumulator {
    /// Accumulates over `steps` micro-batches per optimiser step (1 = no accumulation).
    pub fn new(steps: u64) -> Result<Self> {
        if steps == 0 {
            return Err(TrainError::InvalidArgument(
                "gradient accumulation needs at least 1 micro-batch per step".into(),
            ));
        }
        Ok(Self { steps, done: 0 })
    }

    /// Backward of `loss / steps` (checked as [`backward`]); returns true when this micro-batch
    /// completes a step's accumulation, i.e. when the optimiser should step.
    pub fn backward(&mut self, loss: &Tensor) -> Result<bool> {
        if !loss.requires_grad() {
            return Err(TrainError::NoGraph("loss".into()));
        }
        let scaled = if self.steps == 1 {
            loss.shallow_clone()
        } else {
            loss.f_div(&number_like(self.steps as f64, loss)?)?
        };
        backward(&scaled)?;
        self.done += 1;
        Ok(self.done.is_multiple_of(self.steps))
    }

    /// Micro-batches per optimiser step.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Micro-batches accumulated since the last completed step.
    pub fn pending(&self) -> u64 {
        self.done % self.steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn masked_mse_averages_attended_positions_only() {
        let v = Tensor::from_slice2(&[[1.0f32, 2.0, 3.0], [0.0, 0.0, 9.0]]);
        let t = Tensor::from_slice2(&[[0.0f32, 0.0, 0.0], [1.0, 1.0, 0.0]]);
        let m = Tensor::from_slice2(&[[1i64, 1, 0], [1, 0, 0]]);
        let mse = masked_mse(&v, &t, &m).unwrap().double_value(&[]);
        assert!((mse - (1.0 + 4.0 + 1.0) / 3.0).abs() < 1e-6);
        assert!(matches!(
            masked_mse(&v, &t.narrow(1, 0, 2), &m),
            Err(TrainError::Shape { .. })
        ));
        assert!(matches!(
            masked_mse(&v, &t, &m.narrow(1, 0, 2)),
            Err(TrainError::Shape { .. })
        ));
        assert!(matches!(
            masked_mse(&v, &t, &m.zeros_like()),
            Err(TrainError::EmptyMask(_))
        ));
    }

    #[test]
    fn nan_terms_are_named() {
        let v = Tensor::from_slice2(&[[1.0f32, f32::NAN]]).set_requires_grad(true);
        let t = Tensor::zeros([1, 2], (Kind::Float, Device::Cpu));
        let m = Tensor::ones([1, 2], (Kind::Int64, Device::Cpu));
        let lm = Tensor::from(0.5f32);
        let err = lm_value_loss(&lm, &v, &t, &m, 0.5).unwrap_err();
        assert!(
            matches!(&err, TrainError::NonFinite { term, .. } if term == "value_loss"),
            "{err}"
        );
        // A NaN under a 0 in the mask still poisons the sum (NaN * 0 is NaN), as in PyTorch.
        let m0 = Tensor::from_slice2(&[[1i64, 0]]);
        assert!(lm_value_loss(&lm, &v, &t, &m0, 0.5).is_err());
        let nan_lm = Tensor::from(f32::NAN);
        let err = lm_value_loss(&nan_lm, &v.detach().nan_to_num(0.0, None, None), &t, &m, 0.5).unwrap_err();
        assert!(
            matches!(&err, TrainError::NonFinite { term, .. } if term == "lm_loss"),
            "{err}"
        );
        let inf = Tensor::from_slice2(&[[1e30f32, 1e30]]);
        let err = lm_value_loss(&lm, &inf, &t, &m, 0.5).unwrap_err();
        assert!(matches!(&err, TrainError::NonFinite { term, value } if term == "value_loss" && value.is_infinite()));
    }

    #[test]
    fn backward_refuses_what_it_cannot_differentiate() {
        let w = Tensor::from_slice(&[2.0f32]).set_requires_grad(true);
        let detached = (&w * 3.0).sum(Kind::Float).detach();
        assert!(matches!(backward(&detached), Err(TrainError::NoGraph(_))));
        let no_grad = tch::no_grad(|| (&w * 3.0).sum(Kind::Float));
        assert!(matches!(backward(&no_grad), Err(TrainError::NoGraph(_))));
        let pair = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        assert!(matches!(backward(&(&pair * 3.0)), Err(TrainError::InvalidArgument(_))));
        // w * w saves its inputs for the backward pass, which frees them.
        let loss = (&w * &w).sum(Kind::Float);
        backward(&loss).unwrap();
        assert_eq!(w.grad().double_value(&[0]), 4.0);
        // A second backward through the freed graph: libtorch's error, not a panic.
        assert!(matches!(backward(&loss), Err(TrainError::Torch(_))));
        let nan = (&w * f64::NAN).sum(Kind::Float);
        assert!(matches!(backward(&nan), Err(TrainError::NonFinite { .. })));
        assert_eq!(w.grad().double_value(&[0]), 4.0, "a refused loss adds nothing");
    }

    #[test]
    fn accumulation_averages_micro_batches() {
        let w = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut acc = GradAccumulator::new(2).unwrap();
        assert!(!acc.backward(&(&w * 2.0).sum(Kind::Float)).unwrap());
        assert_eq!(acc.pending(), 1);
        assert!(acc.backward(&(&w * 4.0).sum(Kind::Float)).unwrap());
        assert_eq!(w.grad().double_value(&[0]), 3.0, "(2 + 4) / 2");
        assert!(GradAccumulator::new(0).is_err());
    }
}

//! Masked statistics as TRL's PPO trainer defines them (`trl.experimental.ppo`).
//!
//! The arithmetic is TRL's, operation for operation (`(values * mask).sum() / mask.sum()`, ...),
//! so the results match to the bit. Where TRL's result is undefined the functions return
//! [`RlError::EmptyMask`] instead: a mean over an empty mask (TRL: NaN) and an unbiased variance
//! over fewer than two elements (TRL raises for none and divides by zero for one).

use crate::error::{same_shape, Result, RlError};
use crate::number_like;
use tch::Tensor;
use vh_core::ops::ScalarOps;

fn count_selected(mask: &Tensor, axis: Option<i64>) -> Result<Tensor> {
    Ok(match axis {
        Some(a) => mask.f_sum_dim_intlist(a, false, None::<tch::Kind>)?,
        None => mask.f_sum(None::<tch::Kind>)?,
    })
}

/// The mean of `values` where `mask` is set, over everything or along `axis`, as TRL's
/// `masked_mean(values, mask, axis)`. Shapes must be equal (TRL would broadcast silently); a mask
/// (or, with `axis`, a slice of it) that selects nothing is an error (TRL: NaN).
pub fn masked_mean(values: &Tensor, mask: &Tensor, axis: Option<i64>) -> Result<Tensor> {
    same_shape(("mask", mask), ("values", values))?;
    let count = count_selected(mask, axis)?;
    let empty = count.s_eq(0)?.f_any()?.f_int64_value(&[])? != 0;
    if empty {
        return Err(RlError::EmptyMask {
            what: match axis {
                Some(a) => format!("mask (a slice along axis {a})"),
                None => "mask".into(),
            },
            count: 0,
            why: "the masked mean is undefined (TRL gives NaN)".into(),
        });
    }
    let sum = match axis {
        Some(a) => values.f_mul(mask)?.f_sum_dim_intlist(a, false, None::<tch::Kind>)?,
        None => values.f_mul(mask)?.f_sum(None::<tch::Kind>)?,
    };
    Ok(sum.f_div(&count)?)
}

/// The variance of `values` where `mask` is set, as TRL's `masked_var`: the masked mean of the
/// squared deviations from the masked mean, times `n / (n - 1)` when `unbiased` (TRL's default),
/// with `n` the number of selected elements. `n == 0` is an error (as in TRL), and so is `n == 1`
/// when unbiased (TRL divides by zero: inf or NaN).
pub fn masked_var(values: &Tensor, mask: &Tensor, unbiased: bool) -> Result<Tensor> {
    let mean = masked_mean(values, mask, None)?;
    let centered = values.f_sub(&mean)?;
    let variance = masked_mean(&centered.f_square()?, mask, None)?;
    if !unbiased {
        return Ok(variance);
    }
    let mask_sum = mask.f_sum(None::<tch::Kind>)?;
    let n = mask_sum.f_double_value(&[])?;
    if n <= 1.0 {
        return Err(RlError::EmptyMask {
            what: "mask".into(),
            count: n as i64,
            why: "an unbiased variance needs at least 2 elements (TRL: increase mini_batch_size or gradient_accumulation_steps)".into(),
        });
    }
    let bessel = mask_sum.f_div(&mask_sum.f_sub(&number_like(1.0, &mask_sum)?)?)?;
    Ok(variance.f_mul(&bessel)?)
}

/// `values` whitened where `mask` is set, as TRL's `masked_whiten`: `(values - mean) *
/// rsqrt(var + 1e-8)` with the masked mean and unbiased masked variance, plus the mean again when
/// `shift_mean` is false. Every position is transformed; masked ones are left to the caller.
pub fn masked_whiten(values: &Tensor, mask: &Tensor, shift_mean: bool) -> Result<Tensor> {
    let mean = masked_mean(values, mask, None)?;
    let var = masked_var(values, mask, true)?;
    let scale = var.f_add(&number_like(1e-8, &var)?)?.f_rsqrt()?;
    let whitened = values.f_sub(&mean)?.f_mul(&scale)?;
    if shift_mean {
        Ok(whitened)
    } else {
        Ok(whitened.f_add(&mean)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn statistics_over_the_mask() {
        let v = Tensor::from_slice2(&[[1.0f32, 2.0, 100.0], [3.0, 4.0, -50.0]]);
        let m = Tensor::from_slice2(&[[true, true, false], [true, true, false]]);
        assert!((masked_mean(&v, &m, None).unwrap().double_value(&[]) - 2.5).abs() < 1e-6);
        let rows = masked_mean(&v, &m, Some(1)).unwrap();
        assert_eq!(Vec::<f32>::try_from(rows).unwrap(), vec![1.5, 3.5]);
        // Values 1..4: population variance 1.25, unbiased 5/3.
        assert!((masked_var(&v, &m, false).unwrap().double_value(&[]) - 1.25).abs() < 1e-6);
        assert!((masked_var(&v, &m, true).unwrap().double_value(&[]) - 5.0 / 3.0).abs() < 1e-6);
        let w = masked_whiten(&v, &m, true).unwrap();
        let kept = w.masked_select(&m);
        assert!(kept.mean(Kind::Float).double_value(&[]).abs() < 1e-6);
        assert!((kept.var(true).double_value(&[]) - 1.0).abs() < 1e-5);
        let shifted = masked_whiten(&v, &m, false).unwrap();
        assert!((shifted.masked_select(&m).mean(Kind::Float).double_value(&[]) - 2.5).abs() < 1e-5);
    }

    #[test]
    fn undefined_statistics_are_errors() {
        let v = Tensor::from_slice2(&[[1.0f32, 2.0], [3.0, 4.0]]);
        let none = Tensor::from_slice2(&[[false, false], [false, false]]);
        assert!(matches!(masked_mean(&v, &none, None), Err(RlError::EmptyMask { .. })));
        let one_row = Tensor::from_slice2(&[[true, false], [false, false]]);
        assert!(masked_mean(&v, &one_row, None).is_ok());
        assert!(matches!(
            masked_mean(&v, &one_row, Some(1)),
            Err(RlError::EmptyMask { .. })
        ));
        assert!(matches!(
            masked_var(&v, &one_row, true),
            Err(RlError::EmptyMask { count: 1, .. })
        ));
        assert!(masked_var(&v, &one_row, false).is_ok());
        assert!(matches!(masked_whiten(&v, &none, true), Err(RlError::EmptyMask { .. })));
        let wrong = Tensor::from_slice(&[true, true]);
        assert!(matches!(masked_mean(&v, &wrong, None), Err(RlError::Shape { .. })));
    }
}

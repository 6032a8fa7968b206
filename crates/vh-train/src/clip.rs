//! Gradient-norm clipping as `torch.nn.utils.clip_grad_norm_`.
//!
//! libtorch's C++ `clip_grad_norm_` is not in tch's C API, so this is PyTorch's Python function
//! (`get_total_norm` then `clip_grads_with_norm_`) composed of the same libtorch kernels in the
//! same order: one 2-norm per gradient (grouped by device and dtype, in order of first
//! appearance, as PyTorch groups them), the 2-norm of their stack, `reciprocal(norm + 1e-6) *
//! max_norm` (what Python's `max_norm / tensor` computes), clamped at 1, multiplied into every
//! gradient in place. No value is read back to the host.

use crate::error::{Result, TrainError};
use crate::number_like;
use tch::{Device, Kind, Tensor};

/// The gradients (defined ones only) of `params`.
fn grads<'a>(params: impl IntoIterator<Item = &'a Tensor>) -> Result<Vec<Tensor>> {
    let mut out = Vec::new();
    for p in params {
        let g = p.f_grad()?;
        if g.defined() {
            out.push(g);
        }
    }
    Ok(out)
}

/// The 2-norm of all gradients of `params` together, as if concatenated (PyTorch's
/// `get_total_norm` over the gradients), as a 0-dim tensor; 0 when no parameter has a gradient.
pub fn total_grad_norm<'a>(params: impl IntoIterator<Item = &'a Tensor>) -> Result<Tensor> {
    total_norm(&grads(params)?)
}

fn total_norm(grads: &[Tensor]) -> Result<Tensor> {
    if grads.is_empty() {
        return Ok(Tensor::f_from_slice(&[0f32])?.f_reshape([] as [i64; 0])?);
    }
    let first_device = grads[0].device();
    let mut groups: Vec<((Device, Kind), Vec<&Tensor>)> = Vec::new();
    for g in grads {
        let key = (g.device(), g.kind());
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(g),
            None => groups.push((key, vec![g])),
        }
    }
    let mut norms = Vec::with_capacity(grads.len());
    for (_, members) in &groups {
        for g in members {
            norms.push(g.f_norm()?.f_to_device(first_device)?);
        }
    }
    Ok(Tensor::f_stack(&norms, 0)?.f_norm()?)
}

/// Scales the gradients of `params` so that their total 2-norm is at most `max_norm`, in place,
/// and returns the total norm before clipping (a 0-dim tensor), as
/// `torch.nn.utils.clip_grad_norm_(params, max_norm)`. As there, a non-finite norm is returned,
/// not refused (the gradients then become NaN): check it with [`crate::check_finite`] before
/// stepping. A negative or non-finite `max_norm` is an error.
pub fn clip_grad_norm<'a>(params: impl IntoIterator<Item = &'a Tensor>, max_norm: f64) -> Result<Tensor> {
    if !(max_norm.is_finite() && max_norm >= 0.0) {
        return Err(TrainError::InvalidArgument(format!(
            "max_norm must be finite and >= 0, got {max_norm}"
        )));
    }
    let mut grads = grads(params)?;
    let norm = total_norm(&grads)?;
    if grads.is_empty() {
        return Ok(norm);
    }
    // In the norm's kind, as PyTorch computes a 0-dim tensor with Python numbers.
    let coef = norm
        .f_add(&number_like(1e-6, &norm)?)?
        .f_reciprocal()?
        .f_mul(&number_like(max_norm, &norm)?)?
        .f_minimum(&number_like(1.0, &norm)?)?;
    tch::no_grad(|| -> Result<()> {
        for g in grads.iter_mut() {
            let c = coef.f_to_device(g.device())?;
            let _ = g.f_mul_(&c)?;
        }
        Ok(())
    })?;
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_grad(values: &[f32], grad: &[f32]) -> Tensor {
        let p = Tensor::from_slice(values).set_requires_grad(true);
        (&p * Tensor::from_slice(grad)).sum(Kind::Float).backward();
        p
    }

    #[test]
    fn returns_the_total_norm_and_clips_only_above_max() {
        let a = with_grad(&[0.0, 0.0], &[3.0, 0.0]);
        let b = with_grad(&[0.0], &[4.0]);
        let norm = clip_grad_norm([&a, &b], 1.0).unwrap();
        assert!((norm.double_value(&[]) - 5.0).abs() < 1e-6);
        let ga = Vec::<f32>::try_from(a.grad()).unwrap();
        let gb = Vec::<f32>::try_from(b.grad()).unwrap();
        assert!(
            (ga[0] - 0.6).abs() < 1e-6 && (gb[0] - 0.8).abs() < 1e-6,
            "{ga:?} {gb:?}"
        );
        // Below the maximum the gradients keep their values; the norm is still returned.
        let norm = clip_grad_norm([&a, &b], 10.0).unwrap();
        assert!((norm.double_value(&[]) - 1.0).abs() < 1e-5);
        assert!((Vec::<f32>::try_from(a.grad()).unwrap()[0] - 0.6).abs() < 1e-6);
        // No gradients: norm 0, nothing to do.
        let c = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        assert_eq!(clip_grad_norm([&c], 1.0).unwrap().double_value(&[]), 0.0);
        assert!(clip_grad_norm([&c], -1.0).is_err());
        assert!(clip_grad_norm([&c], f64::NAN).is_err());
    }

    #[test]
    fn a_non_finite_gradient_gives_a_non_finite_norm() {
        let a = with_grad(&[0.0], &[f32::NAN]);
        let norm = total_grad_norm([&a]).unwrap();
        assert!(norm.double_value(&[]).is_nan());
        assert!(matches!(
            crate::check_finite("gradient norm", &norm),
            Err(TrainError::NonFinite { .. })
        ));
    }
}

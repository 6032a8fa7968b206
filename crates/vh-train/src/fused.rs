//! libtorch's fused AdamW kernel, `at::_fused_adamw_`: what `torch.optim.AdamW(fused=True)`
//! runs, and so what HF's Trainer (`optim="adamw_torch_fused"`, its default from torch 2.8 on)
//! and TRL's trainers step with. One pass over each parameter and its moments instead of the
//! single-tensor path's chain of elementwise operations (GPT-2-small on the 2-core CPU: about
//! 80 ms per step against 515 ms). tch binds no such operator; a small C++ shim
//! (csrc/fused_adamw.cpp) calls it.

use crate::error::{Result, TrainError};
use tch::{Kind, Tensor};

/// The hyper-parameters of one fused step (one parameter group).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusedAdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Added to the denominator.
    pub eps: f64,
}

/// Whether this build carries the shim (it needs libtorch's headers at build time).
pub fn fused_adamw_available() -> bool {
    cfg!(vh_fused_adamw)
}

/// The dimension order in which `t`'s memory is contiguous (its strides, largest first), when
/// `t` covers its memory densely without overlap; `None` otherwise.
fn dense_order(t: &Tensor) -> Option<Vec<i64>> {
    let (size, stride) = (t.size(), t.stride());
    let mut order: Vec<usize> = (0..size.len()).collect();
    // Size-1 dimensions may carry any stride; they go last, where they are contiguous.
    order.sort_by_key(|&d| (size[d] == 1, std::cmp::Reverse(stride[d])));
    let mut expected = 1i64;
    for &d in order.iter().rev() {
        if size[d] != 1 && stride[d] != expected {
            return None;
        }
        expected *= size[d];
    }
    Some(order.into_iter().map(|d| d as i64).collect())
}

/// One AdamW update of `params` in place, as `torch._fused_adamw_`: moments `exp_avgs` and
/// `exp_avg_sqs` are updated in place, `state_steps` (f32 scalars, the step count each parameter
/// has reached, already incremented for this step as torch.optim does before the call) are read.
/// Every list has one entry per parameter; each parameter, its gradient and moments share shape,
/// kind and device. Checked here, once, before the kernel runs.
///
/// A parameter may be stored in any dense memory order (GPT-2's Conv1D weights are [out, in]
/// in memory on CPU); its moments must then be laid out as it is (`zeros_like` does that), and a
/// gradient laid out otherwise is read through a copy in the parameter's order. The kernel
/// itself gets contiguous views of the same memory: libtorch's CPU kernel copies a
/// non-contiguous parameter and its state out and back (3.5x slower on GPT-2-small's blocks),
/// and the update is elementwise, so the result is the same.
pub fn fused_adamw_(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    state_steps: &[Tensor],
    step: FusedAdamWStep,
) -> Result<()> {
    let n = params.len();
    for (name, list) in [
        ("grads", grads.len()),
        ("exp_avgs", exp_avgs.len()),
        ("exp_avg_sqs", exp_avg_sqs.len()),
        ("state_steps", state_steps.len()),
    ] {
        if list != n {
            return Err(TrainError::InvalidArgument(format!(
                "fused AdamW: {n} parameters but {list} {name}"
            )));
        }
    }
    for (i, p) in params.iter().enumerate() {
        for (name, t) in [
            ("grad", &grads[i]),
            ("exp_avg", &exp_avgs[i]),
            ("exp_avg_sq", &exp_avg_sqs[i]),
        ] {
            if !t.defined() {
                return Err(TrainError::InvalidArgument(format!(
                    "fused AdamW: parameter {i} has no {name}"
                )));
            }
            crate::error::same_shape(("param", p), (name, t))?;
            if t.kind() != p.kind() || t.device() != p.device() {
                return Err(TrainError::InvalidArgument(format!(
                    "fused AdamW: parameter {i} is {:?} on {:?} but its {name} is {:?} on {:?}",
                    p.kind(),
                    p.device(),
                    t.kind(),
                    t.device()
                )));
            }
        }
        if !matches!(p.kind(), Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16) {
            return Err(TrainError::InvalidArgument(format!(
                "fused AdamW: parameter {i} is {:?}; the kernel takes floating-point parameters",
                p.kind()
            )));
        }
        let s = &state_steps[i];
        if s.numel() != 1 || s.kind() != Kind::Float {
            return Err(TrainError::InvalidArgument(format!(
                "fused AdamW: state_steps[{i}] must be one f32 number (torch's fused step count)"
            )));
        }
    }
    for (name, v) in [("lr", step.lr), ("eps", step.eps), ("weight_decay", step.weight_decay)] {
        if !v.is_finite() || v < 0.0 {
            return Err(TrainError::InvalidArgument(format!("fused AdamW: {name} = {v}")));
        }
    }
    for (name, v) in [("beta1", step.beta1), ("beta2", step.beta2)] {
        if !(0.0..1.0).contains(&v) {
            return Err(TrainError::InvalidArgument(format!(
                "fused AdamW: {name} = {v} is outside [0, 1)"
            )));
        }
    }
    if n == 0 {
        return Ok(());
    }
    let (mut p_views, mut g_views, mut m_views, mut v_views) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (i, p) in params.iter().enumerate() {
        let order = dense_order(p).ok_or_else(|| {
            TrainError::InvalidArgument(format!(
                "fused AdamW: parameter {i} (size {:?}, strides {:?}) does not cover its memory densely",
                p.size(),
                p.stride()
            ))
        })?;
        for (name, t) in [("exp_avg", &exp_avgs[i]), ("exp_avg_sq", &exp_avg_sqs[i])] {
            if t.stride() != p.stride() {
                return Err(TrainError::InvalidArgument(format!(
                    "fused AdamW: parameter {i} has strides {:?} but its {name} {:?}; create the moments with zeros_like(param)",
                    p.stride(),
                    t.stride()
                )));
            }
        }
        let g = &grads[i];
        let g = if g.stride() == p.stride() {
            g.shallow_clone()
        } else {
            let mut laid = p.f_empty_like()?;
            tch::no_grad(|| laid.f_copy_(g))?;
            laid
        };
        let view = |t: &Tensor| t.f_permute(order.as_slice());
        p_views.push(view(p)?);
        g_views.push(view(&g)?);
        m_views.push(view(&exp_avgs[i])?);
        v_views.push(view(&exp_avg_sqs[i])?);
    }
    let (params, grads, exp_avgs, exp_avg_sqs) = (&p_views[..], &g_views[..], &m_views[..], &v_views[..]);
    #[cfg(not(vh_fused_adamw))]
    {
        let _ = (params, grads, exp_avgs, exp_avg_sqs, state_steps, step);
        Err(TrainError::InvalidArgument(
            "fused AdamW is unavailable: this build had no libtorch headers (set LIBTORCH when building)".into(),
        ))
    }
    #[cfg(vh_fused_adamw)]
    {
        use std::ffi::{c_char, c_int, c_void, CStr};
        extern "C" {
            fn vh_fused_adamw(
                params: *const *mut c_void,
                grads: *const *mut c_void,
                exp_avgs: *const *mut c_void,
                exp_avg_sqs: *const *mut c_void,
                state_steps: *const *mut c_void,
                n: usize,
                lr: f64,
                beta1: f64,
                beta2: f64,
                weight_decay: f64,
                eps: f64,
                err: *mut c_char,
                len: usize,
            ) -> c_int;
        }
        // tch's handles are `torch::Tensor*`; the shim copies them (reference counts) before use.
        let handles = |ts: &[Tensor]| ts.iter().map(|t| t.as_ptr() as *mut c_void).collect::<Vec<_>>();
        let (p, g, m, v, s) = (
            handles(params),
            handles(grads),
            handles(exp_avgs),
            handles(exp_avg_sqs),
            handles(state_steps),
        );
        let mut err = vec![0 as c_char; 1024];
        // SAFETY: every pointer is a live tch tensor handle borrowed for the duration of the call,
        // all lists have `params.len()` entries (checked above), and `err` has `err.len()` bytes.
        let rc = unsafe {
            vh_fused_adamw(
                p.as_ptr(),
                g.as_ptr(),
                m.as_ptr(),
                v.as_ptr(),
                s.as_ptr(),
                params.len(),
                step.lr,
                step.beta1,
                step.beta2,
                step.weight_decay,
                step.eps,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc != 0 {
            // SAFETY: the shim writes a NUL-terminated message within `err`.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
            return Err(TrainError::Torch(tch::TchError::Torch(msg)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Parameters, gradients, zero moments and step counts of 1 (a first step), and settings.
    struct Fixture {
        params: Vec<Tensor>,
        grads: Vec<Tensor>,
        m: Vec<Tensor>,
        v: Vec<Tensor>,
        steps: Vec<Tensor>,
        hp: FusedAdamWStep,
    }

    fn fixture(seed: i64, weight_decay: f64) -> Fixture {
        tch::manual_seed(seed);
        let params = vec![
            Tensor::randn([7, 5], (Kind::Float, Device::Cpu)),
            Tensor::randn([13], (Kind::Float, Device::Cpu)),
        ];
        let zeros = || params.iter().map(|p| p.zeros_like()).collect::<Vec<_>>();
        Fixture {
            grads: params.iter().map(|p| p.randn_like() * 1e-2).collect(),
            m: zeros(),
            v: zeros(),
            steps: params.iter().map(|_| Tensor::from(1.0f32)).collect(),
            hp: FusedAdamWStep {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                weight_decay,
                eps: 1e-8,
            },
            params,
        }
    }

    #[test]
    fn fused_step_follows_the_adamw_formula() {
        assert!(fused_adamw_available(), "the shim is built wherever LIBTORCH is set");
        let Fixture {
            params,
            grads,
            m,
            v,
            steps,
            hp,
        } = fixture(3, 0.1);
        let before: Vec<Tensor> = params.iter().map(|p| p.copy()).collect();
        fused_adamw_(&params, &grads, &m, &v, &steps, hp).unwrap();
        for i in 0..params.len() {
            // Step 1 from zero moments: m = 0.1 g, v = 0.001 g^2, m_hat / sqrt(v_hat) = g / |g|.
            let g = &grads[i];
            let decayed = &before[i] * (1.0 - hp.lr * hp.weight_decay);
            let expected = decayed - hp.lr * (g / (g.abs() + hp.eps));
            let err = (&params[i] - &expected).abs().max().double_value(&[]);
            assert!(err < 1e-6, "parameter {i}: {err}");
            assert!((&m[i] - g * 0.1).abs().max().double_value(&[]) < 1e-9);
        }
    }

    #[test]
    fn any_dense_memory_order_gives_the_contiguous_result() {
        let Fixture {
            params,
            grads,
            m,
            v,
            steps,
            hp,
        } = fixture(5, 0.1);
        let transposed = |t: &Tensor| t.tr().contiguous().tr();
        // The contiguous run, then the same numbers with the matrix stored [cols, rows].
        let contiguous: Vec<Tensor> = params.iter().map(|p| p.copy()).collect();
        let (cm, cv) = (
            m.iter().map(|t| t.copy()).collect::<Vec<_>>(),
            v.iter().map(|t| t.copy()).collect::<Vec<_>>(),
        );
        fused_adamw_(&contiguous, &grads, &cm, &cv, &steps, hp).unwrap();
        let laid = vec![transposed(&params[0]), params[1].copy()];
        let (lm, lv) = (
            vec![laid[0].zeros_like(), m[1].copy()],
            vec![laid[0].zeros_like(), v[1].copy()],
        );
        assert_eq!(lm[0].stride(), laid[0].stride(), "zeros_like keeps the order");
        // Gradient 0 stays contiguous: it is read through a copy in the parameter's order.
        fused_adamw_(&laid, &grads, &lm, &lv, &steps, hp).unwrap();
        assert_eq!(laid[0].stride(), vec![1, 7], "updated in place, order kept");
        for i in 0..2 {
            assert!(laid[i].equal(&contiguous[i]), "parameter {i}");
            assert!(lm[i].equal(&cm[i]) && lv[i].equal(&cv[i]), "moments {i}");
        }
        // Moments in another order than their parameter cannot be updated in place.
        let contiguous_m = vec![m[0].copy(), m[1].copy()];
        let err = fused_adamw_(&laid, &grads, &contiguous_m, &lv, &steps, hp).unwrap_err();
        assert!(err.to_string().contains("zeros_like"), "{err}");
        // Overlapping memory (an expanded tensor) is refused.
        let expanded = vec![
            Tensor::ones([1, 5], (Kind::Float, Device::Cpu)).expand([7, 5], false),
            params[1].copy(),
        ];
        assert!(fused_adamw_(&expanded, &grads, &m, &v, &steps, hp).is_err());
    }

    #[test]
    fn mismatched_lists_and_bad_settings_are_typed_errors() {
        let Fixture {
            params,
            grads,
            m,
            v,
            steps,
            hp,
        } = fixture(4, 0.0);
        assert!(fused_adamw_(&params, &grads[..1], &m, &v, &steps, hp).is_err());
        let wrong = vec![params[1].zeros_like(), params[0].zeros_like()];
        assert!(matches!(
            fused_adamw_(&params, &grads, &wrong, &v, &steps, hp),
            Err(TrainError::Shape { .. })
        ));
        let f64_steps: Vec<Tensor> = params.iter().map(|_| Tensor::from(1.0f64)).collect();
        assert!(fused_adamw_(&params, &grads, &m, &v, &f64_steps, hp).is_err());
        assert!(fused_adamw_(&params, &grads, &m, &v, &steps, FusedAdamWStep { beta1: 1.0, ..hp }).is_err());
        assert!(fused_adamw_(&params, &grads, &m, &v, &steps, FusedAdamWStep { lr: f64::NAN, ..hp }).is_err());
        let undefined = vec![Tensor::new(), grads[1].shallow_clone()];
        assert!(fused_adamw_(&params, &undefined, &m, &v, &steps, hp).is_err());
    }
}

//! AdamW whose state the trainer can save and restore.
//!
//! `vh_train::AdamW` steps libtorch's C++ optimiser, whose moment estimates tch does not expose,
//! so a checkpoint could not carry them and a resumed run would restart Adam from zero. This one
//! keeps the moments as tensors it owns and applies `torch.optim.AdamW`'s single-tensor update
//! (the CPU default) with the same operations; a test holds it to `vh_train::AdamW` over several
//! steps. Parameters are grouped as HF's Trainer groups them (`vh_train::hf_no_decay`).

use crate::error::{PpoError, Result};
use std::path::Path;
use tch::{Kind, Tensor};

/// AdamW's hyper-parameters (learning rate set per step by the schedule).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWSettings {
    /// (beta1, beta2).
    pub betas: (f64, f64),
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay for the decay group.
    pub weight_decay: f64,
    /// Step with libtorch's fused kernel (`torch.optim.AdamW(fused=True)`) instead of the
    /// single-tensor operations.
    pub fused: bool,
}

/// One parameter's optimiser state.
#[derive(Debug)]
struct Slot {
    name: String,
    param: Tensor,
    decay: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW with state that can be saved ([`StatefulAdamW::save`]) and restored.
#[derive(Debug)]
pub struct StatefulAdamW {
    slots: Vec<Slot>,
    settings: AdamWSettings,
    step: u64,
    /// The step count as the fused kernel reads it: an f32 number on the parameters' device
    /// (torch keeps one per parameter, all equal; one shared tensor gives the same numbers).
    state_step: Tensor,
    /// libtorch's optimiser over the same parameters, never stepped: its `zero_grad` is the one
    /// call through tch that drops gradients (set to none), which tch's `Tensor::zero_grad`
    /// (fill with 0) cannot.
    releaser: tch::COptimizer,
}

impl StatefulAdamW {
    /// AdamW over the trainable parameters of `vs`, biases and norm weights without decay.
    pub fn hf(vs: &tch::nn::VarStore, settings: AdamWSettings) -> Result<Self> {
        let params = vh_train::named_parameters(vs);
        if params.is_empty() {
            return Err(vh_train::TrainError::NoParameters.into());
        }
        let slots = params
            .into_iter()
            .map(|(name, param)| -> Result<Slot> {
                let decay = !vh_train::hf_no_decay(&name);
                Ok(Slot {
                    exp_avg: param.f_zeros_like()?,
                    exp_avg_sq: param.f_zeros_like()?,
                    name,
                    param,
                    decay,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut releaser = tch::COptimizer::sgd(0.0, 0.0, 0.0, 0.0, false)?;
        for s in &slots {
            releaser.add_parameters(&s.param, 0)?;
        }
        let state_step = Tensor::f_zeros([], (Kind::Float, vs.device()))?;
        Ok(Self {
            slots,
            settings,
            step: 0,
            state_step,
            releaser,
        })
    }

    /// The parameters, in order.
    pub fn parameters(&self) -> impl Iterator<Item = &Tensor> {
        self.slots.iter().map(|s| &s.param)
    }

    /// Optimiser steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Drops every gradient (set to none, PyTorch's default `zero_grad`): the next backward hands
    /// its gradient tensors over instead of adding them into zeroed buffers, which would cost a
    /// fill and an addition over every parameter per update.
    pub fn zero_grad(&mut self) -> Result<()> {
        Ok(self.releaser.zero_grad()?)
    }

    /// One update at learning rate `lr` from the current gradients, as `torch.optim.AdamW`:
    /// `p *= 1 - lr * wd`, moments updated, bias-corrected step. Parameters without a gradient
    /// are skipped (their moments too), as in PyTorch, but the step count is shared, which is
    /// exact here since every trainable parameter receives a gradient in each PPO update.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.step += 1;
        if self.settings.fused {
            return self.fused_step(lr);
        }
        let (b1, b2) = self.settings.betas;
        let t = self.step as f64;
        let bias_correction1 = 1.0 - b1.powf(t);
        let bias_correction2_sqrt = (1.0 - b2.powf(t)).sqrt();
        let step_size = lr / bias_correction1;
        tch::no_grad(|| -> Result<()> {
            for s in &mut self.slots {
                let grad = s.param.grad();
                if !grad.defined() {
                    continue;
                }
                if s.decay && self.settings.weight_decay != 0.0 {
                    let _ = s.param.f_mul_scalar_(1.0 - lr * self.settings.weight_decay)?;
                }
                // The operations of torch.optim.AdamW's single-tensor path (the CPU default) in
                // its rounding order: libtorch's addcmul/addcdiv compute `self + (value * t1) op
                // t2`, and tch binds them without `value`, so `value * t1` is formed first (one
                // temporary each, where a spelled-out update would allocate five more).
                let _ = s.exp_avg.f_lerp_(&grad, 1.0 - b1)?;
                let _ = s.exp_avg_sq.f_mul_scalar_(b2)?;
                let _ = s.exp_avg_sq.f_addcmul_(&grad.f_mul_scalar(1.0 - b2)?, &grad)?;
                let mut denom = s.exp_avg_sq.f_sqrt()?;
                let _ = denom.f_div_scalar_(bias_correction2_sqrt)?;
                let _ = denom.f_add_scalar_(self.settings.eps)?;
                let _ = s.param.f_addcdiv_(&s.exp_avg.f_mul_scalar(-step_size)?, &denom)?;
            }
            Ok(())
        })
    }

    /// The step through libtorch's fused kernel, one call per parameter group (decay, no decay)
    /// as `torch.optim.AdamW(fused=True)` over HF's two groups; parameters without a gradient
    /// are left out, as torch leaves them out.
    fn fused_step(&mut self, lr: f64) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            // torch.optim increments its step tensors before the call; the count is exact in f32
            // far beyond any run's length (2^24 steps).
            let _ = self.state_step.f_fill_(self.step as f64)?;
            for decay in [true, false] {
                let (mut params, mut grads, mut m, mut v) = (vec![], vec![], vec![], vec![]);
                for s in self.slots.iter().filter(|s| s.decay == decay) {
                    let grad = s.param.grad();
                    if !grad.defined() {
                        continue;
                    }
                    params.push(s.param.shallow_clone());
                    grads.push(grad);
                    m.push(s.exp_avg.shallow_clone());
                    v.push(s.exp_avg_sq.shallow_clone());
                }
                let steps: Vec<Tensor> = params.iter().map(|_| self.state_step.shallow_clone()).collect();
                let hp = vh_train::FusedAdamWStep {
                    lr,
                    beta1: self.settings.betas.0,
                    beta2: self.settings.betas.1,
                    weight_decay: if decay { self.settings.weight_decay } else { 0.0 },
                    eps: self.settings.eps,
                };
                vh_train::fused_adamw_(&params, &grads, &m, &v, &steps, hp)?;
            }
            Ok(())
        })
    }

    /// Writes the moments to `path` (safetensors, `exp_avg.<name>` / `exp_avg_sq.<name>`) and
    /// returns the step count, which the caller stores with the rest of its state.
    pub fn save(&self, path: &Path) -> Result<u64> {
        let mut named: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.slots.len());
        // Moments share their parameter's memory order (GPT-2's Conv1D weights are [out, in] in
        // memory on CPU); the file holds them row-major, as torch.save's would.
        for s in &self.slots {
            named.push((format!("exp_avg.{}", s.name), s.exp_avg.f_contiguous()?));
            named.push((format!("exp_avg_sq.{}", s.name), s.exp_avg_sq.f_contiguous()?));
        }
        Tensor::write_safetensors(&named, path)?;
        Ok(self.step)
    }

    /// Restores moments saved by [`StatefulAdamW::save`] for the same parameters, and the step
    /// count; a missing or misshapen tensor is an error.
    pub fn load(&mut self, path: &Path, step: u64) -> Result<()> {
        let tensors: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(path)?.into_iter().collect();
        tch::no_grad(|| -> Result<()> {
            for s in &mut self.slots {
                for (prefix, dst) in [("exp_avg", &mut s.exp_avg), ("exp_avg_sq", &mut s.exp_avg_sq)] {
                    let key = format!("{prefix}.{}", s.name);
                    let src = tensors.get(&key).ok_or_else(|| {
                        PpoError::Input(format!("{}: the optimiser state has no `{key}`", path.display()))
                    })?;
                    if src.size() != dst.size() || src.kind() != Kind::Float && dst.kind() == Kind::Float {
                        return Err(PpoError::Input(format!(
                            "{}: `{key}` is {:?} {:?}, the parameter {:?} {:?}",
                            path.display(),
                            src.kind(),
                            src.size(),
                            dst.kind(),
                            dst.size()
                        )));
                    }
                    dst.f_copy_(src)?;
                }
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three steps with weight decay on two groups land where libtorch's AdamW (through
    /// `vh_train::AdamW`, at parity with `torch.optim.AdamW`) lands.
    #[test]
    fn matches_libtorchs_adamw() {
        let make = || {
            let vs = tch::nn::VarStore::new(tch::Device::Cpu);
            let layer = vs.root() / "layer";
            let w = layer.var("weight", &[4, 3], tch::nn::Init::Randn { mean: 0.0, stdev: 1.0 });
            let b = layer.var("bias", &[4], tch::nn::Init::Randn { mean: 0.0, stdev: 1.0 });
            (vs, w, b)
        };
        tch::manual_seed(3);
        let (vs1, w1, b1) = make();
        tch::manual_seed(3);
        let (vs2, w2, b2) = make();
        let settings = AdamWSettings {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.1,
            fused: false,
        };
        let mut ours = StatefulAdamW::hf(&vs1, settings).unwrap();
        let mut theirs = vh_train::AdamW::hf(
            &vs2,
            vh_train::AdamWConfig {
                lr: 1e-2,
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.1,
                amsgrad: false,
            },
        )
        .unwrap();
        let x = Tensor::randn([5, 3], (Kind::Float, tch::Device::Cpu));
        for step in 0..3 {
            let lr = 1e-2 * (1.0 - step as f64 / 4.0);
            theirs.set_lr(lr).unwrap();
            for (w, b) in [(&w1, &b1), (&w2, &b2)] {
                let y = x.matmul(&w.tr()) + b;
                y.square().sum(Kind::Float).backward();
            }
            ours.step(lr).unwrap();
            theirs.step().unwrap();
            ours.zero_grad().unwrap();
            theirs.zero_grad().unwrap();
            assert!(!w1.grad().defined(), "zero_grad sets gradients to none");
        }
        for (a, b) in [(&w1, &w2), (&b1, &b2)] {
            let diff = (a - b).abs().max().double_value(&[]);
            let scale = b.abs().max().double_value(&[]);
            assert!(diff <= 1e-6 * scale, "max difference {diff} (scale {scale})");
        }
        assert_ne!(w1.double_value(&[0, 0]), 0.0);
    }

    /// The fused kernel (TRL's default) and the single-tensor path land on the same parameters
    /// within rounding over three steps with decay on one group, and both leave gradients unset.
    #[test]
    fn fused_and_single_tensor_paths_agree() {
        // Fixed values rather than the global generator, which the other test seeds meanwhile.
        let values = |n: i64, shift: f64| {
            Tensor::arange(n, (Kind::Float, tch::Device::Cpu))
                .f_mul_scalar(0.37)
                .unwrap()
                .f_add_scalar(shift)
                .unwrap()
                .sin()
        };
        let make = || {
            let vs = tch::nn::VarStore::new(tch::Device::Cpu);
            let layer = vs.root() / "layer";
            let w = layer.var_copy("weight", &values(30, 0.1).view([6, 5]));
            let b = layer.var_copy("bias", &values(6, 2.0));
            (vs, w, b)
        };
        let (vs1, w1, b1) = make();
        let (vs2, w2, b2) = make();
        let settings = AdamWSettings {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.1,
            fused: true,
        };
        let mut fused = StatefulAdamW::hf(&vs1, settings).unwrap();
        let mut single = StatefulAdamW::hf(
            &vs2,
            AdamWSettings {
                fused: false,
                ..settings
            },
        )
        .unwrap();
        let x = values(35, 5.0).view([7, 5]);
        for step in 0..3 {
            let lr = 1e-2 * (1.0 - step as f64 / 4.0);
            for (w, b) in [(&w1, &b1), (&w2, &b2)] {
                (x.matmul(&w.tr()) + b).square().sum(Kind::Float).backward();
            }
            fused.step(lr).unwrap();
            single.step(lr).unwrap();
            fused.zero_grad().unwrap();
            single.zero_grad().unwrap();
        }
        assert_eq!(fused.steps(), 3);
        for (a, b) in [(&w1, &w2), (&b1, &b2)] {
            let diff = (a - b).abs().max().double_value(&[]);
            let scale = b.abs().max().double_value(&[]);
            assert!(diff <= 1e-6 * scale, "max difference {diff} (scale {scale})");
        }
        // The weights moved: an optimiser that did nothing would agree with itself too.
        let (_vs3, w3, _b3) = make();
        assert!((&w1 - &w3).abs().max().double_value(&[]) > 1e-3);
    }
}

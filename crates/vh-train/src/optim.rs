//! AdamW through libtorch's own implementation, with HF Trainer's two parameter groups.
//!
//! tch's `nn::AdamW` builds a libtorch `torch::optim::AdamW` over a `VarStore`, but it can only
//! put parameters in the group their `nn::Path` was given when the model created them (ours are
//! all created in group 0, and the split HF wants is known only afterwards); it hides the
//! optimiser's parameter list, and its `step`, `zero_grad` and `clip_grad_norm` panic on libtorch
//! errors. tch also exposes the object it wraps, [`tch::COptimizer`]: the same libtorch AdamW,
//! with `add_parameters(tensor, group)`, per-group weight decay and learning rate, and fallible
//! calls. [`AdamW`] uses that: the update rule is libtorch's, only the grouping is ours.

use crate::error::{Result, TrainError};
use tch::{COptimizer, Tensor};

/// AdamW's hyper-parameters; the defaults are `torch.optim.AdamW`'s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate (default 1e-3); a schedule sets it per step.
    pub lr: f64,
    /// Coefficients of the running averages of the gradient and its square (default (0.9, 0.999)).
    pub betas: (f64, f64),
    /// Added to the denominator for stability (default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay of the decay group (default 1e-2); the no-decay group gets 0.
    pub weight_decay: f64,
    /// The AMSGrad variant (default false).
    pub amsgrad: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
            amsgrad: false,
        }
    }
}

impl AdamWConfig {
    /// Checks the ranges `torch.optim.AdamW` checks.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(TrainError::InvalidArgument(msg));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!("learning rate must be finite and >= 0, got {}", self.lr));
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad(format!("eps must be finite and >= 0, got {}", self.eps));
        }
        for (i, beta) in [self.betas.0, self.betas.1].into_iter().enumerate() {
            if !(0.0..1.0).contains(&beta) {
                return bad(format!("betas[{i}] must be in [0, 1), got {beta}"));
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight_decay must be finite and >= 0, got {}",
                self.weight_decay
            ));
        }
        Ok(())
    }
}

/// Module names of the `nn.LayerNorm` layers in the architectures of this workspace (GPT-2's
/// `ln_1`, `ln_2`, `ln_f`): HF exempts their parameters from weight decay by module type, which a
/// parameter name alone cannot show.
pub const LAYER_NORM_MODULES: &[&str] = &["ln_1", "ln_2", "ln_f"];

/// Whether HF's Trainer (`get_decay_parameter_names`, transformers 4.57) exempts the parameter
/// `name` from weight decay: parameters of `nn.LayerNorm` modules ([`LAYER_NORM_MODULES`]), and
/// every name whose lowercase form matches one of its patterns `bias`, `layernorm`, `rmsnorm`,
/// `(?:^|\.)norm(?:$|\.)` or `_norm(?:$|\.)`. So biases, every norm's weight, and T5's
/// `relative_attention_bias` tables (their name contains "bias") are not decayed.
pub fn hf_no_decay(name: &str) -> bool {
    let lower = name.to_lowercase();
    if ["bias", "layernorm", "rmsnorm"].iter().any(|p| lower.contains(p)) {
        return true;
    }
    let segments: Vec<&str> = lower.split('.').collect();
    // `(?:^|\.)norm(?:$|\.)` is a segment equal to "norm"; `_norm(?:$|\.)` one ending in "_norm".
    if segments.iter().any(|s| *s == "norm" || s.ends_with("_norm")) {
        return true;
    }
    segments.len() >= 2 && LAYER_NORM_MODULES.contains(&segments[segments.len() - 2])
}

/// The trainable parameters of a var store under their names (HF's, for our models), sorted by
/// name; each shared tensor (tied embeddings) appears once, as PyTorch's `named_parameters()`.
pub fn named_parameters(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params
}

/// The parameter group of the decayed parameters.
const DECAY_GROUP: usize = 0;
/// The parameter group of the parameters exempt from weight decay.
const NO_DECAY_GROUP: usize = 1;

/// libtorch's AdamW over two parameter groups, decay and no-decay, as HF's Trainer builds it.
///
/// The update is `torch::optim::AdamW`'s (libtorch's C++ optimiser, the same algorithm as
/// `torch.optim.AdamW`): `p *= 1 - lr * wd`, then the bias-corrected Adam step. The learning rate
/// is shared by both groups and set per step by a schedule ([`crate::LrScheduler`]).
pub struct AdamW {
    opt: COptimizer,
    params: Vec<(String, Tensor)>,
    decay: Vec<bool>,
    config: AdamWConfig,
    lr: f64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("parameters", &self.params.len())
            .field("config", &self.config)
            .field("lr", &self.lr)
            .finish()
    }
}

impl AdamW {
    /// AdamW over `params` (named tensors that require grad); those for which `no_decay` is true
    /// get weight decay 0, the others `config.weight_decay`. An empty list, a repeated name, a
    /// tensor that does not require grad or a hyper-parameter out of range is an error.
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig, no_decay: impl Fn(&str) -> bool) -> Result<Self> {
        config.validate()?;
        if params.is_empty() {
            return Err(TrainError::NoParameters);
        }
        let mut seen = std::collections::HashSet::new();
        for (name, t) in &params {
            if !seen.insert(name.as_str()) {
                return Err(TrainError::InvalidArgument(format!(
                    "parameter `{name}` is listed twice"
                )));
            }
            if !t.requires_grad() {
                return Err(TrainError::InvalidArgument(format!(
                    "parameter `{name}` does not require grad, so it can never be updated"
                )));
            }
        }
        let (b1, b2) = config.betas;
        let mut opt = COptimizer::adamw(config.lr, b1, b2, config.weight_decay, config.eps, config.amsgrad)?;
        let decay: Vec<bool> = params.iter().map(|(n, _)| !no_decay(n)).collect();
        // libtorch's constructor made group 0 (empty); adding to group 1 creates it with the
        // defaults, whose weight decay is then set to 0.
        for ((_, t), &d) in params.iter().zip(&decay) {
            opt.add_parameters(t, if d { DECAY_GROUP } else { NO_DECAY_GROUP })?;
        }
        if decay.iter().any(|d| !d) {
            opt.set_weight_decay_group(NO_DECAY_GROUP, 0.0)?;
        }
        Ok(Self {
            opt,
            params,
            decay,
            lr: config.lr,
            config,
        })
    }

    /// AdamW over every trainable parameter of `vs`, grouped as HF's Trainer groups them
    /// ([`hf_no_decay`]).
    pub fn hf(vs: &tch::nn::VarStore, config: AdamWConfig) -> Result<Self> {
        Self::new(named_parameters(vs), config, hf_no_decay)
    }

    /// Applies one update from the parameters' current gradients (parameters without a gradient
    /// are skipped, as in PyTorch).
    pub fn step(&mut self) -> Result<()> {
        Ok(self.opt.step()?)
    }

    /// Drops every parameter's gradient (set to none, as PyTorch's default `zero_grad`).
    pub fn zero_grad(&mut self) -> Result<()> {
        Ok(self.opt.zero_grad()?)
    }

    /// Sets the learning rate of both groups.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(TrainError::InvalidArgument(format!(
                "learning rate must be finite and >= 0, got {lr}"
            )));
        }
        self.opt.set_learning_rate(lr)?;
        self.lr = lr;
        Ok(())
    }

    /// The learning rate the next step uses.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// The hyper-parameters the optimiser was built with (`lr` is the initial one).
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The parameters, in the order they were given.
    pub fn parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Names of the parameters with weight decay.
    pub fn decay_parameter_names(&self) -> Vec<&str> {
        self.params
            .iter()
            .zip(&self.decay)
            .filter(|(_, d)| **d)
            .map(|((n, _), _)| n.as_str())
            .collect()
    }

    /// Names of the parameters exempt from weight decay.
    pub fn no_decay_parameter_names(&self) -> Vec<&str> {
        self.params
            .iter()
            .zip(&self.decay)
            .filter(|(_, d)| !**d)
            .map(|((n, _), _)| n.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn hf_no_decay_follows_transformers_patterns() {
        for name in [
            "transformer.h.0.attn.c_attn.bias",
            "transformer.h.0.ln_1.weight",
            "transformer.ln_f.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.1.post_attention_layernorm.weight",
            "model.norm.weight",
            "encoder.block.0.layer.0.layer_norm.weight",
            "decoder.final_layer_norm.weight",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "v_head.summary.bias",
            "x.RMSNorm.weight",
        ] {
            assert!(hf_no_decay(name), "{name} must not decay");
        }
        for name in [
            "transformer.wte.weight",
            "transformer.h.0.attn.c_attn.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "lm_head.weight",
            "shared.weight",
            "v_head.summary.weight",
            "encoder.block.0.layer.1.DenseReluDense.wo.weight",
            "normal.weight",
            "x.norm_out.weight",
        ] {
            assert!(!hf_no_decay(name), "{name} must decay");
        }
    }

    fn param(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).set_requires_grad(true)
    }

    #[test]
    fn groups_get_their_weight_decay() {
        // With a zero gradient Adam's step is 0, so only the decay moves a parameter:
        // p <- p * (1 - lr * wd) in the decay group, unchanged in the other.
        let w = param(&[1.0, -2.0]);
        let b = param(&[3.0]);
        let config = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(
            vec![("w".into(), w.shallow_clone()), ("b.bias".into(), b.shallow_clone())],
            config,
            hf_no_decay,
        )
        .unwrap();
        assert_eq!(opt.decay_parameter_names(), vec!["w"]);
        assert_eq!(opt.no_decay_parameter_names(), vec!["b.bias"]);
        let loss = (&w * 0.0).sum(Kind::Float) + (&b * 0.0).sum(Kind::Float);
        loss.backward();
        opt.step().unwrap();
        assert_eq!(Vec::<f32>::try_from(&w).unwrap(), vec![0.95, -1.9]);
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), vec![3.0]);
        opt.zero_grad().unwrap();
        assert!(!w.grad().defined(), "zero_grad sets gradients to none");
    }

    #[test]
    fn bad_construction_is_an_error() {
        let cfg = AdamWConfig::default();
        assert!(matches!(
            AdamW::new(vec![], cfg, hf_no_decay),
            Err(TrainError::NoParameters)
        ));
        let vs = tch::nn::VarStore::new(Device::Cpu);
        assert!(matches!(AdamW::hf(&vs, cfg), Err(TrainError::NoParameters)));
        let frozen = Tensor::from_slice(&[1.0f32]);
        assert!(matches!(
            AdamW::new(vec![("w".into(), frozen)], cfg, hf_no_decay),
            Err(TrainError::InvalidArgument(_))
        ));
        let p = param(&[1.0]);
        assert!(AdamW::new(
            vec![("w".into(), p.shallow_clone()), ("w".into(), p.shallow_clone())],
            cfg,
            hf_no_decay
        )
        .is_err());
        for bad in [
            AdamWConfig { lr: -1.0, ..cfg },
            AdamWConfig {
                betas: (1.0, 0.9),
                ..cfg
            },
            AdamWConfig { eps: f64::NAN, ..cfg },
            AdamWConfig {
                weight_decay: -0.1,
                ..cfg
            },
        ] {
            assert!(matches!(
                AdamW::new(vec![("w".into(), p.shallow_clone())], bad, hf_no_decay),
                Err(TrainError::InvalidArgument(_))
            ));
        }
        let mut opt = AdamW::new(vec![("w".into(), p)], cfg, hf_no_decay).unwrap();
        assert!(opt.set_lr(f64::INFINITY).is_err());
        // A step without gradients changes nothing and is no error (as PyTorch).
        opt.step().unwrap();
    }
}

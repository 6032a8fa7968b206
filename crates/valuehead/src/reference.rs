//! TRL's `create_reference_model`: the frozen copy of the policy that PPO measures its KL
//! penalty against, optionally sharing the policy's first layers.
//!
//! TRL deep-copies the model, freezes every parameter of the copy, and with
//! `num_shared_layers = k` also freezes, in the policy, every parameter PyTorch lists before the
//! first one whose name contains the layer pattern formatted with `k` (the embeddings and layers
//! 0..k). Its copy still holds its own copy of those frozen parameters; here they are the same
//! tensors (one storage, read by both models), which is what "shared" promises and saves their
//! bytes. Since both sides are frozen, nothing can tell the two apart numerically.

use crate::causal::CausalLmWithValueHead;
use crate::error::{Error, Result};
use crate::seq2seq::Seq2SeqLmWithValueHead;
use crate::wrapper::V_HEAD_PREFIX;
use tch::Tensor;
use vh_models::ParamPosition;

/// TRL's `LAYER_PATTERNS`, tried in this order when no pattern is given; `{layer}` is replaced
/// by `num_shared_layers`. Names are matched as TRL matches them: as substrings of the
/// wrapper's parameter names (`pretrained_model.` + the backbone's HF name).
pub const LAYER_PATTERNS: [&str; 4] = [
    "transformer.h.{layer}",
    "model.decoder.layers.{layer}",
    "gpt_neox.layers.{layer}",
    "model.layers.{layer}",
];

/// The prefix TRL's wrapper gives its backbone's parameters.
const PRETRAINED_PREFIX: &str = "pretrained_model.";

/// What [`create_reference_model`] shared between the policy and the reference.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SharedParameters {
    /// The pattern the split was made at (formatted), when layers are shared.
    pub pattern: Option<String>,
    /// HF names of the parameters both models read (frozen in both).
    pub shared: Vec<String>,
    /// Bytes held once instead of twice.
    pub shared_bytes: u64,
}

fn bytes_of(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// A frozen copy of `model` in eval mode, as TRL's `create_reference_model(model,
/// num_shared_layers, pattern)`: with `None` an independent copy; with `Some(k)` the embeddings
/// and the first `k` layers are the same tensors in both models and frozen in `model` too (so
/// its optimiser skips them), the rest copied and frozen in the copy. `pattern` (e.g.
/// `"transformer.h.{layer}"`) overrides TRL's [`LAYER_PATTERNS`]. Errors, as TRL: no pattern
/// matches (`k` at or beyond the depth, or a pattern naming nothing). Beyond TRL: a pattern whose
/// first match is not a whole layer is refused, since the order of parameters inside a layer is
/// PyTorch's registration order, which the split would depend on.
pub fn create_reference_model(
    model: &CausalLmWithValueHead,
    num_shared_layers: Option<usize>,
    pattern: Option<&str>,
) -> Result<(CausalLmWithValueHead, SharedParameters)> {
    if model.wrapped.adapter.is_some() {
        return Err(Error::InvalidOption(
            "create_reference_model: this model has a LoRA adapter; its reference is the base model, \
             reached with set_adapter_enabled(false) as TRL's PPO does, without a second copy"
                .into(),
        ));
    }
    let backbone = model.backbone();
    // Parameters in PyTorch's order at layer granularity (names inside one position sorted,
    // which the whole-layer rule below makes irrelevant); the value head comes last, as TRL's
    // wrapper registers it after the backbone.
    let mut names: Vec<(u8, ParamPosition, String)> = model
        .wrapped
        .vs
        .variables()
        .into_keys()
        .map(|name| {
            if name.starts_with(V_HEAD_PREFIX) {
                (1, ParamPosition::AfterLayers, name)
            } else {
                (0, backbone.parameter_position(&name), name)
            }
        })
        .collect();
    names.sort();
    let full = |name: &str| {
        if name.starts_with(V_HEAD_PREFIX) {
            name.to_string()
        } else {
            format!("{PRETRAINED_PREFIX}{name}")
        }
    };

    let mut info = SharedParameters::default();
    let mut shared = std::collections::HashSet::new();
    if let Some(k) = num_shared_layers {
        let candidates: Vec<String> = match pattern {
            Some(p) => vec![format_pattern(p, k)?],
            None => LAYER_PATTERNS
                .iter()
                .map(|p| p.replace("{layer}", &k.to_string()))
                .collect(),
        };
        let pattern = candidates
            .into_iter()
            .find(|p| names.iter().any(|(_, _, n)| full(n).contains(p.as_str())))
            .ok_or_else(|| {
                Error::InvalidOption(format!(
                    "create_reference_model: layer pattern could not be matched (num_shared_layers = {k}, {} layers; patterns {:?})",
                    backbone.num_layers(),
                    pattern.map(|p| vec![p]).unwrap_or(LAYER_PATTERNS.to_vec())
                ))
            })?;
        let first = names
            .iter()
            .position(|(_, _, n)| full(n).contains(pattern.as_str()))
            .expect("the pattern matched a name");
        let split_at = &names[first].1;
        let whole_layer = matches!(split_at, ParamPosition::Layer(_))
            && names
                .iter()
                .filter(|(_, pos, _)| pos == split_at)
                .all(|(_, _, n)| full(n).contains(pattern.as_str()));
        if !whole_layer {
            return Err(Error::InvalidOption(format!(
                "create_reference_model: the pattern `{pattern}` must name whole decoder layers (its first match, {}, is not the start of one)",
                names[first].2
            )));
        }
        for (_, _, name) in &names[..first] {
            shared.insert(name.clone());
        }
        info.pattern = Some(pattern);
    }

    let variables = model.wrapped.vs.variables();
    let mut tensors = Vec::with_capacity(variables.len());
    for (name, t) in &variables {
        let tensor = if shared.contains(name) {
            info.shared_bytes += bytes_of(t);
            t.shallow_clone()
        } else {
            deep_copy(t)?
        };
        tensors.push((name.clone(), tensor));
    }
    let mut reference =
        CausalLmWithValueHead::from_parts(model.wrapped.config.clone(), tensors, &model.wrapped.options)?;
    reference.wrapped.generation_config = model.wrapped.generation_config.clone();
    reference.wrapped.source_dir = model.wrapped.source_dir.clone();
    reference.set_train(false);
    freeze_all(&reference.wrapped.vs);
    for name in &shared {
        if let Some(t) = variables.get(name) {
            let _ = t.shallow_clone().set_requires_grad(false);
        }
    }
    info.shared = names
        .into_iter()
        .map(|(_, _, n)| n)
        .filter(|n| shared.contains(n))
        .collect();
    Ok((reference, info))
}

/// A frozen, independent copy of an encoder-decoder value-head model in eval mode, as TRL's
/// `create_reference_model(model)`. TRL's layer patterns name no encoder-decoder layers, so
/// sharing is not offered.
pub fn create_seq2seq_reference_model(model: &Seq2SeqLmWithValueHead) -> Result<Seq2SeqLmWithValueHead> {
    let tensors = model
        .wrapped
        .vs
        .variables()
        .into_iter()
        .map(|(name, t)| Ok((name, deep_copy(&t)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut reference =
        Seq2SeqLmWithValueHead::from_parts(model.wrapped.config.clone(), tensors, &model.wrapped.options)?;
    reference.wrapped.generation_config = model.wrapped.generation_config.clone();
    reference.wrapped.source_dir = model.wrapped.source_dir.clone();
    reference.set_train(false);
    freeze_all(&reference.wrapped.vs);
    Ok(reference)
}

/// A copy with its own storage and the same strides, outside autograd.
fn deep_copy(t: &Tensor) -> Result<Tensor> {
    tch::no_grad(|| -> Result<Tensor> {
        let mut out = t.f_empty_like()?;
        out.f_copy_(t)?;
        Ok(out)
    })
}

fn freeze_all(vs: &tch::nn::VarStore) {
    for (_, t) in vs.variables() {
        let _ = t.set_requires_grad(false);
    }
}

/// `pattern.format(layer=k)` for the patterns TRL users write: `{layer}` replaced; any other
/// brace is an error (Python's `format` would raise too).
fn format_pattern(pattern: &str, k: usize) -> Result<String> {
    let formatted = pattern.replace("{layer}", &k.to_string());
    if formatted.contains('{') || formatted.contains('}') || formatted.is_empty() {
        return Err(Error::InvalidOption(format!(
            "create_reference_model: the pattern `{pattern}` may contain `{{layer}}` and no other braces, and must not be empty"
        )));
    }
    Ok(formatted)
}

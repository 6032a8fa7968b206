//! Creating model parameters, optionally as placeholders that a checkpoint fills later.
//!
//! Loading a checkpoint used to allocate every parameter (zero-filled) from config.json's sizes
//! and then copy the checkpoint into it. A config whose sizes are far beyond the weights beside it
//! (`{"model_type": "llama"}` next to a 37 KB file means a 7-billion-parameter model) then
//! allocated gigabytes before the first shape was compared. Inside [`deferred`], [`var`] creates
//! a placeholder instead: a view of one element expanded to the parameter's shape, which has the
//! parameter's name, shape, kind and device but no memory of its own. The loader then checks every
//! checkpoint tensor against those shapes and gives each parameter its data (`set_data`), so
//! nothing is allocated for a checkpoint that does not fit, and nothing twice for one that does.

use crate::error::{Error, Result};
use std::cell::Cell;
use tch::{nn, Tensor};

thread_local! {
    static DEFERRED: Cell<bool> = const { Cell::new(false) };
    /// Placeholders [`var`] may still create in the current [`deferred_for_checkpoint`].
    static PLACEHOLDERS_LEFT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Runs `build` with parameter creation deferred: every [`var`] it calls creates a placeholder.
/// A model built this way must receive every parameter from a checkpoint before it is used.
pub fn deferred<R>(build: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            DEFERRED.with(|d| d.set(self.0));
        }
    }
    let _restore = Restore(DEFERRED.with(|d| d.replace(true)));
    build()
}

/// [`deferred`] for a model that a checkpoint of `checkpoint_tensors` tensors will fill: a
/// [`var`] that would create more than twice that many placeholders (plus 16) fails with a
/// config error. Every parameter needs a checkpoint tensor of its own, so such a model could
/// never load; without the cap a config.json asking for 2^61 layers would go on creating
/// placeholders for ever (found by fuzzing: a hang). The slack keeps the precise errors
/// (missing tensor, no LM head) for checkpoints a few tensors short.
pub fn deferred_for_checkpoint<R>(checkpoint_tensors: usize, build: impl FnOnce() -> R) -> R {
    struct Restore(Option<usize>);
    impl Drop for Restore {
        fn drop(&mut self) {
            PLACEHOLDERS_LEFT.with(|c| c.set(self.0));
        }
    }
    let cap = checkpoint_tensors.saturating_mul(2).saturating_add(16);
    let _restore = Restore(PLACEHOLDERS_LEFT.with(|c| c.replace(Some(cap))));
    deferred(build)
}

/// Whether [`var`] currently creates placeholders.
pub fn is_deferred() -> bool {
    DEFERRED.with(Cell::get)
}

/// The number of elements of a parameter of shape `dims`, or a config error naming it when a
/// size is negative or the count overflows.
pub fn checked_numel(name: &str, dims: &[i64]) -> Result<i64> {
    dims.iter().try_fold(1i64, |acc, &d| {
        if d < 0 {
            return Err(Error::Config(format!(
                "parameter `{name}` would have a negative size {dims:?}"
            )));
        }
        acc.checked_mul(d)
            .ok_or_else(|| Error::Config(format!("parameter `{name}` of shape {dims:?} has too many elements")))
    })
}

/// Creates the trainable parameter `name` of shape `dims` under `path`, initialised with `init`,
/// or (inside [`deferred`]) a placeholder of that shape.
pub fn var(path: &nn::Path, name: &str, dims: &[i64], init: nn::Init) -> Result<Tensor> {
    create(path, name, dims, Some(init))
}

/// Creates the zero-filled buffer `name` of shape `dims` under `path` (PyTorch's
/// `register_buffer`: saved and loaded with the parameters, never trained, so it gets no
/// gradient), or (inside [`deferred`]) a placeholder of that shape.
pub fn buffer(path: &nn::Path, name: &str, dims: &[i64]) -> Result<Tensor> {
    create(path, name, dims, None)
}

/// [`var`] with `init`, or [`buffer`] without.
fn create(path: &nn::Path, name: &str, dims: &[i64], init: Option<nn::Init>) -> Result<Tensor> {
    checked_numel(name, dims)?;
    let trainable = init.is_some();
    if is_deferred() {
        if let Some(left) = PLACEHOLDERS_LEFT.with(Cell::get) {
            if left == 0 {
                return Err(Error::Config(
                    "config.json describes more parameters than the checkpoint's tensors could fill \
                     (more layers or modules than the checkpoint holds)"
                        .to_string(),
                ));
            }
            PLACEHOLDERS_LEFT.with(|c| c.set(Some(left - 1)));
        }
        let one = Tensor::f_zeros([] as [i64; 0], (path.kind(), path.device()))?;
        return Ok(path.add(name, one.f_expand(dims, false)?, trainable));
    }
    Ok(match init {
        Some(init) => path.f_var(name, dims, init)?,
        None => path.f_zeros_no_train(name, dims)?,
    })
}

/// Whether `t` is a placeholder that no checkpoint tensor has replaced yet.
pub fn is_placeholder(t: &Tensor) -> bool {
    t.numel() > 1 && t.stride().iter().all(|s| *s == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device, Kind};

    #[test]
    fn placeholders_take_no_memory_and_are_named_like_variables() {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        // 4 * 10^12 elements: only a placeholder can exist.
        let huge = deferred(|| {
            var(
                &root.sub("emb"),
                "weight",
                &[2_000_000, 2_000_000],
                nn::Init::Const(0.0),
            )
        })
        .unwrap();
        assert_eq!(huge.size(), vec![2_000_000, 2_000_000]);
        assert!(is_placeholder(&huge));
        assert!(!is_deferred(), "deferral ends with the closure");
        let real = var(&root.sub("ln"), "weight", &[3], nn::Init::Const(1.0)).unwrap();
        assert!(!is_placeholder(&real));
        assert_eq!(real.sum(Kind::Float).double_value(&[]), 3.0);
        let names = vs.variables();
        assert!(names.contains_key("emb.weight") && names.contains_key("ln.weight"));
        // A checkpoint tensor replaces the placeholder for every handle sharing it.
        let mut slot = names["emb.weight"].shallow_clone();
        tch::no_grad(|| slot.set_data(&Tensor::ones([2, 2], (Kind::Float, Device::Cpu))));
        assert_eq!(huge.size(), vec![2, 2]);
        assert!(!is_placeholder(&huge));
        assert!(checked_numel("w", &[i64::MAX, 2]).is_err());
        assert!(checked_numel("w", &[-1, 2]).is_err());
    }

    #[test]
    fn buffers_are_named_variables_without_gradients() {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let real = buffer(&root, "final_logits_bias", &[1, 5]).unwrap();
        assert!(!real.requires_grad());
        assert_eq!(real.sum(Kind::Float).double_value(&[]), 0.0);
        let placeholder = deferred(|| buffer(&root.sub("m"), "b", &[1_000_000, 1_000_000])).unwrap();
        assert!(is_placeholder(&placeholder) && !placeholder.requires_grad());
        let names = vs.variables();
        assert!(names.contains_key("final_logits_bias") && names.contains_key("m.b"));
        assert!(var(&root, "w", &[2], nn::Init::Const(0.0)).unwrap().requires_grad());
    }

    #[test]
    fn placeholders_beyond_what_a_checkpoint_can_fill_are_refused() {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        // A checkpoint of 2 tensors fills at most 2 * 2 + 16 = 20 placeholders.
        let made = deferred_for_checkpoint(2, || {
            (0..i64::MAX)
                .map(|i| var(&root.sub(i), "weight", &[4], nn::Init::Const(0.0)))
                .collect::<Result<Vec<_>>>()
        });
        let err = made.unwrap_err().to_string();
        assert!(err.contains("more parameters than the checkpoint"), "{err}");
        assert_eq!(vs.variables().len(), 20);
        // The cap ends with the closure, and plain `deferred` has none.
        let many = deferred(|| {
            (0..50)
                .map(|i| var(&root.sub("x").sub(i), "w", &[4], nn::Init::Const(0.0)))
                .collect::<Result<Vec<_>>>()
        });
        assert_eq!(many.unwrap().len(), 50);
        assert!(var(&root.sub("y"), "w", &[2], nn::Init::Const(1.0)).is_ok());
    }
}

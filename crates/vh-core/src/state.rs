//! Moving named tensors (state dicts) in and out of a `VarStore`.

use crate::error::{Error, Result};
use std::collections::{BTreeSet, HashMap};
use tch::{nn::VarStore, Kind, Tensor};

/// What loading a state dict into a `VarStore` matched.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Variables that received a tensor.
    pub loaded: Vec<String>,
    /// Variables that no tensor named.
    pub missing: Vec<String>,
    /// Tensors that name no variable.
    pub unexpected: Vec<String>,
}

/// Gives each named tensor to the variable of the same name, converted to the variable's kind
/// and device: the variable takes the tensor's data (`set_data`, no copy when kind and device
/// already match), so placeholders from [`crate::param::deferred`] are filled without ever
/// allocating the config's sizes, and every handle sharing the variable (tied weights) sees the
/// data. Pass tensors nothing else writes to. A shape that differs from the variable's, or
/// integer or boolean values for a floating-point variable, is an error, checked before any data
/// is converted.
pub fn load_variables(vs: &VarStore, tensors: impl IntoIterator<Item = (String, Tensor)>) -> Result<LoadReport> {
    let variables = vs.variables();
    let mut report = LoadReport::default();
    let mut loaded = BTreeSet::new();
    for (name, tensor) in tensors {
        let Some(var) = variables.get(&name) else {
            report.unexpected.push(name);
            continue;
        };
        if var.size() != tensor.size() {
            return Err(Error::TensorShape {
                name,
                expected: var.size(),
                actual: tensor.size(),
            });
        }
        if crate::tensor::is_float_kind(var.kind()) && !crate::tensor::is_float_kind(tensor.kind()) {
            return Err(Error::TensorKind {
                name,
                actual: tensor.kind(),
            });
        }
        let mut var = var.shallow_clone();
        let source = tensor.f_to_device(var.device())?.f_to_kind(var.kind())?;
        tch::no_grad(|| var.f_set_data(&source))?;
        loaded.insert(name);
    }
    let mut missing: Vec<String> = variables.keys().filter(|k| !loaded.contains(*k)).cloned().collect();
    missing.sort();
    report.missing = missing;
    report.loaded = loaded.into_iter().collect();
    report.unexpected.sort();
    Ok(report)
}

/// Casts the floating-point variables whose name `select` accepts to `kind`, in place.
pub fn cast_variables(vs: &VarStore, kind: Kind, select: impl Fn(&str) -> bool) -> Result<()> {
    for (name, mut var) in vs.variables() {
        if select(&name) && crate::tensor::is_float_kind(var.kind()) && var.kind() != kind {
            let converted = var.f_to_kind(kind)?;
            tch::no_grad(|| var.set_data(&converted));
        }
    }
    Ok(())
}

/// The variables of a `VarStore` as a name-sorted state dict (shallow clones: no copy).
pub fn state_dict(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut entries: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries
}

/// Indexes a list of named tensors by name.
pub fn by_name(tensors: Vec<(String, Tensor)>) -> HashMap<String, Tensor> {
    tensors.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device};

    #[test]
    fn loads_matching_names_and_reports_the_rest() {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let _a = root.sub("a").zeros("weight", &[2, 2]);
        let _b = root.sub("b").zeros("bias", &[3]);
        let report = load_variables(
            &vs,
            vec![
                (
                    "a.weight".to_string(),
                    Tensor::ones([2, 2], (Kind::Double, Device::Cpu)),
                ),
                ("extra".to_string(), Tensor::ones([1], (Kind::Float, Device::Cpu))),
            ],
        )
        .unwrap();
        assert_eq!(report.loaded, vec!["a.weight"]);
        assert_eq!(report.missing, vec!["b.bias"]);
        assert_eq!(report.unexpected, vec!["extra"]);
        let a = vs.variables()["a.weight"].shallow_clone();
        assert_eq!(a.kind(), Kind::Float);
        assert_eq!(a.sum(Kind::Float).double_value(&[]), 4.0);
    }

    #[test]
    fn wrong_shape_is_an_error() {
        let vs = VarStore::new(Device::Cpu);
        let _a = vs.root().sub("a").var("weight", &[2, 2], nn::Init::Const(0.0));
        let err = load_variables(
            &vs,
            vec![("a.weight".to_string(), Tensor::ones([2, 3], (Kind::Float, Device::Cpu)))],
        );
        assert!(matches!(err, Err(Error::TensorShape { .. })), "{err:?}");
    }

    #[test]
    fn integer_or_bool_weights_are_refused() {
        let vs = VarStore::new(Device::Cpu);
        let _a = vs.root().sub("a").zeros("weight", &[2]);
        for kind in [Kind::Int64, Kind::Int, Kind::Bool, Kind::Uint8] {
            let err = load_variables(
                &vs,
                vec![("a.weight".to_string(), Tensor::zeros([2], (kind, Device::Cpu)))],
            );
            assert!(matches!(err, Err(Error::TensorKind { .. })), "{kind:?}: {err:?}");
        }
        load_variables(
            &vs,
            vec![("a.weight".to_string(), Tensor::zeros([2], (Kind::Half, Device::Cpu)))],
        )
        .unwrap();
    }

    #[test]
    fn casts_only_selected_variables() {
        let vs = VarStore::new(Device::Cpu);
        let _a = vs.root().sub("body").zeros("w", &[2]);
        let _b = vs.root().sub("v_head").zeros("w", &[2]);
        cast_variables(&vs, Kind::BFloat16, |n| !n.starts_with("v_head.")).unwrap();
        let vars = vs.variables();
        assert_eq!(vars["body.w"].kind(), Kind::BFloat16);
        assert_eq!(vars["v_head.w"].kind(), Kind::Float);
    }
}

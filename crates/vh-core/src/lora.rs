//! LoRA adapters as Python peft defines them (`LoraConfig`, `lora.Linear`): a low-rank update
//! `B(A(dropout(x))) * scaling` added to the output of chosen linear layers, trained while the
//! base stays frozen.
//!
//! Layers learn whether they carry an adapter while the model is built: inside [`with_adapter`],
//! the shared linear layers ask [`LoraBranch::for_module`] with their full parameter path, which
//! answers with peft's target-module rules and creates `lora_A.weight` [r, in] and
//! `lora_B.weight` [out, r] beside the layer's own weight (so they are ordinary parameters of the
//! model's `VarStore`, named as peft names them minus its `base_model.model.` prefix and adapter
//! name).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tch::{nn, Kind, Tensor};

/// Which modules get an adapter: peft's `target_modules`.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Module names: a module matches when its full name equals one or ends with `.` + one.
    Names(Vec<String>),
    /// A regular expression the full module name must match entirely (peft's string form).
    Regex(String),
    /// Every linear layer except the output layer (peft's `"all-linear"`).
    AllLinear,
}

impl TargetModules {
    fn from_json(v: &Value, key: &str) -> Result<Option<Self>> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) if s == "all-linear" => Ok(Some(Self::AllLinear)),
            Value::String(s) => {
                regex::Regex::new(&format!("^(?:{s})$"))
                    .map_err(|e| Error::Config(format!("`{key}` is not a valid regular expression: {e}")))?;
                Ok(Some(Self::Regex(s.clone())))
            }
            Value::Array(items) => {
                let names = items
                    .iter()
                    .map(|i| {
                        i.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| Error::Config(format!("`{key}` must list strings, got {i}")))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Some(Self::Names(names)))
            }
            other => Err(Error::Config(format!(
                "`{key}` must be a string or a list, got {other}"
            ))),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Self::Names(n) => Value::from(n.clone()),
            Self::Regex(r) => Value::from(r.clone()),
            Self::AllLinear => Value::from("all-linear"),
        }
    }

    /// Whether the module `name` (full dotted path) matches, by peft's rules.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::AllLinear => true,
            Self::Names(names) => names.iter().any(|t| name == t || name.ends_with(&format!(".{t}"))),
            Self::Regex(r) => regex::Regex::new(&format!("^(?:{r})$")).is_ok_and(|re| re.is_match(name)),
        }
    }
}

/// Which biases an adapter trains and saves: peft's `bias`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraBias {
    /// No bias is trained (peft's default).
    None,
    /// Every bias of the model is trained.
    All,
    /// The biases of adapted layers are trained.
    LoraOnly,
}

/// peft's `LoraConfig`, the fields of adapter_config.json that change the math, with peft's
/// defaults; the file's other fields are kept and written back.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank of the update (default 8).
    pub r: i64,
    /// Scale numerator (default 8): scaling is `lora_alpha / r`, or `lora_alpha / sqrt(r)` with
    /// `use_rslora`.
    pub lora_alpha: f64,
    /// Dropout on the adapter's input in train mode (default 0).
    pub lora_dropout: f64,
    /// The adapted modules.
    pub target_modules: TargetModules,
    /// Modules excluded from the targets.
    pub exclude_modules: Option<TargetModules>,
    /// The base layer stores its weight [in, out] (GPT-2's Conv1D); only merging depends on it.
    pub fan_in_fan_out: bool,
    /// Trained biases.
    pub bias: LoraBias,
    /// Rank-stabilised scaling.
    pub use_rslora: bool,
    /// Modules trained in full and saved with the adapter (e.g. `lm_head`, `score`).
    pub modules_to_save: Vec<String>,
    /// Where the base model came from (peft writes it; TRL loads the base from it).
    pub base_model_name_or_path: Option<String>,
    /// adapter_config.json as read (or as peft would write it), for saving.
    pub raw: Value,
}

fn f64_field(v: &Value, key: &str, default: f64) -> Result<f64> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_f64()
            .filter(|f| f.is_finite())
            .ok_or_else(|| Error::Config(format!("adapter_config.json: `{key}` must be a number, got {x}"))),
    }
}

fn bool_field(v: &Value, key: &str, default: bool) -> Result<bool> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_bool()
            .ok_or_else(|| Error::Config(format!("adapter_config.json: `{key}` must be true or false, got {x}"))),
    }
}

impl LoraConfig {
    /// Parses adapter_config.json. Refuses what would change the math in ways not implemented
    /// (DoRA, per-module ranks, layer selection, other adapter types) rather than ignoring it.
    pub fn from_json(v: &Value) -> Result<Self> {
        if !v.is_object() {
            return Err(Error::Config("adapter_config.json must be a JSON object".into()));
        }
        match v.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => {
                return Err(Error::Config(format!(
                    "adapter_config.json: peft_type {other:?} is not supported (LORA is)"
                )))
            }
        }
        for key in ["use_dora", "use_qalora", "lora_bias"] {
            if bool_field(v, key, false)? {
                return Err(Error::Config(format!("adapter_config.json: `{key}` is not supported")));
            }
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if let Some(p) = v.get(key).filter(|p| !p.is_null()) {
                if p.as_object().is_none_or(|o| !o.is_empty()) {
                    return Err(Error::Config(format!(
                        "adapter_config.json: `{key}` (per-module ranks) is not supported"
                    )));
                }
            }
        }
        for key in [
            "layers_to_transform",
            "layers_pattern",
            "layer_replication",
            "target_parameters",
            "trainable_token_indices",
            "alora_invocation_tokens",
        ] {
            if v.get(key).is_some_and(|x| !x.is_null()) {
                return Err(Error::Config(format!("adapter_config.json: `{key}` is not supported")));
            }
        }
        let r = match v.get("r") {
            None | Some(Value::Null) => 8,
            Some(x) => x
                .as_i64()
                .ok_or_else(|| Error::Config(format!("adapter_config.json: `r` must be an integer, got {x}")))?,
        };
        if r <= 0 {
            return Err(Error::Config(format!(
                "adapter_config.json: `r` must be positive, got {r}"
            )));
        }
        let lora_dropout = f64_field(v, "lora_dropout", 0.0)?;
        if !(0.0..1.0).contains(&lora_dropout) {
            return Err(Error::Config(format!(
                "adapter_config.json: `lora_dropout` must be in [0, 1), got {lora_dropout}"
            )));
        }
        let target_modules = TargetModules::from_json(
            v.get("target_modules").unwrap_or(&Value::Null),
            "target_modules",
        )?
        .ok_or_else(|| {
            Error::Config(
                "adapter_config.json: `target_modules` is required (peft infers it only for models it knows)".into(),
            )
        })?;
        let bias = match v.get("bias") {
            None | Some(Value::Null) => LoraBias::None,
            Some(b) => serde_json::from_value(b.clone()).map_err(|_| {
                Error::Config(format!(
                    "adapter_config.json: `bias` must be none, all or lora_only, got {b}"
                ))
            })?,
        };
        let modules_to_save = match v.get("modules_to_save") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_str().map(str::to_string).ok_or_else(|| {
                        Error::Config(format!(
                            "adapter_config.json: `modules_to_save` must list strings, got {i}"
                        ))
                    })
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(Error::Config(format!(
                    "adapter_config.json: `modules_to_save` must be a list, got {other}"
                )))
            }
        };
        Ok(Self {
            r,
            lora_alpha: f64_field(v, "lora_alpha", 8.0)?,
            lora_dropout,
            target_modules,
            exclude_modules: TargetModules::from_json(
                v.get("exclude_modules").unwrap_or(&Value::Null),
                "exclude_modules",
            )?,
            fan_in_fan_out: bool_field(v, "fan_in_fan_out", false)?,
            bias,
            use_rslora: bool_field(v, "use_rslora", false)?,
            modules_to_save,
            base_model_name_or_path: v
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
            raw: v.clone(),
        })
    }

    /// adapter_config.json for this config: the fields read, updated, over the rest as read.
    pub fn to_json(&self) -> Value {
        let mut out = self.raw.clone();
        let map = out.as_object_mut().expect("raw is an object");
        map.insert("peft_type".into(), "LORA".into());
        map.insert("r".into(), self.r.into());
        map.insert("lora_alpha".into(), self.lora_alpha.into());
        map.insert("lora_dropout".into(), self.lora_dropout.into());
        map.insert("target_modules".into(), self.target_modules.to_json());
        map.insert(
            "exclude_modules".into(),
            self.exclude_modules
                .as_ref()
                .map_or(Value::Null, TargetModules::to_json),
        );
        map.insert("fan_in_fan_out".into(), self.fan_in_fan_out.into());
        map.insert("bias".into(), serde_json::to_value(self.bias).expect("serialisable"));
        map.insert("use_rslora".into(), self.use_rslora.into());
        map.insert(
            "modules_to_save".into(),
            if self.modules_to_save.is_empty() {
                Value::Null
            } else {
                Value::from(self.modules_to_save.clone())
            },
        );
        map.insert(
            "base_model_name_or_path".into(),
            self.base_model_name_or_path.clone().map_or(Value::Null, Value::from),
        );
        out
    }

    /// peft's scaling of the update.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Whether the module `name` gets an adapter (targeted and not excluded).
    pub fn targets(&self, name: &str) -> bool {
        self.target_modules.matches(name) && !self.exclude_modules.as_ref().is_some_and(|e| e.matches(name))
    }

    /// Whether `name` (a parameter) lies in one of `modules_to_save`: its module path equals a
    /// listed name or ends with `.` + it.
    pub fn is_module_to_save(&self, parameter: &str) -> bool {
        let module = parameter.rsplit_once('.').map_or("", |(m, _)| m);
        self.modules_to_save
            .iter()
            .any(|t| module == t || module.ends_with(&format!(".{t}")))
    }
}

/// The adapter being built into a model: its config, the train flag its dropouts read, and the
/// modules that took an adapter.
#[derive(Debug)]
struct Plan {
    /// peft's adapter name; `default` gets peft's saved names (`lora_A.weight`), any other
    /// `lora_A.<name>.weight`, as peft names a second adapter in memory.
    name: String,
    config: LoraConfig,
    switches: AdapterSwitches,
    adapted: Vec<String>,
    transposed: Vec<String>,
}

/// Flags every branch of one adapter reads: train mode (dropout) and whether the adapter is
/// applied at all (off: the base model, as peft's `disable_adapter()`).
#[derive(Debug, Clone)]
pub struct AdapterSwitches {
    /// Dropout on (train mode).
    pub train: Arc<AtomicBool>,
    /// The update is added (on by default).
    pub enabled: Arc<AtomicBool>,
}

impl AdapterSwitches {
    fn new() -> Self {
        Self {
            train: Arc::new(AtomicBool::new(false)),
            enabled: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Sets train mode.
    pub fn set_train(&self, train: bool) {
        self.train.store(train, Ordering::Relaxed);
    }

    /// Switches the adapter on or off.
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed);
    }

    /// Whether the adapter is applied.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }
}

thread_local! {
    static PLAN: RefCell<Vec<Plan>> = const { RefCell::new(Vec::new()) };
}

/// What [`with_adapter`] reports about the adapter it built in.
#[derive(Debug)]
pub struct BuiltAdapter {
    /// The modules (full names) that carry an adapter.
    pub adapted: Vec<String>,
    /// Those among them whose base weight is stored [in, out] (GPT-2's Conv1D: peft's
    /// `fan_in_fan_out`), which merging transposes the update for.
    pub transposed: Vec<String>,
    /// The adapter's train and enabled flags.
    pub switches: AdapterSwitches,
}

/// peft's name of the first adapter, whose tensors keep peft's saved names.
pub const DEFAULT_ADAPTER: &str = "default";

/// Runs `build` with `config`'s adapter (named [`DEFAULT_ADAPTER`]) built into every targeted
/// linear layer. A config whose targets match no module is an error, as in peft.
pub fn with_adapter<R>(config: &LoraConfig, build: impl FnOnce() -> Result<R>) -> Result<(R, BuiltAdapter)> {
    let (built, mut adapters) = with_adapters(&[(DEFAULT_ADAPTER, config)], build)?;
    Ok((built, adapters.remove(0)))
}

/// Runs `build` with several named adapters built in (each layer gets a branch per adapter
/// that targets it; all start enabled). Names must be distinct identifiers.
pub fn with_adapters<R>(
    adapters: &[(&str, &LoraConfig)],
    build: impl FnOnce() -> Result<R>,
) -> Result<(R, Vec<BuiltAdapter>)> {
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            PLAN.with(|p| p.borrow_mut().clear());
        }
    }
    let mut plans = Vec::new();
    for (name, config) in adapters {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(Error::Config(format!(
                "adapter name `{name}` must be a non-empty identifier"
            )));
        }
        if plans.iter().any(|p: &Plan| p.name == *name) {
            return Err(Error::Config(format!("adapter name `{name}` is used twice")));
        }
        plans.push(Plan {
            name: name.to_string(),
            config: (*config).clone(),
            switches: AdapterSwitches::new(),
            adapted: Vec::new(),
            transposed: Vec::new(),
        });
    }
    PLAN.with(|p| *p.borrow_mut() = plans);
    let clear = Clear;
    let built = build()?;
    let plans = PLAN.with(|p| std::mem::take(&mut *p.borrow_mut()));
    drop(clear);
    let mut out = Vec::new();
    for plan in plans {
        if plan.adapted.is_empty() {
            return Err(Error::Config(format!(
                "adapter_config.json: target_modules {:?} match no linear layer of this model",
                plan.config.target_modules
            )));
        }
        out.push(BuiltAdapter {
            adapted: plan.adapted,
            transposed: plan.transposed,
            switches: plan.switches,
        });
    }
    Ok((built, out))
}

/// The LoRA update of one linear layer.
#[derive(Debug)]
pub struct LoraBranch {
    /// `lora_A.weight` [r, in].
    pub lora_a: Tensor,
    /// `lora_B.weight` [out, r].
    pub lora_b: Tensor,
    /// `lora_alpha / r` (or over sqrt(r)).
    pub scaling: f64,
    dropout: f64,
    switches: AdapterSwitches,
}

impl LoraBranch {
    /// Called by a linear layer under construction at `vs` (its own parameter path): inside
    /// [`with_adapter`], when the layer is targeted, creates its `lora_A` / `lora_B` parameters
    /// (in f32, as peft keeps adapters of half-precision bases) and returns the branch.
    /// `fan_in_fan_out`: the layer stores its weight [in, out].
    pub fn for_module(vs: &nn::Path, in_dim: i64, out_dim: i64, fan_in_fan_out: bool) -> Result<Vec<Self>> {
        let module = vs.components().collect::<Vec<_>>().join(".");
        let targeting: Vec<(String, LoraConfig, AdapterSwitches)> = PLAN.with(|p| {
            p.borrow()
                .iter()
                .filter(|plan| plan.config.targets(&module))
                .map(|plan| (plan.name.clone(), plan.config.clone(), plan.switches.clone()))
                .collect()
        });
        let mut branches = Vec::new();
        for (adapter, config, switches) in targeting {
            let (a_path, b_path) = if adapter == DEFAULT_ADAPTER {
                (vs.sub("lora_A"), vs.sub("lora_B"))
            } else {
                (vs.sub("lora_A").sub(&adapter), vs.sub("lora_B").sub(&adapter))
            };
            let r = config.r;
            let lora_a = crate::param::var(&a_path, "weight", &[r, in_dim], nn::Init::Const(0.0))?;
            let lora_b = crate::param::var(&b_path, "weight", &[out_dim, r], nn::Init::Const(0.0))?;
            PLAN.with(|p| {
                if let Some(plan) = p.borrow_mut().iter_mut().find(|plan| plan.name == adapter) {
                    if fan_in_fan_out {
                        plan.transposed.push(module.clone());
                    }
                    plan.adapted.push(module.clone());
                }
            });
            branches.push(Self {
                lora_a,
                lora_b,
                scaling: config.scaling(),
                dropout: config.lora_dropout,
                switches,
            });
        }
        Ok(branches)
    }

    /// Adds the update to the base layer's output `base` for input `x`, as peft's
    /// `lora.Linear.forward`: the input cast to the adapter's dtype, dropout (train mode),
    /// `lora_B(lora_A(x)) * scaling` added, the sum cast back to the base output's dtype.
    pub fn apply(&self, x: &Tensor, base: Tensor) -> Result<Tensor> {
        if !self.switches.is_enabled() {
            return Ok(base);
        }
        let kind = base.kind();
        let mut h = x.f_to_kind(self.lora_a.kind())?;
        if self.dropout > 0.0 && self.switches.train.load(Ordering::Relaxed) {
            h = h.f_dropout(self.dropout, true)?;
        }
        let update = h
            .f_linear::<Tensor>(&self.lora_a, None)?
            .f_linear::<Tensor>(&self.lora_b, None)?
            .f_mul_scalar(self.scaling)?;
        Ok(base.f_add(&update)?.f_to_kind(kind)?)
    }

    /// The dense update `scaling * B @ A` [out, in], for merging into the base weight.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok(self.lora_b.f_matmul(&self.lora_a)?.f_mul_scalar(self.scaling)?)
    }
}

/// The value peft gives a fresh adapter parameter (`init_lora_weights=True`): `lora_A` as
/// `nn.Linear`'s default (Kaiming-uniform with a = sqrt(5): uniform in ±1/sqrt(in)), `lora_B`
/// zeros, so a fresh adapter leaves the model's outputs unchanged.
pub fn fresh_parameter(name: &str, shape: &[i64], device: tch::Device) -> Result<Tensor> {
    if name.contains(".lora_A.") {
        let bound = 1.0 / (shape[1].max(1) as f64).sqrt();
        Ok(Tensor::f_empty(shape, (Kind::Float, device))?.f_uniform_(-bound, bound)?)
    } else {
        Ok(Tensor::f_zeros(shape, (Kind::Float, device))?)
    }
}

/// Whether a parameter name is an adapter's (`...lora_A.weight` / `...lora_B.weight`, or a
/// named adapter's `...lora_A.<name>.weight`).
pub fn is_lora_parameter(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.")
}

/// Whether a parameter belongs to the [`DEFAULT_ADAPTER`] (`...lora_A.weight`).
pub fn is_default_lora_parameter(name: &str) -> bool {
    name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn configs_parse_with_peft_defaults_and_refuse_what_is_not_implemented() {
        let c = LoraConfig::from_json(&json!({"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"]})).unwrap();
        assert_eq!(
            (c.r, c.lora_alpha, c.lora_dropout, c.bias),
            (8, 8.0, 0.0, LoraBias::None)
        );
        assert!(c.targets("model.layers.0.self_attn.q_proj") && !c.targets("model.layers.0.self_attn.k_proj"));
        assert!(!c.targets("model.layers.0.self_attn.xq_proj"));
        let re = LoraConfig::from_json(&json!({"peft_type": "LORA", "target_modules": ".*\\.(q|v)_proj"})).unwrap();
        assert!(re.targets("model.layers.3.self_attn.v_proj") && !re.targets("model.layers.3.mlp.up_proj"));
        let rs = LoraConfig::from_json(&json!({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_rslora": true, "target_modules": "all-linear"})).unwrap();
        assert_eq!(rs.scaling(), 8.0);
        for bad in [
            json!({"peft_type": "LORA", "r": 0, "target_modules": ["q"]}),
            json!({"peft_type": "LORA", "use_dora": true, "target_modules": ["q"]}),
            json!({"peft_type": "LORA", "rank_pattern": {"q": 4}, "target_modules": ["q"]}),
            json!({"peft_type": "LORA", "layers_to_transform": [0], "target_modules": ["q"]}),
            json!({"peft_type": "IA3", "target_modules": ["q"]}),
            json!({"peft_type": "LORA"}),
            json!({"peft_type": "LORA", "target_modules": "("}),
            json!({"peft_type": "LORA", "bias": "some", "target_modules": ["q"]}),
            json!({"peft_type": "LORA", "lora_dropout": 1.0, "target_modules": ["q"]}),
        ] {
            assert!(LoraConfig::from_json(&bad).is_err(), "{bad}");
        }
        let saved = c.to_json();
        assert_eq!(LoraConfig::from_json(&saved).unwrap().target_modules, c.target_modules);
    }
}

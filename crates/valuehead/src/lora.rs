//! PEFT LoRA adapters on value-head models, interchangeable with Python peft and TRL.
//!
//! An adapter folder as peft writes it (`adapter_config.json` and `adapter_model.safetensors`
//! or `adapter_model.bin`, tensors named `base_model.model.<module>.lora_A.weight`, ...) is
//! built into the base model's targeted linear layers; the base stays frozen and is shared, the
//! adapter (and the value head, and peft's `modules_to_save` and trained biases) train. Saving
//! writes what TRL writes for a peft model: the adapter files plus the value head beside them
//! (TRL's `pytorch_model.bin` holds only `v_head.*`; we write it as model.safetensors, which TRL
//! reads first), so `AutoModelForCausalLMWithValueHead.from_pretrained(folder)` in Python loads
//! base, adapter and value head, and `PeftModel.from_pretrained(base, folder)` the adapter.

use crate::causal::CausalLmWithValueHead;
use crate::error::{Error, Result};
use crate::options::LoadOptions;
use crate::seq2seq::Seq2SeqLmWithValueHead;
use crate::wrapper::{read_folder, Wrapped, V_HEAD_PREFIX};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use tch::{nn::VarStore, Tensor};
use vh_core::lora::{is_default_lora_parameter as is_lora_parameter, AdapterSwitches, BuiltAdapter};
pub use vh_core::lora::{LoraBias, LoraConfig, TargetModules};

/// peft's prefix of every saved tensor name (`PeftModel.base_model.model`).
const PEFT_PREFIX: &str = "base_model.model.";

/// The name TRL gives the reward adapter on the policy's backbone (`rm_adapter_name`).
pub const REWARD_ADAPTER: &str = "reward_adapter";

/// What to build into a model: the policy adapter (fresh or loaded) and optionally TRL's
/// reward adapter with its score head.
pub(crate) struct AdapterSpec<'a> {
    pub(crate) policy: &'a LoraConfig,
    pub(crate) fresh: bool,
    pub(crate) reward: Option<(&'a LoraConfig, RewardHead)>,
}

/// The reward adapter's score layer (`nn.Linear(hidden, num_labels)`), frozen.
#[derive(Debug)]
pub(crate) struct RewardHead {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// TRL's reward adapter: a second LoRA adapter on the same backbone (frozen, off except
/// inside `compute_reward_score`) and its score head.
#[derive(Debug)]
pub(crate) struct RewardAdapter {
    switches: AdapterSwitches,
    head: RewardHead,
}

/// The adapter built into a model.
#[derive(Debug)]
pub(crate) struct Adapter {
    pub(crate) config: LoraConfig,
    /// Full names of the adapted modules.
    pub(crate) adapted: BTreeSet<String>,
    /// Adapted modules whose base weight is [in, out] (Conv1D).
    pub(crate) transposed: BTreeSet<String>,
    pub(crate) switches: AdapterSwitches,
    /// TRL's reward adapter, when one was loaded.
    pub(crate) reward: Option<RewardAdapter>,
}

impl Adapter {
    /// Records the adapters and freezes everything peft freezes: only the policy adapter's
    /// parameters, `modules_to_save`, the biases `bias` selects and the value head train (the
    /// reward adapter is loaded frozen, as TRL loads it).
    pub(crate) fn new(spec: AdapterSpec<'_>, built: Vec<BuiltAdapter>, vs: &VarStore) -> Result<Self> {
        let mut built = built.into_iter();
        let policy = built.next().expect("the policy adapter is built first");
        let reward = match (spec.reward, built.next()) {
            (Some((_, head)), Some(b)) => {
                b.switches.set_enabled(false);
                Some(RewardAdapter {
                    switches: b.switches,
                    head,
                })
            }
            _ => None,
        };
        let adapter = Self {
            adapted: policy.adapted.into_iter().collect(),
            transposed: policy.transposed.into_iter().collect(),
            switches: policy.switches,
            config: spec.policy.clone(),
            reward,
        };
        let variables = vs.variables();
        for target in &adapter.config.modules_to_save {
            if !variables.keys().any(|n| adapter.config.is_module_to_save(n)) {
                return Err(Error::InvalidOption(format!(
                    "adapter_config.json: modules_to_save `{target}` names no module with parameters of its own in this model (a tied LM head is not one)"
                )));
            }
        }
        for (name, t) in variables {
            let _ = t.set_requires_grad(adapter.is_trainable(&name));
        }
        Ok(adapter)
    }

    /// The module a parameter belongs to (its name without the last component).
    fn module_of(name: &str) -> &str {
        name.rsplit_once('.').map_or("", |(m, _)| m)
    }

    /// Whether peft trains this parameter.
    pub(crate) fn is_trainable(&self, name: &str) -> bool {
        if name.starts_with(V_HEAD_PREFIX) || is_lora_parameter(name) || self.config.is_module_to_save(name) {
            return true;
        }
        match self.config.bias {
            LoraBias::None => false,
            LoraBias::All => name.contains("bias"),
            LoraBias::LoraOnly => name.ends_with(".bias") && self.adapted.contains(Self::module_of(name)),
        }
    }

    /// The name peft saves a parameter under, or `None` for parameters its adapter file leaves
    /// out. The biases of adapted layers live under `base_layer` in peft; peft's own saving
    /// finds them for `bias="all"` and misses them for `bias="lora_only"` (it looks for
    /// `<module>.bias`), and so do we, so that both write the same files.
    fn saved_name(&self, name: &str) -> Option<String> {
        if name.starts_with(V_HEAD_PREFIX) || (vh_core::lora::is_lora_parameter(name) && !is_lora_parameter(name)) {
            return None;
        }
        let module = Self::module_of(name);
        let leaf = &name[module.len() + 1..];
        if is_lora_parameter(name) || self.config.is_module_to_save(name) {
            return Some(format!("{PEFT_PREFIX}{name}"));
        }
        if self.config.bias == LoraBias::All && name.contains("bias") {
            return Some(if self.adapted.contains(module) {
                format!("{PEFT_PREFIX}{module}.base_layer.{leaf}")
            } else {
                format!("{PEFT_PREFIX}{name}")
            });
        }
        None
    }

    /// The state dict of `vs` with this adapter merged into the base weights (see
    /// `merged_state_dict` on the wrappers).
    fn merged_state_dict(&self, vs: &VarStore) -> Result<Vec<(String, Tensor)>> {
        let variables = vs.variables();
        let mut out = Vec::new();
        for (name, t) in vh_core::state::state_dict(vs) {
            if is_lora_parameter(&name) {
                continue;
            }
            let module = Adapter::module_of(&name);
            if name.ends_with(".weight") && self.adapted.contains(module) {
                let a = &variables[&format!("{module}.lora_A.weight")];
                let b = &variables[&format!("{module}.lora_B.weight")];
                let delta = tch::no_grad(|| -> Result<Tensor> {
                    let d = b.f_matmul(a)?.f_mul_scalar(self.config.scaling())?;
                    // The base weight is [out, in], or [in, out] for Conv1D (peft's fan_in_fan_out).
                    let d = if self.transposed.contains(module) { d.f_tr()? } else { d };
                    Ok(t.detach().f_to_kind(tch::Kind::Float)?.f_add(&d)?.f_to_kind(t.kind())?)
                })?;
                out.push((name, delta));
            } else {
                out.push((name, t.detach()));
            }
        }
        Ok(out)
    }

    /// Writes the adapter as peft's `save_pretrained` does and the value head beside it, as
    /// TRL's: adapter_config.json (base_model_name_or_path = where the base came from),
    /// adapter_model.safetensors, model.safetensors with `v_head.*` only. Each file atomically.
    pub(crate) fn save(&self, dir: &Path, wrapped: &Wrapped) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| vh_hub::HubError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut config = self.config.clone();
        if let Some(source) = &wrapped.source_dir {
            if config.base_model_name_or_path.is_none() {
                config.base_model_name_or_path = Some(source.display().to_string());
            }
        }
        let mut adapter_tensors = Vec::new();
        let mut head = Vec::new();
        for (name, t) in vh_core::state::state_dict(&wrapped.vs) {
            if name.starts_with(V_HEAD_PREFIX) {
                head.push((name, t));
            } else if let Some(saved) = self.saved_name(&name) {
                adapter_tensors.push((saved, t));
            }
        }
        let json = serde_json::to_vec_pretty(&config.to_json()).expect("a JSON value serialises");
        vh_hub::atomic_write(&dir.join("adapter_config.json"), &json)?;
        vh_hub::write_safetensors(&dir.join("adapter_model.safetensors"), &adapter_tensors)?;
        vh_hub::write_safetensors(&dir.join("model.safetensors"), &head)?;
        Ok(())
    }
}

/// Where the policy adapter of [`CausalLmWithValueHead::from_folder_with_reward_adapter`]
/// comes from.
#[derive(Debug, Clone, Copy)]
pub enum PolicyAdapter<'a> {
    /// A new adapter of this config (TRL's `peft_config`).
    Fresh(&'a LoraConfig),
    /// A saved adapter folder.
    Folder(&'a Path),
}

/// An adapter folder read from disk: its config, its tensors under our parameter names, and the
/// value head TRL saves beside it (when present).
struct AdapterFolder {
    config: LoraConfig,
    tensors: Vec<(String, Tensor)>,
    v_head: Vec<(String, Tensor)>,
}

/// Our parameter name for a tensor name of a peft adapter file (`base_model.model.` prefix;
/// an adapter name after `lora_A` / `lora_B` / `modules_to_save`, as in peft's in-memory names,
/// and `base_layer` dropped).
fn our_name(key: &str) -> Result<String> {
    let rest = key.strip_prefix(PEFT_PREFIX).ok_or_else(|| {
        Error::InvalidOption(format!(
            "adapter tensor `{}` does not start with `{PEFT_PREFIX}` (not a peft adapter file?)",
            vh_hub::validate::printable(key)
        ))
    })?;
    let mut parts: Vec<&str> = rest.split('.').collect();
    let mut i = 0;
    while i < parts.len() {
        match parts[i] {
            "lora_A" | "lora_B" if i + 2 < parts.len() => {
                // `lora_A.<adapter>.weight` -> `lora_A.weight`
                parts.remove(i + 1);
            }
            "modules_to_save" if i + 2 < parts.len() => {
                parts.remove(i);
                parts.remove(i);
                continue;
            }
            "base_layer" => {
                parts.remove(i);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(parts.join("."))
}

fn read_adapter_folder(dir: &Path) -> Result<AdapterFolder> {
    let config_path = dir.join("adapter_config.json");
    let bytes = vh_hub::files::read_capped(&config_path, 1 << 20)?;
    let json: Value = serde_json::from_slice(&bytes)
        .map_err(|e| vh_core::Error::Config(format!("{}: {e}", config_path.display())))?;
    let config = LoraConfig::from_json(&json)?;
    let safetensors = dir.join("adapter_model.safetensors");
    let bin = dir.join("adapter_model.bin");
    let raw = if safetensors.exists() {
        vh_hub::read_safetensors(&safetensors)?
    } else if bin.exists() {
        vh_hub::torch_bin::read_torch_bin(&bin)?
    } else {
        return Err(vh_core::Error::MissingTensor(format!(
            "{}: no adapter_model.safetensors or adapter_model.bin",
            dir.display()
        ))
        .into());
    };
    let tensors = raw
        .into_iter()
        .map(|(k, t)| Ok((our_name(&k)?, t)))
        .collect::<Result<Vec<_>>>()?;
    // TRL saves the value head beside the adapter (pytorch_model.bin, v_head.* only).
    let mut v_head = Vec::new();
    for file in ["model.safetensors", "pytorch_model.bin"] {
        let path = dir.join(file);
        if path.exists() {
            let all = if file.ends_with(".bin") {
                vh_hub::torch_bin::read_torch_bin(&path)?
            } else {
                vh_hub::read_safetensors(&path)?
            };
            v_head = all.into_iter().filter(|(k, _)| k.starts_with(V_HEAD_PREFIX)).collect();
            break;
        }
    }
    Ok(AdapterFolder {
        config,
        tensors,
        v_head,
    })
}

/// The base checkpoint's tensors with the adapter folder's (LoRA tensors, trained biases,
/// `modules_to_save`, TRL's value head) in place of the base's of the same names.
fn with_adapter_tensors(base: Vec<(String, Tensor)>, folder: AdapterFolder) -> (LoraConfig, Vec<(String, Tensor)>) {
    let replaced: BTreeSet<String> = folder
        .tensors
        .iter()
        .chain(&folder.v_head)
        .map(|(n, _)| n.clone())
        .collect();
    let mut tensors: Vec<(String, Tensor)> = base.into_iter().filter(|(n, _)| !replaced.contains(n)).collect();
    tensors.extend(folder.tensors);
    tensors.extend(folder.v_head);
    (folder.config, tensors)
}

/// Peft's initialisation of the policy adapter's parameters that `tensors` lacks, in name
/// order: the draws from libtorch's global generator then follow a fixed order, so a seeded fresh
/// adapter is reproducible (the var store's map iterates in another order in each process).
pub(crate) fn fresh_adapter_tensors(
    vs: &VarStore,
    tensors: &[(String, Tensor)],
    device: tch::Device,
) -> Result<Vec<(String, Tensor)>> {
    let have: BTreeSet<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let mut fresh = Vec::new();
    for (name, t) in variables {
        if is_lora_parameter(&name) && !have.contains(name.as_str()) {
            let init = vh_core::lora::fresh_parameter(&name, &t.size(), device)?;
            fresh.push((name, init));
        }
    }
    Ok(fresh)
}

/// The adapter constructors of a value-head wrapper with a `from_parts_with(config, tensors,
/// options, Option<AdapterSpec>)`: the same for decoder-only and encoder-decoder models.
macro_rules! adapter_constructors {
    ($ty:ty) => {
        impl $ty {
            /// Loads the base model folder `base` with the peft LoRA adapter folder `adapter`
            /// built in, as `PeftModel.from_pretrained(base_model, adapter)` under TRL's wrapper:
            /// the value head from the adapter folder when TRL saved one there, else from the
            /// base folder, else fresh. The base is frozen; the adapter, value head,
            /// `modules_to_save` and the biases `bias` selects train.
            pub fn from_folder_with_adapter(
                base: impl AsRef<Path>,
                adapter: impl AsRef<Path>,
                options: &LoadOptions,
            ) -> Result<Self> {
                let folder = read_adapter_folder(adapter.as_ref())?;
                let contents = read_folder(base.as_ref())?;
                let (config, tensors) = with_adapter_tensors(contents.tensors, folder);
                let spec = AdapterSpec {
                    policy: &config,
                    fresh: false,
                    reward: None,
                };
                // Every adapted layer must find its adapter tensors (a missing one is a
                // placeholder the loader reports).
                let mut model = Self::from_parts_with(contents.config, tensors, options, Some(spec))?;
                model.wrapped.generation_config = contents.generation_config;
                model.wrapped.source_dir = Some(base.as_ref().to_path_buf());
                if let Some(a) = model.wrapped.adapter.as_mut() {
                    a.config.base_model_name_or_path = config.base_model_name_or_path.clone();
                }
                Ok(model)
            }

            /// Loads an adapter folder whose `base_model_name_or_path` names the base (a folder
            /// or a Hub repo id), as TRL's `from_pretrained(adapter_folder)`.
            pub fn from_adapter_folder(adapter: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
                let folder = read_adapter_folder(adapter.as_ref())?;
                let base = folder.config.base_model_name_or_path.clone().ok_or_else(|| {
                    Error::InvalidOption(
                        "adapter_config.json has no base_model_name_or_path: pass the base folder".into(),
                    )
                })?;
                let base_dir = vh_hub::resolve_model(&base, &options.hub)?;
                Self::from_folder_with_adapter(base_dir, adapter, options)
            }

            /// Loads `base` with a new adapter of `config` (peft's initialisation: `lora_A`
            /// Kaiming-uniform, `lora_B` zero, so outputs start unchanged), as TRL's
            /// `from_pretrained(base, peft_config=config)` / peft's `get_peft_model`.
            pub fn with_new_adapter(
                base: impl AsRef<Path>,
                config: &LoraConfig,
                options: &LoadOptions,
            ) -> Result<Self> {
                let contents = read_folder(base.as_ref())?;
                let spec = AdapterSpec {
                    policy: config,
                    fresh: true,
                    reward: None,
                };
                let mut model = Self::from_parts_with(contents.config, contents.tensors, options, Some(spec))?;
                model.wrapped.generation_config = contents.generation_config;
                model.wrapped.source_dir = Some(base.as_ref().to_path_buf());
                Ok(model)
            }

            /// The adapter's config, when the model has one.
            pub fn adapter_config(&self) -> Option<&LoraConfig> {
                self.wrapped.adapter.as_ref().map(|a| &a.config)
            }

            /// The modules (full HF names) that carry the adapter.
            pub fn adapted_modules(&self) -> Vec<String> {
                self.wrapped
                    .adapter
                    .as_ref()
                    .map(|a| a.adapted.iter().cloned().collect())
                    .unwrap_or_default()
            }

            /// Switches the adapter on or off (off: the base model's outputs, as peft's
            /// `disable_adapter()`, which TRL's PPO uses as the reference model). An error
            /// without an adapter.
            pub fn set_adapter_enabled(&self, enabled: bool) -> Result<()> {
                self.wrapped.adapter()?.switches.set_enabled(enabled);
                Ok(())
            }

            /// Writes the adapter as peft and TRL do (what `save_pretrained` writes for a model
            /// with an adapter); an error without one.
            pub fn save_adapter(&self, dir: impl AsRef<Path>) -> Result<()> {
                self.wrapped.adapter()?.save(dir.as_ref(), &self.wrapped)
            }

            /// The state dict with the adapter merged into the base weights (peft's
            /// `merge_and_unload`): `W + scaling * B @ A` (transposed for `fan_in_fan_out`
            /// layers such as GPT-2's Conv1D), without adapter tensors; the model itself is
            /// unchanged.
            pub fn merged_state_dict(&self) -> Result<Vec<(String, Tensor)>> {
                self.wrapped.adapter()?.merged_state_dict(&self.wrapped.vs)
            }

            /// Saves the merged model as a plain TRL/HF folder (peft's `merge_and_unload()` then
            /// `save_pretrained`): config.json, generation_config.json, weights with the value
            /// head.
            pub fn save_merged(&self, dir: impl AsRef<Path>, max_shard_size: Option<u64>) -> Result<()> {
                let tensors = self.merged_state_dict()?;
                vh_hub::write_checkpoint(
                    dir.as_ref(),
                    &self.wrapped.config,
                    self.wrapped.generation_config.as_ref(),
                    &tensors,
                    max_shard_size,
                )?;
                Ok(())
            }
        }
    };
}

adapter_constructors!(CausalLmWithValueHead);
adapter_constructors!(Seq2SeqLmWithValueHead);

impl Wrapped {
    /// The adapter, or the error every adapter operation gives a model without one.
    fn adapter(&self) -> Result<&Adapter> {
        self.adapter
            .as_ref()
            .ok_or_else(|| Error::InvalidOption("this model has no adapter".into()))
    }
}

impl CausalLmWithValueHead {
    /// Loads `base` with a policy adapter and TRL's reward adapter, as TRL's
    /// `from_pretrained(..., peft_config=... or an adapter folder, reward_adapter=DIR)`: the
    /// policy adapter from the folder `policy` or fresh from a config; the reward adapter (a
    /// peft adapter trained for sequence classification: its LoRA tensors and `score` head) from
    /// `reward_adapter`, frozen and switched on only by [`Self::compute_reward_score`].
    pub fn from_folder_with_reward_adapter(
        base: impl AsRef<Path>,
        policy: PolicyAdapter<'_>,
        reward_adapter: impl AsRef<Path>,
        options: &LoadOptions,
    ) -> Result<Self> {
        let contents = read_folder(base.as_ref())?;
        let rm = read_adapter_folder(reward_adapter.as_ref())?;
        // The score head: TRL takes every tensor whose name contains `score`, keyed by its
        // last name component.
        let mut weight = None;
        let mut bias = None;
        let mut rm_tensors = Vec::new();
        for (name, t) in rm.tensors {
            if name.split('.').any(|c| c == "score") {
                match name.rsplit('.').next() {
                    Some("weight") => weight = Some(t),
                    Some("bias") => bias = Some(t),
                    _ => {}
                }
            } else if let Some(rest) = name.strip_suffix(".weight").filter(|_| is_lora_parameter(&name)) {
                rm_tensors.push((format!("{rest}.{REWARD_ADAPTER}.weight"), t));
            }
        }
        let weight = weight.ok_or_else(|| {
            Error::InvalidOption(format!(
                "{}: the reward adapter has no `score` tensor (train it for sequence classification)",
                reward_adapter.as_ref().display()
            ))
        })?;
        let device = options.device;
        let head = RewardHead {
            weight: weight.f_to_device(device)?.f_to_kind(options.dtype)?,
            bias: bias
                .map(|b| b.f_to_device(device)?.f_to_kind(options.dtype))
                .transpose()?,
        };
        let mut rm_config = rm.config.clone();
        // The classification head is the score layer above, not a module of this model.
        rm_config.modules_to_save.clear();
        let (policy_config, fresh, mut tensors) = match policy {
            PolicyAdapter::Fresh(config) => (config.clone(), true, contents.tensors),
            PolicyAdapter::Folder(dir) => {
                let folder = read_adapter_folder(dir)?;
                let replaced: BTreeSet<String> = folder
                    .tensors
                    .iter()
                    .chain(&folder.v_head)
                    .map(|(n, _)| n.clone())
                    .collect();
                let mut tensors: Vec<(String, Tensor)> = contents
                    .tensors
                    .into_iter()
                    .filter(|(n, _)| !replaced.contains(n))
                    .collect();
                tensors.extend(folder.tensors);
                tensors.extend(folder.v_head);
                (folder.config, false, tensors)
            }
        };
        tensors.extend(rm_tensors);
        let spec = AdapterSpec {
            policy: &policy_config,
            fresh,
            reward: Some((&rm_config, head)),
        };
        let mut model = Self::from_parts_with(contents.config, tensors, options, Some(spec))?;
        model.wrapped.generation_config = contents.generation_config;
        model.wrapped.source_dir = Some(base.as_ref().to_path_buf());
        Ok(model)
    }

    /// TRL's `compute_reward_score`: the reward adapter's scores [B, T, num_labels] (f32) at
    /// every position, computed with the reward adapter switched on and the policy adapter off,
    /// in eval mode and without gradients; both are switched back afterwards. (TRL also leaves
    /// the policy in eval mode afterwards; the train flag here is untouched.)
    pub fn compute_reward_score(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let adapter = self.wrapped.adapter.as_ref();
        let reward = adapter.and_then(|a| a.reward.as_ref()).ok_or_else(|| {
            Error::InvalidOption(
                "this model has no reward adapter: load it with from_folder_with_reward_adapter".into(),
            )
        })?;
        let policy = &adapter.expect("a reward adapter implies a policy adapter").switches;
        struct Restore<'a>(&'a AdapterSwitches, bool, &'a AdapterSwitches);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                self.0.set_enabled(self.1);
                self.2.set_enabled(false);
            }
        }
        let _restore = Restore(policy, policy.is_enabled(), &reward.switches);
        policy.set_enabled(false);
        reward.switches.set_enabled(true);
        tch::no_grad(|| -> Result<Tensor> {
            let hidden = self.last_hidden_state(input_ids, attention_mask)?;
            let scores = hidden.f_linear(&reward.head.weight, reward.head.bias.as_ref())?;
            Ok(scores.f_to_kind(tch::Kind::Float)?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_map_to_ours() {
        for (peft, ours) in [
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                "model.layers.0.self_attn.q_proj.lora_A.weight",
            ),
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
                "model.layers.0.self_attn.q_proj.lora_B.weight",
            ),
            (
                "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias",
                "transformer.h.0.attn.c_attn.bias",
            ),
            (
                "base_model.model.lm_head.modules_to_save.default.weight",
                "lm_head.weight",
            ),
            ("base_model.model.lm_head.weight", "lm_head.weight"),
        ] {
            assert_eq!(our_name(peft).unwrap(), ours);
        }
        assert!(our_name("model.layers.0.q_proj.lora_A.weight").is_err());
    }
}

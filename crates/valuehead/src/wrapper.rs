//! What the causal and the seq2seq wrappers share, as TRL's `PreTrainedModelWrapper`: the var
//! store, the value head, loading a checkpoint into both, the state dict, train mode.

use crate::error::{Error, Result};
use crate::options::{check_device, LoadOptions};
use serde_json::Value;
use std::collections::BTreeSet;
use tch::{nn::VarStore, Tensor};
use vh_core::state::{cast_variables, load_variables};
use vh_core::{ValueHead, ValueHeadConfig};

/// Prefix of the value head's tensors in state dicts and checkpoints.
pub const V_HEAD_PREFIX: &str = "v_head.";

/// The parts every value-head model has besides its backbone.
#[derive(Debug)]
pub(crate) struct Wrapped {
    pub(crate) vs: VarStore,
    pub(crate) v_head: ValueHead,
    pub(crate) config: Value,
    pub(crate) generation_config: Option<Value>,
    /// The folder the model was loaded from, whose tokenizer files a push carries along.
    pub(crate) source_dir: Option<std::path::PathBuf>,
    pub(crate) train: bool,
    /// The options it was loaded with (a reference model is built with the same).
    pub(crate) options: LoadOptions,
    /// The LoRA adapter built into the backbone, if any.
    pub(crate) adapter: Option<crate::lora::Adapter>,
}

/// Checks the options and config.json before anything is built: the device exists, the dtype
/// is a float kind, and the listed architectures (if any) have an LM head.
pub(crate) fn check_before_load(config: &Value, options: &LoadOptions) -> Result<()> {
    check_device(options.device)?;
    architecture(config)?;
    if !vh_core::tensor::is_float_kind(options.dtype) {
        return Err(Error::InvalidOption(format!(
            "dtype must be a float kind, got {:?}",
            options.dtype
        )));
    }
    let archs = config
        .get("architectures")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty());
    if let Some(archs) = archs {
        let has_head = archs.iter().filter_map(Value::as_str).any(|a| {
            a.ends_with("LMHeadModel") || a.ends_with("ForCausalLM") || a.ends_with("ForConditionalGeneration")
        });
        if !has_head {
            return Err(Error::NoLmHead(format!(
                "config.json lists architectures {} and none has an LM head (*LMHeadModel, *ForCausalLM, *ForConditionalGeneration)",
                config["architectures"]
            )));
        }
    }
    Ok(())
}

/// What a local checkpoint folder holds for loading.
pub(crate) struct FolderContents {
    pub(crate) config: Value,
    pub(crate) generation_config: Option<Value>,
    pub(crate) tensors: Vec<(String, Tensor)>,
}

/// Reads config.json, generation_config.json (if any) and the weights of a model folder.
pub(crate) fn read_folder(dir: &std::path::Path) -> Result<FolderContents> {
    let folder = vh_hub::ModelFolder::open(dir)?;
    Ok(FolderContents {
        config: folder.config()?,
        generation_config: folder.generation_config()?,
        tensors: folder.tensors()?,
    })
}

/// The tokenizer files a model folder may hold.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "added_tokens.json",
];

/// A fresh, empty folder for staging a push.
pub(crate) fn staging_dir() -> Result<std::path::PathBuf> {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("valuehead-push-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(dir)
}

/// Copies the tokenizer files of `source` (if any) into `target`, with the upload's rules for
/// symlinks (`vh_hub::uploadable_file`): a link is followed only to a file inside `source` (or,
/// for a model loaded from the Hub cache, into that repo's blobs), so that a `tokenizer.json`
/// linking to e.g. /etc/passwd is an error, not an upload of its target.
pub(crate) fn copy_tokenizer_files(source: Option<&std::path::Path>, target: &std::path::Path) -> Result<()> {
    let Some(source) = source else { return Ok(()) };
    for name in TOKENIZER_FILES {
        let from = source.join(name);
        if std::fs::symlink_metadata(&from).is_err() {
            continue;
        }
        if let Some(real) = vh_hub::uploadable_file(source, &from)? {
            std::fs::copy(&real, target.join(name)).map_err(|e| vh_hub::HubError::io(&real, e))?;
        }
    }
    Ok(())
}

/// The registry entry of a config.json's `model_type`: a missing `model_type` is a config
/// error, one the registry does not list is [`Error::UnsupportedModel`].
pub(crate) fn architecture(config: &Value) -> Result<&'static vh_models::Architecture> {
    let model_type = config.get("model_type").and_then(Value::as_str).ok_or_else(|| {
        Error::Model(vh_core::Error::Config(
            "config.json has no `model_type` string".to_string(),
        ))
    })?;
    vh_models::architecture(model_type).ok_or_else(|| {
        Error::UnsupportedModel(format!(
            "{model_type} (supported: {})",
            vh_models::registry::model_types().join(", ")
        ))
    })
}

/// Hands the heap pages that loading freed (the checkpoint's copies, the f32 weights after a
/// cast) back to the OS: glibc keeps freed blocks below its mmap threshold in the heap, where
/// they would go on counting in the process's resident memory.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused heap memory to the kernel; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Wrapped {
    /// Fills the backbone's parameters in `vs` (placeholders from `vh_core::param::deferred`)
    /// from the checkpoint through `parameter_name` (`None` skips a key), every shape checked
    /// before any data moves; then adds the value head, from `v_head.*` when present, else freshly
    /// initialised with a warning, as TRL does. Finally casts the backbone to the options' dtype;
    /// the head stays f32.
    pub(crate) fn load(
        vs: VarStore,
        config: Value,
        tensors: Vec<(String, Tensor)>,
        options: &LoadOptions,
        hidden_size: i64,
        parameter_name: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let head_config = ValueHeadConfig::resolve(&config, &options.value_head, Some(hidden_size))?;

        let mut backbone_tensors = Vec::new();
        let mut head_tensors = Vec::new();
        for (key, tensor) in tensors {
            if key.starts_with(V_HEAD_PREFIX) {
                head_tensors.push((key, tensor));
            } else if let Some(name) = parameter_name(&key) {
                backbone_tensors.push((name, tensor));
            }
        }
        let report = load_variables(&vs, backbone_tensors)?;
        if report.missing.iter().any(|n| n.as_str() == "lm_head.weight") {
            return Err(Error::NoLmHead(
                "the checkpoint has no `lm_head.weight` and its config does not tie the embeddings".to_string(),
            ));
        }
        if let Some(first) = report.missing.first() {
            return Err(vh_core::Error::MissingTensor(first.to_string()).into());
        }
        if !report.unexpected.is_empty() {
            log::warn!(
                "ignoring checkpoint tensors the model does not use: {}",
                report.unexpected.join(", ")
            );
        }
        // The head's width comes from config keys the backbone may not use (e.g.
        // `word_embed_proj_dim`); it must be a width the loaded backbone has, so that a hostile
        // config cannot make a fresh head allocate what no checkpoint backs.
        let widths: BTreeSet<i64> = vs.variables().values().flat_map(|t| t.size()).collect();
        if !widths.contains(&head_config.hidden_size) {
            return Err(vh_core::Error::Config(format!(
                "the value head's width {} (from config.json) is no width of the checkpoint's tensors",
                head_config.hidden_size
            ))
            .into());
        }
        let v_head = ValueHead::new(vs.root().sub("v_head"), &head_config)?;
        if head_tensors.is_empty() {
            log::warn!(
                "the checkpoint has no value head (v_head.*): a fresh one was initialised; \
                 this is expected when starting training, not when resuming it"
            );
        } else {
            let head_report = load_variables(&vs, head_tensors)?;
            let head_missing: Vec<&String> = head_report
                .missing
                .iter()
                .filter(|n| n.starts_with(V_HEAD_PREFIX))
                .collect();
            if !head_missing.is_empty() {
                log::warn!(
                    "value-head tensors missing from the checkpoint, left freshly initialised: {head_missing:?}"
                );
            }
            if !head_report.unexpected.is_empty() {
                log::warn!(
                    "ignoring unknown value-head tensors: {}",
                    head_report.unexpected.join(", ")
                );
            }
        }
        // The value head stays f32, as TRL's; LoRA adapters too, as peft keeps them for
        // half-precision bases.
        cast_variables(&vs, options.dtype, |name| {
            !name.starts_with(V_HEAD_PREFIX) && !vh_core::lora::is_lora_parameter(name)
        })?;
        release_freed_memory();
        Ok(Self {
            vs,
            v_head,
            config,
            generation_config: None,
            source_dir: None,
            train: false,
            options: options.clone(),
            adapter: None,
        })
    }

    /// Every parameter under its HF name, plus the tied aliases HF's state dict also lists
    /// (alias, parameter), sorted by name.
    pub(crate) fn state_dict(&self, aliases: &[(&str, &str)]) -> Vec<(String, Tensor)> {
        let mut entries = vh_core::state::state_dict(&self.vs);
        for (alias, target) in aliases {
            if let Some(t) = entries
                .iter()
                .find(|(n, _)| n == target)
                .map(|(_, t)| t.shallow_clone())
            {
                entries.push((alias.to_string(), t));
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries
    }
}

/// The accessors both wrappers expose; each has a `wrapped: Wrapped` field and
/// `tied_aliases()` and `saved_aliases()` methods.
macro_rules! wrapper_accessors {
    ($ty:ty) => {
        impl $ty {
            /// Every tensor under its HF name: the backbone's (tied aliases included, as HF lists
            /// them) and the value head's as `v_head.summary.weight` / `v_head.summary.bias`.
            pub fn state_dict(&self) -> Vec<(String, tch::Tensor)> {
                self.wrapped.state_dict(&self.tied_aliases())
            }

            /// The var store holding every parameter (for optimisers).
            pub fn var_store(&self) -> &tch::nn::VarStore {
                &self.wrapped.vs
            }

            /// The value head.
            pub fn v_head(&self) -> &vh_core::ValueHead {
                &self.wrapped.v_head
            }

            /// config.json as loaded.
            pub fn config(&self) -> &serde_json::Value {
                &self.wrapped.config
            }

            /// The generation defaults of this model: its folder's generation_config.json over its
            /// config.json over HF's defaults.
            pub fn default_generation_config(&self) -> Result<crate::GenerationConfig> {
                crate::GenerationConfig::from_model(&self.wrapped.config, self.wrapped.generation_config.as_ref())
            }

            /// Sets the generation_config.json contents the defaults come from.
            pub fn set_generation_config_json(&mut self, generation_config: Option<serde_json::Value>) {
                self.wrapped.generation_config = generation_config;
            }

            /// Loads a checkpoint from a local folder or a Hub repo id (downloaded through the HF
            /// cache, see [`vh_hub::HubOptions`] in `options.hub`), as TRL's `from_pretrained`.
            pub fn from_pretrained(id_or_path: &str, options: &crate::LoadOptions) -> Result<Self> {
                let folder = vh_hub::resolve_model(id_or_path, &options.hub)?;
                Self::from_folder(folder, options)
            }

            /// Saves the model as TRL's `save_pretrained` does: config.json (as loaded),
            /// generation_config.json (when the model has one), and the backbone under HF names
            /// with the value head as `v_head.summary.*`, tied weights stored once, in one
            /// model.safetensors or, above `max_shard_size` bytes, in shards with an index. The
            /// folder is written aside, flushed and swapped in atomically, so a process killed at
            /// any point leaves `dir` as the old or the new checkpoint, and the next save removes
            /// what a killed one left (see [`vh_hub::checkpoint`]).
            pub fn save_pretrained(&self, dir: impl AsRef<std::path::Path>, max_shard_size: Option<u64>) -> Result<()> {
                if let Some(adapter) = &self.wrapped.adapter {
                    // TRL with a peft model: the adapter in peft's files, the value head beside it.
                    return adapter.save(dir.as_ref(), &self.wrapped);
                }
                // Parameters once each, plus the tied names transformers needs in the file to
                // load the model back (Bart untied: the stacks' embed_tokens).
                let tensors = self.wrapped.state_dict(&self.saved_aliases());
                vh_hub::write_checkpoint(
                    dir.as_ref(),
                    &self.wrapped.config,
                    self.wrapped.generation_config.as_ref(),
                    &tensors,
                    max_shard_size,
                )?;
                Ok(())
            }

            /// Uploads the model to the Hub repo `repo_id` as TRL's `push_to_hub` does: the files
            /// `save_pretrained` writes plus the tokenizer files of the folder it was loaded from,
            /// in one commit (the repo is created when missing). Returns the commit id.
            pub fn push_to_hub(&self, repo_id: &str, options: &vh_hub::PushOptions) -> Result<String> {
                let staging = crate::wrapper::staging_dir()?;
                let result = (|| {
                    self.save_pretrained(&staging, None)?;
                    crate::wrapper::copy_tokenizer_files(self.wrapped.source_dir.as_deref(), &staging)?;
                    Ok(vh_hub::push_folder(repo_id, &staging, options)?)
                })();
                let _ = std::fs::remove_dir_all(&staging);
                result
            }

            /// Switches dropout on (train) or off (eval, the default).
            pub fn set_train(&mut self, train: bool) {
                self.wrapped.train = train;
                if let Some(adapter) = &self.wrapped.adapter {
                    adapter.switches.set_train(train);
                }
            }

            /// Whether the model is in train mode.
            pub fn is_train(&self) -> bool {
                self.wrapped.train
            }
        }
    };
}
pub(crate) use wrapper_accessors;

//! `CausalLmWithValueHead`: a causal language model plus a value head, as TRL's
//! `AutoModelForCausalLMWithValueHead`.

use crate::error::{Error, Result};
use crate::options::{check_device, LoadOptions};
use serde_json::Value;
use std::path::Path;
use tch::{nn::VarStore, Kind, Tensor};
use vh_core::state::{cast_variables, load_variables};
use vh_core::tensor::{causal_lm_loss, check_labels, expect_rank};
use vh_core::{ValueHead, ValueHeadConfig};
use vh_hub::ModelFolder;
use vh_models::gpt2::{Gpt2Config, Gpt2LmHeadModel};
use vh_models::Cache;

/// Prefix of the value head's tensors in state dicts and checkpoints.
pub const V_HEAD_PREFIX: &str = "v_head.";

/// The causal backbones this library implements.
#[derive(Debug)]
pub enum CausalBackbone {
    /// GPT-2 (`model_type` "gpt2").
    Gpt2(Gpt2LmHeadModel),
}

/// What a backbone pass gives the wrapper.
struct BackboneOutput {
    logits: Tensor,
    last_hidden_state: Tensor,
    cache: Cache,
}

impl CausalBackbone {
    fn build(vs: &VarStore, config: &Value) -> Result<Self> {
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Error::Model(vh_core::Error::Config(
                    "config.json has no `model_type` string".to_string(),
                ))
            })?;
        match model_type {
            "gpt2" => Ok(Self::Gpt2(Gpt2LmHeadModel::new(
                vs.root(),
                &Gpt2Config::from_json(config)?,
            )?)),
            other => Err(Error::UnsupportedModel(other.to_string())),
        }
    }

    fn parameter_name(&self, key: &str) -> Option<String> {
        match self {
            Self::Gpt2(m) => m.parameter_name(key),
        }
    }

    fn vocab_size(&self) -> i64 {
        match self {
            Self::Gpt2(m) => m.transformer.config().vocab_size,
        }
    }

    fn forward(&self, input: &CausalLmInput<'_>, train: bool) -> Result<BackboneOutput> {
        match self {
            Self::Gpt2(m) => {
                let out = m.forward(
                    input.input_ids,
                    input.attention_mask,
                    input.position_ids,
                    input.past,
                    train,
                )?;
                Ok(BackboneOutput {
                    logits: out.logits,
                    last_hidden_state: out.last_hidden_state,
                    cache: out.cache,
                })
            }
        }
    }

    /// The tied-weight aliases HF's state dict lists besides the parameters: (alias, parameter).
    fn tied_aliases(&self) -> Vec<(&'static str, &'static str)> {
        match self {
            Self::Gpt2(m) if m.is_tied() => vec![("lm_head.weight", "transformer.wte.weight")],
            Self::Gpt2(_) => vec![],
        }
    }
}

/// Architectures whose checkpoints carry a language-model head.
fn has_lm_head_architecture(config: &Value) -> Option<bool> {
    let archs = config.get("architectures")?.as_array()?;
    if archs.is_empty() {
        return None;
    }
    Some(archs.iter().filter_map(Value::as_str).any(|a| {
        a.ends_with("LMHeadModel")
            || a.ends_with("ForCausalLM")
            || a.ends_with("ForConditionalGeneration")
    }))
}

/// The inputs of a forward pass; only `input_ids` is required.
#[derive(Debug, Clone, Copy)]
pub struct CausalLmInput<'a> {
    /// Token ids, i64 [batch, seq].
    pub input_ids: &'a Tensor,
    /// 1 for tokens to attend, 0 for padding, [batch, past + seq].
    pub attention_mask: Option<&'a Tensor>,
    /// Explicit positions [batch, seq]; by default derived from the attention mask.
    pub position_ids: Option<&'a Tensor>,
    /// The cache returned by the previous pass.
    pub past: Option<&'a Cache>,
    /// Targets [batch, seq] for the shifted LM loss; -100 is ignored.
    pub labels: Option<&'a Tensor>,
}

impl<'a> CausalLmInput<'a> {
    /// Inputs with only token ids.
    pub fn new(input_ids: &'a Tensor) -> Self {
        Self {
            input_ids,
            attention_mask: None,
            position_ids: None,
            past: None,
            labels: None,
        }
    }
    /// Sets the attention mask.
    pub fn attention_mask(mut self, mask: &'a Tensor) -> Self {
        self.attention_mask = Some(mask);
        self
    }
    /// Sets explicit position ids.
    pub fn position_ids(mut self, position_ids: &'a Tensor) -> Self {
        self.position_ids = Some(position_ids);
        self
    }
    /// Continues from a cache.
    pub fn past(mut self, past: &'a Cache) -> Self {
        self.past = Some(past);
        self
    }
    /// Sets labels for the loss.
    pub fn labels(mut self, labels: &'a Tensor) -> Self {
        self.labels = Some(labels);
        self
    }
}

/// The outputs of a forward pass.
#[derive(Debug)]
pub struct CausalLmOutput {
    /// Next-token logits, f32 [batch, seq, vocab].
    pub logits: Tensor,
    /// Mean shifted cross-entropy, f32 scalar, when labels were given.
    pub loss: Option<Tensor>,
    /// One value per token, f32 [batch, seq].
    pub values: Tensor,
    /// Keys and values of every position so far, to pass as `past` to the next pass.
    pub past: Cache,
}

/// A causal language model with a value head.
#[derive(Debug)]
pub struct CausalLmWithValueHead {
    vs: VarStore,
    backbone: CausalBackbone,
    v_head: ValueHead,
    config: Value,
    train: bool,
}

impl CausalLmWithValueHead {
    /// Loads a local checkpoint folder (config.json + model.safetensors). The value head comes
    /// from the checkpoint's `v_head.*` tensors when it has them; otherwise a fresh head is
    /// initialised from the options and a warning is logged.
    pub fn from_folder(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let folder = ModelFolder::open(dir)?;
        let config = folder.config()?;
        let tensors = folder.tensors()?;
        Self::from_parts(config, tensors, options)
    }

    /// Builds the model from a parsed config.json and the checkpoint's named tensors.
    pub fn from_parts(
        config: Value,
        tensors: Vec<(String, Tensor)>,
        options: &LoadOptions,
    ) -> Result<Self> {
        check_device(options.device)?;
        if !vh_core::tensor::is_float_kind(options.dtype) {
            return Err(Error::InvalidOption(format!(
                "dtype must be a float kind, got {:?}",
                options.dtype
            )));
        }
        if has_lm_head_architecture(&config) == Some(false) {
            return Err(Error::NoLmHead(format!(
                "config.json lists architectures {} and none has an LM head; use a *LMHeadModel / *ForCausalLM checkpoint",
                config["architectures"]
            )));
        }
        let vs = VarStore::new(options.device);
        let backbone = CausalBackbone::build(&vs, &config)?;
        let head_config = ValueHeadConfig::resolve(&config, &options.value_head)?;
        let v_head = ValueHead::new(vs.root().sub("v_head"), &head_config)?;

        let mut backbone_tensors = Vec::new();
        let mut head_tensors = Vec::new();
        let mut has_lm_head_weight = false;
        for (key, tensor) in tensors {
            if let Some(rest) = key.strip_prefix(V_HEAD_PREFIX) {
                head_tensors.push((format!("{V_HEAD_PREFIX}{rest}"), tensor));
            } else {
                has_lm_head_weight |= key == "lm_head.weight";
                if let Some(name) = backbone.parameter_name(&key) {
                    backbone_tensors.push((name, tensor));
                }
            }
        }
        let report = load_variables(&vs, backbone_tensors)?;
        let missing: Vec<&String> = report
            .missing
            .iter()
            .filter(|n| !n.starts_with(V_HEAD_PREFIX))
            .collect();
        if missing.iter().any(|n| n.as_str() == "lm_head.weight") && !has_lm_head_weight {
            return Err(Error::NoLmHead(
                "the checkpoint has no `lm_head.weight` and its config does not tie the embeddings"
                    .to_string(),
            ));
        }
        if let Some(first) = missing.first() {
            return Err(vh_core::Error::MissingTensor(first.to_string()).into());
        }
        if !report.unexpected.is_empty() {
            log::warn!(
                "ignoring checkpoint tensors the model does not use: {}",
                report.unexpected.join(", ")
            );
        }
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
                log::warn!("value-head tensors missing from the checkpoint, left freshly initialised: {head_missing:?}");
            }
            if !head_report.unexpected.is_empty() {
                log::warn!(
                    "ignoring unknown value-head tensors: {}",
                    head_report.unexpected.join(", ")
                );
            }
        }
        cast_variables(&vs, options.dtype, |name| !name.starts_with(V_HEAD_PREFIX))?;
        Ok(Self {
            vs,
            backbone,
            v_head,
            config,
            train: false,
        })
    }

    /// Runs the model. `attention_mask` covers cached and new tokens; `labels` add the loss.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        past: Option<&Cache>,
        labels: Option<&Tensor>,
    ) -> Result<CausalLmOutput> {
        self.forward_with(&CausalLmInput {
            input_ids,
            attention_mask,
            position_ids: None,
            past,
            labels,
        })
    }

    /// Runs the model on the given inputs.
    pub fn forward_with(&self, input: &CausalLmInput<'_>) -> Result<CausalLmOutput> {
        expect_rank(input.input_ids, "input_ids", 2)?;
        if let Some(labels) = input.labels {
            let size = input.input_ids.size();
            check_labels(labels, size[0], size[1], self.backbone.vocab_size())?;
        }
        let out = self.backbone.forward(input, self.train)?;
        let values = self.v_head.forward(&out.last_hidden_state, self.train)?;
        let logits = if out.logits.kind() == Kind::Float {
            out.logits
        } else {
            out.logits.f_to_kind(Kind::Float)?
        };
        let loss = input
            .labels
            .map(|labels| causal_lm_loss(&logits, labels))
            .transpose()?;
        Ok(CausalLmOutput {
            logits,
            loss,
            values,
            past: out.cache,
        })
    }

    /// Every tensor under its HF name: the backbone's (tied aliases included, as HF lists them)
    /// and the value head's as `v_head.summary.weight` / `v_head.summary.bias`.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut entries = vh_core::state::state_dict(&self.vs);
        for (alias, target) in self.backbone.tied_aliases() {
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

    /// The var store holding every parameter (for optimisers).
    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    /// The backbone.
    pub fn backbone(&self) -> &CausalBackbone {
        &self.backbone
    }

    /// The value head.
    pub fn v_head(&self) -> &ValueHead {
        &self.v_head
    }

    /// config.json as loaded.
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// The vocabulary size.
    pub fn vocab_size(&self) -> i64 {
        self.backbone.vocab_size()
    }

    /// Switches dropout on (train) or off (eval, the default).
    pub fn set_train(&mut self, train: bool) {
        self.train = train;
    }

    /// Whether the model is in train mode.
    pub fn is_train(&self) -> bool {
        self.train
    }
}

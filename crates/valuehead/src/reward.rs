//! Reward models: HF's `AutoModelForSequenceClassification` for decoder-only architectures
//! (`GPT2ForSequenceClassification`, `LlamaForSequenceClassification`, ...), the models RLHF
//! scores rollouts with. A backbone from the registry without its LM head, and a `score` layer
//! (`Linear(hidden, num_labels, bias=False)`) read at each row's last non-pad token, exactly as
//! HF finds it.

use crate::error::{Error, Result};
use crate::options::{check_device, LoadOptions};
use serde_json::Value;
use std::path::Path;
use tch::{nn::VarStore, Kind, Tensor};
use vh_core::error::invalid;
use vh_core::ops::ScalarOps;
use vh_core::state::{cast_variables, load_variables};
use vh_models::inputs::{prepare_causal, CausalLimits};
use vh_models::{BuildOptions, CausalLm};

/// The outputs of a reward model's pass.
#[derive(Debug)]
pub struct SequenceClassifierOutput {
    /// One score per label for each row, read at its last non-pad token, f32 [batch, num_labels].
    pub logits: Tensor,
    /// The first label's score of each row (the reward of a one-label reward model), f32 [batch].
    pub rewards: Tensor,
    /// The position each row was read at, i64 [batch].
    pub last_non_pad_token: Tensor,
}

/// A decoder-only model with a sequence-classification head, as HF's
/// `AutoModelForSequenceClassification`: a reward model.
#[derive(Debug)]
pub struct SequenceClassifier {
    vs: VarStore,
    backbone: Box<dyn CausalLm>,
    /// `score.weight`, [num_labels, hidden].
    score: Tensor,
    config: Value,
    pad_token_id: Option<i64>,
    train: bool,
}

/// The number of labels a config describes, as transformers' `PretrainedConfig`: the size of
/// `id2label` when present, else `num_labels`, else 2.
pub fn num_labels(config: &Value) -> Result<i64> {
    if let Some(map) = config.get("id2label").filter(|v| !v.is_null()) {
        let map = map
            .as_object()
            .ok_or_else(|| vh_core::Error::Config("`id2label` must be an object".into()))?;
        if map.is_empty() {
            return Err(vh_core::Error::Config("`id2label` is empty: no labels to score".into()).into());
        }
        return Ok(map.len() as i64);
    }
    match config.get("num_labels").filter(|v| !v.is_null()) {
        Some(v) => v
            .as_i64()
            .filter(|n| *n > 0)
            .ok_or_else(|| vh_core::Error::Config(format!("`num_labels` must be a positive integer, got {v}")).into()),
        None => Ok(2),
    }
}

/// Checks that config.json describes a sequence classifier of a decoder-only architecture.
fn check_config(config: &Value, options: &LoadOptions) -> Result<()> {
    check_device(options.device)?;
    if !vh_core::tensor::is_float_kind(options.dtype) {
        return Err(Error::InvalidOption(format!(
            "dtype must be a float kind, got {:?}",
            options.dtype
        )));
    }
    let arch = crate::wrapper::architecture(config)?;
    if arch.is_seq2seq() {
        return Err(Error::UnsupportedModel(format!(
            "{}: sequence classification is implemented for decoder-only models",
            arch.model_type
        )));
    }
    // `architectures` naming another head (a causal LM folder) is allowed, as in transformers:
    // what matters is that the checkpoint holds `score.weight`, checked when loading.
    Ok(())
}

impl SequenceClassifier {
    /// Loads a local folder or a Hub repo id, as transformers'
    /// `AutoModelForSequenceClassification.from_pretrained`.
    pub fn from_pretrained(id_or_path: &str, options: &LoadOptions) -> Result<Self> {
        Self::from_folder(vh_hub::resolve_model(id_or_path, &options.hub)?, options)
    }

    /// Loads a local checkpoint folder (the formats the value-head models read).
    pub fn from_folder(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let contents = crate::wrapper::read_folder(dir.as_ref())?;
        Self::from_parts(contents.config, contents.tensors, options)
    }

    /// Builds the model from config.json and the checkpoint's tensors (whose data the parameters
    /// take over). Every backbone tensor and `score.weight` must be present: a reward model with a
    /// fresh head would score at random.
    pub fn from_parts(config: Value, tensors: Vec<(String, Tensor)>, options: &LoadOptions) -> Result<Self> {
        check_config(&config, options)?;
        let labels = num_labels(&config)?;
        let pad_token_id = match config.get("pad_token_id") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_i64()
                    .ok_or_else(|| vh_core::Error::Config(format!("`pad_token_id` must be an integer, got {v}")))?,
            ),
        };
        let vs = VarStore::new(options.device);
        let build = BuildOptions {
            attn_implementation: options.attn_implementation,
            without_lm_head: true,
        };
        let backbone = vh_core::param::deferred_for_checkpoint(tensors.len(), || {
            vh_models::registry::build_causal(vs.root(), &config, &build)
        })?;
        let score = vh_core::param::deferred(|| {
            vh_core::param::var(
                &vs.root().sub("score"),
                "weight",
                &[labels, backbone.hidden_size()],
                tch::nn::Init::Const(0.0),
            )
        })?;
        let mapped = tensors.into_iter().filter_map(|(key, t)| {
            if key == "score.weight" {
                Some((key, t))
            } else {
                backbone.parameter_name(&key).map(|name| (name, t))
            }
        });
        let report = load_variables(&vs, mapped)?;
        if let Some(first) = report.missing.first() {
            return Err(vh_core::Error::MissingTensor(first.clone()).into());
        }
        if !report.unexpected.is_empty() {
            log::warn!(
                "ignoring checkpoint tensors the model does not use: {}",
                report.unexpected.join(", ")
            );
        }
        cast_variables(&vs, options.dtype, |_| true)?;
        backbone.after_load()?;
        Ok(Self {
            vs,
            backbone,
            score,
            config,
            pad_token_id,
            train: false,
        })
    }

    /// Scores for every position, f32 [batch, seq, num_labels] (what TRL's `get_reward` reads
    /// at positions of its own choosing), with HF's default position ids.
    pub fn forward_all_positions(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_all_positions_with(input_ids, attention_mask, None)
    }

    /// [`SequenceClassifier::forward_all_positions`] with explicit position ids [batch, seq]
    /// (TRL's `get_reward` numbers each row from its first attended token).
    pub fn forward_all_positions_with(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        let limits = CausalLimits {
            vocab_size: self.backbone.vocab_size(),
            num_layers: self.backbone.num_layers(),
            max_positions: self.backbone.max_positions(),
        };
        let inputs = prepare_causal(input_ids, attention_mask, position_ids, None, limits, self.vs.device())?;
        let (hidden, _) = self.backbone.forward_hidden(&inputs, self.train)?;
        Ok(hidden.f_linear::<Tensor>(&self.score, None)?.f_to_kind(Kind::Float)?)
    }

    /// Scores each row at its last non-pad token, as HF's `*ForSequenceClassification`: the
    /// rightmost token that is not `pad_token_id` (so left and right padding both work; a row of
    /// padding only is read at position 0), or the last position when the config has no pad
    /// token, which HF (and so this) allows for one row only.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<SequenceClassifierOutput> {
        vh_core::tensor::expect_rank(input_ids, "input_ids", 2)?;
        let (batch, seq) = (input_ids.size()[0], input_ids.size()[1]);
        if self.pad_token_id.is_none() && batch != 1 {
            return Err(invalid(
                "config.json has no pad_token_id, so rows cannot be read at their last token: HF refuses batches of more than one row, and so do we",
            )
            .into());
        }
        let all = self.forward_all_positions(input_ids, attention_mask)?;
        let device = all.device();
        let last = match self.pad_token_id {
            None => Tensor::f_full([batch], seq - 1, (Kind::Int64, device))?,
            Some(pad) => {
                let non_pad = input_ids.f_to_device(device)?.s_ne(pad)?.f_to_kind(Kind::Int64)?;
                let indices = Tensor::f_arange(seq, (Kind::Int64, device))?;
                non_pad.f_mul(&indices)?.f_argmax(-1, false)?
            }
        };
        let rows = Tensor::f_arange(batch, (Kind::Int64, device))?;
        let logits = all.f_index(&[Some(rows), Some(last.shallow_clone())])?;
        Ok(SequenceClassifierOutput {
            rewards: logits.f_select(1, 0)?,
            logits,
            last_non_pad_token: last,
        })
    }

    /// Saves config.json (as loaded) and the weights (backbone under HF names, `score.weight`)
    /// as transformers' `save_pretrained` does, atomically.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>, max_shard_size: Option<u64>) -> Result<()> {
        let tensors = vh_core::state::state_dict(&self.vs);
        vh_hub::write_checkpoint(dir.as_ref(), &self.config, None, &tensors, max_shard_size)?;
        Ok(())
    }

    /// The number of labels (1 for a reward model).
    pub fn num_labels(&self) -> i64 {
        self.score.size()[0]
    }

    /// The var store holding every parameter (for training a reward model).
    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    /// config.json as loaded.
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// The backbone.
    pub fn backbone(&self) -> &dyn CausalLm {
        self.backbone.as_ref()
    }

    /// Switches dropout on (train) or off (eval, the default).
    pub fn set_train(&mut self, train: bool) {
        self.train = train;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labels_are_counted_as_transformers_does() {
        assert_eq!(num_labels(&json!({})).unwrap(), 2);
        assert_eq!(num_labels(&json!({"id2label": {"0": "LABEL_0"}})).unwrap(), 1);
        assert_eq!(num_labels(&json!({"num_labels": 3})).unwrap(), 3);
        assert_eq!(
            num_labels(&json!({"id2label": {"0": "a", "1": "b", "2": "c"}, "num_labels": 1})).unwrap(),
            3
        );
        assert!(num_labels(&json!({"id2label": {}})).is_err());
        assert!(num_labels(&json!({"num_labels": 0})).is_err());
    }
}

//! TRL's `ValueHead`: dropout, then `Linear(hidden, 1)`, giving one scalar per token.

use crate::error::{invalid, Error, Result};
use serde_json::Value;
use tch::{nn, Kind, Tensor};

/// How a fresh value head's weights are initialised (TRL's `v_head_init_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitStrategy {
    /// torch's `nn.Linear` default: weight and bias uniform in ±1/sqrt(hidden) (TRL's `None`).
    #[default]
    Default,
    /// Weight from N(0, `v_head_initializer_range`), bias zero (TRL's `"normal"`).
    Normal,
}

impl std::str::FromStr for InitStrategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" | "None" | "default" => Ok(Self::Default),
            "normal" => Ok(Self::Normal),
            other => Err(Error::Config(format!(
                "unknown v_head_init_strategy `{other}` (expected none or \"normal\")"
            ))),
        }
    }
}

/// The value-head options TRL's `from_pretrained` accepts; `None` means TRL's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ValueHeadOptions {
    /// Dropout before the linear layer, used when config.json has no `summary_dropout_prob` (default 0.1).
    pub summary_dropout_prob: Option<f64>,
    /// Standard deviation of the "normal" init strategy (default 0.2).
    pub v_head_initializer_range: Option<f64>,
    /// How a fresh head is initialised (default: torch's Linear init).
    pub v_head_init_strategy: Option<InitStrategy>,
}

/// A value head's resolved settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueHeadConfig {
    /// Input width: the backbone's hidden size (or `word_embed_proj_dim`).
    pub hidden_size: i64,
    /// Dropout probability; 0 means none.
    pub dropout_prob: f64,
    /// Initialisation of a fresh head.
    pub init: InitStrategy,
    /// Standard deviation for [`InitStrategy::Normal`].
    pub initializer_range: f64,
}

fn json_i64(config: &Value, key: &str) -> Result<Option<i64>> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .filter(|n| *n > 0)
            .map(Some)
            .ok_or_else(|| Error::Config(format!("`{key}` must be a positive integer, got {v}"))),
    }
}

impl ValueHeadConfig {
    /// Resolves the head's settings from the backbone's config.json and the options, as TRL does:
    /// the config's `summary_dropout_prob` wins over the option (null or 0 means no dropout), and
    /// the width is `word_embed_proj_dim` when present, else the decoder's hidden size of an
    /// encoder-decoder config with a `decoder` entry, else `hidden_size`: the backbone's (from
    /// its parsed config, defaults included, as TRL reads `config.hidden_size` from the
    /// transformers config object), or without one config.json's `hidden_size`, `n_embd` or
    /// `d_model`.
    pub fn resolve(config: &Value, options: &ValueHeadOptions, backbone_hidden_size: Option<i64>) -> Result<Self> {
        let dropout_prob = match config.get("summary_dropout_prob") {
            Some(Value::Null) => 0.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| Error::Config(format!("`summary_dropout_prob` must be a number, got {v}")))?,
            None => options.summary_dropout_prob.unwrap_or(0.1),
        };
        if !(0.0..=1.0).contains(&dropout_prob) {
            return Err(Error::Config(format!(
                "summary_dropout_prob must be in [0, 1], got {dropout_prob}"
            )));
        }
        let mut hidden_size = backbone_hidden_size;
        for key in ["hidden_size", "n_embd", "d_model"] {
            hidden_size = hidden_size.or(json_i64(config, key)?);
        }
        let decoder_hidden = match (
            config.get("is_encoder_decoder").and_then(Value::as_bool),
            config.get("decoder"),
        ) {
            (Some(true), Some(decoder)) => json_i64(decoder, "hidden_size")?,
            _ => None,
        };
        if let Some(width) = json_i64(config, "word_embed_proj_dim")?.or(decoder_hidden) {
            hidden_size = Some(width);
        }
        let hidden_size = hidden_size.ok_or_else(|| {
            Error::Config("config has none of word_embed_proj_dim, hidden_size, n_embd, d_model".to_string())
        })?;
        let initializer_range = options.v_head_initializer_range.unwrap_or(0.2);
        if !(initializer_range.is_finite() && initializer_range >= 0.0) {
            return Err(Error::Config(format!(
                "v_head_initializer_range must be >= 0, got {initializer_range}"
            )));
        }
        Ok(Self {
            hidden_size,
            dropout_prob,
            init: options.v_head_init_strategy.unwrap_or_default(),
            initializer_range,
        })
    }
}

/// A value head: `summary.weight` [1, hidden] and `summary.bias` [1], kept in f32.
#[derive(Debug)]
pub struct ValueHead {
    /// `summary.weight`, [1, hidden].
    pub weight: Tensor,
    /// `summary.bias`, [1].
    pub bias: Tensor,
    dropout_prob: f64,
    hidden_size: i64,
}

impl ValueHead {
    /// Creates a freshly initialised head whose parameters live under `vs` (`summary.weight`,
    /// `summary.bias`), in the var store's default kind (f32 unless the caller changed it).
    pub fn new(vs: nn::Path, config: &ValueHeadConfig) -> Result<Self> {
        let summary = vs.sub("summary");
        let h = config.hidden_size;
        let (w_init, b_init) = match config.init {
            InitStrategy::Default => {
                let bound = 1.0 / (h as f64).sqrt();
                (
                    nn::Init::Uniform { lo: -bound, up: bound },
                    nn::Init::Uniform { lo: -bound, up: bound },
                )
            }
            InitStrategy::Normal => (
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: config.initializer_range,
                },
                nn::Init::Const(0.0),
            ),
        };
        let weight = crate::param::var(&summary, "weight", &[1, h], w_init)?;
        let bias = crate::param::var(&summary, "bias", &[1], b_init)?;
        Ok(Self {
            weight,
            bias,
            dropout_prob: config.dropout_prob,
            hidden_size: h,
        })
    }

    /// Values [batch, seq] from hidden states [batch, seq, hidden] of any float kind; the states
    /// are cast to the head's kind and device, so values come out in the head's precision.
    pub fn forward(&self, hidden_states: &Tensor, train: bool) -> Result<Tensor> {
        let size = hidden_states.size();
        if size.len() != 3 || size[2] != self.hidden_size {
            return Err(invalid(format!(
                "value head expects hidden states [batch, seq, {}], got {size:?}",
                self.hidden_size
            )));
        }
        let mut output = hidden_states.shallow_clone();
        if self.dropout_prob > 0.0 && train {
            output = output.f_dropout(self.dropout_prob, true)?;
        }
        if output.kind() != self.weight.kind() || output.device() != self.weight.device() {
            output = output
                .f_to_device(self.weight.device())?
                .f_to_kind(self.weight.kind())?;
        }
        Ok(output.f_linear(&self.weight, Some(&self.bias))?.f_squeeze_dim(-1)?)
    }

    /// The dropout probability in use.
    pub fn dropout_prob(&self) -> f64 {
        self.dropout_prob
    }

    /// The head's parameter kind.
    pub fn kind(&self) -> Kind {
        self.weight.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tch::{nn::VarStore, Device};

    #[test]
    fn resolves_dropout_and_width_like_trl() {
        let opts = ValueHeadOptions::default();
        let c = ValueHeadConfig::resolve(&json!({"n_embd": 8}), &opts, None).unwrap();
        assert_eq!((c.hidden_size, c.dropout_prob, c.init), (8, 0.1, InitStrategy::Default));
        let c =
            ValueHeadConfig::resolve(&json!({"hidden_size": 8, "summary_dropout_prob": null}), &opts, None).unwrap();
        assert_eq!(c.dropout_prob, 0.0);
        let opts2 = ValueHeadOptions {
            summary_dropout_prob: Some(0.3),
            ..Default::default()
        };
        let c = ValueHeadConfig::resolve(&json!({"d_model": 8, "summary_dropout_prob": 0.5}), &opts2, None).unwrap();
        assert_eq!((c.hidden_size, c.dropout_prob), (8, 0.5));
        let c = ValueHeadConfig::resolve(&json!({"d_model": 8}), &opts2, None).unwrap();
        assert_eq!(c.dropout_prob, 0.3);
        let c = ValueHeadConfig::resolve(&json!({"hidden_size": 8, "word_embed_proj_dim": 4}), &opts, None).unwrap();
        assert_eq!(c.hidden_size, 4);
        assert!(ValueHeadConfig::resolve(&json!({"vocab_size": 8}), &opts, None).is_err());
        // The backbone's width (its config's default) when config.json names none, as TRL reads
        // `config.hidden_size` from the transformers config object.
        assert_eq!(
            ValueHeadConfig::resolve(&json!({}), &opts, Some(768))
                .unwrap()
                .hidden_size,
            768
        );
        let c = ValueHeadConfig::resolve(&json!({"word_embed_proj_dim": 4}), &opts, Some(768)).unwrap();
        assert_eq!(c.hidden_size, 4);
        let c = ValueHeadConfig::resolve(
            &json!({"is_encoder_decoder": true, "decoder": {"hidden_size": 6}}),
            &opts,
            Some(768),
        )
        .unwrap();
        assert_eq!(c.hidden_size, 6);
        assert!(ValueHeadConfig::resolve(&json!({"n_embd": 8, "summary_dropout_prob": 2.0}), &opts, None).is_err());
        assert!("uniform".parse::<InitStrategy>().is_err());
    }

    #[test]
    fn default_init_is_bounded_and_normal_init_zeroes_bias() {
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let cfg = ValueHeadConfig {
            hidden_size: 64,
            dropout_prob: 0.1,
            init: InitStrategy::Default,
            initializer_range: 0.2,
        };
        let head = ValueHead::new(vs.root().sub("v_head"), &cfg).unwrap();
        let bound = 1.0 / 8.0;
        assert!(head.weight.abs().max().double_value(&[]) <= bound);
        assert!(head.bias.abs().max().double_value(&[]) <= bound);
        assert!(vs.variables().contains_key("v_head.summary.weight"));

        let vs = VarStore::new(Device::Cpu);
        let cfg = ValueHeadConfig {
            hidden_size: 4096,
            init: InitStrategy::Normal,
            initializer_range: 0.2,
            dropout_prob: 0.0,
        };
        let head = ValueHead::new(vs.root(), &cfg).unwrap();
        assert_eq!(head.bias.double_value(&[0]), 0.0);
        let std = head.weight.std(true).double_value(&[]);
        assert!((std - 0.2).abs() < 0.02, "std {std}");
    }

    #[test]
    fn forward_casts_to_f32_and_drops_out_only_in_training() {
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        let cfg = ValueHeadConfig {
            hidden_size: 16,
            dropout_prob: 0.5,
            init: InitStrategy::Default,
            initializer_range: 0.2,
        };
        let head = ValueHead::new(vs.root(), &cfg).unwrap();
        let h = Tensor::randn([2, 3, 16], (Kind::BFloat16, Device::Cpu));
        let v = head.forward(&h, false).unwrap();
        assert_eq!(v.size(), vec![2, 3]);
        assert_eq!(v.kind(), Kind::Float);
        let manual = h.to_kind(Kind::Float).matmul(&head.weight.tr()).squeeze_dim(-1) + &head.bias;
        assert!((&v - manual).abs().max().double_value(&[]) < 1e-5);
        let again = head.forward(&h, false).unwrap();
        assert!(v.equal(&again), "eval mode must be deterministic");
        let train = head.forward(&h, true).unwrap();
        assert!(!v.equal(&train), "dropout must act in train mode");
        assert!(head
            .forward(&Tensor::zeros([2, 3, 8], (Kind::Float, Device::Cpu)), false)
            .is_err());
    }
}

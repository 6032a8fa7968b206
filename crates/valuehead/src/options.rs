//! Options for loading a value-head model.

use crate::error::{Error, Result};
use tch::{Device, Kind};
use vh_core::ValueHeadOptions;
use vh_models::AttnImplementation;

/// How to load a model: value-head options (as TRL's `from_pretrained` kwargs), the backbone's
/// dtype and the device.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Value-head settings.
    pub value_head: ValueHeadOptions,
    /// The backbone's parameter dtype (the value head stays f32).
    pub dtype: Kind,
    /// Where the parameters live.
    pub device: Device,
    /// How causal models compute attention, as HF's `attn_implementation`: `Eager` (HF's eager
    /// math to the bit) or `Sdpa` (PyTorch's fused kernel). `None` picks the default for the
    /// device (`Architecture::default_attention_on`): sdpa on CUDA for every causal model; on
    /// CPU each architecture's measured default (`Architecture::default_attention`, the faster
    /// one with `cargo xtask bench`: sdpa for GPT-2 and the Llama family). An explicit
    /// choice always wins. T5 always runs eager, as in HF; Bart takes the choice (sdpa by
    /// default, as HF).
    pub attn_implementation: Option<AttnImplementation>,
    /// How to reach the Hub when loading by repo id (endpoint, token, cache, revision, offline).
    pub hub: vh_hub::HubOptions,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            value_head: ValueHeadOptions::default(),
            dtype: Kind::Float,
            device: Device::Cpu,
            attn_implementation: None,
            hub: vh_hub::HubOptions::default(),
        }
    }
}

impl LoadOptions {
    /// The option names [`LoadOptions::set`] accepts, as TRL's `from_pretrained` kwargs.
    pub const NAMES: [&'static str; 7] = [
        "attn_implementation",
        "summary_dropout_prob",
        "v_head_initializer_range",
        "v_head_init_strategy",
        "dtype",
        "torch_dtype",
        "device",
    ];

    /// Sets one option from its TRL name and a text value; an unknown name or a bad value is an
    /// error, never silently dropped.
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        let number = |v: &str| -> Result<f64> {
            v.parse::<f64>()
                .map_err(|_| Error::InvalidOption(format!("`{name}` must be a number, got `{v}`")))
        };
        match name {
            "summary_dropout_prob" => {
                let p = number(value)?;
                if !(0.0..=1.0).contains(&p) {
                    return Err(Error::InvalidOption(format!(
                        "summary_dropout_prob must be in [0, 1], got {p}"
                    )));
                }
                self.value_head.summary_dropout_prob = Some(p);
            }
            "v_head_initializer_range" => self.value_head.v_head_initializer_range = Some(number(value)?),
            "v_head_init_strategy" => {
                self.value_head.v_head_init_strategy = Some(
                    value
                        .parse()
                        .map_err(|e: vh_core::Error| Error::InvalidOption(e.to_string()))?,
                )
            }
            "dtype" | "torch_dtype" => self.dtype = parse_dtype(value)?,
            "device" => self.device = parse_device(value)?,
            "attn_implementation" => {
                self.attn_implementation = Some(
                    value
                        .parse()
                        .map_err(|e: vh_core::Error| Error::InvalidOption(e.to_string()))?,
                )
            }
            "revision" => self.hub.revision = Some(value.to_string()),
            "token" => self.hub.token = Some(value.to_string()),
            other => {
                return Err(Error::InvalidOption(format!(
                    "unknown option `{other}` (known: {})",
                    Self::NAMES.join(", ")
                )))
            }
        }
        Ok(())
    }

    /// Options from `name=value` pairs (see [`LoadOptions::set`]).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let mut options = Self::default();
        for pair in pairs {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| Error::InvalidOption(format!("`{pair}` is not of the form name=value")))?;
            options.set(name.trim(), value.trim())?;
        }
        Ok(options)
    }
}

/// Parses a dtype name: f32/float32, f16/float16/half, bf16/bfloat16.
pub fn parse_dtype(name: &str) -> Result<Kind> {
    match name {
        "f32" | "float32" | "float" | "torch.float32" => Ok(Kind::Float),
        "f16" | "float16" | "half" | "torch.float16" => Ok(Kind::Half),
        "bf16" | "bfloat16" | "torch.bfloat16" => Ok(Kind::BFloat16),
        other => Err(Error::InvalidOption(format!(
            "unknown dtype `{other}` (expected f32, f16 or bf16)"
        ))),
    }
}

/// Parses a device name: cpu, cuda, cuda:N. A CUDA device must exist.
pub fn parse_device(name: &str) -> Result<Device> {
    let device = match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Device::Cuda(n),
            None => {
                return Err(Error::InvalidOption(format!(
                    "unknown device `{other}` (expected cpu, cuda or cuda:N)"
                )))
            }
        },
    };
    check_device(device)?;
    Ok(device)
}

/// Checks that `device` exists on this machine.
pub fn check_device(device: Device) -> Result<()> {
    if let Device::Cuda(n) = device {
        let count = tch::Cuda::device_count();
        if (n as i64) >= count {
            return Err(Error::InvalidOption(format!(
                "device cuda:{n} requested, but this machine has {count} CUDA device(s)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_by_name_and_unknown_names() {
        let o =
            LoadOptions::from_pairs(["summary_dropout_prob=0.2", "v_head_init_strategy=normal", "dtype=bf16"]).unwrap();
        assert_eq!(o.value_head.summary_dropout_prob, Some(0.2));
        assert_eq!(o.value_head.v_head_init_strategy, Some(vh_core::InitStrategy::Normal));
        assert_eq!(o.dtype, Kind::BFloat16);
        for bad in [
            "summary_dropout=0.1",
            "summary_dropout_prob=2",
            "v_head_init_strategy=uniform",
            "dtype=f8",
            "device=tpu",
            "nonsense",
        ] {
            assert!(
                matches!(LoadOptions::from_pairs([bad]), Err(Error::InvalidOption(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn parses_names() {
        assert_eq!(parse_dtype("bf16").unwrap(), Kind::BFloat16);
        assert!(parse_dtype("f8").is_err());
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert!(parse_device("tpu").is_err());
        if tch::Cuda::device_count() == 0 {
            assert!(parse_device("cuda").is_err());
        }
    }
}

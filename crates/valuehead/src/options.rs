//! Options for loading a value-head model.

use crate::error::{Error, Result};
use tch::{Device, Kind};
use vh_core::ValueHeadOptions;

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
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            value_head: ValueHeadOptions::default(),
            dtype: Kind::Float,
            device: Device::Cpu,
        }
    }
}

/// Parses a dtype name: f32/float32, f16/float16/half, bf16/bfloat16.
pub fn parse_dtype(name: &str) -> Result<Kind> {
    match name {
        "f32" | "float32" | "float" => Ok(Kind::Float),
        "f16" | "float16" | "half" => Ok(Kind::Half),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
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

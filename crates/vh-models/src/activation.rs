//! The activation functions HF configs name (`ACT2FN` in transformers).

use tch::Tensor;
use vh_core::ops::ScalarOps;
use vh_core::{Error, Result};

/// An activation function, parsed from a config's name for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU (erf): `gelu`, `gelu_python`.
    Gelu,
    /// GELU with the tanh approximation written out as in the original GPT-2: `gelu_new`, `gelu_accurate`.
    GeluNew,
    /// torch's tanh-approximated GELU kernel: `gelu_pytorch_tanh`.
    GeluPytorchTanh,
    /// `gelu_fast`.
    GeluFast,
    /// Exact GELU clipped to [-10, 10]: `gelu_10`.
    Gelu10,
    /// `x * sigmoid(1.702 x)`: `quick_gelu`.
    QuickGelu,
    /// `relu`.
    Relu,
    /// `relu6`.
    Relu6,
    /// `relu(x)^2`: `relu2`.
    Relu2,
    /// `leaky_relu` (slope 0.01).
    LeakyRelu,
    /// `silu` / `swish`.
    Silu,
    /// `mish`.
    Mish,
    /// `tanh`.
    Tanh,
    /// `sigmoid`.
    Sigmoid,
    /// `linear` (identity).
    Linear,
    /// `laplace`.
    Laplace,
    /// Bloom's own tanh approximation (`bloom_gelu_forward` in `modeling_bloom.py`), named by no
    /// config: its constant 0.79788456 and its order of operations differ from `gelu_fast`'s.
    BloomGelu,
}

impl std::str::FromStr for Activation {
    type Err = Error;
    fn from_str(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" | "gelu_python" => Self::Gelu,
            "gelu_new" | "gelu_accurate" => Self::GeluNew,
            "gelu_pytorch_tanh" => Self::GeluPytorchTanh,
            "gelu_fast" => Self::GeluFast,
            "gelu_10" => Self::Gelu10,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            "relu6" => Self::Relu6,
            "relu2" => Self::Relu2,
            "leaky_relu" => Self::LeakyRelu,
            "silu" | "swish" => Self::Silu,
            "mish" => Self::Mish,
            "tanh" => Self::Tanh,
            "sigmoid" => Self::Sigmoid,
            "linear" => Self::Linear,
            "laplace" => Self::Laplace,
            other => return Err(Error::Config(format!("unsupported activation function `{other}`"))),
        })
    }
}

impl Activation {
    /// Applies the activation elementwise.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        let sqrt_2_over_pi = (2.0 / std::f64::consts::PI).sqrt();
        Ok(match self {
            Self::Gelu => x.f_gelu("none")?,
            Self::GeluPytorchTanh => x.f_gelu("tanh")?,
            Self::GeluNew => gelu_tanh_written_out(x, sqrt_2_over_pi)?,
            Self::GeluFast => {
                let inner = x
                    .s_mul(0.7978845608)?
                    .f_mul(&x.f_mul(x)?.s_mul(0.044715)?.s_add(1.0)?)?;
                x.s_mul(0.5)?.f_mul(&inner.f_tanh()?.s_add(1.0)?)?
            }
            Self::Gelu10 => x.f_gelu("none")?.s_clamp(-10.0, 10.0)?,
            Self::QuickGelu => x.f_mul(&x.s_mul(1.702)?.f_sigmoid()?)?,
            Self::Relu => x.f_relu()?,
            Self::Relu6 => x.s_clamp(0.0, 6.0)?,
            Self::Relu2 => x.f_relu()?.f_square()?,
            Self::LeakyRelu => x.f_leaky_relu()?,
            Self::Silu => x.f_silu()?,
            Self::Mish => x.f_mish()?,
            Self::Tanh => x.f_tanh()?,
            Self::Sigmoid => x.f_sigmoid()?,
            Self::Linear => x.shallow_clone(),
            Self::BloomGelu => {
                // `x * 0.5 * (1.0 + tanh(0.79788456 * x * (1 + 0.044715 * x * x)))`, evaluated
                // left to right as Python does, so the products round as in HF.
                let inner = x.s_mul(0.79788456)?.f_mul(&x.s_mul(0.044715)?.f_mul(x)?.s_add(1.0)?)?;
                x.s_mul(0.5)?.f_mul(&inner.f_tanh()?.s_add(1.0)?)?
            }
            Self::Laplace => {
                // HF's `LaplaceActivation` literals, kept as written: 0.707107 is not exactly
                // 1/sqrt(2), and the outputs must match HF's to the bit.
                #[allow(clippy::approx_constant)]
                let (mu, sigma) = (0.707107, 0.282095);
                x.s_sub(mu)?
                    .s_div(sigma * std::f64::consts::SQRT_2)?
                    .f_erf()?
                    .s_mul(0.5)?
                    .s_add(0.5)?
            }
        })
    }
}

/// `gelu_new`, `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, step by step in Python's
/// order so that the result is bit-identical to HF's `NewGELUActivation`.
///
/// Without a graph to record (no_grad, or nothing requires grad) the steps run in place on one
/// scratch tensor: the written-out formula otherwise allocates eight activations' worth of
/// temporaries per MLP, and on a GPT-2 pass that churn made the allocator hand pages back and
/// fault them in again on every layer (about a tenth of a b8x128 scoring pass on the 2-core CPU).
fn gelu_tanh_written_out(x: &Tensor, sqrt_2_over_pi: f64) -> Result<Tensor> {
    if x.requires_grad() {
        // The graph keeps every intermediate for the backward anyway. Built in this order, the
        // backward accumulates x's gradient in the order it always has (the data-parallel
        // equality test compares two runs of it, down to rounding noise).
        let inner = x
            // x^3 as (x * x) * x: what PyTorch's pow computes for the exponent 3.
            .f_add(&x.f_mul(x)?.f_mul(x)?.s_mul(0.044715)?)?
            .s_mul(sqrt_2_over_pi)?;
        return Ok(x.s_mul(0.5)?.f_mul(&inner.f_tanh()?.s_add(1.0)?)?);
    }
    // The same kernels in place give the same bits (addition and multiplication commute).
    let mut t = x.f_mul(x)?;
    let _ = t.f_mul_(x)?;
    let _ = t.f_mul_scalar_(0.044715)?;
    let _ = t.f_add_(x)?;
    let _ = t.f_mul_scalar_(sqrt_2_over_pi)?;
    let _ = t.f_tanh_()?;
    let _ = t.f_add_scalar_(1.0)?;
    let _ = t.f_mul_(&x.s_mul(0.5)?)?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn names_parse_and_unknown_names_fail() {
        assert_eq!("gelu_new".parse::<Activation>().unwrap(), Activation::GeluNew);
        assert_eq!("swish".parse::<Activation>().unwrap(), Activation::Silu);
        assert!("gelu_fancy".parse::<Activation>().is_err());
    }

    #[test]
    fn tanh_gelus_agree_with_exact_gelu_closely() {
        let x = Tensor::linspace(-4.0, 4.0, 101, (Kind::Float, Device::Cpu));
        let exact = Activation::Gelu.forward(&x).unwrap();
        for act in [
            Activation::GeluNew,
            Activation::GeluPytorchTanh,
            Activation::GeluFast,
            Activation::BloomGelu,
        ] {
            let y = act.forward(&x).unwrap();
            assert!((&y - &exact).abs().max().double_value(&[]) < 1e-3, "{act:?}");
        }
        let q = Activation::Relu2.forward(&x).unwrap();
        assert!((q.double_value(&[100]) - 16.0).abs() < 1e-5);
    }

    #[test]
    fn gelu_new_in_place_equals_the_recorded_steps_bit_for_bit() {
        let x = Tensor::randn([4, 33, 17], (Kind::Float, Device::Cpu))
            .f_mul_scalar(3.0)
            .unwrap();
        let no_graph = Activation::GeluNew.forward(&x).unwrap();
        let leaf = x.copy().set_requires_grad(true);
        let recorded = Activation::GeluNew.forward(&leaf).unwrap();
        assert!(recorded.requires_grad(), "the autograd path keeps its graph");
        assert!(no_graph.equal(&recorded.detach()));
        // The in-place path leaves its input alone.
        assert!(x.equal(&leaf.detach()));
        // And the graph gives torch's own gradient of the written-out formula.
        recorded.sum(Kind::Float).backward();
        assert!(leaf.grad().defined());
    }
}

//! Building blocks shared by the architectures: linear layers (HF's `nn.Linear` and GPT-2's
//! `Conv1D`), layer and RMS norms, head splitting, grouped key/value heads and the gated MLP.
//! Each architecture composes them in its own file with its own explicit `forward`, so the order
//! of operations stays HF's, model by model.

use crate::activation::Activation;
use tch::{nn, Kind, Tensor};
use vh_core::lora::LoraBranch;
use vh_core::ops::ScalarOps;
use vh_core::Result;

/// The padding index of `nn.Embedding(vocab, hidden, padding_idx=pad_token_id)` as PyTorch
/// normalises it (a negative id counts from the end), or -1 (none) without a pad token or with
/// one outside the vocabulary (which HF refuses when it builds the model). That row gets no
/// gradient; forward outputs do not depend on it.
pub fn embedding_padding_idx(pad_token_id: Option<i64>, vocab_size: i64) -> i64 {
    match pad_token_id {
        Some(p) if (0..vocab_size).contains(&p) => p,
        Some(p) if (-vocab_size..0).contains(&p) => p + vocab_size,
        _ => -1,
    }
}

/// A linear layer `x @ weight^T (+ bias)` with HF's [out, in] weight.
#[derive(Debug)]
pub struct Linear {
    /// [out, in].
    pub weight: Tensor,
    /// [out], when the layer has one.
    pub bias: Option<Tensor>,
    /// The LoRA adapters built into this layer (`vh_core::lora::with_adapter`), usually none.
    pub lora: Vec<LoraBranch>,
}

impl Linear {
    /// Creates `weight` (and `bias`) under `vs`, zero-filled until loaded, and the layer's LoRA
    /// adapter when an adapter being built in targets it.
    pub fn new(vs: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: vh_core::param::var(&vs, "weight", &[out_dim, in_dim], nn::Init::Const(0.0))?,
            bias: if bias {
                Some(vh_core::param::var(&vs, "bias", &[out_dim], nn::Init::Const(0.0))?)
            } else {
                None
            },
            lora: LoraBranch::for_module(&vs, in_dim, out_dim, false)?,
        })
    }

    /// [..., in] -> [..., out].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = match vh_core::tensor::graph_free_linear(x, &self.weight, self.bias.as_ref())? {
            Some(out) => out,
            None => x.f_linear(&self.weight, self.bias.as_ref())?,
        };
        for lora in &self.lora {
            out = lora.apply(x, out)?;
        }
        Ok(out)
    }
}

/// HF's `Conv1D`: `x @ weight + bias` with weight stored [in, out].
#[derive(Debug)]
pub struct Conv1D {
    /// [in, out].
    pub weight: Tensor,
    /// [out].
    pub bias: Tensor,
    /// The LoRA adapters built into this layer (peft's `fan_in_fan_out` case), usually none.
    pub lora: Vec<LoraBranch>,
}

impl Conv1D {
    /// Creates `weight` [in, out] and `bias` [out] under `vs`, zero-filled until loaded, and the
    /// layer's LoRA adapter when an adapter being built in targets it.
    pub fn new(vs: nn::Path, in_dim: i64, out_dim: i64) -> Result<Self> {
        Ok(Self {
            weight: vh_core::param::var(&vs, "weight", &[in_dim, out_dim], nn::Init::Const(0.0))?,
            bias: vh_core::param::var(&vs, "bias", &[out_dim], nn::Init::Const(0.0))?,
            lora: LoraBranch::for_module(&vs, in_dim, out_dim, true)?,
        })
    }

    /// Keeps `weight`'s shape [in, out] and values but chooses its memory order for the
    /// kernels of its device: [out, in] order on CPU, [in, out] (HF's) elsewhere. Strides only:
    /// training and saving see the same tensor.
    ///
    /// Why [out, in] on CPU (torch 2.11): the bf16 kernel streams that order 1.2-1.4x faster
    /// (x86); in f32 it lets products outside autograd take oneDNN
    /// (`vh_core::tensor::graph_free_linear`, which needs the [out, in] matrix contiguous), and
    /// on a 2-core AMD EPYC (AVX2) a GPT-2-small b8x128 training step in PyTorch takes 6.9 s
    /// with it against 7.5-7.7 s in [in, out] order.
    pub fn arrange_weight(&self) -> Result<()> {
        let w = &self.weight;
        let (in_dim, out_dim) = (w.size()[0], w.size()[1]);
        let want_transposed = w.device() == tch::Device::Cpu;
        let is_transposed = w.stride() == [1, in_dim] && out_dim > 1;
        if want_transposed == is_transposed {
            return Ok(());
        }
        let arranged = if want_transposed {
            w.f_tr()?.f_contiguous()?.f_tr()?
        } else {
            w.f_contiguous()?
        };
        let mut shared = w.shallow_clone();
        tch::no_grad(|| shared.f_set_data(&arranged))?;
        Ok(())
    }

    /// [..., in] -> [..., out].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut size = x.size();
        let in_dim = *size.last().unwrap_or(&0);
        // `weight^T` is contiguous when the weight is arranged [out, in] (CPU).
        let mut out = match vh_core::tensor::graph_free_linear(x, &self.weight.f_tr()?, Some(&self.bias))? {
            Some(out) => out,
            None => {
                let out = self.bias.f_addmm(&x.f_reshape([-1, in_dim])?, &self.weight)?;
                *size.last_mut().expect("non-scalar input") = self.weight.size()[1];
                out.f_view(size.as_slice())?
            }
        };
        for lora in &self.lora {
            out = lora.apply(x, out)?;
        }
        Ok(out)
    }
}

/// LayerNorm with `weight` and `bias`.
#[derive(Debug)]
pub struct LayerNorm {
    /// Scale, [dim].
    pub weight: Tensor,
    /// Shift, [dim].
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Creates the parameters under `vs` (weight ones, bias zeros).
    pub fn new(vs: nn::Path, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vh_core::param::var(&vs, "weight", &[dim], nn::Init::Const(1.0))?,
            bias: vh_core::param::var(&vs, "bias", &[dim], nn::Init::Const(0.0))?,
            eps,
        })
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_layer_norm(self.weight.size(), Some(&self.weight), Some(&self.bias), self.eps, true)?)
    }
}

/// A LayerNorm with or without its learnable scale and shift, as torch's `elementwise_affine`
/// (OPT's `layer_norm_elementwise_affine = False` creates none).
#[derive(Debug)]
pub enum MaybeAffineLayerNorm {
    /// `weight` and `bias` (torch's default).
    Affine(LayerNorm),
    /// Normalisation only, over `dim` features.
    Plain {
        /// The normalised width.
        dim: i64,
        /// Epsilon.
        eps: f64,
    },
}

impl MaybeAffineLayerNorm {
    /// Creates `weight` and `bias` under `vs` when `affine`, nothing otherwise.
    pub fn new(vs: nn::Path, dim: i64, eps: f64, affine: bool) -> Result<Self> {
        Ok(if affine {
            Self::Affine(LayerNorm::new(vs, dim, eps)?)
        } else {
            Self::Plain { dim, eps }
        })
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Affine(norm) => norm.forward(x),
            Self::Plain { dim, eps } => Ok(x.f_layer_norm([*dim], None::<&Tensor>, None::<&Tensor>, *eps, true)?),
        }
    }
}

/// How an RMS norm handles reduced precision, as the HF model it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RmsNormStyle {
    /// HF's `LlamaRMSNorm` (Llama, Qwen2, Mistral, ...): normalised in f32, cast back to the
    /// input's kind, then scaled.
    Llama,
    /// HF's `T5LayerNorm`: the input times the f32 reciprocal RMS, cast to the weight's kind when
    /// that is f16/bf16, then scaled.
    T5,
    /// HF's `GemmaRMSNorm`: normalised and scaled by `1 + weight` in f32, then cast back to the
    /// input's kind (the weight is stored zero-centred).
    Gemma,
}

/// RMS normalisation over the last dimension (no mean, no bias), scaled by `weight`.
#[derive(Debug)]
pub struct RmsNorm {
    /// Scale, [dim].
    pub weight: Tensor,
    eps: f64,
    style: RmsNormStyle,
}

impl RmsNorm {
    /// Creates `weight` under `vs` (the identity scale until loaded: ones, zeros for Gemma's).
    pub fn new(vs: nn::Path, dim: i64, eps: f64, style: RmsNormStyle) -> Result<Self> {
        let identity = if style == RmsNormStyle::Gemma { 0.0 } else { 1.0 };
        Ok(Self {
            weight: vh_core::param::var(&vs, "weight", &[dim], nn::Init::Const(identity))?,
            eps,
            style,
        })
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = x.f_to_kind(Kind::Float)?;
        // x^2 as x * x: what PyTorch's pow computes for the exponent 2.
        let variance = h.f_mul(&h)?.f_mean_dim(-1, true, Kind::Float)?;
        let inverse = variance.s_add(self.eps)?.f_rsqrt()?;
        let normed = match self.style {
            RmsNormStyle::Gemma => {
                let scale = self.weight.f_to_kind(Kind::Float)?.s_add(1.0)?;
                return Ok(h.f_mul(&inverse)?.f_mul(&scale)?.f_to_kind(x.kind())?);
            }
            RmsNormStyle::Llama => h.f_mul(&inverse)?.f_to_kind(x.kind())?,
            RmsNormStyle::T5 => {
                let normed = x.f_mul(&inverse)?;
                if matches!(self.weight.kind(), Kind::Half | Kind::BFloat16) {
                    normed.f_to_kind(self.weight.kind())?
                } else {
                    normed
                }
            }
        };
        Ok(self.weight.f_mul(&normed)?)
    }
}

/// Whether LayerDrop skips a layer, as HF's `torch.rand([]) < layerdrop`: in train mode HF draws
/// once per layer from the CPU generator whatever the probability (so the dropout masks that
/// follow come from the same point of the generator's stream as in HF), and never in eval mode.
pub fn layer_dropped(layerdrop: f64, train: bool) -> Result<bool> {
    if !train {
        return Ok(false);
    }
    let draw = Tensor::f_rand([] as [i64; 0], (Kind::Float, tch::Device::Cpu))?.f_double_value(&[])?;
    Ok(draw < layerdrop)
}

/// Splits [B, T, heads * head_dim] into heads: [B, heads, T, head_dim].
pub fn split_heads(x: &Tensor, heads: i64, head_dim: i64) -> Result<Tensor> {
    let (b, t) = (x.size()[0], x.size()[1]);
    Ok(x.f_view([b, t, heads, head_dim])?.f_transpose(1, 2)?)
}

/// Joins heads back: [B, heads, T, head_dim] -> [B, T, heads * head_dim].
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let size = x.size();
    Ok(x.f_transpose(1, 2)?
        .f_contiguous()?
        .f_reshape([size[0], size[2], size[1] * size[3]])?)
}

/// Repeats each key/value head for the `groups` query heads that share it:
/// [B, kv, S, D] -> [B, kv * groups, S, D] (HF's `repeat_kv`).
pub fn repeat_kv(x: &Tensor, groups: i64) -> Result<Tensor> {
    if groups == 1 {
        return Ok(x.shallow_clone());
    }
    let size = x.size();
    let (b, kv, s, d) = (size[0], size[1], size[2], size[3]);
    Ok(x.f_unsqueeze(2)?
        .f_expand([b, kv, groups, s, d], false)?
        .f_reshape([b, kv * groups, s, d])?)
}

/// The gated MLP of the Llama family: `down_proj(act(gate_proj(x)) * up_proj(x))`.
#[derive(Debug)]
pub struct GatedMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

impl GatedMlp {
    /// Creates `gate_proj`, `up_proj` and `down_proj` under `vs`.
    pub fn new(vs: nn::Path, hidden: i64, intermediate: i64, bias: bool, act: Activation) -> Result<Self> {
        Ok(Self {
            gate_proj: Linear::new(vs.sub("gate_proj"), hidden, intermediate, bias)?,
            up_proj: Linear::new(vs.sub("up_proj"), hidden, intermediate, bias)?,
            down_proj: Linear::new(vs.sub("down_proj"), intermediate, hidden, bias)?,
            act,
        })
    }

    /// [B, T, hidden] -> [B, T, hidden].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = self
            .act
            .forward(&self.gate_proj.forward(x)?)?
            .f_mul(&self.up_proj.forward(x)?)?;
        self.down_proj.forward(&gated)
    }
}

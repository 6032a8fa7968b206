//! `vh forward`'s input and output files as library functions, so that the `vh` command and
//! the fuzzer (`crates/vh-fuzz`, target `inputs`) run the same code on the same files.

use crate::error::Result;
use crate::ValueHeadModel;
use std::collections::HashMap;
use std::path::Path;
use tch::Tensor;
use vh_core::error::invalid;

/// The tensors a `vh forward` input file may hold.
pub const FORWARD_INPUT_NAMES: [&str; 6] = [
    "input_ids",
    "attention_mask",
    "position_ids",
    "labels",
    "decoder_input_ids",
    "decoder_attention_mask",
];

/// What one forward pass gives: `logits` f32 [B, T, V], `values` f32 [B, T] and, with labels,
/// the mean `loss` (f32 scalar). For encoder-decoder models T counts decoder tokens.
#[derive(Debug)]
pub struct ForwardOutputs {
    /// Next-token logits.
    pub logits: Tensor,
    /// One value per (decoder) token.
    pub values: Tensor,
    /// The LM loss, when the inputs had labels.
    pub loss: Option<Tensor>,
}

impl ForwardOutputs {
    /// The outputs under the names `vh forward` writes: `logits`, `values` and `loss`.
    pub fn into_named(self) -> Vec<(String, Tensor)> {
        let mut named = vec![("logits".to_string(), self.logits), ("values".to_string(), self.values)];
        if let Some(loss) = self.loss {
            named.push(("loss".to_string(), loss));
        }
        named
    }
}

/// Runs one forward pass over named input tensors: `input_ids` (required), `attention_mask`,
/// `labels`, for decoder-only models `position_ids` (absent: 0..T, as TRL's forward) and, for
/// encoder-decoder models, `decoder_input_ids` and `decoder_attention_mask`.
/// Decoder inputs given to a decoder-only model are an error, not silently ignored.
pub fn run_forward(model: &ValueHeadModel, inputs: &HashMap<String, Tensor>) -> Result<ForwardOutputs> {
    let input_ids = inputs
        .get("input_ids")
        .ok_or_else(|| invalid("the inputs have no `input_ids`"))?;
    let get = |name: &str| inputs.get(name);
    tch::no_grad(|| match model {
        ValueHeadModel::Causal(m) => {
            if let Some(extra) = ["decoder_input_ids", "decoder_attention_mask"]
                .iter()
                .find(|n| get(n).is_some())
            {
                return Err(invalid(format!(
                    "`{extra}` is for encoder-decoder models; this model is decoder-only"
                ))
                .into());
            }
            let out = m.forward_with(&crate::CausalLmInput {
                input_ids,
                attention_mask: get("attention_mask"),
                position_ids: get("position_ids"),
                past: None,
                labels: get("labels"),
                logits_to_keep: 0,
            })?;
            Ok(ForwardOutputs {
                logits: out.logits,
                values: out.values,
                loss: out.loss,
            })
        }
        ValueHeadModel::Seq2Seq(m) => {
            if get("position_ids").is_some() {
                return Err(invalid("`position_ids` is for decoder-only models; encoder-decoder models number their positions themselves").into());
            }
            let out = m.forward(
                Some(input_ids),
                get("attention_mask"),
                get("decoder_input_ids"),
                get("decoder_attention_mask"),
                None,
                None,
                get("labels"),
            )?;
            Ok(ForwardOutputs {
                logits: out.logits,
                values: out.values,
                loss: out.loss,
            })
        }
    })
}

/// Reads a `vh forward` input file (safetensors), refuses tensors other than
/// [`FORWARD_INPUT_NAMES`], and runs one forward pass over it ([`run_forward`]).
pub fn run_forward_file(model: &ValueHeadModel, inputs: &Path) -> Result<ForwardOutputs> {
    let tensors: HashMap<String, Tensor> = vh_hub::read_safetensors(inputs)?.into_iter().collect();
    // Sorted, so that the error names the same tensor whatever the map's order.
    let mut unexpected: Vec<&String> = tensors
        .keys()
        .filter(|k| !FORWARD_INPUT_NAMES.contains(&k.as_str()))
        .collect();
    unexpected.sort();
    if let Some(other) = unexpected.first() {
        return Err(invalid(format!(
            "{}: unexpected tensor `{}` (expected {FORWARD_INPUT_NAMES:?})",
            inputs.display(),
            vh_hub::validate::printable(other)
        ))
        .into());
    }
    run_forward(model, &tensors)
}

/// `vh forward` without the command line: runs the input file through the model
/// ([`run_forward_file`]) and writes `logits`, `values` and (with labels) `loss` to `out`,
/// atomically.
pub fn forward_file(model: &ValueHeadModel, inputs: &Path, out: &Path) -> Result<()> {
    let outputs = run_forward_file(model, inputs)?;
    vh_hub::write_safetensors(out, &outputs.into_named())?;
    Ok(())
}

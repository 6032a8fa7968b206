//! What scores a rollout: a reward model folder or a Rust function.

use crate::error::{PpoError, Result};
use tch::{Kind, Tensor};
use valuehead::SequenceClassifier;

/// A reward function over one rollout: the prompt's tokens (without padding) and the response's
/// tokens (truncated after the stop token, without padding) give one score.
pub type RewardFn = Box<dyn FnMut(&[i64], &[i64]) -> f32 + Send>;

/// The reward of a PPO run.
pub enum Reward {
    /// A `*ForSequenceClassification` model read at the last response token, as TRL's
    /// `get_reward` (the first label's logit).
    Model(Box<SequenceClassifier>),
    /// A function of the prompt and response tokens.
    Function(RewardFn),
}

impl std::fmt::Debug for Reward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Model(_) => f.write_str("Reward::Model"),
            Self::Function(_) => f.write_str("Reward::Function"),
        }
    }
}

impl Reward {
    /// Wraps a function of (prompt tokens, response tokens).
    pub fn function(f: impl FnMut(&[i64], &[i64]) -> f32 + Send + 'static) -> Self {
        Self::Function(Box::new(f))
    }

    /// Checks the reward model against the policy's vocabulary: a reward model that reads other
    /// token ids would score nonsense.
    pub(crate) fn check_vocab(&self, policy_vocab: i64) -> Result<()> {
        if let Self::Model(m) = self {
            let theirs = m.backbone().vocab_size();
            if theirs != policy_vocab {
                return Err(PpoError::Input(format!(
                    "the reward model's vocabulary has {theirs} tokens, the policy's {policy_vocab}: they do not share a tokenizer"
                )));
            }
        }
        Ok(())
    }

    /// Scores `[B]` (f32) of the postprocessed rollouts. `queries` `[B, ctx]` are left-padded
    /// and `responses` `[B, R]` right-padded with `pad`; `prompts` are the unpadded queries.
    pub(crate) fn score(
        &mut self,
        prompts: &[&[i64]],
        queries: &Tensor,
        responses: &Tensor,
        sequence_lengths: &Tensor,
        pad: i64,
    ) -> Result<Tensor> {
        let scores = match self {
            Self::Model(model) => {
                let query_responses = Tensor::f_cat(&[queries, responses], 1)?;
                let context_length = queries.size()[1];
                let inputs = vh_rl::padded_inputs(&query_responses, pad)?;
                let logits = model.forward_all_positions_with(
                    &inputs.input_ids,
                    Some(&inputs.attention_mask),
                    Some(&inputs.position_ids),
                )?;
                let first_label = logits.f_narrow(2, 0, 1)?;
                let lengths = vh_rl::reward_sequence_lengths(&query_responses, pad, context_length)?;
                vh_rl::gather_final_rewards(&first_label, &lengths.f_to_device(first_label.device())?)?
                    .f_to_device(tch::Device::Cpu)?
                    .f_to_kind(Kind::Float)?
            }
            Self::Function(f) => {
                let lengths = Vec::<i64>::try_from(&sequence_lengths.f_to_device(tch::Device::Cpu)?)?;
                let rows = Vec::<Vec<i64>>::try_from(&responses.f_to_device(tch::Device::Cpu)?)?;
                let scores: Vec<f32> = rows
                    .iter()
                    .zip(&lengths)
                    .zip(prompts)
                    .map(|((row, &len), prompt)| f(prompt, &row[..(len + 1) as usize]))
                    .collect();
                Tensor::f_from_slice(&scores)?
            }
        };
        let values = Vec::<f64>::try_from(&scores.f_to_kind(Kind::Double)?)?;
        if let Some((row, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(PpoError::NonFiniteReward { row, value });
        }
        Ok(scores)
    }
}

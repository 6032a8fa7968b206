"""Reference for the PPO-math parity suite (tests/parity_ppo.rs).

Builds a synthetic rollout (random policy / reference logits over padded responses, values,
scores) and records, for several PPO configurations:

- TRL's own functions: trl.trainer.utils' selective_log_softmax (f32 and bf16 logits),
  entropy_from_logits, first_true_indices, truncate_response, forward's inputs and get_reward
  (driven through a stand-in model whose score head returns given reward logits, so only its
  index arithmetic is exercised); trl.experimental.ppo's masked_mean (with and without axis),
  masked_var (biased and unbiased) and masked_whiten (shift_mean both ways);
- the formulas inline in trl/experimental/ppo/ppo_trainer.py (PPOTrainer.train), written out
  below step by step: padding masks, masked log-probs and values, the k1 / k3 KL penalty, the
  score at the last response token, reward whitening, GAE, returns, advantage whitening, one
  micro-batch's clipped value and policy losses with their gradients, and the statistics TRL logs.

usage: python parity_ppo.py OUT_DIR
"""

import json
import os
import sys

# The PPO trainer lives in trl.experimental in 0.26.2; the import warns about that otherwise.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from trl.experimental.ppo.ppo_trainer import INVALID_LOGPROB, masked_mean, masked_var, masked_whiten
from trl.trainer.utils import (  # noqa: E402
    entropy_from_logits,
    first_true_indices,
    forward,
    get_reward,
    selective_log_softmax,
    truncate_response,
)

B, CONTEXT, RESPONSE, VOCAB = 6, 4, 10, 50
PAD, EOS = 0, 2

# (name, PPO hyper-parameters); the defaults are PPOConfig's.
DEFAULTS = dict(kl_coef=0.05, kl_estimator="k1", cliprange=0.2, vf_coef=0.1, cliprange_value=0.2, gamma=1.0,
                lam=0.95, whiten_rewards=False, temperature=0.7, missing_eos_penalty=None)
CONFIGS = [
    ("defaults_k1", {}),
    ("k3_whitened_rewards", dict(kl_estimator="k3", whiten_rewards=True, gamma=0.99, lam=0.9,
                                 missing_eos_penalty=1.0, kl_coef=0.2)),
    ("k1_tight_clips", dict(cliprange=0.05, cliprange_value=0.05, vf_coef=0.5, temperature=1.0, gamma=0.95)),
]


def make_rollout(seed):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randint(3, VOCAB, (B, CONTEXT), generator=g)
    queries[1, :2] = PAD  # a left-padded query
    responses = torch.randint(3, VOCAB, (B, RESPONSE), generator=g)
    # Stop tokens at various places: row 0 none (full length), row 1 at 3, row 2 at the last
    # position, row 3 at 0 and again later, row 4 at 6, row 5 none.
    responses[1, 3] = EOS
    responses[2, RESPONSE - 1] = EOS
    responses[3, 0] = EOS
    responses[3, 5] = EOS
    responses[4, 6] = EOS
    # Generation continues finished rows with padding (after the eos of rows 1 and 4).
    responses[1, 4:] = PAD
    responses[4, 8:] = PAD
    postprocessed = truncate_response(EOS, PAD, responses)
    # An empty response: its first token is padding (sequence length -1).
    postprocessed[5] = PAD
    responses[5] = PAD
    return g, queries, responses, postprocessed


def trainer_formulas(cfg, logits, ref_logits_raw, postprocessed, responses, values_raw, scores_raw, g):
    """PPOTrainer.train's inline math, as in trl/experimental/ppo/ppo_trainer.py (0.26.2)."""
    out = {}
    temperature = cfg["temperature"]
    # Rollout log-probs: the policy's logits at the sampling temperature, the reference's too.
    tempered = logits / (temperature + 1e-7)
    logprob = selective_log_softmax(tempered, responses)
    ref_logits = ref_logits_raw / (temperature + 1e-7)
    ref_logprob = selective_log_softmax(ref_logits, responses)
    out["rollout_logprobs_raw"] = logprob
    out["rollout_ref_logprobs_raw"] = ref_logprob
    sequence_lengths = first_true_indices(postprocessed == PAD) - 1
    out["sequence_lengths"] = sequence_lengths
    scores = scores_raw.clone()
    contain_eos_token = torch.any(postprocessed == EOS, dim=-1)
    if cfg["missing_eos_penalty"] is not None:
        scores[~contain_eos_token] -= cfg["missing_eos_penalty"]
    out["contain_eos_token"] = contain_eos_token
    out["scores"] = scores

    response_idxs = torch.arange(responses.shape[1]).repeat(responses.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprob, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprob, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values_raw, padding_mask_p1, 0)

    logr = ref_logprobs - logprobs
    kl = -logr if cfg["kl_estimator"] == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -cfg["kl_coef"] * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0))
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores
    if cfg["whiten_rewards"]:
        rewards = masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)

    lastgaelam = 0
    advantages_reversed = []
    gen_length = responses.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + cfg["gamma"] * nextvalues - values[:, t]
        lastgaelam = delta + cfg["gamma"] * cfg["lam"] * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    out["advantages_raw"] = advantages
    returns = advantages + values
    advantages = masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    out.update(padding_mask=padding_mask, padding_mask_p1=padding_mask_p1, logprobs=logprobs,
               ref_logprobs=ref_logprobs, values=values, kl=kl, non_score_reward=non_score_reward,
               rewards=rewards, returns=returns, advantages=advantages)

    # One update micro-batch (rows 4, 0, 2, 5): the policy has moved a little.
    inds = torch.tensor([4, 0, 2, 5])
    new_logits_raw = (logits[inds] + 0.4 * torch.randn(logits[inds].shape, generator=g)).requires_grad_(True)
    vpred_raw = (values_raw[inds] + 0.3 * torch.randn(values_raw[inds].shape, generator=g)).requires_grad_(True)
    out["update_indices"] = inds
    out["update_logits_raw"] = new_logits_raw.detach().clone()
    out["update_vpred_raw"] = vpred_raw.detach().clone()
    mb_advantage = advantages[inds]
    mb_responses = responses[inds]
    mb_logprobs = logprobs[inds]
    mb_return = returns[inds]
    mb_values = values[inds]
    logits_u = new_logits_raw / (temperature + 1e-7)
    new_logprobs = selective_log_softmax(logits_u, mb_responses)
    out["update_new_logprobs_raw"] = new_logprobs.detach().clone()
    new_logprobs = torch.masked_fill(new_logprobs, padding_mask[inds], INVALID_LOGPROB)
    vpred = torch.masked_fill(vpred_raw, padding_mask_p1[inds], 0)
    vpredclipped = torch.clamp(vpred, mb_values - cfg["cliprange_value"], mb_values + cfg["cliprange_value"])
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * masked_mean(vf_loss_max, ~padding_mask_p1[inds])
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1[inds])
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cfg["cliprange"], 1.0 + cfg["cliprange"])
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = masked_mean(pg_loss_max, ~padding_mask[inds])
    loss = pg_loss + cfg["vf_coef"] * vf_loss
    loss.backward()
    with torch.no_grad():
        pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask[inds])
        prob_dist = torch.nn.functional.softmax(logits_u, dim=-1)
        entropy = torch.logsumexp(logits_u, dim=-1) - torch.sum(prob_dist * logits_u, dim=-1)
        approxkl = 0.5 * (logprobs_diff**2).mean()
    out.update(
        loss=loss.detach(), pg_loss=pg_loss.detach(), vf_loss=vf_loss.detach(), vf_clipfrac=vf_clipfrac,
        pg_clipfrac=pg_clipfrac, approxkl=approxkl, ratio_mean=ratio.mean().detach(), entropy=entropy,
        grad_logits=new_logits_raw.grad, grad_vpred=vpred_raw.grad,
        # How often each clip acted, to show the cases exercise both branches.
        vf_clipped_count=(vf_losses2 > vf_losses1).sum(), pg_clipped_count=(pg_losses2 > pg_losses).sum(),
    )
    # The rollout statistics TRL logs.
    mean_kl = kl.sum(1).mean()
    mean_entropy = (-logprobs).sum(1).mean()
    mean_non_score_reward = non_score_reward.sum(1).mean()
    out.update(objective_kl=mean_kl, objective_entropy=mean_entropy,
               objective_non_score_reward=mean_non_score_reward,
               objective_rlhf_reward=mean_non_score_reward + scores.mean(), objective_scores=scores.mean(),
               num_eos_tokens=(responses == EOS).sum())
    return out


class _Backbone(torch.nn.Module):
    """Stands in for a reward model's backbone: records its inputs, returns given states."""

    def __init__(self, states):
        super().__init__()
        self.states = states
        self.seen = None

    def forward(self, input_ids, attention_mask, position_ids, **kwargs):
        self.seen = (input_ids, attention_mask, position_ids)
        return type("Out", (), {"hidden_states": [self.states]})()


class _RewardModel(torch.nn.Module):
    base_model_prefix = "backbone"

    def __init__(self, states):
        super().__init__()
        self.backbone = _Backbone(states)

    def score(self, hidden):
        return hidden


def utilities(g, queries, responses, postprocessed):
    """TRL's own functions on the rollout's tensors."""
    out = {}
    logits = torch.randn(B, RESPONSE, VOCAB, generator=g) * 3
    out["util_logits"] = logits
    out["selective_log_softmax_f32"] = selective_log_softmax(logits, responses)
    logits_bf16 = logits.to(torch.bfloat16)
    out["util_logits_bf16"] = logits_bf16
    out["selective_log_softmax_bf16"] = selective_log_softmax(logits_bf16, responses)
    out["entropy_from_logits"] = entropy_from_logits(logits)
    out["entropy_from_logits_chunk_7"] = entropy_from_logits(logits, chunk_size=7)
    bools = postprocessed == PAD
    out["first_true_indices"] = first_true_indices(bools)
    out["truncate_response"] = truncate_response(EOS, PAD, responses)
    query_responses = torch.cat((queries, postprocessed), 1)
    out["query_responses"] = query_responses
    reward_states = torch.randn(B, CONTEXT + RESPONSE, 1, generator=g)
    out["reward_states"] = reward_states
    rm = _RewardModel(reward_states)
    reward_logits, final_rewards, sequence_lengths = get_reward(rm, query_responses, PAD, CONTEXT)
    out["get_reward_final"] = final_rewards
    out["get_reward_sequence_lengths"] = sequence_lengths
    ids, mask, positions = rm.backbone.seen
    out["get_reward_input_ids"], out["get_reward_attention_mask"], out["get_reward_position_ids"] = ids, mask, positions
    seen = {}

    def policy(**kwargs):
        seen.update(kwargs)
        return None

    forward(policy, query_responses, PAD)
    out["forward_input_ids"], out["forward_attention_mask"], out["forward_position_ids"] = (
        seen["input_ids"], seen["attention_mask"], seen["position_ids"]
    )
    values = torch.randn(B, RESPONSE, generator=g)
    mask = ~(postprocessed == PAD)
    out["masked_values"] = values
    out["masked_mask"] = mask
    out["masked_mean"] = masked_mean(values, mask)
    # Per-row means over rows that keep at least one token (an empty row gives NaN in TRL).
    rows = mask.any(1)
    out["masked_mean_axis1"] = masked_mean(values[rows], mask[rows], axis=1)
    out["masked_rows"] = rows
    out["masked_var_unbiased"] = masked_var(values, mask)
    out["masked_var_biased"] = masked_var(values, mask, unbiased=False)
    out["masked_whiten_shift"] = masked_whiten(values, mask)
    out["masked_whiten_noshift"] = masked_whiten(values, mask, shift_mean=False)
    float_mask = mask.float()
    out["masked_mean_float_mask"] = masked_mean(values, float_mask)
    return out


def main(out_dir):
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    manifest = []
    for seed, (name, overrides) in enumerate(CONFIGS):
        cfg = dict(DEFAULTS, **overrides)
        g, queries, responses, postprocessed = make_rollout(100 + seed)
        logits = torch.randn(B, RESPONSE, VOCAB, generator=g) * 2
        ref_logits = logits + 0.5 * torch.randn(B, RESPONSE, VOCAB, generator=g)
        values = torch.randn(B, RESPONSE, generator=g)
        scores = torch.randn(B, generator=g)
        tensors = {"queries": queries, "responses": responses, "postprocessed": postprocessed,
                   "policy_logits": logits, "ref_logits": ref_logits, "values_raw": values, "scores_raw": scores}
        tensors.update(utilities(g, queries, responses, postprocessed))
        tensors.update(trainer_formulas(cfg, logits, ref_logits, postprocessed, responses, values, scores, g))
        tensors = {k: (v if isinstance(v, torch.Tensor) else torch.tensor(v)).contiguous() for k, v in tensors.items()}
        save_file(tensors, os.path.join(out_dir, f"{name}.safetensors"))
        manifest.append({"name": name, "config": cfg, "pad": PAD, "eos": EOS, "context_length": CONTEXT})
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest)} PPO reference cases to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1])

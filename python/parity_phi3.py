"""Reference outputs for the Phi3 parity suite.

Builds seeded random Phi3ForCausalLM models over a spread of configs (no rope scaling; LongRoPE with
the long factors throughout (original_max_position_embeddings below the 6-token prompt), the short
factors throughout (original above the 14-token rows), and switching inside the rows; an attention
factor of 1 (max_position_embeddings = original); full, half, three-quarter and odd partial rotary
widths; sliding windows of 1, 3 and 4 and none; GQA, MQA and MHA; an explicit head_dim; tied and
untied), wraps each in TRL's AutoModelForCausalLMWithValueHead with eager attention, saves it with
TRL's save_pretrained and stores TRL's outputs on the five-row padded batch (parity_causal.run_cases).

For every case it also writes extra.safetensors, from the saved folder loaded back with TRL:
- `*_nomask`: the default call with no attention mask at all (labels = the ids);
- `*_hf_incremental`: HF's own incremental decoding through its cache, the first 6 tokens and then
  one at a time with the growing mask and default positions, at every position; across LongRoPE's
  switch this differs from HF's full pass, because the cached keys keep the short factors (and with
  a window of 1 it differs everywhere: see `hf_window_1_cache` below);
- `*_bf16`: the default call with the backbone loaded in bf16 (TRL's f32 value head and logits).
and phi3_extras.json with how far HF's incremental pass is from its full pass, per case.

usage: python parity_phi3.py OUT_DIR
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import Phi3Config
from trl import AutoModelForCausalLMWithValueHead

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parity_causal import run_cases  # noqa: E402

# The Rust suite's prompt length for incremental decoding (common::PROMPT_LEN).
PROMPT_LEN = 6

BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    original_max_position_embeddings=32,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def longrope(n):
    """LongRoPE factors for n rotary frequencies, short ones near 1, long ones growing (as
    Phi-3's do, from about 1 to tens)."""
    return {
        "type": "longrope",
        "short_factor": [1.0 + 0.25 * i for i in range(n)],
        "long_factor": [1.5 + 3.0 * i for i in range(n)],
    }


# (name, config overrides, incremental check possible, rewrite). Head width 8 unless set: full
# rotary has 4 frequencies, partial 0.5 has 2, 0.75 has 3.
CASES = [
    ("no_scaling_gqa_untied", {}, True, None),
    ("partial_rotary_half_mha_tied", {"partial_rotary_factor": 0.5, "num_key_value_heads": 4,
                                      "tie_word_embeddings": True}, True, None),
    ("longrope_long_throughout_partial_0_75", {"partial_rotary_factor": 0.75, "rope_scaling": longrope(3),
                                               "original_max_position_embeddings": 4}, True, None),
    ("longrope_short_throughout", {"rope_scaling": longrope(4), "original_max_position_embeddings": 16}, True,
     None),
    # Positions 0..9 on the short factors, a full pass (14 > 10) on the long ones: HF's own
    # incremental pass differs from its full pass, so it is compared with HF's incremental pass.
    ("longrope_switch_within_rows", {"rope_scaling": longrope(4), "original_max_position_embeddings": 10}, False,
     None),
    ("longrope_attention_factor_1", {"rope_scaling": longrope(4), "original_max_position_embeddings": 4,
                                     "max_position_embeddings": 4}, True, None),
    ("window_4_longrope_partial_half", {"sliding_window": 4, "partial_rotary_factor": 0.5,
                                        "rope_scaling": longrope(2), "original_max_position_embeddings": 5}, True,
     None),
    ("window_1_three_layers", {"sliding_window": 1, "num_hidden_layers": 3}, True, None),
    ("window_3_mqa_gelu_eps_theta", {"sliding_window": 3, "num_key_value_heads": 1,
                                     "hidden_act": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "rope_theta": 1e6},
     True, None),
    # int(8 * 0.375) = 3: frequencies for a width of 3, four dimensions rotated.
    ("partial_rotary_odd_dim_3", {"partial_rotary_factor": 0.375}, True, None),
    ("explicit_head_dim_12", {"head_dim": 12}, True, None),
    ("no_v_head_in_checkpoint", {"rope_scaling": longrope(4), "original_max_position_embeddings": 4}, True,
     "drop_v_head"),
]


def make_config(overrides):
    cfg = dict(BASE)
    cfg.update(overrides)
    cfg.setdefault("tie_word_embeddings", False)
    return Phi3Config(**cfg), cfg


def hf_incremental(model, ids, mask):
    """HF's own incremental decoding through TRL's wrapper: logits and values at every position."""
    logits, _, values, past = model(input_ids=ids[:, :PROMPT_LEN], attention_mask=mask[:, :PROMPT_LEN],
                                    return_past_key_values=True)
    all_logits, all_values = [logits], [values]
    for t in range(PROMPT_LEN, ids.shape[1]):
        logits, _, values, past = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                                        past_key_values=past, return_past_key_values=True)
        all_logits.append(logits)
        all_values.append(values)
    return torch.cat(all_logits, 1), torch.cat(all_values, 1)


def extras(out_dir):
    report = {}
    for name, _, _, _ in CASES:
        folder = os.path.join(out_dir, name)
        inputs = load_file(os.path.join(folder, "inputs.safetensors"))
        expected = load_file(os.path.join(folder, "expected.safetensors"))
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        model = AutoModelForCausalLMWithValueHead.from_pretrained(folder, attn_implementation="eager").eval()
        with torch.no_grad():
            logits_nomask, loss_nomask, values_nomask = model(input_ids=ids, labels=ids)
            logits_inc, values_inc = hf_incremental(model, ids, mask)
        bf16 = AutoModelForCausalLMWithValueHead.from_pretrained(folder, attn_implementation="eager",
                                                                 dtype=torch.bfloat16).eval()
        assert bf16.pretrained_model.dtype == torch.bfloat16, name
        with torch.no_grad():
            logits_bf16, loss_bf16, values_bf16 = bf16(input_ids=ids, attention_mask=mask, labels=labels)
        save_file({
            "logits_nomask": logits_nomask.contiguous(),
            "values_nomask": values_nomask.contiguous(),
            "loss_nomask": loss_nomask.reshape(()),
            "logits_hf_incremental": logits_inc.contiguous(),
            "values_hf_incremental": values_inc.contiguous(),
            "logits_bf16": logits_bf16.float().contiguous(),
            "values_bf16": values_bf16.float().contiguous(),
            "loss_bf16": loss_bf16.float().reshape(()),
        }, os.path.join(folder, "extra.safetensors"))
        attended = mask.bool()
        report[name] = {
            "hf_incremental_vs_full": (logits_inc - expected["logits"]).abs()[attended].max().item(),
            # transformers 4.57.6's sliding-window cache layer keeps `[-window + 1:]` keys, which for
            # a window of 1 is `[0:]`, every key, while its mask for a decode step covers one key and
            # is broadcast over all of them: HF's own incremental decoding then attends to every
            # cached key, unlike its full pass (and ours, which follows the full pass).
            "hf_window_1_cache": model.pretrained_model.config.sliding_window == 1,
            "hf_bf16_vs_f32": (logits_bf16.float() - expected["logits"]).abs().max().item(),
        }
    with open(os.path.join(out_dir, "phi3_extras.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote the no-mask, HF-incremental and bf16 references of {len(report)} Phi3 cases")


if __name__ == "__main__":
    run_cases(sys.argv[1], CASES, make_config, "Phi3")
    torch.set_num_threads(1)
    extras(sys.argv[1])

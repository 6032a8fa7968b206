"""Reference outputs for the Cohere parity suite.

Builds seeded random CohereForCausalLM models over a spread of configs (q/k LayerNorms on and off;
MHA, GQA and MQA; tied (Cohere's default) and untied heads; logit_scale at its default 0.0625, 1,
2.5 and a negative one; q/k/v/o biases on and off; linear, dynamic-NTK (within and beyond
max_position_embeddings) and llama3 rope scaling; another activation, epsilon and base; an explicit
head_dim), wraps each in TRL's AutoModelForCausalLMWithValueHead with eager attention, saves it
with TRL's save_pretrained and stores TRL's outputs on the five-row padded batch
(parity_causal.run_cases: left- and right-padded rows, the default call and explicit positions).

For every case it also writes extra.safetensors, from the saved folder loaded back with TRL:
- `*_nomask`: the default call with no attention mask at all (labels = the ids);
- `*_bf16`: the default call with the backbone loaded in bf16 (TRL's f32 value head and logits);
and cohere_extras.json with how far HF's bf16 logits are from its f32 ones, per case.

usage: python parity_cohere.py OUT_DIR
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import CohereConfig
from trl import AutoModelForCausalLMWithValueHead

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parity_causal import run_cases  # noqa: E402

BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    logit_scale=1.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}

# (name, config overrides, incremental check possible, rewrite). Head width 8 unless set.
CASES = [
    ("defaults_tied_gqa_logit_scale_default", {"logit_scale": 0.0625}, True, None),
    ("qk_norm_gqa_tied", {"use_qk_norm": True}, True, None),
    ("qk_norm_mqa_untied", {"use_qk_norm": True, "num_key_value_heads": 1, "tie_word_embeddings": False}, True,
     None),
    ("mha_attention_bias_untied_logit_2_5", {"num_key_value_heads": 4, "attention_bias": True,
                                             "tie_word_embeddings": False, "logit_scale": 2.5}, True, None),
    ("rope_linear_qk_norm_bias", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "use_qk_norm": True,
                                  "attention_bias": True}, True, None),
    # 14 positions past max_position_embeddings 10: the base grows with the pass's length, so an
    # incremental pass (shorter passes first) differs from the full one, in HF too.
    ("rope_dynamic_beyond_max", {"rope_scaling": {"type": "dynamic", "rope_type": "dynamic", "factor": 2.0},
                                 "max_position_embeddings": 10}, False, None),
    ("rope_dynamic_within_max", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "use_qk_norm": True},
     True, None),
    ("rope_llama3_mqa", {"rope_scaling": LLAMA3, "num_key_value_heads": 1}, True, None),
    ("gelu_eps_theta_three_layers", {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-3,
                                     "rope_theta": 500.0, "num_hidden_layers": 3, "use_qk_norm": True,
                                     "attention_bias": True, "logit_scale": 0.5}, True, None),
    ("explicit_head_dim_12_qk_norm", {"head_dim": 12, "use_qk_norm": True}, True, None),
    ("negative_logit_scale_pad_3_untied", {"logit_scale": -0.75, "pad_token_id": 3, "tie_word_embeddings": False},
     True, None),
    ("no_v_head_in_checkpoint", {"use_qk_norm": True}, True, "drop_v_head"),
]


def make_config(overrides):
    cfg = dict(BASE)
    cfg.update(overrides)
    return CohereConfig(**cfg), cfg


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
        bf16 = AutoModelForCausalLMWithValueHead.from_pretrained(folder, attn_implementation="eager",
                                                                 dtype=torch.bfloat16).eval()
        assert bf16.pretrained_model.dtype == torch.bfloat16, name
        with torch.no_grad():
            logits_bf16, loss_bf16, values_bf16 = bf16(input_ids=ids, attention_mask=mask, labels=labels)
        save_file({
            "logits_nomask": logits_nomask.contiguous(),
            "values_nomask": values_nomask.contiguous(),
            "loss_nomask": loss_nomask.reshape(()),
            "logits_bf16": logits_bf16.float().contiguous(),
            "values_bf16": values_bf16.float().contiguous(),
            "loss_bf16": loss_bf16.float().reshape(()),
        }, os.path.join(folder, "extra.safetensors"))
        report[name] = {
            "hf_bf16_vs_f32": (logits_bf16.float() - expected["logits"]).abs().max().item(),
            "hf_nomask_vs_masked": (logits_nomask - expected["logits"]).abs().max().item(),
        }
    with open(os.path.join(out_dir, "cohere_extras.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote the no-mask and bf16 references of {len(report)} Cohere cases")


if __name__ == "__main__":
    run_cases(sys.argv[1], CASES, make_config, "Cohere")
    torch.set_num_threads(1)
    extras(sys.argv[1])

"""Reference outputs for the Gemma2 parity suite.

Builds seeded random Gemma2ForCausalLM models over a spread of configs (attention-score and
final-logit soft-capping, tight caps that bend most values and HF's defaults, and none; norms after
attention and around the MLP; alternating sliding-window layers with windows from 1 to 5 over the
14-token rows, and explicit layer_types; query_pre_attn_scalar other than head_dim; GQA, MQA and
MHA; tied and untied; attention biases; rope scaling), wraps each in TRL's
AutoModelForCausalLMWithValueHead with eager attention (transformers' sdpa path drops the attention
soft-capping, which the recorded sdpa-vs-eager gap shows), saves it with TRL's save_pretrained, and
stores the inputs and TRL's outputs (logits, values, loss) for the Rust side to compare.

usage: python parity_gemma2.py OUT_DIR
"""

import os
import sys

from transformers import Gemma2Config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parity_causal import run_cases  # noqa: E402

BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    query_pre_attn_scalar=8,
    max_position_embeddings=64,
    sliding_window=4,
    attn_logit_softcapping=2.0,
    final_logit_softcapping=3.0,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
)

# (name, config overrides, incremental check possible, rewrite)
CASES = [
    ("window_4_tight_caps_tied", {}, True, None),
    ("hf_default_caps_50_30", {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}, True, None),
    ("no_caps", {"attn_logit_softcapping": None, "final_logit_softcapping": None}, True, None),
    ("final_cap_only", {"attn_logit_softcapping": None}, True, None),
    ("attn_cap_only_untied_mha", {"final_logit_softcapping": None, "num_key_value_heads": 4,
                                  "tie_word_embeddings": False}, True, None),
    ("query_pre_attn_scalar_20_mqa", {"query_pre_attn_scalar": 20, "num_key_value_heads": 1}, True, None),
    ("window_1_three_layers", {"sliding_window": 1, "num_hidden_layers": 3}, True, None),
    ("layer_types_full_sliding_sliding", {"num_hidden_layers": 3, "sliding_window": 5,
                                          "layer_types": ["full_attention", "sliding_attention",
                                                          "sliding_attention"]}, True, None),
    ("head_dim_16_bias_gelu", {"head_dim": 16, "attention_bias": True, "hidden_activation": "gelu",
                               "rms_norm_eps": 1e-5}, True, None),
    ("rope_linear_theta", {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 1e6}, True, None),
    ("no_v_head_in_checkpoint", {}, True, "drop_v_head"),
]


def make_config(overrides):
    cfg = dict(BASE)
    cfg.update(overrides)
    cfg.setdefault("tie_word_embeddings", True)
    return Gemma2Config(**cfg), cfg


if __name__ == "__main__":
    run_cases(sys.argv[1], CASES, make_config, "Gemma2")

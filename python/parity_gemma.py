"""Reference outputs for the Gemma parity suite.

Builds seeded random GemmaForCausalLM models over a spread of configs (embeddings scaled by
sqrt(hidden_size) in the model's dtype; RMS norms scaling by 1 + weight; GeGLU with
gelu_pytorch_tanh and other activations; head_dim from the config, wider and narrower than
hidden / heads; grouped-query, multi-query and full attention; tied (Gemma's default) and untied;
attention biases; rope scaling), wraps each in TRL's AutoModelForCausalLMWithValueHead, saves it
with TRL's save_pretrained, and stores the inputs and TRL's outputs (logits, values, loss) for the
Rust side to compare. Also records how far transformers' default attention (sdpa) is from its
eager attention on the same call.

usage: python parity_gemma.py OUT_DIR
"""

import os
import sys

from transformers import GemmaConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parity_causal import run_cases  # noqa: E402
from parity_llama import LLAMA3  # noqa: E402

BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
)

# (name, config overrides, incremental check possible, rewrite)
CASES = [
    ("gqa_tied", {}, True, None),
    ("mha_untied", {"num_key_value_heads": 4, "tie_word_embeddings": False}, True, None),
    ("mqa_head_dim_16_wider_than_hidden_over_heads", {"num_key_value_heads": 1, "head_dim": 16}, True, None),
    ("head_dim_4_three_layers", {"head_dim": 4, "num_hidden_layers": 3}, True, None),
    ("attention_bias_eps_theta", {"attention_bias": True, "rms_norm_eps": 1e-5, "rope_theta": 1e6}, True, None),
    ("gelu_exact_activation", {"hidden_act": "gelu"}, True, None),
    ("hidden_48_odd_normalizer", {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 3}, True, None),
    ("rope_linear", {"rope_scaling": {"type": "linear", "factor": 2.0}}, True, None),
    ("rope_llama3", {"rope_scaling": LLAMA3}, True, None),
    ("rope_dynamic_beyond_max", {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 10},
     False, None),
    ("no_v_head_in_checkpoint", {}, True, "drop_v_head"),
]


def make_config(overrides):
    cfg = dict(BASE)
    cfg.update(overrides)
    cfg.setdefault("tie_word_embeddings", True)
    return GemmaConfig(**cfg), cfg


if __name__ == "__main__":
    run_cases(sys.argv[1], CASES, make_config, "Gemma")

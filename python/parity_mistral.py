"""Reference outputs for the Mistral parity suite.

Builds seeded random MistralForCausalLM models over a spread of configs (sliding windows shorter
than the 14-token rows, down to 1, and none; grouped-query, multi-query and full attention; tied
and untied; explicit head_dim; rope scaling), wraps each in TRL's
AutoModelForCausalLMWithValueHead, saves it with TRL's save_pretrained, and stores the inputs and
TRL's outputs (logits, values, loss) for the Rust side to compare. Also records how far
transformers' default attention (sdpa) is from its eager attention on the same call.

usage: python parity_mistral.py OUT_DIR
"""

import os
import sys

from transformers import MistralConfig

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
    max_position_embeddings=64,
    sliding_window=4,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# (name, config overrides, incremental check possible, rewrite)
CASES = [
    ("window_4_gqa_untied", {}, True, None),
    ("window_4_mha_tied", {"num_key_value_heads": 4, "tie_word_embeddings": True}, True, None),
    ("window_7_mqa_head_dim_12", {"sliding_window": 7, "num_key_value_heads": 1, "head_dim": 12}, True, None),
    # A query sees only itself.
    ("window_1", {"sliding_window": 1}, True, None),
    ("window_3_three_layers", {"sliding_window": 3, "num_hidden_layers": 3}, True, None),
    # Longer than the rows: the window hides nothing.
    ("window_32_longer_than_rows", {"sliding_window": 32}, True, None),
    ("no_window", {"sliding_window": None}, True, None),
    ("window_5_gelu_eps_theta", {"sliding_window": 5, "hidden_act": "gelu_pytorch_tanh", "rms_norm_eps": 1e-5,
                                 "rope_theta": 1e6}, True, None),
    ("window_4_rope_linear", {"rope_scaling": {"type": "linear", "factor": 2.0}}, True, None),
    ("window_6_rope_llama3", {"sliding_window": 6, "rope_scaling": LLAMA3}, True, None),
    # Dynamic NTK past max_position_embeddings recomputes the whole pass's frequencies: no
    # incremental comparison (as for Llama). transformers 4.57.6 builds dynamic NTK for Mistral
    # only with an explicit head_dim (it multiplies the config's null head_dim otherwise).
    ("window_4_rope_dynamic_beyond_max", {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "head_dim": 8,
                                          "max_position_embeddings": 10}, False, None),
    ("no_v_head_in_checkpoint", {}, True, "drop_v_head"),
]


def make_config(overrides):
    cfg = dict(BASE)
    cfg.update(overrides)
    cfg.setdefault("tie_word_embeddings", False)
    return MistralConfig(**cfg), cfg


if __name__ == "__main__":
    run_cases(sys.argv[1], CASES, make_config, "Mistral")

"""Reference outputs for the Qwen3 parity suite.

Builds seeded random Qwen3ForCausalLM models over a spread of configs (per-head q/k norms always;
head_dim independent of the hidden size; grouped-query, multi-query and full attention; tied and
untied; attention biases; rope scaling; sliding-window layers from max_window_layers and from
explicit layer_types, and a window that is set but not switched on), wraps each in TRL's
AutoModelForCausalLMWithValueHead, saves it with TRL's save_pretrained, and stores the inputs and
TRL's outputs (logits, values, loss) for the Rust side to compare.

usage: python parity_qwen3.py OUT_DIR
"""

import os
import sys

from transformers import Qwen3Config

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
    head_dim=16,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

SLIDING = {"use_sliding_window": True, "sliding_window": 4}

# (name, config overrides, incremental check possible, rewrite)
CASES = [
    ("gqa_untied_head_dim_16", {}, True, None),
    ("mha_tied_head_dim_8", {"num_key_value_heads": 4, "head_dim": 8, "tie_word_embeddings": True}, True, None),
    ("mqa_attention_bias", {"num_key_value_heads": 1, "attention_bias": True}, True, None),
    ("gelu_eps_theta_1m", {"hidden_act": "gelu_pytorch_tanh", "rms_norm_eps": 1e-5, "rope_theta": 1e6}, True, None),
    ("rope_linear", {"rope_scaling": {"type": "linear", "factor": 2.0}}, True, None),
    ("rope_llama3", {"rope_scaling": LLAMA3}, True, None),
    ("rope_dynamic_beyond_max", {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 10},
     False, None),
    # Layers from max_window_layers on slide: layer 0 full, layer 1 with a window of 4.
    ("sliding_from_max_window_layers", dict(SLIDING, max_window_layers=1), True, None),
    # Every layer slides (window 3), tied, with biases.
    ("sliding_all_layers_tied_bias", dict(SLIDING, sliding_window=3, max_window_layers=0, tie_word_embeddings=True,
                                          attention_bias=True), True, None),
    # Explicit layer_types, three layers: sliding, full, sliding.
    ("sliding_layer_types", dict(SLIDING, num_hidden_layers=3,
                                 layer_types=["sliding_attention", "full_attention", "sliding_attention"]), True, None),
    # A window without use_sliding_window: HF drops it, every layer is full.
    ("window_not_switched_on", {"sliding_window": 2, "max_window_layers": 0}, True, None),
    ("no_v_head_in_checkpoint", {}, True, "drop_v_head"),
]


def make_config(overrides):
    cfg = dict(BASE)
    cfg.update(overrides)
    cfg.setdefault("tie_word_embeddings", False)
    return Qwen3Config(**cfg), cfg


if __name__ == "__main__":
    run_cases(sys.argv[1], CASES, make_config, "Qwen3")

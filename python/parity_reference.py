"""Reference for create_reference_model: which parameters TRL 0.26.2's
`create_reference_model(model, num_shared_layers, pattern)` freezes in the policy (its shared
list), and which calls it refuses, on seeded tiny value-head models it saves.

usage: python parity_reference.py OUT_DIR
"""

import json
import os
import sys

import torch
from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig, Qwen2Config
from trl import AutoModelForCausalLMWithValueHead, create_reference_model
from transformers import AutoModelForCausalLM

MODELS = {
    "gpt2": GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=3, n_head=2),
    "llama": LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32),
    "qwen2_tied": Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                              tie_word_embeddings=True),
    "gpt_neox": GPTNeoXConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                              num_attention_heads=2, max_position_embeddings=32),
    # OPT registers its projections and final norm before the layers.
    "opt": OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=24, num_hidden_layers=3, num_attention_heads=2,
                     max_position_embeddings=32, word_embed_proj_dim=8),
}

# (num_shared_layers, pattern)
CALLS = [(None, None), (0, None), (1, None), (2, None), (3, None), (12, None),
         (1, "pretrained_model.transformer.h.{layer}"), (1, "model.layers.{layer}"), (1, "no.such.{layer}")]


def main(out_dir):
    torch.manual_seed(0)
    os.makedirs(out_dir, exist_ok=True)
    cases = []
    for name, config in MODELS.items():
        folder = os.path.join(out_dir, name)
        base = AutoModelForCausalLM.from_config(config)
        AutoModelForCausalLMWithValueHead.from_pretrained(base).save_pretrained(folder)
        for k, pattern in CALLS:
            model = AutoModelForCausalLMWithValueHead.from_pretrained(folder)
            names = [n for n, _ in model.named_parameters()]
            try:
                ref = create_reference_model(model, num_shared_layers=k, pattern=pattern)
            except ValueError as e:
                cases.append({"model": name, "k": k, "pattern": pattern, "error": str(e)})
                continue
            frozen_policy = [n for n, p in model.named_parameters() if not p.requires_grad]
            trainable_ref = [n for n, p in ref.named_parameters() if p.requires_grad]
            assert not ref.training
            # TRL freezes the policy's shared parameters but leaves the reference's copies of
            # them trainable (it copied before freezing): recorded, since ours are frozen.
            cases.append({"model": name, "k": k, "pattern": pattern, "frozen_in_policy": frozen_policy,
                          "trainable_in_reference": trainable_ref, "parameters": names})
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)
    print(f"wrote {len(cases)} create_reference_model cases to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1])

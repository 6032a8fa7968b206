"""Builds the tiny GPT-2 value-head model that ships in assets/ for `cargo xtask demo`.

Seeded random weights (no pretrained model is reachable offline), wrapped in TRL's
AutoModelForCausalLMWithValueHead and saved with TRL's save_pretrained, so the demo loads
exactly the kind of folder Python TRL writes.

usage: python make_demo_model.py OUT_DIR
"""

import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from trl import AutoModelForCausalLMWithValueHead

torch.manual_seed(2024)
config = GPT2Config(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4)
base = GPT2LMHeadModel(config)
with torch.no_grad():
    for name, p in base.named_parameters():
        if not name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            p.normal_(0.0, 0.1)
model = AutoModelForCausalLMWithValueHead.from_pretrained(base, v_head_init_strategy="normal", v_head_initializer_range=0.2)
model.save_pretrained(sys.argv[1])
print(f"saved the demo model to {sys.argv[1]}")

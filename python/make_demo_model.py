"""Builds the tiny GPT-2 value-head model that ships in assets/ for `cargo xtask demo`.

Seeded random weights (no pretrained model is reachable offline), wrapped in TRL's
AutoModelForCausalLMWithValueHead and saved with TRL's save_pretrained, so the demo loads
exactly the kind of folder Python TRL writes. A word-level tokenizer over the 511 most common
words of Python's own help texts gives it text in and out (the continuations are random words:
the weights are random).

usage: python make_demo_model.py OUT_DIR
"""

import collections
import re
import sys

import torch
from pydoc_data.topics import topics
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel
from trl import AutoModelForCausalLMWithValueHead

VOCAB = 512
EOS = "<|endoftext|>"

out_dir = sys.argv[1]
words = collections.Counter(w.lower() for text in topics.values() for w in re.findall(r"[A-Za-z]+", text))
vocab = {EOS: 0, "[UNK]": 1}
for word, _ in words.most_common():
    if len(vocab) == VOCAB:
        break
    vocab.setdefault(word, len(vocab))
tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()

torch.manual_seed(2024)
config = GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
base = GPT2LMHeadModel(config)
with torch.no_grad():
    for name, p in base.named_parameters():
        if not name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            p.normal_(0.0, 0.1)
model = AutoModelForCausalLMWithValueHead.from_pretrained(base, v_head_init_strategy="normal", v_head_initializer_range=0.2)
model.save_pretrained(out_dir)
tokenizer.save(f"{out_dir}/tokenizer.json")
print(f"saved the demo model and tokenizer to {out_dir}")

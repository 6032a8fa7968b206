"""Loads a checkpoint folder with TRL's from_pretrained (as a user would) and writes its outputs
on given inputs, to check that folders saved by the Rust side load in Python unchanged.

usage: python load_saved.py causal|seq2seq MODEL_DIR INPUTS.safetensors OUT.safetensors
"""

import sys

import torch
from safetensors.torch import load_file, save_file
from trl import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead


def main(kind, model_dir, inputs_path, out_path):
    torch.set_num_threads(1)
    inputs = load_file(inputs_path)
    if kind == "causal":
        model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir, attn_implementation="eager").eval()
    else:
        model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits, _, values = model(**inputs)
    save_file({"logits": logits.contiguous(), "values": values.contiguous()}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])

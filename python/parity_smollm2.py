"""Reference outputs on the real model, SmolLM2-135M-Instruct (converted by `cargo xtask setup`).

Wraps it in TRL's AutoModelForCausalLMWithValueHead (a fresh, seeded value head: the checkpoint has
none), saves that with TRL's save_pretrained, and records, for three chat prompts formatted with
the model's chat template: the rendered prompt and its token ids, TRL's logits and values over the
first prompt, and 32 greedy tokens for each prompt from transformers' generate.

usage: python parity_smollm2.py MODEL_DIR OUT_DIR
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer
from trl import AutoModelForCausalLMWithValueHead

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for learning a new language.",
]
NEW_TOKENS = 32


def main(model_dir, out_dir):
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir, attn_implementation="eager").eval()
    folder = os.path.join(out_dir, "model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cases = []
    tensors = {}
    for i, prompt in enumerate(PROMPTS):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            if i == 0:
                logits, _, values = model(input_ids=ids)
                tensors["logits"] = logits.contiguous()
                tensors["values"] = values.contiguous()
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=None,
                pad_token_id=tokenizer.eos_token_id,
            )
        tensors[f"prompt_{i}"] = ids.contiguous()
        tensors[f"sequences_{i}"] = out.contiguous()
        reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
        cases.append({"prompt": prompt, "rendered": text, "reply": reply})
    save_file(tensors, os.path.join(out_dir, "expected.safetensors"))
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)
    print(f"wrote SmolLM2 reference outputs to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

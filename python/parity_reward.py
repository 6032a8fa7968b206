"""Reference outputs for reward models: transformers' AutoModelForSequenceClassification.

Builds seeded random GPT2ForSequenceClassification, LlamaForSequenceClassification and
Qwen2ForSequenceClassification models (one and several labels, tied and untied, pad token set and,
for a one-row batch, unset), saves each with transformers' save_pretrained, and records the pooled
logits HF computes on left- and right-padded batches (and a row of padding only), the logits at
every position, and the index HF reads each row at.

`check FOLDER INPUTS OUT`: loads a folder (e.g. one our save_pretrained wrote) with
AutoModelForSequenceClassification and writes its pooled logits on INPUTS.

usage: python parity_reward.py OUT_DIR
       python parity_reward.py check FOLDER INPUTS.safetensors OUT.safetensors
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, GPT2Config, LlamaConfig, Qwen2Config

GPT2 = dict(vocab_size=97, n_positions=40, n_embd=32, n_layer=2, n_head=4)
LLAMA = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)

# (name, config class, config, num_labels, pad_token_id, batch)
CASES = [
    ("gpt2_one_label", GPT2Config, GPT2, 1, 0, "padded"),
    ("gpt2_three_labels", GPT2Config, GPT2, 3, 0, "padded"),
    ("gpt2_no_pad_token_one_row", GPT2Config, GPT2, 1, None, "one_row"),
    ("llama_one_label", LlamaConfig, LLAMA, 1, 0, "padded"),
    ("llama_two_labels_tied", LlamaConfig, dict(LLAMA, tie_word_embeddings=True), 2, 0, "padded"),
    ("qwen2_one_label", Qwen2Config, dict(LLAMA, tie_word_embeddings=True), 1, 0, "padded"),
]

SEQ = 12


def inputs(vocab, pad, kind, seed):
    g = torch.Generator().manual_seed(500 + seed)
    if kind == "one_row":
        ids = torch.randint(1, vocab, (1, SEQ), generator=g)
        return ids, torch.ones_like(ids)
    ids = torch.randint(1, vocab, (4, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[2, SEQ - 5 :] = 0  # right padding
    mask[3, :] = 0  # padding only
    ids[mask == 0] = pad
    return ids, mask


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if ("norm" in name or "ln_" in name) else 0.2 * noise)


def make(out_dir):
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    manifest = []
    for seed, (name, config_class, cfg, labels, pad, kind) in enumerate(CASES):
        config = config_class(**cfg, num_labels=labels, pad_token_id=pad)
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config)
        randomize(model, seed)
        model.eval()
        ids, mask = inputs(cfg["vocab_size"], pad if pad is not None else 0, kind, seed)
        with torch.no_grad():
            pooled = model(input_ids=ids, attention_mask=mask).logits
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            all_positions = model.score(hidden)
        if pad is None:
            last = torch.full((ids.shape[0],), SEQ - 1)
        else:
            last = ((ids != pad).int() * torch.arange(SEQ, dtype=torch.int32)).argmax(-1)
        folder = os.path.join(out_dir, name)
        model.save_pretrained(folder)
        save_file({"input_ids": ids, "attention_mask": mask}, os.path.join(folder, "inputs.safetensors"))
        save_file(
            {"logits": pooled.contiguous(), "all_positions": all_positions.contiguous(), "last": last.long()},
            os.path.join(folder, "expected.safetensors"),
        )
        manifest.append({"name": name, "num_labels": labels})
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest)} reward-model cases to {out_dir}")


def check(folder, inputs_path, out_path):
    torch.set_num_threads(1)
    model = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()
    inputs = load_file(inputs_path)
    with torch.no_grad():
        logits = model(**inputs).logits
    save_file({"logits": logits.contiguous()}, out_path)


if __name__ == "__main__":
    if sys.argv[1] == "check":
        check(*sys.argv[2:5])
    else:
        make(sys.argv[1])

"""The reference side shared by the parity suites of rotary decoder-only models (Mistral, Qwen3):
builds each case's seeded random model from a transformers config, wraps it in TRL's
AutoModelForCausalLMWithValueHead, saves it with TRL's save_pretrained (checking that TRL loads it
back identically), and stores the inputs and TRL's outputs on the five-row padded batch of
parity_gpt2.make_inputs, for the default call and for explicit position ids. It also records how
far transformers' own default attention (sdpa) is from its eager attention on the default call:
at attended positions, at every position, and on the loss.
"""

import json
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from trl import AutoModelForCausalLMWithValueHead

from parity_gpt2 import make_inputs, reference_outputs
from parity_llama import randomize


def build(config, seed, attn_implementation="eager"):
    """A seeded random model of `config` with weights spread out (HF's init is too small)."""
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config)
    randomize(base, seed)
    return base


def hf_sdpa_vs_eager(base, input_ids, attention_mask, labels, expected):
    """transformers' sdpa attention on the same weights and call, against the eager reference."""
    base.config._attn_implementation = "sdpa"
    try:
        sdpa = AutoModelForCausalLMWithValueHead.from_pretrained(base).eval()
        with torch.no_grad():
            logits, loss, _ = sdpa(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    finally:
        base.config._attn_implementation = "eager"
    diff = (logits - expected["logits"]).abs()
    return {
        "hf_sdpa_vs_eager": diff[attention_mask.bool()].max().item(),
        "hf_sdpa_vs_eager_all_positions": diff.max().item(),
        "hf_sdpa_vs_eager_loss": (loss - expected["loss"]).abs().item(),
    }


def window_effect(model, config, input_ids, attention_mask, expected):
    """How much a sliding window shorter than the rows changes the outputs: the same model and call
    with the window widened past the rows, against the windowed reference, at attended positions.
    None when the config has no window in use or its window already spans the rows."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ["sliding_attention"]
    if window is None or window >= input_ids.shape[1] or "sliding_attention" not in layer_types:
        return None
    config.sliding_window = 10**6
    try:
        with torch.no_grad():
            logits, _, _ = model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        config.sliding_window = window
    return (logits - expected["logits"]).abs()[attention_mask.bool()].max().item()


def run_cases(out_dir, cases, make_config, label):
    """Writes every case of `cases` ((name, overrides, incremental, rewrite) with
    `make_config(overrides) -> (config, dict)`) and cases.json into `out_dir`."""
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    manifest = []
    for seed, (name, overrides, incremental, rewrite) in enumerate(cases):
        config, cfg = make_config(overrides)
        base = build(config, seed)
        model = AutoModelForCausalLMWithValueHead.from_pretrained(base).eval()
        input_ids, attention_mask, labels, position_ids = make_inputs(cfg["vocab_size"], 70 + seed)
        expected = reference_outputs(model, input_ids, attention_mask, labels, position_ids)
        sdpa = hf_sdpa_vs_eager(base, input_ids, attention_mask, labels, expected)
        effect = window_effect(model, model.pretrained_model.config, input_ids, attention_mask, expected)
        # A window shorter than the rows must matter, or the case tests nothing about it.
        assert effect is None or effect > 1e-3, f"{name}: the sliding window changes nothing ({effect})"
        folder = os.path.join(out_dir, name)
        model.save_pretrained(folder)
        if rewrite is None:
            reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(folder, attn_implementation="eager").eval()
            with torch.no_grad():
                logits2, _, values2 = reloaded(input_ids=input_ids, attention_mask=attention_mask)
            assert torch.allclose(expected["logits"], logits2, atol=1e-6), name
            assert torch.allclose(expected["values"], values2, atol=1e-6), name
        elif rewrite == "drop_v_head":
            path = os.path.join(folder, "model.safetensors")
            tensors = {k: v for k, v in load_file(path).items() if not k.startswith("v_head.")}
            save_file(tensors, path, metadata={"format": "pt"})
        else:
            raise ValueError(f"unknown rewrite {rewrite}")
        save_file(
            {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels},
            os.path.join(folder, "inputs.safetensors"),
        )
        save_file({"position_ids": position_ids}, os.path.join(folder, "position_ids.safetensors"))
        save_file(expected, os.path.join(folder, "expected.safetensors"))
        manifest.append(dict(sdpa, name=name, fresh_v_head=rewrite == "drop_v_head", incremental=incremental,
                             window_effect=effect))
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest)} {label} reference cases to {out_dir}")

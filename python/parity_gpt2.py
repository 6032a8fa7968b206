"""Reference outputs for the GPT-2 parity suite.

Builds seeded random GPT-2 models over a spread of configs, wraps each in TRL's
AutoModelForCausalLMWithValueHead, saves it with TRL's save_pretrained, and stores the
inputs and the outputs TRL computes (logits, values, loss) for the Rust side to compare.

usage: python parity_gpt2.py OUT_DIR
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel
from trl import AutoModelForCausalLMWithValueHead

BASE = dict(vocab_size=97, n_positions=40, n_embd=32, n_layer=2, n_head=4)

# (name, config overrides, value-head kwargs, checkpoint rewrite)
CASES = [
    ("base_gelu_new_tied", {}, {}, None),
    ("gelu", {"activation_function": "gelu"}, {}, None),
    ("gelu_pytorch_tanh", {"activation_function": "gelu_pytorch_tanh"}, {}, None),
    ("relu", {"activation_function": "relu"}, {}, None),
    ("silu", {"activation_function": "silu"}, {}, None),
    ("tanh", {"activation_function": "tanh"}, {}, None),
    ("quick_gelu", {"activation_function": "quick_gelu"}, {}, None),
    ("gelu_fast", {"activation_function": "gelu_fast"}, {}, None),
    ("n_inner_24", {"n_inner": 24}, {}, None),
    ("no_attn_scaling", {"scale_attn_weights": False}, {}, None),
    ("inverse_layer_idx_scaling", {"scale_attn_by_inverse_layer_idx": True, "n_layer": 3}, {}, None),
    ("reorder_and_upcast_attn", {"reorder_and_upcast_attn": True, "scale_attn_by_inverse_layer_idx": True}, {}, None),
    ("untied_embeddings", {"tie_word_embeddings": False}, {}, None),
    ("single_head", {"n_head": 1}, {}, None),
    ("deeper_8_heads", {"n_layer": 4, "n_embd": 64, "n_head": 8, "layer_norm_epsilon": 1e-6}, {}, None),
    ("v_head_normal_init", {}, {"v_head_init_strategy": "normal", "v_head_initializer_range": 0.5}, None),
    ("summary_dropout_in_config", {"summary_dropout_prob": 0.3}, {}, None),
    ("legacy_keys_and_attn_buffers", {}, {}, "legacy"),
    ("no_v_head_in_checkpoint", {}, {}, "drop_v_head"),
]

BATCH, SEQ = 5, 14
# Per row: padding on the left, padding on the right. Row 1 is unpadded, row 3 right-padded,
# row 4 all padding (TRL accepts it; its logits still enter nothing but the shapes).
PADDING = [(3, 0), (0, 0), (6, 0), (0, 4), (SEQ, 0)]


def randomize(model, seed):
    """HF's init is too small to exercise the math; spread the weights out."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.15
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)


def make_inputs(vocab, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    input_ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    for row, (left, right) in enumerate(PADDING):
        attention_mask[row, :left] = 0
        if right:
            attention_mask[row, SEQ - right :] = 0
    input_ids[attention_mask == 0] = 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[0, SEQ - 2] = -100
    # HF generate's positions: counted from each row's first attended token, 1 at padding.
    position_ids = attention_mask.cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    return input_ids, attention_mask, labels, position_ids


def reference_outputs(model, input_ids, attention_mask, labels, position_ids):
    """TRL's outputs for the call users make (no position ids) and for explicit ids."""
    with torch.no_grad():
        logits, loss, values = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        logits_p, loss_p, values_p = model(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, position_ids=position_ids
        )
    return {
        "logits": logits.contiguous(),
        "values": values.contiguous(),
        "loss": loss.reshape(()),
        "logits_explicit": logits_p.contiguous(),
        "values_explicit": values_p.contiguous(),
        "loss_explicit": loss_p.reshape(()),
    }


def rewrite_checkpoint(folder, how, n_layer, n_positions):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    if how == "legacy":
        renamed = {}
        for k, v in tensors.items():
            renamed[k[len("transformer."):] if k.startswith("transformer.") else k] = v.contiguous()
        for i in range(n_layer):
            causal = torch.tril(torch.ones(n_positions, n_positions, dtype=torch.bool))
            renamed[f"h.{i}.attn.bias"] = causal.view(1, 1, n_positions, n_positions)
            renamed[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        tensors = renamed
    elif how == "drop_v_head":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("v_head.")}
    save_file(tensors, path, metadata={"format": "pt"})


def main(out_dir):
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    manifest = []
    for seed, (name, overrides, vh_kwargs, rewrite) in enumerate(CASES):
        cfg = dict(BASE)
        cfg.update(overrides)
        config = GPT2Config(**cfg)
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        base = GPT2LMHeadModel(config)
        randomize(base, seed)
        model = AutoModelForCausalLMWithValueHead.from_pretrained(base, **vh_kwargs)
        model.eval()
        input_ids, attention_mask, labels, position_ids = make_inputs(cfg["vocab_size"], seed)
        expected = reference_outputs(model, input_ids, attention_mask, labels, position_ids)
        # What transformers' own default attention (sdpa) gives for the same call: for configs
        # that set scale_attn_weights=False or scale_attn_by_inverse_layer_idx, its GPT-2 passes
        # no scale to sdpa and silently ignores them (recorded, not followed: see docs/parity.md).
        sdpa_model = AutoModelForCausalLMWithValueHead.from_pretrained(base, **vh_kwargs)
        sdpa_model.pretrained_model.config._attn_implementation = "sdpa"
        sdpa_model.eval()
        with torch.no_grad():
            sdpa_logits = sdpa_model(input_ids=input_ids, attention_mask=attention_mask)[0]
        keep = attention_mask.bool()
        hf_sdpa_vs_eager = (sdpa_logits - expected["logits"])[keep].abs().max().item()
        base.config._attn_implementation = "eager"
        folder = os.path.join(out_dir, name)
        model.save_pretrained(folder)
        # The saved folder must load back in TRL with the same outputs (the checkpoint is TRL's own).
        if rewrite is None:
            reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(folder, attn_implementation="eager", **vh_kwargs)
            reloaded.eval()
            with torch.no_grad():
                logits2, _, values2 = reloaded(input_ids=input_ids, attention_mask=attention_mask)
            assert torch.allclose(expected["logits"], logits2, atol=1e-6), name
            assert torch.allclose(expected["values"], values2, atol=1e-6), name
        else:
            rewrite_checkpoint(folder, rewrite, cfg["n_layer"], cfg["n_positions"])
        save_file(
            {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels},
            os.path.join(folder, "inputs.safetensors"),
        )
        save_file({"position_ids": position_ids}, os.path.join(folder, "position_ids.safetensors"))
        save_file(expected, os.path.join(folder, "expected.safetensors"))
        manifest.append(
            {"name": name, "fresh_v_head": rewrite == "drop_v_head", "hf_sdpa_vs_eager": hf_sdpa_vs_eager}
        )
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest)} GPT-2 reference cases to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1])

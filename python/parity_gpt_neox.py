"""Reference outputs for the GPT-NeoX parity suite (Pythia's architecture).

Builds seeded random GPTNeoXForCausalLM models over a spread of configs (parallel and sequential
residuals, partial, odd, full and no rotary, rope scaling, tied and untied heads, with and without
attention biases), wraps each in TRL's AutoModelForCausalLMWithValueHead, saves it with TRL's
save_pretrained, and stores the inputs and TRL's outputs (logits, values, loss) for the Rust side.

usage: python parity_gpt_neox.py OUT_DIR
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPTNeoXConfig
from trl import AutoModelForCausalLMWithValueHead

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parity_gpt2 import make_inputs, reference_outputs  # noqa: E402

BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    rotary_pct=0.25,
    bos_token_id=0,
    eos_token_id=2,
)

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

# (name, config overrides, incremental check possible, checkpoint rewrite)
CASES = [
    ("parallel_residual_quarter_rotary", {}, True, None),
    ("sequential_residual", {"use_parallel_residual": False}, True, None),
    ("full_rotary", {"rotary_pct": 1.0}, True, None),
    # head 8 * 0.375 = 3 rotary dims: HF's cos/sin are 4 wide, so 4 dimensions turn.
    ("odd_rotary_dim", {"rotary_pct": 0.375}, True, None),
    ("no_rotary", {"rotary_pct": 0.0}, True, None),
    ("tied_no_attention_bias", {"tie_word_embeddings": True, "attention_bias": False}, True, None),
    ("base_500_eps_gelu_new_dropouts", {"rotary_emb_base": 500, "layer_norm_eps": 1e-6, "hidden_act": "gelu_new",
                                        "hidden_dropout": 0.1, "attention_dropout": 0.1}, True, None),
    ("eight_heads_three_layers", {"hidden_size": 64, "num_attention_heads": 8, "num_hidden_layers": 3,
                                  "rotary_pct": 0.5}, True, None),
    ("rope_linear", {"rotary_pct": 0.5, "rope_scaling": {"type": "linear", "factor": 2.0}}, True, None),
    ("rope_llama3_partial", {"rotary_pct": 0.5, "rope_scaling": LLAMA3}, True, None),
    # Dynamic NTK recomputes frequencies for the whole pass past max_position_embeddings, so a
    # cache filled at shorter lengths cannot equal a full pass.
    ("rope_dynamic_beyond_max", {"rotary_pct": 1.0, "rope_scaling": {"type": "dynamic", "factor": 2.0},
                                 "max_position_embeddings": 10}, False, None),
    ("legacy_keys_and_attn_buffers", {}, True, "legacy"),
    ("no_v_head_in_checkpoint", {}, True, "drop_v_head"),
]


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("layernorm.weight", "layer_norm.weight")):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.15 * noise)


def build(overrides, seed):
    cfg = dict(BASE)
    cfg.update(overrides)
    config = GPTNeoXConfig(**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config)
    randomize(base, seed)
    return base, cfg


def rewrite_checkpoint(folder, how, n_layer, n_positions):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    if how == "legacy":
        # As a checkpoint of the bare GPTNeoXModel plus the head, with the buffers old Pythia
        # checkpoints carry.
        renamed = {}
        for k, v in tensors.items():
            renamed[k[len("gpt_neox."):] if k.startswith("gpt_neox.") else k] = v.contiguous()
        for i in range(n_layer):
            causal = torch.tril(torch.ones(n_positions, n_positions, dtype=torch.bool))
            renamed[f"layers.{i}.attention.bias"] = causal.view(1, 1, n_positions, n_positions)
            renamed[f"layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
            renamed[f"layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(1)
        tensors = renamed
    elif how == "drop_v_head":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("v_head.")}
    save_file(tensors, path, metadata={"format": "pt"})


def main(out_dir):
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    manifest = []
    for seed, (name, overrides, incremental, rewrite) in enumerate(CASES):
        base, cfg = build(overrides, 200 + seed)
        model = AutoModelForCausalLMWithValueHead.from_pretrained(base).eval()
        input_ids, attention_mask, labels, position_ids = make_inputs(cfg["vocab_size"], 200 + seed)
        expected = reference_outputs(model, input_ids, attention_mask, labels, position_ids)
        # TRL's value head reads hidden_states[-1]: after the final LayerNorm.
        with torch.no_grad():
            hidden = base.gpt_neox(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            assert torch.equal(model.v_head(hidden).squeeze(-1), expected["values"]), name
        folder = os.path.join(out_dir, name)
        model.save_pretrained(folder)
        if rewrite is None:
            reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(folder, attn_implementation="eager").eval()
            with torch.no_grad():
                logits2, _, values2 = reloaded(input_ids=input_ids, attention_mask=attention_mask)
            assert torch.allclose(expected["logits"], logits2, atol=1e-6), name
            assert torch.allclose(expected["values"], values2, atol=1e-6), name
        else:
            rewrite_checkpoint(folder, rewrite, cfg["num_hidden_layers"], cfg["max_position_embeddings"])
        save_file(
            {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels},
            os.path.join(folder, "inputs.safetensors"),
        )
        save_file({"position_ids": position_ids}, os.path.join(folder, "position_ids.safetensors"))
        save_file(expected, os.path.join(folder, "expected.safetensors"))
        manifest.append({"name": name, "fresh_v_head": rewrite == "drop_v_head", "incremental": incremental})
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest)} GPT-NeoX reference cases to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1])

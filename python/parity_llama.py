"""Reference outputs for the Llama-family parity suite (Llama, Qwen2).

Builds seeded random models over a spread of configs (grouped-query attention or not, tied or
untied embeddings, each rope scaling, biases, explicit head_dim), wraps each in TRL's
AutoModelForCausalLMWithValueHead, saves it with TRL's save_pretrained, and stores the inputs
and TRL's outputs (logits, values, loss) for the Rust side to compare.

usage: python parity_llama.py OUT_DIR
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
from trl import AutoModelForCausalLMWithValueHead

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parity_gpt2 import make_inputs, reference_outputs  # noqa: E402

BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

# (name, model_type, config overrides, incremental check possible, rewrite)
CASES = [
    ("llama_gqa_untied", "llama", {}, True, None),
    ("llama_mha_tied", "llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}, True, None),
    ("llama_mqa", "llama", {"num_key_value_heads": 1}, True, None),
    ("llama_head_dim_12", "llama", {"head_dim": 12}, True, None),
    ("llama_biases", "llama", {"attention_bias": True, "mlp_bias": True}, True, None),
    ("llama_gelu_rms_eps", "llama", {"hidden_act": "gelu_pytorch_tanh", "rms_norm_eps": 1e-5}, True, None),
    ("rope_theta_500k", "llama", {"rope_theta": 500000.0}, True, None),
    ("rope_linear", "llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}, True, None),
    ("rope_llama3", "llama", {"rope_scaling": LLAMA3}, True, None),
    # Dynamic NTK recomputes frequencies for the whole pass once it is longer than
    # max_position_embeddings, so a cache filled at shorter lengths cannot equal a full pass.
    ("rope_dynamic_beyond_max", "llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 10}, False, None),
    ("rope_dynamic_within_max", "llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, True, None),
    ("qwen2_gqa", "qwen2", {"rms_norm_eps": 1e-6}, True, None),
    ("qwen2_tied_mha", "qwen2", {"num_key_value_heads": 4, "tie_word_embeddings": True}, True, None),
    ("no_v_head_in_checkpoint", "llama", {}, True, "drop_v_head"),
]


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.15 * noise)


def build(model_type, overrides, seed):
    cfg = dict(BASE)
    cfg.update(overrides)
    cfg.setdefault("tie_word_embeddings", False)
    config = (LlamaConfig if model_type == "llama" else Qwen2Config)(**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config)
    randomize(base, seed)
    return base, cfg


def main(out_dir):
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    manifest = []
    for seed, (name, model_type, overrides, incremental, rewrite) in enumerate(CASES):
        base, cfg = build(model_type, overrides, seed)
        model = AutoModelForCausalLMWithValueHead.from_pretrained(base).eval()
        input_ids, attention_mask, labels, position_ids = make_inputs(cfg["vocab_size"], 50 + seed)
        expected = reference_outputs(model, input_ids, attention_mask, labels, position_ids)
        folder = os.path.join(out_dir, name)
        model.save_pretrained(folder)
        if rewrite is None:
            reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(folder, attn_implementation="eager").eval()
            with torch.no_grad():
                logits2, _, values2 = reloaded(input_ids=input_ids, attention_mask=attention_mask)
            assert torch.allclose(expected["logits"], logits2, atol=1e-6), name
            assert torch.allclose(expected["values"], values2, atol=1e-6), name
        else:
            path = os.path.join(folder, "model.safetensors")
            tensors = {k: v for k, v in load_file(path).items() if not k.startswith("v_head.")}
            save_file(tensors, path, metadata={"format": "pt"})
        save_file(
            {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels},
            os.path.join(folder, "inputs.safetensors"),
        )
        save_file({"position_ids": position_ids}, os.path.join(folder, "position_ids.safetensors"))
        save_file(expected, os.path.join(folder, "expected.safetensors"))
        manifest.append({"name": name, "fresh_v_head": rewrite == "drop_v_head", "incremental": incremental})
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest)} Llama-family reference cases to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1])

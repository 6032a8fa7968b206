"""Reference outputs for the Bloom parity suite.

Builds seeded random BloomForCausalLM models over a spread of configs (power-of-2 and other head
counts, whose ALiBi slopes follow a second rule; residuals after the LayerNorms; tied and untied
heads; Megatron's sliced projections with pretraining_tp > 1 and slow_but_exact; the n_embed
alias; legacy keys without the `transformer.` prefix), wraps each in TRL's
AutoModelForCausalLMWithValueHead (Bloom has eager attention only in transformers 4.57.6), saves
it with TRL's save_pretrained, and stores the inputs and TRL's outputs (logits, values, loss) for
the Rust side: the default call, the call with HF generate's position ids (which Bloom ignores),
and the call without an attention mask.

ALiBi numbers keys from the attention mask (cumsum), so TRL's default call gives a left-padded row
its unpadded numbers.

usage: python parity_bloom.py OUT_DIR
"""

import json
import os
import sys
import warnings

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BloomConfig
from trl import AutoModelForCausalLMWithValueHead

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parity_gpt2 import make_inputs, reference_outputs  # noqa: E402

# Bloom warns that position ids have no effect; the explicit call passes them on purpose.
warnings.filterwarnings("ignore", message=".*position_ids.*")

BASE = dict(
    vocab_size=97,
    hidden_size=32,
    n_layer=2,
    n_head=4,
    pad_token_id=3,
    bos_token_id=1,
    eos_token_id=2,
)

# (name, config overrides, checkpoint rewrite)
CASES = [
    ("heads_4_tied", {}, None),
    ("heads_8_post_layernorm_residual", {"n_head": 8, "apply_residual_connection_post_layernorm": True}, None),
    ("heads_6_non_power_of_2", {"n_head": 6, "hidden_size": 36}, None),
    ("heads_12_untied_three_layers", {"n_head": 12, "hidden_size": 48, "n_layer": 3, "tie_word_embeddings": False},
     None),
    ("heads_3_post_layernorm_untied", {"n_head": 3, "hidden_size": 24, "apply_residual_connection_post_layernorm": True,
                                       "tie_word_embeddings": False}, None),
    ("pretraining_tp_3_slow_but_exact", {"pretraining_tp": 3, "slow_but_exact": True}, None),
    ("pretraining_tp_2_fast", {"pretraining_tp": 2}, None),
    ("n_embed_alias_dropouts_eps", {"n_embed": 40, "n_head": 5, "hidden_dropout": 0.1, "attention_dropout": 0.2,
                                    "layer_norm_epsilon": 1e-3}, None),
    ("head_1", {"n_head": 1, "hidden_size": 16}, None),
    ("legacy_unprefixed_keys", {"n_head": 2}, "legacy"),
    ("no_v_head_in_checkpoint", {}, "drop_v_head"),
]


def randomize(model, seed):
    """Weights spread out so that every path matters (HF's init is too small)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layernorm" in name and name.endswith("weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.15 * noise)


def make_config(overrides):
    cfg = dict(BASE)
    cfg.update(overrides)
    config = BloomConfig(**cfg)
    return config, cfg


def build(overrides, seed):
    config, cfg = make_config(overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config)
    randomize(base, seed)
    return base, cfg


def rewrite_checkpoint(folder, how):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    if how == "legacy":
        # As the bigscience checkpoints: the bare BloomModel's keys.
        tensors = {(k[len("transformer."):] if k.startswith("transformer.") else k): v.contiguous()
                   for k, v in tensors.items()}
    elif how == "drop_v_head":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("v_head.")}
    save_file(tensors, path, metadata={"format": "pt"})


def main(out_dir):
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    manifest = []
    for seed, (name, overrides, rewrite) in enumerate(CASES):
        base, cfg = build(overrides, 500 + seed)
        model = AutoModelForCausalLMWithValueHead.from_pretrained(base).eval()
        input_ids, attention_mask, labels, position_ids = make_inputs(cfg["vocab_size"], 500 + seed)
        expected = reference_outputs(model, input_ids, attention_mask, labels, position_ids)
        with torch.no_grad():
            logits_n, loss_n, values_n = model(input_ids=input_ids, labels=labels)
        expected.update(
            logits_nomask=logits_n.contiguous(), values_nomask=values_n.contiguous(), loss_nomask=loss_n.reshape(())
        )
        # Bloom ignores position ids: the explicit call must equal the default one.
        assert torch.equal(expected["logits"], expected["logits_explicit"]), name
        folder = os.path.join(out_dir, name)
        model.save_pretrained(folder)
        if rewrite is None:
            reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(folder, attn_implementation="eager").eval()
            with torch.no_grad():
                logits2, _, values2 = reloaded(input_ids=input_ids, attention_mask=attention_mask)
            assert torch.allclose(expected["logits"], logits2, atol=1e-6), name
            assert torch.allclose(expected["values"], values2, atol=1e-6), name
        else:
            rewrite_checkpoint(folder, rewrite)
        save_file(
            {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels},
            os.path.join(folder, "inputs.safetensors"),
        )
        save_file({"position_ids": position_ids}, os.path.join(folder, "position_ids.safetensors"))
        save_file(expected, os.path.join(folder, "expected.safetensors"))
        manifest.append({"name": name, "fresh_v_head": rewrite == "drop_v_head", "incremental": True})
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest)} Bloom reference cases to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1])

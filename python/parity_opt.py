"""Reference outputs for the OPT parity suite.

Builds seeded random OPTForCausalLM models over a spread of configs (pre- and post-LayerNorm
blocks, word_embed_proj_dim != hidden_size with project_in/project_out, the final LayerNorm
removed, no biases, LayerNorms without parameters, tied and untied heads), wraps each in TRL's
AutoModelForCausalLMWithValueHead, saves it with TRL's save_pretrained, and stores the inputs and
TRL's outputs (logits, values, loss) for the Rust side.

OPT's forward numbers positions from the attention mask even without position ids
(cumsum(mask) * mask - 1, offset by 2 in the table), so TRL's default call already gives a
left-padded row its unpadded numbers; the explicit call passes HF generate's ids (1 at padding),
which OPT's forward takes as raw positions (the offset is added inside).

usage: python parity_opt.py OUT_DIR
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, OPTConfig
from transformers.models.opt import modeling_opt
from trl import AutoModelForCausalLMWithValueHead

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parity_gpt2 import make_inputs, reference_outputs  # noqa: E402

BASE = dict(
    vocab_size=97,
    hidden_size=32,
    ffn_dim=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=40,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
)

# (name, config overrides, checkpoint rewrite)
CASES = [
    ("pre_norm_tied", {}, None),
    ("project_in_out_16", {"word_embed_proj_dim": 16}, None),
    ("post_norm_350m_style", {"do_layer_norm_before": False, "word_embed_proj_dim": 16}, None),
    ("final_layer_norm_removed", {"_remove_final_layer_norm": True}, None),
    ("no_bias_no_affine", {"enable_bias": False, "layer_norm_elementwise_affine": False}, None),
    ("untied_gelu_8_heads", {"tie_word_embeddings": False, "activation_function": "gelu", "num_attention_heads": 8,
                             "num_hidden_layers": 3}, None),
    ("untied_projected_no_pad_dropouts", {"tie_word_embeddings": False, "word_embed_proj_dim": 24, "pad_token_id": None,
                                          "dropout": 0.2, "attention_dropout": 0.1, "layerdrop": 0.1}, None),
    ("legacy_decoder_keys", {"word_embed_proj_dim": 16}, "legacy"),
    ("no_v_head_in_checkpoint", {}, "drop_v_head"),
]


_hf_init_weights = modeling_opt.OPTPreTrainedModel._init_weights


def _init_weights_without_affine(self, module):
    """transformers 4.57.6 cannot build an OPT with layer_norm_elementwise_affine=False: its
    `_init_weights` fills `LayerNorm.weight`, which is None then (AttributeError). The forward
    itself handles such LayerNorms, so the reference skips the fill for them (and only them)."""
    if isinstance(module, torch.nn.LayerNorm) and module.weight is None:
        return
    _hf_init_weights(self, module)


modeling_opt.OPTPreTrainedModel._init_weights = _init_weights_without_affine


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.15 * noise)


def build(overrides, seed):
    cfg = dict(BASE)
    cfg.update(overrides)
    config = OPTConfig(**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config)
    randomize(base, seed)
    return base, cfg


def rewrite_checkpoint(folder, how):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    if how == "legacy":
        # As the original facebook/opt checkpoints: the bare OPTModel's `decoder.*` keys.
        tensors = {(k[len("model."):] if k.startswith("model.") else k): v.contiguous() for k, v in tensors.items()}
    elif how == "drop_v_head":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("v_head.")}
    save_file(tensors, path, metadata={"format": "pt"})


def main(out_dir):
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    manifest = []
    for seed, (name, overrides, rewrite) in enumerate(CASES):
        base, cfg = build(overrides, 300 + seed)
        model = AutoModelForCausalLMWithValueHead.from_pretrained(base).eval()
        proj = cfg.get("word_embed_proj_dim") or cfg["hidden_size"]
        assert model.v_head.summary.weight.shape == (1, proj), name
        input_ids, attention_mask, labels, position_ids = make_inputs(cfg["vocab_size"], 300 + seed)
        expected = reference_outputs(model, input_ids, attention_mask, labels, position_ids)
        # TRL's value head reads hidden_states[-1]: the decoder's output after project_out.
        with torch.no_grad():
            hidden = base.model.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            assert hidden.shape[-1] == proj, name
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
            rewrite_checkpoint(folder, rewrite)
        save_file(
            {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels},
            os.path.join(folder, "inputs.safetensors"),
        )
        save_file({"position_ids": position_ids}, os.path.join(folder, "position_ids.safetensors"))
        save_file(expected, os.path.join(folder, "expected.safetensors"))
        manifest.append({"name": name, "fresh_v_head": rewrite == "drop_v_head"})
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest)} OPT reference cases to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1])

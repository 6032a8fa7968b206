"""Reference outputs for the DBRX parity suite.

Builds seeded random DbrxForCausalLM models over a spread of configs (2, 3, 4, 5 and 8 experts;
top-1, top-2 and every expert; expert weights normalised by their 1-norm, 2-norm, 0.5-norm or
not at all; clip_qkv set tight enough to bite and unset; GQA, MQA and MHA; silu and gelu experts;
one to three blocks; a rope base other than 10000), wraps each in TRL's
AutoModelForCausalLMWithValueHead with eager attention, saves it with TRL's save_pretrained and
stores TRL's outputs on the five-row padded batch (parity_causal.run_cases). DBRX cannot be tied
(DbrxConfig raises on tie_word_embeddings), so every case is untied.

For every case it also writes extra.safetensors, from the saved folder loaded back with TRL:
- `*_nomask`: the default call with no attention mask at all (labels = the ids);
- `*_bf16`: the default call with the backbone loaded in bf16 (TRL's f32 value head and logits);
- `*_sdpa`: the default call with HF's default attention, sdpa (unpatched, see
  eager_without_clip_works);
- `logits_train`: the default call in train mode after `torch.manual_seed(TRAIN_SEED)`: with
  moe_jitter_eps set, HF multiplies every block's FFN input by uniform noise, which the Rust side
  reproduces from the same seed (every dropout of these cases is 0, so the noise is the only draw
  before the value head's dropout, which only the values see).

usage: python parity_dbrx.py OUT_DIR
"""

import copy
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import DbrxConfig
from transformers.models.dbrx import modeling_dbrx
from trl import AutoModelForCausalLMWithValueHead

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parity_causal  # noqa: E402

TRAIN_SEED = 1234

BASE = dict(
    vocab_size=97,
    d_model=32,
    n_heads=4,
    n_layers=2,
    max_seq_len=32,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def ffn(experts, top_k, normalize=1.0, **extra):
    return dict(ffn_hidden_size=24, moe_num_experts=experts, moe_top_k=top_k,
                moe_normalize_expert_weights=normalize, **extra)


# (name, config overrides, incremental check possible, rewrite)
CASES = [
    ("e4_top1_p1_gqa", {"attn_config": {"kv_n_heads": 2}, "ffn_config": ffn(4, 1)}, True, None),
    ("e4_top2_p_none_mha", {"attn_config": {"kv_n_heads": 4}, "ffn_config": ffn(4, 2, None)}, True, None),
    ("e3_top_all_p2_clip", {"attn_config": {"kv_n_heads": 2, "clip_qkv": 0.5}, "ffn_config": ffn(3, 3, 2.0)},
     True, None),
    ("e8_top2_p1_mqa_clip_gelu_three_blocks",
     {"n_layers": 3, "attn_config": {"kv_n_heads": 1, "clip_qkv": 0.8},
      "ffn_config": ffn(8, 2, 1.0, ffn_act_fn={"name": "gelu"})}, True, None),
    ("e2_top1_p_none", {"attn_config": {"kv_n_heads": 2}, "ffn_config": ffn(2, 1, None)}, True, None),
    ("e5_top4_p_half_theta", {"attn_config": {"kv_n_heads": 2, "rope_theta": 5e5}, "ffn_config": ffn(5, 4, 0.5)},
     True, None),
    ("e4_top2_p2_one_block_mha", {"n_layers": 1, "attn_config": {"kv_n_heads": 4},
                                  "ffn_config": ffn(4, 2, 2.0)}, True, None),
    ("e4_top2_jitter_train", {"attn_config": {"kv_n_heads": 2},
                              "ffn_config": ffn(4, 2, 1.0, moe_jitter_eps=0.2)}, True, None),
    ("nested_defaults_dropouts", {"d_model": 32, "n_heads": 2, "resid_pdrop": 0.1, "emb_pdrop": 0.1,
                                  "attn_config": {"attn_pdrop": 0.1},
                                  "ffn_config": {"ffn_hidden_size": 20}}, True, None),
    ("no_v_head_in_checkpoint", {"attn_config": {"kv_n_heads": 2, "clip_qkv": 0.5}, "ffn_config": ffn(4, 2)},
     True, "drop_v_head"),
]


def eager_without_clip_works():
    """transformers 4.57.6's eager DbrxAttention calls `clamp(min=None, max=None)` when clip_qkv is
    None, which torch rejects: HF's eager path cannot run an unclipped DBRX at all (its sdpa and
    flash paths skip the clamp). The eager reference of those cases clamps to +-inf instead, an
    identity on every finite value, so it is HF's eager math without the crash; the sdpa
    reference (`*_sdpa` below) is HF unpatched."""
    original = modeling_dbrx.DbrxAttention.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if type(self) is modeling_dbrx.DbrxAttention and self.clip_qkv is None:
            self.clip_qkv = float("inf")

    modeling_dbrx.DbrxAttention.__init__ = init


def hf_sdpa_vs_eager(base, input_ids, attention_mask, labels, expected):
    """parity_causal's measure, with a model rebuilt for sdpa: DBRX picks its attention class when
    the blocks are built, so switching the config afterwards would change nothing."""
    config = copy.deepcopy(base.config)
    config._attn_implementation = "sdpa"
    rebuilt = type(base)(config)
    rebuilt.load_state_dict(base.state_dict())
    assert type(rebuilt.transformer.blocks[0].norm_attn_norm.attn) is modeling_dbrx.DbrxSdpaAttention
    sdpa = AutoModelForCausalLMWithValueHead.from_pretrained(rebuilt).eval()
    with torch.no_grad():
        logits, loss, _ = sdpa(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    diff = (logits - expected["logits"]).abs()
    return {
        "hf_sdpa_vs_eager": diff[attention_mask.bool()].max().item(),
        "hf_sdpa_vs_eager_all_positions": diff.max().item(),
        "hf_sdpa_vs_eager_loss": (loss - expected["loss"]).abs().item(),
    }


def randomize(model, seed):
    """Weights spread out so that every path matters (HF's init is too small); the bias-free
    LayerNorms' scales near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            # Only the norms themselves: the attention's names sit under `norm_attn_norm` too.
            if name.endswith(("norm_1.weight", "norm_2.weight", "norm_f.weight")):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.15 * noise)


def make_config(overrides):
    cfg = dict(BASE)
    cfg.update(overrides)
    return DbrxConfig(**cfg), cfg


def extras(out_dir):
    report = {}
    for name, overrides, _, _ in CASES:
        folder = os.path.join(out_dir, name)
        inputs = load_file(os.path.join(folder, "inputs.safetensors"))
        expected = load_file(os.path.join(folder, "expected.safetensors"))
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        model = AutoModelForCausalLMWithValueHead.from_pretrained(folder, attn_implementation="eager").eval()
        with torch.no_grad():
            logits_nomask, loss_nomask, values_nomask = model(input_ids=ids, labels=ids)
        out = {
            "logits_nomask": logits_nomask.contiguous(),
            "values_nomask": values_nomask.contiguous(),
            "loss_nomask": loss_nomask.reshape(()),
        }
        bf16 = AutoModelForCausalLMWithValueHead.from_pretrained(folder, attn_implementation="eager",
                                                                 dtype=torch.bfloat16).eval()
        assert bf16.pretrained_model.dtype == torch.bfloat16, name
        with torch.no_grad():
            logits_bf16, loss_bf16, values_bf16 = bf16(input_ids=ids, attention_mask=mask, labels=labels)
        out.update(logits_bf16=logits_bf16.float().contiguous(), values_bf16=values_bf16.float().contiguous(),
                   loss_bf16=loss_bf16.float().reshape(()))
        # HF's default attention (sdpa), unpatched; it unmasks fully padded query rows, so the
        # Rust side compares it at attended positions only.
        sdpa = AutoModelForCausalLMWithValueHead.from_pretrained(folder, attn_implementation="sdpa").eval()
        with torch.no_grad():
            logits_sdpa, _, values_sdpa = sdpa(input_ids=ids, attention_mask=mask)
        out.update(logits_sdpa=logits_sdpa.contiguous(), values_sdpa=values_sdpa.contiguous())
        jitter = overrides.get("ffn_config", {}).get("moe_jitter_eps")
        facts = {"hf_bf16_vs_f32": (logits_bf16.float() - expected["logits"]).abs().max().item(),
                 "jitter": jitter}
        if jitter is not None:
            model.train()
            torch.manual_seed(TRAIN_SEED)
            with torch.no_grad():
                logits_train, _, _ = model(input_ids=ids, attention_mask=mask)
            model.eval()
            out["logits_train"] = logits_train.contiguous()
            # The noise must matter, or the train check tests nothing.
            facts["train_vs_eval"] = (logits_train - expected["logits"]).abs().max().item()
            assert facts["train_vs_eval"] > 1e-3, name
        save_file(out, os.path.join(folder, "extra.safetensors"))
        report[name] = facts
    with open(os.path.join(out_dir, "dbrx_extras.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote the no-mask, bf16 and train-mode references of {len(report)} DBRX cases")


if __name__ == "__main__":
    eager_without_clip_works()
    parity_causal.randomize = randomize
    parity_causal.hf_sdpa_vs_eager = hf_sdpa_vs_eager
    parity_causal.run_cases(sys.argv[1], CASES, make_config, "DBRX")
    torch.set_num_threads(1)
    extras(sys.argv[1])

"""Reference outputs for the T5 parity suite.

Builds seeded random T5 models over a spread of configs, wraps each in TRL's
AutoModelForSeq2SeqLMWithValueHead, saves it with TRL's save_pretrained, and stores the inputs
and the outputs TRL computes (logits, values, loss) for the Rust side to compare.

usage: python parity_t5.py OUT_DIR
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import T5Config, T5ForConditionalGeneration
from trl import AutoModelForSeq2SeqLMWithValueHead

BASE = dict(
    vocab_size=101,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)

# (name, config overrides, checkpoint rewrite)
CASES = [
    ("relu_tied_v1_0", {"feed_forward_proj": "relu"}, None),
    ("gated_gelu_untied_v1_1", {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}, None),
    ("gated_silu", {"feed_forward_proj": "gated-silu"}, None),
    ("gelu_not_gated", {"feed_forward_proj": "gelu", "layer_norm_epsilon": 1e-5}, None),
    ("num_decoder_layers_3_vs_2", {"num_decoder_layers": 3}, None),
    ("d_kv_times_heads_ne_d_model", {"d_kv": 6, "num_heads": 4, "d_model": 32}, None),
    ("small_bucket_range", {"relative_attention_num_buckets": 16, "relative_attention_max_distance": 20}, None),
    ("no_v_head_in_checkpoint", {"feed_forward_proj": "gated-gelu"}, "drop_v_head"),
]

BATCH, SRC, TGT = 3, 20, 24
RIGHT_PAD = [0, 4, 9]
LABEL_PAD = [0, 3, 7]


def randomize(model, seed):
    """HF's init is too small to exercise the math; spread the weights out."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif "relative_attention_bias" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.15 * noise)


def make_inputs(vocab, seed):
    g = torch.Generator().manual_seed(2000 + seed)
    input_ids = torch.randint(2, vocab, (BATCH, SRC), generator=g)
    attention_mask = torch.ones(BATCH, SRC, dtype=torch.long)
    for row, pad in enumerate(RIGHT_PAD):
        if pad:
            attention_mask[row, SRC - pad :] = 0
            input_ids[row, SRC - pad :] = 0
    labels = torch.randint(2, vocab, (BATCH, TGT), generator=g)
    for row, pad in enumerate(LABEL_PAD):
        if pad:
            labels[row, TGT - pad :] = -100
    return input_ids, attention_mask, labels


def main(out_dir):
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    manifest = []
    for seed, (name, overrides, rewrite) in enumerate(CASES):
        cfg = dict(BASE)
        cfg.update(overrides)
        config = T5Config(**cfg)
        torch.manual_seed(seed)
        base = T5ForConditionalGeneration(config)
        randomize(base, seed)
        model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(base)
        model.eval()
        input_ids, attention_mask, labels = make_inputs(cfg["vocab_size"], seed)
        with torch.no_grad():
            logits, loss, values = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        decoder_input_ids = base._shift_right(labels)
        folder = os.path.join(out_dir, name)
        model.save_pretrained(folder)
        if rewrite is None:
            # The saved folder must load back in TRL with the same outputs.
            reloaded = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(folder)
            reloaded.eval()
            with torch.no_grad():
                logits2, _, values2 = reloaded(
                    input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids
                )
            assert torch.allclose(logits, logits2, atol=1e-6) and torch.allclose(values, values2, atol=1e-6), name
        elif rewrite == "drop_v_head":
            path = os.path.join(folder, "model.safetensors")
            tensors = {k: v for k, v in load_file(path).items() if not k.startswith("v_head.")}
            save_file(tensors, path, metadata={"format": "pt"})
        save_file(
            {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "labels": labels,
                "decoder_input_ids": decoder_input_ids,
            },
            os.path.join(folder, "inputs.safetensors"),
        )
        save_file(
            {"logits": logits.contiguous(), "values": values.contiguous(), "loss": loss.reshape(())},
            os.path.join(folder, "expected.safetensors"),
        )
        manifest.append({"name": name, "fresh_v_head": rewrite == "drop_v_head"})
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest)} T5 reference cases to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1])

"""Reference outputs for the Bart parity suite.

Builds seeded random BartForConditionalGeneration models over a spread of configs (tied and
untied heads, scale_embedding on and off, gelu / relu / gelu_new / silu, encoder and decoder
layer, head and feed-forward counts that differ, a random final_logits_bias, a position table
no longer than the decoder input), wraps each in TRL's AutoModelForSeq2SeqLMWithValueHead with
eager attention, saves it with TRL's save_pretrained, and stores the inputs and TRL's outputs:

- the default call `model(input_ids, attention_mask, labels=labels)` (decoder inputs are the
  labels shifted right behind decoder_start_token_id);
- the call without any mask or decoder input, `model(input_ids)`, where Bart's forward shifts the
  encoder ids right itself;
- the call with a right-padded decoder mask, `model(input_ids, attention_mask,
  decoder_input_ids, decoder_attention_mask)`.

BartConfig in transformers 4.57.6 has no `add_final_layer_norm` / `normalize_before` (they left
long ago; HF ignores them in config.json), so no case sets them.

usage: python parity_bart.py OUT_DIR
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import BartConfig, BartForConditionalGeneration
from transformers.models.bart.modeling_bart import shift_tokens_right
from trl import AutoModelForSeq2SeqLMWithValueHead

BASE = dict(
    vocab_size=101,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    max_position_embeddings=64,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
    forced_eos_token_id=2,
)

# (name, config overrides, checkpoint rewrite)
CASES = [
    ("gelu_tied", {}, None),
    ("relu_untied", {"activation_function": "relu", "tie_word_embeddings": False}, None),
    ("scale_embedding", {"scale_embedding": True}, None),
    ("encoder_3_decoder_1_heads_8_2", {"encoder_layers": 3, "decoder_layers": 1, "encoder_attention_heads": 8,
                                       "decoder_attention_heads": 2}, None),
    ("ffn_40_24_gelu_new", {"encoder_ffn_dim": 40, "decoder_ffn_dim": 24, "activation_function": "gelu_new"}, None),
    ("silu_scaled_untied_d48", {"activation_function": "silu", "scale_embedding": True, "tie_word_embeddings": False,
                                "d_model": 48, "encoder_attention_heads": 6, "decoder_attention_heads": 3}, None),
    ("dropouts_and_layerdrop_in_config", {"dropout": 0.3, "attention_dropout": 0.2, "activation_dropout": 0.1,
                                          "encoder_layerdrop": 0.2, "decoder_layerdrop": 0.2}, None),
    ("positions_exactly_filled", {"max_position_embeddings": 24}, None),
    ("bare_bart_model_keys", {}, "bare"),
    ("embedding_only_under_decoder_embed_tokens", {}, "decoder_embed_tokens"),
    ("no_final_logits_bias_in_checkpoint", {}, "drop_final_logits_bias"),
    ("no_v_head_in_checkpoint", {"tie_word_embeddings": False}, "drop_v_head"),
]

BATCH, SRC, TGT = 3, 20, 24
RIGHT_PAD = [0, 4, 9]
LABEL_PAD = [0, 3, 7]


def randomize(model, seed, final_logits_bias=True):
    """HF's init is too small to exercise the math; spread the weights out. The
    final_logits_bias buffer (zeros in HF) gets values too, so that loading it is checked."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name or "layernorm" in name:
                p.copy_((1.0 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.15 * noise)
        if final_logits_bias:
            model.final_logits_bias.copy_(0.5 * torch.randn(model.final_logits_bias.shape, generator=g))


def make_config(overrides):
    cfg = dict(BASE)
    cfg.update(overrides)
    config = BartConfig(**cfg)
    config._attn_implementation = "eager"
    return config, cfg


def build(overrides, seed, final_logits_bias=True):
    config, cfg = make_config(overrides)
    torch.manual_seed(seed)
    base = BartForConditionalGeneration(config)
    randomize(base, seed, final_logits_bias)
    return base, cfg


def make_inputs(vocab, seed):
    g = torch.Generator().manual_seed(4000 + seed)
    input_ids = torch.randint(3, vocab, (BATCH, SRC), generator=g)
    attention_mask = torch.ones(BATCH, SRC, dtype=torch.long)
    for row, pad in enumerate(RIGHT_PAD):
        if pad:
            attention_mask[row, SRC - pad:] = 0
            input_ids[row, SRC - pad:] = BASE["pad_token_id"]
    labels = torch.randint(3, vocab, (BATCH, TGT), generator=g)
    for row, pad in enumerate(LABEL_PAD):
        if pad:
            labels[row, TGT - pad:] = -100
    return input_ids, attention_mask, labels


def rewrite_checkpoint(folder, how):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    if how == "bare":
        # As checkpoints of the bare BartModel: no `model.` prefix (the LM head and the value
        # head keep their names).
        tensors = {(k[len("model."):] if k.startswith("model.") else k): v.contiguous() for k, v in tensors.items()}
    elif how == "decoder_embed_tokens":
        # As facebook/bart-large-cnn (transformers issue #36247): the embedding stored only
        # under decoder.embed_tokens.
        shared = tensors.pop("model.shared.weight")
        tensors = {k: v for k, v in tensors.items() if "embed_tokens" not in k}
        tensors["model.decoder.embed_tokens.weight"] = shared.contiguous()
    elif how == "drop_final_logits_bias":
        tensors = {k: v for k, v in tensors.items() if k != "final_logits_bias"}
    elif how == "drop_v_head":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("v_head.")}
    save_file(tensors, path, metadata={"format": "pt"})


def main(out_dir):
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    manifest = []
    for seed, (name, overrides, rewrite) in enumerate(CASES):
        base, cfg = build(overrides, 500 + seed, final_logits_bias=rewrite != "drop_final_logits_bias")
        model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(base).eval()
        assert model.v_head.summary.weight.shape == (1, cfg["d_model"]), name
        input_ids, attention_mask, labels = make_inputs(cfg["vocab_size"], seed)
        decoder_input_ids = shift_tokens_right(labels, cfg["pad_token_id"], cfg["decoder_start_token_id"])
        decoder_attention_mask = (labels != -100).long()
        with torch.no_grad():
            logits, loss, values = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            # No mask, no decoder input: Bart shifts input_ids right for the decoder.
            logits_nomask, _, values_nomask = model(input_ids=input_ids)
            logits_decmask, _, values_decmask = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
            )
        # The decoder mask must matter at the padded rows, or the third call checks nothing.
        assert (logits_decmask - logits).abs().max() > 1e-3, name
        folder = os.path.join(out_dir, name)
        model.save_pretrained(folder)
        reload_err = None
        if rewrite is None:
            # The saved folder loads back in TRL with the same outputs when tied. Untied, it does
            # not: transformers 4.57.6 saves the stacks' embed_tokens (the same tensor as
            # model.shared) only as model.shared.weight, and on loading re-initialises them
            # ("newly initialized: model.decoder.embed_tokens.weight, ..."). Recorded, not asserted.
            reloaded = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(folder, attn_implementation="eager").eval()
            with torch.no_grad():
                logits2, _, values2 = reloaded(
                    input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids
                )
            reload_err = max((logits - logits2).abs().max().item(), (values - values2).abs().max().item())
            if cfg.get("tie_word_embeddings", True):
                assert reload_err <= 1e-6, (name, reload_err)
        else:
            rewrite_checkpoint(folder, rewrite)
        save_file(
            {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "labels": labels,
                "decoder_input_ids": decoder_input_ids,
            },
            os.path.join(folder, "inputs.safetensors"),
        )
        # Apart from inputs.safetensors, which `vh forward` reads for the default call.
        save_file({"decoder_attention_mask": decoder_attention_mask}, os.path.join(folder, "decoder_mask.safetensors"))
        save_file(
            {
                "logits": logits.contiguous(),
                "values": values.contiguous(),
                "loss": loss.reshape(()),
                "logits_nomask": logits_nomask.contiguous(),
                "values_nomask": values_nomask.contiguous(),
                "logits_decmask": logits_decmask.contiguous(),
                "values_decmask": values_decmask.contiguous(),
            },
            os.path.join(folder, "expected.safetensors"),
        )
        manifest.append({"name": name, "fresh_v_head": rewrite == "drop_v_head", "trl_reload_err": reload_err})
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest)} Bart reference cases to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1])

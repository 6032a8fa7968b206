"""Reference outputs for greedy generation parity.

Builds seeded random GPT-2, Llama, Qwen2, Mistral (sliding window), Qwen3 (a sliding layer), GPT-NeoX,
OPT, Gemma, Gemma2 (soft caps, a sliding layer), Phi3 (LongRoPE, partial rotary, a window), Bloom (ALiBi), Cohere (parallel blocks, q/k norms,
interleaved rotary, logit_scale), DBRX (mixture of experts), T5 and Bart models (as the forward parity suites do), wraps each in TRL's value-head class, saves it
with TRL's save_pretrained, and records the token sequences that TRL's `generate` (which is
transformers' `generate`) returns with do_sample=False on padded batches: plain, with a repetition
penalty, and with eos tokens that end some rows early after min_new_tokens. Bart's generation
config forces a first token (forced_bos_token_id, as facebook/bart-large) and the last one
(forced_eos_token_id, BartConfig's default 2); the manifest records both for the Rust side.

`phi3_switch` is a Phi3 whose LongRoPE switches from its short to its long factors during decoding,
where HF's Phi3 drops the cache and runs the whole sequence again (see phi3_switch_model).

usage: python parity_generate.py OUT_DIR
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration
from trl import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parity_bart  # noqa: E402
import parity_bloom  # noqa: E402
import parity_causal  # noqa: E402
import parity_cohere  # noqa: E402
import parity_dbrx  # noqa: E402
import parity_gemma  # noqa: E402
import parity_gemma2  # noqa: E402
import parity_gpt2  # noqa: E402
import parity_gpt_neox  # noqa: E402
import parity_llama  # noqa: E402
import parity_mistral  # noqa: E402
import parity_qwen3  # noqa: E402
import parity_opt  # noqa: E402
import parity_phi3  # noqa: E402
import parity_t5  # noqa: E402

MAX_NEW = 12


def gpt2_model(seed):
    cfg = dict(parity_gpt2.BASE, bos_token_id=96, eos_token_id=96, pad_token_id=0)
    config = GPT2Config(**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    base = GPT2LMHeadModel(config)
    parity_gpt2.randomize(base, seed)
    return AutoModelForCausalLMWithValueHead.from_pretrained(base).eval(), cfg["vocab_size"]


def llama_model(seed):
    base, cfg = parity_llama.build("llama", {"num_key_value_heads": 2, "rope_theta": 500000.0}, seed)
    return AutoModelForCausalLMWithValueHead.from_pretrained(base).eval(), cfg["vocab_size"]


def qwen2_model(seed):
    base, cfg = parity_llama.build("qwen2", {"num_key_value_heads": 1, "tie_word_embeddings": True}, seed)
    return AutoModelForCausalLMWithValueHead.from_pretrained(base).eval(), cfg["vocab_size"]


def mistral_model(seed):
    # A window of 4 over prompts of 8 and 12 new tokens: decoding runs past it, through left padding.
    config, cfg = parity_mistral.make_config({"sliding_window": 4})
    base = parity_causal.build(config, seed)
    return AutoModelForCausalLMWithValueHead.from_pretrained(base).eval(), cfg["vocab_size"]


def qwen3_model(seed):
    # Layer 0 full, layer 1 sliding (window 5); q/k norms; tied.
    overrides = {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1, "tie_word_embeddings": True}
    config, cfg = parity_qwen3.make_config(overrides)
    base = parity_causal.build(config, seed)
    return AutoModelForCausalLMWithValueHead.from_pretrained(base).eval(), cfg["vocab_size"]


def gpt_neox_model(seed):
    base, cfg = parity_gpt_neox.build({"rotary_pct": 0.5, "use_parallel_residual": True}, seed)
    return AutoModelForCausalLMWithValueHead.from_pretrained(base).eval(), cfg["vocab_size"]


def opt_model(seed):
    # OPT-350m's layout: post-LayerNorm blocks and project_in/project_out (value head width 16).
    base, cfg = parity_opt.build({"do_layer_norm_before": False, "word_embed_proj_dim": 16}, seed)
    return AutoModelForCausalLMWithValueHead.from_pretrained(base).eval(), cfg["vocab_size"]


def bloom_model(seed):
    # Six heads (ALiBi's second slope rule), residuals after the LayerNorms, untied head.
    base, cfg = parity_bloom.build({"n_head": 6, "hidden_size": 36, "apply_residual_connection_post_layernorm": True,
                                    "tie_word_embeddings": False}, seed)
    return AutoModelForCausalLMWithValueHead.from_pretrained(base).eval(), cfg["vocab_size"]


def cohere_model(seed):
    # Tied (Cohere's default), q/k norms, MQA, a logit_scale below 1 that the repetition penalty
    # sees (HF scales the logits before the processors). With GQA this seed's greedy rows settle on
    # repeats that the eos run's tokens never end; with one key/value head two rows end early.
    config, cfg = parity_cohere.make_config({"use_qk_norm": True, "logit_scale": 0.25, "num_key_value_heads": 1})
    base = parity_causal.build(config, seed)
    return AutoModelForCausalLMWithValueHead.from_pretrained(base).eval(), cfg["vocab_size"]


def dbrx_model(seed):
    # Eight experts, top-2 with 1-norm weights, MQA, clip_qkv (transformers' eager DBRX needs it set).
    config, cfg = parity_dbrx.make_config({"attn_config": {"kv_n_heads": 1, "clip_qkv": 0.8},
                                           "ffn_config": parity_dbrx.ffn(8, 2)})
    original = parity_causal.randomize
    parity_causal.randomize = parity_dbrx.randomize
    try:
        base = parity_causal.build(config, seed)
    finally:
        parity_causal.randomize = original
    return AutoModelForCausalLMWithValueHead.from_pretrained(base).eval(), cfg["vocab_size"]


def gemma_model(seed):
    # Tied (Gemma's default), GQA, head_dim 8 with hidden 32: normalised embeddings, (1 + w) norms.
    config, cfg = parity_gemma.make_config({})
    base = parity_causal.build(config, seed)
    return AutoModelForCausalLMWithValueHead.from_pretrained(base).eval(), cfg["vocab_size"]


def gemma2_model(seed):
    # Layer 0 slides (window 4) past which decoding runs, layer 1 is full; tight attention and
    # final soft caps.
    config, cfg = parity_gemma2.make_config({})
    base = parity_causal.build(config, seed)
    return AutoModelForCausalLMWithValueHead.from_pretrained(base).eval(), cfg["vocab_size"]


def phi3_model(seed):
    # LongRoPE on its long factors throughout (original length 4, below the 8-token prompts), three
    # quarters of each head rotating, a window of 6 past which decoding runs, through left padding.
    config, cfg = parity_phi3.make_config({"partial_rotary_factor": 0.75, "rope_scaling": parity_phi3.longrope(3),
                                           "original_max_position_embeddings": 4, "sliding_window": 6})
    base = parity_causal.build(config, seed)
    return AutoModelForCausalLMWithValueHead.from_pretrained(base).eval(), cfg["vocab_size"]


# Where phi3_switch's LongRoPE switches: a pass over more than 12 positions takes the long factors.
PHI3_SWITCH_ORIGINAL = 12


def phi3_switch_model(seed, attn_implementation="sdpa"):
    # The prompts (8 tokens) and the first 4 new tokens run on the short factors; once the cache
    # holds 12 positions, HF's Phi3 drops it and reruns the whole sequence on the long ones. That
    # rerun passes `cache_position` of the new token alone, so transformers builds a one-key mask:
    # under sdpa without padding it builds none and the kernel's causal flag applies (the rerun is
    # the full causal pass), which is the reference here.
    config, cfg = parity_phi3.make_config({"rope_scaling": parity_phi3.longrope(4),
                                           "original_max_position_embeddings": PHI3_SWITCH_ORIGINAL})
    base = parity_causal.build(config, seed, attn_implementation)
    return AutoModelForCausalLMWithValueHead.from_pretrained(base).eval(), cfg["vocab_size"]


def t5_model(seed):
    cfg = dict(parity_t5.BASE, feed_forward_proj="gated-gelu")
    torch.manual_seed(seed)
    base = T5ForConditionalGeneration(T5Config(**cfg))
    parity_t5.randomize(base, seed)
    return AutoModelForSeq2SeqLMWithValueHead.from_pretrained(base).eval(), cfg["vocab_size"]


def bart_model(seed):
    # Tied, gelu, embeddings scaled by sqrt(d_model), a random final_logits_bias; forced BOS 0
    # and forced EOS 2 in its generation config.
    base, cfg = parity_bart.build({"scale_embedding": True, "forced_bos_token_id": 0}, seed)
    return AutoModelForSeq2SeqLMWithValueHead.from_pretrained(base).eval(), cfg["vocab_size"]


SEQ2SEQ = ("t5", "bart")


def causal_prompts(vocab):
    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(1, vocab - 1, (3, 8), generator=g)
    attention_mask = torch.ones_like(input_ids)
    for row, pad in enumerate([2, 0, 5]):
        attention_mask[row, :pad] = 0
        input_ids[row, :pad] = 0
    return input_ids, attention_mask


def unpadded_prompts(vocab):
    input_ids, attention_mask = causal_prompts(vocab)
    g = torch.Generator().manual_seed(9)
    return torch.randint(1, vocab - 1, input_ids.shape, generator=g), torch.ones_like(attention_mask)


def seq2seq_prompts(vocab):
    g = torch.Generator().manual_seed(8)
    input_ids = torch.randint(2, vocab, (3, 10), generator=g)
    attention_mask = torch.ones_like(input_ids)
    for row, pad in enumerate([0, 3, 6]):
        if pad:
            attention_mask[row, -pad:] = 0
            input_ids[row, -pad:] = 0
    return input_ids, attention_mask


def generate(model, input_ids, attention_mask, settings):
    with torch.no_grad():
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=settings["max_new_tokens"],
            min_new_tokens=settings["min_new_tokens"],
            repetition_penalty=settings["repetition_penalty"],
            eos_token_id=settings["eos_token_id"] or None,
            pad_token_id=settings["pad_token_id"],
        )


def pick_eos(plain, start, min_new):
    """Tokens that end some rows early: the first row's token right after min_new_tokens, and
    one more that first appears late in another row."""
    row0 = plain[0, start:].tolist()
    eos = [row0[min_new + 1]]
    for row in plain[1:, start:].tolist():
        for tok in row[min_new + 3 :]:
            if tok not in eos and tok not in row0[: min_new + 2]:
                eos.append(tok)
                break
        if len(eos) == 2:
            break
    return eos


def main(out_dir):
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    manifest = []
    kinds = [
        ("gpt2", gpt2_model, causal_prompts),
        ("llama", llama_model, causal_prompts),
        ("qwen2", qwen2_model, causal_prompts),
        ("mistral", mistral_model, causal_prompts),
        ("qwen3", qwen3_model, causal_prompts),
        ("gpt_neox", gpt_neox_model, causal_prompts),
        ("opt", opt_model, causal_prompts),
        ("gemma", gemma_model, causal_prompts),
        ("gemma2", gemma2_model, causal_prompts),
        ("phi3", phi3_model, causal_prompts),
        ("phi3_switch", phi3_switch_model, unpadded_prompts),
        ("bloom", bloom_model, causal_prompts),
        ("cohere", cohere_model, causal_prompts),
        ("dbrx", dbrx_model, causal_prompts),
        ("t5", t5_model, seq2seq_prompts),
        ("bart", bart_model, seq2seq_prompts),
    ]
    for kind, build, prompts in kinds:
        model, vocab = build(100)
        folder = os.path.join(out_dir, kind)
        model.save_pretrained(folder)
        input_ids, attention_mask = prompts(vocab)
        save_file({"input_ids": input_ids, "attention_mask": attention_mask}, os.path.join(folder, "prompts.safetensors"))
        start = 1 if kind in SEQ2SEQ else input_ids.shape[1]
        generation_config = model.pretrained_model.generation_config
        forced = dict(forced_bos_token_id=generation_config.forced_bos_token_id,
                      forced_eos_token_id=generation_config.forced_eos_token_id)
        base = dict(max_new_tokens=MAX_NEW, min_new_tokens=0, repetition_penalty=1.0, eos_token_id=[], pad_token_id=0)
        plain = generate(model, input_ids, attention_mask, base)
        runs = [
            ("greedy", base),
            ("repetition_penalty", dict(base, repetition_penalty=1.5)),
        ]
        min_new = 3
        runs.append(("eos_after_min_new_tokens", dict(base, min_new_tokens=min_new, eos_token_id=pick_eos(plain, start, min_new))))
        for name, settings in runs:
            sequences = generate(model, input_ids, attention_mask, settings)
            case = f"{kind}_{name}"
            save_file({"sequences": sequences.contiguous()}, os.path.join(folder, f"{case}.safetensors"))
            record = dict(settings, **forced, name=case, model=kind, length=sequences.shape[1])
            if kind == "phi3_switch":
                # The first new token predicted by a pass on the long factors: the rerun's.
                record["rollout_from"] = PHI3_SWITCH_ORIGINAL + 1 - input_ids.shape[1]
            manifest.append(record)
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest)} generation reference cases to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1])

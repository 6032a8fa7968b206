"""Reference side of the port of TRL's own value-head test suite (tests/test_modeling_value_head.py).

`make OUT_DIR`: for each architecture we implement, builds a tiny seeded random transformers model
and saves it as a plain transformers checkpoint (no value head, like TRL's tiny test models on the
Hub) into OUT_DIR/<arch>/base, with what TRL computes on it: the logits of `model(input_ids)` for
ids 1..10 (decoder ids 1..10 for seq2seq) and the sequences of `generate` with
GenerationConfig(max_new_tokens=9), TRL's test_generate.

`check OUT_DIR/<arch> SAVED SHARDED`: loads two folders our save_pretrained wrote (one file, and
many shards) with TRL and with transformers and prints a JSON report: whether every tensor TRL
loads equals the tensor in our files, whether transformers loads the backbone with the same
tensors as the original model and the same keys (TRL's test_from_save_transformers[_sharded]).

usage: python trl_suite.py make OUT_DIR
       python trl_suite.py check ARCH_DIR SAVED_DIR SHARDED_DIR
"""

import glob
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BartConfig,
    BloomConfig,
    CohereConfig,
    DbrxConfig,
    Gemma2Config,
    GemmaConfig,
    GenerationConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    T5Config,
)
from trl import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead

# GPT2Config(vocab_size=1000) keeps bos/eos 50256, outside the vocabulary: TRL and transformers
# load it, generate with it (that eos never occurs) and save it.
ARCHS = {
    "gpt2": (GPT2Config, dict(vocab_size=1000, n_positions=64, n_embd=32, n_layer=2, n_head=4), False),
    "llama": (
        LlamaConfig,
        dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64),
        False,
    ),
    "qwen2": (
        Qwen2Config,
        dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True),
        False,
    ),
    "gpt_neox": (
        GPTNeoXConfig,
        dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, rotary_pct=0.5),
        False,
    ),
    # OPT-350m's layout at tiny size: the value head is word_embed_proj_dim (16) wide.
    "opt": (
        OPTConfig,
        dict(vocab_size=100, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, word_embed_proj_dim=16, do_layer_norm_before=False),
        False,
    ),
    "t5": (
        T5Config,
        dict(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0),
        True,
    ),
    # A window of 4 over 10 ids and 9 new tokens.
    "mistral": (
        MistralConfig,
        dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, sliding_window=4),
        False,
    ),
    # Layer 1 slides with a window of 4; head_dim 16 with hidden 32.
    "qwen3": (
        Qwen3Config,
        dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, use_sliding_window=True,
             sliding_window=4, max_window_layers=1),
        False,
    ),
    # Six heads (ALiBi's second slope rule), tied (Bloom's default).
    "bloom": (
        BloomConfig,
        dict(vocab_size=100, hidden_size=36, n_layer=2, n_head=6),
        False,
    ),
    # Tied (Cohere's default), q/k LayerNorms, GQA, linear rope scaling, logits scaled by 0.5.
    "cohere": (
        CohereConfig,
        dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, use_qk_norm=True, logit_scale=0.5,
             rope_scaling={"rope_type": "linear", "factor": 2.0}, bos_token_id=1, eos_token_id=2),
        False,
    ),
    # Mixture of experts: 4 experts, top-2 with 1-norm weights (DBRX's default normalisation), GQA,
    # clip_qkv; DBRX is never tied.
    "dbrx": (
        DbrxConfig,
        dict(vocab_size=100, d_model=32, n_heads=4, n_layers=2, max_seq_len=64, bos_token_id=1, eos_token_id=2,
             pad_token_id=0, attn_config=dict(kv_n_heads=2, clip_qkv=4.0),
             ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2)),
        False,
    ),
    # Gemma's defaults: tied, normalised embeddings, (1 + w) norms; head_dim 16 with hidden 32.
    "gemma": (
        GemmaConfig,
        dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64),
        False,
    ),
    # Layer 0 slides with a window of 4, final logits soft-capped at 3. TRL loads with
    # transformers' default attention (sdpa), whose Gemma2 path drops the attention soft-capping;
    # that cap is off here and covered against eager by the parity suite.
    "gemma2": (
        Gemma2Config,
        dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=4,
             query_pre_attn_scalar=16, attn_logit_softcapping=None, final_logit_softcapping=3.0),
        False,
    ),
    # BartConfig's token ids (pad 1, eos 2, decoder start 2, forced eos 2), embeddings scaled by
    # sqrt(d_model), more encoder than decoder layers.
    "bart": (
        BartConfig,
        dict(vocab_size=100, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
             scale_embedding=True),
        True,
    ),
    # LongRoPE switching from its short to its long factors during generate (10 ids, 9 new tokens,
    # original length 12): HF's Phi3 drops the cache once it holds 12 positions and reruns the
    # whole sequence (causally: TRL loads with sdpa, and nothing is padded). Half of each head
    # rotates; the pad token is set inside the vocabulary (Phi3's default, 32000, is not).
    "phi3": (
        Phi3Config,
        dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=12,
             partial_rotary_factor=0.5, pad_token_id=0,
             rope_scaling={"type": "longrope", "short_factor": [1.0, 1.25], "long_factor": [2.0, 6.0]}),
        False,
    ),
}


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            # DBRX's attention sits under `norm_attn_norm`: only its norms' own names count.
            norm = "norm" in name.replace("norm_attn_norm", "")
            p.copy_(1.0 + 0.1 * noise if norm or "ln_" in name else 0.2 * noise)


def make(out_dir):
    torch.set_num_threads(1)
    for seed, (arch, (config_class, kwargs, seq2seq)) in enumerate(ARCHS.items()):
        config = config_class(**kwargs)
        torch.manual_seed(seed)
        auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        base = auto.from_config(config)
        randomize(base, seed)
        base.eval()
        folder = os.path.join(out_dir, arch, "base")
        base.save_pretrained(folder)
        trl_class = AutoModelForSeq2SeqLMWithValueHead if seq2seq else AutoModelForCausalLMWithValueHead
        model = trl_class.from_pretrained(folder).eval()
        input_ids = torch.arange(1, 11).unsqueeze(0)
        with torch.no_grad():
            if seq2seq:
                outputs = model(input_ids, decoder_input_ids=input_ids)
                generated = model.generate(
                    input_ids, decoder_input_ids=input_ids, generation_config=GenerationConfig(max_new_tokens=9)
                )
            else:
                outputs = model(input_ids)
                generated = model.generate(input_ids, generation_config=GenerationConfig(max_new_tokens=9))
        assert len(outputs) == 3 and outputs[1] is None
        save_file(
            {"logits": outputs[0].contiguous(), "generated": generated.contiguous()},
            os.path.join(out_dir, arch, "expected.safetensors"),
        )
        with open(os.path.join(out_dir, arch, "facts.json"), "w") as f:
            json.dump(
                {"seq2seq": seq2seq, "eos_token_id": config.eos_token_id, "vocab_size": config.vocab_size}, f
            )
    print(f"wrote {len(ARCHS)} architectures to {out_dir}")


def our_tensors(folder):
    tensors = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        tensors.update(load_file(path))
    return tensors


def check(arch_dir, saved, sharded):
    torch.set_num_threads(1)
    seq2seq = json.load(open(os.path.join(arch_dir, "facts.json")))["seq2seq"]
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    trl_class = AutoModelForSeq2SeqLMWithValueHead if seq2seq else AutoModelForCausalLMWithValueHead
    original = auto.from_pretrained(os.path.join(arch_dir, "base")).state_dict()
    report = {"shards": len(glob.glob(os.path.join(sharded, "*.safetensors")))}
    for label, folder in [("single", saved), ("sharded", sharded)]:
        ours = our_tensors(folder)
        # transformers' own loader: the backbone's tensors equal the original model's, same keys.
        loaded = auto.from_pretrained(folder).state_dict()
        report[f"{label}_transformers_same_keys"] = set(loaded) == set(original)
        report[f"{label}_transformers_equal"] = all(torch.equal(loaded[k], original[k]) for k in original)
        # TRL's loader: every tensor it holds equals ours (the v_head included).
        try:
            trl = trl_class.from_pretrained(folder).state_dict()
            mismatched = []
            for key, value in trl.items():
                name = key[len("pretrained_model."):] if key.startswith("pretrained_model.") else key
                if name in ours and not torch.equal(ours[name].to(value.dtype), value):
                    mismatched.append(name)
            report[f"{label}_trl_loads"] = True
            report[f"{label}_trl_mismatched"] = mismatched
            report[f"{label}_trl_v_head_equal"] = torch.equal(trl["v_head.summary.weight"], ours["v_head.summary.weight"])
        except Exception as e:  # TRL 0.26.2 cannot load a local sharded checkpoint with a v_head
            report[f"{label}_trl_loads"] = False
            report[f"{label}_trl_error"] = f"{type(e).__name__}: {e}"[:300]
    print(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2])
    else:
        check(sys.argv[2], sys.argv[3], sys.argv[4])

"""Reference for the training parity suite (tests/parity_train.rs).

For seeded random GPT-2, Llama, Qwen2 and T5 models wrapped in TRL's value-head classes and saved
with TRL's save_pretrained, on padded batches, it records:

- gradient cases (dropout 0, train mode): the gradient of
  `LM loss + 0.5 * mean((values - targets)^2 over attended positions)` with respect to every
  parameter (HF names, `v_head.summary.*`; a tied embedding once, as named_parameters() lists
  it), in f32, and the same with the backbone in bf16 (TRL's from_pretrained(torch_dtype=bf16));
  plus HF Trainer's weight-decay parameter names;
- dropout cases (dropout > 0 everywhere, train mode): logits, values, loss and gradients of one
  forward after torch.manual_seed(SEED), to compare with ours under the same seed;
- optimiser cases (GPT-2, Llama): three optimiser steps of torch.optim.AdamW with HF's decay /
  no-decay groups, get_linear_schedule_with_warmup, clip_grad_norm_ and two accumulated
  micro-batches per step: the learning rate and the returned total norm of each step, and the
  final parameters.

usage: python parity_train.py OUT_DIR
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    Qwen2Config,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    get_linear_schedule_with_warmup,
)
from trl import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parity_gpt2  # noqa: E402
import parity_llama  # noqa: E402
import parity_t5  # noqa: E402

VALUE_COEF = 0.5
DROPOUT_SEED = 1234
# The optimiser run: AdamW as torch's defaults except the learning rate, HF's linear schedule.
OPT = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
WARMUP, TOTAL, STEPS, MICRO, MAX_NORM = 2, 6, 3, 2, 1.0

GPT2_NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_dropout_prob=0.0)
LLAMA_BASE = dict(parity_llama.BASE, tie_word_embeddings=False, summary_dropout_prob=0.0)
T5_BASE = dict(parity_t5.BASE, dropout_rate=0.0, summary_dropout_prob=0.0)
LLAMA3 = parity_llama.LLAMA3

# (name, arch, config overrides, kind): kind "grad" (dropout 0), "dropout" (train-mode RNG parity)
CASES = [
    ("gpt2_tied", "gpt2", {}, "grad"),
    ("gpt2_untied", "gpt2", {"tie_word_embeddings": False}, "grad"),
    ("gpt2_upcast_inverse_scaling", "gpt2", {"reorder_and_upcast_attn": True, "scale_attn_by_inverse_layer_idx": True}, "grad"),
    ("gpt2_deeper_8_heads_relu", "gpt2", {"n_layer": 4, "n_embd": 64, "n_head": 8, "activation_function": "relu"}, "grad"),
    ("llama_gqa_untied", "llama", {}, "grad"),
    ("llama_mha_tied", "llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}, "grad"),
    ("llama_biases_head_dim_12", "llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 12}, "grad"),
    ("llama_rope_llama3_gelu", "llama", {"rope_scaling": LLAMA3, "hidden_act": "gelu_pytorch_tanh"}, "grad"),
    ("qwen2_gqa", "qwen2", {"rms_norm_eps": 1e-6}, "grad"),
    ("qwen2_tied_mqa", "qwen2", {"num_key_value_heads": 1, "tie_word_embeddings": True}, "grad"),
    ("t5_relu_tied_v1_0", "t5", {"feed_forward_proj": "relu"}, "grad"),
    ("t5_gated_gelu_untied_v1_1", "t5", {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}, "grad"),
    ("t5_decoder_3_layers_d_kv_6", "t5", {"num_decoder_layers": 3, "d_kv": 6}, "grad"),
    ("gpt2_dropout", "gpt2", {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "summary_dropout_prob": 0.2}, "dropout"),
    ("llama_dropout", "llama", {"attention_dropout": 0.1, "summary_dropout_prob": 0.2}, "dropout"),
    ("qwen2_dropout", "qwen2", {"attention_dropout": 0.1, "summary_dropout_prob": 0.2}, "dropout"),
    ("t5_dropout", "t5", {"feed_forward_proj": "gated-gelu", "dropout_rate": 0.1, "summary_dropout_prob": 0.2}, "dropout"),
]

# Optimiser runs on these gradient cases' checkpoints.
OPTIMISER_CASES = ["gpt2_tied", "llama_gqa_untied"]


def build(arch, overrides, seed):
    """A seeded random backbone (weights spread out as in the forward parity suites)."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = dict(parity_gpt2.BASE, **GPT2_NO_DROPOUT)
        cfg.update(overrides)
        config = GPT2Config(**cfg)
        config._attn_implementation = "eager"
        base = GPT2LMHeadModel(config)
        parity_gpt2.randomize(base, seed)
    elif arch in ("llama", "qwen2"):
        cfg = dict(LLAMA_BASE)
        cfg.update(overrides)
        config = (LlamaConfig if arch == "llama" else Qwen2Config)(**cfg)
        config._attn_implementation = "eager"
        base = AutoModelForCausalLM.from_config(config)
        parity_llama.randomize(base, seed)
    else:
        cfg = dict(T5_BASE)
        cfg.update(overrides)
        config = T5Config(**cfg)
        base = T5ForConditionalGeneration(config)
        parity_t5.randomize(base, seed)
    return base, cfg


def wrapper(arch):
    return AutoModelForSeq2SeqLMWithValueHead if arch == "t5" else AutoModelForCausalLMWithValueHead


def make_batch(arch, vocab, seed):
    """A padded batch, the mask of the positions the value loss averages over, and value targets."""
    g = torch.Generator().manual_seed(5000 + seed)
    if arch == "t5":
        input_ids, attention_mask, labels = parity_t5.make_inputs(vocab, seed)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        value_mask = (labels != -100).long()
    else:
        input_ids, attention_mask, labels, _ = parity_gpt2.make_inputs(vocab, seed)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        value_mask = attention_mask.clone()
    batch["value_mask"] = value_mask
    batch["value_targets"] = torch.randn(value_mask.shape, generator=g)
    return batch


def loss_of(model, batch):
    """TRL's forward, then LM loss + VALUE_COEF * masked mean squared value error."""
    logits, lm_loss, values = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    )
    mask = batch["value_mask"].to(values.dtype)
    value_loss = ((values - batch["value_targets"]) ** 2 * mask).sum() / mask.sum()
    return lm_loss + VALUE_COEF * value_loss, logits, values, lm_loss


def named_grads(model):
    out = {}
    for name, p in model.named_parameters():
        name = name.removeprefix("pretrained_model.")
        assert p.grad is not None, f"{name} has no gradient"
        out[name] = p.grad.detach().float().contiguous()
    return out


def decay_names(model):
    """HF Trainer's decayed parameters, as named_parameters() lists them (a tied LM head, which
    get_decay_parameter_names also names, is the embedding's tensor)."""
    decay = set(Trainer.get_decay_parameter_names(None, model))
    return sorted(n.removeprefix("pretrained_model.") for n, _ in model.named_parameters() if n in decay)


def gradients(folder, arch, batch, dtype):
    kwargs = {"torch_dtype": dtype}
    if arch != "t5":
        kwargs["attn_implementation"] = "eager"
    model = wrapper(arch).from_pretrained(folder, **kwargs)
    model.train()
    loss, _, _, _ = loss_of(model, batch)
    loss.backward()
    return named_grads(model), float(loss.detach())


def optimiser_run(folder, arch, vocab, seed):
    model = wrapper(arch).from_pretrained(folder, attn_implementation="eager")
    model.train()
    decay = set(Trainer.get_decay_parameter_names(None, model))
    params = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in params if n in decay], "weight_decay": OPT["weight_decay"]},
        {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=OPT["lr"], betas=OPT["betas"], eps=OPT["eps"])
    scheduler = get_linear_schedule_with_warmup(optimizer, WARMUP, TOTAL)
    lrs, norms, batches = [], [], {}
    for step in range(STEPS):
        for micro in range(MICRO):
            batch = make_batch(arch, vocab, 100 * seed + 10 * step + micro)
            for k, v in batch.items():
                batches[f"step{step}_micro{micro}_{k}"] = v
            loss, _, _, _ = loss_of(model, batch)
            # Gradient accumulation as HF's Trainer / accelerate: the loss over the micro-batches.
            (loss / MICRO).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    final = {n.removeprefix("pretrained_model."): p.detach().contiguous() for n, p in model.named_parameters()}
    return batches, final, lrs, norms


def main(out_dir):
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    manifest = []
    for seed, (name, arch, overrides, kind) in enumerate(CASES):
        base, cfg = build(arch, overrides, 300 + seed)
        model = wrapper(arch).from_pretrained(base)
        folder = os.path.join(out_dir, name)
        model.save_pretrained(folder)
        batch = make_batch(arch, cfg["vocab_size"], seed)
        save_file(batch, os.path.join(folder, "batch.safetensors"))
        entry = {"name": name, "arch": arch, "kind": kind, "value_coef": VALUE_COEF}
        if kind == "grad":
            grads, loss = gradients(folder, arch, batch, torch.float32)
            save_file(grads, os.path.join(folder, "grads_f32.safetensors"))
            grads_bf16, loss_bf16 = gradients(folder, arch, batch, torch.bfloat16)
            save_file(grads_bf16, os.path.join(folder, "grads_bf16.safetensors"))
            entry.update(loss=loss, loss_bf16=loss_bf16, decay_names=decay_names(model))
        else:
            kwargs = {} if arch == "t5" else {"attn_implementation": "eager"}
            trained = wrapper(arch).from_pretrained(folder, **kwargs)
            trained.train()
            torch.manual_seed(DROPOUT_SEED)
            loss, logits, values, lm_loss = loss_of(trained, batch)
            loss.backward()
            save_file(named_grads(trained), os.path.join(folder, "grads_f32.safetensors"))
            save_file(
                {"logits": logits.detach().contiguous(), "values": values.detach().contiguous(),
                 "loss": loss.detach().reshape(()), "lm_loss": lm_loss.detach().reshape(())},
                os.path.join(folder, "train_outputs.safetensors"),
            )
            # Eval mode on the same batch: dropout off.
            trained.eval()
            with torch.no_grad():
                _, logits_eval, values_eval, _ = loss_of(trained, batch)
            save_file(
                {"logits": logits_eval.contiguous(), "values": values_eval.contiguous()},
                os.path.join(folder, "eval_outputs.safetensors"),
            )
            entry.update(seed=DROPOUT_SEED)
        if name in OPTIMISER_CASES:
            batches, final, lrs, norms = optimiser_run(folder, arch, cfg["vocab_size"], seed)
            save_file(batches, os.path.join(folder, "optimiser_batches.safetensors"))
            save_file(final, os.path.join(folder, "optimiser_final.safetensors"))
            # PyTorch against itself: the same run with two intra-op threads, which sums some
            # products in another order. Where a gradient is mathematically zero and only
            # rounding noise remains (GPT-2's key bias: softmax ignores a score shift shared by
            # all keys), AdamW normalises that noise into full-size steps, and the runs part.
            torch.set_num_threads(2)
            _, final_2, _, _ = optimiser_run(folder, arch, cfg["vocab_size"], seed)
            torch.set_num_threads(1)
            save_file(final_2, os.path.join(folder, "optimiser_final_2threads.safetensors"))
            entry["optimiser"] = dict(
                OPT, betas=list(OPT["betas"]), warmup=WARMUP, total=TOTAL, steps=STEPS, micro=MICRO,
                max_norm=MAX_NORM, lrs=lrs, norms=norms,
            )
        manifest.append(entry)
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest)} training reference cases to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1])

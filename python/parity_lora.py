"""Reference outputs for LoRA adapters: Python peft 0.18.0 under TRL 0.26.2's value-head wrapper.

Builds seeded base models (GPT-2 with Conv1D targets and fan_in_fan_out, Llama with
"all-linear" and rsLoRA, Qwen2 with a regex target, modules_to_save and lora_only biases, and
the Llama adapter on a bf16 base), random non-zero adapters (init_lora_weights=False), saves the
base with transformers and the adapter with TRL's save_pretrained (peft's adapter files plus
TRL's pytorch_model.bin holding the value head), and records logits, values and loss on a
padded batch, and the gradients of the loss with respect to the trainable tensors.

`check ADAPTER_DIR INPUTS OUT`: loads an adapter folder with TRL's
AutoModelForCausalLMWithValueHead.from_pretrained (base from base_model_name_or_path, adapter
through peft) and writes logits and values; `plain FOLDER INPUTS OUT` does the same for a plain
value-head folder (our merged save).

usage: python parity_lora.py OUT_DIR
       python parity_lora.py check ADAPTER_DIR INPUTS.safetensors OUT.safetensors
       python parity_lora.py check_seq2seq|plain_seq2seq FOLDER INPUTS.safetensors OUT.safetensors
       python parity_lora.py plain FOLDER INPUTS.safetensors OUT.safetensors
"""

import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GPT2Config, LlamaConfig, Qwen2Config, T5Config
from trl import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead

GPT2 = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, pad_token_id=0)
LLAMA = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
QWEN2 = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)

# name, base config, dtype, LoraConfig kwargs
CASES = [
    ("gpt2_conv1d_bias_all", GPT2, torch.float32,
     dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, lora_dropout=0.1,
          bias="all")),
    ("llama_all_linear_rslora", LLAMA, torch.float32,
     dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
    ("qwen2_regex_modules_to_save", QWEN2, torch.float32,
     dict(r=2, lora_alpha=4, target_modules=r".*\.(q_proj|v_proj)", modules_to_save=["lm_head"], bias="lora_only")),
    ("llama_bf16_base", LLAMA, torch.bfloat16,
     dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
]

SEQ = 10

# Encoder-decoder cases: T5 v1.0 (ReLU) and v1.1 (gated GELU), name, base config, LoraConfig kwargs.
T5 = T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.1)
T5_GATED = T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=1, num_heads=4,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                    pad_token_id=0, eos_token_id=1)
SEQ2SEQ_CASES = [
    ("t5_all_linear", T5, dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1)),
    ("t5_gated_qv_rslora", T5_GATED, dict(r=2, lora_alpha=8, target_modules=["q", "v", "wi_0"], use_rslora=True)),
]


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (3, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, SEQ - 4:] = 0
    ids[mask == 0] = 0
    return ids, mask


def make(out_dir):
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    manifest = []
    for seed, (name, config, dtype, lora) in enumerate(CASES):
        case = os.path.join(out_dir, name)
        base_dir = os.path.join(case, "base")
        adapter_dir = os.path.join(case, "adapter")
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for p in base.parameters():
                p.normal_(0, 0.2)
        base.save_pretrained(base_dir)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, attn_implementation="eager")
        peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora))
        torch.manual_seed(100 + seed)
        model = AutoModelForCausalLMWithValueHead.from_pretrained(peft_model)
        with torch.no_grad():
            model.v_head.summary.weight.normal_(0, 0.3)
            model.v_head.summary.bias.fill_(0.05)
        os.makedirs(adapter_dir, exist_ok=True)  # TRL writes the value head before peft creates the folder
        model.save_pretrained(adapter_dir)
        # peft writes base_model_name_or_path as the base's name_or_path: the folder.
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            assert json.load(f)["base_model_name_or_path"] == base_dir
        model.eval()
        ids, mask = inputs(seed)
        logits, loss, values = model(input_ids=ids, attention_mask=mask, labels=ids)
        loss.backward()
        grads, trainable = {}, []
        for n, p in model.named_parameters():
            ours = n.replace("pretrained_model.base_model.model.", "").replace(".default", "")
            ours = ours.replace(".base_layer", "").replace(".modules_to_save", "")
            if p.requires_grad:
                trainable.append(ours)
                # The value head gets no gradient from the LM loss: zeros on both sides.
                grads[ours] = (p.grad if p.grad is not None else torch.zeros_like(p)).float().contiguous()
        save_file({"input_ids": ids, "attention_mask": mask}, os.path.join(case, "inputs.safetensors"))
        save_file({"logits": logits.float().contiguous(), "values": values.float().contiguous(),
                   "loss": loss.detach().float()}, os.path.join(case, "expected.safetensors"))
        save_file(grads, os.path.join(case, "grads.safetensors"))
        trainable = sorted(trainable)
        manifest.append({"name": name, "dtype": str(dtype).replace("torch.", ""), "trainable": trainable})
    make_reward_adapter(os.path.join(out_dir, "reward_adapter"))
    for seed, (name, config, lora) in enumerate(SEQ2SEQ_CASES, start=50):
        manifest.append(make_seq2seq(os.path.join(out_dir, name), name, seed, config, lora))
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest)} LoRA cases to {out_dir}")


def make_reward_adapter(case):
    """TRL's reward adapter: a peft LoRA adapter trained for sequence classification (its
    `score` head saved beside it) loaded onto the policy's backbone next to the policy adapter;
    `compute_reward_score` switches to it."""
    base_dir, policy_dir, rm_dir = (os.path.join(case, d) for d in ("base", "policy", "rm"))
    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_config(LLAMA)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.2)
    base.save_pretrained(base_dir)
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    rm = get_peft_model(rm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                       task_type="SEQ_CLS", init_lora_weights=False))
    with torch.no_grad():
        for n, p in rm.named_parameters():
            if "score" in n:
                p.normal_(0, 0.5)
    rm.save_pretrained(rm_dir)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager"),
                            LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"],
                                       task_type="CAUSAL_LM", init_lora_weights=False))
    model = AutoModelForCausalLMWithValueHead.from_pretrained(policy)
    os.makedirs(policy_dir, exist_ok=True)
    model.save_pretrained(policy_dir)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir, reward_adapter=rm_dir,
                                                              attn_implementation="eager").eval()
    ids, mask = inputs(11)
    with torch.no_grad():
        before, _, values = model(input_ids=ids, attention_mask=mask)
        scores = model.compute_reward_score(input_ids=ids, attention_mask=mask)
        after, _, _ = model(input_ids=ids, attention_mask=mask)
    assert torch.equal(before, after)
    save_file({"input_ids": ids, "attention_mask": mask}, os.path.join(case, "inputs.safetensors"))
    save_file({"scores": scores.float().contiguous(), "logits": before.float().contiguous(),
               "values": values.float().contiguous()}, os.path.join(case, "expected.safetensors"))


def make_seq2seq(case, name, seed, config, lora):
    """As the causal cases, for TRL's AutoModelForSeq2SeqLMWithValueHead over a peft T5: padded
    encoder inputs, labels (decoder inputs shifted from them), logits, values, loss, gradients."""
    base_dir, adapter_dir = os.path.join(case, "base"), os.path.join(case, "adapter")
    torch.manual_seed(seed)
    base = AutoModelForSeq2SeqLM.from_config(config)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.2)
    base.save_pretrained(base_dir)
    base = AutoModelForSeq2SeqLM.from_pretrained(base_dir)
    peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, task_type="SEQ_2_SEQ_LM", **lora))
    torch.manual_seed(100 + seed)
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(peft_model)
    with torch.no_grad():
        model.v_head.summary.weight.normal_(0, 0.3)
        model.v_head.summary.bias.fill_(0.05)
    os.makedirs(adapter_dir, exist_ok=True)
    model.save_pretrained(adapter_dir)
    model.eval()
    ids, mask = inputs(seed)
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(2, 97, (3, 7), generator=g)
    labels[1, 5:] = -100
    logits, loss, values = model(input_ids=ids, attention_mask=mask, labels=labels)
    loss.backward()
    grads, trainable = {}, []
    for n, p in model.named_parameters():
        ours = n.replace("pretrained_model.base_model.model.", "").replace(".default", "")
        ours = ours.replace(".base_layer", "").replace(".modules_to_save", "")
        if p.requires_grad:
            trainable.append(ours)
            grads[ours] = (p.grad if p.grad is not None else torch.zeros_like(p)).float().contiguous()
    save_file({"input_ids": ids, "attention_mask": mask, "labels": labels}, os.path.join(case, "inputs.safetensors"))
    save_file({"logits": logits.float().contiguous(), "values": values.float().contiguous(),
               "loss": loss.detach().float()}, os.path.join(case, "expected.safetensors"))
    save_file(grads, os.path.join(case, "grads.safetensors"))
    return {"name": name, "dtype": "float32", "trainable": sorted(trainable), "seq2seq": True}


def run(model, inputs_path, out_path):
    model.eval()
    inputs = load_file(inputs_path)
    with torch.no_grad():
        logits, _, values = model(**inputs)
    save_file({"logits": logits.float().contiguous(), "values": values.float().contiguous()}, out_path)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] in ("check_seq2seq", "plain_seq2seq"):
        run(AutoModelForSeq2SeqLMWithValueHead.from_pretrained(sys.argv[2]), *sys.argv[3:5])
    elif sys.argv[1] == "check":
        run(AutoModelForCausalLMWithValueHead.from_pretrained(sys.argv[2], attn_implementation="eager"), *sys.argv[3:5])
    elif sys.argv[1] == "plain":
        run(AutoModelForCausalLMWithValueHead.from_pretrained(sys.argv[2], attn_implementation="eager"), *sys.argv[3:5])
    else:
        make(sys.argv[1])

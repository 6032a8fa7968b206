"""The Python side of `cargo xtask bench`: TRL 0.26.2 / transformers on the same torch.

A long-lived worker driven by the bench over stdin/stdout, one JSON object per line each way
(the Rust worker, crates/valuehead/examples/bench_worker.rs, speaks the same protocol):

  {"cmd": "init", "threads": N}                          -> {"ok": true, "versions": {...}}
  {"cmd": "make", "name": NAME, "dir": DIR}              -> builds a seeded random model, saves it
  {"cmd": "load", "dir": DIR, "dtype": "f32"|"bf16"}     -> {"ok": true, "attn_implementation": ...}
  {"cmd": "prepare", "task": TASK}                       -> inputs built, one warm-up run, peak RSS reset
  {"cmd": "run", "iters": K}                             -> {"ok": true, "ms": per-iteration, "check": ...}
  {"cmd": "rss"}                                         -> {"ok": true, "peak_rss_mb": ...}

TASK: {"type": "forward"|"generate"|"rollout"|"train"|"ppo", "input_ids": [[...]], "decoder_input_ids": [[...]]
(seq2seq forward), "max_new_tokens": N}. Everything but "train" runs under torch.inference_mode(),
with the model in eval mode and its default attention implementation (what a TRL user gets).
"train" (causal models) is one training step in train mode ("lora": the same with a fresh peft
LoRA adapter, r=16 on every linear layer, only the adapter and value head trained): TRL's forward with labels = input_ids,
loss = LM loss + 0.5 * mean squared value error (targets 0), backward, and torch.optim.AdamW
(lr 1e-5, weight decay 0.01 except HF Trainer's no-decay parameters), gradients zeroed.
"ppo" (causal models, f32; the task adds "reward_dir") is one iteration of TRL 0.26.2's PPO loop
(trl.experimental.ppo.PPOTrainer.train) on the value-head wrapper, with TRL's own utilities where
it has them (batch_generation, forward, get_reward, selective_log_softmax, first_true_indices,
masked_mean, masked_whiten, create_reference_model) and its inline formulas written out: sampled
rollout (temperature 0.7, no stop token), the reference's log-probs, the values from a forward of
the policy's value head (TRL gets them from a second model's forward; here the wrapper's), the
reward model's score, KL rewards (k1, kl_coef 0.05), GAE (gamma 1, lam 0.95), whitened
advantages, then one PPO epoch over two shuffled mini-batches of 4 (clipped policy and value
losses, vf_coef 0.1, fused AdamW lr 5e-5, as PPOConfig's defaults: its `optim` is
"adamw_torch_fused" on torch >= 2.8). The reward model (a
*ForSequenceClassification of the same backbone with a seeded score head) is written to
reward_dir on first use; the Rust worker loads the same folder.

usage: python bench_worker.py   (then speak the protocol)
"""

import json
import os
import sys
import time

import torch
import transformers
import trl
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
)
from trl import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead

# The bench's models: seeded random weights (HF's own initialisation).
MODELS = {
    "gpt2-toy": ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=512, bos_token_id=999, eos_token_id=999)),
    "gpt2-small": ("gpt2", dict()),
    "t5-toy": ("t5", dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4, decoder_start_token_id=0)),
    "t5-small": ("t5", dict(decoder_start_token_id=0)),
    "bart-toy": ("bart", dict(vocab_size=1000, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                              decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
                              max_position_embeddings=512)),
}
# One toy per further architecture of the registry (forward and generate rows: the bench takes
# every model_type the library does). Small shapes, HF's defaults otherwise.
_LLAMA_LIKE = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
MODELS.update({
    "llama-toy": ("llama", dict(_LLAMA_LIKE)),
    "qwen2-toy": ("qwen2", dict(_LLAMA_LIKE)),
    "mistral-toy": ("mistral", dict(_LLAMA_LIKE, sliding_window=None)),
    "qwen3-toy": ("qwen3", dict(_LLAMA_LIKE, head_dim=16)),
    "gemma-toy": ("gemma", dict(_LLAMA_LIKE, head_dim=16)),
    "gemma2-toy": ("gemma2", dict(_LLAMA_LIKE, head_dim=16, sliding_window=16)),
    "phi3-toy": ("phi3", dict(_LLAMA_LIKE)),
    "gpt_neox-toy": ("gpt_neox", dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)),
    "opt-toy": ("opt", dict(vocab_size=1000, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=64, max_position_embeddings=512, bos_token_id=2, eos_token_id=2, pad_token_id=1)),
    "cohere-toy": ("cohere", dict(_LLAMA_LIKE, use_qk_norm=True)),
    "bloom-toy": ("bloom", dict(vocab_size=1000, hidden_size=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
                                pad_token_id=3)),
    "dbrx-toy": ("dbrx", dict(vocab_size=1000, d_model=64, n_heads=4, n_layers=2, max_seq_len=512,
                              attn_config=dict(kv_n_heads=2, clip_qkv=8.0),
                              ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2),
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)),
})


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def reset_peak_rss():
    # Writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def make(name, out_dir):
    arch, overrides = MODELS[name]
    torch.manual_seed(0)
    if arch == "gpt2":
        base = GPT2LMHeadModel(GPT2Config(**overrides))
        model = AutoModelForCausalLMWithValueHead.from_pretrained(base)
    elif arch == "t5":
        base = T5ForConditionalGeneration(T5Config(**overrides))
        model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(base)
    else:
        config = AutoConfig.for_model(arch, **overrides)
        if config.is_encoder_decoder:
            base = AutoModelForSeq2SeqLM.from_config(config)
            model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(base)
        else:
            base = AutoModelForCausalLM.from_config(config)
            model = AutoModelForCausalLMWithValueHead.from_pretrained(base)
    tmp = out_dir + ".partial"
    model.save_pretrained(tmp)
    os.replace(tmp, out_dir)


class Worker:
    def __init__(self):
        self.model = None
        self.task = None

    def load(self, model_dir, dtype):
        self.model = None
        self.reward_model = None
        self.model_dir, self.dtype = model_dir, dtype
        config = json.load(open(os.path.join(model_dir, "config.json")))
        self.seq2seq = bool(config.get("is_encoder_decoder"))
        cls = AutoModelForSeq2SeqLMWithValueHead if self.seq2seq else AutoModelForCausalLMWithValueHead
        model = cls.from_pretrained(model_dir)
        if dtype == "bf16":
            model = model.to(torch.bfloat16)
        self.model = model.eval()
        self.config = self.model.pretrained_model.config
        eos = self.config.eos_token_id
        self.pad = self.config.pad_token_id if self.config.pad_token_id is not None else eos
        return {"attn_implementation": self.config._attn_implementation}

    def prepare(self, task):
        self.task = task
        self.input_ids = torch.tensor(task["input_ids"], dtype=torch.long)
        self.attention_mask = torch.ones_like(self.input_ids)
        if "decoder_input_ids" in task:
            self.decoder_input_ids = torch.tensor(task["decoder_input_ids"], dtype=torch.long)
        self.optimizer = None
        self.reward_model = None
        if task["type"] == "reward":
            # AutoModelForSequenceClassification of the same folder, one label, its score the
            # value head's weight (the Rust worker builds the same).
            rm = AutoModelForSequenceClassification.from_pretrained(self.model_dir, num_labels=1,
                                                                    pad_token_id=self.pad)
            with torch.no_grad():
                rm.score.weight.copy_(score_weight(self.model_dir, self.model.v_head.summary.weight.float()))
            if self.dtype == "bf16":
                rm = rm.to(torch.bfloat16)
            self.reward_model = rm.eval()
        self.lora_model = None
        self.trained = self.model
        if task["type"] == "lora":
            # TRL with a peft config: a fresh LoRA adapter (r=16, every linear layer) on the base
            # (loaded again, in the task's dtype; peft keeps the adapter in f32).
            from peft import LoraConfig

            dtype = torch.bfloat16 if self.dtype == "bf16" else torch.float32
            config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
            self.lora_model = AutoModelForCausalLMWithValueHead.from_pretrained(
                self.model_dir, peft_config=config, dtype=dtype
            )
            self.trained = self.lora_model
        if task["type"] == "ppo":
            self.prepare_ppo(task)
        elif task["type"] in ("train", "lora"):
            if self.seq2seq:
                raise ValueError("the train task is for causal models")
            self.trained.train()
            decay = set(Trainer.get_decay_parameter_names(None, self.trained))
            params = [(n, p) for n, p in self.trained.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in params if n in decay], "weight_decay": 0.01},
                {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
            ]
            self.optimizer = torch.optim.AdamW(groups, lr=1e-5)
            self.value_targets = torch.zeros(self.input_ids.shape)
        else:
            self.model.eval()
        self.first = None
        reset_peak_rss()
        self.first = self.run_once()

    def prepare_ppo(self, task):
        from transformers import AutoModelForSequenceClassification, GenerationConfig
        from trl import create_reference_model
        from trl.trainer.utils import disable_dropout_in_model

        if self.seq2seq:
            raise ValueError("the ppo task is for causal models")
        reward_dir = task["reward_dir"]
        if not os.path.exists(os.path.join(reward_dir, "config.json")):
            torch.manual_seed(1)
            rm = AutoModelForSequenceClassification.from_pretrained(task["model_dir"], num_labels=1)
            rm.config.pad_token_id = self.pad
            tmp = reward_dir + ".partial"
            rm.save_pretrained(tmp)
            os.replace(tmp, reward_dir)
        self.reward_model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
        # As TRL's trainer: dropout off everywhere, a frozen reference copy, no eos during rollouts.
        for m in [self.model, self.reward_model]:
            disable_dropout_in_model(m)
        self.ref_model = create_reference_model(self.model)
        self.model.pretrained_model.generation_config.eos_token_id = None
        self.model.train()
        decay = set(Trainer.get_decay_parameter_names(None, self.model))
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in params if n in decay], "weight_decay": 0.0},
            {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
        ]
        # fused=True: PPOConfig's `optim` is "adamw_torch_fused" on torch >= 2.8 (HF's default).
        self.optimizer = torch.optim.AdamW(groups, lr=5e-5, eps=1e-8, fused=True)
        self.ppo_generation = GenerationConfig(
            max_new_tokens=task["max_new_tokens"], temperature=0.7 + 1e-7, top_k=0.0, top_p=1.0, do_sample=True
        )
        torch.manual_seed(0)

    def ppo_step(self):
        from trl.experimental.ppo.ppo_trainer import masked_mean, masked_whiten
        from trl.trainer.utils import batch_generation, first_true_indices, forward, get_reward, selective_log_softmax

        temperature, kl_coef, gamma, lam, cliprange, cliprange_value, vf_coef = 0.7, 0.05, 1.0, 0.95, 0.2, 0.2, 0.1
        invalid_logprob = 1.0
        model, pad, queries = self.model, self.pad, self.input_ids
        context_length = queries.shape[1]
        # Wall-clock phases, reported beside ours (the Rust worker's PpoTrainer::last_timings).
        phases, lap = {}, [time.perf_counter()]

        def mark(name):
            now = time.perf_counter()
            phases[name] = phases.get(name, 0.0) + (now - lap[0]) * 1e3
            lap[0] = now

        with torch.no_grad():
            query_responses, logitss = batch_generation(model.pretrained_model, queries, 64, pad, self.ppo_generation)
            responses = query_responses[:, context_length:]
            logprobs = selective_log_softmax(logitss, responses)
            del logitss
            mark("rollout")
            ref_logits = forward(self.ref_model.pretrained_model, query_responses, pad).logits[:, context_length - 1 : -1]
            ref_logits /= temperature + 1e-7
            ref_logprobs = selective_log_softmax(ref_logits, responses)
            del ref_logits
            mark("reference")
            # No stop token: the responses are not truncated.
            sequence_lengths = first_true_indices(responses == pad) - 1
            attention_mask = query_responses != pad
            position_ids = attention_mask.cumsum(1) - attention_mask.long()
            input_ids = torch.masked_fill(query_responses, ~attention_mask, 0)
            _, _, full_value = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            values = full_value[:, context_length - 1 : -1]
            mark("values")
            _, scores, _ = get_reward(self.reward_model, query_responses, pad, context_length)

            idxs = torch.arange(responses.shape[1]).repeat(responses.shape[0], 1)
            padding_mask = idxs > sequence_lengths.unsqueeze(1)
            logprobs = torch.masked_fill(logprobs, padding_mask, invalid_logprob)
            ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, invalid_logprob)
            lengths_p1 = sequence_lengths + 1
            padding_mask_p1 = idxs > lengths_p1.unsqueeze(1)
            values = torch.masked_fill(values, padding_mask_p1, 0)
            kl = -(ref_logprobs - logprobs)
            non_score_reward = -kl_coef * kl
            rewards = non_score_reward.clone()
            end = torch.where(lengths_p1 < rewards.size(1), lengths_p1, sequence_lengths)
            rewards[torch.arange(rewards.size(0)), end] += scores
            advantages_reversed, lastgaelam = [], 0
            n = responses.shape[1]
            for t in reversed(range(n)):
                nextvalues = values[:, t + 1] if t < n - 1 else 0.0
                delta = rewards[:, t] + gamma * nextvalues - values[:, t]
                lastgaelam = delta + gamma * lam * lastgaelam
                advantages_reversed.append(lastgaelam)
            advantages = torch.stack(advantages_reversed[::-1], axis=1)
            returns = advantages + values
            advantages = torch.masked_fill(masked_whiten(advantages, ~padding_mask), padding_mask, 0)
            mark("reward")

        # One PPO epoch: two shuffled mini-batches of 4, one AdamW step each.
        order = torch.randperm(queries.shape[0])
        for start in range(0, queries.shape[0], 4):
            mb = order[start : start + 4]
            qr = query_responses[mb]
            mask = qr != pad
            pos = mask.cumsum(1) - mask.long()
            logits, _, vpred_temp = model(input_ids=torch.masked_fill(qr, ~mask, 0), attention_mask=mask, position_ids=pos)
            logits = logits[:, context_length - 1 : -1] / (temperature + 1e-7)
            new_logprobs = torch.masked_fill(selective_log_softmax(logits, responses[mb]), padding_mask[mb], invalid_logprob)
            vpred = torch.masked_fill(vpred_temp[:, context_length - 1 : -1], padding_mask_p1[mb], 0)
            vpredclipped = torch.clamp(vpred, values[mb] - cliprange_value, values[mb] + cliprange_value)
            vf_losses1 = torch.square(vpred - returns[mb])
            vf_losses2 = torch.square(vpredclipped - returns[mb])
            vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_mask_p1[mb])
            ratio = torch.exp(new_logprobs - logprobs[mb])
            pg_losses = -advantages[mb] * ratio
            pg_losses2 = -advantages[mb] * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
            pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), ~padding_mask[mb])
            loss = pg_loss + vf_coef * vf_loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            with torch.no_grad():
                # TRL's logged statistics, computed as in its loop.
                prob_dist = torch.nn.functional.softmax(logits, dim=-1)
                entropy = torch.logsumexp(logits, dim=-1) - torch.sum(prob_dist * logits, dim=-1)
                _ = (entropy.mean(), masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask[mb]))
        mark("update")
        return {
            "objective/scores": float(scores.mean()),
            "objective/kl": float(kl.sum(1).mean()),
            "loss/policy_avg": float(pg_loss.detach()),
            "loss/value_avg": float(vf_loss.detach()),
            "phases_ms": phases,
        }

    def generate(self):
        n = self.task["max_new_tokens"]
        return self.model.generate(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=self.pad,
        )

    def train_step(self):
        logits, lm_loss, values = self.trained(
            input_ids=self.input_ids, attention_mask=self.attention_mask, labels=self.input_ids
        )
        mask = self.attention_mask.to(values.dtype)
        value_loss = ((values - self.value_targets) ** 2 * mask).sum() / mask.sum()
        loss = lm_loss + 0.5 * value_loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        check = {"loss": float(loss.detach()), "lm_loss": float(lm_loss.detach())}
        # The warm-up step's losses (same weights on both sides) stay in every check.
        first = getattr(self, "first", None) or {}
        check["first_lm_loss"] = first.get("lm_loss", check["lm_loss"])
        return check

    def run_once(self):
        kind = self.task["type"]
        if kind == "ppo":
            return self.ppo_step()
        if kind in ("train", "lora"):
            return self.train_step()
        with torch.inference_mode():
            if kind == "reward":
                logits = self.reward_model(input_ids=self.input_ids, attention_mask=self.attention_mask).logits
                return {"rewards_sum": float(logits.float().sum())}
            if kind == "forward":
                if self.seq2seq:
                    logits, _, values = self.model(
                        input_ids=self.input_ids,
                        attention_mask=self.attention_mask,
                        decoder_input_ids=self.decoder_input_ids,
                    )
                else:
                    logits, _, values = self.model(input_ids=self.input_ids, attention_mask=self.attention_mask)
                # The last position's logits of the first row, to compare precisions and sides.
                return {"values_sum": float(values.float().sum()), "last_logits": logits[0, -1].float().tolist()}
            sequences = self.generate()
            n = self.task["max_new_tokens"]
            new_tokens = sequences[:, -n:]
            if kind == "generate":
                return {"tokens": new_tokens.tolist()}
            # TRL's rollout: generate, then one forward over prompt + response for values and
            # log-probs (as its PPO trainer's batched forward pass).
            if self.seq2seq:
                logits, _, values = self.model(
                    input_ids=self.input_ids,
                    attention_mask=self.attention_mask,
                    decoder_input_ids=sequences,
                )
                logits, values = logits[:, :-1], values[:, :-1]
            else:
                mask = torch.cat([self.attention_mask, torch.ones_like(new_tokens)], 1)
                logits, _, values = self.model(input_ids=sequences, attention_mask=mask)
                logits, values = logits[:, -n - 1 : -1], values[:, -n - 1 : -1]
            logprobs = torch.log_softmax(logits.float(), -1).gather(2, new_tokens.unsqueeze(2)).squeeze(2)
            return {"tokens": new_tokens.tolist(), "logprobs_sum": float(logprobs.sum()), "values_sum": float(values.float().sum())}

    def run(self, iters):
        start = time.perf_counter()
        for _ in range(iters):
            check = self.run_once()
        ms = (time.perf_counter() - start) * 1e3 / iters
        return {"ms": ms, "check": check}


def score_weight(model_dir, v_head_weight):
    """The reward task's score head: the checkpoint's value head, or, for a folder without one
    (SmolLM2, whose value head each side initialises with its own generator), a fixed pattern the
    Rust worker builds too: w[j] = ((j % 7) - 3) / (10 * hidden)."""
    from safetensors import safe_open

    files = [f for f in os.listdir(model_dir) if f.endswith(".safetensors")]
    for f in files:
        with safe_open(os.path.join(model_dir, f), "pt") as st:
            if "v_head.summary.weight" in st.keys():
                return v_head_weight
    hidden = v_head_weight.shape[1]
    j = torch.arange(hidden, dtype=torch.float64)
    return (((j % 7) - 3) / (10 * hidden)).float().reshape(1, hidden)


def main():
    worker = Worker()
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request["cmd"]
        try:
            if cmd == "init":
                torch.set_num_threads(request["threads"])
                out = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}}
            elif cmd == "make":
                make(request["name"], request["dir"])
                out = {}
            elif cmd == "load":
                out = worker.load(request["dir"], request["dtype"])
            elif cmd == "prepare":
                worker.prepare(request["task"])
                out = {}
            elif cmd == "run":
                out = worker.run(request.get("iters", 1))
            elif cmd == "rss":
                out = {"peak_rss_mb": peak_rss_mb()}
            elif cmd == "quit":
                reply({"ok": True})
                return
            else:
                raise ValueError(f"unknown command {cmd}")
            reply(dict(out, ok=True))
        except Exception as e:  # reported to the bench, which stops with the message
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()

"""Checks that Python TRL loads a folder the Rust PPO example saved and that its greedy replies
equal ours: `python ppo_check.py MODEL_DIR greedy.json` (prompts and our replies as token ids)."""

import json
import sys

import torch
from trl import AutoModelForCausalLMWithValueHead


def main() -> None:
    model_dir, greedy_path = sys.argv[1], sys.argv[2]
    with open(greedy_path) as f:
        greedy = json.load(f)
    torch.set_num_threads(2)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    # The value head must come from the file, not a fresh initialisation.
    from safetensors.torch import load_file

    saved = load_file(f"{model_dir}/model.safetensors")
    assert torch.equal(model.v_head.summary.weight, saved["v_head.summary.weight"]), "v_head not loaded"
    same = 0
    for prompt, ours in zip(greedy["prompts"], greedy["replies"]):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=greedy["max_new_tokens"],
                do_sample=False,
                eos_token_id=greedy["eos_token_id"],
                pad_token_id=greedy["pad_token_id"],
            )
        theirs = out[0, ids.shape[1] :].tolist()
        if greedy["eos_token_id"] in theirs:
            theirs = theirs[: theirs.index(greedy["eos_token_id"]) + 1]
        if theirs != ours:
            print(f"MISMATCH for prompt {prompt}:\n  ours   {ours}\n  theirs {theirs}")
        else:
            same += 1
    total = len(greedy["prompts"])
    print(f"TRL {model_dir}: {same}/{total} greedy replies identical to ours")
    sys.exit(0 if same == total else 1)


if __name__ == "__main__":
    main()

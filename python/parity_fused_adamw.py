"""Reference for PPO's default optimiser (crates/vh-ppo/tests/fused_adamw.rs): three steps of
torch.optim.AdamW(fused=True), the optimiser TRL 0.26.2's PPOTrainer builds by default on
torch >= 2.8 (PPOConfig.optim = "adamw_torch_fused"), over HF's two parameter groups and a
linearly decaying learning rate.

usage: python parity_fused_adamw.py OUT_DIR
Writes OUT_DIR/fused_adamw.safetensors: `init.<name>`, `grad<step>.<name>`, `final.<name>`,
`exp_avg.<name>`, `exp_avg_sq.<name>`, and OUT_DIR/fused_adamw.json (lrs, settings, names).
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

SHAPES = {
    "transformer.h.0.mlp.c_fc.weight": (24, 16),
    "transformer.h.0.mlp.c_fc.bias": (16,),
    "transformer.h.0.ln_1.weight": (24,),
    "transformer.wte.weight": (50, 24),
    "v_head.summary.weight": (1, 24),
    "v_head.summary.bias": (1,),
}
NO_DECAY = {"transformer.h.0.mlp.c_fc.bias", "transformer.h.0.ln_1.weight", "v_head.summary.bias"}
STEPS, LR, WD, BETAS, EPS = 3, 3e-3, 0.01, (0.9, 0.999), 1e-8


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(7)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=gen)) for n, s in SHAPES.items()}
    out = {f"init.{n}": p.detach().clone() for n, p in params.items()}
    groups = [
        {"params": [p for n, p in params.items() if n not in NO_DECAY], "weight_decay": WD},
        {"params": [p for n, p in params.items() if n in NO_DECAY], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / STEPS)
    lrs = []
    for step in range(STEPS):
        for n, p in params.items():
            # Gradients of very different sizes, so that the moments' rounding is exercised.
            g = torch.randn(p.shape, generator=gen) * 10.0 ** (-step - 1)
            out[f"grad{step}.{n}"] = g
            p.grad = g.clone()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        opt.zero_grad()
    for n, p in params.items():
        out[f"final.{n}"] = p.detach().clone()
        out[f"exp_avg.{n}"] = opt.state[p]["exp_avg"].clone()
        out[f"exp_avg_sq.{n}"] = opt.state[p]["exp_avg_sq"].clone()
    save_file(out, os.path.join(out_dir, "fused_adamw.safetensors"))
    meta = {"lrs": lrs, "weight_decay": WD, "betas": list(BETAS), "eps": EPS, "names": list(SHAPES), "no_decay": sorted(NO_DECAY)}
    with open(os.path.join(out_dir, "fused_adamw.json"), "w") as f:
        json.dump(meta, f)


if __name__ == "__main__":
    main(sys.argv[1])

"""The GPU bench (scripts/device_bench.sh runs it): valuehead against TRL 0.26.2 on one CUDA GPU.

For each model it builds seeded random weights (HF's own initialisation, on the GPU), saves them
with TRL's `save_pretrained`, then times in this one run, each workload as the median of --reps
calls after one warm-up call, with a device synchronisation around each call:

  - TRL: `AutoModelForCausalLMWithValueHead.generate` (transformers' default dynamic cache) and
    TRL's forward (logits and values);
  - transformers' static-cache `generate` (`cache_implementation="static"`, which compiles the
    forward; its warm-up is timed separately), batch 1 in bf16 only, as the third column;
  - ours: the stripped `gpu_bench` example (crates/valuehead/examples/gpu_bench.rs), eager
    decoding and CUDA-graph decoding, over the same folder.

Workloads: batch 1 and batch 64, a 32-token prompt and 64 greedy new tokens with
min_new_tokens = max_new_tokens = 64 (no row stops early); forward b8x128. Prompt tokens are
`(b * 1009 + t * 31 + 7) % vocab` on both sides, so the first row's tokens can be compared.
Peak GPU memory is `torch.cuda.max_memory_allocated` (ours: the same allocator counter), reset
before each workload's warm-up. Bytes of weights one decode step reads (every parameter but
position tables and an untied input embedding) over the HBM bandwidth of the device gives the
per-token bound; the table shows what share of it each side reaches.

usage: python gpu_bench.py run --ours BIN --work DIR --out DIR [--models a,b] [--reps 5] [--budget S]
       python gpu_bench.py report --out DIR
Results go to OUT/results.jsonl line by line (a killed run keeps what it measured) and the table
to OUT/gpu_bench.md.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

PROMPT, NEW = 32, 64

# name -> (model_type, config overrides, precisions timed, static-cache column)
MODELS = {
    # A toy for smoke runs (--models gpt2-tiny --device cpu); not in the default list.
    "gpt2-tiny": ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=256), ["f32"]),
    "gpt2-small": ("gpt2", dict(), ["f32", "bf16"]),
    "smollm2-135m": (
        "llama",
        dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2),
        ["bf16"],
    ),
    "qwen2.5-1.5b": (
        "qwen2",
        dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
             num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
             tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643, use_sliding_window=False),
        ["bf16"],
    ),
}

# HBM bandwidth, bytes/s, by a substring of the device name (first match).
BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12)]


class PartTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise PartTimeout()


def limited(seconds, fn, *args):
    """Runs fn(*args) with a wall-clock limit; raises PartTimeout past it."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, int(seconds)))
    try:
        return fn(*args)
    finally:
        signal.alarm(0)


def record(out_dir, obj):
    obj["time"] = time.time()
    with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
        f.write(json.dumps(obj) + "\n")
    print(json.dumps(obj), flush=True)


DEVICE = "cuda"


def sync(torch):
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def prompt(torch, batch, length, vocab):
    ids = [[(b * 1009 + t * 31 + 7) % vocab for t in range(length)] for b in range(batch)]
    return torch.tensor(ids, dtype=torch.long, device=DEVICE)


def timed(torch, reps, fn):
    samples = []
    for _ in range(reps):
        sync(torch)
        start = time.perf_counter()
        fn()
        sync(torch)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), min(samples), max(samples)


def decode_bytes(model):
    """Bytes of weights one decode step streams: unique parameters, less lookup-only tables."""
    seen, total = set(), 0
    tied = getattr(model.config, "tie_word_embeddings", True)
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if name.endswith("wpe.weight"):
            continue
        if not tied and (name.endswith("embed_tokens.weight") or name.endswith("wte.weight")):
            continue
        total += p.numel() * p.element_size()
    return total


def make(torch, name, folder):
    """Seeded random weights, wrapped by TRL and saved with its save_pretrained."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides, _ = MODELS[name]
    config = AutoConfig.for_model(model_type, **overrides)
    dtype = torch.float32 if model_type == "gpt2" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(DEVICE):
        base = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    try:
        from trl import AutoModelForCausalLMWithValueHead

        model = AutoModelForCausalLMWithValueHead.from_pretrained(base)
    except ImportError as e:
        # Without TRL our side still runs (a checkpoint without v_head.* gets a fresh head).
        print(f"warning: TRL unavailable ({e}); saving the backbone alone", file=sys.stderr)
        model = base
    tmp = folder + ".partial"
    model.save_pretrained(tmp)
    os.replace(tmp, folder)
    return decode_bytes(base)


def python_side(torch, args, name, precision, folder, info):
    """TRL's generate and forward, then transformers' static-cache generate; one record each."""
    try:
        from trl import AutoModelForCausalLMWithValueHead
    except ImportError as e:
        record(args.out, dict(model=name, precision=precision, side="trl", workload="load", error=f"ImportError: {e}"))
        return

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[precision]
    model = AutoModelForCausalLMWithValueHead.from_pretrained(folder, torch_dtype=dtype).to(DEVICE).eval()
    base = model.pretrained_model
    vocab = base.config.vocab_size
    eos = base.config.eos_token_id
    pad = base.config.pad_token_id if base.config.pad_token_id is not None else (eos if eos is not None else 0)
    info["attn_implementation"] = base.config._attn_implementation

    def generate(target, batch, **extra):
        ids = prompt(torch, batch, PROMPT, vocab)
        mask = torch.ones_like(ids)

        def call():
            with torch.inference_mode():
                return target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                                       do_sample=False, pad_token_id=pad, **extra)
        return call

    def forward(batch, length):
        ids = prompt(torch, batch, length, vocab)
        mask = torch.ones_like(ids)

        def call():
            with torch.inference_mode():
                return model(input_ids=ids, attention_mask=mask)
        return call

    parts = [("trl", f"generate:{b}", generate(model, b)) for b in (1, 64)]
    parts.append(("trl", "forward:8:128", forward(8, 128)))
    # Its compile warm-up takes tens of seconds per shape: batch 1 in bf16 only.
    if not args.no_static and precision == "bf16":
        parts.append(("hf-static", "generate:1", generate(base, 1, cache_implementation="static")))
    for side, workload, call in parts:
        base_record = dict(model=name, precision=precision, side=side, workload=workload)
        try:
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            out = limited(args.part_timeout if side == "hf-static" else args.part_timeout / 2, call)
            warmup_s = time.perf_counter() - started
            tokens = out[0, -NEW:].tolist() if workload.startswith("generate") else None
            ms, lo, hi = limited(args.part_timeout, timed, torch, args.reps, call)
            record(args.out, dict(base_record, ms=ms, min_ms=lo, max_ms=hi, warmup_s=warmup_s, tokens=tokens,
                                  peak_allocated_mb=torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else 0.0,
                                  **info))
        except PartTimeout:
            record(args.out, dict(base_record, error=f"timed out after {args.part_timeout} s"))
        except Exception as e:  # reported in the table, the bench goes on
            record(args.out, dict(base_record, error=f"{type(e).__name__}: {e}"[:500]))
    del model, base
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def our_side(args, name, precision, folder, info):
    workloads = ["generate:1:eager", "generate:1:graphs", "generate:64:eager", "generate:64:graphs", "forward:8:128"]
    command = [args.ours, "--model", folder, "--device", DEVICE, "--dtype", precision, "--reps", str(args.reps),
               "--prompt", str(PROMPT), "--new", str(NEW)]
    for w in workloads:
        command += ["--workload", w]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.part_timeout * 2)
        lines, stderr = done.stdout.splitlines(), done.stderr
    except subprocess.TimeoutExpired as e:
        lines = (e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")).splitlines()
        stderr = f"timed out after {args.part_timeout * 2} s"
    if stderr.strip():
        print(f"[ours stderr] {stderr.strip()[-2000:]}", file=sys.stderr)
    for line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "workload" not in obj:
            if obj.get("event") == "error":
                record(args.out, dict(model=name, precision=precision, side="ours", workload="load", error=obj["error"]))
            continue
        kind, *rest = obj.pop("workload").split(":")
        side = "ours" if kind == "forward" else f"ours-{rest[-1]}"
        workload = f"forward:{rest[0]}:{rest[1]}" if kind == "forward" else f"generate:{rest[0]}"
        record(args.out, dict(obj, model=name, precision=precision, side=side, workload=workload, **info))


def run(args):
    global DEVICE
    import torch

    DEVICE = args.device
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    deadline = time.time() + args.budget
    device = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    bandwidth = next((bw for key, bw in BANDWIDTH if key in device), None)
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError as e:
        trl_version = f"unavailable ({e})"
    record(args.out, dict(side="env", device=device, bandwidth=bandwidth, torch=torch.__version__,
                          transformers=transformers.__version__, trl=trl_version))
    for name in args.models.split(","):
        if time.time() > deadline:
            record(args.out, dict(model=name, side="skipped", error="out of time budget"))
            continue
        folder = os.path.join(args.work, name)
        try:
            weight_bytes = limited(args.part_timeout, make, torch, name, folder)
        except Exception as e:
            record(args.out, dict(model=name, side="make", error=f"{type(e).__name__}: {e}"[:500]))
            continue
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        for precision in MODELS[name][2]:
            if time.time() > deadline:
                record(args.out, dict(model=name, precision=precision, side="skipped", error="out of time budget"))
                continue
            element = 4 if precision == "f32" else 2
            # The folder may hold f32 weights timed in bf16: count the bytes of the timed precision.
            info = dict(decode_bytes=weight_bytes if MODELS[name][0] != "gpt2" else weight_bytes * element // 4)
            our_side(args, name, precision, folder, info)
            try:
                python_side(torch, args, name, precision, folder, info)
            except Exception as e:  # a failed load: recorded, the next model still runs
                record(args.out, dict(model=name, precision=precision, side="trl", workload="load",
                                      error=f"{type(e).__name__}: {e}"[:500]))
    report(args)


def report(args):
    path = os.path.join(args.out, "results.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    env = next((r for r in rows if r.get("side") == "env"), {})
    bandwidth = env.get("bandwidth")
    by = {}
    for r in rows:
        if "workload" in r:
            by[(r["model"], r.get("precision"), r["workload"], r["side"])] = r

    def cell(r, key="ms"):
        if r is None:
            return "-"
        if "error" in r:
            return "err"
        return f"{r[key]:.1f}" if key in r else "-"

    lines = [
        f"# GPU bench: valuehead vs TRL 0.26.2 ({env.get('device', '?')})",
        "",
        f"torch {env.get('torch')}, transformers {env.get('transformers')}, trl {env.get('trl')}; "
        f"HBM bandwidth used for the bound: {bandwidth / 1e12 if bandwidth else '?'} TB/s. "
        f"Median of the timed calls after one warm-up; generate = {PROMPT}-token prompt + {NEW} greedy tokens "
        f"(min = max = {NEW}); times in ms per call.",
        "",
        "Speedups are TRL's (or HF static's) time over ours; ms/token, bound share, peak memory, tokens and host "
        "syncs are those of our faster mode.",
        "",
        "| model | prec | workload | TRL | HF static | ours eager | ours graphs | eager vs TRL | graphs vs TRL | best vs HF static | ours ms/token | bound ms/token | share of bound | peak MB TRL / ours | same tokens | host syncs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(m, p, w) for (m, p, w, _) in by}, key=lambda k: (list(MODELS).index(k[0]) if k[0] in MODELS else 99, k[1] or "", k[2]))
    for model, precision, workload in keys:
        get = lambda side: by.get((model, precision, workload, side))
        trl_r, static_r = get("trl"), get("hf-static")
        if workload.startswith("forward"):
            ours = get("ours")
            eager_r, graphs_r = ours, None
        else:
            eager_r, graphs_r = get("ours-eager"), get("ours-graphs")
        timed_modes = [r for r in (eager_r, graphs_r) if r and "ms" in r]
        best = min(timed_modes, key=lambda r: r["ms"]) if timed_modes else None

        def speed(ref, ours):
            return f"{ref['ms'] / ours['ms']:.2f}x" if ref and ours and "ms" in ref and "ms" in ours else "-"
        per_token = bound = share = "-"
        batch = int(workload.split(":")[1])
        if workload.startswith("generate") and best and "ms" in best:
            per_token_ms = best["ms"] / NEW
            per_token = f"{per_token_ms:.3f}"
            if bandwidth and best.get("decode_bytes"):
                bound_ms = best["decode_bytes"] / bandwidth * 1e3
                bound = f"{bound_ms:.3f}"
                share = f"{bound_ms / per_token_ms:.0%}" if batch == 1 else "-"
        peak = f"{cell(trl_r, 'peak_allocated_mb')} / {cell(best, 'peak_allocated_mb')}"
        same = "-"
        if trl_r and best and trl_r.get("tokens") and best.get("tokens"):
            a, b = trl_r["tokens"], best["tokens"]
            same = f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"
        syncs = str(best.get("host_syncs", "-")) if best else "-"
        lines.append(
            f"| {model} | {precision} | {workload} | {cell(trl_r)} | {cell(static_r)} | {cell(eager_r)} | {cell(graphs_r)} | "
            f"{speed(trl_r, eager_r)} | {speed(trl_r, graphs_r)} | {speed(static_r, best)} | {per_token} | {bound} | {share} | "
            f"{peak} | {same} | {syncs} |"
        )
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "Errors:", ""]
        lines += [f"- {r.get('model')} {r.get('precision')} {r.get('workload', '')} {r['side']}: {r['error']}" for r in errors]
    warmups = [r for r in rows if r.get("side") == "hf-static" and "warmup_s" in r]
    if warmups:
        lines += ["", "transformers static-cache warm-up (compile): " +
                  ", ".join(f"{r['model']} {r['precision']} {r['warmup_s']:.1f} s" for r in warmups)]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
        f.write(text)
    print(text)


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--ours", required=True)
    r.add_argument("--work", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--models", default="gpt2-small,smollm2-135m,qwen2.5-1.5b")
    r.add_argument("--device", default="cuda", help="cpu for a smoke run")
    r.add_argument("--reps", type=int, default=5)
    r.add_argument("--part-timeout", type=float, default=90)
    r.add_argument("--budget", type=float, default=330, help="seconds after which no new model starts")
    r.add_argument("--no-static", action="store_true")
    p = sub.add_parser("report")
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.cmd == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()

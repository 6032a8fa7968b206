"""torch.distributed's Gloo all-reduce on the same data as crates/vh-dist/examples/allreduce_bench.rs.

Launch with torchrun's variables (e.g. `cargo xtask launch --nproc 2 -- .venv/bin/python
python/dist_allreduce_bench.py`); prints the same lines, for comparison.
"""

import sys
import time

import torch
import torch.distributed as dist


def main() -> None:
    numel = int(sys.argv[1]) if len(sys.argv) > 1 else 124_439_808
    iters = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    dist.init_process_group("gloo")
    n = dist.get_world_size()
    nbytes = numel * 4
    grad = torch.ones(numel)

    def report(what: str, secs: float) -> None:
        if dist.get_rank() == 0:
            mbs = nbytes / secs / 1e6
            print(
                f"python {what}: {nbytes / 1e6:.1f} MB in {secs:.3f} s: {mbs:.0f} MB/s algorithm bandwidth, "
                f"{mbs * 2 * (n - 1) / n:.0f} MB/s bus bandwidth ({n} ranks)",
                flush=True,
            )

    dist.all_reduce(grad)
    total = 0.0
    for _ in range(iters):
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(grad)
        total += time.perf_counter() - t
    report("one all-reduce", total / iters)
    chunks = [c.contiguous() for c in grad.split(25 * 1024 * 1024 // 4)]
    total = 0.0
    for _ in range(iters):
        dist.barrier()
        t = time.perf_counter()
        for c in chunks:
            dist.all_reduce(c)
        total += time.perf_counter() - t
    report(f"{len(chunks)} all-reduces of 25 MB buckets", total / iters)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

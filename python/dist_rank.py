"""One rank of the vh-dist interoperability test: torch.distributed on Gloo, joined by Rust ranks.

Launched with torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); runs the same
collectives in the same order as crates/vh-dist/tests/interop_python.rs and checks the results.
"""

import datetime
import sys

import torch
import torch.distributed as dist


def main() -> int:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    r, n = dist.get_rank(), dist.get_world_size()

    t = torch.arange(4, dtype=torch.float32) + 10 * r
    dist.all_reduce(t)
    want = torch.arange(4, dtype=torch.float32) * n + 10 * sum(range(n))
    assert torch.equal(t, want), (t, want)

    root = n - 1
    b = torch.tensor([1.5, 2.5, 3.5]) if r == root else torch.zeros(3)
    dist.broadcast(b, root)
    assert torch.equal(b, torch.tensor([1.5, 2.5, 3.5])), b

    g = [torch.zeros(2, dtype=torch.float64) for _ in range(n)]
    dist.all_gather(g, torch.full((2,), float(r), dtype=torch.float64))
    for k, gk in enumerate(g):
        assert torch.equal(gk, torch.full((2,), float(k), dtype=torch.float64)), (k, gk)

    dist.barrier()
    print(f"python rank {r}/{n}: all_reduce, broadcast, all_gather, barrier agree", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The checks and timings `python -m labkit.dist` and notebook 04 run on every rank."""
from __future__ import annotations

import os

import torch.distributed as dist

from labkit.dist.comm import message_sizes, time_all_reduce
from labkit.dist.parallel_linear import check_patterns


def run(rank: int, world: int, seed: int, largest: int, iters: int = 20) -> dict:
    """On one rank: who it is, the four patterns against the unsplit layer, all-reduce timing."""
    return {"rank": rank, "world_size": world, "backend": dist.get_backend(), "pid": os.getpid(),
            "patterns": check_patterns(rank, world, seed),
            "all_reduce": time_all_reduce(rank, world, message_sizes(largest=largest), iters)}


def report(r: dict, world: int, backend: str) -> None:
    print(f"tensor-parallel patterns on {world} ranks ({backend}), vs the unsplit layer:")
    print(f"{'pattern':<10}{'max |err| fp32':>16}{'max |err| fp64':>16}  collectives")
    for name, p in r["patterns"].items():
        print(f"{name:<10}{p['max_err_fp32']:>16.2e}{p['max_err_fp64']:>16.2e}  {', '.join(p['collectives'])}")
    print("\nall-reduce (sum, float32), median of the slowest rank:")
    print(f"{'bytes':>12}{'time us':>12}{'algbw GB/s':>12}{'busbw GB/s':>12}")
    for a in r["all_reduce"]:
        print(f"{a['bytes']:>12,}{a['seconds'] * 1e6:>12.1f}{a['algbw_GBs']:>12.3f}{a['busbw_GBs']:>12.3f}")

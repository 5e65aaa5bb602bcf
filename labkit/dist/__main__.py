"""`python -m labkit.dist`: the column/row/MLP/attention checks and all-reduce timing.

    python -m labkit.dist --nproc 3                  spawns 3 ranks on this machine (gloo)
    torchrun --nnodes 1 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29400 \\
        -m labkit.dist                               the ranks torchrun started (NCCL on GPUs)
"""
from __future__ import annotations

import argparse
import json
import os
import time

from labkit.dist.demo import report, run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit.dist", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="ranks to spawn (ignored under torchrun)")
    p.add_argument("--largest", type=int, default=16 * 2**20, help="largest all-reduce message, bytes")
    p.add_argument("--seed", type=int, default=None, help="weights' seed (default: fresh)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    from labkit.dist import ranks
    if ranks.launched_by_torchrun():
        import torch.distributed as dist
        rank, world, _ = ranks.init_from_env()
        result, backend = run(rank, world, seed, args.largest), dist.get_backend()
        dist.destroy_process_group()
        if rank != 0:
            return 0
    else:
        world, backend = args.nproc, "gloo"
        result = ranks.run_ranks(run, world, seed, args.largest)[0]
    report(result, world, backend)
    if args.json:
        print(json.dumps({"world_size": world, "backend": backend, "seed": seed,
                          "date": time.strftime("%Y-%m-%d"), **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

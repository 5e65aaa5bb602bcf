"""What tensor parallelism communicates: counted, predicted, and timed.

Per generated token, a Megatron-split Llama (labkit/models/llama.py) runs

    2 all-reduces per layer of the token's hidden state (H values): after w_o and after w2
    1 all-gather of the token's logits (each rank holds V/tp of them)

so the payload (the tensors handed to the collectives, per rank) is

    all-reduce  2 L H e bytes            e = bytes per element of the model dtype
    all-gather  (V / tp) e bytes

and with ring algorithms (NCCL's and gloo's for large messages) each rank SENDS

    all-reduce  2 (tp-1)/tp x payload    (reduce-scatter, then all-gather)
    all-gather  (tp-1) x payload         (its slice to every other rank)

The all-reduce count, 2 L per step, does not depend on the batch: at decode a step's messages
are small, so their latency, not bandwidth, is what TP costs (`time_all_reduce` measures it).

`count_collectives()` counts the collectives a process actually calls, by wrapping
torch.distributed's functions for the duration of a `with` block (eager code only: a CUDA
graph replays its collectives without calling Python).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

COUNTED = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor")


# ---------------------------------------------------------------------------- predicted
def bytes_per_token(hidden: int, layers: int, vocab: int, tp: int, elem_bytes: int) -> dict:
    """Communication of one generated token on one rank (see the module docstring)."""
    if tp == 1:                                        # nothing to exchange
        return {"all_reduce_payload": 0, "all_gather_payload": 0, "all_reduces": 0, "sent": 0}
    reduce_payload = 2 * layers * hidden * elem_bytes
    gather_payload = vocab // tp * elem_bytes
    return {"all_reduce_payload": reduce_payload, "all_gather_payload": gather_payload,
            "all_reduces": 2 * layers,
            "sent": round(reduce_payload * 2 * (tp - 1) / tp + gather_payload * (tp - 1))}


# ---------------------------------------------------------------------------- counted
@dataclass
class CollectiveCount:
    calls: list[tuple[str, int]] = field(default_factory=list)    # (op, payload bytes)

    @property
    def payload_bytes(self) -> int:
        return sum(b for _, b in self.calls)

    def by_op(self) -> dict[str, tuple[int, int]]:
        """{op: (calls, payload bytes)}."""
        out: dict[str, tuple[int, int]] = {}
        for op, b in self.calls:
            n, total = out.get(op, (0, 0))
            out[op] = (n + 1, total + b)
        return out


def _payload(op: str, args) -> int:
    t = args[1] if op == "all_gather" else args[0]          # all_gather(outputs, input)
    if op == "all_gather_into_tensor":
        t = args[1]
    return t.numel() * t.element_size()


@contextlib.contextmanager
def count_collectives(default_group_only: bool = True):
    """Record every collective this process calls inside the block: `with count_collectives()
    as c: ...; c.calls`. With default_group_only, collectives on other groups (labkit's engine
    sends each step's inputs on a separate control group) are left out."""
    count = CollectiveCount()
    originals = {op: getattr(dist, op) for op in COUNTED}

    def wrap(op, fn):
        def counted(*args, **kw):
            if not (default_group_only and kw.get("group") is not None):
                count.calls.append((op, _payload(op, args)))
            return fn(*args, **kw)
        return counted

    for op, fn in originals.items():
        setattr(dist, op, wrap(op, fn))
    try:
        yield count
    finally:
        for op, fn in originals.items():
            setattr(dist, op, fn)


# ---------------------------------------------------------------------------- timed
def message_sizes(smallest: int = 4 * 2**10, largest: int = 64 * 2**20) -> list[int]:
    """Powers of 4 bytes from `smallest` to `largest` (inclusive)."""
    sizes, s = [], smallest
    while s <= largest:
        sizes.append(s)
        s *= 4
    return sizes


def time_all_reduce(rank: int, world: int, sizes: list[int], iters: int = 20,
                    warmup: int = 3) -> list[dict]:
    """Median time of one all-reduce (sum, float32) per message size, run on every rank of a
    group (labkit.dist.ranks.run_ranks or torchrun). Bandwidths as nccl-tests report them:
    algbw = bytes / time, busbw = algbw x 2(n-1)/n (what each link carries)."""
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    rows = []
    for size in sizes:
        x = torch.ones(size // 4, dtype=torch.float32, device=device)
        times = []
        for i in range(warmup + iters):
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        t = torch.tensor([statistics.median(times)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)       # the slowest rank's median: what a step waits
        sec = t.item()
        algbw = size / sec
        rows.append({"bytes": size, "seconds": sec, "algbw_GBs": algbw / 1e9,
                     "busbw_GBs": algbw * 2 * (world - 1) / world / 1e9})
    return rows


def fit_latency_bandwidth(rows: list[dict]) -> tuple[float, float]:
    """Least-squares fit of t(n) = alpha + n / beta to `time_all_reduce` rows: the latency
    alpha (seconds) every message pays, and the bandwidth beta (bytes/s) large ones approach."""
    import numpy as np
    n = np.array([r["bytes"] for r in rows], dtype=np.float64)
    t = np.array([r["seconds"] for r in rows], dtype=np.float64)
    slope, alpha = np.polyfit(n, t, 1)
    return max(alpha, 0.0), 1.0 / slope if slope > 0 else float("inf")

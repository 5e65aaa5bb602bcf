"""The roofline a decode step is measured against: the bytes it must move / memory bandwidth.

A decode step reads every weight once (whatever the batch) and every cached K/V of every
running sequence once; at small batch nothing else matters, so

    t_step >= (weight_bytes + sum_b context_b x kv_bytes_per_token) / bandwidth

with `bandwidth` measured here (a large device-to-device copy: read + write), not the data
sheet's. Prefill is compute-bound instead: 2 x params FLOPs per prompt token.
"""
from __future__ import annotations

import time

import torch


def copy_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 10) -> float:
    """Bytes/s of `dst.copy_(src)` on `device` (counting the read and the write)."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / min(times)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model) -> int:
    """Bytes a forward pass streams: every parameter once (tied embeddings counted once, as the
    output head; the embedding lookup itself reads only B rows)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_step_bytes(model, kv_bytes_per_token: int, context_lens) -> int:
    return weight_bytes(model) + kv_bytes_per_token * int(sum(context_lens))


def workload_roofline_seconds(model, kv_bytes_per_token: int, prompt_lens, output_lens,
                              max_batch_size: int, bandwidth: float) -> float:
    """A lower bound on a whole batch run's time, from memory traffic alone: at best
    ceil(outputs / max_batch_size) decode steps, each reading the weights, plus every output
    token reading its own context's K/V once."""
    steps = -(-sum(output_lens) // max_batch_size)
    kv_reads = sum(p * o + o * (o + 1) // 2 for p, o in zip(prompt_lens, output_lens))
    return (steps * weight_bytes(model) + kv_reads * kv_bytes_per_token) / bandwidth

"""CUDA graphs for decode steps: launch a whole forward pass with one call.

A decode step of a small model is hundreds of tiny kernel launches; from Python each costs
~10-40 us of CPU time, far more than the GPU needs to run it. A CUDA graph records the
launches once and replays them in one call. Its rules shape the engine:

- inputs are read from fixed addresses: the step's ids/positions/slots/block tables live in
  the persistent device buffer (labkit/engine/step_inputs.py) and are overwritten, not
  re-allocated, before each replay;
- the launch grid is frozen: a graph is captured per batch-size *bucket* (1, 2, 4, 8, then
  multiples of 16, as vLLM does) and a batch of B runs in the smallest bucket >= B, its extra
  rows padded (slot -1: nothing stored; context 0: attention writes zeros);
- nothing may sync with the host inside (the Triton kernels read lengths on the device, the
  decode split-KV factor is fixed per bucket).
All graphs share one memory pool; they are captured largest first so smaller ones reuse it.
"""
from __future__ import annotations

import bisect
import logging
import time

import torch

log = logging.getLogger("labkit")


def graph_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, 16, 32, 48, ... up to (and including) max_batch_size."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sorted(set(sizes + [max_batch_size]))


class DecodeGraphs:
    """One captured decode forward (ids -> logits) per bucket."""

    def __init__(self, forward, buckets: list[int]):
        """forward(batch_size) -> logits (batch_size, V): runs the model on the buffer views."""
        self.forward, self.buckets = forward, sorted(buckets)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0

    def bucket(self, batch_size: int) -> int | None:
        """Smallest captured size >= batch_size (None: larger than every graph)."""
        i = bisect.bisect_left(self.buckets, batch_size)
        return self.buckets[i] if i < len(self.buckets) else None

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for b in reversed(self.buckets):
            # warm up on a side stream (Triton compiles, cuBLAS picks its kernels) ...
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.forward(b)
            torch.cuda.current_stream().wait_stream(stream)
            # ... then record
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                logits = self.forward(b)                               # (b, V) float32
            self.graphs[b] = (graph, logits)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        log.info("CUDA graphs: %d decode buckets (%s) captured in %.1f s", len(self.buckets),
                 ", ".join(map(str, self.buckets)), self.capture_seconds)

    def replay(self, bucket: int) -> torch.Tensor:
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits                                                  # (bucket, V)

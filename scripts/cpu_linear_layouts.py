"""Time one decode step's products on the CPU three ways: what F.linear does (sgemm, which packs
the weight on every call), oneDNN on weights reordered once for 1 row, and for 256 rows (what
labkit/layers/cpu_linear.py does for fp32).

    python scripts/cpu_linear_layouts.py [--rows 1 8 20 32 64 512] [--dtype float32]

The products are SmolLM2-135M's: per layer qkv (960 x 576), o (576 x 576), gate+up (3072 x 576)
and down (576 x 1536), 30 layers, then the tied output head (49152 x 576): 121 products, every
weight its own tensor (so the weights stream from memory as in the engine, not from cache).
Prints the median of 5 steps, ms, per row count.
"""
from __future__ import annotations

import argparse
import time

import torch

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]   # (N, K) of one layer
LAYERS, VOCAB = 30, 49152


def step_ms(fn, xs, weights, head) -> float:
    def step():
        for layer in weights:
            for (n, k), w in zip(SHAPES, layer):
                fn(xs[k], w)
        fn(xs[576], head)
    step()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 20, 32, 64, 512])
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    weights = [[(torch.randn(n, k, generator=g) * 0.02).to(dtype) for n, k in SHAPES]
               for _ in range(LAYERS)]
    head = (torch.randn(VOCAB, 576, generator=g) * 0.02).to(dtype)

    def packed(hint):
        reorder = torch.ops.mkldnn._reorder_linear_weight
        return [[reorder(w, hint) for w in layer] for layer in weights], reorder(head, hint)

    def onednn(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    ways = {"F.linear (sgemm)": (torch.nn.functional.linear, weights, head),
            "oneDNN, 1-row layout": (onednn, *packed(1)),
            "oneDNN, 256-row layout": (onednn, *packed(256))}
    print(f"{torch.get_num_threads()} threads, {args.dtype}; ms per decode step (121 products)")
    print("rows  " + "  ".join(f"{name:>24}" for name in ways))
    for m in args.rows:
        xs = {k: torch.randn(m, k, generator=g).to(dtype) for k in (576, 1536)}
        row = [step_ms(fn, xs, ws, hd) for fn, ws, hd in ways.values()]
        print(f"{m:>4}  " + "  ".join(f"{t:>24.1f}" for t in row), flush=True)


if __name__ == "__main__":
    main()

"""SwiGLU's gate on the skinny matmul's accumulators (kernels/gemv.py `linear_silu_triton`)
against the two kernels it replaces (the w13 matmul, then silu_and_mul), at decode rows: tile
sweep of the fused kernel, every call replayed from a CUDA graph over > 256 MiB of distinct
weight copies (cold L2), each config checked against float64 first.

    python scripts/gpu_swiglu_sweep.py [--json swiglu_sweep.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gpu_gemv_sweep import time_linear  # noqa: E402
from kernels.activation import silu_and_mul_triton  # noqa: E402
from kernels.gemv import linear_silu_triton, linear_small_m_triton  # noqa: E402

SHAPES = {"llama-2-7b w13": (22016, 4096), "llama-3-8b w13": (28672, 4096)}   # (2I, K)


def configs():
    grid = dict(BLOCK_N=(16, 32, 64), BLOCK_K=(128, 256), num_warps=(2, 4), num_stages=(3, 4))
    return [dict(zip(grid, v)) for v in itertools.product(*grid.values())]


def check(cfg, N, K, M) -> float:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * (2 / K ** 0.5)
    g, u = (x.double() @ w.double().T).chunk(2, dim=-1)
    want = F.silu(g) * u
    got = linear_silu_triton(x, w, **cfg).double()
    return ((got - want).abs().max() / want.abs().max()).item()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="swiglu_sweep.json")
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 4])
    args = ap.parse_args()
    rows = []
    for name, (N, K) in SHAPES.items():
        for M in args.ms:
            two = time_linear(lambda x, w: silu_and_mul_triton(linear_small_m_triton(x, w)),
                              N, K, M)                    # the two kernels it replaces
            best = (None, float("inf"))
            for cfg in configs():
                try:
                    err = check(cfg, N, K, M)
                    if not err < 2e-2:
                        print(f"  {name} M={M} {cfg}: error {err:.1e}, skipped")
                        continue
                    t = time_linear(lambda x, w: linear_silu_triton(x, w, **cfg), N, K, M)
                except Exception as e:                      # noqa: BLE001 (a tile that fails)
                    print(f"  {name} M={M} {cfg}: {type(e).__name__}")
                    continue
                rows.append({"matrix": name, "M": M, "config": cfg, "us": t * 1e6,
                             "unfused_us": two * 1e6})
                if t < best[1]:
                    best = (cfg, t)
            print(f"{name} M={M}: unfused (matmul + silu_and_mul) {two * 1e6:.1f} us, fused best "
                  f"{best[1] * 1e6:.1f} us ({two / best[1]:.3f}x) {best[0]}", flush=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time the two CPU paths of a W4A16 linear by the number of rows: PyTorch's int4 CPU kernel
(kernels/w4a16_cpu.py) against the reference it replaces (kernels/w4a16.py: dequantize the
whole weight, then F.linear), bf16 activations, at SmolLM2-135M's three weight shapes. Each
pair is checked against each other before it is timed.

    python scripts/cpu_w4a16_rows.py [--rows 8 32 256 2048] [--reps 5] [--json rows.json]

Prints ms per call (mean of --reps after one warm-up) and the kernel's speed-up.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from kernels.w4a16 import pack_int4, w4a16_linear_ref
from kernels.w4a16_cpu import pack_for_cpu, supported, w4a16_linear_cpu

SHAPES = [(3072, 576), (576, 1536), (960, 576)]     # (N, K): gate+up, down, qkv


def timed(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 32, 128, 256, 512, 1024, 2048])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    G, g = args.group_size, torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, G={G}")
    print(f"{'N x K':>12} {'M':>6} {'kernel ms':>10} {'reference ms':>13} {'speed-up':>9}")
    rows = []
    for N, K in SHAPES:
        qweight = pack_int4(torch.randint(0, 16, (N, K), generator=g))            # (N, K/2)
        scales = (torch.rand(N, K // G, generator=g) * 0.01 + 1e-3).bfloat16()   # (N, K/G)
        zeros = torch.randint(0, 16, (N, K // G), generator=g, dtype=torch.uint8)
        if not supported(qweight, G):
            raise SystemExit("PyTorch's int4 CPU kernel is not available in this torch build")
        packed, sz = pack_for_cpu(qweight, scales, zeros, G)
        with torch.inference_mode():
            for M in args.rows:
                x = torch.randn(M, K, generator=g).bfloat16()
                got, want = w4a16_linear_cpu(x, packed, sz, G), w4a16_linear_ref(x, qweight, scales, zeros, G)
                torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())
                kern = timed(lambda: w4a16_linear_cpu(x, packed, sz, G), args.reps)
                ref = timed(lambda: w4a16_linear_ref(x, qweight, scales, zeros, G), args.reps)
                rows.append(dict(N=N, K=K, M=M, kernel_ms=kern, reference_ms=ref))
                print(f"{N:>5} x {K:<5} {M:>6} {kern:>10.2f} {ref:>13.2f} {ref / kern:>8.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), group_size=G,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

"""GPU sweep of the many-row W4A16 kernels (kernels/w4a16_gemm.py: the Triton GEMM, and dequantize
+ cuBLAS) against cuBLAS bf16 and the tensor-core kernel of kernels/w4a16.py, issue 10's shapes.

    python scripts/gpu_w4a16_gemm.py [--ms 16 64 128 256 512 2048] [--no-sweep] [--json FILE]

Correctness first (every shape and M against float64, both new paths; sweep candidates are
checked too), then per (K, N, M): cuBLAS bf16, the old kernel's default, the GEMM's default and
the best of a tile sweep, dequantize + cuBLAS, each timed from a
CUDA graph over distinct weight copies (> 256 MiB: nothing served from L2). Prints a table
last; paste winners into kernels/w4a16_gemm.py's gemm_config.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gpu_w4a16 import FLUSH_BYTES, G, SHAPES, graph_time, random_int4  # noqa: E402
from kernels.w4a16 import dequantize_int4, w4a16_linear_triton  # noqa: E402
from kernels.w4a16_gemm import gemm_config, w4a16_dequant_linear, w4a16_gemm_triton  # noqa: E402


def sweep_configs(M: int) -> list[dict]:
    """Tiles per M: BLOCK_M the M side (one or two M tiles), split-K left to the launcher
    (None) or off (1) where the output has few tiles."""
    bms = sorted({max(16, min(256, triton_next_pow2(M))), max(16, min(128, triton_next_pow2(M) // 2))})
    out = []
    for bn, bm, bk, w in itertools.product((64, 128, 256), bms, (64, 128), (4, 8)):
        if bn * bm > 128 * 256 or (bn == 256 and w == 4) or (bn == 64 and w == 8):
            continue
        for sk in ((None, 1) if M <= 64 else (1,)):
            out.append(dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=sk,
                            num_warps=w, num_stages=3))
    return out


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check(K, N, M, fn=w4a16_gemm_triton, **cfg) -> float:
    """Max relative error of `fn` (output poisoned with NaN first) against float64."""
    qw, s, z = random_int4(N, K)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    y = fn(x, qw, s, z, G, out=out, **cfg) if fn is w4a16_gemm_triton else fn(x, qw, s, z, G)
    want = x.double() @ dequantize_int4(qw, s, z, G, torch.float64).T
    return float("nan") if y.isnan().any() else ((y.double() - want).abs().max() / want.abs().max()).item()


def bench(K, N, M, sweep: bool) -> dict:
    n4 = max(2, math.ceil(FLUSH_BYTES / (N * K // 2)))
    n16 = max(2, math.ceil(FLUSH_BYTES / (N * K * 2)))
    w4 = [random_int4(N, K) for _ in range(n4)]
    w16 = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(n16)]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    t_cublas = graph_time(lambda i: F.linear(x, w16[i]), n16)
    t_old = graph_time(lambda i: w4a16_linear_triton(x, *w4[i], G), n4)
    t_new = graph_time(lambda i: w4a16_gemm_triton(x, *w4[i], G), n4)
    t_deq = graph_time(lambda i: w4a16_dequant_linear(x, *w4[i], G), n4)
    best, t_best = "default", t_new
    for cfg in (sweep_configs(M) if sweep else []):
        try:
            if not check(K, N, M, **cfg) < 1e-2:      # a wrong answer is not a candidate
                print(f"  WRONG {cfg}", flush=True)
                continue
            t = graph_time(lambda i: w4a16_gemm_triton(x, *w4[i], G, **cfg), n4, reps=10)
        except Exception as e:          # out of shared memory / registers
            print(f"  skip {cfg}: {type(e).__name__}", flush=True)
            continue
        if t < t_best:
            best, t_best = cfg, t
    del w4, w16
    torch.cuda.empty_cache()
    return dict(K=K, N=N, M=M, us_cublas=t_cublas * 1e6, us_old=t_old * 1e6, us_new=t_new * 1e6,
                us_best=t_best * 1e6, us_dequant=t_deq * 1e6, x_dequant=t_cublas / t_deq, x_old=t_cublas / t_old, x_new=t_cublas / t_new,
                x_best=t_cublas / t_best, best=str(best), default=str(gemm_config(M, N, K, G)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--shapes", type=int, nargs="+", default=list(range(len(SHAPES))))
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--json", default="gpu_w4a16_gemm.json")
    a = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    torch.manual_seed(0)
    errs = []
    for K, N in SHAPES:
        for M in a.ms:
            e = (check(K, N, M), check(K, N, M, w4a16_dequant_linear))
            errs += list(e)
            if not max(e) < 1e-2:
                print(f"WRONG K={K} N={N} M={M}: gemm {e[0]:.3g} dequant {e[1]:.3g}", flush=True)
    print("max rel err vs float64:", max(errs), flush=True)
    rows = []
    for i in a.shapes:
        K, N = SHAPES[i]
        for M in a.ms:
            r = bench(K, N, M, not a.no_sweep)
            rows.append(r)
            print(json.dumps(r), flush=True)
    Path(a.json).write_text(json.dumps(dict(max_rel_err=max(errs), rows=rows), indent=1))
    print(f"\n{'K x N':>13} {'M':>4} {'cuBLAS us':>9} {'old x':>6} {'new x':>6} {'best x':>6} {'deq x':>6}  best")
    for r in rows:
        print(f"{r['K']:>6}x{r['N']:<6} {r['M']:>4} {r['us_cublas']:9.1f} {r['x_old']:6.2f} "
              f"{r['x_new']:6.2f} {r['x_best']:6.2f} {r['x_dequant']:6.2f}  {r['best']}")
    return 0 if max(errs) < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())

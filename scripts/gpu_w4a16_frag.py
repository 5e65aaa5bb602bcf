"""GPU benchmark of the tensor-core W4A16 kernel in fragment order (kernels/w4a16_frag.py).

    python scripts/gpu_w4a16_frag.py [--ms 1 4 16 64] [--shapes 4] [--no-sweep] [--no-e2e]
                                     [--json gpu_w4a16_frag.json]

1. Speed per (K, N) of issue 10's shapes and Llama-2-7B's fused ones, int4 group 128, bf16 x:
   cuBLAS bf16 (F.linear), what the engine runs today (the GEMV for 1-4 rows, then
   kernels/w4a16.py / w4a16_gemm.py through `w4a16_linear`) and the frag kernel (its default
   tile, and the best of a small sweep unless --no-sweep; each timed tile checked against
   float64). Timing as scripts/gpu_w4a16.py: a CUDA graph over > 256 MiB of weight copies.
2. End to end (unless --no-e2e): decode of the Llama-2-7B shape with dummy weights at batch
   1, 4 and 16, bf16 vs int4 g128 with `gpu_kernel` "gemv" (no frag kernel) and "auto".
   Needs LABKIT_CACHE holding smollm2-tokenizer/.

Prints the table last. Correctness at these shapes: `pytest -m gpu tests/test_w4a16_frag.py`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gpu_w4a16 import FLUSH_BYTES, decode_tokens_per_s, graph_time, random_int4  # noqa: E402
from kernels import w4a16_frag as frag  # noqa: E402
from kernels import w4a16_gemv as gemv  # noqa: E402
from kernels._triton import num_sms  # noqa: E402
from kernels.w4a16 import dequantize_int4, w4a16_linear  # noqa: E402

G = 128
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336),     # issue 10
          (4096, 12288), (4096, 22016)]                                  # 7B fused qkv, gate/up
MS = [1, 2, 4, 8, 16, 32, 64, 256]
SWEEP = [dict(BLOCK_N=bn, BLOCK_K=128, WAVES=wv, num_warps=w, num_stages=st)
         for bn in (64, 128) for wv in (1, 2, 4) for w in (4, 8) for st in (3, 4)]
SWEEP_LARGE_M = [dict(BLOCK_N=bn, BLOCK_K=bk, WAVES=0, num_warps=8, num_stages=st)   # M > 64
                 for bn in (128, 256) for bk in (64, 128) for st in (3, 4)]


def resolve(cfg: dict, M: int, N: int, K: int) -> dict:
    """WAVES -> SPLIT_K (about WAVES programs per SM, each at least two K tiles); BLOCK_M."""
    cfg = dict(cfg)
    waves = cfg.pop("WAVES")
    bm = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    tiles = -(-N // cfg["BLOCK_N"]) * -(-M // bm)
    split = 1 if waves == 0 else max(1, min(K // (2 * cfg["BLOCK_K"]), -(-waves * num_sms() // tiles)))
    return dict(cfg, BLOCK_M=bm, SPLIT_K=split)


def bench_shape(K: int, N: int, M: int, sweep: bool) -> dict:
    int4_bytes = N * K // 2 + N * (K // G) * 6
    n4 = max(2, math.ceil(FLUSH_BYTES / int4_bytes))
    n16 = max(2, math.ceil(FLUSH_BYTES / (N * K * 2)))
    stored = [random_int4(N, K) for _ in range(n4)]
    frags = [frag.pack_frag(*w, G) for w in stored]
    pairs = [gemv.pack_pairs(*w, G) for w in stored] if M <= gemv.GEMV_MAX_ROWS else None
    dense = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(n16)]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    want = x.double() @ dequantize_int4(*stored[0], G, torch.float64).T
    t_cublas = graph_time(lambda i: F.linear(x, dense[i]), n16)
    if pairs is not None:
        t_now = graph_time(lambda i: gemv.w4a16_gemv_triton(x, pairs[i]), n4)
    else:
        t_now = graph_time(lambda i: w4a16_linear(x, *stored[i], G), n4)

    def err(cfg):
        y = frag.w4a16_frag_triton(x, frags[0], **cfg)
        return ((y.double() - want).abs().max() / want.abs().max()).item()

    t_default = graph_time(lambda i: frag.w4a16_frag_triton(x, frags[i]), n4)
    best, t_best, e_best = {}, t_default, err({})
    if sweep:
        for cfg in (SWEEP if M <= 64 else SWEEP_LARGE_M):
            cfg = resolve(cfg, M, N, K)
            try:
                e = err(cfg)
                t = graph_time(lambda i: frag.w4a16_frag_triton(x, frags[i], **cfg), n4)
            except Exception as ex:      # registers / shared memory out of range
                print(f"  skip {cfg}: {type(ex).__name__}: {str(ex)[:80]}", flush=True)
                continue
            if e > 1e-2:
                print(f"  WRONG {cfg}: rel. error {e:.1e}", flush=True)
                continue
            if t < t_best:
                best, t_best, e_best = cfg, t, e
    del stored, frags, pairs, dense
    torch.cuda.empty_cache()
    return dict(K=K, N=N, M=M, us_cublas=t_cublas * 1e6, us_now=t_now * 1e6,
                us_default=t_default * 1e6, us_best=t_best * 1e6, rel_err=e_best,
                x_now=t_cublas / t_now, x_default=t_cublas / t_default, x_best=t_cublas / t_best,
                tbs_best=int4_bytes / t_best / 1e12, best=best,
                default=frag._config(M, N, K, "cuda"))


def e2e(batches: list[int]) -> dict:
    """Decode tok/s per batch: bf16, and int4 with W4A16Linear.gpu_kernel "gemv" (no frag
    kernel) and "auto" (the default: GEMV at one row, the frag kernel at 2-64)."""
    import traceback

    from labkit.layers.linear import W4A16Linear
    out = {}
    for batch in batches:
        try:
            out[batch] = dict(bf16=decode_tokens_per_s("dummy:llama-2-7b", batch))
            for kernel in ("gemv", "auto"):
                W4A16Linear.gpu_kernel = kernel
                try:
                    out[batch][kernel] = decode_tokens_per_s("dummy:llama-2-7b:int4", batch)
                finally:
                    W4A16Linear.gpu_kernel = "auto"
        except Exception as ex:
            traceback.print_exc()
            out[batch] = dict(error=f"{type(ex).__name__}: {ex}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--json", default="gpu_w4a16_frag.json")
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="bench only the first N shapes")
    ap.add_argument("--ms", type=int, nargs="+", default=MS, help="rows of x to bench")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    rows = []
    for K, N in SHAPES[:args.shapes]:
        for M in args.ms:
            r = bench_shape(K, N, M, sweep=not args.no_sweep)
            rows.append(r)
            print(f"K={K} N={N} M={M}: cuBLAS {r['us_cublas']:.1f} us, now {r['us_now']:.1f}, "
                  f"frag {r['us_default']:.1f}, best {r['us_best']:.1f} {r['best']}", flush=True)
    ends = {} if args.no_e2e else e2e(args.batches)
    Path(args.json).write_text(json.dumps(dict(device=dev, rows=rows, e2e=ends), indent=1,
                                          default=str))
    print(f"\nW4A16 frag kernel (int4 g{G}, bf16 x) vs cuBLAS bf16 on {dev}; x = cuBLAS us / us")
    print(f"{'K':>6} {'N':>6} {'M':>3} | {'cuBLAS us':>9} | {'now us':>6} {'x':>5} | {'frag us':>7} "
          f"{'x':>5} | {'best us':>7} {'x':>5} {'TB/s':>5} | err   best tile")
    for r in rows:
        b = r["best"]
        tile = (f"BN{b['BLOCK_N']} BK{b['BLOCK_K']} S{b['SPLIT_K']} w{b['num_warps']} "
                f"st{b['num_stages']}") if b else "default"
        print(f"{r['K']:>6} {r['N']:>6} {r['M']:>3} | {r['us_cublas']:>9.1f} | {r['us_now']:>6.1f} "
              f"{r['x_now']:>5.2f} | {r['us_default']:>7.1f} {r['x_default']:>5.2f} | "
              f"{r['us_best']:>7.1f} {r['x_best']:>5.2f} {r['tbs_best']:>5.2f} | {r['rel_err']:.0e} {tile}")
    for batch, e in ends.items():
        print(f"end to end, Llama-2-7B shape, batch {batch} decode: " + (
            f"bf16 {e['bf16']:.1f} tok/s, int4 gemv {e['gemv']:.1f} ({e['gemv'] / e['bf16']:.2f}x), "
            f"int4 auto {e['auto']:.1f} ({e['auto'] / e['bf16']:.2f}x)"
            if "error" not in e else e["error"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

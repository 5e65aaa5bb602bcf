"""Sweep the bf16 skinny-matmul tiles (kernels/gemv.py) on this GPU: Llama-2-7B's decode
matrices at M = 1 (and the winners at M = 4, 16), each call replayed from a CUDA graph over
> 256 MiB of distinct weight copies (cold L2, as in a decode step), cuBLAS in the same run.
Every config is checked against F.linear before it is timed.

    python scripts/gpu_gemv_sweep.py [--json gemv_sweep.json] [--quick]

Prints, per matrix, cuBLAS, the current default and the best configs (TB/s of weight bytes).
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

from gpu_w4a16 import FLUSH_BYTES, graph_time  # noqa: E402
from kernels.gemv import _config, linear_small_m_triton  # noqa: E402

SHAPES = {"w_qkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096), "w2": (4096, 11008),
          "lm_head": (32000, 4096)}                                  # (N, K)


def configs(quick: bool):
    grid = dict(BLOCK_N=(16, 32, 64), BLOCK_K=(128, 256, 512), num_warps=(2, 4, 8),
                num_stages=(3, 4, 5))
    if quick:
        grid = dict(BLOCK_N=(16, 32), BLOCK_K=(256, 512), num_warps=(2, 4), num_stages=(4, 5))
    keys = list(grid)
    return [dict(zip(keys, v)) for v in itertools.product(*grid.values())]


_WEIGHTS: dict = {}


def time_linear(fn, N: int, K: int, M: int) -> float:
    """Seconds per call of fn(x (M, K), w (N, K)), each call on another copy of w."""
    if (N, K) not in _WEIGHTS:
        _WEIGHTS.clear()
        copies = max(2, FLUSH_BYTES // (N * K * 2))
        _WEIGHTS[N, K] = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
                          for _ in range(copies)]
    ws = _WEIGHTS[N, K]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    return graph_time(lambda i: fn(x, ws[i]), len(ws))


def check(cfg: dict, N: int, K: int, M: int) -> float:
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x.double(), w.double())
    got = linear_small_m_triton(x, w, **cfg).double()
    return ((got - ref).norm() / ref.norm()).item()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="gemv_sweep.json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(), "rows": []}
    for name, (N, K) in SHAPES.items():
        gb = N * K * 2 / 1e12                                        # TB of weights per call
        row = {"name": name, "N": N, "K": K, "default": _config(N, K)}
        row["cublas_us"] = time_linear(F.linear, N, K, 1) * 1e6
        row["default_us"] = time_linear(linear_small_m_triton, N, K, 1) * 1e6
        res = []
        for cfg in configs(args.quick):
            try:
                err = check(cfg, N, K, 1)
            except Exception as e:                                   # e.g. too much shared memory
                print(f"skip {cfg}: {type(e).__name__}", flush=True)
                continue
            if not err < 1e-2:
                res.append((float("inf"), cfg, err))
                continue
            t = time_linear(lambda x, w: linear_small_m_triton(x, w, **cfg), N, K, 1) * 1e6
            res.append((t, cfg, err))
        res.sort(key=lambda r: r[0])
        row["best"] = [{"us": t, "TBs": gb / (t / 1e6), "cfg": c, "err": e} for t, c, e in res[:5]]
        row["wrong"] = [c for t, c, e in res if t == float("inf")]
        best = res[0][1]
        for M in (4, 16):
            row[f"M{M}"] = {"cublas_us": time_linear(F.linear, N, K, M) * 1e6,
                            "default_us": time_linear(linear_small_m_triton, N, K, M) * 1e6,
                            "best_us": time_linear(lambda x, w: linear_small_m_triton(x, w, **best),
                                                   N, K, M) * 1e6}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"\nbf16 GEMV sweep, M = 1, on {out['device']} (TB/s of weight bytes)")
    for r in out["rows"]:
        gb = r["N"] * r["K"] * 2 / 1e12
        b = r["best"][0]
        print(f"{r['name']:>8} {r['N']:>6}x{r['K']:<6} cuBLAS {gb / r['cublas_us'] * 1e6:.2f} | default "
              f"{gb / r['default_us'] * 1e6:.2f} | best {b['TBs']:.2f} {b['cfg']} | wrong {len(r['wrong'])}")
        print("         next: " + "; ".join(f"{x['TBs']:.2f} {x['cfg']}" for x in r["best"][1:4]))
        print("         M=4 / M=16 us (cuBLAS, default, best-of-M1): " + " / ".join(
            f"{r[f'M{M}']['cublas_us']:.1f}, {r[f'M{M}']['default_us']:.1f}, {r[f'M{M}']['best_us']:.1f}"
            for M in (4, 16)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

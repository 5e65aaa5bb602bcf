"""Issue 9 on one GPU: the int8/int4 paged decode kernel's tile variants, each checked at real
shapes against "dequantize, then attend" (float64), then timed from CUDA graphs against the bf16
kernel at B=64, L=2048, 32/8 heads, d=128, block 64. Prints a table last.

    python scripts/gpu_decode_quant_tiles.py

Variants (kernels/paged_decode_quant.py): the first kernel's tile (transposed=False), the
transposed tile with prefetch 0 / 1 / 2 (nothing / block table + scales + zeros / also the
codes, by hand), tile sizes, warps, Triton pipeline stages, a register cap (maxnreg: all 512
programs of this shape fit on the 132 SMs only at <= 128 registers x 128 threads) and split-KV.
About 2 minutes on an H200.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gpu_kvquant import DEV, bench, dense, err, quant_cache, tables_for  # noqa: E402

from kernels import paged_decode_ref, paged_decode_triton  # noqa: E402
from kernels.kv_quant import QuantKVCache  # noqa: E402
from kernels.paged_decode_quant import paged_decode_quant_triton  # noqa: E402

VARIANTS = [                                  # (name, launcher arguments)
    ("first tile (transposed=False)", dict(transposed=False)),
    ("pf0 BN64 w4 st2", dict(prefetch=0)),
    ("pf1 BN64 w4 st2 (default)", dict()),
    ("pf1 BN64 w4 st3", dict(num_stages=3)),
    ("pf1 BN64 w4 st1", dict(num_stages=1)),
    ("pf1 BN64 w2 st2", dict(num_warps=2)),
    ("pf1 BN64 w2 st3", dict(num_warps=2, num_stages=3)),
    ("pf0 BN128 w4 st3", dict(prefetch=0, block_n=128, num_stages=3)),
    ("pf1 BN128 w4 st3", dict(block_n=128, num_stages=3)),
    ("pf1 BN128 w4 st2 r128", dict(block_n=128, max_registers=128)),
    ("pf1 BN128 w8 st2", dict(block_n=128, num_warps=8)),
    ("pf2 BN64 w4 r128", dict(prefetch=2, num_stages=1, max_registers=128)),
    ("pf2 BN64 w2", dict(prefetch=2, num_stages=1, num_warps=2)),
    ("pf2 BN32 w2", dict(prefetch=2, num_stages=1, block_n=32, num_warps=2)),
    ("pf1 splits2 r64", dict(num_splits=2, max_registers=64)),
    ("pf1 BN32 w2 splits2", dict(num_splits=2, block_n=32, num_warps=2)),
]


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    torch.manual_seed(0)
    B, L, hq, hkv, d, bs = 64, 2048, 32, 8, 128, 64
    scale = d ** -0.5
    lens = [L] * B
    nb, tables, _ = tables_for(lens, bs)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = torch.randn(B, hq, d, device=DEV, dtype=torch.bfloat16)
    kc = torch.randn(nb, bs, hkv, d, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    t_bf16 = bench(lambda: paged_decode_triton(q, kc, vc, tables, ctx, scale))
    del kc, vc
    rows = []
    for bits in (8, 4):
        # correctness case: ragged lengths up to 4097, bf16 q (the transposed tile's dtype)
        c_lens = [1, 2048, 777, 4097]
        ck, cv, ctab, _ = quant_cache(c_lens, 64, hkv, d, bits)
        cctx = torch.tensor(c_lens, dtype=torch.int32, device=DEV)
        cq = torch.randn(len(c_lens), hq, d, device=DEV, dtype=torch.bfloat16)
        want = paged_decode_ref(cq.double(), dense(ck), dense(cv), ctab, cctx, scale)
        k, v, _, _ = quant_cache(lens, bs, hkv, d, bits)
        byts = 2 * B * L * hkv * QuantKVCache.bytes_per_row(d, bits)
        for name, kw in VARIANTS:
            try:
                got = paged_decode_quant_triton(cq, ck, cv, ctab, cctx, scale,
                                                out=torch.full_like(cq, float("nan")), **kw)
                e = err(got, want)
                ok = e < 2e-2 and not got.isnan().any().item()
                t = bench(lambda: paged_decode_quant_triton(q, k, v, tables, ctx, scale, **kw))
            except Exception as ex:                             # out of resources
                print(f"  int{bits} {name}: {type(ex).__name__}: {str(ex)[:120]}", flush=True)
                continue
            rows.append((f"int{bits}", name, t * 1e6, byts / t / 1e9, t_bf16 / t, e, ok))
            print(f"  {rows[-1]}", flush=True)
        del k, v, ck, cv
    print(f"\n== paged decode B={B} L={L} {hq}/{hkv} heads d={d} block {bs}, CUDA-graph median; "
          f"bf16 kernel {t_bf16 * 1e6:.1f} us ({2 * B * L * hkv * d * 2 / t_bf16 / 1e9:.0f} GB/s)")
    print(f"  {'kv':<5} {'variant':<30} {'us':>7} {'GB/s':>6} {'x bf16':>7} {'rel err':>8}")
    for kv, name, us, gbs, x, e, ok in rows:
        print(f"  {kv:<5} {name:<30} {us:7.1f} {gbs:6.0f} {x:7.2f} {e:8.1e}{'' if ok else '  FAIL'}")
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

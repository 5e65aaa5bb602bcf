"""One kernel at an acceptance shape, launched a few times, for Nsight Compute to read.

    ncu --clock-control none -k regex:NAME --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats ... python scripts/gpu_ncu_targets.py WHAT

WHAT: decode_bf16 | decode_int8 | decode_int4  (paged_decode, B=64, L=2048, 32/8 heads, d=128,
      block 64: issue 9's point) | w4a16_m1 | w4a16_m16  (K=4096, N=11008, group 128: issue 10's)
      | gemv_m1  (kernels/w4a16_gemv.py at that shape, its tuned config)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

DEV = torch.device("cuda")


def decode(bits: int | None, B=64, L=2048, hq=32, hkv=8, d=128, bs=64):
    from kernels.kv_quant import QuantKVCache
    from kernels.paged_decode import paged_decode_triton
    from kernels.paged_decode_quant import paged_decode_quant_triton
    nb = B * (L // bs)
    tables = torch.randperm(nb, device=DEV).view(B, L // bs).int()
    lens = torch.full((B,), L, dtype=torch.int32, device=DEV)
    q = torch.randn(B, hq, d, device=DEV, dtype=torch.bfloat16)
    if bits is None:
        k = torch.randn(nb, bs, hkv, d, device=DEV, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        return lambda: paged_decode_triton(q, k, v, tables, lens, d ** -0.5)
    k, v = (QuantKVCache.empty(nb, bs, hkv, d, bits, DEV) for _ in range(2))
    for c in (k, v):
        c.data.random_(0, 256)
        c.scale.uniform_(0.01, 0.02)
        c.zero.random_(0, 16) if bits == 4 else c.zero.random_(100, 156)
    return lambda: paged_decode_quant_triton(q, k, v, tables, lens, d ** -0.5)


def w4a16(M: int, K=4096, N=11008, G=128):
    from kernels.w4a16 import pack_int4, w4a16_linear_triton
    qw = pack_int4(torch.randint(0, 16, (N, K), device=DEV, dtype=torch.uint8))
    s = torch.rand(N, K // G, device=DEV, dtype=torch.bfloat16) * 0.01
    z = torch.randint(0, 16, (N, K // G), device=DEV, dtype=torch.uint8)
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    return lambda: w4a16_linear_triton(x, qw, s, z, G)


def gemv(M: int, K=4096, N=11008, G=128):
    from kernels.w4a16 import pack_int4
    from kernels.w4a16_gemv import pack_pairs, w4a16_gemv_triton
    qw = pack_int4(torch.randint(0, 16, (N, K), device=DEV, dtype=torch.uint8))
    s = torch.rand(N, K // G, device=DEV, dtype=torch.bfloat16) * 0.01
    z = torch.randint(0, 16, (N, K // G), device=DEV, dtype=torch.uint8)
    w = pack_pairs(qw, s, z, G)
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    return lambda: w4a16_gemv_triton(x, w)


def main() -> int:
    what = sys.argv[1]
    fn = {"decode_bf16": lambda: decode(None), "decode_int8": lambda: decode(8),
          "decode_int4": lambda: decode(4), "w4a16_m1": lambda: w4a16(1),
          "w4a16_m16": lambda: w4a16(16), "gemv_m1": lambda: gemv(1)}[what]()
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""W4A16 matmul: y = x @ W^T with W stored as 4-bit integers, x and y in 16 (or 32) bits.

Decode is memory-bound: every weight byte is read once per step. Four-bit weights are a
quarter of bf16's bytes, so a linear layer can be up to ~4x faster, provided the weights
are turned back into numbers in registers, right after the load, and never written out.

Storage (one linear layer, N = out_features, K = in_features, G = group size, G | K):

    qweight  (N, K/2) uint8     two 4-bit codes per byte, along K:
                                  byte qweight[n, b], bit 7 ......... bit 0
                                                      [ q[n, 2b+1] | q[n, 2b] ]
                                  low nibble = even k, high nibble = odd k; codes 0..15
    scales   (N, K/G) float     one scale per row and group of G consecutive k
    zeros    (N, K/G) uint8     one integer zero point per row and group, 0..15

    W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]

Rows stay contiguous along K like a torch (out, in) weight, so a column-parallel split takes
rows and a row-parallel split takes columns (a multiple of G) of all three tensors.

The Triton kernel walks K in tiles of BLOCK_K (<= G, or a multiple of G): it loads a
(BLOCK_N, BLOCK_K/2) byte tile, splits each byte into its two nibbles (`& 15`, `>> 4`),
interleaves them back into K order (`tl.join` + reshape), subtracts the zero, multiplies by
the scale in float32, rounds to x's dtype and feeds `tl.dot`. Two launch shapes:

    small M (decode, M <= 16): BLOCK_M = 16 rows of x padded, narrow BLOCK_N, and split-K
        (SPLIT_K programs share the K range of one column block; fp32 partial sums are added
        by a second small kernel) so enough programs stream the weights at once;
    large M (prefill): BLOCK_M x BLOCK_N tiles, no split, like a plain GEMM.

    w4a16_linear_ref(x, qweight, scales, zeros, group_size)     dequantize, then F.linear
    w4a16_linear_triton(...)                                    the kernel (same contract)
    w4a16_linear(...)                                           Triton on CUDA, else the ref
    pack_int4 / unpack_int4 / dequantize_int4                   the layout above, in torch
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import HAS_TRITON, interpreted, require_triton, tl, triton

__all__ = ["pack_int4", "unpack_int4", "dequantize_int4", "w4a16_linear_ref",
           "w4a16_linear_triton", "w4a16_linear", "GROUP_SIZES"]

GROUP_SIZES = (32, 64, 128)


# ---------------------------------------------------------------------------- layout in torch
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) integer codes 0..15 -> qweight (N, K/2) uint8, low nibble = even k."""
    if q.shape[-1] % 2:
        raise ValueError(f"in_features={q.shape[-1]} must be even to pack two codes per byte")
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)                          # (N, K/2)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """qweight (N, K/2) uint8 -> q (N, K) uint8 codes (the inverse of pack_int4)."""
    lo, hi = qweight & 15, qweight >> 4                            # (N, K/2) each
    return torch.stack([lo, hi], dim=-1).flatten(-2)               # (N, K): lo, hi, lo, hi, ...


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(N, K) weight in `dtype` (default: the scales' dtype); arithmetic in float32."""
    q = unpack_int4(qweight).float()                               # (N, K)
    s = scales.float().repeat_interleave(group_size, dim=1)        # (N, K)
    z = zeros.float().repeat_interleave(group_size, dim=1)         # (N, K)
    return ((q - z) * s).to(dtype or scales.dtype)


def w4a16_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
                     **_) -> torch.Tensor:
    """x (..., K) -> (..., N): dequantize the whole weight to x's dtype, then F.linear."""
    return F.linear(x, dequantize_int4(qweight, scales, zeros, group_size, x.dtype), bias)


# ---------------------------------------------------------------------------- Triton
@triton.jit
def _w4a16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, K, K_PER_SPLIT,
                  stride_xm, stride_qn, stride_sn, stride_ym, stride_ysplit,
                  GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    # a tile of BLOCK_K columns covers GPT groups of SUB columns (GPT = 1 when BLOCK_K <= G)
    SUB: tl.constexpr = BLOCK_K if BLOCK_K < GROUP else GROUP
    GPT: tl.constexpr = BLOCK_K // SUB
    pid_n, pid_m, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                    # (BM,) rows of x
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                    # (BN,) output features
    m_ok, n_ok = m < M, n < N
    n64 = n.to(tl.int64)
    kb = tl.arange(0, BLOCK_K // 2)                                # (BK/2,) bytes of a tile
    kx = tl.arange(0, BLOCK_K)                                     # (BK,) columns of a tile
    gi = tl.arange(0, GPT)                                         # (GPT,) groups of a tile
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_begin = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        # packed weights: (BN, BK/2) bytes -> two (BN, BK/2) nibble planes -> (BN, BK) codes
        b_ok = (k0 // 2 + kb) < K // 2
        packed = tl.load(qw_ptr + n64[:, None] * stride_qn + (k0 // 2 + kb)[None, :],
                         mask=n_ok[:, None] & b_ok[None, :], other=0)
        lo = (packed & 15).to(tl.int32)
        hi = ((packed >> 4) & 15).to(tl.int32)
        q = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))        # (BN, BK) in K order
        # the tile's GPT groups: scale and zero per (row, group), broadcast over SUB columns
        g = k0 // GROUP + gi                                       # (GPT,)
        g_ok = n_ok[:, None] & (g < K // GROUP)[None, :]
        s = tl.load(s_ptr + n64[:, None] * stride_sn + g[None, :], mask=g_ok, other=0.0)
        z = tl.load(z_ptr + n64[:, None] * stride_sn + g[None, :], mask=g_ok, other=0)
        q3 = tl.reshape(q, (BLOCK_N, GPT, SUB))                    # (BN, GPT, SUB)
        w3 = (q3 - z.to(tl.int32)[:, :, None]).to(tl.float32) * s.to(tl.float32)[:, :, None]
        w = tl.reshape(w3, (BLOCK_N, BLOCK_K)).to(x_ptr.dtype.element_ty)   # (BN, BK)
        x = tl.load(x_ptr + m[:, None] * stride_xm + (k0 + kx)[None, :],
                    mask=m_ok[:, None] & ((k0 + kx) < K)[None, :], other=0.0)  # (BM, BK)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")  # fp32: no TF32 rounding
        else:
            acc += tl.dot(x, tl.trans(w))                          # (BM, BN) fp32
    y = y_ptr + pid_s.to(tl.int64) * stride_ysplit + m[:, None] * stride_ym + n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_splits_kernel(p_ptr, b_ptr, y_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr):
    """y (M, N) = sum over splits of the fp32 partials (SPLIT_K, M, N) (+ bias), rounded once."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < MN
    acc = tl.zeros([BLOCK], tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(p_ptr + s * MN + i, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + i % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=ok)


SMALL_M = 16        # up to this many rows: the split-K decode shape


def _config(M: int, N: int, K: int, group: int) -> dict:
    """Tile sizes. The interpreter gets small tiles; GPU values are a starting point that
    scripts/gpu_w4a16.py sweeps on an H100 (docs/PERF.md records the result)."""
    if interpreted():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=min(group, 64), SPLIT_K=1, num_warps=1,
                    num_stages=1)
    if M <= SMALL_M:
        bn = 32 if N >= 8192 else 16
        tiles = triton.cdiv(N, bn)
        # enough programs to keep every SM streaming (~4 per SM on 132 SMs), K tiles >= 4 each
        split = max(1, min(16, 512 // tiles, K // (4 * 128)))
        return dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=split, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, num_warps=8, num_stages=3)


def check_int4_shapes(K: int, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int) -> int:
    """Raise ValueError unless the three tensors fit x's K and the group size; return N."""
    N = qweight.shape[0]
    if group_size not in GROUP_SIZES or K % group_size:
        raise ValueError(f"group_size={group_size} is not allowed for in_features={K}: it must "
                         f"be one of {GROUP_SIZES} and divide in_features")
    want = {"qweight": ((N, K // 2), torch.uint8), "scales": ((N, K // group_size), None),
            "zeros": ((N, K // group_size), torch.uint8)}
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        shape, dtype = want[name]
        if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
            raise ValueError(f"{name} has shape {tuple(t.shape)} {t.dtype}; expected {shape}"
                             f"{' ' + str(dtype) if dtype else ''} for in_features={K}")
    return N


def w4a16_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
                        out: torch.Tensor | None = None, **config) -> torch.Tensor:
    """Same contract as `w4a16_linear_ref`. `out` (M, N) may be given (tests poison it);
    keyword `config` overrides tile sizes (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, ...)."""
    require_triton()
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)                                          # (M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    N = check_int4_shapes(K, qweight, scales, zeros, group_size)
    cfg = {**_config(M, N, K, group_size), **config}
    bm, bn, bk, split = (cfg.pop(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"))
    if not (bk % group_size == 0 or group_size % bk == 0) or bk < 16:
        raise ValueError(f"BLOCK_K={bk} must be >= 16 and divide or be a multiple of "
                         f"group_size={group_size}")
    y = out if out is not None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*lead, N)
    k_per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk      # a whole number of tiles
    split = triton.cdiv(K, k_per_split)
    direct = split == 1 and bias is None
    dst = y if direct else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm), split)
    _w4a16_kernel[grid](x2, qweight, scales, zeros, dst, M, N, K, k_per_split,
                        x2.stride(0), qweight.stride(0), scales.stride(0),
                        dst.stride(-2), dst.stride(0) if not direct else 0,
                        GROUP=group_size, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                        IEEE=x.dtype == torch.float32, **cfg)
    if not direct:
        block = 1024 if not interpreted() else 256
        _sum_splits_kernel[(triton.cdiv(M * N, block),)](
            dst, bias if bias is not None else dst, y, M * N, N, SPLIT_K=split,
            HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return y.view(*lead, N)


def w4a16_linear(x, qweight, scales, zeros, group_size, bias=None):
    """The kernel on CUDA tensors (when Triton is installed), the reference elsewhere."""
    if x.is_cuda and HAS_TRITON:
        return w4a16_linear_triton(x, qweight, scales, zeros, group_size, bias)
    return w4a16_linear_ref(x, qweight, scales, zeros, group_size, bias)

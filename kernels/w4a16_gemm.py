"""W4A16 for many rows (prefill, large decode batches): the weight is the MMA's left operand.

kernels/w4a16.py computes y = x W^T with the weight tile as the *right* operand of `tl.dot`.
On a Hopper GPU the right operand of a warpgroup MMA (wgmma) must sit in shared memory, so
every dequantized weight tile was written there and read back, and the per-group scaling of
the factored path forced a wait on each MMA before the next could start: at M = 256 that kernel
ran at 0.2x of cuBLAS bf16 (docs/PERF.md). Here the product is computed transposed,

    y^T (N, M) = W (N, K) x^T (K, M)

so the weight tile is the *left* operand, which wgmma reads straight from registers (the
weight as the right operand, staged in shared memory, lost at every M in the H200 sweep): codes are
loaded, dequantized in registers and multiplied without a round trip through shared memory,
and x^T (the activations, 16-bit, loaded as they are) is the operand that the pipeliner
streams into shared memory. Scale and zero are applied to every weight element,
W = (q - z) * s in float32 rounded to x's dtype (the reference's exact numbers), so the
accumulator is never rescaled and the MMAs of consecutive K tiles chain.

Layout: the one of kernels/w4a16.py (qweight (N, K/2) uint8, units of 32 columns, low nibble =
column j, high nibble = column j + 16 of the unit; scales (N, K/G); zeros (N, K/G) uint8).
A K tile of BLOCK_K columns is read as its two nibble planes, each (BLOCK_N, BLOCK_K/2), and
each plane meets the matching rows of x^T, which come in runs of 16 consecutive columns.

Past a few hundred rows the product is compute-bound and cuBLAS's GEMM is hard to match from
Triton with the dequantization in its main loop (measured on an H200, docs/PERF.md): there the
weight is dequantized once into a scratch tensor by a streaming kernel and multiplied by
F.linear, which reads 4 more bytes per weight than W4A16 ideally does, a cost that shrinks
with every row.

    w4a16_gemm_triton(x, qweight, scales, zeros, group_size, bias=None, out=None, **config)
        same contract as kernels.w4a16.w4a16_linear_ref
    dequantize_int4_triton(qweight, scales, zeros, group_size, dtype)
        (N, K) weight, equal to kernels.w4a16.dequantize_int4 (bit for bit)
    w4a16_dequant_linear(x, qweight, scales, zeros, group_size, bias=None)
        dequantize_int4_triton, then F.linear: equal to w4a16_linear_ref
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import interpreted, num_sms, require_triton, tl, triton
from kernels.w4a16 import (MAGIC_OFF, check_int4_shapes, launch_args, load_int4_tile,
                           split_k_plan, sum_splits)

__all__ = ["w4a16_gemm_triton", "gemm_config", "dequantize_int4_triton", "w4a16_dequant_linear"]


@triton.jit
def _dequantize(codes, z, s, dtype: tl.constexpr, OFF: tl.constexpr):
    """codes (BN, H) uint8, z uint8 and s (BN, 1 | H) -> (q - z) * s in `dtype`, equal to the
    reference's float32 arithmetic rounded once (q - z is a small exact integer, so one
    rounding of the exact product either way), without an int->float instruction:
      OFF = 128 / 1024 (bf16 / fp16 x): OFF | q read as a 16-bit float is OFF + q exactly;
        (OFF + q) - (OFF + z) in 16 bits is exact, times s rounds once;
      OFF = 0 (fp32 x): 0x4B000000 | q is the float 2^23 + q, the same way in 32 bits."""
    if OFF == 0:
        zf = z.to(tl.float32) + 8388608.0
        qf = (codes.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
        return (qf - zf) * s.to(tl.float32)
    magic: tl.constexpr = 0x4300 if OFF == 128 else 0x6400
    q16 = (codes.to(tl.int16) | magic).to(dtype, bitcast=True)            # OFF + q
    z16 = (z.to(tl.int16) | magic).to(dtype, bitcast=True)                # OFF + z
    return (q16 - z16) * s.to(dtype)


@triton.jit
def _w4a16_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, K, K_PER_SPLIT,
                       stride_xm, stride_qn, stride_sn, stride_ym, stride_ysplit,
                       GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr, IEEE: tl.constexpr, OFF: tl.constexpr):
    HALF: tl.constexpr = BLOCK_K // 2                          # bytes of a tile per weight row
    # the M tiles of one N tile run next to each other: its weight tile is read from HBM
    # once and from L2 after that; x (M x K, small) stays in L2 for the whole launch
    pid, pid_s = tl.program_id(0), tl.program_id(1)
    m_tiles = tl.cdiv(M, BLOCK_M)
    pid_n, pid_m = pid // m_tiles, pid % m_tiles
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                # (BN,) output features
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                # (BM,) rows of x
    n_ok, m_ok = n < N, m < M
    n64 = n.to(tl.int64)
    j = tl.arange(0, HALF)                                     # (HALF,) bytes of a tile
    col = 32 * (j // 16) + j % 16                              # (HALF,) low nibble's column
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)             # y^T tile
    k_begin = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        packed, s, z, k_ok = load_int4_tile(qw_ptr, s_ptr, z_ptr, n64, n_ok, j, col, k0, k_end,
                                            stride_qn, stride_sn, GROUP, BLOCK_K)
        # a unit's two nibbles share a group (G >= 32), so one scale and zero serve both planes
        w_lo = _dequantize(packed & 15, z, s, x_ptr.dtype.element_ty, OFF)   # (BN, HALF)
        w_hi = _dequantize(packed >> 4, z, s, x_ptr.dtype.element_ty, OFF)
        xt = x_ptr + m[None, :] * stride_xm + (k0 + col)[:, None]         # (HALF, BM) x^T
        x_ok = k_ok[:, None] & m_ok[None, :]
        xt_lo = tl.load(xt, mask=x_ok, other=0.0)              # columns of the low nibbles
        xt_hi = tl.load(xt + 16, mask=x_ok, other=0.0)         # and of the high ones
        if IEEE:                                               # fp32 x: no TF32 rounding
            acc += tl.dot(w_lo, xt_lo, input_precision="ieee")
            acc += tl.dot(w_hi, xt_hi, input_precision="ieee")
        else:
            acc = tl.dot(w_lo, xt_lo, acc)                     # (BN, BM) fp32
            acc = tl.dot(w_hi, xt_hi, acc)
    y = y_ptr + pid_s.to(tl.int64) * stride_ysplit + m[None, :] * stride_ym + n[:, None]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


def gemm_config(M: int, N: int, K: int, group: int) -> dict:
    """Tile sizes: the winners of scripts/gpu_w4a16_gemm.py's sweep on an H200 (docs/PERF.md);
    the interpreter gets small tiles. BLOCK_M is the MMA's N side: at least 16."""
    if interpreted():
        return dict(BLOCK_N=16, BLOCK_M=16, BLOCK_K=min(group, 64), SPLIT_K=None,
                    num_warps=1, num_stages=1)
    if M <= 16:
        bk = 128 if group >= 128 else group * (128 // group)    # one group or whole groups
        return dict(BLOCK_N=128, BLOCK_M=16, BLOCK_K=bk, SPLIT_K=None, num_warps=4, num_stages=3)
    # BLOCK_M = 64 and split-K (None: the launcher's choice) at every M. Not 128: with 8 warps
    # that tile computed wrong results on the H200 under Triton 3.6 (the interpreter agreed
    # with float64: a compiler issue with the register operand), and from 128 rows on
    # w4a16_linear dequantizes + calls cuBLAS instead, which was as fast or faster there.
    return dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=64, SPLIT_K=None, num_warps=8, num_stages=3)


def _split_k(M: int, N: int, K: int, bn: int, bm: int, bk: int, device) -> int:
    """Enough programs for two per SM when the output has few tiles (M = 64: N / 128 tiles),
    each split at least two K tiles long."""
    tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
    return max(1, min(K // (2 * bk), triton.cdiv(2 * num_sms(device), tiles)))


def w4a16_gemm_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                      zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, **config) -> torch.Tensor:
    """x (..., K) -> (..., N), the contract of `w4a16_linear_ref`. `out` (M, N) may be given
    (tests poison it); keyword `config` overrides BLOCK_N, BLOCK_M, BLOCK_K, SPLIT_K, warps."""
    require_triton()
    cfg = {**gemm_config(x.numel() // x.shape[-1], qweight.shape[0], x.shape[-1], group_size),
           **config}
    lead, x2, M, N, K, bm, bn, bk, split = launch_args(x, qweight, scales, zeros, group_size, cfg)
    off = MAGIC_OFF.get(x.dtype, 0)                            # see _dequantize
    y = out if out is not None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*lead, N)
    k_per_split, split, dst = split_k_plan(y, K, bk, split or _split_k(M, N, K, bn, bm, bk, x.device),
                                           bias)
    grid = (triton.cdiv(N, bn) * triton.cdiv(M, bm), split)
    _w4a16_gemm_kernel[grid](x2, qweight, scales, zeros, dst, M, N, K, k_per_split,
                             x2.stride(0), qweight.stride(0), scales.stride(0),
                             dst.stride(-2), dst.stride(0) if dst is not y else 0,
                             GROUP=group_size, BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk,
                             IEEE=x.dtype == torch.float32, OFF=off, **cfg)
    sum_splits(dst, y, bias)
    return y.view(*lead, N)


# ---------------------------------------------------------------------------- dequantize once
@triton.jit
def _dequantize_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, stride_qn, stride_sn, stride_wn,
                       GROUP: tl.constexpr, BLOCK_N: tl.constexpr, OFF: tl.constexpr):
    """One program: BLOCK_N rows x one group of columns, so one scale and zero per row."""
    HALF: tl.constexpr = GROUP // 2
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)     # (BN,)
    g = tl.program_id(1)                                       # group = K tile
    j = tl.arange(0, HALF)                                     # (HALF,) bytes
    col = g * GROUP + 32 * (j // 16) + j % 16                  # (HALF,) low nibble's column
    n_ok = n < N
    n64 = n.to(tl.int64)
    packed = tl.load(qw_ptr + n64[:, None] * stride_qn + (g * HALF + j)[None, :],
                     mask=n_ok[:, None], other=0)              # (BN, HALF) uint8
    s = tl.load(s_ptr + n64 * stride_sn + g, mask=n_ok, other=0.0)[:, None]   # (BN, 1)
    z = tl.load(z_ptr + n64 * stride_sn + g, mask=n_ok, other=0)[:, None]
    dst = w_ptr + n64[:, None] * stride_wn + col[None, :]
    ty = w_ptr.dtype.element_ty
    tl.store(dst, _dequantize(packed & 15, z, s, ty, OFF), mask=n_ok[:, None])
    tl.store(dst + 16, _dequantize(packed >> 4, z, s, ty, OFF), mask=n_ok[:, None])


def dequantize_int4_triton(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) weight in `dtype`: (q - z) * s rounded once, as kernels.w4a16.dequantize_int4."""
    require_triton()
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    w = torch.empty((N, K), dtype=dtype, device=qweight.device)
    bn = 16 if interpreted() else 8192 // group_size            # 8192 weights per program
    off = MAGIC_OFF.get(dtype, 0)
    _dequantize_kernel[(triton.cdiv(N, bn), K // group_size)](
        qweight, scales, zeros, w, N, K, qweight.stride(0), scales.stride(0), w.stride(0),
        GROUP=group_size, BLOCK_N=bn, OFF=off, num_warps=4)
    return w


def w4a16_dequant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                         zeros: torch.Tensor, group_size: int,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N): the whole weight dequantized into a scratch tensor, then F.linear
    (cuBLAS on a GPU). Bit for bit w4a16_linear_ref, faster for many rows."""
    check_int4_shapes(x.shape[-1], qweight, scales, zeros, group_size)
    return F.linear(x, dequantize_int4_triton(qweight, scales, zeros, group_size, x.dtype), bias)

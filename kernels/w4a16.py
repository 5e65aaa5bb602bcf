"""W4A16 matmul: y = x @ W^T with W stored as 4-bit integers, x and y in 16 (or 32) bits.

Decode is memory-bound: every weight byte is read once per step. Four-bit weights are a
quarter of bf16's bytes, so a linear layer can be up to ~4x faster, provided the weights
are turned back into numbers in registers, right after the load, and never written out.

Storage (one linear layer, N = out_features, K = in_features, G = group size, G | K):

    qweight  (N, K/2) uint8     two 4-bit codes per byte, in units of 32 columns (16 bytes):
                                  byte 16u + j of a row (u = unit, 0 <= j < 16),
                                  bit 7 ............... 4 | 3 ............... 0
                                  [  q[n, 32u + 16 + j]   |   q[n, 32u + j]   ]
                                  low nibbles: the unit's first 16 columns, high nibbles:
                                  its last 16; codes 0..15. K must be a multiple of 32.
    scales   (N, K/G) float     one scale per row and group of G consecutive k
    zeros    (N, K/G) uint8     one integer zero point per row and group, 0..15

    W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]

Rows stay contiguous along K like a torch (out, in) weight, and a unit never straddles a group
(G >= 32), so a column-parallel split takes rows and a row-parallel split takes columns (a
multiple of G) of all three tensors.

Why units of 32 and not "low nibble = even k": the kernel reads a byte tile as two planes,
the low nibbles and the high nibbles, and multiplies each by the matching columns of x. With
this layout those columns come in runs of 16 (32 bytes of bf16), which load as vectors; with
even/odd packing they would be every other element, or the nibbles would have to be
interleaved back into K order in registers. Both measured slower on the H100 (docs/PERF.md).

The Triton kernel walks K in tiles of BLOCK_K columns (a multiple of 32): it loads the
(BLOCK_N, BLOCK_K/2) byte tile, splits it into the two nibble planes (`& 15`, `>> 4`),
dequantizes each in registers, (q - z) * s in float32 rounded to x's dtype (the scale and zero
of each byte's group: one (BLOCK_N,) vector when the tile lies inside one group), and feeds
both planes with their halves of x to `tl.dot`. When x is 16-bit and the tile lies inside
one group (the factored path, the default for group 64/128), no element is dequantized: the
code q is OR'd into the exponent bits of a 16-bit float, which then reads OFF + q exactly
(bf16 0x4300 | q = 128 + q, fp16 0x6400 | q = 1024 + q), that goes into the dot, and scale and
zero are applied once per (row, column) of the result:
    sum_k x_k (q_k - z) s = s * (x . (OFF + q) - (OFF + z) * sum_k x_k)
One kernel, two launch shapes:

    small M (M <= 16): x padded to BLOCK_M = 16 rows for the tensor cores, and split-K
        (SPLIT_K programs share the K range of one column block; fp32 partial sums are added
        by a second small kernel) so enough programs stream the weights at once;
    large M: BLOCK_M x BLOCK_N tiles, no split, like a plain GEMM.

Which path runs (`w4a16_linear`, on CUDA): the engine sends decode batches of 1-4 rows to the
CUDA-core GEMV of kernels/w4a16_gemv.py; this kernel takes what else has fewer than
GEMM_MIN_ROWS rows; kernels/w4a16_gemm.py the rest (the weight as the MMA's left operand, or
dequantize + cuBLAS from DEQUANT_MIN_ROWS rows), each faster there on an H200 (docs/PERF.md).

    w4a16_linear_ref(x, qweight, scales, zeros, group_size)     dequantize, then F.linear
    w4a16_linear_triton(...)                                    the kernel (same contract)
    w4a16_linear(...)                                           Triton on CUDA, else the ref
    pack_int4 / unpack_int4 / dequantize_int4                   the layout above, in torch
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import HAS_TRITON, interpreted, num_sms, require_triton, tl, triton

__all__ = ["pack_int4", "unpack_int4", "dequantize_int4", "w4a16_linear_ref",
           "w4a16_linear_triton", "w4a16_linear", "GROUP_SIZES"]

GROUP_SIZES = (32, 64, 128)


# ---------------------------------------------------------------------------- layout in torch
UNIT = 32           # columns per packing unit (the layout above)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) integer codes 0..15 -> qweight (N, K/2) uint8 in the layout above."""
    N, K = q.shape
    if K % UNIT:
        raise ValueError(f"in_features={K} must be a multiple of {UNIT} to pack int4 weights")
    u = q.to(torch.uint8).view(N, K // UNIT, 2, UNIT // 2)          # (N, units, lo/hi, 16)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(N, K // 2)     # (N, K/2)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """qweight (N, K/2) uint8 -> q (N, K) uint8 codes (the inverse of pack_int4)."""
    N, B = qweight.shape
    p = qweight.view(N, B // (UNIT // 2), UNIT // 2)                # (N, units, 16)
    return torch.stack([p & 15, p >> 4], dim=2).reshape(N, 2 * B)   # (N, K)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(N, K) weight in `dtype` (default: the scales' dtype); arithmetic in float32. Groups
    are broadcast, not repeated: no (N, K) copies of the scales and zeros."""
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    q = unpack_int4(qweight).view(N, K // group_size, group_size).float()     # (N, K/G, G)
    w = (q - zeros.float()[..., None]) * scales.float()[..., None]           # (N, K/G, G)
    return w.view(N, K).to(dtype or scales.dtype)


def w4a16_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
                     **_) -> torch.Tensor:
    """x (..., K) -> (..., N): dequantize the whole weight to x's dtype, then F.linear."""
    return F.linear(x, dequantize_int4(qweight, scales, zeros, group_size, x.dtype), bias)


# ---------------------------------------------------------------------------- Triton
@triton.jit
def load_int4_tile(qw_ptr, s_ptr, z_ptr, n64, n_ok, j, col, k0, k_end, stride_qn, stride_sn,
                   GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """The K tile at k0 of weight rows n64 (BN,) (n_ok: rows < N; j, col (BK/2,): a tile's
    bytes and their low nibbles' columns) -> packed codes (BN, BK/2) uint8; scales and zeros
    as stored, (BN, 1) when the tile lies inside one group, else (BN, BK/2), each byte's own
    (a unit's two nibbles share a group: G >= 32); k_ok (BK/2,): bytes before k_end."""
    k_ok = (k0 + col) < k_end                                      # (HALF,) whole units
    w_ok = n_ok[:, None] & k_ok[None, :]
    packed = tl.load(qw_ptr + n64[:, None] * stride_qn + (k0 // 2 + j)[None, :],
                     mask=w_ok, other=0)                           # (BN, HALF) uint8
    if BLOCK_K <= GROUP:                                           # the tile is in one group
        g = n64 * stride_sn + k0 // GROUP                          # (BN,)
        s = tl.load(s_ptr + g, mask=n_ok, other=0.0)[:, None]
        z = tl.load(z_ptr + g, mask=n_ok, other=0)[:, None]
    else:                                                          # each byte's own group
        g = n64[:, None] * stride_sn + ((k0 + col) // GROUP)[None, :]   # (BN, HALF)
        s = tl.load(s_ptr + g, mask=w_ok, other=0.0)
        z = tl.load(z_ptr + g, mask=w_ok, other=0)
    return packed, s, z, k_ok


@triton.jit
def _w4a16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, K, K_PER_SPLIT,
                  stride_xm, stride_qn, stride_sn, stride_ym, stride_ysplit,
                  GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, IEEE: tl.constexpr, MAGIC: tl.constexpr,
                  DOT: tl.constexpr, FACTORED: tl.constexpr, OFF: tl.constexpr):
    HALF: tl.constexpr = BLOCK_K // 2                              # bytes of a tile per row
    pid_n, pid_m, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                    # (BM,) rows of x
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                    # (BN,) output features
    m_ok, n_ok = m < M, n < N
    n64 = n.to(tl.int64)
    j = tl.arange(0, HALF)                                         # (HALF,) bytes of a tile
    col = 32 * (j // 16) + j % 16                                  # (HALF,) low nibble's column
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_begin = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        packed, s, z, k_ok = load_int4_tile(qw_ptr, s_ptr, z_ptr, n64, n_ok, j, col, k0, k_end,
                                            stride_qn, stride_sn, GROUP, BLOCK_K)
        s, z = s.to(tl.float32), z.to(tl.float32)
        lo = packed & 15
        hi = packed >> 4
        if FACTORED:  # 16-bit x, tile inside one group: codes straight into the dot (below)
            # (OFF | q) read as x's 16-bit float is exactly OFF + q: OFF = 128 for bf16 (bits
            # 0x4300), 1024 for fp16 (0x6400); one OR per code, no conversion, no scale here
            magic: tl.constexpr = 0x4300 if OFF == 128 else 0x6400
            lo_w = (lo.to(tl.int16) | magic).to(x_ptr.dtype.element_ty, bitcast=True)
            hi_w = (hi.to(tl.int16) | magic).to(x_ptr.dtype.element_ty, bitcast=True)
        elif MAGIC:     # int -> float without a conversion instruction: 2^23 + q from its bits
            lo_f = (lo.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            hi_f = (hi.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        else:
            lo_f = lo.to(tl.float32)
            hi_f = hi.to(tl.float32)
        xp = x_ptr + m[:, None] * stride_xm + (k0 + col)[None, :]
        x_ok = m_ok[:, None] & k_ok[None, :]
        x_lo = tl.load(xp, mask=x_ok, other=0.0)                   # (BM, HALF) runs of 16
        x_hi = tl.load(xp + 16, mask=x_ok, other=0.0)
        if FACTORED:  # sum_k x (q - z) s = s * (x . (OFF + q) - (OFF + z) * sum_k x)
            part = tl.dot(x_lo, tl.trans(lo_w)) + tl.dot(x_hi, tl.trans(hi_w))   # (BM, BN)
            xs = tl.sum(x_lo.to(tl.float32) + x_hi.to(tl.float32), 1)              # (BM,)
            acc += tl.reshape(s, (BLOCK_N,))[None, :] * (
                part - xs[:, None] * (tl.reshape(z, (BLOCK_N,)) + OFF)[None, :])
        elif not DOT:   # a few rows (decode): FMAs on CUDA cores, no tensor-core staging
            x_lo = x_lo.to(tl.float32)
            x_hi = x_hi.to(tl.float32)
            if BLOCK_K <= GROUP:   # s * (sum q x - z sum x): 2 ops per code instead of 4
                qx = tl.sum(lo_f[None, :, :] * x_lo[:, None, :], 2)
                qx += tl.sum(hi_f[None, :, :] * x_hi[:, None, :], 2)      # (BM, BN)
                xs = tl.sum(x_lo + x_hi, 1)                                # (BM,)
                acc += tl.reshape(s, (BLOCK_N,))[None, :] * (
                    qx - xs[:, None] * tl.reshape(z, (BLOCK_N,))[None, :])
            else:
                acc += tl.sum(((lo_f - z) * s)[None, :, :] * x_lo[:, None, :], 2)
                acc += tl.sum(((hi_f - z) * s)[None, :, :] * x_hi[:, None, :], 2)
        else:         # tensor cores: dequantize both planes to x's dtype, two dots
            w_lo = ((lo_f - z) * s).to(x_ptr.dtype.element_ty)     # (BN, HALF)
            w_hi = ((hi_f - z) * s).to(x_ptr.dtype.element_ty)
            if IEEE:                                               # fp32: no TF32 rounding
                acc += tl.dot(x_lo, tl.trans(w_lo), input_precision="ieee")
                acc += tl.dot(x_hi, tl.trans(w_hi), input_precision="ieee")
            else:
                acc += tl.dot(x_lo, tl.trans(w_lo))                # (BM, BN) fp32
                acc += tl.dot(x_hi, tl.trans(w_hi))
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
    """Tile sizes: the winners of scripts/gpu_w4a16.py's sweep on an H200 (docs/PERF.md);
    the interpreter gets small tiles."""
    if interpreted():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=min(group, 64), SPLIT_K=1, num_warps=1,
                    num_stages=1)
    bk = 128 if group >= 128 else group * (128 // group)           # one group or whole groups
    if M <= SMALL_M:
        # tiles inside one group take the factored path (codes straight into the dot)
        bk = min(group, 128) if group >= 64 else bk
        bn = 128 if N >= 8192 else 64                  # the H200 sweep's winners (docs/PERF.md)
        tiles = triton.cdiv(N, bn)
        # enough programs that every SM streams several tiles at once (0.5 waves measured
        # 0.8 TB/s on an H200, ncu), each split at least 2 K tiles long
        split = max(1, min(K // (2 * bk), triton.cdiv(4 * num_sms(), tiles)))
        return dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=3)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64 if N < 8192 else 128, BLOCK_K=bk, SPLIT_K=2,
                    num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=bk, SPLIT_K=1, num_warps=4, num_stages=3)


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


MAGIC_OFF = {torch.bfloat16: 128, torch.float16: 1024}   # OFF | q read as that 16-bit float = OFF + q


def launch_args(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, cfg: dict):
    """What every W4A16 launcher starts with: x as (M, K) rows with unit stride, N checked
    against the weight tensors, and the tile (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, popped from
    cfg) checked against the group. -> (lead dims, x2, M, N, K, bm, bn, bk, split)."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)                                          # (M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    N = check_int4_shapes(K, qweight, scales, zeros, group_size)
    bm, bn, bk, split = (cfg.pop(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"))
    if bk % UNIT or not (bk % group_size == 0 or group_size % bk == 0):
        raise ValueError(f"BLOCK_K={bk} must be a multiple of {UNIT} and divide or be a "
                         f"multiple of group_size={group_size}")
    return lead, x2, x2.shape[0], N, K, bm, bn, bk, split


def w4a16_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
                        out: torch.Tensor | None = None, **config) -> torch.Tensor:
    """Same contract as `w4a16_linear_ref`. `out` (M, N) may be given (tests poison it);
    keyword `config` overrides tile sizes (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, ...)."""
    require_triton()
    rows = x.numel() // x.shape[-1]
    cfg = {"MAGIC": True, "DOT": True,
           **_config(rows, qweight.shape[0], x.shape[-1], group_size), **config}
    lead, x2, M, N, K, bm, bn, bk, split = launch_args(x, qweight, scales, zeros, group_size, cfg)
    # the factored path: 16-bit x on tensor cores, every K tile inside one group
    off = MAGIC_OFF.get(x.dtype, 0)
    factored = cfg.pop("FACTORED", True) and cfg["DOT"] and off > 0 and bk <= group_size
    y = out if out is not None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*lead, N)
    k_per_split, split, dst = split_k_plan(y, K, bk, split, bias)
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm), split)
    _w4a16_kernel[grid](x2, qweight, scales, zeros, dst, M, N, K, k_per_split,
                        x2.stride(0), qweight.stride(0), scales.stride(0),
                        dst.stride(-2), dst.stride(0) if dst is not y else 0,
                        GROUP=group_size, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                        IEEE=x.dtype == torch.float32, FACTORED=factored, OFF=off, **cfg)
    sum_splits(dst, y, bias)
    return y.view(*lead, N)


def split_k_plan(y: torch.Tensor, K: int, bk: int, split: int, bias) -> tuple:
    """-> (k_per_split, split, dst): K cut into `split` ranges of whole BLOCK_K tiles (fewer
    if they do not all fill), and where the kernel writes: y itself when there is one range
    and no bias, else fp32 partials (split, M, N) for sum_splits."""
    k_per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk      # a whole number of tiles
    split = triton.cdiv(K, k_per_split)
    if split == 1 and bias is None:
        return k_per_split, split, y
    return k_per_split, split, torch.empty((split, *y.shape), dtype=torch.float32, device=y.device)


def sum_splits(dst: torch.Tensor, y: torch.Tensor, bias) -> None:
    """y = sum of split_k_plan's partials (+ bias), rounded once; nothing if dst is y."""
    if dst is y:
        return
    M, N = y.shape
    block = 1024 if not interpreted() else 256
    _sum_splits_kernel[(triton.cdiv(M * N, block),)](
        dst, bias if bias is not None else dst, y, M * N, N, SPLIT_K=dst.shape[0],
        HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)


GEMM_MIN_ROWS = 5         # from here kernels/w4a16_gemm.py's GEMM (weight as the left operand)
DEQUANT_MIN_ROWS = 128    # from here dequantize once + cuBLAS (H200 measurements, docs/PERF.md)


def w4a16_linear(x, qweight, scales, zeros, group_size, bias=None):
    """On CUDA tensors (when Triton is installed) the fastest path for the row count: this
    file's split-K kernel, then w4a16_gemm's GEMM, then dequantize + cuBLAS; the reference
    elsewhere. (The engine sends decode batches of 1-4 rows to kernels/w4a16_gemv.py first.)"""
    if x.is_cuda and HAS_TRITON:
        rows = x.numel() // x.shape[-1]
        if rows >= GEMM_MIN_ROWS:
            from kernels.w4a16_gemm import w4a16_dequant_linear, w4a16_gemm_triton
            fn = w4a16_dequant_linear if rows >= DEQUANT_MIN_ROWS else w4a16_gemm_triton
            return fn(x, qweight, scales, zeros, group_size, bias)
        return w4a16_linear_triton(x, qweight, scales, zeros, group_size, bias)
    return w4a16_linear_ref(x, qweight, scales, zeros, group_size, bias)

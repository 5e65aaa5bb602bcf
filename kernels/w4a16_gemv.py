"""W4A16 matrix-vector product for decode batches of 1-4 rows, on CUDA cores, no tensor cores.

At batch 1-4 a linear layer reads every weight once and does 1-4 multiply-adds with it: the
time should be the weight bytes over the memory bandwidth. The tensor-core kernel of
kernels/w4a16.py pads x to 16 rows and stages each code tile through shared memory into the
operand layout; on an H200 that ran at 0.55-0.8 TB/s of int4 bytes, slower than cuBLAS reading
4x the bytes in bf16 (docs/PERF.md). Here each thread turns the codes it loaded into numbers in
its own registers and multiplies them with x: no shared memory for the weights, no padding, one
reduction across threads per program at the very end.

What bounds such a kernel is instructions per code: at M = 1 an H200 must retire ~1 warp
instruction per 8 codes and SM cycle to keep up with its memory. So the arithmetic runs on
*pairs* of bfloat16 packed in one 32-bit register (Hopper's `fma.rn.bf16x2`), and the layout
puts two codes exactly where one and-or makes such a pair of them.

Layout ("pairs"; made once at load from the stored layout of kernels/w4a16.py, same bytes):

    qpairs   (N, K/8) int32     word j of a row holds the 8 codes of columns 8j .. 8j+7:
                                    bits  4i .. 4i+3    q[n, 8j + 2i]        (i = 0..3)
                                    bits 16+4i .. 19+4i q[n, 8j + 2i + 1]
                                so (word >> 4i) & 0x000F000F | 0x43004300 is the bfloat16 pair
                                (128 + q[8j+2i], 128 + q[8j+2i+1]): bf16 128.0 is 0x4300 and
                                its mantissa step is 1. x, read as int32, pairs the same columns:
                                x32[4j + i] = (x[8j+2i] low half, x[8j+2i+1] high half).
    scales_t (K/G, N) float32   the stored (N, K/G) scales and zeros transposed, so a block of
    zeros_t  (K/G, N) int32     rows reads one coalesced run per group. (In 32 bits, as measured:
                                8 bytes per row and group beside 64 of codes at G = 128; bf16
                                and uint8 copies would read 7% fewer bytes, not yet measured.)

Per word (8 codes) and row of x, in inline PTX (`_asm`):
    3 shifts + 4 lop3       the four pairs 128 + q, exact
    4 bf16x2 fma            d = (128 + q) - (128 + z) = q - z, exact (small integers)
    4 bf16x2 fma            the 8 products x d, summed into the pair's 2 lanes
    3                       the lanes widened to float32 (a shift, an and) and added
and one float32 FMA with the group's scale into the per-word accumulator: about 3 SASS
instructions per code at M = 1 (the "planes" layout this replaced, float32 FMAs, 4.7; compiled
for sm_90). The products and the 4-term lane sums are rounded to bfloat16: an error of the size
of the reference's own rounding of each dequantized weight to bf16, then float32 from the word
on. x in float16/float32, and the interpreter (which runs no PTX), take the same sum in float32
Triton operations (`ASM=False`).

Split-K without a second launch: with SPLIT > 1 the K groups are shared by SPLIT programs per
block of rows; each writes its fp32 partial sums, bumps a per-block counter (atomic, acq_rel),
and the program that arrives last adds the partials, writes y in x's dtype and resets the
counter to 0 for the next call. The counters (`locks`, int32 zeros, one per row) belong to the
packed weight, so two layers never share one. The loop loads the next step's codes, scales and
zeros before this step's arithmetic (software prefetch); on Hopper the first step's are loaded
before waiting for the kernel that wrote x (PDL, kernels/_triton.py).

    w4a16_gemv_ref(x, w)        the reference: dequantize, then F.linear
    w4a16_gemv_triton(x, w)     the kernel, same contract, M <= GEMV_MAX_ROWS
    pack_pairs(qweight, scales, zeros, group_size) -> PairsWeight
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._triton import (HAS_TRITON, interpreted, num_sms, pdl_launch, pdl_wait,
                             require_triton, tl, triton)
from kernels.w4a16 import check_int4_shapes, pack_int4, unpack_int4, w4a16_linear_ref

__all__ = ["GEMV_MAX_ROWS", "PairsWeight", "pack_pairs", "unpack_pairs", "w4a16_gemv_ref",
           "w4a16_gemv_triton", "TUNED"]

GEMV_MAX_ROWS = 4          # decode batches up to this many rows take this kernel


@dataclass
class PairsWeight:
    qpairs: torch.Tensor       # (N, K/8) int32, the layout above
    scales: torch.Tensor       # (N, K/G)
    zeros: torch.Tensor        # (N, K/G) uint8
    group_size: int
    locks: torch.Tensor        # (N,) int32 zeros: split-K arrival counters, reset by the kernel
    scales_t: torch.Tensor     # (K/G, N) float32 copies for the kernel: a block of rows reads
    zeros_t: torch.Tensor      # (K/G, N) int32  one coalesced run per group

    @property
    def shape(self) -> tuple[int, int]:
        return self.qpairs.shape[0], 8 * self.qpairs.shape[1]            # (N, K)


def pack_pairs(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int) -> PairsWeight:
    """The stored layout (qweight (N, K/2) uint8, kernels/w4a16.py) -> the pairs layout."""
    K = 2 * qweight.shape[1]
    N = check_int4_shapes(K, qweight, scales, zeros, group_size)
    q = unpack_int4(qweight).to(torch.int32).view(N, K // 8, 4, 2)       # (N, j, i, b)
    words = torch.zeros(N, K // 8, dtype=torch.int32, device=q.device)
    for i in range(4):                  # int32 shifts wrap: bit 31 is the sign bit
        words |= (q[:, :, i, 0] << (4 * i)) | (q[:, :, i, 1] << (16 + 4 * i))
    return PairsWeight(words, scales, zeros, group_size,
                       torch.zeros(N, dtype=torch.int32, device=q.device),
                       scales.t().float().contiguous(), zeros.t().to(torch.int32).contiguous())


def unpack_pairs(w: PairsWeight) -> torch.Tensor:
    """q (N, K) uint8 codes back from the pairs layout."""
    N, K = w.shape
    shifts = torch.tensor([0, 16, 4, 20, 8, 24, 12, 28], dtype=torch.int32,
                          device=w.qpairs.device)                        # column 8j + c
    return ((w.qpairs[:, :, None] >> shifts) & 15).to(torch.uint8).view(N, K)


def w4a16_gemv_ref(x: torch.Tensor, w: PairsWeight, bias: torch.Tensor | None = None):
    """x (..., K) -> (..., N): the codes read back from the pairs layout, then w4a16_linear_ref
    (dequantize in float32, round to x's dtype, F.linear)."""
    return w4a16_linear_ref(x, pack_int4(unpack_pairs(w)), w.scales, w.zeros, w.group_size, bias)


# ---------------------------------------------------------------------------- PTX
def _asm(rows: int) -> str:
    """Inline PTX for one word and `rows` rows of x: outputs $0..$(rows-1) float32 sums
    sum_c x[c] (q[c] - z) over the word's 8 columns; inputs: the word, the bf16 pair
    -(128 + z) twice, then 4 x pairs per row."""
    w, nz = f"${rows}", f"${rows + 1}"
    lines = ["{", ".reg .b32 s1, s2, s3, v0, v1, v2, v3, d0, d1, d2, d3, one, nzero, a, lo, hi;",
             "mov.b32 one, 0x3F803F80;", "mov.b32 nzero, 0x80008000;",
             f"shr.u32 s1, {w}, 4;", f"shr.u32 s2, {w}, 8;", f"shr.u32 s3, {w}, 12;",
             f"lop3.b32 v0, {w}, 0x000F000F, 0x43004300, 0xEA;",    # (a & b) | c
             "lop3.b32 v1, s1, 0x000F000F, 0x43004300, 0xEA;",
             "lop3.b32 v2, s2, 0x000F000F, 0x43004300, 0xEA;",
             "lop3.b32 v3, s3, 0x000F000F, 0x43004300, 0xEA;"]
    lines += [f"fma.rn.bf16x2 d{i}, v{i}, one, {nz};" for i in range(4)]   # q - z, exact
    for r in range(rows):
        x = [f"${rows + 2 + 4 * r + i}" for i in range(4)]
        lines += [f"fma.rn.bf16x2 a, {x[0]}, d0, nzero;",
                  f"fma.rn.bf16x2 a, {x[1]}, d1, a;",
                  f"fma.rn.bf16x2 a, {x[2]}, d2, a;",
                  f"fma.rn.bf16x2 a, {x[3]}, d3, a;",
                  "shl.b32 lo, a, 16;", "and.b32 hi, a, 0xFFFF0000;",
                  f"add.f32 ${r}, lo, hi;"]
    return "\n".join(lines + ["}"])


_ASM1, _ASM2, _ASM4 = ((tl.constexpr(_asm(1)), tl.constexpr(_asm(2)), tl.constexpr(_asm(4)))
                        if HAS_TRITON else (None, None, None))


@triton.jit
def _xpairs(x32, wofs, ok):
    """x's four int32 pairs of every word (GPI, GW) of this step, read as one 16-byte vector a
    word and split: pair i holds columns 8j + 2i (low half) and 8j + 2i + 1 (high half)."""
    i4 = tl.arange(0, 4)
    x4 = tl.load(x32 + wofs[:, :, None] * 4 + i4[None, None, :], mask=ok[:, :, None], other=0)
    GPI: tl.constexpr = wofs.shape[0]
    GW: tl.constexpr = wofs.shape[1]
    a, b = tl.split(tl.reshape(x4, (GPI, GW, 2, 2)))          # pairs (0, 2), (1, 3)
    p0, p2 = tl.split(a)
    p1, p3 = tl.split(b)
    return p0[None, :, :], p1[None, :, :], p2[None, :, :], p3[None, :, :]


@triton.jit
def _word_sums_asm(w, nz, x32, wofs, ok, stride_x32, M: tl.constexpr):
    """sum_c x_r[c] (q[c] - z) per word (BN, GPI, GW) float32, rows r < M (1, 2 or 4 computed;
    M = 3 computes 4 with row 3's x masked to 0)."""
    xa0, xa1, xa2, xa3 = _xpairs(x32, wofs, ok)
    if M == 1:
        t0 = tl.inline_asm_elementwise(_ASM1, "=r,r,r,r,r,r,r", [w, nz, xa0, xa1, xa2, xa3],
                                       dtype=tl.float32, is_pure=True, pack=1)
        return t0, t0, t0, t0
    else:
        xb0, xb1, xb2, xb3 = _xpairs(x32 + stride_x32, wofs, ok)
        if M == 2:
            t0, t1 = tl.inline_asm_elementwise(
                _ASM2, "=r,=r,r,r,r,r,r,r,r,r,r,r", [w, nz, xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3],
                dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
            return t0, t1, t0, t0
        else:
            xc0, xc1, xc2, xc3 = _xpairs(x32 + 2 * stride_x32, wofs, ok)
            xd0, xd1, xd2, xd3 = _xpairs(x32 + 3 * stride_x32, wofs, ok & (M > 3))
            t0, t1, t2, t3 = tl.inline_asm_elementwise(
                _ASM4, "=r,=r,=r,=r" + ",r" * 18,
                [w, nz, xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3, xc0, xc1, xc2, xc3,
                 xd0, xd1, xd2, xd3],
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
            return t0, t1, t2, t3


@triton.jit
def _row_sum_plain(w, zf, x_ptr, col0, ok):
    """Without PTX: sum_c x[c] (q[c] - z) per word in float32; col0 (GPI, GW) first column."""
    t = tl.zeros(w.shape, tl.float32)
    for i in tl.static_range(4):
        qa = ((w >> (4 * i)) & 15).to(tl.float32) - zf
        qb = ((w >> (16 + 4 * i)) & 15).to(tl.float32) - zf
        xa = tl.load(x_ptr + col0 + 2 * i, mask=ok, other=0.0).to(tl.float32)
        xb = tl.load(x_ptr + col0 + 2 * i + 1, mask=ok, other=0.0).to(tl.float32)
        t += qa * xa[None, :, :] + qb * xb[None, :, :]
    return t


@triton.jit
def _load_step(w_ptrs, s_ptr, z_ptr, n, n_ok, g, g_ok, N, GW: tl.constexpr):
    """One step's code words (BN, GPI, GW) int32 and its scales (float32) and zeros (int32),
    (BN, GPI, 1) each, read from their (K/G, N) copies."""
    w = tl.load(w_ptrs + (g * GW)[None, :, None], mask=n_ok[:, None, None] & g_ok[None, :, None],
                other=0)
    sz = g[None, :] * N + n[:, None]                                   # (BN, GPI)
    sz_ok = n_ok[:, None] & g_ok[None, :]
    s = tl.load(s_ptr + sz, mask=sz_ok, other=0.0).to(tl.float32)[:, :, None]   # (BN, GPI, 1)
    z = tl.load(z_ptr + sz, mask=sz_ok, other=0).to(tl.int32)[:, :, None]
    return w, s, z


@triton.jit
def _gemv_kernel(x_ptr, qp_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, lock_ptr,
                 N, NG, GROUPS_PER_SPLIT, SPLIT, stride_xm, stride_qn, stride_ym,
                 M: tl.constexpr, GW: tl.constexpr, BLOCK_N: tl.constexpr, GPI: tl.constexpr,
                 SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
                 PDL: tl.constexpr):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                        # (BN,) output features
    n_ok = n < N
    n64 = n.to(tl.int64)
    gi = tl.arange(0, GPI)
    jw = tl.arange(0, GW)
    acc0 = tl.zeros([BLOCK_N, GPI, GW], tl.float32)
    acc1 = tl.zeros([BLOCK_N, GPI, GW], tl.float32)
    acc2 = tl.zeros([BLOCK_N, GPI, GW], tl.float32)
    acc3 = tl.zeros([BLOCK_N, GPI, GW], tl.float32)
    g_begin = pid_s * GROUPS_PER_SPLIT
    g_end = tl.minimum(g_begin + GROUPS_PER_SPLIT, NG)
    w_ptrs = qp_ptr + n64[:, None, None] * stride_qn + jw[None, None, :]      # (BN, 1, GW)
    x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    g = g_begin + gi
    w_next, s_next, z_next = _load_step(w_ptrs, s_ptr, z_ptr, n, n_ok, g, g < g_end, N, GW)
    pdl_wait(PDL)
    for g0 in range(g_begin, g_end, GPI):
        g = g0 + gi
        g_ok = g < g_end
        w, s, z = w_next, s_next, z_next
        g_nxt = g + GPI
        w_next, s_next, z_next = _load_step(w_ptrs, s_ptr, z_ptr, n, n_ok, g_nxt, g_nxt < g_end,
                                            N, GW)
        wofs = (g * GW)[:, None] + jw[None, :]                         # (GPI, GW) word index
        ok = g_ok[:, None] & (jw < GW)[None, :]                        # (GPI, GW)
        if ASM:
            nz = tl.broadcast_to((0xC300 | z) * 0x10001, w.shape)       # bf16 pair -(128 + z)
            t0, t1, t2, t3 = _word_sums_asm(w, nz, x32, wofs, ok, stride_xm // 2, M)
            acc0 += s * t0
            if M > 1:
                acc1 += s * t1
            if M > 2:
                acc2 += s * t2
            if M > 3:
                acc3 += s * t3
        else:
            zf = z.to(tl.float32)
            col0 = wofs * 8
            acc0 += s * _row_sum_plain(w, zf, x_ptr, col0, ok)
            if M > 1:
                acc1 += s * _row_sum_plain(w, zf, x_ptr + stride_xm, col0, ok)
            if M > 2:
                acc2 += s * _row_sum_plain(w, zf, x_ptr + 2 * stride_xm, col0, ok)
            if M > 3:
                acc3 += s * _row_sum_plain(w, zf, x_ptr + 3 * stride_xm, col0, ok)
    y0 = tl.sum(tl.sum(acc0, 2), 1)                                    # (BN,) fp32
    y1 = tl.sum(tl.sum(acc1, 2), 1)
    y2 = tl.sum(tl.sum(acc2, 2), 1)
    y3 = tl.sum(tl.sum(acc3, 2), 1)
    last = True
    if SPLIT_K:      # partials (SPLIT, M, N) fp32; the last program of the block adds them up
        part = part_ptr + pid_s * M * N + n
        tl.store(part, y0, mask=n_ok)
        if M > 1:
            tl.store(part + N, y1, mask=n_ok)
        if M > 2:
            tl.store(part + 2 * N, y2, mask=n_ok)
        if M > 3:
            tl.store(part + 3 * N, y3, mask=n_ok)
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel")
        last = arrived == SPLIT - 1
        if last:
            y0 = tl.zeros([BLOCK_N], tl.float32)
            y1 = tl.zeros([BLOCK_N], tl.float32)
            y2 = tl.zeros([BLOCK_N], tl.float32)
            y3 = tl.zeros([BLOCK_N], tl.float32)
            for sp in range(0, SPLIT):
                part = part_ptr + sp * M * N + n
                y0 += tl.load(part, mask=n_ok, other=0.0, cache_modifier=".cg")
                if M > 1:
                    y1 += tl.load(part + N, mask=n_ok, other=0.0, cache_modifier=".cg")
                if M > 2:
                    y2 += tl.load(part + 2 * N, mask=n_ok, other=0.0, cache_modifier=".cg")
                if M > 3:
                    y3 += tl.load(part + 3 * N, mask=n_ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(lock_ptr + pid_n, 0)
    if last:
        if HAS_BIAS:
            bias = tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
            y0 += bias
            y1 += bias
            y2 += bias
            y3 += bias
        out = y_ptr + n
        dt = y_ptr.dtype.element_ty
        tl.store(out, y0.to(dt), mask=n_ok)
        if M > 1:
            tl.store(out + stride_ym, y1.to(dt), mask=n_ok)
        if M > 2:
            tl.store(out + 2 * stride_ym, y2.to(dt), mask=n_ok)
        if M > 3:
            tl.store(out + 3 * stride_ym, y3.to(dt), mask=n_ok)


# Winners of tile sweeps keyed by (N, K, M) with M in (1, 4): M = 2 takes M = 1's tiles, M = 3
# takes M = 4's (docs/PERF.md). M = 4 and the M = 1 rows of (14336, 4096) and (11008, 4096):
# a 27-tile sweep on an H200 (BLOCK_N 16/32/64 x 1/2/4 warps x 2/4/8 programs per SM). The
# other M = 1 rows: the wider sweep (two groups per step, a register cap) on an H100,
# 2026-12-05, 3-11% faster than the H200's tiles there. Both chips have 132 SMs.
TUNED: dict[tuple[int, int, int], dict] = {
    (12288, 4096, 1): dict(BLOCK_N=32, GPI=1, SPLIT=3, num_warps=2, maxnreg=96),
    (12288, 4096, 4): dict(BLOCK_N=64, GPI=1, SPLIT=3, num_warps=4),
    (4096, 4096, 1): dict(BLOCK_N=32, GPI=2, SPLIT=11, num_warps=4),
    (4096, 4096, 4): dict(BLOCK_N=64, GPI=1, SPLIT=9, num_warps=4),
    (22016, 4096, 1): dict(BLOCK_N=32, GPI=2, SPLIT=2, num_warps=4),
    (22016, 4096, 4): dict(BLOCK_N=64, GPI=1, SPLIT=4, num_warps=4),
    (4096, 11008, 1): dict(BLOCK_N=32, GPI=2, SPLIT=7, num_warps=4),
    (4096, 11008, 4): dict(BLOCK_N=64, GPI=1, SPLIT=9, num_warps=4),
    (11008, 4096, 1): dict(BLOCK_N=64, GPI=1, SPLIT=7, num_warps=2),
    (11008, 4096, 4): dict(BLOCK_N=64, GPI=1, SPLIT=7, num_warps=4),
    (14336, 4096, 1): dict(BLOCK_N=64, GPI=1, SPLIT=5, num_warps=2),
    (14336, 4096, 4): dict(BLOCK_N=64, GPI=1, SPLIT=5, num_warps=4),
}


def _config(M: int, N: int, K: int, G: int) -> dict:
    """Tile sizes. The interpreter gets small tiles and a split (so tests cover it)."""
    ng = K // G
    if interpreted():
        return dict(BLOCK_N=8, GPI=2, SPLIT=min(3, ng), num_warps=1)
    tuned = TUNED.get((N, K, 1 if M <= 2 else 4))
    if tuned is not None:
        return dict(tuned)
    # the sweep's usual winner: 64 rows, one group per step, ~8 programs per SM
    bn = 64
    split = max(1, min(ng, triton.cdiv(8 * num_sms(), triton.cdiv(N, bn))))
    return dict(BLOCK_N=bn, GPI=1, SPLIT=split, num_warps=2 if M <= 2 else 4)


def w4a16_gemv_triton(x: torch.Tensor, w: PairsWeight, bias: torch.Tensor | None = None,
                            out: torch.Tensor | None = None, asm: bool | None = None,
                            **config) -> torch.Tensor:
    """Same contract as `w4a16_gemv_ref` for x with at most 4 rows. `asm` (default: x is
    bf16 on a GPU) picks the PTX path; `config` overrides BLOCK_N, GPI, SPLIT, num_warps."""
    require_triton()
    N, K = w.shape
    lead = x.shape[:-1]
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features; the weight expects in_features={K}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1 or x2.stride(0) % 2:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M > GEMV_MAX_ROWS:
        raise ValueError(f"x has {M} rows; this kernel takes at most {GEMV_MAX_ROWS}")
    y = out if out is not None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*lead, N)
    if asm is None:
        asm = x.dtype == torch.bfloat16 and x.is_cuda and not interpreted()
    G = w.group_size
    ng = K // G
    cfg = {**_config(M, N, K, G), **config}
    bn, gpi, split = cfg.pop("BLOCK_N"), cfg.pop("GPI"), cfg.pop("SPLIT")
    per_split = triton.cdiv(triton.cdiv(ng, split), gpi) * gpi
    split = triton.cdiv(ng, per_split)
    tiles = triton.cdiv(N, bn)
    assert tiles <= w.locks.numel()
    pdl = pdl_launch(x2)
    part = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 else y
    _gemv_kernel[(tiles, split)](
        x2, w.qpairs, w.scales_t, w.zeros_t, bias if bias is not None else y, y, part, w.locks,
        N, ng, per_split, split, x2.stride(0), w.qpairs.stride(0), y.stride(0), M=M, GW=G // 8,
        BLOCK_N=bn, GPI=gpi, SPLIT_K=split > 1, HAS_BIAS=bias is not None, ASM=asm, PDL=pdl,
        launch_pdl=pdl, **cfg)
    return y.view(*lead, N)

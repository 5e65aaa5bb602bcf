"""W4A16 on tensor cores with the weight in *fragment order*: each thread's 32-bit word is its
share of the MMA's left operand, so the codes go from the load to the MMA without a layout change.

kernels/w4a16_gemm.py computes y^T = W x^T with the dequantized weight as the left operand of a
Hopper warpgroup MMA (wgmma), which reads that operand from registers. But its weights are read
in row order, so Triton moves every code tile into the operand's register layout first: byte
permutes, 16-bit shared-memory reads, ~4.8 SASS instructions per code at 16 rows of x (compiled
for sm_90). Marlin's answer (and LMDeploy's) is to store the codes in the order the MMA wants
them. For the 16 x 16 left operand of an m16n8k16 / wgmma step, lane l = 4r + c (r = 0..7,
c = 0..3) of a warp holds four pairs of bfloat16:

    pair 0: row r,     columns 2c, 2c+1          pair 2: row r + 8, columns 2c, 2c+1
    pair 1: row r,     columns 2c+8, 2c+9        pair 3: row r + 8, columns 2c+8, 2c+9

Layout ("frag"; made once at load from the stored layout of kernels/w4a16.py, same bytes):

    words    (N/16, K/16, 32) int32   block R of 16 rows, chunk Q of 16 columns, lane l = 4r + c:
                                        bits  4i .. 4i+3    the first column of pair i
                                        bits 16+4i .. 19+4i the second column of pair i
                                      stored as (N/16, K/64, 32, 4): the four chunks of 64
                                      columns are a lane's 16 bytes, one vector load.
    scales_t (K/G, N)  scales' dtype  (transposed: the rows of a block read one run per group)
    zeros_t  (K/G, N)  int32

`(word >> 4i) & 0x000F000F | 0x43004300` is pair i as bfloat16 (128 + q, 128 + q') (bf16 128.0
is 0x4300, mantissa step 1); in PTX then `fma.rn.bf16x2` subtracts 128 + z (exact: small
integers) and multiplies by the scale: one rounding of (q - z) s, the reference's number. About
two SASS instructions per code (3 shifts, 4 lop3, 8 bf16x2 FMAs per word of 8 codes).

In Triton the word tile (BN/16, 8, 4) [block, r, c] is dequantized elementwise into eight
(BN/16, 8, 4) halves, joined, permuted and reshaped into the (BN, 16) operand with row
16 R + 8 (i // 2) + r and column 8 (i % 2) + 2c + b. Those reshapes only rename registers: the
TTGIR of the compiled kernel (sm_90) has no layout conversion before the MMA, and the loop
runs ~3.2 instructions per code at 16 rows of x, BLOCK_N = BLOCK_K = 128 (4.8 for
kernels/w4a16_gemm.py's tile). The interpreter (and x in float16/float32) takes the same path
with the dequantization in float32 Triton operations (`ASM=False`).

Split-K in one launch, as kernels/w4a16_gemv.py does it: with SPLIT > 1 the K range of an
output tile is shared by SPLIT programs; each writes its fp32 partial sums, bumps the tile's
counter (atomic, acq_rel), and the program that arrives last adds the partials (+ bias), writes
y and resets the counter. The counters (`locks`) belong to the packed weight. On Hopper it
launches with PDL (kernels/_triton.py): its programs start during the previous kernel's tail and
wait for it before the first read of x.

    w4a16_frag_ref(x, w)         the reference: dequantize, then F.linear
    w4a16_frag_triton(x, w)      the kernel, same contract, any M
    pack_frag(qweight, scales, zeros, group_size) -> FragWeight;  unpack_frag(w) -> codes
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._triton import (HAS_TRITON, interpreted, num_sms, pdl_launch, pdl_wait,
                             require_triton, tl, triton)
from kernels.w4a16 import check_int4_shapes, pack_int4, unpack_int4, w4a16_linear_ref

__all__ = ["FragWeight", "pack_frag", "unpack_frag", "w4a16_frag_ref", "w4a16_frag_triton"]


@dataclass
class FragWeight:
    words: torch.Tensor        # (N/16, K/16, 32) int32, the layout above
    scales: torch.Tensor       # (N, K/G) as stored (the reference reads these)
    zeros: torch.Tensor        # (N, K/G) uint8
    group_size: int
    scales_t: torch.Tensor     # (K/G, N) the kernel's copies
    zeros_t: torch.Tensor      # (K/G, N) int32
    locks: torch.Tensor        # (N/4,) int32 zeros: split-K arrival counters, one per output
                               # tile (<= N/16 row blocks x 4 tiles of 16 rows of x), reset by
                               # the kernel

    @property
    def shape(self) -> tuple[int, int]:
        return self.scales.shape[0], 16 * self.words.shape[1]              # (N, K)


def pack_frag(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int) -> FragWeight:
    """The stored layout (qweight (N, K/2) uint8, kernels/w4a16.py) -> the frag layout."""
    K = 2 * qweight.shape[1]
    N = check_int4_shapes(K, qweight, scales, zeros, group_size)
    if N % 16 or K % 64:
        raise ValueError(f"the frag layout needs out_features % 16 == 0 and in_features % 64 == "
                         f"0; got out_features={N}, in_features={K}")
    q = unpack_int4(qweight).to(torch.int32)
    # (R, h, r, Q, e, c, b): row 16R + 8h + r, column 16Q + 8e + 2c + b; pair i = 2h + e
    t = q.view(N // 16, 2, 8, K // 16, 2, 4, 2).permute(0, 3, 2, 5, 1, 4, 6)  # (R, Q, r, c, h, e, b)
    words = torch.zeros(N // 16, K // 16, 8, 4, dtype=torch.int32, device=q.device)
    for h in range(2):
        for e in range(2):                       # int32 shifts wrap: bit 31 is the sign bit
            i = 2 * h + e
            words |= (t[..., h, e, 0] << (4 * i)) | (t[..., h, e, 1] << (16 + 4 * i))
    words = words.view(N // 16, K // 64, 4, 32).transpose(2, 3)          # (R, Q/4, lane, chunk)
    return FragWeight(words.contiguous().view(N // 16, K // 16, 32), scales, zeros, group_size,
                      scales.t().contiguous(), zeros.t().to(torch.int32).contiguous(),
                      torch.zeros(N // 4, dtype=torch.int32, device=q.device))


def unpack_frag(w: FragWeight) -> torch.Tensor:
    """q (N, K) uint8 codes back from the frag layout."""
    N, K = w.shape
    words = w.words.view(N // 16, K // 64, 32, 4).transpose(2, 3).reshape(N // 16, K // 16, 8, 4)
    shifts = torch.tensor([0, 16, 4, 20, 8, 24, 12, 28], dtype=torch.int32,
                          device=words.device).view(2, 2, 2)              # (h, e, b) -> bit
    q = (words[..., None, None, None] >> shifts) & 15                     # (R, Q, r, c, h, e, b)
    return q.permute(0, 4, 2, 1, 5, 3, 6).reshape(N, K).to(torch.uint8)


def w4a16_frag_ref(x: torch.Tensor, w: FragWeight, bias: torch.Tensor | None = None):
    """x (..., K) -> (..., N): the codes read back from the frag layout, then w4a16_linear_ref
    (dequantize in float32, round to x's dtype, F.linear)."""
    return w4a16_linear_ref(x, pack_int4(unpack_frag(w)), w.scales, w.zeros, w.group_size, bias)


# ---------------------------------------------------------------------------- kernel
_PTX = tl.constexpr("""{
.reg .b32 s1, s2, s3, v0, v1, v2, v3, one, nzero;
mov.b32 one, 0x3F803F80;
mov.b32 nzero, 0x80008000;
shr.u32 s1, $4, 4;
shr.u32 s2, $4, 8;
shr.u32 s3, $4, 12;
lop3.b32 v0, $4, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 v1, s1, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 v2, s2, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 v3, s3, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 v0, v0, one, $5;
fma.rn.bf16x2 v1, v1, one, $5;
fma.rn.bf16x2 v2, v2, one, $6;
fma.rn.bf16x2 v3, v3, one, $6;
fma.rn.bf16x2 $0, v0, $7, nzero;
fma.rn.bf16x2 $1, v1, $7, nzero;
fma.rn.bf16x2 $2, v2, $8, nzero;
fma.rn.bf16x2 $3, v3, $8, nzero;
}""") if HAS_TRITON else None    # in: word, -(128+z) and scale as bf16 pairs of rows r, r+8


@triton.jit
def _pair(s):
    """A bfloat16 tensor -> int32 holding the value in both halves."""
    return (s.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) * 0x10001


@triton.jit
def _chunk_tile(wd, s_lo, s_hi, z_lo, z_hi, dt: tl.constexpr, ASM: tl.constexpr):
    """Words (NB, 8, 4) of one 16-column chunk -> the (16 NB, 16) left operand in x's dtype;
    s/z (NB, 8, 1): scale and zero of rows r (pairs 0, 1) and r + 8 (pairs 2, 3)."""
    if ASM:
        nz_lo = tl.broadcast_to((0xC300 | z_lo) * 0x10001, wd.shape)       # bf16 -(128 + z)
        nz_hi = tl.broadcast_to((0xC300 | z_hi) * 0x10001, wd.shape)
        s2_lo = tl.broadcast_to(_pair(s_lo), wd.shape)                      # bf16 (s, s)
        s2_hi = tl.broadcast_to(_pair(s_hi), wd.shape)
        p0, p1, p2, p3 = tl.inline_asm_elementwise(
            _PTX, "=r,=r,=r,=r,r,r,r,r,r", [wd, nz_lo, nz_hi, s2_lo, s2_hi],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        tile = _assemble(p0.to(tl.int16), (p0 >> 16).to(tl.int16),
                         p1.to(tl.int16), (p1 >> 16).to(tl.int16),
                         p2.to(tl.int16), (p2 >> 16).to(tl.int16),
                         p3.to(tl.int16), (p3 >> 16).to(tl.int16))
        return tile.to(dt, bitcast=True)
    else:
        zl, zh = z_lo.to(tl.float32), z_hi.to(tl.float32)
        sl, sh = s_lo.to(tl.float32), s_hi.to(tl.float32)
        return _assemble((((wd & 15).to(tl.float32) - zl) * sl).to(dt),
                         ((((wd >> 16) & 15).to(tl.float32) - zl) * sl).to(dt),
                         ((((wd >> 4) & 15).to(tl.float32) - zl) * sl).to(dt),
                         ((((wd >> 20) & 15).to(tl.float32) - zl) * sl).to(dt),
                         ((((wd >> 8) & 15).to(tl.float32) - zh) * sh).to(dt),
                         ((((wd >> 24) & 15).to(tl.float32) - zh) * sh).to(dt),
                         ((((wd >> 12) & 15).to(tl.float32) - zh) * sh).to(dt),
                         ((((wd >> 28) & 15).to(tl.float32) - zh) * sh).to(dt))


@triton.jit
def _assemble(l0, h0, l1, h1, l2, h2, l3, h3):
    """Pair i's first (l) and second (h) values, each (NB, 8, 4) [block, r, c] -> (16 NB, 16)
    with row 16 block + 8 (i // 2) + r, column 8 (i % 2) + 2c + b."""
    NB: tl.constexpr = l0.shape[0]
    p0, p1, p2, p3 = tl.join(l0, h0), tl.join(l1, h1), tl.join(l2, h2), tl.join(l3, h3)
    top = tl.reshape(tl.permute(tl.join(p0, p1), (0, 1, 4, 2, 3)), (NB, 8, 16))  # [blk, r, 8e+2c+b]
    bot = tl.reshape(tl.permute(tl.join(p2, p3), (0, 1, 4, 2, 3)), (NB, 8, 16))
    return tl.reshape(tl.permute(tl.join(top, bot), (0, 3, 1, 2)), (16 * NB, 16))


@triton.jit
def _cat_k(a, b):
    """(BN, k), (BN, k) -> (BN, 2k), b's columns after a's."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (a.shape[0], 2 * a.shape[1]))


@triton.jit
def _group(s_ptr, z_ptr, g, N, row, ok):
    """Scale and zero of group g for rows `row` and `row + 8`, (NB, 8, 1) each."""
    base = g * N + row
    return (tl.load(s_ptr + base, mask=ok, other=0.0), tl.load(s_ptr + base + 8, mask=ok, other=0.0),
            tl.load(z_ptr + base, mask=ok, other=0), tl.load(z_ptr + base + 8, mask=ok, other=0))


@triton.jit
def _frag_kernel(x_ptr, wd_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, lock_ptr, M, N, K,
                 K_PER_SPLIT, SPLIT, stride_xm, stride_ym,
                 GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 ASM: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
    NB: tl.constexpr = BLOCK_N // 16                               # row blocks of the tile
    dt = x_ptr.dtype.element_ty
    pid, pid_s = tl.program_id(0), tl.program_id(1)
    m_tiles = tl.cdiv(M, BLOCK_M)
    pid_n, pid_m = pid // m_tiles, pid % m_tiles                   # a weight tile's M tiles adjacent
    blk = pid_n * NB + tl.arange(0, NB)[:, None, None]             # (NB, 1, 1) row block
    r = tl.arange(0, 8)[None, :, None]
    c = tl.arange(0, 4)[None, None, :]
    blk_ok = blk < N // 16
    row = 16 * blk + r                                             # (NB, 8, 1) rows of pairs 0, 1
    lane = (4 * r + c)[:, :, :, None]                              # (1, 8, 4, 1)
    w_ptrs = wd_ptr + ((blk.to(tl.int64) * (K // 64))[:, :, :, None] * 32 + lane) * 4 \
        + tl.arange(0, 4)[None, None, None, :]                     # (NB, 8, 4, 4) chunk 0..3
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    kk = tl.arange(0, 64)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)                 # y^T tile
    k_begin = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    pdl_wait(PDL)                                  # the kernel before writes x: wait for it
    for k0 in range(k_begin, k_end, BLOCK_K):
        sa_lo, sa_hi, za_lo, za_hi = _group(s_ptr, z_ptr, k0 // GROUP, N, row, blk_ok)
        for v in tl.static_range(BLOCK_K // 64):                   # 64 columns: 4 chunks
            kv = k0 + 64 * v                                       # K % BLOCK_K == 0: no masks
            if GROUP < BLOCK_K and v > 0:
                sa_lo, sa_hi, za_lo, za_hi = _group(s_ptr, z_ptr, kv // GROUP, N, row, blk_ok)
            sb_lo, sb_hi, zb_lo, zb_hi = sa_lo, sa_hi, za_lo, za_hi
            if GROUP < 64:                                         # chunks 2, 3: the next group
                sb_lo, sb_hi, zb_lo, zb_hi = _group(s_ptr, z_ptr, (kv + 32) // GROUP, N, row, blk_ok)
            w_ok = tl.broadcast_to(blk_ok[:, :, :, None], (NB, 8, 4, 4))
            wd4 = tl.load(w_ptrs + (kv // 64) * 128, mask=w_ok, other=0)    # (NB, 8, 4, 4)
            even, odd = tl.split(tl.reshape(wd4, (NB, 8, 4, 2, 2)))
            w0, w2 = tl.split(even)
            w1, w3 = tl.split(odd)
            a = _cat_k(_cat_k(_chunk_tile(w0, sa_lo, sa_hi, za_lo, za_hi, dt, ASM),
                              _chunk_tile(w1, sa_lo, sa_hi, za_lo, za_hi, dt, ASM)),
                       _cat_k(_chunk_tile(w2, sb_lo, sb_hi, zb_lo, zb_hi, dt, ASM),
                              _chunk_tile(w3, sb_lo, sb_hi, zb_lo, zb_hi, dt, ASM)))  # (BN, 64)
            xt = tl.load(x_ptr + m[None, :] * stride_xm + (kv + kk)[:, None],
                         mask=m_ok[None, :], other=0.0)                             # (64, BM)
            if IEEE:                                               # fp32 x: no TF32 rounding
                acc += tl.dot(a, xt, input_precision="ieee")
            else:
                acc = tl.dot(a, xt, acc)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (n < N)[:, None] & m_ok[None, :]
    mn = m[None, :] * N + n[:, None]                               # (BN, BM) in an (M, N) array
    last = True
    if SPLIT_K:      # partials (SPLIT, M, N) fp32; the last program of the tile adds them up
        tl.store(part_ptr + pid_s * M * N + mn, acc, mask=ok)
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel")
        last = arrived == SPLIT - 1
        if last:
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for sp in range(0, SPLIT):
                acc += tl.load(part_ptr + sp * M * N + mn, mask=ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(lock_ptr + pid, 0)
    if last:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + m[None, :] * stride_ym + n[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=ok)


def _config(M: int, N: int, K: int, device) -> dict:
    """Tiles from a sweep on an H100 (scripts/gpu_w4a16_frag.py, docs/PERF.md 2026-12-05): for
    up to 64 rows a 64-wide N tile, 4 warps, 3 stages, and split-K to about four programs per SM
    (two for 33-64 rows); more rows one 128 x 128 tile per program. The interpreter gets small
    tiles."""
    if interpreted():
        return dict(BLOCK_N=16 if N % 32 else 32, BLOCK_M=16, BLOCK_K=64, SPLIT_K=2, num_warps=1,
                    num_stages=1)
    bk = 128 if K % 128 == 0 else 64
    if M > 64:                       # compute-bound: two warpgroups, a 128 x 128 output tile
        return dict(BLOCK_N=128, BLOCK_M=128, BLOCK_K=bk, SPLIT_K=1, num_warps=8, num_stages=3)
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    waves = 4 if bm <= 32 else 2
    tiles = triton.cdiv(N, 64) * triton.cdiv(M, bm)
    split = max(1, min(K // (2 * bk), triton.cdiv(waves * num_sms(device), tiles)))
    return dict(BLOCK_N=64, BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=3)


def w4a16_frag_triton(x: torch.Tensor, w: FragWeight, bias: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, asm: bool | None = None,
                      **config) -> torch.Tensor:
    """Same contract as `w4a16_frag_ref`. `asm` (default: x and the scales bf16 on a GPU) picks
    the PTX dequantization; `config` overrides BLOCK_N, BLOCK_M, BLOCK_K, SPLIT_K, num_warps."""
    require_triton()
    N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features; the weight expects in_features={K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = out if out is not None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*lead, N)
    if asm is None:
        asm = (x.dtype == torch.bfloat16 and w.scales_t.dtype == torch.bfloat16 and x.is_cuda
               and not interpreted())
    cfg = {**_config(M, N, K, x.device), **config}
    bn, bm, bk, split = (cfg.pop(k) for k in ("BLOCK_N", "BLOCK_M", "BLOCK_K", "SPLIT_K"))
    if bk % 64 or K % bk or bn % 16:
        raise ValueError(f"BLOCK_K={bk} must be a multiple of 64 dividing in_features={K}, "
                         f"and BLOCK_N={bn} a multiple of 16")
    k_per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk      # whole K tiles per split
    split = triton.cdiv(K, k_per_split)
    tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
    if split > 1 and tiles > w.locks.numel():
        raise ValueError(f"SPLIT_K={split} needs one counter per output tile: {tiles} tiles of "
                         f"{bn} x {bm} for {w.locks.numel()} counters; use fewer rows or no split")
    pdl = pdl_launch(x2)
    part = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 else y
    _frag_kernel[(tiles, split)](
        x2, w.words, w.scales_t, w.zeros_t, bias if bias is not None else y, y, part, w.locks,
        M, N, K, k_per_split, split, x2.stride(0), y.stride(0), GROUP=w.group_size, BLOCK_N=bn,
        BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=split > 1, HAS_BIAS=bias is not None, ASM=asm,
        IEEE=x.dtype == torch.float32, PDL=pdl, launch_pdl=pdl, **cfg)
    return y.view(*lead, N)

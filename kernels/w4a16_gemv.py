"""W4A16 matrix-vector product for decode batches of 1-4 rows, on CUDA cores, no tensor cores.

At batch 1-4 a linear layer reads every weight once and does 1-4 multiply-adds with it: the
time should be the weight bytes over the memory bandwidth. The tensor-core kernel of
kernels/w4a16.py pads x to 16 rows and stages each code tile through shared memory into the
operand layout; on an H200 that ran at 0.55-0.8 TB/s of int4 bytes (ncu: 8-way bank conflicts
on the staging, docs/PERF.md), slower than cuBLAS reading 4x the bytes in bf16. Here each
thread turns its codes into floats in its own registers and multiply-adds them with x: no
shared memory, no padding, one reduction across threads per program at the very end.

Layout ("planes"; made once at load from the stored layout of kernels/w4a16.py, same bytes):

    qplanes  (N, K/8) int32     group g (G columns) is the G/8 words g*G/8 ... (g+1)*G/8 - 1 of
                                a row; bits 4p..4p+3 (p = 0..7) of its word i hold
                                    q[n, g*G + p*(G/8) + i]
                                so "plane p" of a group (nibble p of each of its words) is the
                                run of G/8 columns starting at g*G + p*G/8: a thread holding
                                words i..i+3 meets x[.. + i .. + i+3], one 8-byte load per plane.
    scales_t, zeros_t           (K/G, N): the stored (N, K/G) scales and zeros transposed, so a
                                block of rows reads one coalesced run per group.

Dequantization without an int-to-float instruction: a shift (shared by four codes) puts two
codes in the mantissas of a pair of bfloat16 16.0s (one and-or for both), which read exactly
16 + q; a bfloat16 is the top half of a float32, so each is one more integer op away from a
float32. Per group, with t = sum_k x_k (16 + q_k) and xs = sum_k x_k,

    sum_k x_k (q_k - z) s = s * (t - (16 + z) xs)

so a code costs about 1.5 integer ops, a widening and one FMA per row of x (an earlier
version, one fp32 per shift and and-or, issued 5 instructions per code); s and z are applied once per
group and word. Accumulators are per thread, (BLOCK_N, GPI, G/8) floats; the sum over the
words of a row, across threads, happens once per program. The loop loads the next step's
codes before this step's arithmetic (software prefetch). On an H200 it streams 1.0-1.7 TB/s
of int4 bytes at M = 1, 1.4-1.7x cuBLAS bf16 (docs/PERF.md): neither issue- nor bandwidth-bound
yet, the open question being the latency its few warps per SM do not hide.

Split-K without a second launch: with SPLIT > 1 the K groups are shared by SPLIT programs per
block of rows; each writes its fp32 partial sums, bumps a per-block counter (atomic, acq_rel),
and the program that arrives last adds the partials, writes y in x's dtype and resets the
counter to 0 for the next call. The counters (`locks`, int32 zeros, one per row) belong to the
packed weight, so two layers never share one.

    w4a16_gemv_ref(x, w)        the reference: dequantize the planes, then F.linear
    w4a16_gemv_triton(x, w)     the kernel, same contract, M <= GEMV_MAX_ROWS
    pack_planes(qweight, scales, zeros, group_size) -> PlanesWeight
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels._triton import interpreted, num_sms, pdl_launch, pdl_wait, require_triton, tl, triton
from kernels.w4a16 import check_int4_shapes, unpack_int4

__all__ = ["GEMV_MAX_ROWS", "PlanesWeight", "pack_planes", "unpack_planes", "w4a16_gemv_ref",
           "w4a16_gemv_triton", "TUNED"]

GEMV_MAX_ROWS = 4          # decode batches up to this many rows take this kernel


@dataclass
class PlanesWeight:
    qplanes: torch.Tensor      # (N, K/8) int32, the layout above
    scales: torch.Tensor       # (N, K/G)
    zeros: torch.Tensor        # (N, K/G) uint8
    group_size: int
    locks: torch.Tensor        # (N,) int32 zeros: split-K arrival counters, reset by the kernel
    scales_t: torch.Tensor     # (K/G, N) contiguous copies for the kernel: a block of rows reads
    zeros_t: torch.Tensor      # one coalesced run per group instead of a sector per row

    @property
    def shape(self) -> tuple[int, int]:
        return self.qplanes.shape[0], 8 * self.qplanes.shape[1]          # (N, K)


# ---------------------------------------------------------------------------- layout in torch
def pack_planes(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> PlanesWeight:
    """The stored layout (qweight (N, K/2) uint8, kernels/w4a16.py) -> the planes layout."""
    K = 2 * qweight.shape[1]
    N = check_int4_shapes(K, qweight, scales, zeros, group_size)
    gw = group_size // 8                                               # words per group
    q = unpack_int4(qweight).to(torch.int32).view(N, K // group_size, 8, gw)   # (N, K/G, p, i)
    words = torch.zeros(N, K // group_size, gw, dtype=torch.int32, device=q.device)
    for p in range(8):                  # int32 shifts wrap: plane 7 lands in the sign bit
        words |= q[:, :, p] << (4 * p)
    return PlanesWeight(words.view(N, K // 8), scales, zeros, group_size,
                        torch.zeros(N, dtype=torch.int32, device=q.device),
                        scales.t().contiguous(), zeros.t().contiguous())


def unpack_planes(w: PlanesWeight) -> torch.Tensor:
    """q (N, K) uint8 codes back from the planes (the inverse of pack_planes' repacking)."""
    N, K = w.shape
    gw = w.group_size // 8
    words = w.qplanes.view(N, K // w.group_size, 1, gw)                    # (N, K/G, 1, i)
    shifts = 4 * torch.arange(8, dtype=torch.int32, device=words.device).view(1, 1, 8, 1)
    return ((words >> shifts) & 15).to(torch.uint8).view(N, K)             # (N, K/G, p, i)


def w4a16_gemv_ref(x: torch.Tensor, w: PlanesWeight, bias: torch.Tensor | None = None):
    """x (..., K) -> (..., N): dequantize (float32 arithmetic, x's dtype), then F.linear."""
    N, K = w.shape
    G = w.group_size
    q = unpack_planes(w).view(N, K // G, G).float()
    deq = (q - w.zeros.float()[..., None]) * w.scales.float()[..., None]   # (N, K/G, G)
    return F.linear(x, deq.view(N, K).to(x.dtype), bias)


# ---------------------------------------------------------------------------- Triton
@triton.jit
def _plane(w, P: tl.constexpr):
    """Nibble P of every int32 word of w as the float32 16 + q, exactly, with no conversion
    instruction. Planes P and P + 4 (P < 4) are done as a pair: one shift puts them at bits
    3..6 and 19..22, one and-or writes them into the mantissas of two bfloat16 16.0s (0x4180,
    where bit 3 counts 1), and a bfloat16 is the top half of a float32: the high one is the word
    with its low half cleared, the low one the word shifted up 16. The compiler shares the
    shift and the and-or between the two planes of a pair."""
    if P % 4 == 0:
        b = w << 3
    else:
        b = w >> (4 * (P % 4) - 3)       # arithmetic shift: the top bits are masked off below
    pair = (b & 0x00780078) | 0x41804180                               # two bfloat16: 16 + q
    if P >= 4:
        pair = pair & -65536                                           # 0xFFFF0000
    else:
        pair = pair << 16
    return pair.to(tl.float32, bitcast=True)


@triton.jit
def _load_step(w_ptrs, s_ptr, z_ptr, n, n_ok, g, g_ok, N, GW: tl.constexpr):
    """One step's codes (BN, GPI, GW) int32 and its scales and zeros (BN, GPI, 1) float32, the
    scales and zeros read from their (K/G, N) copies: one coalesced run per group."""
    w = tl.load(w_ptrs + (g * GW)[None, :, None], mask=n_ok[:, None, None] & g_ok[None, :, None],
                other=0)
    sz = g[None, :] * N + n[:, None]                                   # (BN, GPI)
    sz_ok = n_ok[:, None] & g_ok[None, :]
    s = tl.load(s_ptr + sz, mask=sz_ok, other=0.0).to(tl.float32)[:, :, None]
    z = tl.load(z_ptr + sz, mask=sz_ok, other=0).to(tl.float32)[:, :, None]
    return w, s, z


@triton.jit
def _gemv_kernel(x_ptr, qp_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, lock_ptr,
                 N, NG, GROUPS_PER_SPLIT, SPLIT, stride_xm, stride_qn, stride_ym,
                 M: tl.constexpr, GW: tl.constexpr, BLOCK_N: tl.constexpr, GPI: tl.constexpr,
                 SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
    G: tl.constexpr = 8 * GW
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                        # (BN,) output features
    n_ok = n < N
    n64 = n.to(tl.int64)
    gi = tl.arange(0, GPI)                                             # (GPI,) groups per step
    i = tl.arange(0, GW)                                               # (GW,) words of a group
    acc0 = tl.zeros([BLOCK_N, GPI, GW], tl.float32)                    # one per row of x
    acc1 = tl.zeros([BLOCK_N, GPI, GW], tl.float32)
    acc2 = tl.zeros([BLOCK_N, GPI, GW], tl.float32)
    acc3 = tl.zeros([BLOCK_N, GPI, GW], tl.float32)
    g_begin = pid_s * GROUPS_PER_SPLIT
    g_end = tl.minimum(g_begin + GROUPS_PER_SPLIT, NG)
    w_ptrs = qp_ptr + n64[:, None, None] * stride_qn + i[None, None, :]      # (BN, 1, GW)
    # software prefetch: the next step's codes, scales and zeros are loaded before this step's
    # arithmetic, so every warp keeps a load in flight while it computes
    g = g_begin + gi                                                   # (GPI,)
    w_next, s_next, z_next = _load_step(w_ptrs, s_ptr, z_ptr, n, n_ok, g, g < g_end, N, GW)
    pdl_wait(PDL)                      # the weights above went out before x was written (PDL)
    for g0 in range(g_begin, g_end, GPI):
        g = g0 + gi                                                    # (GPI,) this step's groups
        g_ok = g < g_end
        w, s, zz = w_next, s_next, z_next + 16.0                       # (BN, GPI, GW), (BN, GPI, 1) x2
        g_nxt = g + GPI
        w_next, s_next, z_next = _load_step(w_ptrs, s_ptr, z_ptr, n, n_ok, g_nxt, g_nxt < g_end, N, GW)
        xcol = (g * G)[:, None] + i[None, :]                          # (GPI, GW) plane 0's columns
        x_ok = g_ok[:, None]
        t0 = tl.zeros([BLOCK_N, GPI, GW], tl.float32)                 # sum x (16 + q), per word
        t1 = tl.zeros([BLOCK_N, GPI, GW], tl.float32)
        t2 = tl.zeros([BLOCK_N, GPI, GW], tl.float32)
        t3 = tl.zeros([BLOCK_N, GPI, GW], tl.float32)
        xs0 = tl.zeros([GPI, GW], tl.float32)                          # sum x, per word
        xs1 = tl.zeros([GPI, GW], tl.float32)
        xs2 = tl.zeros([GPI, GW], tl.float32)
        xs3 = tl.zeros([GPI, GW], tl.float32)
        for p in tl.static_range(8):
            v = _plane(w, p)                                           # (BN, GPI, GW) 16 + q
            xp = x_ptr + xcol + p * GW                                 # (GPI, GW) plane p's x
            xv = tl.load(xp, mask=x_ok, other=0.0).to(tl.float32)
            t0 += v * xv[None, :, :]
            xs0 += xv
            if M > 1:
                xv = tl.load(xp + stride_xm, mask=x_ok, other=0.0).to(tl.float32)
                t1 += v * xv[None, :, :]
                xs1 += xv
            if M > 2:
                xv = tl.load(xp + 2 * stride_xm, mask=x_ok, other=0.0).to(tl.float32)
                t2 += v * xv[None, :, :]
                xs2 += xv
            if M > 3:
                xv = tl.load(xp + 3 * stride_xm, mask=x_ok, other=0.0).to(tl.float32)
                t3 += v * xv[None, :, :]
                xs3 += xv
        # sum_k x (q - z) s = s (t - (16 + z) xs), per word; masked groups have s = 0
        acc0 += s * (t0 - zz * xs0[None, :, :])
        if M > 1:
            acc1 += s * (t1 - zz * xs1[None, :, :])
        if M > 2:
            acc2 += s * (t2 - zz * xs2[None, :, :])
        if M > 3:
            acc3 += s * (t3 - zz * xs3[None, :, :])
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
        tl.debug_barrier()               # every thread's partials are written before the count
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
            tl.atomic_xchg(lock_ptr + pid_n, 0)                        # ready for the next call
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


# Winners of scripts/gpu_w4a16_gemv.py's sweep on an H200, keyed by (N, K, M) with M in (1, 4):
# M = 2 takes M = 1's tiles, M = 3 takes M = 4's (docs/PERF.md).
TUNED: dict[tuple[int, int, int], dict] = {
    (11008, 4096, 1): dict(BLOCK_N=32, GPI=1, SPLIT=4, num_warps=1),
    (11008, 4096, 4): dict(BLOCK_N=64, GPI=1, SPLIT=7, num_warps=4),
    (12288, 4096, 1): dict(BLOCK_N=64, GPI=1, SPLIT=6, num_warps=4),
    (12288, 4096, 4): dict(BLOCK_N=64, GPI=1, SPLIT=6, num_warps=4),
    (14336, 4096, 1): dict(BLOCK_N=32, GPI=1, SPLIT=3, num_warps=1),
    (14336, 4096, 4): dict(BLOCK_N=64, GPI=1, SPLIT=5, num_warps=4),
    (22016, 4096, 1): dict(BLOCK_N=32, GPI=1, SPLIT=2, num_warps=1),
    (22016, 4096, 4): dict(BLOCK_N=64, GPI=1, SPLIT=4, num_warps=4),
    (4096, 11008, 1): dict(BLOCK_N=64, GPI=1, SPLIT=9, num_warps=4),
    (4096, 11008, 4): dict(BLOCK_N=64, GPI=1, SPLIT=17, num_warps=4),
    (4096, 4096, 1): dict(BLOCK_N=32, GPI=1, SPLIT=9, num_warps=1),
    (4096, 4096, 4): dict(BLOCK_N=64, GPI=1, SPLIT=5, num_warps=4),
}


def _config(M: int, N: int, K: int, G: int) -> dict:
    """Tile sizes. The interpreter gets small tiles and a split (so tests cover it)."""
    ng = K // G
    if interpreted():
        return dict(BLOCK_N=8, GPI=2, SPLIT=min(3, ng), num_warps=1)
    tuned = TUNED.get((N, K, 1 if M <= 2 else 4))
    if tuned is not None:
        return dict(tuned)
    # the sweep's usual winner: 64 rows, one group per step, 4 warps, ~6 programs per SM
    bn, gpi = 64, 1
    tiles = triton.cdiv(N, bn)
    split = max(1, min(ng, triton.cdiv(6 * num_sms(), tiles)))
    return dict(BLOCK_N=bn, GPI=gpi, SPLIT=split, num_warps=4)


def w4a16_gemv_triton(x: torch.Tensor, w: PlanesWeight, bias: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, **config) -> torch.Tensor:
    """Same contract as `w4a16_gemv_ref` for x with at most GEMV_MAX_ROWS rows; `out` (M, N) may
    be given (tests poison it); `config` overrides BLOCK_N, GPI, SPLIT, num_warps."""
    require_triton()
    N, K = w.shape
    lead = x.shape[:-1]
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features; the weight expects in_features={K}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M > GEMV_MAX_ROWS:
        raise ValueError(f"x has {M} rows; this kernel takes at most {GEMV_MAX_ROWS}")
    y = out if out is not None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*lead, N)
    G = w.group_size
    ng = K // G
    cfg = {**_config(M, N, K, G), **config}
    bn, gpi, split = cfg.pop("BLOCK_N"), cfg.pop("GPI"), cfg.pop("SPLIT")
    per_split = triton.cdiv(triton.cdiv(ng, split), gpi) * gpi        # whole steps of GPI groups
    split = triton.cdiv(ng, per_split)
    tiles = triton.cdiv(N, bn)
    assert tiles <= w.locks.numel()
    pdl = pdl_launch(x2)
    part = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 else y
    _gemv_kernel[(tiles, split)](
        x2, w.qplanes, w.scales_t, w.zeros_t, bias if bias is not None else y, y, part, w.locks,
        N, ng, per_split, split, x2.stride(0), w.qplanes.stride(0), y.stride(0), M=M, GW=G // 8, BLOCK_N=bn, GPI=gpi, SPLIT_K=split > 1,
        HAS_BIAS=bias is not None, PDL=pdl, launch_pdl=pdl, **cfg)
    return y.view(*lead, N)

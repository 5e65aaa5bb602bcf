"""paged_decode over an int8/int4 KV cache: one new query token per sequence attends to all of
its cached tokens, reading codes + scales + zeros (kernels/kv_quant.py) instead of K/V.

    paged_decode_quant_ref     PyTorch: per sequence, dequantize its K/V, then attend
    paged_decode_quant_triton  Triton: the kernel of kernels/paged_decode.py (FlashDecoding on the
                               paged cache: one program per (sequence, KV head, split), GQA group
                               packed into the rows of one tile, split-KV + a combine kernel)
                               with the dequantization fused into the tile loop

Why it is faster than bf16: a decode step reads the whole cache once and does little math per
byte, so its time is the bytes read. int8 reads D + 3 bytes per (token, head) instead of 2D,
int4 D/2 + 4. The kernel keeps it that way by never writing a dequantized tile: codes become
float16 by setting exponent bits (kernels/kv_quant_tiles.py) and scale and zero are applied per
token to the scores and the softmax weights (see attend_quant_tile).

Fewer bytes only pay if the loop issues few instructions per byte and keeps the memory busy
(bf16 at 4.3 TB/s spends ~390 SASS instructions per warp on a 64-token tile of 32 KB; the
first int8 kernel spent 960 on 16 KB and ran at half bf16's bandwidth). So with 16-bit queries
the tile is transposed (_attend_quant_tile_t): tokens are the rows of both products, the codes
their first operand and the GQA group their narrow second one, not padded to 16 rows; codes
are read as 32-bit words and converted four at a time (kv_quant_tiles.words_f16), about 410
instructions per 64 tokens; and the next tile's block-table entries, scales and zeros are
loaded one tile ahead (prefetch): in the SASS a tile then waits for one DRAM latency, not three.
"""
from __future__ import annotations

import torch

from kernels._triton import interpreted, require_triton, tl, triton
from kernels.kv_quant import QuantKVCache, gather_dequant
from kernels.kv_quant_tiles import (attend_quant_tile, code_words_f16, scale_and_zero,
                                   load_code_halves, load_code_words, load_query_halves)
from kernels.paged_decode import _reduce_splits_kernel, decode_num_splits
from kernels.paged_kv import attend_ref

__all__ = ["paged_decode_quant_ref", "paged_decode_quant_triton"]


def paged_decode_quant_ref(
    q: torch.Tensor,  # (B, Hq, D) one new token per sequence
    k_cache: QuantKVCache,  # codes (num_blocks, block_size, Hkv, D or D/2) + scale/zero
    v_cache: QuantKVCache,
    block_tables: torch.Tensor,  # (B, max_blocks_per_seq) int32, padded with -1 or 0
    context_lens: torch.Tensor,  # (B,) int32, cached tokens incl. the new one
    scale: float,
) -> torch.Tensor:
    """Decode attention over the quantized cache, the readable way: dequantize exactly the
    context_len tokens of each sequence (float32, or q's dtype if wider), then attend as
    paged_decode_ref does. Returns (B, Hq, D) in q's dtype; a row with context_len 0 gets zeros."""
    out = torch.zeros_like(q)  # (B, Hq, D)
    dtype = torch.promote_types(q.dtype, torch.float32)
    tables, lens = block_tables.tolist(), context_lens.tolist()  # one host sync per call
    for b, n in enumerate(lens):
        if n == 0:
            continue
        kb = gather_dequant(k_cache, tables[b], n, dtype)  # (n, Hkv, D)
        vb = gather_dequant(v_cache, tables[b], n, dtype)
        out[b] = attend_ref(q[b, None].to(dtype), kb, vb, None, scale)[0].to(q.dtype)  # (Hq, D)
    return out


# ----------------------------------------------------------------------------- Triton
@triton.jit
def _codes_f32(c):
    """uint8 codes -> float32 without an int->float conversion instruction: 0x4B000000 | c is
    the float 2^23 + c, exactly; one integer OR and one exact subtraction."""
    return (c.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _attend_quant_tile_fma(q_lo, q_hi, q_sum, m_i, l_i, acc_lo, acc_hi, rows, valid,
                           kd_ptr, ks_ptr, kz_ptr, vd_ptr, vs_ptr, vz_ptr, qk_scale,
                           D: tl.constexpr, BITS: tl.constexpr):
    """attend_quant_tile on CUDA cores (DOT=False, an experiment): the few query rows of a GQA
    group (M = next power of 2 of the group, no padding to 16 for tl.dot) against BN tokens as
    broadcast multiply-adds in float32; same algebra (scale and zero folded in per token)."""
    k_s, k_zc = scale_and_zero(ks_ptr, kz_ptr, rows, valid, 0.0, BITS)        # (BN,) x2
    k_lo, k_hi = load_code_halves(kd_ptr, rows, valid, D, BITS, False)         # (BN, D/2) uint8
    qc = tl.sum(q_lo[:, None, :] * _codes_f32(k_lo)[None, :, :], 2)
    qc += tl.sum(q_hi[:, None, :] * _codes_f32(k_hi)[None, :, :], 2)           # (M, BN) q . c
    qk = (qc - q_sum[:, None] * k_zc[None, :]) * (k_s * qk_scale)[None, :]
    qk = tl.where(valid[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))                                     # (M,)
    m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
    p = tl.math.exp2(qk - m_use[:, None])                                      # (M, BN)
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v_s, v_zc = scale_and_zero(vs_ptr, vz_ptr, rows, valid, 0.0, BITS)
    v_lo, v_hi = load_code_halves(vd_ptr, rows, valid, D, BITS, False)
    ps = p * v_s[None, :]                                                      # (M, BN)
    corr = tl.sum(ps * v_zc[None, :], 1)                                       # (M,)
    pv_lo = tl.sum(ps[:, :, None] * _codes_f32(v_lo)[None, :, :], 1)           # (M, D/2)
    pv_hi = tl.sum(ps[:, :, None] * _codes_f32(v_hi)[None, :, :], 1)
    acc_lo = acc_lo * alpha[:, None] + pv_lo - corr[:, None]
    acc_hi = acc_hi * alpha[:, None] + pv_hi - corr[:, None]
    return m_new, l_i, acc_lo, acc_hi


@triton.jit
def _tile_meta(tables_row_ptr, n0, end, h, ks_ptr, kz_ptr, vs_ptr, vz_ptr,
               BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HKV: tl.constexpr,
               BITS: tl.constexpr):
    """Tokens [n0, n0 + BN) (those < end): valid (BN,), cache rows (BN,), per-token K scale and
    zero (BN,) x2 and V's. A tile past `end` is all masked: it reads nothing."""
    t = n0 + tl.arange(0, BLOCK_N)                               # (BN,) token positions
    valid = t < end
    blk = tl.load(tables_row_ptr + t // BLOCK_SIZE, mask=valid, other=0)
    rows = (blk.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE) * HKV + h  # (BN,) cache rows
    k_s, k_zc = scale_and_zero(ks_ptr, kz_ptr, rows, valid, 1024.0, BITS)   # 1024: MAGIC
    v_s, v_zc = scale_and_zero(vs_ptr, vz_ptr, rows, valid, 1024.0, BITS)
    return valid, rows, k_s, k_zc, v_s, v_zc


@triton.jit
def _load_tile_t(meta, kd_ptr, vd_ptr, D: tl.constexpr, BITS: tl.constexpr):
    """Everything _attend_quant_tile_t reads of the tile `meta` (_tile_meta) describes: valid,
    K scale and zero, K code words (BN, D/8) x2, V's."""
    valid, rows, k_s, k_zc, v_s, v_zc = meta
    k_lo, k_hi = load_code_words(kd_ptr, rows, valid, D, BITS)
    v_lo, v_hi = load_code_words(vd_ptr, rows, valid, D, BITS)
    return valid, k_s, k_zc, k_lo, k_hi, v_s, v_zc, v_lo, v_hi


@triton.jit
def _attend_quant_tile_t(qt_lo, qt_hi, q_sum, m_i, l_i, acc_lo, acc_hi, tile, qk_scale,
                         BITS: tl.constexpr, ASM: tl.constexpr):
    """attend_quant_tile transposed, for the GP (= GQA group, a power of 2) query heads of
    decode with float16 MAGIC codes: qt_lo/qt_hi (D/2, GP) float16, q_sum (GP,); acc_lo/acc_hi
    (D/2, GP) float32, the output transposed; `tile` from _load_tile_t. Same algebra as
    attend_quant_tile (scale and zero folded in per token).

    Why transposed: the codes are the first operand of both products and the query group the
    second, so (a) Triton reads the code words from shared memory with ldmatrix and converts
    them in the operand registers (as uint8 in the other orientation it moves them one byte
    at a time), (b) the group is the narrow N side, which tl.dot pads internally, instead of
    16 padded rows that the softmax below would also pay for (4x the work at a group of 4)."""
    valid, k_s, k_zc, k_lo, k_hi, v_s, v_zc, v_lo, v_hi = tile
    # ---- scores: k_hat . q, tokens as rows
    qc = tl.dot(code_words_f16(k_lo, BITS, ASM), qt_lo)
    qc += tl.dot(code_words_f16(k_hi, BITS, ASM), qt_hi)                       # (BN, GP) c . q
    qk = (qc - k_zc[:, None] * q_sum[None, :]) * (k_s * qk_scale)[:, None]      # log2 units
    qk = tl.where(valid[:, None], qk, float("-inf"))
    # ---- online softmax over the tokens (axis 0)
    m_new = tl.maximum(m_i, tl.max(qk, 0))                                      # (GP,)
    m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
    p = tl.math.exp2(qk - m_use[None, :])                                       # (BN, GP)
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 0)
    # ---- values: codes^T (p s) - corr, transposed: acc (D/2, GP)
    ps = (p * v_s[:, None]).to(tl.float16)                       # (BN, GP) weights x scales
    corr = tl.sum(ps.to(tl.float32) * v_zc[:, None], 0)          # (GP,) from the rounded weights
    pv_lo = tl.dot(tl.trans(code_words_f16(v_lo, BITS, ASM)), ps)              # (D/2, GP)
    pv_hi = tl.dot(tl.trans(code_words_f16(v_hi, BITS, ASM)), ps)
    acc_lo = acc_lo * alpha[None, :] + pv_lo - corr[None, :]
    acc_hi = acc_hi * alpha[None, :] + pv_hi - corr[None, :]
    return m_new, l_i, acc_lo, acc_hi


@triton.jit
def _decode_quant_kernel(
    q_ptr, kd_ptr, ks_ptr, kz_ptr, vd_ptr, vs_ptr, vz_ptr, tables_ptr, lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale,                                   # softmax scale x log2(e)
    stride_qb, stride_qh, stride_tb, stride_ob, stride_oh,
    BLOCK_SIZE: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
    GROUP_P: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BITS: tl.constexpr, MAGIC: tl.constexpr, IEEE: tl.constexpr, DOT: tl.constexpr,
    TRANS: tl.constexpr, ASM: tl.constexpr, PREFETCH: tl.constexpr,
):
    HALF: tl.constexpr = D // 2
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    # this split's token range [start, end), whole tiles except at the end of the context
    tiles_per_split = tl.cdiv(tl.cdiv(ctx, BLOCK_N), NUM_SPLITS)
    start = s * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, ctx)

    g = tl.arange(0, GROUP_P)                                    # (GP,) query head in group
    gm = g < GROUP
    heads = h * GROUP + g                                        # (GP,) query head ids
    q_lo, q_hi, q_sum = load_query_halves(q_ptr + b * stride_qb + heads[:, None] * stride_qh,
                                          gm[:, None], D, MAGIC)  # (GP, HALF) x2, (GP,)
    if not DOT:
        q_lo, q_hi = q_lo.to(tl.float32), q_hi.to(tl.float32)
    if TRANS:                                                    # see _attend_quant_tile_t
        qt_lo, qt_hi = tl.trans(q_lo), tl.trans(q_hi)            # (HALF, GP) x2
        acc_lo = tl.zeros([HALF, GROUP_P], tl.float32)           # running p @ V, transposed
        acc_hi = tl.zeros([HALF, GROUP_P], tl.float32)
    else:
        acc_lo = tl.zeros([GROUP_P, HALF], tl.float32)           # running p @ V, two halves
        acc_hi = tl.zeros([GROUP_P, HALF], tl.float32)
    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)          # running max (log2 domain)
    l_i = tl.zeros([GROUP_P], tl.float32)                        # running sum of exp2
    if TRANS:
        tables_row = tables_ptr + b * stride_tb
        # PREFETCH: tile i + 1's block-table entries, scales and zeros are loaded during tile i
        # (see the launcher); its codes are Triton's pipeliner's (tl.load -> cp.async)
        if PREFETCH:
            meta = _tile_meta(tables_row, start, end, h, ks_ptr, kz_ptr, vs_ptr, vz_ptr,
                              BLOCK_N, BLOCK_SIZE, HKV, BITS)
        for n0 in range(start, end, BLOCK_N):
            if PREFETCH:
                tile = _load_tile_t(meta, kd_ptr, vd_ptr, D, BITS)
                meta = _tile_meta(tables_row, n0 + BLOCK_N, end, h, ks_ptr, kz_ptr, vs_ptr,
                                  vz_ptr, BLOCK_N, BLOCK_SIZE, HKV, BITS)
            else:
                tile = _load_tile_t(_tile_meta(tables_row, n0, end, h, ks_ptr, kz_ptr, vs_ptr,
                                               vz_ptr, BLOCK_N, BLOCK_SIZE, HKV, BITS),
                                    kd_ptr, vd_ptr, D, BITS)
            m_i, l_i, acc_lo, acc_hi = _attend_quant_tile_t(
                qt_lo, qt_hi, q_sum, m_i, l_i, acc_lo, acc_hi, tile, qk_scale, BITS, ASM)
    else:
        for n0 in range(start, end, BLOCK_N):
            t = n0 + tl.arange(0, BLOCK_N)                           # (BN,) token positions
            valid = t < end
            blk = tl.load(tables_ptr + b * stride_tb + t // BLOCK_SIZE, mask=valid, other=0)
            rows = (blk.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE) * HKV + h  # (BN,) cache rows
            if DOT:
                m_i, l_i, acc_lo, acc_hi = attend_quant_tile(
                    q_lo, q_hi, q_sum, m_i, l_i, acc_lo, acc_hi, rows, valid, valid[None, :],
                    kd_ptr, ks_ptr, kz_ptr, vd_ptr, vs_ptr, vz_ptr, qk_scale, D, BITS, MAGIC, IEEE,
                    True)
            else:
                m_i, l_i, acc_lo, acc_hi = _attend_quant_tile_fma(
                    q_lo, q_hi, q_sum, m_i, l_i, acc_lo, acc_hi, rows, valid,
                    kd_ptr, ks_ptr, kz_ptr, vd_ptr, vs_ptr, vz_ptr, qk_scale, D, BITS)
    if TRANS:
        acc_lo, acc_hi = tl.trans(acc_lo), tl.trans(acc_hi)      # (GP, HALF) x2
    l_safe = tl.where(l_i > 0, l_i, 1.0)                         # empty range: zeros, not NaN
    o_lo = acc_lo / l_safe[:, None]                              # (GP, HALF)
    o_hi = acc_hi / l_safe[:, None]
    dl = tl.arange(0, HALF)
    if NUM_SPLITS == 1:
        dst = out_ptr + b * stride_ob + heads[:, None] * stride_oh + dl[None, :]
        tl.store(dst, o_lo.to(out_ptr.dtype.element_ty), mask=gm[:, None])
        tl.store(dst + HALF, o_hi.to(out_ptr.dtype.element_ty), mask=gm[:, None])
    else:
        # partials laid out (B, Hq, NUM_SPLITS, D) and (B, Hq, NUM_SPLITS), as paged_decode's
        base = (b * (HKV * GROUP) + heads) * NUM_SPLITS + s      # (GP,)
        dst = part_out_ptr + base[:, None] * D + dl[None, :]
        tl.store(dst, o_lo, mask=gm[:, None])
        tl.store(dst + HALF, o_hi, mask=gm[:, None])
        lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + base, lse, mask=gm)


def paged_decode_quant_triton(q, k_cache: QuantKVCache, v_cache: QuantKVCache, block_tables,
                              context_lens, scale, num_splits: int | None = None,
                              block_n: int | None = None, num_warps: int | None = None,
                              num_stages: int | None = None, magic: bool | None = None,
                              out: torch.Tensor | None = None, dot: bool = True,
                              transposed: bool | None = None, prefetch: bool = True,
                              max_registers: int | None = None) -> torch.Tensor:
    """Same contract as `paged_decode_quant_ref`; one launch (two with split-KV), no host sync.
    `magic` (default: for 16-bit q) turns codes into float16 without conversion instructions;
    `transposed` (default: with magic) takes _attend_quant_tile_t, tokens as rows (False: the
    first kernel's tile, kept for float32 q and as the measured baseline); `prefetch` (with
    transposed) loads tile i + 1's block-table entries, scales and zeros during tile i
    (without it each tile waits out three dependent DRAM latencies: Triton's pipeliner keeps
    one buffer here and issues the next copy after the math); `max_registers` caps registers
    per thread (ptxas maxnreg; default 128 with transposed, see below); `out`
    (B, Hq, D), when given, receives the result (tests poison it first); `dot=False` (an
    experiment, scripts/gpu_kvquant.py times it) does the products on CUDA cores."""
    require_triton()
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.data.shape
    assert k_cache.head_dim == D and Hq % Hkv == 0 and D == triton.next_power_of_2(D) and D >= 32
    assert k_cache.bits == v_cache.bits and q.stride(-1) == 1
    out = torch.empty_like(q) if out is None else out                      # (B, Hq, D)
    if B == 0:
        return out
    group = Hq // Hkv
    splits = num_splits or decode_num_splits(B, Hkv, q.device)
    magic = (q.dtype != torch.float32 if magic is None else magic) and dot
    transposed = magic if transposed is None else transposed
    assert magic or not transposed, "the transposed tile takes float16 (magic) codes"
    # H200, B=64 L=2048 32/8 d=128 (scripts/gpu_decode_quant_tiles.py, docs/PERF.md): the
    # transposed tile is fastest with 128-token tiles, 4 warps, 2 stages and at most 128
    # registers (int8 89 us, int4 78 us): the 512 programs of that shape are all resident only
    # at <= 128 registers x 128 threads (4 per SM); the same tile without prefetch or cap took
    # 146 registers and 169 us. The first kernel's tile: 64 tokens, 4 warps, 4 (int8) / 3
    # (int4) stages.
    block_n = block_n or (128 if transposed else 64)
    num_warps = num_warps or 4
    num_stages = num_stages or (2 if transposed else 4 if k_cache.bits == 8 else 3)
    if max_registers is None and transposed and not interpreted():
        max_registers = 128
    # the GQA group as rows of a tile: 16 for the first kernel's tl.dot (its M side), unpadded
    # when transposed (the N side, padded inside tl.dot) or on CUDA cores
    group_p = triton.next_power_of_2(group)
    if dot and not transposed:
        group_p = max(16, group_p)
    if splits > 1:
        part_out = torch.empty((B, Hq, splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out                                          # unused
    _decode_quant_kernel[(B, Hkv, splits)](
        q, k_cache.data, k_cache.scale, k_cache.zero, v_cache.data, v_cache.scale, v_cache.zero,
        block_tables, context_lens, out, part_out, part_lse,
        scale * 1.4426950408889634, q.stride(0), q.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, HKV=Hkv, D=D, GROUP=group,
        GROUP_P=group_p, BLOCK_N=block_n,
        NUM_SPLITS=splits, BITS=k_cache.bits, MAGIC=magic, DOT=dot, TRANS=transposed,
        ASM=not interpreted(),                  # the interpreter runs no inline PTX
        PREFETCH=prefetch and transposed,
        IEEE=not magic and q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
        **({} if max_registers is None or interpreted() else dict(maxnreg=max_registers)))
    if splits > 1:
        _reduce_splits_kernel[(B, Hq)](part_out, part_lse, out, out.stride(0), out.stride(1),
                                       HQ=Hq, D=D, NUM_SPLITS=splits,
                                       SPLITS_P=triton.next_power_of_2(splits),
                                       PDL=False, num_warps=4)   # a plain launch, as above
    return out

"""paged_prefill over an int8/int4 KV cache: the new tokens of several sequences (packed,
variable length) attend to their cached prefix and, causally, to each other, all read back
from the quantized cache (the new tokens' K/V are quantized and stored first, so a prompt
sees exactly what later decode steps will see).

Sequence b brings q_len = cu_seqlens_q[b+1] - cu_seqlens_q[b] new tokens and has context_len
tokens cached in all; new token j sits at position context_len - q_len + j.

    paged_prefill_quant_ref     PyTorch: per sequence, dequantize its K/V, then attend
    paged_prefill_quant_triton  Triton: kernels/paged_prefill.py's FlashAttention-2 forward on
                                the paged cache (one program per (query tile, sequence, query
                                head)) with the dequantization fused into the tile loop
"""
from __future__ import annotations

import torch

from kernels._triton import require_triton, tl, triton
from kernels.kv_quant import QuantKVCache, gather_dequant
from kernels.kv_quant_tiles import attend_quant_tile, load_query_halves
from kernels.paged_kv import attend_ref

__all__ = ["paged_prefill_quant_ref", "paged_prefill_quant_triton"]


def paged_prefill_quant_ref(
    q: torch.Tensor,  # (Nq, Hq, D) new tokens of all B sequences, packed
    k_cache: QuantKVCache,  # codes (num_blocks, block_size, Hkv, D or D/2) + scale/zero
    v_cache: QuantKVCache,
    block_tables: torch.Tensor,  # (B, max_blocks_per_seq) int32, padded with -1 or 0
    cu_seqlens_q: torch.Tensor,  # (B+1,) int32
    context_lens: torch.Tensor,  # (B,) int32, cached prefix + new tokens
    scale: float,
) -> torch.Tensor:
    """Variable-length causal prefill over the quantized cache: dequantize each sequence's
    context_len tokens (float32, or q's dtype if wider), then attend as paged_prefill_ref does.
    Returns (Nq, Hq, D) in q's dtype."""
    out = torch.empty_like(q)  # (Nq, Hq, D)
    dtype = torch.promote_types(q.dtype, torch.float32)
    starts = cu_seqlens_q.tolist()  # B+1 ints, one host sync per call
    lens, tables = context_lens.tolist(), block_tables.tolist()
    for b, kv_len in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        q_len = e - s
        if q_len == 0:
            continue
        kb = gather_dequant(k_cache, tables[b], kv_len, dtype)  # (kv_len, Hkv, D)
        vb = gather_dequant(v_cache, tables[b], kv_len, dtype)
        qb = q[s:e].to(dtype)  # (q_len, Hq, D)
        if q_len == kv_len:  # no cached prefix: ordinary causal attention
            out[s:e] = attend_ref(qb, kb, vb, None, scale, causal=True).to(q.dtype)
            continue
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)  # (q_len,)
        mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]  # (q_len, kv_len)
        out[s:e] = attend_ref(qb, kb, vb, mask, scale).to(q.dtype)
    return out


# ----------------------------------------------------------------------------- Triton
@triton.jit
def _prefill_quant_tile(q_lo, q_hi, q_sum, m_i, l_i, acc_lo, acc_hi, n0, kv_end, q_pos, b, h,
                        tables_ptr, stride_tb, kd_ptr, ks_ptr, kz_ptr, vd_ptr, vs_ptr, vz_ptr,
                        qk_scale, BLOCK_SIZE: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                        BLOCK_N: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr,
                        IEEE: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys n0 .. n0+BLOCK_N of sequence b, KV head h; CAUSAL for the tiles on the diagonal."""
    t = n0 + tl.arange(0, BLOCK_N)                               # (BN,) key positions
    valid = t < kv_end
    blk = tl.load(tables_ptr + b * stride_tb + t // BLOCK_SIZE, mask=valid, other=0)
    rows = (blk.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE) * HKV + h  # (BN,) cache rows
    see = valid[None, :] & (t[None, :] <= q_pos[:, None])        # (BM, BN) causal mask
    return attend_quant_tile(q_lo, q_hi, q_sum, m_i, l_i, acc_lo, acc_hi, rows, valid, see,
                             kd_ptr, ks_ptr, kz_ptr, vd_ptr, vs_ptr, vz_ptr, qk_scale, D, BITS,
                             MAGIC, IEEE, CAUSAL)


@triton.jit
def _prefill_quant_kernel(
    q_ptr, kd_ptr, ks_ptr, kz_ptr, vd_ptr, vs_ptr, vz_ptr, tables_ptr, cu_ptr, lens_ptr, out_ptr,
    qk_scale, stride_qn, stride_qh, stride_tb, stride_on, stride_oh,
    BLOCK_SIZE: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr,
    IEEE: tl.constexpr,
):
    HALF: tl.constexpr = D // 2
    mt = tl.program_id(0)                       # query tile
    b = tl.program_id(1)                        # sequence
    hq = tl.program_id(2)                       # query head
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    if mt * BLOCK_M >= q_len:
        return
    ctx = tl.load(lens_ptr + b)
    prefix = ctx - q_len                        # cached tokens before the first new one
    h = hq // GROUP                             # its KV head
    i = mt * BLOCK_M + tl.arange(0, BLOCK_M)    # (BM,) new-token index within the sequence
    im = i < q_len
    q_lo, q_hi, q_sum = load_query_halves(q_ptr + (q_start + i)[:, None] * stride_qn + hq * stride_qh,
                                          im[:, None], D, MAGIC)  # (BM, HALF) x2, (BM,)
    q_pos = prefix + i                                           # (BM,) absolute positions
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_lo = tl.zeros([BLOCK_M, HALF], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, HALF], tl.float32)
    # keys before the tile's first query position are visible to all its rows: no mask there;
    # only the tiles from there to the tile's last position need the causal mask
    kv_end = tl.minimum(ctx, prefix + (mt + 1) * BLOCK_M)
    full_end = ((prefix + mt * BLOCK_M) // BLOCK_N) * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        m_i, l_i, acc_lo, acc_hi = _prefill_quant_tile(
            q_lo, q_hi, q_sum, m_i, l_i, acc_lo, acc_hi, n0, kv_end, q_pos, b, h, tables_ptr,
            stride_tb, kd_ptr, ks_ptr, kz_ptr, vd_ptr, vs_ptr, vz_ptr, qk_scale,
            BLOCK_SIZE, HKV, D, BLOCK_N, BITS, MAGIC, IEEE, False)
    for n0 in range(full_end, kv_end, BLOCK_N):
        m_i, l_i, acc_lo, acc_hi = _prefill_quant_tile(
            q_lo, q_hi, q_sum, m_i, l_i, acc_lo, acc_hi, n0, kv_end, q_pos, b, h, tables_ptr,
            stride_tb, kd_ptr, ks_ptr, kz_ptr, vd_ptr, vs_ptr, vz_ptr, qk_scale,
            BLOCK_SIZE, HKV, D, BLOCK_N, BITS, MAGIC, IEEE, True)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    dl = tl.arange(0, HALF)
    dst = out_ptr + (q_start + i)[:, None] * stride_on + hq * stride_oh + dl[None, :]
    tl.store(dst, (acc_lo / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=im[:, None])
    tl.store(dst + HALF, (acc_hi / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=im[:, None])


def paged_prefill_quant_triton(q, k_cache: QuantKVCache, v_cache: QuantKVCache, block_tables,
                               cu_seqlens_q, context_lens, scale, max_seqlen_q: int | None = None,
                               block_m: int = 64, block_n: int = 64, num_warps: int = 4,
                               num_stages: int = 2, magic: bool | None = None,
                               out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `paged_prefill_quant_ref`. `max_seqlen_q` (known to the scheduler)
    sizes the grid without a host sync; `magic` as in paged_decode_quant_triton; `out`
    (Nq, Hq, D), when given, receives the result (tests poison it first)."""
    require_triton()
    N, Hq, D = q.shape
    B = cu_seqlens_q.shape[0] - 1
    _, block_size, Hkv, _ = k_cache.data.shape
    assert k_cache.head_dim == D and Hq % Hkv == 0 and D == triton.next_power_of_2(D) and D >= 32
    assert k_cache.bits == v_cache.bits and q.stride(-1) == 1
    out = torch.empty_like(q) if out is None else out                      # (N, Hq, D)
    if N == 0 or B == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())  # host sync
    magic = q.dtype != torch.float32 if magic is None else magic
    if q.dtype == torch.float32 and not magic:   # fp32 tiles take twice the shared memory
        block_m, block_n = min(block_m, 32), min(block_n, 32)
    grid = (triton.cdiv(max_seqlen_q, block_m), B, Hq)
    _prefill_quant_kernel[grid](
        q, k_cache.data, k_cache.scale, k_cache.zero, v_cache.data, v_cache.scale, v_cache.zero,
        block_tables, cu_seqlens_q, context_lens, out,
        scale * 1.4426950408889634, q.stride(0), q.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, HKV=Hkv, D=D, GROUP=Hq // Hkv, BLOCK_M=block_m, BLOCK_N=block_n,
        BITS=k_cache.bits, MAGIC=magic, IEEE=not magic and q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages)
    return out

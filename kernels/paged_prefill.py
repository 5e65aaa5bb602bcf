"""paged_prefill: the new tokens of several sequences (packed, variable length) attend to
their cached prefix and, causally, to each other.

Sequence b brings q_len = cu_seqlens_q[b+1] - cu_seqlens_q[b] new tokens and has context_len
tokens in the cache in all (its new k/v are stored first), so new token j sits at absolute
position context_len - q_len + j and sees positions <= its own: the whole cached prefix (a
prefix-cache hit, or the earlier chunks of a chunked prefill) plus the new tokens up to itself.

    paged_prefill_ref     PyTorch: one sequence at a time, gather its K/V, fused SDPA
    paged_prefill_triton  Triton: one launch for the batch (FlashAttention-2 forward on the
                          paged cache): one program per (query tile, sequence, query head)
"""
from __future__ import annotations

import torch

from kernels._triton import require_triton, tl, triton
from kernels.paged_kv import attend_ref, gather_kv

__all__ = ["paged_prefill_ref", "paged_prefill_triton"]


def paged_prefill_ref(
    q: torch.Tensor,  # (Nq, Hq, D) new tokens of all B sequences, packed
    k: torch.Tensor,  # (Nq, Hkv, D) their keys (already stored; unused by the reference)
    v: torch.Tensor,  # (Nq, Hkv, D) their values (already stored; unused by the reference)
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    block_tables: torch.Tensor,  # (B, max_blocks_per_seq) int32, padded with -1 or 0
    cu_seqlens_q: torch.Tensor,  # (B+1,) int32, sequence b's new tokens are q[cu[b]:cu[b+1]]
    context_lens: torch.Tensor,  # (B,) int32, cached prefix + new tokens, per sequence
    scale: float,
) -> torch.Tensor:
    """Variable-length causal prefill, optionally after a cached prefix (prefix-cache hit or
    the 2nd chunk of a chunked prompt).

    Sequence b has q_len = cu[b+1] - cu[b] new tokens and context_len tokens in total, so its
    new token j sits at absolute position context_len - q_len + j and attends to positions
    <= its own: the whole cached prefix plus the new tokens up to itself. The new k/v must
    already be in the cache (store_kv first); the reference reads everything from there, one
    sequence at a time. Softmax in float32; returns (Nq, Hq, D) in q's dtype.
    """
    out = torch.empty_like(q)  # (Nq, Hq, D)
    starts = cu_seqlens_q.tolist()  # B+1 ints, one host sync per call
    lens, tables = context_lens.tolist(), block_tables.tolist()  # B ints, B rows
    for b, kv_len in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        q_len = e - s
        if q_len == 0:
            continue
        kb, vb = gather_kv(k_cache, v_cache, tables[b], kv_len)  # (kv_len, Hkv, D) each
        if q_len == kv_len:  # no cached prefix: ordinary causal attention
            out[s:e] = attend_ref(q[s:e], kb, vb, None, scale, causal=True)  # (q_len, Hq, D)
            continue
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)  # (q_len,) absolute positions
        k_pos = torch.arange(kv_len, device=q.device)  # (kv_len,)
        mask = k_pos[None, :] <= q_pos[:, None]  # (q_len, kv_len) causal after the prefix
        out[s:e] = attend_ref(q[s:e], kb, vb, mask, scale)  # (q_len, Hq, D)
    return out


# ----------------------------------------------------------------------------- Triton
@triton.jit
def _prefill_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, tables_ptr, b, h, stride_tb, n0,
                  kv_end, q_pos, qk_scale, BLOCK_SIZE: tl.constexpr, HKV: tl.constexpr,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    """One KV tile of online softmax: keys n0 .. n0+BLOCK_N of sequence b, KV head h."""
    d = tl.arange(0, D)
    t = n0 + tl.arange(0, BLOCK_N)                               # (BN,) key positions
    valid = t < kv_end
    blk = tl.load(tables_ptr + b * stride_tb + t // BLOCK_SIZE, mask=valid, other=0)
    row = (blk.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE) * (HKV * D) + h * D  # (BN,)
    k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)  # (BN, D)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")       # (BM, BN)
    else:
        qk = tl.dot(q, tl.trans(k))
    if CAUSAL:                                                   # the tiles on the diagonal
        see = valid[None, :] & (t[None, :] <= q_pos[:, None])    # (BM, BN)
        qk = tl.where(see, qk * qk_scale, float("-inf"))
    else:                                                        # below it: every key visible
        qk = qk * qk_scale
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new > float("-inf"), m_new, 0.0)          # padded query rows see nothing
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, cu_ptr, lens_ptr, out_ptr,
    qk_scale, stride_qn, stride_qh, stride_tb, stride_on, stride_oh,
    BLOCK_SIZE: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
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
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (q_start + i)[:, None] * stride_qn + hq * stride_qh + d[None, :],
                mask=(i < q_len)[:, None], other=0.0)            # (BM, D)
    q_pos = prefix + i                                           # (BM,) absolute positions
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # keys before the tile's first query position are visible to all its rows: no mask there;
    # only the tiles from there to the tile's last position need the causal mask
    kv_end = tl.minimum(ctx, prefix + (mt + 1) * BLOCK_M)
    full_end = ((prefix + mt * BLOCK_M) // BLOCK_N) * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _prefill_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, tables_ptr, b, h,
                                      stride_tb, n0, kv_end, q_pos, qk_scale, BLOCK_SIZE, HKV, D,
                                      BLOCK_N, False, IEEE)
    for n0 in range(full_end, kv_end, BLOCK_N):
        m_i, l_i, acc = _prefill_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, tables_ptr, b, h,
                                      stride_tb, n0, kv_end, q_pos, qk_scale, BLOCK_SIZE, HKV, D,
                                      BLOCK_N, True, IEEE)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + i)[:, None] * stride_on + hq * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=(i < q_len)[:, None])


def paged_prefill_triton(q, k, v, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                         scale, max_seqlen_q: int | None = None, block_m: int = 64,
                         block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `paged_prefill_ref` (k, v unused: they are in the cache already);
    `out` (Nq, Hq, D), when given, receives the result (tests poison it first).
    `max_seqlen_q` (known to the caller, the scheduler) sizes the grid without a host sync."""
    require_triton()
    N, Hq, D = q.shape
    B = cu_seqlens_q.shape[0] - 1
    _, block_size, Hkv, _ = k_cache.shape
    assert Hq % Hkv == 0 and D == triton.next_power_of_2(D) and q.stride(-1) == 1
    out = torch.empty_like(q) if out is None else out                      # (N, Hq, D)
    if N == 0 or B == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())  # host sync
    if q.dtype == torch.float32:                # fp32 tiles take twice the shared memory
        block_m, block_n = min(block_m, 32), min(block_n, 32)
    grid = (triton.cdiv(max_seqlen_q, block_m), B, Hq)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        scale * 1.4426950408889634, q.stride(0), q.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, HKV=Hkv, D=D, GROUP=Hq // Hkv, BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages)
    return out

"""paged_decode: one new query token per sequence attends to all of its cached tokens.

    paged_decode_ref     PyTorch: one sequence at a time, gather its K/V, fused SDPA
    paged_decode_triton  Triton: the whole batch in one launch, reading blocks in place

The Triton kernel (FlashDecoding over a paged cache):
- one program per (sequence b, KV head h, split s). The program holds the GROUP = Hq/Hkv query
  heads that read KV head h as the rows of one (GROUP_P, D) tile, padded to 16 rows, so
  q @ K^T and p @ V are `tl.dot`s on the tensor cores and each K/V byte is read once for the
  whole group (GQA packing);
- it walks its share of the context in tiles of BLOCK_N tokens. A tile's tokens are looked up
  through the block table one by one (`slot = table[t // block_size] * block_size + t %
  block_size`), so BLOCK_N is independent of the cache's block size;
- online softmax in float32 (running max m, running sum l, rescaled accumulator), exp2 with
  log2(e) folded into the scale;
- split-KV: when batch x Hkv programs cannot fill the GPU, each sequence's context is cut into
  NUM_SPLITS ranges; each program writes its partial output and log-sum-exp, and a second
  kernel combines them: out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse).
The grid depends only on the batch size and the heads, never on the context lengths (read on
the device), so a CUDA graph captured at one batch size replays for any lengths. A sequence
with context_len 0 (a padding row of such a graph) writes zeros.
"""
from __future__ import annotations

import math

import torch

from kernels._triton import num_sms, pdl_launch, pdl_wait, require_triton, tl, triton
from kernels.paged_kv import attend_ref, gather_kv

__all__ = ["paged_decode_ref", "paged_decode_triton", "decode_num_splits"]


def paged_decode_ref(
    q: torch.Tensor,  # (B, Hq, D) one new token per sequence
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    block_tables: torch.Tensor,  # (B, max_blocks_per_seq) int32, padded with -1 or 0
    context_lens: torch.Tensor,  # (B,) int32, cached tokens incl. the new one
    scale: float,
) -> torch.Tensor:
    """Decode attention, the readable way.

    The new token's k/v must already be in the cache (store_kv first). One sequence at a
    time: gather exactly its context_len tokens (so no padding slot is ever read, and no mask
    is needed: the new token may see every earlier token) and attend. Softmax in float32;
    returns (B, Hq, D) in q's dtype. A row with context_len 0 gets zeros.
    """
    out = torch.zeros_like(q)  # (B, Hq, D)
    tables, lens = block_tables.tolist(), context_lens.tolist()  # one host sync per call
    for b, n in enumerate(lens):
        if n == 0:
            continue
        kb, vb = gather_kv(k_cache, v_cache, tables[b], n)  # (n, Hkv, D) each
        out[b] = attend_ref(q[b, None], kb, vb, None, scale)[0]  # (Hq, D)
    return out


# ----------------------------------------------------------------------------- Triton
@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale,                                   # softmax scale x log2(e)
    stride_qb, stride_qh, stride_tb, stride_ob, stride_oh,
    BLOCK_SIZE: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
    GROUP_P: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr,
    PDL: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    pdl_wait(PDL)                              # q and the new token's K/V: just written
    ctx = tl.load(lens_ptr + b)
    # this split's token range [start, end), whole tiles except at the end of the context
    tiles_per_split = tl.cdiv(tl.cdiv(ctx, BLOCK_N), NUM_SPLITS)
    start = s * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, ctx)

    g = tl.arange(0, GROUP_P)                                    # (GP,) query head in group
    d = tl.arange(0, D)                                          # (D,)
    heads = h * GROUP + g                                        # (GP,) query head ids
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g[:, None] < GROUP, other=0.0)              # (GP, D)
    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)          # running max (log2 domain)
    l_i = tl.zeros([GROUP_P], tl.float32)                        # running sum of exp2
    acc = tl.zeros([GROUP_P, D], tl.float32)                     # running p @ V
    for n0 in range(start, end, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)                           # (BN,) token positions
        valid = t < end
        blk = tl.load(tables_ptr + b * stride_tb + t // BLOCK_SIZE, mask=valid, other=0)
        row = (blk.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE) * (HKV * D) + h * D  # (BN,)
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)  # (BN, D)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")   # (GP, BN)
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))                   # (GP,)
        p = tl.math.exp2(qk - m_new[:, None])                    # (GP, BN)
        alpha = tl.math.exp2(m_i - m_new)                        # (GP,)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)  # (BN, D)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv                          # (GP, D)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)                         # empty range: zeros, not NaN
    o = acc / l_safe[:, None]                                    # (GP, D)
    if NUM_SPLITS == 1:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g[:, None] < GROUP)
    else:
        # partials laid out (B, Hq, NUM_SPLITS, D) and (B, Hq, NUM_SPLITS)
        hq = HKV * GROUP
        base = (b * hq + heads) * NUM_SPLITS + s                 # (GP,)
        tl.store(part_out_ptr + base[:, None] * D + d[None, :], o, mask=g[:, None] < GROUP)
        lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + base, lse, mask=g < GROUP)


@triton.jit
def _reduce_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh,
                          HQ: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                          SPLITS_P: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    pdl_wait(PDL)
    s = tl.arange(0, SPLITS_P)                                   # (SP,)
    d = tl.arange(0, D)
    base = (b * HQ + hq) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + s, mask=s < NUM_SPLITS, other=float("-inf"))  # (SP,)
    m = tl.max(lse, 0)
    m = tl.where(m > float("-inf"), m, 0.0)                      # every split empty: no inf - inf
    w = tl.where(lse > float("-inf"), tl.math.exp2(lse - m), 0.0)  # (SP,) weight of each split
    o = tl.load(part_out_ptr + (base + s)[:, None] * D + d[None, :],
                mask=(s < NUM_SPLITS)[:, None] & (lse > float("-inf"))[:, None], other=0.0)  # (SP, D)
    den = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(den > 0, den, 1.0)  # (D,)
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def decode_num_splits(batch: int, num_kv_heads: int, device: torch.device, max_splits: int = 64) -> int:
    """Splits per sequence so that batch x Hkv x splits programs give every SM about two
    programs. Depends on the batch size only, so a CUDA graph keeps its grid."""
    programs = batch * num_kv_heads
    target = 2 * num_sms(device)
    return max(1, min(max_splits, math.ceil(target / programs))) if programs < target else 1


def paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale,
                        num_splits: int | None = None, block_n: int | None = None,
                        num_warps: int = 4, num_stages: int = 2,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `paged_decode_ref`; one launch (two with split-KV), no host sync.
    `out` (B, Hq, D), when given, receives the result (tests poison it first)."""
    require_triton()
    B, Hq, D = q.shape
    _, block_size, Hkv, Dc = k_cache.shape
    assert Dc == D and Hq % Hkv == 0 and D == triton.next_power_of_2(D)
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(-1) == 1
    out = torch.empty_like(q) if out is None else out                      # (B, Hq, D)
    if B == 0:
        return out
    group = Hq // Hkv
    pdl = pdl_launch(q)
    splits = num_splits or decode_num_splits(B, Hkv, q.device)
    # (the H200 sweep at d = 64, scripts/gpu_decode_sweep.py: 64-token tiles in 2 warps and 4
    # stages win at B=256 L=600, 0.99x SDPA against 0.87x, but lose at B=32..128 L=1024 by
    # 12-15%, and the throughput recipe's attention time moved 2%: these defaults stay)
    block_n = block_n or (64 if D >= 128 or q.dtype == torch.float32 else 128)
    if splits > 1:
        part_out = torch.empty((B, Hq, splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out                                          # unused
    _decode_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
        scale * 1.4426950408889634, q.stride(0), q.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, HKV=Hkv, D=D, GROUP=group,
        GROUP_P=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, NUM_SPLITS=splits,
        IEEE=q.dtype == torch.float32, PDL=pdl, launch_pdl=pdl, num_warps=num_warps,
        num_stages=num_stages)
    if splits > 1:
        _reduce_splits_kernel[(B, Hq)](part_out, part_lse, out, out.stride(0), out.stride(1),
                                       HQ=Hq, D=D, NUM_SPLITS=splits,
                                       SPLITS_P=triton.next_power_of_2(splits), PDL=pdl,
                                       launch_pdl=pdl, num_warps=4)
    return out

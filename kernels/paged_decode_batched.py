"""Decode attention for the CPU engine: every sequence of the batch in one SDPA call. (Batches
of two or more take kernels/paged_decode_cpu.py instead, which reads the cache in place; this
file serves a batch of one, other dtypes, and machines without Numba.)

`paged_decode_ref` (kernels/paged_decode.py) is the readable version: a Python loop over the
sequences, each gathering its K/V and calling attention on its own. On a CPU that loop is the
cost at batch > 1: per layer and sequence two gathers, two float32 copies of K/V and one
attention call (at batch 32 it was ~70% of a decode step, against ~13% for all the matmuls).

Here the batch is padded instead of looped:

    slots    slot of position t of sequence b    (B, L)  L = longest context, block-rounded;
             positions past a context point at the sequence's first slot (written, finite)
    K, V     one index_select each               (B, L, Hkv, D) in the cache's dtype
    mask     t < context_len                     (B, L) bool: the padding gets no weight
    out      SDPA with the G = Hq/Hkv query heads of a KV head as G query rows (B, Hkv, G, D)

Why these choices (measured on a 2-core AVX-512 CPU, torch 2.13): a token-level index_select
is ~10x faster than indexing the pool by blocks; padded slots must hold finite numbers (0 * NaN
is NaN even under a mask) and pointing them at a written slot costs nothing, where zeroing them
(masked_fill) cost as much as the attention; SDPA with a (B, Hq, 1, D) query and a mask took a
slow path in bf16 (~5x), GQA folded into the query rows does not. bf16 K/V stay bf16 (half the
bytes; the CPU flash attention accumulates in float32). A batch of one needs no mask, and its
K/V are a view when its blocks are consecutive.

Where the K/V of each sequence are (the slots, the mask) is the same for every layer of a step,
so it is a `DecodePlan` of its own: `decode_plan` builds it (the one host sync), and
`paged_decode_planned` runs attention on it. The CPU engine builds one plan per step for all
its layers; `paged_decode_batched` builds one per call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["DecodePlan", "decode_plan", "paged_decode_batched", "paged_decode_planned"]


@dataclass(frozen=True)
class DecodePlan:
    """Where the K/V of a decode batch are in the pool (any layer's: they share block tables)."""
    batch: int  # B
    length: int  # L: K/V rows per sequence (0: every context is empty)
    block_size: int
    start: Optional[int] = None  # batch of one, consecutive slots: K/V = pool[start:start + L]
    slots: Optional[torch.Tensor] = None  # (B * L,) int64 slots to gather otherwise
    mask: Optional[torch.Tensor] = None  # (B, 1, 1, L) bool, True = a real token; None = all
    empty: Optional[torch.Tensor] = None  # (B, 1, 1) bool rows with context 0; None = none


def decode_plan(
    block_tables: torch.Tensor,  # (B, max_blocks_per_seq) int32, padded with -1 or 0
    context_lens: torch.Tensor,  # (B,) int32, cached tokens incl. the new one
    block_size: int,
) -> DecodePlan:
    """Slots and mask of a decode batch; one host sync (the B context lengths)."""
    lens = context_lens.tolist()  # B ints
    B, longest = len(lens), max(lens, default=0)
    if longest == 0:
        return DecodePlan(B, 0, block_size)
    if B == 1:  # no padding at all
        n = -(-longest // block_size)  # blocks in use
        blocks = block_tables[0, :n].tolist()
        if blocks == list(range(blocks[0], blocks[0] + n)):  # consecutive: a view of the pool
            return DecodePlan(1, longest, block_size, start=blocks[0] * block_size)
        t = torch.arange(longest, device=block_tables.device)  # (L,)
        slots = block_tables[0, t // block_size].long() * block_size + t % block_size  # (L,)
        return DecodePlan(1, longest, block_size, slots=slots)
    L = -(-longest // block_size) * block_size
    t = torch.arange(L, device=block_tables.device)  # (L,)
    tables = block_tables[:, : L // block_size].long()  # (B, L / block_size)
    slots = tables[:, t // block_size] * block_size + t % block_size  # (B, L)
    valid = t[None, :] < context_lens[:, None]  # (B, L) bool
    slots = torch.where(valid, slots, slots[:, :1]).clamp_(min=0).view(-1)  # (B * L,)
    empty = (context_lens == 0)[:, None, None] if min(lens) == 0 else None  # (B, 1, 1)
    return DecodePlan(B, L, block_size, slots=slots, mask=valid[:, None, None, :], empty=empty)


def paged_decode_planned(
    q: torch.Tensor,  # (B, Hq, D) one new token per sequence
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    plan: DecodePlan,
    scale: float,
) -> torch.Tensor:
    """Attention of a decode batch on `plan`'s K/V: (B, Hq, D) in q's dtype, no host sync."""
    B, Hq, D = q.shape
    Hkv, L = k_cache.shape[2], plan.length
    if L == 0:
        return torch.zeros_like(q)
    k_pool, v_pool = k_cache.view(-1, Hkv, D), v_cache.view(-1, Hkv, D)  # (slots, Hkv, D)
    if plan.start is not None:
        k = k_pool[plan.start:plan.start + L].unsqueeze(0)  # (1, L, Hkv, D) views
        v = v_pool[plan.start:plan.start + L].unsqueeze(0)
    else:
        k = k_pool.index_select(0, plan.slots).view(B, L, Hkv, D)  # (B, L, Hkv, D)
        v = v_pool.index_select(0, plan.slots).view(B, L, Hkv, D)
    out = F.scaled_dot_product_attention(
        q.view(B, Hkv, Hq // Hkv, D), k.transpose(1, 2), v.transpose(1, 2),  # (B, Hkv, G|L, D)
        attn_mask=plan.mask, scale=scale)  # (B, Hkv, G, D): every query row of every KV head
    out = out.reshape(B, Hq, D)  # query head h = kv head h // G, row h % G
    if plan.empty is not None:  # a fully masked row is NaN in SDPA; the contract says zeros
        out = out.masked_fill(plan.empty, 0)
    return out


def paged_decode_batched(
    q: torch.Tensor,  # (B, Hq, D) one new token per sequence
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    block_tables: torch.Tensor,  # (B, max_blocks_per_seq) int32, padded with -1 or 0
    context_lens: torch.Tensor,  # (B,) int32, cached tokens incl. the new one
    scale: float,
) -> torch.Tensor:
    """Same contract as `paged_decode_ref`: (B, Hq, D) in q's dtype, zeros where context_len is 0."""
    plan = decode_plan(block_tables, context_lens, k_cache.shape[1])
    return paged_decode_planned(q, k_cache, v_cache, plan, scale)

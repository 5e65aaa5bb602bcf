"""Decode attention for the CPU engine: every sequence of the batch in one SDPA call.

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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.paged_kv import gather_kv

__all__ = ["paged_decode_batched"]


def paged_decode_batched(
    q: torch.Tensor,  # (B, Hq, D) one new token per sequence
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    block_tables: torch.Tensor,  # (B, max_blocks_per_seq) int32, padded with -1 or 0
    context_lens: torch.Tensor,  # (B,) int32, cached tokens incl. the new one
    scale: float,
) -> torch.Tensor:
    """Same contract as `paged_decode_ref`: (B, Hq, D) in q's dtype, zeros where context_len is 0."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    lens = context_lens.tolist()  # one host sync (B ints)
    longest = max(lens, default=0)
    if longest == 0:
        return torch.zeros_like(q)
    if B == 1:  # no padding at all
        k, v = gather_kv(k_cache, v_cache, block_tables[0], longest)  # (L, Hkv, D) each
        k, v, mask = k[None], v[None], None  # (1, L, Hkv, D)
    else:
        block_size = k_cache.shape[1]
        L = -(-longest // block_size) * block_size
        t = torch.arange(L, device=q.device)  # (L,)
        tables = block_tables[:, : L // block_size].long()  # (B, L / block_size)
        slots = tables[:, t // block_size] * block_size + t % block_size  # (B, L)
        valid = t[None, :] < context_lens[:, None]  # (B, L) bool
        slots = torch.where(valid, slots, slots[:, :1]).clamp_(min=0).view(-1)  # (B * L,)
        k = k_cache.view(-1, Hkv, D).index_select(0, slots).view(B, L, Hkv, D)
        v = v_cache.view(-1, Hkv, D).index_select(0, slots).view(B, L, Hkv, D)
        mask = valid[:, None, None, :]  # (B, 1, 1, L): every query row of every KV head
    out = F.scaled_dot_product_attention(
        q.view(B, Hkv, Hq // Hkv, D), k.transpose(1, 2), v.transpose(1, 2),  # (B, Hkv, G|L, D)
        attn_mask=mask, scale=scale)  # (B, Hkv, G, D)
    out = out.reshape(B, Hq, D)  # query head h = kv head h // G, row h % G
    if min(lens) == 0:  # a fully masked row is NaN in SDPA; the contract says zeros
        out = out.masked_fill((context_lens == 0)[:, None, None], 0)
    return out

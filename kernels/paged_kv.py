"""The paged KV cache layout, and the two helpers the PyTorch attention references share.

The KV cache of one layer is a pool of fixed-size blocks, not one tensor per sequence:

    k_cache, v_cache: (num_blocks, block_size, Hkv, D)

A sequence owns a list of block ids, its row of the block table `(B, max_blocks_per_seq)`;
token t of the sequence lives in block `block_table[t // block_size]` at offset
`t % block_size`. Flattening the pool gives one row per *slot*: `slot = block_id * block_size +
offset`, which is how new tokens are written (`store_kv`). Blocks need not be contiguous or in
order, so sequences grow one block at a time, share cached prefix blocks, and waste at most one
partly filled block each (vLLM's PagedAttention, TurboMind's block manager). Table entries past a
sequence's `context_len` are padding (-1 or 0) and are never read. Grouped-query attention (GQA):
Hq is a multiple of Hkv and query head h reads kv head h // (Hq // Hkv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gather_kv", "attend_ref"]


def gather_kv(
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    block_table_row,  # (max_blocks_per_seq,) int tensor or list: one sequence's block ids
    length: int,  # tokens to gather (the sequence's context_len)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` tokens of one sequence as contiguous-looking K, V.

    Returns k, v of shape (length, Hkv, D): position t is block_table_row[t // block_size],
    offset t % block_size. Only the ceil(length / block_size) blocks in use are read. When
    those blocks are consecutive in the pool (common: a prompt's blocks are handed out in
    order) the result is a view, not a copy.
    """
    length = int(length)
    block_size = k_cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size  # blocks holding tokens 0..length-1
    row = block_table_row.tolist() if torch.is_tensor(block_table_row) else block_table_row
    blocks = row[:n_blocks]  # n_blocks ints
    first = blocks[0]
    if blocks == list(range(first, first + n_blocks)):  # consecutive: slice the pool, no copy
        k = k_cache[first:first + n_blocks]  # (n_blocks, block_size, Hkv, D)
        v = v_cache[first:first + n_blocks]
    else:  # scattered: copy them out (index_select: ~2x faster on CPU than k_cache[blocks])
        idx = torch.tensor(blocks, device=k_cache.device)  # (n_blocks,) int64
        k = k_cache.index_select(0, idx)  # (n_blocks, block_size, Hkv, D)
        v = v_cache.index_select(0, idx)
    return k.flatten(0, 1)[:length], v.flatten(0, 1)[:length]  # (length, Hkv, D) each


def attend_ref(
    q: torch.Tensor,  # (M, Hq, D) queries of one sequence
    k: torch.Tensor,  # (L, Hkv, D) its keys, every one written (no padding)
    v: torch.Tensor,  # (L, Hkv, D) its values
    mask: torch.Tensor | None,  # (M, L) bool, True = query may attend to that key; None = all
    scale: float,
    causal: bool = False,  # plain causal (M == L, no cached prefix): SDPA's fast path, no mask
) -> torch.Tensor:
    """GQA attention of one sequence with float32 softmax; returns (M, Hq, D) in q's dtype.

    One call to PyTorch's fused scaled_dot_product_attention (flash attention on CPU too);
    `enable_gqa` lets query head h read kv head h // (Hq // Hkv) without copying K/V.
    """
    dtype = q.dtype
    if dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    # 4-D inputs: with 3-D ones PyTorch falls back to its slow math kernel on CPU.
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],  # (1, H*, M|L, D)
        attn_mask=None if mask is None else mask[None, None], is_causal=causal, scale=scale,
        enable_gqa=True)
    return out[0].transpose(0, 1).to(dtype)  # (1, Hq, M, D) -> (M, Hq, D)



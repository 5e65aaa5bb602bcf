"""Paged attention: the PyTorch reference (the readable path; Triton kernels share these signatures).

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

__all__ = ["store_kv", "gather_kv", "paged_decode", "paged_prefill"]


def store_kv(
    k: torch.Tensor,  # (N, Hkv, D) keys of the N new tokens
    v: torch.Tensor,  # (N, Hkv, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D), written in place
    v_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D), written in place
    slot_mapping: torch.Tensor,  # (N,) int32/int64, slot = block_id * block_size + offset
) -> None:
    """Write token n's k/v into slot `slot_mapping[n]` of the paged cache, in place.

    Slots < 0 mark padding tokens (e.g. a CUDA graph padded to a fixed batch) and are skipped.
    The boolean mask costs one host sync here; the fast kernel skips them on the device.
    """
    _, Hkv, D = k.shape
    valid = slot_mapping >= 0  # (N,) bool
    slots = slot_mapping.long()  # (N,)
    if not bool(valid.all()):  # drop padding tokens (one host sync)
        slots, k, v = slots[valid], k[valid], v[valid]  # (n,), (n, Hkv, D) x2 with n <= N
    # .view (not .reshape/.flatten) so a non-contiguous cache fails loudly instead of
    # silently writing into a copy.
    k_cache.view(-1, Hkv, D).index_copy_(0, slots, k.to(k_cache.dtype))  # (num_blocks * block_size, Hkv, D)
    v_cache.view(-1, Hkv, D).index_copy_(0, slots, v.to(v_cache.dtype))  # (num_blocks * block_size, Hkv, D)


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
    else:  # scattered: advanced indexing copies them out
        k = k_cache[blocks]  # (n_blocks, block_size, Hkv, D)
        v = v_cache[blocks]
    return k.flatten(0, 1)[:length], v.flatten(0, 1)[:length]  # (length, Hkv, D) each


def _attend(
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


def paged_decode(
    q: torch.Tensor,  # (B, Hq, D) one new token per sequence
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    block_tables: torch.Tensor,  # (B, max_blocks_per_seq) int32, padded with -1 or 0
    context_lens: torch.Tensor,  # (B,) int32, cached tokens incl. the new one
    scale: float,
) -> torch.Tensor:
    """Decode attention: each sequence's single new query attends to all its cached tokens.

    The new token's k/v must already be in the cache (store_kv first). One sequence at a
    time: gather exactly its context_len tokens (so no padding slot is ever read, and no mask
    is needed: the new token may see every earlier token) and attend. The Triton kernel does
    the same per (sequence, head) program, reading the blocks in place instead of gathering.
    Softmax in float32; returns (B, Hq, D) in q's dtype.
    """
    out = torch.empty_like(q)  # (B, Hq, D)
    tables, lens = block_tables.tolist(), context_lens.tolist()  # one host sync per call
    for b, n in enumerate(lens):
        kb, vb = gather_kv(k_cache, v_cache, tables[b], n)  # (n, Hkv, D) each
        out[b] = _attend(q[b, None], kb, vb, None, scale)[0]  # (Hq, D)
    return out


def paged_prefill(
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
            out[s:e] = _attend(q[s:e], kb, vb, None, scale, causal=True)  # (q_len, Hq, D)
            continue
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)  # (q_len,) absolute positions
        k_pos = torch.arange(kv_len, device=q.device)  # (kv_len,)
        mask = k_pos[None, :] <= q_pos[:, None]  # (q_len, kv_len) causal after the prefix
        out[s:e] = _attend(q[s:e], kb, vb, mask, scale)  # (q_len, Hq, D)
    return out

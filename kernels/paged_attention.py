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
    slots = slot_mapping[valid].long()  # (n,) n <= N real tokens
    # .view (not .reshape/.flatten) so a non-contiguous cache fails loudly instead of
    # silently writing into a copy.
    k_cache.view(-1, Hkv, D).index_copy_(0, slots, k[valid].to(k_cache.dtype))  # (num_blocks * block_size, Hkv, D)
    v_cache.view(-1, Hkv, D).index_copy_(0, slots, v[valid].to(v_cache.dtype))  # (num_blocks * block_size, Hkv, D)


def gather_kv(
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    block_table_row: torch.Tensor,  # (max_blocks_per_seq,) int, one sequence's block ids
    length: int,  # tokens to gather (the sequence's context_len)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy the first `length` tokens of one sequence out of the pool into contiguous K, V.

    Returns k, v of shape (length, Hkv, D): position t is block_table_row[t // block_size],
    offset t % block_size. Only the ceil(length / block_size) blocks in use are read.
    """
    length = int(length)
    block_size = k_cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size  # blocks holding tokens 0..length-1
    blocks = block_table_row[:n_blocks].long()  # (n_blocks,)
    k = k_cache[blocks].flatten(0, 1)[:length]  # (n_blocks, block_size, Hkv, D) -> (length, Hkv, D)
    v = v_cache[blocks].flatten(0, 1)[:length]  # (length, Hkv, D)
    return k, v


def _attend(
    q: torch.Tensor,  # (B, M, Hq, D) queries
    k: torch.Tensor,  # (B, L, Hkv, D) keys
    v: torch.Tensor,  # (B, L, Hkv, D) values
    mask: torch.Tensor,  # (B, M, L) bool, True = query may attend to that key
    scale: float,
) -> torch.Tensor:
    """Masked GQA attention in float32 on contiguous K/V; returns (B, M, Hq, D) float32.

    One call to PyTorch's fused scaled_dot_product_attention (flash attention on CPU too);
    `enable_gqa` lets query head h read kv head h // (Hq // Hkv) without copying K/V.
    """
    # Keys no query may see can be padding slots holding garbage, even NaN, and 0 * NaN = NaN:
    # zero them so a masked slot can never leak into the output.
    # k and v are fresh gathered copies (or fresh .float() copies), so zeroing is done in place.
    hidden = ~mask.any(dim=1)[:, :, None, None]  # (B, L, 1, 1) True = no query sees it
    k = k.float().masked_fill_(hidden, 0.0).transpose(1, 2)  # (B, Hkv, L, D)
    v = v.float().masked_fill_(hidden, 0.0).transpose(1, 2)  # (B, Hkv, L, D)
    out = F.scaled_dot_product_attention(
        q.float().transpose(1, 2), k, v,  # (B, Hq, M, D) x (B, Hkv, L, D)
        attn_mask=mask[:, None], scale=scale, enable_gqa=True)  # (B, Hq, M, D)
    return out.transpose(1, 2)  # (B, M, Hq, D)


def paged_decode(
    q: torch.Tensor,  # (B, Hq, D) one new token per sequence
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    block_tables: torch.Tensor,  # (B, max_blocks_per_seq) int32, padded with -1 or 0
    context_lens: torch.Tensor,  # (B,) int32, cached tokens incl. the new one
    scale: float,
) -> torch.Tensor:
    """Decode attention: each sequence's single new query attends to all its cached tokens.

    The new token's k/v must already be in the cache (store_kv first). The whole batch is
    done at once: gather every sequence's blocks up to the longest context, i.e. K/V of shape
    (B, L, Hkv, D) with L = blocks * block_size, and mask positions >= context_len.
    Softmax in float32; returns (B, Hq, D) in q's dtype.
    """
    B, Hq, D = q.shape
    block_size = k_cache.shape[1]
    ctx = context_lens.long()  # (B,)
    max_len = int(ctx.max())  # one host sync per call, not per token
    n_blocks = (max_len + block_size - 1) // block_size  # blocks of the longest sequence
    # Padding entries (-1) become block 0; the mask below hides whatever it holds.
    blocks = block_tables[:, :n_blocks].long().clamp(min=0)  # (B, n_blocks)
    k = k_cache[blocks].flatten(1, 2)  # (B, n_blocks, block_size, Hkv, D) -> (B, L, Hkv, D)
    v = v_cache[blocks].flatten(1, 2)  # (B, L, Hkv, D)
    pos = torch.arange(k.shape[1], device=q.device)  # (L,) absolute key positions
    mask = (pos[None, :] < ctx[:, None])[:, None, :]  # (B, 1, L) the new token sees all tokens
    out = _attend(q[:, None], k, v, mask, scale)  # (B, 1, Hq, D)
    return out[:, 0].to(q.dtype)  # (B, Hq, D)


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
    lens = context_lens.tolist()  # B ints
    for b, kv_len in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        q_len = e - s
        if q_len == 0:
            continue
        kb, vb = gather_kv(k_cache, v_cache, block_tables[b], kv_len)  # (kv_len, Hkv, D) each
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)  # (q_len,) absolute positions
        k_pos = torch.arange(kv_len, device=q.device)  # (kv_len,)
        mask = k_pos[None, :] <= q_pos[:, None]  # (q_len, kv_len) causal
        o = _attend(q[None, s:e], kb[None], vb[None], mask[None], scale)  # (1, q_len, Hq, D)
        out[s:e] = o[0].to(q.dtype)  # (q_len, Hq, D)
    return out

"""Assignment 2: paged decode attention, in PyTorch (2.1) and as a Triton kernel (2.2).

In a decode step every running sequence brings ONE new token. Its query attends to all the
sequence's cached keys/values, which lie scattered over the paged KV cache:

    k_cache, v_cache: (num_blocks, block_size, Hkv, D)
    token t of sequence b is in block block_tables[b, t // block_size], row t % block_size

    out[b, h] = softmax(scale * q[b, h] . K[b, :, g]^T) @ V[b, :, g]     g = h // (Hq // Hkv)

GQA: query head h reads KV head g = h // (Hq // Hkv). The new token's k/v are already in the
cache (store_kv ran first), so sequence b attends to exactly context_lens[b] tokens and needs
no mask. A row with context_lens[b] == 0 (padding) gets zeros. Entries of block_tables past a
sequence's last block are padding (-1 or 0): never read them.

The grader compares both functions with labkit's `kernels.paged_decode.paged_decode_ref` on
fresh random inputs (ragged lengths, GQA, several block sizes) and plugs each into the real
engine through a backend (a subclass of labkit/layers/backend.py's TorchBackend whose
`decode` calls yours): the generated tokens must be the same. The Triton kernel is graded
on CPU under the Triton interpreter (TRITON_INTERPRET=1, set by the tests), so a laptop
gives the same verdict as the grader.
Check locally: `labkit grade -k a2`.
"""
from __future__ import annotations

import torch

from kernels._triton import tl, triton


def paged_decode_torch(
    q: torch.Tensor,             # (B, Hq, D) the new token's query, one per sequence
    k_cache: torch.Tensor,       # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,       # (num_blocks, block_size, Hkv, D)
    block_tables: torch.Tensor,  # (B, max_blocks) int32, padded with -1 or 0
    context_lens: torch.Tensor,  # (B,) int32, cached tokens including the new one
    scale: float,                # softmax scale, 1 / sqrt(D) for Llama
) -> torch.Tensor:
    """Decode attention in PyTorch: returns (B, Hq, D) in q's dtype (softmax in float32).

    Suggested path: per sequence, gather its context_lens[b] keys and values from the
    blocks of its table -> (n, Hkv, D); repeat each KV head for its Hq // Hkv query heads;
    scores (Hq, n) = scale * q @ K^T; softmax over n; @ V -> (Hq, D). Loops over the batch
    are fine here; the kernel (2.2) is where speed lives.
    """
    # BEGIN ASSIGN 2.1
    raise NotImplementedError("ASSIGN 2.1: paged_decode_torch")
    # END ASSIGN 2.1


@triton.jit
def paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, lens_ptr, out_ptr,
    scale,                                  # float: softmax scale
    stride_qb, stride_qh,                   # q is (B, Hq, D) with stride 1 along D
    stride_tb,                              # block_tables row stride
    stride_ob, stride_oh,                   # out is (B, Hq, D) with stride 1 along D
    BLOCK_SIZE: tl.constexpr,               # tokens per cache block
    HKV: tl.constexpr,                      # KV heads
    GROUP: tl.constexpr,                    # query heads per KV head, Hq // Hkv
    D: tl.constexpr,                        # head dim (a power of two)
    BLOCK_N: tl.constexpr,                  # tokens per tile of the loop
):
    """One program per (sequence b, query head h): grid (B, Hq).

    Load q[b, h] (D,). Walk the context [0, ctx) in tiles of BLOCK_N tokens: for the tile's
    token positions t (BLOCK_N,), look up each token's block through the block table
    (`tl.load(tables_ptr + b * stride_tb + t // BLOCK_SIZE, mask=t < ctx)`), compute its row
    offset in the contiguous cache, `(block * BLOCK_SIZE + t % BLOCK_SIZE) * (HKV * D) + g * D`,
    load K and V tiles (BLOCK_N, D) with masks, and keep an *online softmax* in float32:
    running max m, running sum l, accumulator acc (D,), rescaled by exp(m_old - m_new) at
    every tile (FlashAttention's trick: one pass, no (ctx,) score vector in memory). Store
    acc / l into out[b, h] in out's dtype; with ctx == 0 store zeros.

    Helpful: tl.program_id, tl.arange, tl.load/tl.store with mask= and other=, tl.sum,
    tl.max, tl.maximum, tl.exp, tl.where, tl.zeros, `x.to(tl.int64)` (offsets of big caches).
    Elementwise products and tl.sum are enough (tl.dot needs tiles of at least 16 x 16).
    """
    # BEGIN ASSIGN 2.2
    raise NotImplementedError("ASSIGN 2.2: paged_decode_kernel")
    # END ASSIGN 2.2


def paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale,
                        out: torch.Tensor | None = None, block_n: int = 16) -> torch.Tensor:
    """Same contract as paged_decode_torch; launches paged_decode_kernel (given)."""
    B, Hq, D = q.shape
    _, block_size, Hkv, Dc = k_cache.shape
    assert Dc == D and Hq % Hkv == 0 and D & (D - 1) == 0, "D must be a power of two"
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(-1) == 1
    out = torch.empty_like(q) if out is None else out                    # (B, Hq, D)
    if B == 0:
        return out
    paged_decode_kernel[(B, Hq)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, HKV=Hkv, GROUP=Hq // Hkv, D=D, BLOCK_N=block_n)
    return out

"""labkit kernels: each op has a readable PyTorch reference; Triton kernels share its signature.

    store_kv(k, v, k_cache, v_cache, slot_mapping)                 write new tokens' K/V into the paged cache
    gather_kv(k_cache, v_cache, block_table_row, length)           one sequence's K/V, contiguous
    paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
    paged_prefill(q, k, v, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)

See kernels/paged_attention.py for the cache layout.
"""

from kernels.paged_attention import gather_kv, paged_decode, paged_prefill, store_kv

__all__ = ["store_kv", "gather_kv", "paged_decode", "paged_prefill"]

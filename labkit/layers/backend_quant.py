"""The Triton kernels of the int8/int4 KV cache (quant_policy 8/4) as backend methods.

TritonBackend (labkit/layers/backend.py) mixes this class in, so on the GPU a quantized cache is
written by the quantizing store and read by the fused dequantizing attention kernels, with no
host sync (CUDA graphs capture them like the unquantized ops). TorchBackend has the same three
methods on the PyTorch references.
"""
from __future__ import annotations

from kernels.kv_quant import store_kv_quant_triton
from kernels.paged_decode_quant import paged_decode_quant_triton
from kernels.paged_prefill_quant import paged_prefill_quant_triton


class TritonKVQuantOps:
    """store_kv_quant, prefill_quant, decode_quant on Triton (k_cache, v_cache: QuantKVCache)."""

    def store_kv_quant(self, k, v, k_cache, v_cache, slot_mapping):
        store_kv_quant_triton(k, v, k_cache, v_cache, slot_mapping)

    def prefill_quant(self, q, k_cache, v_cache, md, scale):
        return paged_prefill_quant_triton(q, k_cache, v_cache, md.block_tables, md.cu_seqlens_q,
                                          md.context_lens, scale, max_seqlen_q=md.max_seqlen_q)

    def decode_quant(self, q, k_cache, v_cache, md, scale):
        return paged_decode_quant_triton(q, k_cache, v_cache, md.block_tables, md.context_lens,
                                         scale, num_splits=md.decode_splits)

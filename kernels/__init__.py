"""labkit kernels: one file per op, each with a readable PyTorch reference (`*_ref`) and a
Triton kernel with its launcher (`*_triton`) that has the same signature and contract.

    store_kv(k, v, k_cache, v_cache, slot_mapping)           new tokens' K/V into the paged cache
    paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
    paged_prefill(q, k, v, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)
    rms_norm(x, weight, eps, residual=None)                  (fused residual add)
    rotary(x, positions, cos, sin)                           RoPE on q and k, in place
    silu_and_mul(x)                                          SwiGLU's silu(gate) * up
    linear(x, w)                                             x @ w^T, skinny (M <= 16) kernel
    rms_norm_linear(x, residual, norm_w, eps, w, gated)      RMSNorm fused into that kernel
    linear_silu(x, w13)                                      its SiLU-and-mul epilogue (SwiGLU)
    rope_store_kv(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, hq, hkv)
                                                             rotary + store_kv in one kernel

The references run anywhere (the CPU engine uses them); the Triton kernels run on a GPU, or on
CPU under TRITON_INTERPRET=1 (how tests check them). kernels/paged_kv.py describes the cache
layout; labkit/layers/backend.py picks one implementation per device.
"""
from kernels.activation import silu_and_mul_ref, silu_and_mul_triton
from kernels.gemv import (SMALL_M, linear_ref, linear_small_m_triton, rms_norm_linear_ref,
                          rms_norm_linear_triton, linear_silu_ref, linear_silu_triton)
from kernels.paged_decode import paged_decode_ref, paged_decode_triton
from kernels.paged_kv import gather_kv
from kernels.paged_prefill import paged_prefill_ref, paged_prefill_triton
from kernels.rms_norm import rms_norm_ref, rms_norm_triton
from kernels.rope_store_kv import rope_store_kv_ref, rope_store_kv_triton
from kernels.rotary import rotary_ref, rotary_triton
from kernels.store_kv import store_kv_ref, store_kv_triton

__all__ = ["SMALL_M", "linear_ref", "linear_small_m_triton", "gather_kv", "store_kv_ref", "store_kv_triton", "paged_decode_ref",
           "paged_decode_triton", "paged_prefill_ref", "paged_prefill_triton", "rms_norm_ref",
           "rms_norm_triton", "rotary_ref", "rotary_triton", "silu_and_mul_ref",
           "silu_and_mul_triton", "rms_norm_linear_ref", "rms_norm_linear_triton",
           "linear_silu_ref", "linear_silu_triton", "rope_store_kv_ref",
           "rope_store_kv_triton"]

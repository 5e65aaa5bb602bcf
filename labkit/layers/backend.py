"""The op backend: which implementation of each kernel the model calls.

Every layer that computes something other than a matrix product (RMSNorm, RoPE, SiLU-and-mul,
the paged-attention ops) calls `self.backend.<op>`. Two backends share one interface:

    TorchBackend   the PyTorch references in kernels/*.py (CPU engine, parity tests, reading)
    TritonBackend  the Triton kernels beside them (GPU engine; CPU under TRITON_INTERPRET=1)

`LlamaForCausalLM.set_backend` hands one backend to every layer. This is the seam to replace
when you write your own kernel: subclass a backend and override one op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels as K
from kernels.kv_quant import store_kv_quant_ref
from kernels.paged_decode_batched import paged_decode_batched
from kernels.paged_decode_quant import paged_decode_quant_ref
from kernels.paged_prefill_quant import paged_prefill_quant_ref
from labkit.layers.backend_quant import TritonKVQuantOps
from labkit.layers.cpu_linear import cpu_linear


class TorchBackend:
    """The readable reference path."""
    name = "torch"

    def linear(self, x, weight, bias=None):
        return cpu_linear(x, weight, bias)        # F.linear, or oneDNN's for bf16 on a CPU

    def rms_norm(self, x, weight, eps, residual=None):
        return K.rms_norm_ref(x, weight, eps, residual)

    def rotary(self, x, positions, cos, sin):
        return K.rotary_ref(x, positions, cos, sin)

    def silu_and_mul(self, x):
        return K.silu_and_mul_ref(x)

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        K.store_kv_ref(k, v, k_cache, v_cache, slot_mapping)

    def prefill(self, q, k, v, k_cache, v_cache, md, scale):
        return K.paged_prefill_ref(q, k, v, k_cache, v_cache, md.block_tables, md.cu_seqlens_q,
                                   md.context_lens, scale)

    def decode(self, q, k_cache, v_cache, md, scale):
        # the whole batch in one attention call (kernels/paged_decode_batched.py); the
        # per-sequence loop of K.paged_decode_ref costs most of a CPU step at batch > 1
        return paged_decode_batched(q, k_cache, v_cache, md.block_tables, md.context_lens, scale)

    # int8/int4 KV cache (quant_policy 8/4): k_cache, v_cache are kernels.kv_quant.QuantKVCache
    def store_kv_quant(self, k, v, k_cache, v_cache, slot_mapping):
        store_kv_quant_ref(k, v, k_cache, v_cache, slot_mapping)

    def prefill_quant(self, q, k_cache, v_cache, md, scale):
        return paged_prefill_quant_ref(q, k_cache, v_cache, md.block_tables, md.cu_seqlens_q,
                                       md.context_lens, scale)

    def decode_quant(self, q, k_cache, v_cache, md, scale):
        return paged_decode_quant_ref(q, k_cache, v_cache, md.block_tables, md.context_lens, scale)


class TritonBackend(TritonKVQuantOps, TorchBackend):
    """The fast path: one Triton launch per op, no host sync (CUDA graphs can capture it)."""
    name = "triton"

    def linear(self, x, weight, bias=None):
        # decode batches of <= 16 rows in 16-bit: the skinny kernel; fp32 stays on F.linear
        # (IEEE products, what the fp32 parity tests compare)
        rows = x.numel() // x.shape[-1]
        if rows <= K.SMALL_M and x.dtype != torch.float32 and bias is None and x.is_cuda:
            return K.linear_small_m_triton(x, weight)
        return F.linear(x, weight, bias)

    def rms_norm(self, x, weight, eps, residual=None):
        return K.rms_norm_triton(x, weight, eps, residual)

    def rotary(self, x, positions, cos, sin):
        flat = x.reshape(-1, *x.shape[-2:]) if x.dim() > 3 else x      # (N, H, D) view
        K.rotary_triton(flat, positions.reshape(-1), cos, sin)
        return x

    def silu_and_mul(self, x):
        return K.silu_and_mul_triton(x)

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        K.store_kv_triton(k, v, k_cache, v_cache, slot_mapping)

    def prefill(self, q, k, v, k_cache, v_cache, md, scale):
        return K.paged_prefill_triton(q, k, v, k_cache, v_cache, md.block_tables, md.cu_seqlens_q,
                                      md.context_lens, scale, max_seqlen_q=md.max_seqlen_q)

    def decode(self, q, k_cache, v_cache, md, scale):
        return K.paged_decode_triton(q, k_cache, v_cache, md.block_tables, md.context_lens, scale,
                                     num_splits=md.decode_splits)


BACKENDS = {"torch": TorchBackend, "triton": TritonBackend}


def make_backend(name: str, device: torch.device):
    """`auto`: Triton on CUDA when it is installed, the PyTorch references elsewhere."""
    from kernels._triton import HAS_TRITON
    from labkit.config import ConfigError
    if name == "auto":
        name = "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if name not in BACKENDS:
        raise ConfigError(f"attention_backend={name!r} is not allowed: attention_backend must be "
                          f"one of auto, {', '.join(BACKENDS)}")
    if name == "triton" and not HAS_TRITON:
        raise ConfigError("attention_backend='triton' is not allowed here: Triton is not installed")
    return BACKENDS[name]()


TORCH = TorchBackend()     # the default every layer starts with

"""The op backend: which implementation of each kernel the model calls.

Every layer that computes something other than a matrix product (RMSNorm, RoPE, SiLU-and-mul,
the paged-attention ops) calls `self.backend.<op>`. Two backends share one interface:

    TorchBackend   the PyTorch references in kernels/*.py (CPU engine, parity tests, reading)
    TritonBackend  the Triton kernels beside them (GPU engine; CPU under TRITON_INTERPRET=1)

`LlamaForCausalLM.set_backend` hands one backend to every layer. This is the seam to replace
when you write your own kernel: subclass a backend and override one op. (A CPU decode step on
the plain TorchBackend runs the layers as one TorchScript function that calls these ops'
references in the same order, labkit/models/cpu_decode.py; a subclass, or
LABKIT_SCRIPT_DECODE=0, keeps every call going through the methods below.)

Work that is the same for every layer of a forward is done once, before the layers:
`begin_forward` (the cache slots checked for padding, the decode batch's gather plan) and
`rope_step` (RoPE's cos/sin rows of the step's positions). On a CPU a decode step is mostly
small ops, so doing these 30 times was a real share of it (docs/PERF.md, "fewer eager ops");
the Triton kernels take the raw inputs, so there both are pass-throughs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels as K
from kernels import paged_decode_cpu
from kernels.kv_quant import store_kv_quant_ref
from kernels.paged_decode_batched import decode_plan, paged_decode_batched, paged_decode_planned
from kernels.paged_decode_quant import paged_decode_quant_ref
from kernels.paged_prefill_quant import paged_prefill_quant_ref
from kernels.rms_norm import rms_norm_fast
from kernels.rotary import rotary_fast, rotary_rows
from kernels.store_kv import CheckedSlots, check_slots, store_kv_checked
from labkit.layers.backend_quant import TritonKVQuantOps
from labkit.layers.cpu_linear import cpu_linear


class TorchBackend:
    """The readable reference path."""
    name = "torch"

    def linear(self, x, weight, bias=None):
        return cpu_linear(x, weight, bias)        # F.linear, or oneDNN's for bf16 on a CPU

    def rms_norm(self, x, weight, eps, residual=None):
        return rms_norm_fast(x, weight, eps, residual)     # rms_norm_ref's numbers, fewer ops

    def rotary(self, x, positions, cos, sin):
        return K.rotary_ref(x, positions, cos, sin)

    def rope_step(self, positions, cos, sin):
        """Once per forward: what `rotary_step` needs for these positions (every layer's)."""
        return rotary_rows(positions, cos, sin)            # (c, s) rows, (..., 1, D) each

    def rotary_step(self, x, step):
        return rotary_fast(x, *step)                       # rotary_ref's numbers, fewer ops

    def silu_and_mul(self, x):
        return K.silu_and_mul_ref(x)

    # Pairs a backend may run as one kernel (the Triton one does for decode batches). Here,
    # the two steps: these are the definitions the fused kernels are tested against.
    def norm_linear(self, x, residual, norm, linear):
        """(linear(norm(x + residual)), x + residual): a pre-norm and the projection after it
        (residual None at layer 0: (linear(norm(x)), x))."""
        h, residual = (norm(x), x) if residual is None else norm(x, residual)
        return linear(h), residual

    def norm_gate_up(self, x, residual, norm, w13):
        """(silu(gate) * up, x + residual) with [gate | up] = w13(norm(x + residual)): the MLP
        up to its down projection."""
        gate_up, residual = self.norm_linear(x, residual, norm, w13)
        return self.silu_and_mul(gate_up), residual

    def rope_store_kv(self, qkv, rope_step, attn, md) -> bool:
        """RoPE on q, k and k, v into the cache in one go; False: not done here, the caller
        runs the two steps (RotaryEmbedding, then Attention's store_kv)."""
        return False

    def begin_forward(self, md, k_cache) -> None:
        """Once per forward, before the layers (k_cache: any layer's, for its block size): check
        the slots for padding (the one host sync of store_kv) and plan the decode gather."""
        md.kv_slots = md.decode_plan = None
        if not torch.is_tensor(k_cache):      # an int8/int4 cache: the quantized ops as they are
            return
        md.kv_slots = check_slots(md.slot_mapping)
        if not md.is_prefill and not paged_decode_cpu.applies(k_cache.dtype, k_cache,
                                                              md.context_lens.shape[0]):
            md.decode_plan = decode_plan(md.block_tables, md.context_lens, k_cache.shape[1])

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        if isinstance(slot_mapping, CheckedSlots):         # checked by begin_forward
            store_kv_checked(k, v, k_cache, v_cache, slot_mapping)
        else:
            K.store_kv_ref(k, v, k_cache, v_cache, slot_mapping)

    def prefill(self, q, k, v, k_cache, v_cache, md, scale):
        return K.paged_prefill_ref(q, k, v, k_cache, v_cache, md.block_tables, md.cu_seqlens_q,
                                   md.context_lens, scale)

    def decode(self, q, k_cache, v_cache, md, scale):
        # batches of 2+: a kernel that reads K/V in place (kernels/paged_decode_cpu.py); otherwise
        # the whole batch in one attention call (kernels/paged_decode_batched.py). The
        # per-sequence loop of K.paged_decode_ref costs most of a CPU step at batch > 1.
        if paged_decode_cpu.applies(q.dtype, k_cache, q.shape[0]):
            return paged_decode_cpu.paged_decode_cpu(q, k_cache, v_cache, md.block_tables,
                                                     md.context_lens, scale)
        plan = md.decode_plan                              # made by begin_forward
        if plan is not None and plan.block_size == k_cache.shape[1]:
            return paged_decode_planned(q, k_cache, v_cache, plan, scale)
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

    def rope_step(self, positions, cos, sin):
        return positions, cos, sin                  # the kernel gathers its rows itself

    def rotary_step(self, x, step):
        return self.rotary(x, *step)

    def begin_forward(self, md, k_cache) -> None:
        """Nothing to share: the kernels skip padding on the device and need no plan."""

    def silu_and_mul(self, x):
        return K.silu_and_mul_triton(x)

    # Fusions, each measured on the decode step (scripts/gpu_fusion_ab.py, docs/PERF.md):
    # RoPE + store_kv as one kernel (kernels/rope_store_kv.py), and for decode batches
    # (<= SMALL_M rows, 16-bit, a dense Linear) the norm in the skinny matmul's load of x or
    # SwiGLU's silu(gate) * up on its accumulators (kernels/gemv.py). Class attributes, so an
    # experiment can switch one.
    fuse_rope_store_kv = True
    fuse_norm_linear = False      # slower at Llama-2-7B's shapes on an H200 (PERF.md)
    fuse_gate_up_silu = False     # with PDL on, slower (0.96-0.97x) on an H200 (PERF.md)

    def _gemv_fusable(self, x, linear) -> bool:
        w = getattr(linear, "weight", None)          # a W4A16Linear has none: its own kernels
        return (x.is_cuda and x.dtype != torch.float32 and x.numel() // x.shape[-1] <= K.SMALL_M
                and torch.is_tensor(w) and w.dtype == x.dtype and linear.bias is None)

    def norm_linear(self, x, residual, norm, linear):
        if not (self.fuse_norm_linear and self._gemv_fusable(x, linear)):
            return super().norm_linear(x, residual, norm, linear)
        return K.rms_norm_linear_triton(x, residual, norm.weight, norm.eps, linear.weight)

    def norm_gate_up(self, x, residual, norm, w13):
        if not (self.fuse_gate_up_silu and self._gemv_fusable(x, w13)):
            return super().norm_gate_up(x, residual, norm, w13)
        if self.fuse_norm_linear:
            return K.rms_norm_linear_triton(x, residual, norm.weight, norm.eps, w13.weight,
                                            gated=True)
        h, residual = (norm(x), x) if residual is None else norm(x, residual)
        return K.linear_silu_triton(h, w13.weight), residual

    def rope_store_kv(self, qkv, rope_step, attn, md) -> bool:
        if not self.fuse_rope_store_kv or md is None or not torch.is_tensor(attn.k_cache):
            return False                             # no cache, or an int8/int4 one
        positions, cos, sin = rope_step
        K.rope_store_kv_triton(qkv.reshape(-1, *qkv.shape[-2:]), positions.reshape(-1), cos, sin,
                               attn.k_cache, attn.v_cache, md.slot_mapping, attn.num_heads,
                               attn.num_kv_heads)
        return True

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

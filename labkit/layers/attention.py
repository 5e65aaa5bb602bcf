"""Attention: one layer's paged KV cache and the backend ops that write and read it.

Two ways in:
- `metadata is None` (the reference path): one contiguous causal attention over the given
  tokens, no KV cache. Used to check logits against HF transformers.
- `metadata` set (the engine path): write this step's K/V into the paged cache
  (`store_kv`), then `paged_prefill` (new tokens attend to cached prefix + themselves) or
  `paged_decode` (one new token per sequence). The ops come from the backend
  (labkit/layers/backend.py): the PyTorch references or the Triton kernels.

`LognScaling` is Qwen's logn attention (LMDeploy's use_logn_attn): past the trained length T
the softmax sees more keys and flattens, so queries are sharpened by log(p + 1) / log(T).

With quant_policy 8/4 the caches are `QuantKVCache`s (int8/int4 codes + per-token scales and
zeros, kernels/kv_quant.py): the store quantizes, prefill/decode dequantize inside attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kernels.kv_quant import QuantKVCache
from labkit.layers.backend import TORCH


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what they read, built by the ModelRunner."""
    is_prefill: bool
    slot_mapping: torch.Tensor           # (N,) int64: cache slot of each new token, -1 = skip
    block_tables: torch.Tensor           # (B, max_blocks) int32
    context_lens: torch.Tensor           # (B,) int32: tokens in cache after this step
    cu_seqlens_q: Optional[torch.Tensor] = None   # (B+1,) int32, prefill only
    max_seqlen_q: int = 1
    decode_splits: Optional[int] = None  # split-KV factor of the decode kernel (None: its choice)
    rope_lens: Optional[torch.Tensor] = None   # (N,) int32 rope length of each token's sequence
    rope_tables: Optional[tuple] = None  # (cos, sin) (N, D) built from rope_lens by the model
    # once per forward, read by every layer (set by backend.begin_forward; None: not prepared)
    kv_slots: Optional[Any] = None       # slot_mapping checked for padding (kernels/store_kv.py)
    decode_plan: Optional[Any] = None    # where each sequence's K/V are (paged_decode_batched.py)


def logn_table(max_positions: int, trained_len: int, device=None) -> torch.Tensor:
    """(P,) float32: log(p + 1) / log(T) for positions p >= T, 1 before (Qwen's logn_list:
    the token at 1-based position n > T is scaled by log_T(n))."""
    n = torch.arange(1, max_positions + 1, dtype=torch.float64, device=device)  # (P,) 1-based
    scale = torch.where(n > trained_len, n.log() / math.log(trained_len), torch.ones_like(n))
    return scale.float()


class LognScaling(nn.Module):
    """Multiplies queries in place by logn_table[position] when enabled; keys and values are
    untouched, so the KV cache (and every prefix-cache block) is the same with and without it."""

    def __init__(self, max_positions: int, trained_len: int, enabled: bool = False):
        super().__init__()
        self.max_positions, self.trained_len, self.enabled = max_positions, trained_len, enabled
        self.register_buffer("scale", torch.empty(0), persistent=False)
        self.build()

    def build(self, device=None) -> "LognScaling":
        device = device or self.scale.device
        if device.type == "meta":
            device = torch.device("cpu")
        self.scale = logn_table(self.max_positions, self.trained_len, device)       # (P,)
        return self

    def forward(self, positions: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """q (..., Hq, D) with positions' leading dims, scaled in place; returns q."""
        return q.mul_(self.scale[positions][..., None, None])                     # (..., 1, 1)


class Attention(nn.Module):
    """Scaled dot-product attention with GQA over a paged KV cache (one layer)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.backend = TORCH
        # (num_blocks, block_size, Hkv, D) tensors or QuantKVCaches, set by the runner
        self.k_cache: torch.Tensor | QuantKVCache | None = None
        self.v_cache: torch.Tensor | QuantKVCache | None = None

    def forward(self, q, k, v, metadata: AttentionMetadata | None = None,
                kv_stored: bool = False) -> torch.Tensor:
        """q (..., Hq, D), k/v (..., Hkv, D) -> (..., Hq, D). kv_stored: k/v are in the cache
        already (the backend fused store_kv into RoPE)."""
        if metadata is None:
            return self._dense_causal(q, k, v)
        if isinstance(self.k_cache, QuantKVCache):
            return self._quantized(q, k, v, metadata)
        slots = metadata.slot_mapping if metadata.kv_slots is None else metadata.kv_slots
        if not kv_stored:
            self.backend.store_kv(k, v, self.k_cache, self.v_cache, slots)
        if metadata.is_prefill:
            return self.backend.prefill(q, k, v, self.k_cache, self.v_cache, metadata, self.scale)
        return self.backend.decode(q, self.k_cache, self.v_cache, metadata, self.scale)

    def _quantized(self, q, k, v, md: AttentionMetadata) -> torch.Tensor:
        """The same three steps over an int8/int4 cache (quant_policy 8/4)."""
        self.backend.store_kv_quant(k, v, self.k_cache, self.v_cache, md.slot_mapping)
        if md.is_prefill:
            return self.backend.prefill_quant(q, self.k_cache, self.v_cache, md, self.scale)
        return self.backend.decode_quant(q, self.k_cache, self.v_cache, md, self.scale)

    def _dense_causal(self, q, k, v):
        # (B, L, H, D) -> (B, H, L, D) for SDPA; GQA by repeating each KV head
        group = self.num_heads // self.num_kv_heads
        q, k, v = (t.transpose(-3, -2) for t in (q, k, v))               # (B, H*, L, D)
        k = k.repeat_interleave(group, dim=-3)                            # (B, Hq, L, D)
        v = v.repeat_interleave(group, dim=-3)                            # (B, Hq, L, D)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return out.transpose(-3, -2)                                      # (B, L, Hq, D)

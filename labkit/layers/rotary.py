"""Rotary position embedding (RoPE), HF "rotate half" convention (kernels/rotary.py).

cos/sin are precomputed for every position up to max_positions; each layer rotates its
queries and keys together, in place, by looking up its tokens' positions, so packed batches
of sequences at different offsets need no padding.
"""
import torch
from torch import nn

from labkit.layers.backend import TORCH


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float, max_positions: int):
        super().__init__()
        self.head_dim, self.base, self.max_positions = head_dim, base, max_positions
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.backend = TORCH
        self.build()

    def build(self, device=None) -> "RotaryEmbedding":
        """(Re)compute the tables in float32 on `device`: after `to_empty`, or after a cast of
        the model to bf16, which would otherwise round the angles of far positions."""
        device = device or self.cos.device
        if device.type == "meta":
            device = torch.device("cpu")
        d = self.head_dim
        # inv_freq_i = base^(-2i/D): one frequency per pair of channels
        inv_freq = 1.0 / (self.base ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
        t = torch.arange(self.max_positions, dtype=torch.float32, device=device)  # (P,)
        freqs = torch.outer(t, inv_freq)                                 # (P, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)                          # (P, D)
        self.cos, self.sin = emb.cos(), emb.sin()                        # (P, D) float32 each
        return self

    def forward(self, positions: torch.Tensor, qk: torch.Tensor) -> torch.Tensor:
        """qk (..., Hq+Hkv, D) with positions' leading dims, rotated in place; returns qk."""
        return self.backend.rotary(qk, positions, self.cos, self.sin)

"""Rotary position embedding (RoPE), HF "rotate half" convention.

cos/sin are precomputed for every position up to max_positions. Each step looks up its
tokens' rows once (`cos_sin`), and every layer rotates its queries and keys with them, so
packed batches of sequences at different offsets need no padding.
"""
import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:          # (..., D)
    x1, x2 = x.chunk(2, dim=-1)                             # (..., D/2) each
    return torch.cat((-x2, x1), dim=-1)                     # (..., D)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., H, D) rotated by cos/sin (..., 1, D); computed in float32, returned in x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float, max_positions: int):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        # inv_freq_i = base^(-2i/D): one frequency per pair of channels
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        t = torch.arange(max_positions, dtype=torch.float32)             # (P,)
        freqs = torch.outer(t, inv_freq)                                 # (P, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)                          # (P, D)
        self.register_buffer("cos", emb.cos(), persistent=False)         # (P, D)
        self.register_buffer("sin", emb.sin(), persistent=False)         # (P, D)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (N,) or (B, L) -> cos, sin (..., 1, D), broadcasting over heads."""
        return self.cos[positions].unsqueeze(-2), self.sin[positions].unsqueeze(-2)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q (..., Hq, D), k (..., Hkv, D) with positions' leading dims -> rotated q, k."""
        cos, sin = self.cos_sin(positions)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

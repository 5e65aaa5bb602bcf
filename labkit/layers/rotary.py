"""Rotary position embedding (RoPE), HF "rotate half" convention.

cos/sin are precomputed for every position up to max_positions and indexed by each token's
absolute position, so packed batches of sequences at different offsets need no padding.
"""
import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:          # (..., D)
    x1, x2 = x.chunk(2, dim=-1)                             # (..., D/2) each
    return torch.cat((-x2, x1), dim=-1)                     # (..., D)


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

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions (N,) or (B, L); q (..., Hq, D), k (..., Hkv, D) with the same leading dims."""
        cos = self.cos[positions].unsqueeze(-2)                          # (..., 1, D)
        sin = self.sin[positions].unsqueeze(-2)                          # (..., 1, D)
        qf, kf = q.float(), k.float()
        q = (qf * cos + rotate_half(qf) * sin).to(q.dtype)               # (..., Hq, D)
        k = (kf * cos + rotate_half(kf) * sin).to(k.dtype)               # (..., Hkv, D)
        return q, k

"""Rotary position embedding (RoPE), HF "rotate half" convention (kernels/rotary.py), with
optional dynamic NTK scaling for contexts longer than the model was trained on.

cos/sin are precomputed for every position up to max_positions; each layer rotates its
queries and keys together, in place, by looking up its tokens' positions, so packed batches
of sequences at different offsets need no padding.

Dynamic NTK (`scaling_factor` f >= 1; LMDeploy's rope_scaling_factor, HF's rope_type "dynamic").
Beyond the trained length T (max_position_embeddings) the base grows with the length s:

    base(s) = base x (f s / T - (f - 1)) ^ (D / (D - 2))          for s > T, else base
    theta_i(p) = p x base(s) ^ (-2i / D)

so the slowest channels rotate no further than they did in training. What is s?
  - HF transformers: s = 1 + the largest position in the forward call. A prompt is rotated
    with the base of its full length, then each decoded token with the base of its own
    length; keys already in the cache keep the base they were rotated with.
  - LMDeploy (TurboMind): one base per sequence, chosen when the sequence starts (from its
    context length) and kept for all of its tokens.
  - here: s = p + 1 for the token at position p, i.e. every token is rotated with the base
    HF's decode loop would give it. The tables stay per position (one row per position,
    built once), so a token's key depends only on (token, position): prefix-cache blocks
    shared by different requests, chunked prefill and recompute after preemption all give
    the same keys, and the Triton kernel and CUDA graphs read the same static tables.
    A prompt no longer than T, decoded past T, matches HF token for token (tests/test_long_context.py);
    a prompt longer than T differs from HF's prefill (which uses base(prompt length) for all of it).
"""
from __future__ import annotations

import torch
from torch import nn

from labkit.layers.backend import TORCH


def ntk_base(base: float, head_dim: int, seq_len, trained_len: int, factor: float):
    """Dynamic NTK base for sequences of `seq_len` tokens (a number or a float64 tensor)."""
    if factor < 1:
        return base if not torch.is_tensor(seq_len) else torch.full_like(seq_len, base)
    s = torch.clamp(seq_len, min=trained_len) if torch.is_tensor(seq_len) else max(seq_len, trained_len)
    return base * (factor * s / trained_len - (factor - 1)) ** (head_dim / (head_dim - 2))


def rope_angles(head_dim: int, base: float, positions: torch.Tensor, trained_len: int,
                factor: float = 0.0) -> torch.Tensor:
    """theta (P, D/2) float64 for `positions` (P,): position x the inverse frequency of each
    pair of channels, with the dynamic NTK base of length position + 1 when factor >= 1."""
    p = positions.to(torch.float64)                                        # (P,)
    i = torch.arange(0, head_dim, 2, dtype=torch.float64, device=p.device) / head_dim  # (D/2,)
    b = ntk_base(base, head_dim, p + 1, trained_len, factor)               # (P,) per position
    if not torch.is_tensor(b):
        b = torch.full_like(p, b)
    inv_freq = b[:, None] ** -i[None, :]                                   # (P, D/2)
    return p[:, None] * inv_freq                                           # (P, D/2)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float, max_positions: int,
                 scaling_factor: float = 0.0, trained_len: int | None = None):
        super().__init__()
        self.head_dim, self.base, self.max_positions = head_dim, base, max_positions
        self.scaling_factor = float(scaling_factor or 0.0)    # 0: plain RoPE
        self.trained_len = trained_len or max_positions
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.backend = TORCH
        self.build()

    def build(self, device=None) -> "RotaryEmbedding":
        """(Re)compute the tables on `device`: after `to_empty`, after a cast of the model to
        bf16 (which would round the angles of far positions), or after a scaling change.
        Angles in float64 (p x freq loses ~p x 1e-7 rad in float32), tables float32."""
        device = device or self.cos.device
        if device.type == "meta":
            device = torch.device("cpu")
        t = torch.arange(self.max_positions, device=device)                # (P,)
        freqs = rope_angles(self.head_dim, self.base, t, self.trained_len, self.scaling_factor)
        emb = torch.cat((freqs, freqs), dim=-1)                            # (P, D) float64
        self.cos, self.sin = emb.cos().float(), emb.sin().float()          # (P, D) float32 each
        return self

    def set_scaling(self, scaling_factor: float, trained_len: int) -> "RotaryEmbedding":
        """Switch dynamic NTK on (factor >= 1) or off (0) and rebuild the tables in place."""
        self.scaling_factor, self.trained_len = float(scaling_factor or 0.0), trained_len
        return self.build()

    def forward(self, positions: torch.Tensor, qk: torch.Tensor) -> torch.Tensor:
        """qk (..., Hq+Hkv, D) with positions' leading dims, rotated in place; returns qk."""
        return self.backend.rotary(qk, positions, self.cos, self.sin)

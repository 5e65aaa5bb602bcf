"""Rotary position embedding (RoPE), HF "rotate half" convention (kernels/rotary.py), with
optional dynamic NTK scaling for sequences longer than the model was trained on.

cos/sin are precomputed for every position up to max_positions with the model's base; each
layer rotates its queries and keys together, in place, by looking up its tokens' positions, so
packed batches of sequences at different offsets need no padding.

Dynamic NTK (`scaling_factor` f >= 1; LMDeploy's rope_scaling_factor, HF's rope_type "dynamic").
A sequence of length s beyond the trained length T (max_position_embeddings) is rotated with
a larger base, so the slowest channels turn no further than they did in training:

    base(s) = base x (f s / T - (f - 1)) ^ (D / (D - 2))          for s > T, else base
    theta_i(p) = p x base(s) ^ (-2i / D)

The base is chosen **once per sequence** and used for all of its tokens, keys and queries
alike, so q.k still depends only on the distance between two tokens (what RoPE is for). The
engine takes s = the length the sequence may reach (prompt + max_new_tokens, capped at
session_len) when the request is added: the sequence's "rope length", carried per token in
the step inputs (0 = the model's base). That is HF's dynamic rope for a forward pass over the
whole text, and LMDeploy's one-base-per-sequence. (HF's decode loop instead grows the base with
every new position while the cached keys keep the base they were rotated with; past T that
breaks the relative-position property, and on the bundled model it measured far worse than
plain RoPE: docs/PERF.md, long context.) Sequences with a scaled base take an eager step with
per-token tables (`tables_for`) and a prefix-cache namespace of their own (Sequence.cache_salt).
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


def rope_angles(head_dim: int, positions: torch.Tensor, bases) -> torch.Tensor:
    """theta (P, D/2) float64: position x the inverse frequency of each pair of channels, with
    one base for all positions (a number) or one per position (a (P,) tensor)."""
    p = positions.to(torch.float64)                                        # (P,)
    i = torch.arange(0, head_dim, 2, dtype=torch.float64, device=p.device) / head_dim  # (D/2,)
    b = bases.to(torch.float64) if torch.is_tensor(bases) else torch.full_like(p, float(bases))
    return p[:, None] * b[:, None] ** -i[None, :]                          # (P, D/2)


def _cos_sin(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    emb = torch.cat((theta, theta), dim=-1)                                # (P, D) float64
    return emb.cos().float(), emb.sin().float()                            # (P, D) float32 each


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
        """(Re)compute the tables on `device`: after `to_empty`, or after a cast of the model to
        bf16 (which would round the angles of far positions). Angles in float64 (p x freq loses
        ~p x 1e-7 rad in float32), tables float32. The tables use the model's base: a scaled
        sequence gets its own rows from `tables_for`."""
        device = device or self.cos.device
        if device.type == "meta":
            device = torch.device("cpu")
        t = torch.arange(self.max_positions, device=device)                # (P,)
        self.cos, self.sin = _cos_sin(rope_angles(self.head_dim, t, self.base))
        return self

    def set_scaling(self, scaling_factor: float, trained_len: int) -> "RotaryEmbedding":
        """Switch dynamic NTK on (factor >= 1) or off (0) for the sequences added from now on."""
        self.scaling_factor, self.trained_len = float(scaling_factor or 0.0), trained_len
        return self

    def rope_length(self, max_len: int) -> int:
        """The rope length a sequence that may reach `max_len` tokens is rotated for: max_len
        when dynamic NTK is on and it exceeds the trained length, else 0 (the model's base)."""
        return int(max_len) if self.scaling_factor >= 1 and max_len > self.trained_len else 0

    def sequence_base(self, rope_len: int) -> float:
        return ntk_base(self.base, self.head_dim, rope_len, self.trained_len, self.scaling_factor) \
            if rope_len else self.base

    def tables_for(self, positions: torch.Tensor, rope_lens: torch.Tensor):
        """Per-token tables: positions (N,), rope_lens (N,) (0: the model's base) -> cos, sin
        (N, D) float32, row n for token n (rotate with positions = arange(N))."""
        s = rope_lens.to(torch.float64)                                    # (N,)
        b = torch.where(s > 0, ntk_base(self.base, self.head_dim, s, self.trained_len,
                                        self.scaling_factor), self.base)             # (N,)
        return _cos_sin(rope_angles(self.head_dim, positions, b))

    def step(self, positions: torch.Tensor, tables=None):
        """This forward's RoPE inputs, prepared once for every layer (`backend.rope_step`: the
        CPU gathers the cos/sin rows of the positions here, not in each layer). `tables`:
        per-token (cos, sin) from `tables_for` (a step with a scaled sequence)."""
        if tables is None:
            return self.backend.rope_step(positions, self.cos, self.sin)
        rows = torch.arange(positions.numel(), device=positions.device).view(positions.shape)
        return self.backend.rope_step(rows, *tables)

    def forward(self, positions: torch.Tensor, qk: torch.Tensor, tables=None,
                step=None) -> torch.Tensor:
        """qk (..., Hq+Hkv, D) with positions' leading dims, rotated in place; returns qk.
        `step`: this forward's `self.step(positions, tables)`, made once by the model."""
        if step is None:
            step = self.step(positions, tables)
        return self.backend.rotary_step(qk, step)

"""RMSNorm, computed in float32 as HF transformers does (so fp32 logits match to ~1e-6),
optionally fused with the residual add in front of it (kernels/rms_norm.py)."""
import torch
from torch import nn

from labkit.layers.backend import TORCH


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.backend = TORCH

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x (..., H) -> y; with residual -> (y, x + residual), the sum being the next residual."""
        return self.backend.rms_norm(x, self.weight, self.eps, residual)

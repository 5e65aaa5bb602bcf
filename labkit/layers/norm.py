"""RMSNorm, computed in float32 as HF transformers does (so fp32 logits match to ~1e-6)."""
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # (..., H)
        # x * rsqrt(mean(x^2) + eps) in float32, then the weight in x's dtype (as HF does);
        # F.rms_norm is that formula in one fused op.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)    # (..., H) float32
        return self.weight * normed.to(x.dtype)

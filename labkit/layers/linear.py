"""Linear layers. The model's four projections per layer are `Linear`s:

    attention.w_qkv  column parallel: each TP rank holds some heads' q, k, v rows
    attention.wo     row parallel:    each rank holds the matching input columns; partial sums
    feed_forward.w13 column parallel: [gate | up] rows of this rank
    feed_forward.w2  row parallel

The layer itself does not know about ranks: the loader (labkit/models/loader.py) gives it the
slice of the weight its rank owns, and the model all-reduces after the row-parallel ones.
Weight layout is torch's and TurboMind's: (out_features, in_features). The product goes
through the op backend: F.linear (cuBLAS / CPU BLAS), or on the GPU for a decode batch of at
most 16 rows in bf16 a Triton kernel that streams the weights faster (kernels/gemv.py).
"""
from __future__ import annotations

import torch
from torch import nn

from labkit.layers.backend import TORCH


class Linear(nn.Module):
    """y = x W^T (+ b). x (..., in_features) -> (..., out_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.backend = TORCH         # F.linear, or a skinny-matmul kernel for decode batches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

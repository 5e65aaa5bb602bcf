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

from kernels import w4a16_cpu
from kernels.w4a16 import w4a16_linear
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


class W4A16Linear(nn.Module):
    """y = x W^T (+ b) with W held as 4-bit codes (kernels/w4a16.py has the layout):
    qweight (out, in/2) uint8, scales (out, in/G) in the model dtype, zeros (out, in/G) uint8.
    CUDA runs the Triton W4A16 kernel (dequantization in registers); a bf16 decode batch on the
    CPU runs PyTorch's int4 CPU kernel on a copy of the codes repacked once for it
    (kernels/w4a16_cpu.py); everything else the reference: dequantize the whole weight, multiply."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        frozen = dict(requires_grad=False)           # integer tensors cannot require grad
        self.qweight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=torch.uint8), **frozen)
        self.scales = nn.Parameter(torch.empty(out_features, in_features // group_size), **frozen)
        self.zeros = nn.Parameter(torch.empty(out_features, in_features // group_size, dtype=torch.uint8), **frozen)
        self.bias = nn.Parameter(torch.zeros(out_features), **frozen) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.bfloat16
                and x.numel() <= w4a16_cpu.CPU_MAX_ROWS * x.shape[-1]
                and w4a16_cpu.supported(self.qweight, self.group_size)):
            return w4a16_cpu.w4a16_linear_cpu(x, *self._cpu_packed(), self.group_size, self.bias)
        return w4a16_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def _cpu_packed(self):
        """The CPU kernel's copy of the weight, made on first use and again if a tensor changes."""
        key = tuple(t.data_ptr() for t in (self.qweight, self.scales, self.zeros)) + \
            tuple(t._version for t in (self.qweight, self.scales, self.zeros) if not t.is_inference())
        hit = self.__dict__.get("_cpu_pack")                      # (key, (packed, scales_zeros))
        if hit is None or hit[0] != key:
            hit = (key, w4a16_cpu.pack_for_cpu(self.qweight, self.scales, self.zeros, self.group_size))
            self.__dict__["_cpu_pack"] = hit                      # not a buffer: not saved, not moved
        return hit[1]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


DECODER_LINEARS = ("attention.w_qkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


def pack_w4a16_for_cpu(model: nn.Module) -> int:
    """Make every W4A16Linear's copy for PyTorch's int4 CPU kernel now, at load time, rather than
    in the first decode step (~0.5 s for the bundled model: a latency spike for the first request
    and a skewed first benchmark point). Returns how many layers were packed."""
    layers = [m for m in model.modules() if isinstance(m, W4A16Linear)
              and w4a16_cpu.supported(m.qweight, m.group_size)]
    for m in layers:
        m._cpu_packed()
    return len(layers)


def use_w4a16(model: nn.Module, group_size: int) -> nn.Module:
    """Replace every decoder layer's Linear by a W4A16Linear of the same shape (embeddings and
    the output head stay dense). Call it before the weights are loaded."""
    for layer in model.layers:
        for name in DECODER_LINEARS:
            parent, _, leaf = name.rpartition(".")
            old = layer.get_submodule(name)
            new = W4A16Linear(old.in_features, old.out_features, group_size, old.bias is not None)
            setattr(layer.get_submodule(parent), leaf, new)
    return model

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
`W4A16Linear` holds 4-bit codes and picks its kernel by the number of rows (its docstring).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from kernels import w4a16_cpu, w4a16_frag, w4a16_gemv
from kernels._triton import HAS_TRITON
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
    On CUDA (`gpu_kernel = "auto"`, the default) one row runs the W4A16 GEMV
    (kernels/w4a16_gemv.py) on a copy of the codes repacked into its "pairs" layout, 2-64 rows
    the tensor-core kernel of kernels/w4a16_frag.py on a copy in the MMA's fragment order, more
    rows kernels/w4a16.py's GEMMs; bf16 rows on the CPU (decode and prefill) run PyTorch's int4
    CPU kernel on a copy repacked for it (kernels/w4a16_cpu.py); everything else the reference:
    dequantize the whole weight, multiply. The repacked copies are made at load
    (pack_w4a16_copies) and again if a tensor changes. The split by rows is measured on an H100
    (docs/PERF.md, 2026-12-05): the GEMV wins at one row, the frag kernel from two to 64.

    `gpu_kernel` (class-wide; LABKIT_W4A16) picks another split for comparisons: "gemv" (the GEMV
    for 1-4 rows, then the GEMMs: no frag copy) or "frag" (the frag kernel for 1-64 rows)."""

    GPU_KERNELS = ("auto", "gemv", "frag")
    gpu_kernel = os.environ.get("LABKIT_W4A16", "auto")
    if gpu_kernel not in GPU_KERNELS:
        raise ValueError(f"LABKIT_W4A16={gpu_kernel!r}: allowed values are 'auto' (the default), "
                         f"'gemv' and 'frag'")
    FRAG_MIN_ROWS, FRAG_MAX_ROWS = 2, 64       # "auto"'s rows for the frag kernel

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
        rows = x.numel() // x.shape[-1]
        kernel = self._gpu_kernel_for(rows) if x.is_cuda and HAS_TRITON else None
        if kernel == "frag":
            return w4a16_frag.w4a16_frag_triton(x, self._repacked("frag"), self.bias)
        if kernel == "gemv":
            return w4a16_gemv.w4a16_gemv_triton(x, self._repacked("pairs"), self.bias)
        if (x.device.type == "cpu" and x.dtype == torch.bfloat16
                and w4a16_cpu.supported(self.qweight, self.group_size)):
            return w4a16_cpu.w4a16_linear_cpu(x, *self._repacked("cpu"), self.group_size, self.bias)
        return w4a16_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def _gpu_kernel_for(self, rows: int) -> str | None:
        """"frag", "gemv" or None (kernels/w4a16.py's GEMMs) for `rows` rows on CUDA."""
        fits = self.out_features % 16 == 0 and self.in_features % 64 == 0   # the frag layout
        lo = 1 if self.gpu_kernel == "frag" else self.FRAG_MIN_ROWS
        if self.gpu_kernel != "gemv" and fits and lo <= rows <= self.FRAG_MAX_ROWS:
            return "frag"
        return "gemv" if rows <= w4a16_gemv.GEMV_MAX_ROWS else None

    def _repacked(self, kind: str):
        """A kernel's copy of the weight ("pairs": the GEMV's layout, "frag": the tensor-core
        kernel's fragment order, "cpu": PyTorch's int4 CPU format), made on first use and again
        if a tensor changes in place or is replaced."""
        tensors = (self.qweight, self.scales, self.zeros)
        key = tuple(t.data_ptr() for t in tensors) + \
            tuple(t._version for t in tensors if not t.is_inference())
        hit = self.__dict__.get("_repacked_" + kind)             # (key, copy)
        if hit is None or hit[0] != key:
            pack = {"pairs": w4a16_gemv.pack_pairs, "frag": w4a16_frag.pack_frag,
                    "cpu": w4a16_cpu.pack_for_cpu}[kind]
            hit = (key, pack(*tensors, self.group_size))
            self.__dict__["_repacked_" + kind] = hit              # not a buffer: not saved, not moved
        return hit[1]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


DECODER_LINEARS = ("attention.w_qkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


def pack_w4a16_copies(model: nn.Module) -> int:
    """Make every W4A16Linear's kernel copy now, at load time, not in the first decode step: on
    CUDA the GEMV's pairs layout and the frag kernel's copy, each where `gpu_kernel` uses it
    (before any CUDA graph is captured, and counted in the memory the KV cache is sized from);
    on a bf16 CPU model the int4 CPU kernel's format (~0.5 s for the bundled model: a latency
    spike for the first request and a skewed first benchmark point).
    Returns how many layers were packed."""
    packed = 0
    for m in model.modules():
        if not isinstance(m, W4A16Linear):
            continue
        if m.qweight.is_cuda and HAS_TRITON:
            kernels = {m._gpu_kernel_for(rows) for rows in range(1, m.FRAG_MAX_ROWS + 1)}
            for kind in ("frag", "gemv"):
                if kind in kernels:
                    m._repacked("pairs" if kind == "gemv" else kind)
        elif (m.qweight.device.type == "cpu" and m.scales.dtype == torch.bfloat16
              and w4a16_cpu.supported(m.qweight, m.group_size)):
            m._repacked("cpu")
        else:
            continue
        packed += 1
    return packed


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

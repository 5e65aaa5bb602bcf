"""W4A16 on the CPU: PyTorch's int4 CPU matmul instead of "dequantize, then F.linear".

The reference (kernels/w4a16.py, `w4a16_linear_ref`) turns the whole weight back into floats
on every call: that moves more bytes than the float weight it replaces, so a 4-bit workspace
ran slower than the float one. PyTorch ships an int4 matmul for the CPU
(`aten._weight_int4pack_mm_for_cpu`, the CPU sibling of the GPU "tinygemm" kernel that torchao's
int4 weight-only mode uses): the codes are repacked once into its own layout, activations are
bf16, and each group is dequantized inside the kernel, in registers.

Its zero point is a float added after scaling, around a fixed centre of 8:

    ours (AWQ, kernels/w4a16.py):   W = (q - z) * s              z integer 0..15
    PyTorch's int4 CPU kernel:      W = (q - 8) * s + zero   ->  zero = (8 - z) * s

scales and zeros are bf16 there, like x: the product is a bf16 product (what "A16" means), equal
to the reference in bf16 up to rounding (relative error ~4e-3 on random data, tests/test_w4a16_cpu.py).

When it is used (labkit/layers/linear.py, W4A16Linear): x on the CPU in bf16, any number of
rows, N a multiple of 16 (the kernel's packing). fp32 engines keep the reference (exact, what
the parity tests compare). Measured on a 2 vCPU AVX2 EPYC (bf16 emulated), torch 2.13, 2 threads,
G=64, against the reference it replaces (dequantize the whole weight, then F.linear):

    N x K         M = 8        32        256        2048
    3072 x 576    0.6 ms       2.5       19.7       201      kernel
                  15.3         21.1      75.8       466      reference
    576 x 1536    0.4          1.7       9.9        75       kernel
                  2.1          5.4       25.5       185      reference

The reference pays for its dequantization (~8 full-size tensor ops per call, 3-11 ms for the
3072 x 576 weight) at every M, so the kernel wins at every size measured, prefill chunks
included (scripts/cpu_w4a16_rows.py; docs/PERF.md). An earlier version stopped at 8 rows,
having compared the kernel with F.linear on the dense fp32 weight instead of the reference.

    supported(qweight, group_size)                        can this weight take the fast path
    pack_for_cpu(qweight, scales, zeros, group_size)      -> (packed, scales_and_zeros), once
    w4a16_linear_cpu(x, packed, scales_and_zeros, group_size, bias)
"""
from __future__ import annotations

import torch

from kernels.w4a16 import unpack_int4

__all__ = ["AVAILABLE", "supported", "pack_for_cpu", "w4a16_linear_cpu"]

AVAILABLE = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
    hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def supported(qweight: torch.Tensor, group_size: int) -> bool:
    """The kernel packs output rows in sixteens and needs whole groups."""
    N, half_k = qweight.shape
    return AVAILABLE and N % 16 == 0 and (2 * half_k) % group_size == 0


def pack_for_cpu(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our layout -> the kernel's: packed codes (N, K/2) uint8 in its order, and scales and
    zeros (K/G, N, 2) bf16 with zero = (8 - z) * s (computed in float32, rounded once)."""
    q = unpack_int4(qweight).to(torch.int32)                            # (N, K) codes 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    s = scales.float()                                                  # (N, K/G)
    zero = (8 - zeros.float()) * s                                      # (N, K/G)
    sz = torch.stack([s, zero], dim=-1).transpose(0, 1)                 # (K/G, N, 2)
    return packed, sz.contiguous().to(torch.bfloat16)


def w4a16_linear_cpu(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                     group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) bf16 on the CPU -> (..., N) bf16."""
    lead, K = x.shape[:-1], x.shape[-1]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, K).contiguous(), packed,
                                                   group_size, scales_and_zeros)  # (M, N)
    y = y.view(*lead, y.shape[-1])
    return y + bias.to(y.dtype) if bias is not None else y

"""SiLU-and-mul, the SwiGLU MLP's gate: out = silu(gate) * up, with [gate | up] fused in one
projection (w13) so the MLP reads its input once.

    silu(g) = g * sigmoid(g)

    silu_and_mul_ref     PyTorch, in the model dtype as HF (silu, round, multiply, round)
    silu_and_mul_triton  Triton: one pass, no intermediate tensor
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import pdl_launch, pdl_wait, require_triton, tl, triton

__all__ = ["silu_and_mul_ref", "silu_and_mul_triton"]


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2I) = [gate | up] -> (..., I)."""
    gate, up = x.chunk(2, dim=-1)                           # (..., I) each
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, I, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)   # rounded silu
    tl.store(out_ptr + row * stride_o + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Same contract as `silu_and_mul_ref`."""
    require_triton()
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])                           # (N, 2I)
    N, I = x2.shape[0], x2.shape[1] // 2
    out = torch.empty((N, I), dtype=x.dtype, device=x.device)
    if N:
        block = min(1024, triton.next_power_of_2(I))
        pdl = pdl_launch(x2)
        _silu_and_mul_kernel[(N, triton.cdiv(I, block))](x2, out, x2.stride(0), out.stride(0), I,
                                                         BLOCK=block, PDL=pdl,
                                                         launch_pdl=pdl, num_warps=4)
    return out.view(*shape[:-1], I)

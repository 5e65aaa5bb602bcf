"""RMSNorm, optionally fused with the residual add before it (one pass over the hidden state).

    y = weight * (x / sqrt(mean(x^2) + eps))                        computed in float32

With a residual (the pre-norm transformer's `x = x + sublayer(x)` folded into the next norm):

    s = x + residual          (rounded to the model dtype, as HF adds the residual)
    y = rmsnorm(s) * weight,  and s is returned as the new residual

    rms_norm_ref     PyTorch (F.rms_norm in float32, as HF's LlamaRMSNorm)
    rms_norm_fast    PyTorch, the same numbers (bitwise) in fewer ops: the CPU engine's path
    rms_norm_triton  Triton: one program per row, the add, the norm and the scale in registers
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import pdl_launch, pdl_wait, require_triton, tl, triton

__all__ = ["rms_norm_ref", "rms_norm_fast", "rms_norm_triton"]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None):
    """x (..., H), weight (H,) -> y (..., H); with residual (..., H) -> (y, x + residual)."""
    if residual is not None:
        x = x + residual                                             # (..., H) model dtype
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)          # (..., H) float32
    y = weight * normed.to(x.dtype)                                  # (..., H) as HF does
    return y if residual is None else (y, x)


def rms_norm_fast(x: torch.Tensor, weight: torch.Tensor, eps: float,
                  residual: torch.Tensor | None = None):
    """Same contract and numbers as `rms_norm_ref` (bit for bit: tests/test_cpu_fast_path.py).

    A CPU decode step runs 61 norms of one row each, so the op count is the cost: F.rms_norm's
    CPU path is ~20 small ops (pow, mean = sum + divide, casts of its Python scalars, ...), and
    the float32 copy of an fp32 tensor and the cast back add more. Here: the same products,
    sum, division by H, + eps and rsqrt in 7 ops, with H and eps as cached 0-d tensors (an
    in-place op with a Python number converts it to a tensor on every call).
    """
    if residual is not None:
        x = torch.add(x, residual)                                   # (..., H) model dtype
    xf = x if x.dtype == torch.float32 else x.float()                # (..., H) float32
    ms = torch.mul(xf, xf).sum(-1, keepdim=True).div_(_scalar(x.shape[-1]))  # (..., 1) mean x^2
    normed = torch.mul(xf, ms.add_(_scalar(eps)).rsqrt_())           # (..., H) float32
    if normed.dtype != x.dtype:
        normed = normed.to(x.dtype)                                  # rounded as HF rounds it
    y = weight * normed                                              # (..., H)
    return y if residual is None else (y, x)


_SCALARS: dict[float, torch.Tensor] = {}


def _scalar(value: float) -> torch.Tensor:
    """A 0-d float32 CPU tensor holding `value`, made once (ops take it as a scalar)."""
    t = _SCALARS.get(value)
    if t is None:
        with torch.inference_mode(False), torch.no_grad():
            t = _SCALARS[value] = torch.tensor(float(value), dtype=torch.float32)
    return t


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr, stride_x, stride_r, stride_y,
                     stride_ro, eps, H: tl.constexpr, BLOCK_H: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)                # a weight: before the wait
    pdl_wait(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)   # rounded sum
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / H + eps)
    normed = (xf * inv).to(x_ptr.dtype.element_ty)                 # rounded as HF rounds it
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None):
    """Same contract as `rms_norm_ref`."""
    require_triton()
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])                                    # (N, H)
    N, H = x2.shape
    y = torch.empty_like(x2)
    res_out = torch.empty_like(x2) if residual is not None else y
    r2 = residual.reshape(-1, H) if residual is not None else x2
    if N:
        block = triton.next_power_of_2(H)
        pdl = pdl_launch(x2)
        _rms_norm_kernel[(N,)](x2, r2, weight, y, res_out, x2.stride(0), r2.stride(0), y.stride(0),
                               res_out.stride(0), eps, H=H, BLOCK_H=block,
                               HAS_RESIDUAL=residual is not None, PDL=pdl, launch_pdl=pdl,
                               num_warps=4 if block >= 2048 else (2 if block >= 512 else 1))
    y = y.view(shape)
    return y if residual is None else (y, res_out.view(shape))

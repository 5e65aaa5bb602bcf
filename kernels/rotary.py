"""Rotary position embedding (RoPE) on queries and keys, in place, HF's "rotate half" layout.

For a head vector x of D channels split into halves x1 = x[:D/2], x2 = x[D/2:], and the
angles theta_i(p) = p * base^(-2i/D) of position p:

    x1' = x1 cos(theta) - x2 sin(theta)
    x2' = x2 cos(theta) + x1 sin(theta)

cos/sin are precomputed tables (P, D) (both halves equal, as HF stores them). The model
rotates q and k together: they are the first Hq + Hkv heads of the fused qkv projection.

    rotary_ref     PyTorch, in float32, written back in place
    rotary_rows    the cos/sin rows of a step's positions, gathered once for every layer
    rotary_fast    PyTorch on those rows: the same numbers as rotary_ref (bitwise), fewer ops
    rotary_triton  Triton: one program per token, every head of it, in place
"""
from __future__ import annotations

import torch

from kernels._triton import require_triton, tl, triton

__all__ = ["rotary_ref", "rotary_rows", "rotary_fast", "rotary_triton", "rotate_half"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:          # (..., D)
    x1, x2 = x.chunk(2, dim=-1)                             # (..., D/2) each
    return torch.cat((-x2, x1), dim=-1)                     # (..., D)


def rotary_ref(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
    """x (..., H, D) rotated in place by the rows `positions` (...) of cos/sin (P, D); returns x."""
    c = cos[positions].unsqueeze(-2)                        # (..., 1, D) float32
    s = sin[positions].unsqueeze(-2)
    xf = x.float()
    x.copy_(xf * c + rotate_half(xf) * s)                   # (..., H, D) back in x's dtype
    return x


def rotary_rows(positions: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of cos/sin (P, D) at `positions` (...) -> c, s (..., 1, D) float32, for
    `rotary_fast`. Every layer rotates the same positions, so the CPU engine gathers them once
    per step (two index ops, not two per layer). s carries rotate_half's sign: its first half is
    negated, so that rotate_half(x) * sin == swap_halves(x) * s exactly (negation is exact)."""
    c = cos[positions].unsqueeze(-2)                        # (..., 1, D) float32, a copy
    s = sin[positions].unsqueeze(-2)                        # (..., 1, D) float32, a copy
    s[..., :s.shape[-1] // 2].neg_()                        # (-sin_1, sin_2)
    return c, s


def rotary_fast(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x (..., H, D) rotated in place by the rows c, s (..., 1, D) of `rotary_rows`; returns x.
    The same numbers as `rotary_ref` (tests/test_cpu_fast_path.py) in 4 ops for float32 x
    (flip, mul, mul, add; the reference takes ~12): the half swap is one flip of the
    (2, D/2) view, the sign lives in s, and float32 x is updated in place, without a copy."""
    D = x.shape[-1]
    xf = x if x.dtype == torch.float32 else x.float()       # (..., H, D) float32
    swapped = xf.unflatten(-1, (2, D // 2)).flip(-2).flatten(-2)   # (x2, x1), a new tensor
    swapped.mul_(s)                                         # (-x2 sin, x1 sin) = rotate_half(x) sin
    out = xf.mul_(c).add_(swapped)                          # x cos + rotate_half(x) sin
    if out is not x:
        x.copy_(out)                                        # back in x's dtype (bf16: rounded)
    return x


@triton.jit
def _rotary_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, stride_xn, stride_xh, stride_c,
                   H: tl.constexpr, H_P: tl.constexpr, HALF: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    p = tl.load(pos_ptr + n).to(tl.int64)
    h = tl.arange(0, H_P)[:, None]                          # (H_P, 1)
    i = tl.arange(0, HALF)[None, :]                         # (1, HALF)
    mask = h < H
    c = tl.load(cos_ptr + p * stride_c + i)                 # (1, HALF) float32
    s = tl.load(sin_ptr + p * stride_c + i)
    base = x_ptr + n * stride_xn + h * stride_xh
    x1 = tl.load(base + i, mask=mask, other=0.0).to(tl.float32)          # (H_P, HALF)
    x2 = tl.load(base + HALF + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(base + i, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + HALF + i, (x2 * c + x1 * s).to(x_ptr.dtype.element_ty), mask=mask)


def rotary_triton(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
    """Same contract as `rotary_ref`: x (N, H, D) (a view: rows and heads may be strided)."""
    require_triton()
    assert x.dim() == 3 and x.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous()
    N, H, D = x.shape
    assert D % 2 == 0 and (D // 2) == triton.next_power_of_2(D // 2)
    if N:
        _rotary_kernel[(N,)](x, positions, cos, sin, x.stride(0), x.stride(1), cos.stride(0),
                             H=H, H_P=triton.next_power_of_2(H), HALF=D // 2, num_warps=1)
    return x

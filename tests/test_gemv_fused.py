"""The skinny matmul with fused work (kernels/gemv.py) against float64 references: RMSNorm
(with and without the residual add) done on x as it is loaded, SwiGLU's silu(gate) * up done
on the two accumulators (w13 = [W1 | W3]), and both at once.

On CPU the kernels run in Triton's interpreter at small shapes in fp32; with a GPU (marker
gpu) at Llama-2-7B's decode shapes in bf16. Fresh random inputs each run; K not a multiple of
the tile, odd N, M from 1 to 16.
"""
from __future__ import annotations

import pytest
import torch

from kernels._triton import HAS_TRITON
import torch.nn.functional as F

from kernels.rms_norm import rms_norm_ref
from kernels.gemv import (linear_silu_ref, linear_silu_triton, rms_norm_linear_ref,
                          rms_norm_linear_triton)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
SHAPES = [(40, 96), (33, 50), (24, 576)] + ([(12288, 4096), (22016, 4096)] if CUDA else [])


def _close(got, want):
    """got vs want (float64) in the model dtype's tolerance, relative to the output's scale."""
    tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-3
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err < tol, f"max error {err:.2e} of the output's largest value"


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_linear(m, n, k, with_residual):
    x = torch.randn(m, k, dtype=DTYPE, device=DEV) * 3
    res = torch.randn(m, k, dtype=DTYPE, device=DEV) if with_residual else None
    nw = torch.rand(k, dtype=DTYPE, device=DEV) + 0.5
    w = torch.randn(n, k, dtype=DTYPE, device=DEV) / k ** 0.5
    y, new_res = rms_norm_linear_triton(x, res, nw, 1e-5, w)
    y_ref, res_ref = rms_norm_linear_ref(x, res, nw, 1e-5, w)
    h_ref = rms_norm_ref(x, nw, 1e-5, res)[0] if with_residual else rms_norm_ref(x, nw, 1e-5)
    _close(y, h_ref.double() @ w.double().T)          # the matmul of the reference's own input
    assert y.shape == y_ref.shape == (m, n)
    assert torch.equal(new_res, res_ref)              # the new residual: the rounded sum, exactly


def _swiglu64(h, w13):
    """silu(h @ W1^T) * (h @ W3^T) in float64."""
    g, u = (h.double() @ w13.double().T).chunk(2, dim=-1)
    return F.silu(g) * u


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("i,k", SHAPES)
def test_linear_silu(m, i, k):
    x = torch.randn(m, k, dtype=DTYPE, device=DEV)
    w13 = torch.randn(2 * i, k, dtype=DTYPE, device=DEV) * (2 / k ** 0.5)
    got = linear_silu_triton(x, w13)
    _close(got, _swiglu64(x, w13))
    assert got.shape == linear_silu_ref(x, w13).shape == (m, i)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("i,k", SHAPES[1:])
def test_rms_norm_linear_gated(m, i, k):
    x, res = torch.randn(m, k, dtype=DTYPE, device=DEV), torch.randn(m, k, dtype=DTYPE, device=DEV)
    nw = torch.rand(k, dtype=DTYPE, device=DEV) + 0.5
    w13 = torch.randn(2 * i, k, dtype=DTYPE, device=DEV) * (2 / k ** 0.5)
    y, new_res = rms_norm_linear_triton(x, res, nw, 1e-5, w13, gated=True)
    h_ref, res_ref = rms_norm_ref(x, nw, 1e-5, res)
    _close(y, _swiglu64(h_ref, w13))
    assert y.shape == rms_norm_linear_ref(x, res, nw, 1e-5, w13, gated=True)[0].shape == (m, i)
    assert torch.equal(new_res, res_ref)


def test_leading_dims_kept():
    x = torch.randn(2, 1, 40, dtype=DTYPE, device=DEV)
    w = torch.randn(7, 40, dtype=DTYPE, device=DEV)
    y, res = rms_norm_linear_triton(x, x.clone(), torch.ones(40, dtype=DTYPE, device=DEV), 1e-6, w)
    assert y.shape == (2, 1, 7) and res.shape == x.shape
    assert linear_silu_triton(x, torch.randn(14, 40, dtype=DTYPE, device=DEV)).shape == (2, 1, 7)

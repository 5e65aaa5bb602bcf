"""The skinny matmul with a fused prologue (kernels/gemv.py) against the unfused references:
RMSNorm (with and without the residual add) and SiLU-and-mul done on x as it is loaded.

On CPU the kernels run in Triton's interpreter at small shapes in fp32; with a GPU (marker
gpu) at Llama-2-7B's decode shapes in bf16. Fresh random inputs each run; K not a multiple of
the tile, odd N, M from 1 to 16.
"""
from __future__ import annotations

import pytest
import torch

from kernels._triton import HAS_TRITON
from kernels.activation import silu_and_mul_ref
from kernels.rms_norm import rms_norm_ref
from kernels.gemv import (rms_norm_linear_ref, rms_norm_linear_triton, silu_mul_linear_ref,
                          silu_mul_linear_triton)

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


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("n,i", SHAPES)
def test_silu_mul_linear(m, n, i):
    gate_up = torch.randn(m, 2 * i, dtype=DTYPE, device=DEV) * 2
    w = torch.randn(n, i, dtype=DTYPE, device=DEV) / i ** 0.5
    got = silu_mul_linear_triton(gate_up, w)
    act = silu_and_mul_ref(gate_up)                                              # (M, I)
    _close(got, act.double() @ w.double().T)
    assert got.shape == silu_mul_linear_ref(gate_up, w).shape == (m, n)


def test_leading_dims_kept():
    x = torch.randn(2, 1, 40, dtype=DTYPE, device=DEV)
    w = torch.randn(7, 40, dtype=DTYPE, device=DEV)
    y, res = rms_norm_linear_triton(x, x.clone(), torch.ones(40, dtype=DTYPE, device=DEV), 1e-6, w)
    assert y.shape == (2, 1, 7) and res.shape == x.shape
    assert silu_mul_linear_triton(torch.randn(3, 80, dtype=DTYPE, device=DEV), w).shape == (3, 7)

"""The many-row W4A16 kernel (kernels/w4a16_gemm.py: weight tile as the MMA's left operand)
against a float64 dequantize-then-matmul, on fresh random codes, scales, zeros and inputs;
outputs poisoned with NaN first. Interpreter on CPU at small shapes (fp32, fp16), real shapes
in bf16 on a GPU (marker `gpu`)."""
from __future__ import annotations

import pytest
import torch

from kernels._triton import HAS_TRITON
from kernels.w4a16 import dequantize_int4, w4a16_linear, w4a16_linear_ref
from kernels.w4a16_gemm import (dequantize_int4_triton, w4a16_dequant_linear,
                                w4a16_gemm_triton)

from test_w4a16_kernel import DEV
from tests.helpers import int4_reference64 as reference64, random_int4

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=3e-2, rtol=1e-2)}


CASES = [  # M, N, K, G, launch overrides (None: the launcher's choice)
    (20, 40, 96, 32, None),                                  # K=96 < a 64-wide tile's end
    (17, 33, 192, 64, dict(BLOCK_K=128)),                    # tile spans 2 groups, K tail, N tail
    (16, 24, 256, 128, dict(BLOCK_K=32)),                    # tile < group
    (37, 48, 256, 64, dict(SPLIT_K=3, BLOCK_K=64)),          # split-K that does not divide
    (33, 64, 224, 32, dict(SPLIT_K=2, BLOCK_K=128, BLOCK_N=32)),  # split-K with a K tail
    (70, 24, 128, 128, dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64)),  # several M tiles, M tail
    (19, 24, 128, 32, dict(BLOCK_K=64, SPLIT_K=2)),          # a tile over 2 groups, split-K
]


@pytest.mark.parametrize("M,N,K,G,cfg", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemm_matches_float64(M, N, K, G, cfg, dtype):
    q, qw, s, z = random_int4(N, K, G, dtype)
    x = torch.randn(M, K, device=DEV).to(dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)   # poisoned
    y = w4a16_gemm_triton(x, qw, s, z, G, out=out, **(cfg or {}))
    assert y.data_ptr() == out.data_ptr() and not y.isnan().any()
    torch.testing.assert_close(y.cpu().double(), reference64(x, q, s, z, G), **TOL[dtype])


@pytest.mark.parametrize("split", [1, 2])
def test_gemm_bias_and_leading_dims(split):
    G = 32
    q, qw, s, z = random_int4(40, 96, G, torch.float32)
    x = torch.randn(3, 7, 96, device=DEV)                            # (B, L, K)
    bias = torch.randn(40, device=DEV)
    y = w4a16_gemm_triton(x, qw, s, z, G, bias=bias, SPLIT_K=split, BLOCK_K=32)
    assert y.shape == (3, 7, 40)
    want = reference64(x.reshape(21, 96), q, s, z, G) + bias.cpu().double()
    torch.testing.assert_close(y.reshape(21, 40).cpu().double(), want, **TOL[torch.float32])


def test_gemm_rejects_bad_shapes_and_tiles():
    q, qw, s, z = random_int4(16, 64, 32, torch.float32)
    x = torch.randn(20, 64, device=DEV)
    with pytest.raises(ValueError, match="group_size=48"):
        w4a16_gemm_triton(x, qw, s, z, 48)
    with pytest.raises(ValueError, match="BLOCK_K=48"):
        w4a16_gemm_triton(x, qw, s, z, 32, BLOCK_K=48)


# ---------------------------------------------------------------------------- GPU, real shapes
@pytest.mark.gpu
@pytest.mark.parametrize("K,N", [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336)])
@pytest.mark.parametrize("M,G", [(16, 128), (64, 128), (256, 128), (100, 64), (300, 32)])
def test_gemm_real_shapes_gpu(K, N, M, G):
    q, qw, s, z = random_int4(N, K, G, torch.bfloat16)
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=DEV)
    y = w4a16_gemm_triton(x, qw, s, z, G, out=out)
    want = reference64(x, q, s, z, G)
    err = (y.double().cpu() - want).abs().max() / want.abs().max()
    assert not y.isnan().any() and err < 1e-2
    # the dispatcher (what W4A16Linear calls) gives the same numbers within bf16 rounding
    y2 = w4a16_linear(x, qw, s, z, G)
    assert ((y2.double().cpu() - want).abs().max() / want.abs().max()) < 1e-2
    w = dequantize_int4_triton(qw, s, z, G, torch.bfloat16)
    assert torch.equal(w, dequantize_int4(qw, s, z, G, torch.bfloat16))


@pytest.mark.parametrize("N,K,G", [(40, 96, 32), (33, 320, 64), (24, 256, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_kernel_equals_reference_bit_for_bit(N, K, G, dtype):
    _, qw, s, z = random_int4(N, K, G, dtype)
    got = dequantize_int4_triton(qw, s, z, G, dtype)
    assert torch.equal(got.cpu(), dequantize_int4(qw.cpu(), s.cpu(), z.cpu(), G, dtype))
    x = torch.randn(5, K, device=DEV).to(dtype)
    torch.testing.assert_close(w4a16_dequant_linear(x, qw, s, z, G),
                               w4a16_linear_ref(x, qw, s, z, G), rtol=0, atol=0)

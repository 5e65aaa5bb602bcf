"""The W4A16 kernel (kernels/w4a16.py) against a float64 dequantize-then-matmul, on fresh
random codes, scales, zeros and inputs; outputs poisoned with NaN first.

On CPU the Triton kernel runs in the interpreter at small shapes (fp32 and fp16; the
interpreter's bf16 `tl.dot` is wrong, so bf16 is checked on the GPU only); with a GPU (marker
`gpu`) the same checks run at real shapes. The packing is checked bit by bit against a plain
Python reading of the layout documented in the kernel file.
"""
from __future__ import annotations

import pytest
import torch

from kernels._triton import HAS_TRITON
from kernels.w4a16 import (dequantize_int4, pack_int4, unpack_int4, w4a16_linear,
                           w4a16_linear_ref, w4a16_linear_triton)
from tests.helpers import int4_reference64, random_int4

_CUDA = torch.cuda.is_available()    # without one, conftest.py runs Triton in the interpreter
DEV = "cuda" if _CUDA else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=3e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=1e-1, rtol=2e-2)}


# ---------------------------------------------------------------------------- layout
def test_packing_bit_by_bit():
    q = torch.randint(0, 16, (3, 96), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (3, 48) and packed.dtype == torch.uint8
    for n in range(3):
        for b in range(48):
            unit, j = divmod(b, 16)                             # 16 bytes per unit of 32 columns
            byte = int(packed[n, b])
            assert byte & 0x0F == int(q[n, 32 * unit + j])      # bits 0..3: the unit's first half
            assert byte >> 4 == int(q[n, 32 * unit + 16 + j])   # bits 4..7: its second half
    assert torch.equal(unpack_int4(packed), q)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_int4(torch.zeros(2, 48, dtype=torch.uint8))


def test_dequantize_matches_formula():
    G = 32
    q, qw, s, z = random_int4(8, 64, G, device="cpu")
    w = dequantize_int4(qw, s, z, G, torch.float64)
    n, k = 5, 45
    assert w[n, k].item() == pytest.approx((int(q[n, k]) - int(z[n, k // G])) * float(s[n, k // G]))


def test_reference_matches_float64():
    G = 64
    q, qw, s, z = random_int4(48, 192, G, device="cpu")
    x = torch.randn(7, 192)
    torch.testing.assert_close(w4a16_linear_ref(x, qw, s, z, G).double(),
                               int4_reference64(x, q, s, z, G), **TOL[torch.float32])


# ---------------------------------------------------------------------------- kernel
CASES = [  # M, N, K, G, launch overrides (None: the launcher's own choice)
    (1, 40, 96, 32, None),                                   # K=96: not a multiple of 64
    (3, 48, 192, 64, dict(BLOCK_K=128)),                     # K tail inside a tile, 3 groups
    (16, 24, 128, 128, dict(BLOCK_K=32)),                    # tile < group
    (5, 33, 256, 64, dict(SPLIT_K=3, BLOCK_K=64)),           # split-K, N not a multiple of 16
    (2, 64, 224, 32, dict(SPLIT_K=2, BLOCK_K=128, BLOCK_N=32)),  # split-K with a K tail
    (37, 40, 128, 32, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64)),  # tiled path, M tail
    (70, 24, 64, 64, dict(BLOCK_M=64, BLOCK_N=16)),          # several M tiles
    (1, 40, 256, 128, dict(DOT=False, BLOCK_M=1)),           # CUDA-core path, zero factored out
    (3, 33, 256, 64, dict(DOT=False, BLOCK_M=4, BLOCK_K=128, SPLIT_K=2)),  # ... a group per byte
    (2, 24, 96, 32, dict(MAGIC=False)),                      # int->float by conversion
    (4, 40, 256, 128, dict(FACTORED=False, BLOCK_K=64)),     # 16-bit x, dequantize-then-dot path
]


@needs_triton
@pytest.mark.parametrize("M,N,K,G,cfg", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_float64(M, N, K, G, cfg, dtype):
    q, qw, s, z = random_int4(N, K, G, dtype)
    x = torch.randn(M, K, device=DEV).to(dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)   # poisoned
    y = w4a16_linear_triton(x, qw, s, z, G, out=out, **(cfg or {}))
    assert y.data_ptr() == out.data_ptr() and not y.isnan().any()
    torch.testing.assert_close(y.cpu().double(), int4_reference64(x, q, s, z, G),
                               **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("split", [1, 2])
def test_kernel_bias_and_leading_dims(split):
    G = 32
    q, qw, s, z = random_int4(40, 96, G)
    x = torch.randn(2, 3, 96, device=DEV)                            # (B, L, K)
    bias = torch.randn(40, device=DEV)
    y = w4a16_linear_triton(x, qw, s, z, G, bias=bias, SPLIT_K=split, BLOCK_K=32)
    assert y.shape == (2, 3, 40)
    want = int4_reference64(x.reshape(6, 96), q, s, z, G) + bias.cpu().double()
    torch.testing.assert_close(y.reshape(6, 40).cpu().double(), want, **TOL[torch.float32])


@needs_triton
def test_kernel_rejects_bad_shapes():
    q, qw, s, z = random_int4(16, 64, 32)
    x = torch.randn(2, 64, device=DEV)
    with pytest.raises(ValueError, match="group_size=48"):
        w4a16_linear_triton(x, qw, s, z, 48)
    with pytest.raises(ValueError, match="scales"):
        w4a16_linear_triton(x, qw, s[:, :1], z, 32)
    with pytest.raises(ValueError, match="group_size=64 is not allowed for in_features=96"):
        w4a16_linear_triton(torch.randn(2, 96, device=DEV), *random_int4(16, 96, 32)[1:3],
                            torch.zeros(16, 3, dtype=torch.uint8, device=DEV), 64)


def test_dispatch_uses_reference_on_cpu():
    q, qw, s, z = random_int4(16, 64, 32, device="cpu")
    x = torch.randn(3, 64)
    assert torch.equal(w4a16_linear(x, qw, s, z, 32), w4a16_linear_ref(x, qw, s, z, 32))


# ---------------------------------------------------------------------------- GPU, real shapes
@pytest.mark.gpu
@pytest.mark.parametrize("K,N", [(4096, 4096), (4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("M", [1, 16, 64, 256])
def test_kernel_real_shapes_gpu(K, N, M):
    G = 128
    q, qw, s, z = random_int4(N, K, G, torch.bfloat16)
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=DEV)
    y = w4a16_linear_triton(x, qw, s, z, G, out=out)
    want = int4_reference64(x, q, s, z, G)
    err = (y.double().cpu() - want).abs().max() / want.abs().max()
    assert not y.isnan().any() and err < 1e-2



@pytest.mark.gpu
@pytest.mark.parametrize("M,G", [(1, 64), (16, 32), (64, 64)])
def test_kernel_other_groups_gpu(M, G):
    K, N = 4096, 11008
    q, qw, s, z = random_int4(N, K, G, torch.bfloat16)
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    y = w4a16_linear_triton(x, qw, s, z, G)
    want = int4_reference64(x, q, s, z, G)
    assert ((y.double().cpu() - want).abs().max() / want.abs().max()) < 1e-2

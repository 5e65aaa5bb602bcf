"""The W4A16 GEMV (kernels/w4a16_gemv.py, decode batches of 1-4 rows) against a float64
dequantize-then-matmul computed from the drawn codes, on fresh random codes, scales, zeros and
inputs; outputs poisoned with NaN first.

On CPU the kernel runs in the Triton interpreter at small shapes (its float32 path: the
interpreter runs no PTX), with the split-K path (three programs per block of rows, the last one
adding the partials) on by default there; with a GPU (marker `gpu`) the same checks run at
Llama-2-7B shapes, through the packed-bf16 PTX path and the float32 path. The pairs layout is
checked bit by bit against a plain reading of the kernel file's description.
"""
from __future__ import annotations

import pytest
import torch

from kernels._triton import HAS_TRITON
from kernels.w4a16 import pack_int4
from kernels.w4a16_gemv import (GEMV_MAX_ROWS, pack_pairs, unpack_pairs,
                               w4a16_gemv_ref, w4a16_gemv_triton)
from tests.helpers import int4_reference64, random_int4

_CUDA = torch.cuda.is_available()    # without one, conftest.py runs Triton in the interpreter
DEV = "cuda" if _CUDA else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=3e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=1e-1, rtol=2e-2)}


def random_pairs(N: int, K: int, G: int, dtype=torch.float32, device=DEV):
    """tests.helpers.random_int4, packed to pairs -> (codes, PairsWeight)."""
    q, *stored = random_int4(N, K, G, dtype, device)
    return q, pack_pairs(*stored, G)


# ---------------------------------------------------------------------------- layout
@pytest.mark.parametrize("G", [32, 64, 128])
def test_pairs_bit_by_bit(G):
    N, K = 3, 2 * G
    q, w = random_pairs(N, K, G, device="cpu")
    assert w.qpairs.shape == (N, K // 8) and w.qpairs.dtype == torch.int32
    for n in range(N):
        for j in range(K // 8):
            bits = int(w.qpairs[n, j]) & 0xFFFFFFFF
            for i in range(4):                        # pair i: columns 8j + 2i and 8j + 2i + 1
                assert (bits >> (4 * i)) & 15 == int(q[n, 8 * j + 2 * i])
                assert (bits >> (16 + 4 * i)) & 15 == int(q[n, 8 * j + 2 * i + 1])
                # the bfloat16 pair the kernel makes with one and-or: 128 + q, exactly
                pair = ((bits >> (4 * i)) & 0x000F000F) | 0x43004300
                lo = torch.tensor([pair & 0xFFFF], dtype=torch.int16).view(torch.bfloat16)
                hi = torch.tensor([pair >> 16], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
                assert float(lo) == 128 + int(q[n, 8 * j + 2 * i])
                assert float(hi) == 128 + int(q[n, 8 * j + 2 * i + 1])
    assert torch.equal(unpack_pairs(w), q)
    assert w.locks.shape == (N,) and not w.locks.any()


def test_reference_matches_float64():
    G = 64
    q, w = random_pairs(48, 192, G, device="cpu")
    x = torch.randn(3, 192, dtype=torch.float64)
    torch.testing.assert_close(w4a16_gemv_ref(x, w),
                               int4_reference64(x, q, w.scales, w.zeros, G),
                               atol=1e-5, rtol=1e-5)          # dequantized in float32


# ---------------------------------------------------------------------------- the kernel
CASES = [  # (N, K, G, config): N not a multiple of BLOCK_N, groups not a multiple of the split
    (40, 256, 32, None),                                  # 8 groups, split 3 (default here)
    (24, 576, 64, None),                                  # the bundled model's K: 9 groups
    (16, 384, 128, None),
    (20, 576, 64, dict(SPLIT=1, GPI=4)),                  # one program per block: no partials
    (33, 640, 32, dict(SPLIT=4, GPI=1, BLOCK_N=16)),      # 20 groups over 4 programs
    (16, 256, 64, dict(SPLIT=8)),                         # more splits than steps: clamped
]


@needs_triton
@pytest.mark.parametrize("M", list(range(1, GEMV_MAX_ROWS + 1)))
@pytest.mark.parametrize("N,K,G,cfg", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_float64(M, N, K, G, cfg, dtype):
    q, w = random_pairs(N, K, G, dtype)
    x = torch.randn(M, K, device=DEV).to(dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)   # poisoned
    y = w4a16_gemv_triton(x, w, out=out, **(cfg or {}))
    assert y.data_ptr() == out.data_ptr() and not y.isnan().any()
    torch.testing.assert_close(y.cpu().double(), int4_reference64(x, q, w.scales, w.zeros, G),
                               **TOL[dtype])
    assert not w.locks.any(), "the split-K counters must be back at 0 for the next call"


@needs_triton
def test_kernel_twice_in_a_row_and_bias_and_leading_dims():
    """The counters reset themselves: a second call (new x, same weight) is right too."""
    G = 32
    q, w = random_pairs(40, 256, G)
    bias = torch.randn(40, device=DEV)
    for _ in range(2):
        x = torch.randn(2, 1, 256, device=DEV)                            # (B, L, K)
        y = w4a16_gemv_triton(x, w, bias=bias)
        assert y.shape == (2, 1, 40)
        want = int4_reference64(x, q, w.scales, w.zeros, G) + bias.cpu().double()
        torch.testing.assert_close(y.reshape(2, 40).cpu().double(), want, **TOL[torch.float32])


@needs_triton
def test_kernel_rejects_bad_input():
    q, w = random_pairs(16, 64, 32)
    with pytest.raises(ValueError, match="at most 4"):
        w4a16_gemv_triton(torch.randn(5, 64, device=DEV), w)
    with pytest.raises(ValueError, match="in_features=64"):
        w4a16_gemv_triton(torch.randn(1, 96, device=DEV), w)
    with pytest.raises(ValueError, match="group_size=48"):
        pack_pairs(pack_int4(q).to(DEV), w.scales, w.zeros, 48)


# ---------------------------------------------------------------------------- GPU, real shapes
@pytest.mark.gpu
@pytest.mark.parametrize("K,N", [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288)])
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("G", [64, 128])
@pytest.mark.parametrize("asm", [True, False])
def test_kernel_real_shapes_gpu(K, N, M, G, asm):
    q, w = random_pairs(N, K, G, torch.bfloat16)
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=DEV)
    want = int4_reference64(x, q, w.scales, w.zeros, G)
    for _ in range(2):                                   # the counters reset between calls
        y = w4a16_gemv_triton(x, w, out=out, asm=asm)
        err = (y.double().cpu() - want).abs().max() / want.abs().max()
        assert not y.isnan().any() and err < 1e-2
    assert not w.locks.any()

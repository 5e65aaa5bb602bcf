"""The tensor-core W4A16 kernel with fragment-ordered words (kernels/w4a16_frag.py) against a
float64 dequantize-then-matmul computed from the drawn codes, on fresh random codes, scales,
zeros and inputs; outputs poisoned with NaN first.

On CPU the kernel runs in the Triton interpreter at small shapes (its float32 dequantization:
the interpreter runs no PTX; x in float32 and float16, as for the other W4A16 kernels), with
split-K on; with a GPU (marker `gpu`) at Llama-2-7B shapes through the bf16 PTX path and the
float32 path. The frag layout is checked bit by bit against the kernel file's description.
"""
from __future__ import annotations

import os

import pytest
import torch

from kernels._triton import HAS_TRITON
from kernels.w4a16 import pack_int4
from kernels.w4a16_frag import (pack_frag, unpack_frag, w4a16_frag_ref,
                                w4a16_frag_triton)
from tests.helpers import int4_reference64, random_int4

_CUDA = torch.cuda.is_available()    # without one, conftest.py runs Triton in the interpreter
DEV = "cuda" if _CUDA else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


def random_frag(N: int, K: int, G: int, dtype=torch.float32, device=DEV):
    """tests.helpers.random_int4, packed to the frag layout -> (codes, FragWeight)."""
    q, *stored = random_int4(N, K, G, dtype, device)
    return q, pack_frag(*stored, G)


def rel_err(y, ref):
    return float((y.cpu().double() - ref).abs().max() / ref.abs().max())


# ---------------------------------------------------------------------------- layout
def test_frag_bit_by_bit():
    N, K, G = 32, 128, 64
    q, w = random_frag(N, K, G, device="cpu")
    assert w.words.shape == (N // 16, K // 16, 32) and w.words.dtype == torch.int32
    flat = w.words.view(-1)
    for R in range(N // 16):
        for Q in range(K // 16):
            for lane in range(32):
                r, c = divmod(lane, 4)
                word = int(flat[((R * (K // 64) + Q // 4) * 32 + lane) * 4 + Q % 4]) & 0xFFFFFFFF
                for i in range(4):              # pair i: row r + 8 (i // 2), columns 8 (i % 2) + 2c
                    row, col = 16 * R + r + 8 * (i // 2), 16 * Q + 8 * (i % 2) + 2 * c
                    assert (word >> (4 * i)) & 15 == int(q[row, col])
                    assert (word >> (16 + 4 * i)) & 15 == int(q[row, col + 1])
    assert torch.equal(unpack_frag(w), q)


def test_reference_matches_float64():
    G = 64
    q, w = random_frag(48, 192, G, device="cpu")
    x = torch.randn(3, 192, dtype=torch.float64)
    torch.testing.assert_close(w4a16_frag_ref(x, w),
                               int4_reference64(x, q, w.scales, w.zeros, G),
                               atol=1e-5, rtol=1e-5)


def test_shapes_the_layout_cannot_hold():
    q = torch.randint(0, 16, (24, 128), dtype=torch.uint8)
    with pytest.raises(ValueError, match="out_features % 16"):
        pack_frag(pack_int4(q), torch.ones(24, 2), torch.zeros(24, 2, dtype=torch.uint8), 64)
    q = torch.randint(0, 16, (16, 96), dtype=torch.uint8)
    with pytest.raises(ValueError, match="in_features % 64"):
        pack_frag(pack_int4(q), torch.ones(16, 3), torch.zeros(16, 3, dtype=torch.uint8), 32)


# ---------------------------------------------------------------------------- kernel, CPU sizes
CASES = [(1, 32, 128, 64), (3, 48, 192, 32), (5, 16, 256, 128), (16, 64, 320, 64),
         (21, 32, 128, 32), (40, 16, 64, 64)]


@needs_triton
@pytest.mark.parametrize("M,N,K,G", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_float64(M, N, K, G, dtype):
    q, w = random_frag(N, K, G, dtype)
    x = torch.randn(M, K, dtype=dtype, device=DEV)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
    y = w4a16_frag_triton(x, w, out=out)
    assert y.data_ptr() == out.data_ptr() and not torch.isnan(y).any()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel_err(y, int4_reference64(x, q, w.scales, w.zeros, G)) < tol


@needs_triton
@pytest.mark.parametrize("split", [1, 3])
def test_bias_split_and_batch_dims(split):
    q, w = random_frag(32, 256, 64)
    x = torch.randn(2, 3, 256, device=DEV)
    bias = torch.randn(32, device=DEV)
    ref = int4_reference64(x, q, w.scales, w.zeros, 64) + bias.cpu().double()
    for _ in range(2):                  # the split-K counters are back at 0 after a call
        y = w4a16_frag_triton(x, w, bias, SPLIT_K=split)
        assert y.shape == (2, 3, 32)
        assert rel_err(y.reshape(6, 32), ref) < 1e-5
        assert not w.locks.any()


@needs_triton
def test_bad_input_is_refused():
    _, w = random_frag(16, 128, 64)
    with pytest.raises(ValueError, match="in_features=128"):
        w4a16_frag_triton(torch.randn(2, 64, device=DEV), w)
    with pytest.raises(ValueError, match="BLOCK_K"):
        w4a16_frag_triton(torch.randn(2, 128, device=DEV), w, BLOCK_K=32)


# ---------------------------------------------------------------------------- GPU, real shapes
@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("K,N", [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288)])
@pytest.mark.parametrize("M", [1, 4, 16, 64, 256])
@pytest.mark.parametrize("G", [64, 128])
@pytest.mark.parametrize("asm", [True, False])
def test_gpu_real_shapes(K, N, M, G, asm):
    q, w = random_frag(N, K, G, torch.bfloat16)
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    ref = int4_reference64(x, q, w.scales, w.zeros, G)
    for _ in range(2):
        out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=DEV)
        y = w4a16_frag_triton(x, w, out=out, asm=asm)
        assert not torch.isnan(y).any()
        assert rel_err(y, ref) < 1e-2


def test_unknown_kernel_choice_is_refused():
    import subprocess
    import sys
    env = {**os.environ, "LABKIT_W4A16": "marlin"}
    r = subprocess.run([sys.executable, "-c", "import labkit.layers.linear"], env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "LABKIT_W4A16='marlin'" in r.stderr and "'frag'" in r.stderr


@pytest.mark.parametrize("kernel", ["auto", "gemv", "frag"])
def test_engine_picks_the_kernel_by_rows(kernel, monkeypatch):
    """W4A16Linear's CUDA split by rows: "auto" GEMV at 1, frag at 2-64, the GEMMs beyond;
    "gemv" never the frag kernel; "frag" from one row; a shape outside the frag layout
    (out_features % 16) falls back to the GEMV / GEMMs."""
    from kernels.w4a16_gemv import GEMV_MAX_ROWS
    from labkit.layers.linear import W4A16Linear
    monkeypatch.setattr(W4A16Linear, "gpu_kernel", kernel)
    fits, odd = W4A16Linear(128, 64, 32), W4A16Linear(128, 40, 32)
    got = {rows: fits._gpu_kernel_for(rows) for rows in (1, 2, 4, 5, 64, 65)}
    small = {1: "gemv", 2: "gemv", 4: "gemv", 5: None, 64: None, 65: None}
    want = {"auto": {1: "gemv", 2: "frag", 4: "frag", 5: "frag", 64: "frag", 65: None},
            "gemv": small,
            "frag": {1: "frag", 2: "frag", 4: "frag", 5: "frag", 64: "frag", 65: None}}[kernel]
    assert GEMV_MAX_ROWS == 4 and got == want
    assert {rows: odd._gpu_kernel_for(rows) for rows in small} == small

"""int8/int4 KV cache: the quantizing store and the paged attention kernels over it.

The reference for attention is the plain definition, "dequantize, then attend": the whole
quantized cache is dequantized in float64 and handed to the unquantized paged_decode_ref /
paged_prefill_ref. Every cache is built by storing fresh random K/V through the quantizing
store into a pool whose unused slots hold NaN scales and garbage codes (a kernel that reads a
slot it should not turns NaN), blocks shuffled; outputs are poisoned with NaN first. On CPU the
Triton kernels run in the interpreter (conftest); with a GPU the `gpu` tests use real shapes.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():      # conftest does this too on main; before kernels/ imports
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import paged_decode_ref, paged_prefill_ref
from kernels._triton import HAS_TRITON
from kernels.kv_quant import (QuantKVCache, dequantize_ref, pack_int4, quantize_ref,
                              store_kv_quant_ref, store_kv_quant_triton, unpack_int4)
from kernels.paged_decode_quant import paged_decode_quant_ref, paged_decode_quant_triton
from kernels.paged_prefill_quant import paged_prefill_quant_ref, paged_prefill_quant_triton

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
gpu = pytest.mark.gpu
# fp32 (IEEE dots) is exact up to summation order; the float16 dot path rounds q and the
# softmax weights to float16 (2^-11), and a bf16 output to 2^-8
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


# ------------------------------------------------------------------ the arithmetic
@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_error_is_at_most_half_a_step(bits):
    x = torch.randn(200, 3, 64) * torch.rand(200, 3, 1) * 10       # rows of different ranges
    x[0] = 0.0                                                     # a constant row
    x[1] = x[1].abs() + 1.0                                        # all positive
    x[2] = -x[2].abs() - 1.0                                       # all negative
    codes, scale, zero = quantize_ref(x, bits)
    assert codes.dtype == torch.uint8 and scale.dtype == torch.float16
    assert int(codes.max()) <= 2 ** bits - 1
    err = (dequantize_ref(codes, scale, zero) - x).abs()           # (200, 3, 64)
    s = scale.float()[..., None]
    if bits == 8:   # integer zero point: the range holds 0
        assert zero.dtype == torch.uint8
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    else:           # float zero: the row minimum, rounded to float16
        assert zero.dtype == torch.float16
        lo, hi = x.amin(-1), x.amax(-1)
        torch.testing.assert_close(zero.float(), lo, atol=0, rtol=2 ** -11)
    # half a step of rounding; at the ends of the range, clipping by at most half a step plus
    # what rounding the scale and the zero to float16 (2^-11 relative) took from the span
    span = (hi - lo + lo.abs())[..., None]
    assert (err <= 0.5 * s + span * 2 ** -10 + 1e-6).all()
    assert err[1:].mean() / s[1:].mean() < 0.3                     # rounding (1/4 of a step on average)


def test_int4_pack_round_trip():
    codes = torch.randint(0, 16, (5, 3, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 3, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert torch.equal(packed[..., 0] & 15, codes[..., 0]) and torch.equal(packed[..., 0] >> 4, codes[..., 32])


# ------------------------------------------------------------------ a quantized paged cache
class QuantPaged:
    """Random K/V of `lens` tokens stored through `store` into a poisoned, shuffled pool."""

    def __init__(self, lens, block_size, hkv, d, bits, store=store_kv_quant_ref, static=None,
                 dtype=torch.float32, device=DEV, k_shift=0.3, k_std=2.0):
        need = [math.ceil(n / block_size) for n in lens]
        num_blocks = sum(need) + 3                                   # spare blocks stay poisoned
        self.k = QuantKVCache.empty(num_blocks, block_size, hkv, d, bits, device)
        self.v = QuantKVCache.empty(num_blocks, block_size, hkv, d, bits, device)
        for c in (self.k, self.v):
            c.data.random_(0, 256)
            c.scale.fill_(float("nan"))
            c.zero.fill_(77)                                         # garbage, finite
            c.static = static
        perm = torch.randperm(num_blocks).tolist()
        self.tables = torch.full((len(lens), max(need) + 1), -1, dtype=torch.int32)
        slots, i = [], 0
        for b, n in enumerate(need):
            own = torch.tensor(perm[i:i + n])
            self.tables[b, :n] = own.int()
            t = torch.arange(lens[b])
            slots.append(own[t // block_size] * block_size + t % block_size)
            i += n
        self.tables = self.tables.to(device)
        slot_mapping = torch.cat(slots + [torch.tensor([-1])]).to(device)  # + one padding token
        n = slot_mapping.shape[0]
        self.k_new = (torch.randn(n, hkv, d) * k_std + k_shift).to(device, dtype)  # (N, Hkv, D)
        self.v_new = torch.randn(n, hkv, d).to(device, dtype)
        store(self.k_new, self.v_new, self.k, self.v, slot_mapping)

    def dense(self, c: QuantKVCache) -> torch.Tensor:
        """The whole pool dequantized in float64: (num_blocks, block_size, Hkv, D)."""
        codes = unpack_int4(c.data) if c.bits == 4 else c.data
        return dequantize_ref(codes, c.scale, c.zero, torch.float64)


def poison(t):
    return t.fill_(float("nan"))


# ------------------------------------------------------------------ store
@needs_triton
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("static", [False, True])
def test_store_kv_quant_triton_matches_reference(bits, static):
    qmax = 2 ** bits - 1
    st = None
    if static:  # calibrated per-head (scale, zero); the range clips some values on purpose
        zero = [qmax // 2, qmax // 3, qmax // 2] if bits == 8 else [-2.0, -3.0, -1.5]
        st = torch.tensor([[4.0 / qmax, zero[0]], [6.0 / qmax, zero[1]], [3.0 / qmax, zero[2]]],
                          device=DEV).half().float()
    torch.manual_seed(1)
    a = QuantPaged([5, 16, 33], 16, 3, 64, bits, store_kv_quant_ref, st)
    torch.manual_seed(1)
    b = QuantPaged([5, 16, 33], 16, 3, 64, bits, store_kv_quant_triton, st)
    for x, y in ((a.k, b.k), (a.v, b.v)):
        # every slot equal, the unwritten ones (garbage, NaN scale) included: nothing else written
        assert (x.data.int() - y.data.int()).abs().max() <= (1 if CUDA else 0)  # GPU division ulp
        assert torch.equal(x.scale.nan_to_num(-1.0), y.scale.nan_to_num(-1.0))
        assert torch.equal(x.zero.float().nan_to_num(-1.0), y.zero.float().nan_to_num(-1.0))


# ------------------------------------------------------------------ decode
def _check_decode(lens, block_size, hq, hkv, d, bits, dtype=torch.float32, cache=None, **kw):
    c = cache or QuantPaged(lens, block_size, hkv, d, bits)  # the store kernel has its own test
    q = torch.randn(len(lens), hq, d, device=DEV).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = d ** -0.5
    want = paged_decode_ref(q.double(), c.dense(c.k), c.dense(c.v), c.tables, ctx, scale)
    ref = paged_decode_quant_ref(q.double(), c.k, c.v, c.tables, ctx, scale)
    torch.testing.assert_close(ref, want, atol=1e-9, rtol=1e-9)          # the readable path
    if HAS_TRITON:
        got = paged_decode_quant_triton(q, c.k, c.v, c.tables, ctx, scale,
                                        out=poison(torch.empty_like(q)), **kw)
        assert not got.isnan().any()
        torch.testing.assert_close(got.double(), want, **TOL[dtype])


# every GQA ratio (1, 3, 8) with both block sizes, every bit width with both block sizes
COVER = [(16, 2, 2, 8), (16, 6, 2, 4), (16, 8, 1, 8), (64, 2, 2, 4), (64, 6, 2, 8), (64, 8, 1, 4)]


@pytest.mark.parametrize("block_size,hq,hkv,bits", COVER)
def test_paged_decode_quant_interpreted(block_size, hq, hkv, bits):
    # ragged: one token, not multiples of the block size, exactly two blocks
    _check_decode([1, 37, block_size + 1, 2 * block_size], block_size, hq, hkv, 32, bits, block_n=32)


@needs_triton
@pytest.mark.parametrize("bits", [8, 4])
def test_paged_decode_quant_float16_dots(bits):
    # the GPU path for bf16 models: codes -> float16 by setting exponent bits, fp16 dots
    _check_decode([3, 40], 16, 6, 2, 32, bits, dtype=torch.bfloat16, block_n=16)


@needs_triton
@pytest.mark.parametrize("bits,hq,hkv,dtype", [(8, 6, 2, torch.float32), (4, 2, 2, torch.bfloat16),
                                               (4, 8, 1, torch.float32)])
def test_paged_decode_quant_cuda_core_variant(bits, hq, hkv, dtype):
    # dot=False: products as float32 multiply-adds, the GQA group unpadded (an experiment)
    _check_decode([1, 37, 33], 16, hq, hkv, 32, bits, dtype=dtype, block_n=16, dot=False)
    _check_decode([50, 9], 16, hq, hkv, 32, bits, dtype=dtype, block_n=16, dot=False, num_splits=3)


@needs_triton
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_quant_rows_far_from_zero(bits, dtype):
    # keys all positive in a narrow range (a channel-mean outlier, as real K has): the int4 float
    # zero m is then many steps away from 0 (m / s ~ 100), the folded "zero x sum(q)" term is
    # large and must still cancel against q . codes
    lens = [45, 17]
    c = QuantPaged(lens, 16, 2, 32, bits, k_shift=6.0, k_std=0.3)
    assert float(c.dense(c.k).nan_to_num(nan=10.0).min()) > 4.0        # unused slots: NaN
    _check_decode(lens, 16, 6, 2, 32, bits, dtype=dtype, cache=c, block_n=16)


@needs_triton
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])   # bf16: the transposed tile
def test_paged_decode_quant_split_kv_and_padding_rows(splits, dtype):
    c = QuantPaged([50, 1, 9], 16, 2, 32, 8)
    ctx = torch.tensor([50, 0, 9], dtype=torch.int32, device=DEV)   # 0: a CUDA graph's padding row
    q = torch.randn(3, 4, 32, device=DEV).to(dtype)
    got = paged_decode_quant_triton(q, c.k, c.v, c.tables, ctx, 0.2, num_splits=splits,
                                    block_n=16, out=poison(torch.empty_like(q)))
    want = paged_decode_ref(q.double(), c.dense(c.k), c.dense(c.v), c.tables, ctx, 0.2)
    torch.testing.assert_close(got.double(), want, **TOL[dtype])
    assert (got[1] == 0).all()


@needs_triton
@pytest.mark.parametrize("bits,hq,hkv", [(8, 2, 2), (4, 6, 2), (8, 8, 1), (4, 16, 2)])
def test_paged_decode_quant_transposed_tile(bits, hq, hkv):
    # 16-bit q: tokens as rows, codes read as 32-bit words, the GQA group unpadded (1, 3 -> 4,
    # 8); with split-KV; without prefetch; the default tile (128 tokens: 8 blocks of 16); and
    # the first kernel's tile (transposed=False)
    lens = [1, 37, 150]
    c = QuantPaged(lens, 16, hkv, 32, bits)
    for kw in (dict(block_n=16), dict(block_n=16, num_splits=3), dict(block_n=16, prefetch=False),
               dict(), dict(block_n=16, transposed=False)):
        _check_decode(lens, 16, hq, hkv, 32, bits, dtype=torch.bfloat16, cache=c, **kw)


# ------------------------------------------------------------------ prefill
def _check_prefill(q_lens, prefix, block_size, hq, hkv, d, bits, dtype=torch.float32, **kw):
    ctx_lens = [p + n for p, n in zip(prefix, q_lens)]
    c = QuantPaged(ctx_lens, block_size, hkv, d, bits)
    q = torch.randn(sum(q_lens), hq, d, device=DEV).to(dtype)
    cu = torch.tensor([0] + q_lens, device=DEV).cumsum(0).to(torch.int32)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEV)
    scale = d ** -0.5
    unused = torch.empty(0)
    want = paged_prefill_ref(q.double(), unused, unused, c.dense(c.k), c.dense(c.v), c.tables,
                             cu, ctx, scale)
    ref = paged_prefill_quant_ref(q.double(), c.k, c.v, c.tables, cu, ctx, scale)
    torch.testing.assert_close(ref, want, atol=1e-9, rtol=1e-9)
    if HAS_TRITON:
        got = paged_prefill_quant_triton(q, c.k, c.v, c.tables, cu, ctx, scale,
                                         max_seqlen_q=max(q_lens), out=poison(torch.empty_like(q)), **kw)
        assert not got.isnan().any()
        torch.testing.assert_close(got.double(), want, **TOL[dtype])


@pytest.mark.parametrize("block_size,hq,hkv,bits", COVER)
def test_paged_prefill_quant_interpreted(block_size, hq, hkv, bits):
    # a fresh prompt, a prefix-cache hit, a one-token chunk after a long prefix, a 1-token prompt
    q_lens, prefix = [23, 5, 1, 1], [0, block_size, 2 * block_size + 3, 0]
    _check_prefill(q_lens, prefix, block_size, hq, hkv, 32, bits, block_m=16, block_n=32)


@needs_triton
def test_paged_prefill_quant_float16_dots():
    _check_prefill([20, 3], [0, 17], 16, 6, 2, 32, 4, dtype=torch.bfloat16, block_m=16, block_n=16)


# ------------------------------------------------------------------ real shapes (GPU)
@gpu
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_kernels_gpu(bits, dtype):
    _check_decode([1, 2048, 777, 4097], 64, 32, 8, 128, bits, dtype)
    _check_decode([129] * 64, 16, 24, 8, 128, bits, dtype)
    _check_prefill([1000, 17, 1, 513], [0, 2048, 300, 64], 64, 32, 8, 128, bits, dtype)

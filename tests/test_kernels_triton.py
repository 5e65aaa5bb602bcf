"""Every Triton kernel against its PyTorch reference, on fresh random inputs.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 when there is
no CUDA device) at small shapes; with a GPU (marker `gpu`) the same checks run at real shapes
(32 query / 8 KV heads, head_dim 128, thousands of tokens) in fp32 and bf16. Outputs are
poisoned with NaN first, so a row the kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import math

import pytest
import torch

from kernels import (paged_decode_ref, paged_decode_triton, paged_prefill_ref, paged_prefill_triton,
                     rms_norm_ref, rms_norm_triton, rotary_ref, rotary_triton, silu_and_mul_ref,
                     silu_and_mul_triton, store_kv_ref, store_kv_triton)
from kernels._triton import HAS_TRITON

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
gpu = pytest.mark.gpu


def paged_cache(lens, block_size, hkv, d, dtype, spare_blocks=3):
    """A random paged cache holding sequences of `lens` tokens in shuffled blocks.
    Returns k_cache, v_cache (num_blocks, bs, Hkv, D) and block_tables (B, M) int32 (-1 padded)."""
    need = [math.ceil(n / block_size) for n in lens]
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks).tolist()           # blocks of a sequence are scattered
    width = max(max(need), 1)
    tables = torch.full((len(lens), width), -1, dtype=torch.int32)
    i = 0
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor(perm[i:i + n], dtype=torch.int32)
        i += n
    k = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=DEV)
    v = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=DEV)
    return k, v, tables.to(DEV)


def poison(t):
    return t.fill_(float("nan"))


# ------------------------------------------------------------------ paged decode
def _check_decode(lens, block_size, hq, hkv, d, dtype, **kw):
    k, v, tables = paged_cache(lens, block_size, hkv, d, dtype)
    q = torch.randn(len(lens), hq, d, dtype=dtype, device=DEV)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = d ** -0.5
    ref = paged_decode_ref(q.double(), k.double(), v.double(), tables, ctx, scale)
    got = paged_decode_triton(q, k, v, tables, ctx, scale, out=poison(torch.empty_like(q)), **kw)
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2), (8, 1)])      # GQA ratios 1, 3, 8
def test_paged_decode_interpreted(block_size, hq, hkv):
    # ragged, not multiples of the block size, a context of exactly one token
    lens = [1, 37, block_size + 1, 2 * block_size]
    _check_decode(lens, block_size, hq, hkv, 32, torch.float32, block_n=16)


@pytest.mark.parametrize("splits", [1, 3])
def test_paged_decode_split_kv_and_padding_rows(splits):
    # context 0 marks a padding row of a CUDA graph: zeros, never NaN
    lens = [50, 0, 9]
    k, v, tables = paged_cache([max(n, 1) for n in lens], 16, 2, 32, torch.float32)
    q = torch.randn(3, 4, 32, device=DEV)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    got = paged_decode_triton(q, k, v, tables, ctx, 0.2, num_splits=splits, block_n=16,
                              out=poison(torch.empty_like(q)))
    ref = paged_decode_ref(q, k, v, tables, ctx, 0.2)
    torch.testing.assert_close(got, ref, **TOL[torch.float32])
    assert (got[1] == 0).all()


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens", [[1, 2048, 777, 4097], [16384], [129] * 64])
def test_paged_decode_gpu(dtype, lens):
    _check_decode(lens, 64, 32, 8, 128, dtype)
    _check_decode(lens, 16, 24, 8, 128, dtype)


# ------------------------------------------------------------------ paged prefill
def _check_prefill(q_lens, prefix_lens, block_size, hq, hkv, d, dtype, **kw):
    ctx_lens = [p + n for p, n in zip(prefix_lens, q_lens)]
    k_cache, v_cache, tables = paged_cache(ctx_lens, block_size, hkv, d, dtype)
    n = sum(q_lens)
    q = torch.randn(n, hq, d, dtype=dtype, device=DEV)
    kv_new = torch.empty(n, hkv, d, dtype=dtype, device=DEV)             # unused by both
    cu = torch.tensor([0] + q_lens, device=DEV).cumsum(0).to(torch.int32)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEV)
    scale = d ** -0.5
    ref = paged_prefill_ref(q.double(), kv_new, kv_new, k_cache.double(), v_cache.double(),
                            tables, cu, ctx, scale)
    got = paged_prefill_triton(q, kv_new, kv_new, k_cache, v_cache, tables, cu, ctx, scale,
                               max_seqlen_q=max(q_lens), out=poison(torch.empty_like(q)), **kw)
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2), (8, 1)])
def test_paged_prefill_interpreted(block_size, hq, hkv):
    # a fresh prompt, a prefix-cache hit, a one-token chunk after a long prefix, a 1-token prompt
    q_lens, prefix = [23, 5, 1, 1], [0, block_size, 2 * block_size + 3, 0]
    _check_prefill(q_lens, prefix, block_size, hq, hkv, 16, torch.float32, block_m=16, block_n=16)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_prefill_gpu(dtype):
    _check_prefill([1000, 17, 1, 513], [0, 2048, 300, 64], 64, 32, 8, 128, dtype)
    _check_prefill([129, 64], [0, 0], 16, 24, 8, 128, dtype)


# ------------------------------------------------------------------ store_kv
@pytest.mark.parametrize("hkv,d", [(1, 16), (3, 32)] + ([(8, 128)] if CUDA else []))
def test_store_kv(hkv, d):
    num_blocks, bs = 6, 16
    slots = torch.randperm(num_blocks * bs)[:11]
    slots[[2, 7]] = -1                                           # padding rows are skipped
    slots = slots.to(DEV)
    qkv = torch.randn(11, 4 * hkv, d, device=DEV)                # k, v as strided views
    k, v = qkv[:, hkv:2 * hkv], qkv[:, 2 * hkv:3 * hkv]
    caches = [torch.randn(num_blocks, bs, hkv, d, device=DEV) for _ in range(2)]
    mine = [c.clone() for c in caches]
    store_kv_ref(k, v, caches[0], caches[1], slots)
    store_kv_triton(k, v, mine[0], mine[1], slots)
    torch.testing.assert_close(mine[0], caches[0], rtol=0, atol=0)
    torch.testing.assert_close(mine[1], caches[1], rtol=0, atol=0)


# ------------------------------------------------------------------ pointwise kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(dtype, residual):
    h = 4096 if CUDA else 576                                     # SmolLM2's hidden size
    x = torch.randn(5, h, dtype=dtype, device=DEV)
    w = torch.randn(h, dtype=dtype, device=DEV)
    r = torch.randn(5, h, dtype=dtype, device=DEV) if residual else None
    ref = rms_norm_ref(x, w, 1e-5, r)
    got = rms_norm_triton(x, w, 1e-5, r)
    for a, b in zip(got if residual else [got], ref if residual else [ref]):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary(dtype):
    n, h, d, p = 7, 5, 64, 100
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
    ang = torch.arange(p).double()[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().float().to(DEV), emb.sin().float().to(DEV)
    pos = torch.randint(0, p, (n,), device=DEV)
    qkv = torch.randn(n, h + 4, d, dtype=dtype, device=DEV)
    mine = qkv.clone()
    rotary_ref(qkv[:, :h], pos, cos, sin)                        # strided views, in place
    rotary_triton(mine[:, :h], pos, cos, sin)
    torch.testing.assert_close(mine, qkv, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype):
    i = 11008 if CUDA else 1536                                   # SmolLM2's intermediate size
    x = torch.randn(3, 2 * i, dtype=dtype, device=DEV)
    torch.testing.assert_close(silu_and_mul_triton(x), silu_and_mul_ref(x), **TOL[dtype])


# ------------------------------------------------------------------ skinny matmul (decode)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n,k", [(40, 96), (33, 50)] + ([(11008, 4096), (4096, 11008)] if CUDA else []))
def test_linear_small_m(m, n, k):
    from kernels import linear_small_m_triton
    dtype = torch.bfloat16 if CUDA else torch.float32
    x = torch.randn(m, k, dtype=dtype, device=DEV)
    w = torch.randn(n, k, dtype=dtype, device=DEV) / k ** 0.5
    ref = x.double() @ w.double().T
    got = linear_small_m_triton(x, w)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got.double(), ref, **tol)    # fp32 in the interpreter: tf32-like dot

"""The CPU engine's batched decode attention (kernels/paged_decode_batched.py) against float64
dense attention and against the per-sequence reference, on a NaN-poisoned shuffled pool (the
padded slots it reads must get no weight and spread no NaN)."""
from __future__ import annotations

import random

import pytest
import torch

from kernels.paged_decode import paged_decode_ref
from kernels.paged_decode_batched import paged_decode_batched
from tests.test_paged_attention_ref import SHAPES, PagedKV, _close, _lengths, dense_reference


def _case(bs, Hq, Hkv, D, lengths, dtype, pad, seed):
    kv = PagedKV(lengths, bs, Hkv, D, dtype=dtype, pad=pad, seed=seed)
    kv.store_all()
    q = torch.randn(len(lengths), Hq, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)                               # (B,)
    return kv, q, lens


@pytest.mark.parametrize("bs,Hq,Hkv,D", SHAPES)
def test_batched_decode_matches_dense_float64(bs, Hq, Hkv, D):
    seed = random.randrange(2**31)
    lengths = _lengths(bs) + [random.randint(1, 4 * bs) for _ in range(3)]
    random.shuffle(lengths)
    kv, q, lens = _case(bs, Hq, Hkv, D, lengths, torch.float32, -1 if bs == 4 else 0, seed)
    out = paged_decode_batched(q, kv.k_cache, kv.v_cache, kv.block_tables, lens, D**-0.5)
    assert out.shape == q.shape and out.dtype == q.dtype
    for b, L in enumerate(lengths):
        ref = dense_reference(q[b:b + 1], kv.k_seqs[b], kv.v_seqs[b], D**-0.5, q_start=L - 1)
        _close(out[b], ref[0])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_batched_decode_equals_reference_and_batch_of_one(dtype, tol):
    seed = random.randrange(2**31)
    bs, Hq, Hkv, D = 16, 9, 3, 64                                    # SmolLM2's GQA ratio
    lengths = [random.randint(1, 70) for _ in range(6)] + [0]         # an empty row too
    kv, q, lens = _case(bs, Hq, Hkv, D, lengths, dtype, -1, seed)
    out = paged_decode_batched(q, kv.k_cache, kv.v_cache, kv.block_tables, lens, D**-0.5)
    ref = paged_decode_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, lens, D**-0.5)
    assert out.dtype == dtype and (out[-1] == 0).all(), f"seed {seed}"
    _close(out, ref, atol=tol, rtol=tol)
    for b in range(len(lengths) - 1):                                 # batch 1: the no-mask path
        one = paged_decode_batched(q[b:b + 1], kv.k_cache, kv.v_cache, kv.block_tables[b:b + 1],
                                   lens[b:b + 1], D**-0.5)
        _close(one[0], ref[b], atol=tol, rtol=tol)

"""The CPU engine's in-place decode attention (kernels/paged_decode_cpu.py, a Numba kernel)
against float64 dense attention, on a NaN-poisoned shuffled pool (a row it must not read is NaN):
fp32 and bf16 caches, block sizes 4/16/32/64, GQA ratios 1/2/3/8, ragged lengths, one-token
contexts, empty rows, fewer sequences than threads (the per-head tasks); the PyTorch op the
TorchScript step calls, and where `applies` hands the call back to paged_decode_batched."""
from __future__ import annotations

import random

import pytest
import torch

from kernels import paged_decode_cpu as K
from tests.test_paged_attention_ref import SHAPES, PagedKV, _close, _lengths, dense_reference

pytestmark = pytest.mark.skipif(not K.AVAILABLE, reason="Numba is not installed "
                                "(or LABKIT_NUMBA_DECODE=0): the engine uses paged_decode_batched")

CASES = SHAPES + [(32, 8, 8, 64), (64, 32, 4, 32), (64, 9, 3, 64)]   # + GQA 1 and 8, SmolLM2


def _case(bs, Hq, Hkv, D, lengths, seed):
    kv = PagedKV(lengths, bs, Hkv, D, pad=-1, seed=seed)
    kv.store_all()
    q = torch.randn(len(lengths), Hq, D, generator=torch.Generator().manual_seed(seed + 1))
    return kv, q, torch.tensor(lengths, dtype=torch.int32)                      # lens (B,)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bs,Hq,Hkv,D", CASES)
def test_matches_dense_float64(bs, Hq, Hkv, D, dtype, tol):
    """bf16: the same K/V, Q rounded to bf16; the float64 reference reads the rounded values."""
    seed = random.randrange(2**31)
    lengths = _lengths(bs) + [random.randint(1, 4 * bs) for _ in range(3)] + [0]
    random.shuffle(lengths)
    kv, q, lens = _case(bs, Hq, Hkv, D, lengths, seed)
    q, k_cache, v_cache = q.to(dtype), kv.k_cache.to(dtype), kv.v_cache.to(dtype)
    out = K.paged_decode_cpu(q, k_cache, v_cache, kv.block_tables, lens, D**-0.5)
    assert out.shape == q.shape and out.dtype == dtype, f"seed {seed}"
    for b, L in enumerate(lengths):
        if L == 0:
            assert (out[b] == 0).all(), f"seed {seed}: an empty context gives zeros"
            continue
        k, v = (t.to(dtype) for t in (kv.k_seqs[b], kv.v_seqs[b]))
        ref = dense_reference(q[b:b + 1], k, v, D**-0.5, q_start=L - 1)
        _close(out[b], ref[0], atol=tol, rtol=tol)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_fewer_sequences_than_threads(batch, monkeypatch):
    """Below the thread count the tasks are (sequence, KV head): same numbers as per sequence."""
    seed = random.randrange(2**31)
    bs, Hq, Hkv, D = 16, 9, 3, 64
    lengths = [random.randint(1, 90) for _ in range(batch)]
    kv, q, lens = _case(bs, Hq, Hkv, D, lengths, seed)
    # as on a 4-thread machine (Numba's own count is capped by the cores, so set the launcher's)
    monkeypatch.setattr(K, "_use_threads", lambda: 4)             # batch < 4: per-head tasks
    heads_per_task, kernel = [], K._decode_kernel
    monkeypatch.setattr(K, "_decode_kernel",
                        lambda *a: heads_per_task.append(a[6]) or kernel(*a))
    out = K.paged_decode_cpu(q, kv.k_cache, kv.v_cache, kv.block_tables, lens, D**-0.5)
    assert heads_per_task == [1], f"seed {seed}: the per-head tasks did not run"
    for b, L in enumerate(lengths):
        ref = dense_reference(q[b:b + 1], kv.k_seqs[b], kv.v_seqs[b], D**-0.5, q_start=L - 1)
        _close(out[b], ref[0])


def test_torch_op_and_where_it_applies():
    """torch.ops.labkit.paged_decode_cpu is the kernel where `applies` (fp32 or bf16, two
    sequences or more) and paged_decode_batched elsewhere (a batch of one, fp16); q may be a
    strided view."""
    from kernels.paged_decode_batched import paged_decode_batched
    seed = random.randrange(2**31)
    bs, Hq, Hkv, D = 16, 9, 3, 64
    lengths = [random.randint(1, 70) for _ in range(5)]
    kv, q, lens = _case(bs, Hq, Hkv, D, lengths, seed)
    qkv = torch.cat([q, torch.randn(5, 2 * Hkv, D)], 1)          # q as the engine has it: a view
    q_view = qkv[:, :Hq]
    args = (kv.k_cache, kv.v_cache, kv.block_tables, lens, D**-0.5)
    assert K.applies(torch.float32, kv.k_cache, 5) and not K.applies(torch.float32, kv.k_cache, 1)
    assert K.applies(torch.bfloat16, kv.k_cache.bfloat16(), 5)
    assert not K.applies(torch.float16, kv.k_cache.half(), 5)
    assert not K.applies(torch.bfloat16, kv.k_cache, 5)                # q and cache must agree
    assert torch.equal(torch.ops.labkit.paged_decode_cpu(q_view, *args), K.paged_decode_cpu(q, *args))
    one = torch.ops.labkit.paged_decode_cpu(q[:1], kv.k_cache, kv.v_cache, kv.block_tables[:1],
                                            lens[:1], D**-0.5)
    assert torch.equal(one, paged_decode_batched(q[:1], kv.k_cache, kv.v_cache,
                                                 kv.block_tables[:1], lens[:1], D**-0.5))
    caches = [c.half() for c in (kv.k_cache, kv.v_cache)]
    got = torch.ops.labkit.paged_decode_cpu(q.half(), *caches, kv.block_tables, lens, D**-0.5)
    want = paged_decode_batched(q.half(), *caches, kv.block_tables, lens, D**-0.5)
    assert got.dtype == torch.float16 and torch.equal(got, want)


def test_imported_under_a_second_name_registers_nothing_twice():
    """A second copy of the file (a grader loading a submission by path) must not fail on the
    op that the first registered."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("paged_decode_cpu_copy", K.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy._LIB is None and K._LIB is not None
    assert hasattr(torch.ops.labkit, "paged_decode_cpu")

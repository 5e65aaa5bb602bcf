"""Assignment 2 (homework/a2_paged_decode.py): paged decode attention in PyTorch and Triton,
against labkit's `paged_decode_ref` in float64 on fresh random paged caches, then inside the
real engine through a backend whose `decode` is the student's. The Triton kernel runs in the
interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)."""
from __future__ import annotations

import random

import pytest
import torch

import adapters
import engine_check
from kernels.paged_decode import paged_decode_ref
from labkit.config import GenerationConfig


def random_case(rng: random.Random, B: int, Hq: int, Hkv: int, D: int, block_size: int,
                max_len: int, dtype=torch.float32):
    """A paged cache holding B sequences of ragged lengths (one of them 0, one 1) in blocks
    scattered over the pool, with random values in every slot (unused ones too)."""
    lens = [rng.randint(1, max_len) for _ in range(B)]
    lens[0], lens[-1] = 0, 1
    rng.shuffle(lens)
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 3
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    width = max(need) + 1
    tables = torch.full((B, width), -1, dtype=torch.int32)                     # padding -1
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor([ids.pop() for _ in range(n)], dtype=torch.int32)
    k_cache = torch.randn(num_blocks, block_size, Hkv, D).to(dtype)            # (NB, bs, Hkv, D)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D).to(dtype)
    q = torch.randn(B, Hq, D).to(dtype)                                         # (B, Hq, D)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), D ** -0.5


def reference(q, k_cache, v_cache, tables, lens, scale):
    return paged_decode_ref(q.double(), k_cache.double(), v_cache.double(), tables, lens, scale)


def _check(got, want, case: str, atol: float):
    assert got.shape == want.shape, f"{case}: output shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{case}: output has NaN/inf (a zero-length row must give zeros)"
    err = (got.double() - want).abs().max().item()
    assert err <= atol, f"{case}: max error {err:.3g} vs labkit's paged_decode_ref (tolerance {atol:g})"


# (B, Hq, Hkv, D, block_size, max_len): MHA, GQA 3 (the bundled model's 9/3 heads, D 64), MQA
TORCH_CASES = [(4, 4, 4, 32, 4, 40), (5, 9, 3, 64, 16, 100), (3, 8, 1, 16, 8, 30)]
TRITON_CASES = [(3, 4, 2, 16, 4, 40), (3, 9, 3, 64, 16, 70)]


@pytest.mark.points(3, assign="2.1")
def test_paged_decode_torch_matches_reference():
    """PyTorch paged decode equals paged_decode_ref (ragged lengths, GQA, block sizes)"""
    rng = random.Random()
    for B, Hq, Hkv, D, bs, max_len in TORCH_CASES:
        q, kc, vc, tables, lens, scale = random_case(rng, B, Hq, Hkv, D, bs, max_len)
        got = adapters.paged_decode_torch(q, kc, vc, tables, lens, scale)
        _check(got, reference(q, kc, vc, tables, lens, scale), f"B={B} Hq={Hq} Hkv={Hkv} D={D} "
               f"block_size={bs} lens={lens.tolist()}", atol=1e-5)
        assert got.dtype == q.dtype, f"output dtype {got.dtype}, expected q's {q.dtype}"


@pytest.mark.points(4, assign="2.2")
def test_paged_decode_triton_matches_reference():
    """Triton paged decode (interpreter on CPU) equals paged_decode_ref, every row written"""
    pytest.importorskip("triton")
    rng = random.Random()
    for B, Hq, Hkv, D, bs, max_len in TRITON_CASES:
        q, kc, vc, tables, lens, scale = random_case(rng, B, Hq, Hkv, D, bs, max_len)
        out = torch.full_like(q, float("nan"))                                 # poisoned
        got = adapters.paged_decode_triton(q, kc, vc, tables, lens, scale, out=out)
        _check(got, reference(q, kc, vc, tables, lens, scale), f"B={B} Hq={Hq} Hkv={Hkv} D={D} "
               f"block_size={bs} lens={lens.tolist()}", atol=1e-5)


@pytest.fixture(scope="module")
def engine_case():
    """Fresh random prompts; labkit's own engine's tokens for them, computed once, on demand."""
    rng = random.Random()
    prompts = engine_check.random_prompts(rng, 4, shared=10, lengths=(2, 30))
    gen = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    config = dict(cache_block_seq_len=8, cache_max_entry_count=64, max_batch_size=4,
                  session_len=96, max_prefill_token_num=64)
    want = []

    def reference_tokens():
        if not want:
            want.append(engine_check.run(prompts, gen, **config)[0])
        return want[0]
    return prompts, gen, config, reference_tokens


def _engine_check(engine_case, decode):
    prompts, gen, config, reference_tokens = engine_case
    got, stats, backend = engine_check.run(prompts, gen, decode=decode, **config)   # yours first
    assert backend.calls > 0, "the engine never called decode (grader bug)"
    for i, (g, w) in enumerate(zip(got, reference_tokens())):
        assert g == w, f"request {i}: generated {g}, labkit's engine generated {w}"


@pytest.mark.points(2, assign="2.1")
def test_engine_with_torch_decode(engine_case):
    """the real engine with your PyTorch decode: the same greedy tokens"""
    _engine_check(engine_case, adapters.paged_decode_torch)


@pytest.mark.points(2, assign="2.2")
def test_engine_with_triton_decode(engine_case):
    """the real engine with your Triton decode (interpreter): the same greedy tokens"""
    pytest.importorskip("triton")
    _engine_check(engine_case, adapters.paged_decode_triton)

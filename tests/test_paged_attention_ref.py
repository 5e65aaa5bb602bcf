"""The PyTorch paged-attention reference against plain dense attention on contiguous K/V.

Every test builds sequences of varied lengths (1, exactly a block, a block + 1, ...), scatters
their blocks over a shuffled pool whose unused blocks and slots hold NaN, writes K/V with
store_kv and checks the paged ops against an independent float64 causal attention. A read of a
wrong or unused slot turns the output NaN or wrong, so it cannot pass by accident.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels import gather_kv
from kernels import paged_decode_ref as paged_decode
from kernels import paged_prefill_ref as paged_prefill
from kernels import store_kv_ref as store_kv

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
]
SHAPES = [  # (block_size, Hq, Hkv, D)
    (4, 4, 2, 16),
    (4, 9, 3, 64),
    (16, 4, 2, 64),
    (16, 9, 3, 16),
]
TOL = dict(atol=1e-5, rtol=1e-5)  # float32 kernel vs float64 reference


def _lengths(block_size: int) -> list[int]:
    """Edge cases first: one token, exactly one block, one block + 1, then a few longer ones."""
    return [1, block_size, block_size + 1, 3 * block_size - 1, 2 * block_size + 3]


class PagedKV:
    """Random K/V for a batch of sequences, scattered over a NaN-poisoned block pool.

    `k_seqs[b], v_seqs[b]`: (L_b, Hkv, D) the contiguous truth; `block_tables`: (B, max_blocks)
    int32 padded with `pad`; `slots[b]`: (L_b,) int64 slot of each token. Nothing is stored in the
    cache yet: call `store(b, start, end)` for the tokens a test wants in it.
    """

    def __init__(self, lengths, block_size, Hkv, D, *, device="cpu", dtype=torch.float32, pad=-1, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.block_size, self.device = block_size, device
        blocks_per_seq = [math.ceil(L / block_size) for L in lengths]
        num_blocks = sum(blocks_per_seq) + 5  # 5 spare blocks that stay NaN
        self.k_cache = torch.full((num_blocks, block_size, Hkv, D), float("nan"), dtype=dtype, device=device)  # (NB, bs, Hkv, D)
        self.v_cache = torch.full_like(self.k_cache, float("nan"))  # (NB, bs, Hkv, D)
        ids = torch.randperm(num_blocks, generator=g)  # (NB,) shuffled: a sequence's blocks are scattered
        max_blocks = max(blocks_per_seq) + 2  # extra columns so the padding is really there
        self.block_tables = torch.full((len(lengths), max_blocks), pad, dtype=torch.int32)  # (B, max_blocks)
        self.k_seqs, self.v_seqs, self.slots = [], [], []
        used = 0
        for b, L in enumerate(lengths):
            own = ids[used : used + blocks_per_seq[b]]  # (n_b,)
            used += blocks_per_seq[b]
            self.block_tables[b, : len(own)] = own.int()
            t = torch.arange(L)  # (L,) token positions
            self.slots.append((own[t // block_size] * block_size + t % block_size).to(device))  # (L,)
            self.k_seqs.append(torch.randn(L, Hkv, D, generator=g).to(device, dtype))  # (L, Hkv, D)
            self.v_seqs.append(torch.randn(L, Hkv, D, generator=g).to(device, dtype))  # (L, Hkv, D)
        self.block_tables = self.block_tables.to(device)
        self.lengths = list(lengths)

    def store(self, b: int, start: int, end: int) -> None:
        """Write tokens [start, end) of sequence b into the cache with store_kv."""
        store_kv(self.k_seqs[b][start:end], self.v_seqs[b][start:end], self.k_cache, self.v_cache, self.slots[b][start:end])

    def store_all(self) -> None:
        for b, L in enumerate(self.lengths):
            self.store(b, 0, L)


def dense_reference(q, k, v, scale, q_start):
    """float64 causal attention on contiguous K/V; query i sits at absolute position q_start + i.

    q: (M, Hq, D), k, v: (L, Hkv, D) -> (M, Hq, D) float64. GQA by repeating each kv head.
    """
    G = q.shape[1] // k.shape[1]  # query heads per kv head
    q, k, v = q.double(), k.double().repeat_interleave(G, dim=1), v.double().repeat_interleave(G, dim=1)  # (M|L, Hq, D)
    scores = torch.einsum("mhd,lhd->hml", q, k) * scale  # (Hq, M, L)
    q_pos = q_start + torch.arange(q.shape[0], device=q.device)  # (M,)
    k_pos = torch.arange(k.shape[0], device=q.device)  # (L,)
    scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))  # (Hq, M, L)
    return torch.einsum("hml,lhd->mhd", scores.softmax(-1), v)  # (M, Hq, D)


def _close(actual, expected, **tol):
    assert not actual.isnan().any(), "NaN in output: a padding / unused slot was read"
    torch.testing.assert_close(actual.double(), expected.double(), **(tol or TOL))


# ---------------------------------------------------------------------------------------------
# store_kv / gather_kv


def test_store_kv_writes_slots_and_skips_negative():
    g = torch.Generator().manual_seed(1)
    NB, bs, Hkv, D = 6, 4, 2, 8
    k_cache = torch.full((NB, bs, Hkv, D), float("nan"))  # (NB, bs, Hkv, D)
    v_cache = torch.full((NB, bs, Hkv, D), float("nan"))  # (NB, bs, Hkv, D)
    k = torch.randn(5, Hkv, D, generator=g)  # (5, Hkv, D)
    v = torch.randn(5, Hkv, D, generator=g)  # (5, Hkv, D)
    # -1 must be skipped, not wrap around to the last slot (23); int32 slots work too.
    slot_mapping = torch.tensor([9, -1, 0, 14, -1], dtype=torch.int32)  # (5,)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    flat_k, flat_v = k_cache.view(-1, Hkv, D), v_cache.view(-1, Hkv, D)  # (NB*bs, Hkv, D)
    for n, s in [(0, 9), (2, 0), (3, 14)]:
        assert torch.equal(flat_k[s], k[n]) and torch.equal(flat_v[s], v[n])
    untouched = [s for s in range(NB * bs) if s not in (9, 0, 14)]
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


def test_store_kv_all_padding_is_a_no_op():
    k_cache = torch.full((2, 4, 1, 4), 7.0)  # (NB, bs, Hkv, D)
    v_cache = torch.full((2, 4, 1, 4), 7.0)
    store_kv(torch.randn(3, 1, 4), torch.randn(3, 1, 4), k_cache, v_cache, torch.full((3,), -1))
    assert (k_cache == 7).all() and (v_cache == 7).all()


def test_gather_kv_round_trip():
    bs = 4
    kv = PagedKV(_lengths(bs), bs, 2, 8, seed=2)
    kv.store_all()
    for b, L in enumerate(kv.lengths):
        k, v = gather_kv(kv.k_cache, kv.v_cache, kv.block_tables[b], L)  # (L, Hkv, D)
        assert torch.equal(k, kv.k_seqs[b]) and torch.equal(v, kv.v_seqs[b])


# ---------------------------------------------------------------------------------------------
# paged_decode


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bs,Hq,Hkv,D", SHAPES)
def test_paged_decode_matches_dense(bs, Hq, Hkv, D, device):
    pad = -1 if bs == 4 else 0  # both padding styles of a block table
    kv = PagedKV(_lengths(bs), bs, Hkv, D, device=device, pad=pad, seed=bs + Hq + D)
    kv.store_all()
    B = len(kv.lengths)
    q = torch.randn(B, Hq, D, generator=torch.Generator().manual_seed(3)).to(device)  # (B, Hq, D)
    context_lens = torch.tensor(kv.lengths, dtype=torch.int32, device=device)  # (B,)
    scale = D**-0.5
    out = paged_decode(q, kv.k_cache, kv.v_cache, kv.block_tables, context_lens, scale)  # (B, Hq, D)
    assert out.shape == (B, Hq, D) and out.dtype == q.dtype
    for b, L in enumerate(kv.lengths):
        ref = dense_reference(q[b : b + 1], kv.k_seqs[b], kv.v_seqs[b], scale, q_start=L - 1)  # (1, Hq, D)
        _close(out[b], ref[0])


def test_paged_decode_matches_sdpa():
    bs, Hq, Hkv, D, L = 16, 9, 3, 64, 37
    kv = PagedKV([L], bs, Hkv, D, seed=4)
    kv.store_all()
    q = torch.randn(1, Hq, D, generator=torch.Generator().manual_seed(5))  # (1, Hq, D)
    out = paged_decode(q, kv.k_cache, kv.v_cache, kv.block_tables, torch.tensor([L], dtype=torch.int32), D**-0.5)
    k = kv.k_seqs[0].repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)  # (Hq, L, D)
    v = kv.v_seqs[0].repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)  # (Hq, L, D)
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), k, v)  # (Hq, 1, D), default scale 1/sqrt(D)
    _close(out, ref.transpose(0, 1))


def test_paged_decode_keeps_low_precision_dtype():
    bs, Hq, Hkv, D = 4, 4, 2, 16
    kv = PagedKV(_lengths(bs), bs, Hkv, D, dtype=torch.bfloat16, seed=6)
    kv.store_all()
    q = torch.randn(len(kv.lengths), Hq, D, generator=torch.Generator().manual_seed(7)).bfloat16()  # (B, Hq, D)
    lens = torch.tensor(kv.lengths, dtype=torch.int32)  # (B,)
    out = paged_decode(q, kv.k_cache, kv.v_cache, kv.block_tables, lens, D**-0.5)  # (B, Hq, D)
    assert out.dtype == torch.bfloat16
    for b, L in enumerate(kv.lengths):
        ref = dense_reference(q[b : b + 1], kv.k_seqs[b], kv.v_seqs[b], D**-0.5, q_start=L - 1)  # (1, Hq, D)
        _close(out[b], ref[0], atol=2e-2, rtol=2e-2)  # bf16 output: 8 mantissa bits


# ---------------------------------------------------------------------------------------------
# paged_prefill


def _prefill(kv: PagedKV, prefix_lens, Hq, D, seed):
    """Store each sequence's cached prefix, then prefill the rest packed; returns (out, q, q_starts).

    Mirrors the engine: prefix K/V were written by an earlier step, the new tokens' K/V are
    written with one packed store_kv right before the attention call.
    """
    device = kv.k_cache.device
    q_lens = [L - p for L, p in zip(kv.lengths, prefix_lens)]
    for b, p in enumerate(prefix_lens):
        kv.store(b, 0, p)
    k_new = torch.cat([kv.k_seqs[b][p:] for b, p in enumerate(prefix_lens)])  # (Nq, Hkv, D)
    v_new = torch.cat([kv.v_seqs[b][p:] for b, p in enumerate(prefix_lens)])  # (Nq, Hkv, D)
    slots = torch.cat([kv.slots[b][p:] for b, p in enumerate(prefix_lens)])  # (Nq,)
    store_kv(k_new, v_new, kv.k_cache, kv.v_cache, slots)
    Nq = sum(q_lens)
    q = torch.randn(Nq, Hq, D, generator=torch.Generator().manual_seed(seed)).to(device)  # (Nq, Hq, D)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).int().to(device)  # (B+1,)
    lens = torch.tensor(kv.lengths, dtype=torch.int32, device=device)  # (B,)
    out = paged_prefill(q, k_new, v_new, kv.k_cache, kv.v_cache, kv.block_tables, cu, lens, D**-0.5)  # (Nq, Hq, D)
    return out, q, cu.tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_prefix", [False, True], ids=["no_prefix", "cached_prefix"])
@pytest.mark.parametrize("bs,Hq,Hkv,D", SHAPES)
def test_paged_prefill_matches_dense(bs, Hq, Hkv, D, with_prefix, device):
    lengths = _lengths(bs)  # [1, bs, bs+1, 3bs-1, 2bs+3]
    # Cached prefixes: none, mid-block, exactly one block, a block + 2; a 1-token chunk at the end.
    prefix_lens = [0, bs // 2, bs, bs + 2, 2 * bs + 2] if with_prefix else [0] * len(lengths)
    kv = PagedKV(lengths, bs, Hkv, D, device=device, pad=-1 if D == 16 else 0, seed=bs * Hq + D)
    out, q, cu = _prefill(kv, prefix_lens, Hq, D, seed=8)
    assert out.shape == q.shape and out.dtype == q.dtype
    for b, (L, p) in enumerate(zip(lengths, prefix_lens)):
        ref = dense_reference(q[cu[b] : cu[b + 1]], kv.k_seqs[b], kv.v_seqs[b], D**-0.5, q_start=p)  # (L-p, Hq, D)
        _close(out[cu[b] : cu[b + 1]], ref)


def test_paged_prefill_matches_sdpa():
    bs, Hq, Hkv, D, L = 4, 4, 2, 16, 11
    kv = PagedKV([L], bs, Hkv, D, seed=9)
    out, q, _ = _prefill(kv, [0], Hq, D, seed=10)  # (L, Hq, D)
    k = kv.k_seqs[0].repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)  # (Hq, L, D)
    v = kv.v_seqs[0].repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)  # (Hq, L, D)
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, is_causal=True)  # (Hq, L, D)
    _close(out, ref.transpose(0, 1))


def test_chunked_prefill_and_decode_agree_with_one_shot_prefill():
    """Prefill in one go == prefill in two chunks + a decode step, token for token."""
    bs, Hq, Hkv, D, L = 4, 9, 3, 16, 14
    kv = PagedKV([L], bs, Hkv, D, seed=11)
    kv.store_all()
    q = torch.randn(L, Hq, D, generator=torch.Generator().manual_seed(12))  # (L, Hq, D)
    k, v = kv.k_seqs[0], kv.v_seqs[0]  # (L, Hkv, D)
    bt, s = kv.block_tables, D**-0.5

    def run(a, e):  # prefill tokens [a, e) with the first e tokens in context
        cu = torch.tensor([0, e - a], dtype=torch.int32)  # (2,)
        return paged_prefill(q[a:e], k[a:e], v[a:e], kv.k_cache, kv.v_cache, bt, cu, torch.tensor([e], dtype=torch.int32), s)

    whole = run(0, L)  # (L, Hq, D)
    chunks = torch.cat([run(0, 6), run(6, L - 1)])  # (L-1, Hq, D), chunk split mid-block
    last = paged_decode(q[L - 1 :], kv.k_cache, kv.v_cache, bt, torch.tensor([L], dtype=torch.int32), s)  # (1, Hq, D)
    torch.testing.assert_close(chunks, whole[: L - 1], **TOL)
    torch.testing.assert_close(last, whole[L - 1 :], **TOL)

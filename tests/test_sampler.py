"""Sampler: greedy, repetition penalty, top-k/top-p (against HF's processors), seeds, statistics.

Every test draws fresh random logits; the seed is printed so a failure can be replayed
(`LABKIT_TEST_SEED=<seed> pytest ...`).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from labkit.config import GenerationConfig
from labkit.engine.sampler import (SampleRow, Sampler, apply_repetition_penalty, make_generator,
                                   top_k_top_p_filter)

hf_lp = pytest.importorskip("transformers.generation.logits_process")

sampler = Sampler()


@pytest.fixture(autouse=True)
def seed():
    s = int(os.environ.get("LABKIT_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed {s}")
    torch.manual_seed(s)
    return s


def sampled(**kw) -> GenerationConfig:
    return GenerationConfig(do_sample=True, **{"temperature": 1.0, "top_k": 0, **kw})


def chi2_limit(df: int, z: float = 5.0) -> float:
    """Upper chi-square quantile (Wilson-Hilferty); z = 5 -> a false alarm about once in 3.5M."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    n = counts.sum()
    keep = probs > 0
    exp = probs[keep] * n                                               # (K,)
    return float(((counts[keep] - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    logits = (torch.randn(6, 1000) * 3).to(dtype)                       # (B, V)
    before = logits.clone()
    configs = [GenerationConfig(), GenerationConfig(do_sample=True, temperature=0.0),
               GenerationConfig(do_sample=True, top_k=1)] * 2
    out = sampler(logits, [SampleRow(c, None, []) for c in configs])   # fast path
    assert out.dtype == torch.int64 and out.shape == (6,)
    assert torch.equal(out, logits.float().argmax(-1))
    # greedy rows inside a batch that also samples (the slow path) are still argmax
    rows = [SampleRow(c, None, []) for c in configs[:3]] + [SampleRow(sampled(), None, [])] * 3
    out = sampler(logits, rows)
    assert torch.equal(out[:3], logits[:3].float().argmax(-1))
    assert torch.equal(logits, before)                                  # input untouched


def test_repetition_penalty_matches_hf():
    B, V = 5, 300
    logits = torch.randn(B, V) * 4                                      # (B, V) both signs
    penalties = [1.3, 0.7, 1.0, 2.0, 1.15]
    seen = [torch.randint(0, V, (n,)).tolist() for n in (40, 7, 12, 1, 90)]  # with repeats
    ours = apply_repetition_penalty(logits.clone(), seen, penalties)
    for i in range(B):
        proc = hf_lp.RepetitionPenaltyLogitsProcessor(penalty=penalties[i])
        ref = proc(torch.tensor([seen[i]]), logits[i:i + 1].clone())   # (1, V)
        torch.testing.assert_close(ours[i], ref[0], rtol=0, atol=0)
    # through the sampler: a greedy row picks argmax of the penalised logits
    rows = [SampleRow(GenerationConfig(repetition_penalty=p), None, s)
            for p, s in zip(penalties, seen)]
    assert torch.equal(sampler(logits, rows), ours.argmax(-1))
    # a strong penalty on the current favourite moves greedy away from it
    top = int(logits[0].argmax())
    logits[0, top] = logits[0].abs().max() + 1.0
    row = SampleRow(GenerationConfig(repetition_penalty=1e4), None, [top])
    assert int(sampler(logits[:1], [row])[0]) != top


def hf_filter(logits: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """HF order (top-k, then top-p) on one row. logits: (1, V)."""
    ids = torch.zeros(1, 1, dtype=torch.long)
    if k > 0:
        logits = hf_lp.TopKLogitsWarper(top_k=k)(ids, logits)
    if p < 1.0:
        logits = hf_lp.TopPLogitsWarper(top_p=p)(ids, logits)
    return logits


KP = [(0, 1.0), (1, 1.0), (10, 1.0), (0, 0.5), (0, 0.9), (40, 0.8), (5, 0.3), (0, 0.01), (2000, 0.95)]


def test_top_k_top_p_match_hf():
    V = 500
    logits = torch.randn(len(KP), V) * 2                                # (S, V) no ties
    k = torch.tensor([kp[0] for kp in KP])
    p = torch.tensor([kp[1] for kp in KP])
    ours = top_k_top_p_filter(logits, k, p)                             # (S, V)
    for i, (ki, pi) in enumerate(KP):
        ref = hf_filter(logits[i:i + 1].clone(), ki, pi)[0]             # (V,)
        assert torch.equal(torch.isfinite(ours[i]), torch.isfinite(ref)), (ki, pi)
        torch.testing.assert_close(ours[i].softmax(-1), ref.softmax(-1))
        assert torch.isfinite(ours[i]).sum() >= 1


def test_top_k_keeps_ties_like_hf():
    V = 200
    logits = torch.randint(0, 6, (4, V)).float() / 2                    # (S, V) many ties
    for k in (1, 3, 17, 50):
        ours = top_k_top_p_filter(logits, torch.full((4,), k), torch.ones(4))
        for i in range(4):
            ref = hf_filter(logits[i:i + 1].clone(), k, 1.0)[0]
            assert torch.equal(torch.isfinite(ours[i]), torch.isfinite(ref))
            assert torch.isfinite(ours[i]).sum() >= k                   # ties at the k-th stay


def test_top_p_with_ties():
    """With ties, which of two equal tokens survives is arbitrary (also in HF); how many
    survive and their values are not. p sits midway between two cumulative masses so float
    rounding cannot move the cut."""
    V = 100
    logits = torch.randint(0, 5, (1, V)).float()                        # (1, V)
    probs = logits.softmax(-1)[0].sort(descending=True).values          # (V,)
    cum = probs.cumsum(0)
    for n in (1, 3, 10, 40):
        p = float((cum[n - 1] + cum[n]) / 2)                            # keeps exactly n + 1
        ours = top_k_top_p_filter(logits, torch.zeros(1, dtype=torch.long), torch.tensor([p]))[0]
        ref = hf_filter(logits.clone(), 0, p)[0]
        assert int(torch.isfinite(ours).sum()) == int(torch.isfinite(ref).sum()) == n + 1
        assert torch.equal(ours[torch.isfinite(ours)].sort().values,
                           ref[torch.isfinite(ref)].sort().values)
        # every token strictly above the lowest kept value is kept
        assert torch.isfinite(ours[logits[0] > ours[torch.isfinite(ours)].min()]).all()


def test_seeds_reproduce_and_differ():
    V = 1000
    logits = torch.randn(1, V)                                          # (1, V) high entropy
    cfg = sampled(temperature=1.2, top_p=0.95)

    def draws(seed, n=30):
        g = make_generator(seed, "cpu")
        return [int(sampler(logits, [SampleRow(cfg, g, [])])[0]) for _ in range(n)]

    a, b, c = draws(1234), draws(1234), draws(4321)
    assert a == b and a != c
    # a seeded row gives the same tokens whatever else is in the batch
    g1, g2 = make_generator(7, "cpu"), make_generator(7, "cpu")
    alone = sampler(logits, [SampleRow(cfg, g1, [])])
    noise = torch.randn(3, V)
    batch = sampler(torch.cat([noise[:2], logits, noise[2:]]),
                    [SampleRow(sampled(), None, [])] * 2 + [SampleRow(cfg, g2, [])]
                    + [SampleRow(sampled(), make_generator(99, "cpu"), [])])
    assert int(batch[2]) == int(alone[0])
    # rows without a seed follow the global RNG
    torch.manual_seed(5)
    x = sampler(logits.expand(8, V), [SampleRow(cfg, None, [])] * 8)
    torch.manual_seed(5)
    assert torch.equal(x, sampler(logits.expand(8, V), [SampleRow(cfg, None, [])] * 8))
    assert make_generator(None, "cpu") is None


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=1.5),
                                dict(temperature=0.9, top_k=5), dict(temperature=1.1, top_p=0.8)],
                         ids=["T0.7", "T1.5", "topk5", "topp0.8"])
def test_sampling_follows_softmax(seed, seeded, kw):
    V, N = 8, 4000
    logits = torch.randn(1, V) * 1.5                                    # (1, V)
    cfg = sampled(**kw)
    T = cfg.temperature
    expected = hf_filter(logits / T, cfg.top_k, cfg.top_p).softmax(-1)[0]  # (V,)
    g = make_generator(seed, "cpu") if seeded else None
    ids = sampler(logits.expand(N, V), [SampleRow(cfg, g, [])] * N)    # (N,)
    counts = torch.bincount(ids, minlength=V).double()                  # (V,)
    assert counts[expected == 0].sum() == 0                             # filtered never drawn
    stat, df = chi2(counts, expected.double())
    if df > 0:                                # df == 0: one token kept, checked just above
        print(f"chi2 {stat:.1f} (df {df}, limit {chi2_limit(df):.1f})", counts.tolist())
        assert stat < chi2_limit(df)


def test_banned_ids_never_chosen():
    V, N = 50, 2000
    logits = torch.randn(N, V)                                          # (N, V)
    banned = [2, 7, 11]
    logits[:, banned] = 10.0                                            # the favourites
    for cfg in (GenerationConfig(), sampled(temperature=5.0), sampled(top_k=3),
                sampled(top_p=0.5, repetition_penalty=0.5)):
        rows = [SampleRow(cfg, None, [2, 3], banned_ids=banned)] * N
        out = sampler(logits, rows)
        assert not torch.isin(out, torch.tensor(banned)).any(), cfg
    # ids past the vocabulary (a user's stop_token_ids) are ignored, not an index error
    row = SampleRow(GenerationConfig(), None, [], banned_ids=[V + 5, -1, 2])
    assert int(sampler(logits[:1], [row])[0]) != 2
    # a row with banned ids next to one without: only that row is affected
    rows = [SampleRow(GenerationConfig(), None, [], banned_ids=banned), SampleRow(GenerationConfig())]
    out = sampler(logits[:2], rows)
    assert int(out[0]) not in banned and int(out[1]) in banned

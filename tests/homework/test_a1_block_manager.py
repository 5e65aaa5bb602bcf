"""Assignment 1 (homework/a1_block_manager.py): the student's BlockManager against labkit's
(labkit/engine/block_manager.py) on fresh random traces, then inside the real engine."""
from __future__ import annotations

import random

import pytest

import adapters
import engine_check
from labkit.config import GenerationConfig
from labkit.engine import block_manager as labkit_bm
from labkit.engine.scheduler import Scheduler
from labkit.engine.sequence import Sequence, SequenceStatus

BS = 4


def _seq(tokens, bs=BS):
    return Sequence(list(tokens), GenerationConfig(max_new_tokens=64), bs)


def _counts(bm) -> tuple:
    return bm.num_free, bm.num_used, bm.num_cached


def _with_labkit_parts(bm, *names):
    """Bind labkit's version of the named methods onto the student's instance (the state
    layout is the same), so a test grades one region and not the others."""
    for name in names:
        setattr(bm, name, getattr(labkit_bm.BlockManager, name).__get__(bm))
    return bm


def _check_refcounts(bm, live) -> None:
    """Every block's ref_count is the number of live block tables that hold it."""
    uses = {}
    for s in live:
        for b in s.block_table:
            uses[b] = uses.get(b, 0) + 1
    for block in bm.blocks:
        assert block.ref_count == uses.get(block.block_id, 0), (
            f"block {block.block_id}: ref_count {block.ref_count}, but {uses.get(block.block_id, 0)} "
            f"live block tables hold it")


# ---------------------------------------------------------------------------- 1.1 allocate
@pytest.mark.points(2, assign="1.1")
def test_allocate_matches_labkit():
    """allocate/can_allocate: table sizes, counts and admission decisions match labkit"""
    rng = random.Random()
    Student = adapters.block_manager_class()
    for trial in range(4):
        n_blocks = rng.randint(8, 40)
        mine, ref = Student(n_blocks, BS, False), labkit_bm.BlockManager(n_blocks, BS, False)
        live = []
        for _ in range(20):
            tokens = rng.choices(range(1000), k=rng.randint(1, 5 * BS))
            a, b = _seq(tokens), _seq(tokens)
            reserve = rng.randint(0, 2)
            want = ref.can_allocate(b, reserve)
            got = mine.can_allocate(a, reserve)
            assert got == want, (f"can_allocate with {mine.num_free} free blocks, {len(tokens)} tokens, "
                                 f"reserve={reserve}: got {got}, labkit says {want}")
            if not want:
                continue
            mine.allocate(a)
            ref.allocate(b)
            assert len(a.block_table) == a.blocks_needed(), \
                f"{len(tokens)} tokens in blocks of {BS} need {a.blocks_needed()} blocks, got {len(a.block_table)}"
            assert a.num_computed_tokens == 0
            live.append(a)
            assert _counts(mine) == _counts(ref), f"(free, used, cached) {_counts(mine)} != labkit's {_counts(ref)}"
        tables = [b for s in live for b in s.block_table]
        assert len(tables) == len(set(tables)), "two sequences got the same block"
        assert all(0 <= b < n_blocks for b in tables)
        _check_refcounts(mine, live)


# ---------------------------------------------------------------------------- 1.2 free
@pytest.mark.points(2, assign="1.2")
def test_free_returns_every_block():
    """free: blocks come back in any order, counts match labkit, double free raises"""
    rng = random.Random()
    Student = adapters.block_manager_class()
    mine, ref = Student(48, BS, False), labkit_bm.BlockManager(48, BS, False)
    _with_labkit_parts(mine, "_fresh_block_id", "can_allocate", "allocate")
    pairs = []
    for _ in range(8):
        tokens = rng.choices(range(1000), k=rng.randint(1, 4 * BS))
        a, b = _seq(tokens), _seq(tokens)
        mine.allocate(a)
        ref.allocate(b)
        pairs.append((a, b))
    rng.shuffle(pairs)
    while pairs:
        a, b = pairs.pop()
        mine.free(a)
        ref.free(b)
        assert a.block_table == [], "free must leave the sequence with an empty block table"
        assert _counts(mine) == _counts(ref), f"(free, used, cached) {_counts(mine)} != labkit's {_counts(ref)}"
        _check_refcounts(mine, [p[0] for p in pairs])
    assert mine.num_free == 48 and mine.num_used == 0
    ghost = Sequence([1], GenerationConfig(), BS, block_table=[rng.randrange(48)])
    with pytest.raises((AssertionError, RuntimeError)):
        mine.free(ghost)                               # that block's ref_count is already 0


# ---------------------------------------------------------------------------- 1.3 append
@pytest.mark.points(2, assign="1.3")
def test_append_grows_tables_one_block_at_a_time():
    """can_append/append_slot: a new block exactly when a token starts one, none when full"""
    rng = random.Random()
    Student = adapters.block_manager_class()
    n_blocks = 20
    mine, ref = Student(n_blocks, BS, False), labkit_bm.BlockManager(n_blocks, BS, False)
    _with_labkit_parts(mine, "_fresh_block_id", "allocate", "free")
    running = []
    for _ in range(5):
        tokens = rng.choices(range(1000), k=rng.randint(1, 2 * BS))
        pair = (_seq(tokens), _seq(tokens))
        for bm, s in zip((mine, ref), pair):
            bm.allocate(s)
            s.mark_computed(s.num_uncomputed_tokens)   # the prefill step ran
            s.status = SequenceStatus.RUNNING
        running.append(pair)
    for step in range(6 * BS):
        for a, b in list(running):
            tok = rng.randrange(1000)
            a.append_token(tok)
            b.append_token(tok)
            want = ref.can_append(b)
            got = mine.can_append(a)
            assert got == want, (f"can_append at {a.num_tokens} tokens, {len(a.block_table)} blocks, "
                                 f"{mine.num_free} free: got {got}, labkit says {want}")
            if not want:                               # the scheduler would preempt it
                mine.free(a)
                ref.free(b)
                running.remove((a, b))
                continue
            mine.append_slot(a)
            ref.append_slot(b)
            assert len(a.block_table) == a.blocks_needed(), (
                f"after append_slot: {len(a.block_table)} blocks for {a.num_tokens} tokens")
            a.mark_computed(1)
            b.mark_computed(1)
            assert _counts(mine) == _counts(ref)
        _check_refcounts(mine, [p[0] for p in running])
    assert ref.num_free < n_blocks, "the trace never filled the pool (grader bug)"


# ---------------------------------------------------------------------------- 1.4 prefix hash
@pytest.mark.points(1, assign="1.4")
def test_chain_hash_names_prefixes():
    """chain_hash: equal prefixes get equal names, any difference (tokens or prev) a new one"""
    rng = random.Random()
    for _ in range(50):
        base = rng.choices(range(50000), k=3 * BS)
        other = list(base)
        cut = rng.randrange(len(base))
        other[cut] = (other[cut] + 1 + rng.randrange(100)) % 50000
        ha = hb = None
        for i in range(3):
            ha = adapters.chain_hash(ha, base[i * BS:(i + 1) * BS])
            hb = adapters.chain_hash(hb, other[i * BS:(i + 1) * BS])
            assert isinstance(ha, int), f"chain_hash returned {type(ha).__name__}, not int"
            same_prefix = (i + 1) * BS <= cut
            assert (ha == hb) == same_prefix, (f"block {i}: token lists equal up to {cut}, names "
                                              f"{'equal' if ha == hb else 'different'}")
        assert adapters.chain_hash(None, base[:BS]) == adapters.chain_hash(None, tuple(base[:BS])), \
            "a list and a tuple of the same tokens must get the same name"
        assert adapters.chain_hash(ha, base[:BS]) != adapters.chain_hash(hb, base[:BS]), \
            "the same tokens after different prefixes must get different names"


def _drive(bm_cls, prompts, seed: int, num_blocks: int, steps: int = 400) -> list:
    """labkit's real Scheduler over the given block manager, with random 'sampled' tokens and
    arrivals over time (no model). Returns what every step looked like."""
    rng = random.Random(seed)
    bm = bm_cls(num_blocks, BS, True)
    sched = Scheduler(bm, max_batch_size=4, max_prefill_token_num=12)
    pending = [Sequence(list(p), GenerationConfig(max_new_tokens=16), BS, request_id=str(i))
               for i, p in enumerate(prompts)]
    lengths = {s.request_id: s.num_tokens + rng.randint(1, 12) for s in pending}
    trace = []
    for step in range(steps):
        if pending and rng.random() < 0.5:
            sched.add(pending.pop(0))
        batch = sched.schedule()
        if batch is None:
            if not pending:
                break
            continue
        sched.postprocess(batch)
        for s in batch.seqs:
            if s.status is SequenceStatus.RUNNING and s.num_computed_tokens == s.num_tokens:
                if s.num_tokens >= lengths[s.request_id]:
                    sched.finish(s, "stop")
                else:
                    s.append_token(rng.randrange(50000))
        trace.append((step, [(s.request_id, n, s.num_computed_tokens) for s, n in
                             zip(batch.seqs, batch.num_new_tokens)],
                      [s.request_id for s in batch.preempted], bm.num_free, bm.num_used,
                      bm.num_cached, bm.stats.prefix_cache_queries, bm.stats.prefix_cache_hits,
                      bm.stats.evictions))
        if rng.random() < 0.05 and sched.running:           # an abort now and then
            sched.finish(sched.running[0], "abort")
    return trace


def _compare_traces(got, want):
    fields = ("step", "batch (id, new tokens, computed)", "preempted", "num_free", "num_used",
              "num_cached", "prefix_cache_queries", "prefix_cache_hits", "evictions")
    for g, w in zip(got, want):
        for name, a, b in zip(fields, g, w):
            assert a == b, f"at scheduler step {w[0]}: {name} is {a}, labkit's is {b}"
    assert len(got) == len(want), f"{len(got)} scheduler steps, labkit took {len(want)}"


@pytest.mark.points(3, assign="1.4")
def test_prefix_caching_trace_matches_labkit():
    """prefix caching under labkit's scheduler: hits, LRU evictions, preemptions as labkit"""
    rng = random.Random()
    Student = adapters.block_manager_class()
    system = rng.choices(range(50000), k=3 * BS + 1)
    prompts = [system + rng.choices(range(50000), k=rng.randint(1, 2 * BS)) if rng.random() < 0.6
               else rng.choices(range(50000), k=rng.randint(1, 4 * BS)) for _ in range(14)]
    seed = rng.randrange(2**31)
    want = _drive(labkit_bm.BlockManager, prompts, seed, num_blocks=18)
    assert want[-1][7] > 0 and want[-1][8] > 0, "the trace had no hit or eviction (grader bug)"
    _compare_traces(_drive(Student, prompts, seed, num_blocks=18), want)


@pytest.mark.points(1, assign="1.4")
def test_hash_collision_is_not_a_hit(monkeypatch):
    """a hash collision never shares a block whose tokens differ"""
    module = adapters.block_manager_module()
    collide = lambda prev, tokens: 12345                        # noqa: E731 every block the same name
    monkeypatch.setattr(module, "chain_hash", collide)
    monkeypatch.setattr(labkit_bm, "chain_hash", collide)
    rng = random.Random()
    prompts = [rng.choices(range(50000), k=rng.randint(BS + 1, 4 * BS)) for _ in range(10)]
    seed = rng.randrange(2**31)
    _compare_traces(_drive(module.BlockManager, prompts, seed, num_blocks=40),
                    _drive(labkit_bm.BlockManager, prompts, seed, num_blocks=40))


# ---------------------------------------------------------------------------- the engine
@pytest.mark.points(3, assign="1.1-1.4")
def test_engine_with_student_block_manager():
    """the real engine with your BlockManager: same tokens, prefix hits and preemptions"""
    rng = random.Random()
    prompts = engine_check.random_prompts(rng, 6, shared=3 * BS + 2)
    gen = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    config = dict(cache_block_seq_len=BS, cache_max_entry_count=22, max_batch_size=6,
                  session_len=96, max_prefill_token_num=24)
    got, stats, _ = engine_check.run(prompts, gen, adapters.block_manager_class(), **config)
    want, ref_stats, _ = engine_check.run(prompts, gen, **config)
    assert ref_stats["prefix_cache_hits"] > 0 and ref_stats["preemptions"] > 0, \
        f"grader bug: the reference run had no prefix hit or no preemption: {ref_stats}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"request {i}: generated {g}, labkit's engine generated {w}"
    for key in ("prefix_cache_hits", "preemptions", "evictions"):
        assert stats[key] == ref_stats[key], f"{key}: {stats[key]}, labkit's engine: {ref_stats[key]}"
    assert stats["blocks_used"] == 0, f"{stats['blocks_used']} blocks still used after every request finished"

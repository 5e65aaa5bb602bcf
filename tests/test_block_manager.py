"""BlockManager and Scheduler bookkeeping on fresh random token sequences (no model needed)."""
import random

import pytest

from labkit.config import GenerationConfig
from labkit.engine.block_manager import BlockManager
from labkit.engine.scheduler import Scheduler
from labkit.engine.sequence import Sequence, SequenceStatus

BS = 4


def seq(tokens):
    return Sequence(list(tokens), GenerationConfig(max_new_tokens=8), BS)


def compute_all(bm, s):
    """What a prefill step does to the bookkeeping: every token computed, full blocks named."""
    s.mark_computed(s.num_uncomputed_tokens)
    bm.commit(s)


def test_allocate_free_refcounts():
    rng = random.Random()
    bm = BlockManager(16, BS)
    a = seq(rng.choices(range(1000), k=10))          # 3 blocks (4 + 4 + 2)
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert len(a.block_table) == 3 and bm.num_used == 3 and bm.num_free == 13
    assert len(set(a.block_table)) == 3
    compute_all(bm, a)
    bm.free(a)
    assert bm.num_used == 0 and bm.num_cached == 2      # the two full blocks stay cached
    with pytest.raises(AssertionError):
        bm.blocks[0].ref_count = 0
        bm.free(Sequence([1], GenerationConfig(), BS, block_table=[0]))


def test_prefix_hits_share_blocks_and_never_cover_the_last_token():
    rng = random.Random()
    prefix = rng.choices(range(1000), k=8)               # exactly two blocks
    bm = BlockManager(16, BS)
    a = seq(prefix + [7, 8, 9])
    bm.allocate(a); compute_all(bm, a)
    b = seq(prefix + [5])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_computed_tokens == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2
    c = seq(prefix)                                      # fully cached: the last block is recomputed
    bm.allocate(c)
    assert c.block_table[0] == a.block_table[0] and c.block_table[1] != a.block_table[1]
    assert c.num_computed_tokens == 4 and c.num_uncomputed_tokens == 4
    d = seq([prefix[0] + 1] + prefix[1:] + [1])          # first token differs: no hit at all
    bm.allocate(d)
    assert d.num_computed_tokens == 0 and not set(d.block_table) & set(a.block_table)
    for s in (a, b, c, d):
        bm.free(s)
    assert bm.num_used == 0


def test_lru_eviction_prefers_oldest_and_tail_blocks():
    bm = BlockManager(4, BS)
    a = seq(range(12))                                   # 3 blocks, all full after compute
    bm.allocate(a); compute_all(bm, a)
    bm.free(a)
    assert bm.num_cached == 3 and bm.num_free == 4
    b = seq(range(100, 110))                             # needs 3 blocks: 1 free + 2 evicted
    bm.allocate(b)
    assert bm.stats.evictions == 2
    # the prefix block 0 of `a` survived (tail blocks were evicted first)
    again = seq(list(range(4)) + [50])
    bm.free(b)
    bm.allocate(again)
    assert again.num_computed_tokens == 4


def test_decode_appends_a_block_at_the_boundary():
    bm = BlockManager(8, BS)
    s = seq(range(4))
    bm.allocate(s); compute_all(bm, s)
    s.status = SequenceStatus.RUNNING
    s.append_token(99)                                   # 5th token needs a 2nd block
    assert bm.can_append(s)
    bm.append_slot(s)
    assert len(s.block_table) == 2


def test_scheduler_preempts_newest_and_requeues_it_first():
    bm = BlockManager(5, BS)
    sched = Scheduler(bm, max_batch_size=4, max_prefill_token_num=64)
    a, b = seq(range(8)), seq(range(50, 58))             # 2 blocks each + 1 watermark block
    sched.add(a); sched.add(b)
    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs == [a, b]
    sched.postprocess(batch)
    a.append_token(1); b.append_token(2)                 # both need a 3rd block now
    batch = sched.schedule()
    assert not batch.is_prefill and batch.seqs == [a] and batch.preempted == [b]
    assert b.status is SequenceStatus.WAITING and not b.block_table and sched.waiting[0] is b
    assert bm.num_used == 3


def test_chunked_prefill_splits_long_prompts():
    bm = BlockManager(32, BS)
    sched = Scheduler(bm, max_batch_size=4, max_prefill_token_num=10)
    s = seq(range(25))
    sched.add(s)
    chunks = []
    while s.status is SequenceStatus.WAITING:
        batch = sched.schedule()
        chunks.append(batch.num_new_tokens[0])
        sched.postprocess(batch)
    assert chunks == [10, 10, 5] and s.status is SequenceStatus.RUNNING


def test_reset_prefix_cache_forgets_unused_blocks():
    bm = BlockManager(8, BS)
    a = seq(range(9))
    bm.allocate(a); compute_all(bm, a)
    bm.free(a)
    assert bm.num_cached == 2
    assert bm.reset_prefix_cache() == 2 and bm.num_cached == 0 and bm.num_free == 8
    b = seq(range(9))
    bm.allocate(b)
    assert b.num_computed_tokens == 0


def test_admission_keeps_a_watermark_while_others_run():
    bm = BlockManager(6, BS)
    sched = Scheduler(bm, max_batch_size=4, max_prefill_token_num=64)
    a = seq(range(12))                                   # 3 blocks
    sched.add(a)
    sched.postprocess(sched.schedule())
    b = seq(range(100, 112))                             # 3 blocks would leave 0 free: wait
    sched.add(b)
    batch = sched.schedule()
    assert not batch.is_prefill and batch.seqs == [a] and sched.waiting[0] is b


def test_new_requests_join_the_decode_step():
    """Continuous batching without stalls: a new prompt is prefilled in the same step as the
    running sequence's decode token (vLLM v1-style mixed step)."""
    bm = BlockManager(32, BS)
    sched = Scheduler(bm, max_batch_size=4, max_prefill_token_num=10)
    a = seq(range(6))
    sched.add(a)
    sched.postprocess(sched.schedule())
    a.append_token(7)
    b = seq(range(20, 40))                               # 20 tokens: 9 fit beside a's decode
    sched.add(b)
    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs == [a, b] and batch.num_new_tokens == [1, 9]
    sched.postprocess(batch)
    assert list(sched.running) == [a] and sched.waiting[0] is b   # b still prefilling

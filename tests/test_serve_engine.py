"""AsyncEngine under the server: held KV for sessions (pin/unpin), queue limit, aborts, close.
On the tiny model, in-process (no HTTP): ~10 s on 2 cores."""
import asyncio
import random

import pytest

from labkit import EngineConfig, GenerationConfig
from labkit.engine.async_engine import AsyncEngine, EngineClosed, KVHold, QueueFull
from labkit.engine.block_manager import BlockManager
from labkit.engine.engine import LLMEngine
from labkit.engine.sequence import Sequence

BS = 16


@pytest.fixture(scope="module")
def engine():
    return LLMEngine("tiny-llama", EngineConfig(session_len=512, cache_max_entry_count=64,
                                                cache_block_seq_len=BS, max_batch_size=4, dtype="float32"))


def _words(rng, n):
    vocab = "river stone cloud apple seven window quiet yellow tiger music paper orbit".split()
    return " ".join(rng.choice(vocab) for _ in range(n))


def test_pin_prefix_holds_blocks_against_eviction():
    bm = BlockManager(num_blocks=4, block_size=4)
    ids = list(range(10, 22))                                  # 3 full blocks
    seq = Sequence(list(ids), GenerationConfig(), 4)
    bm.allocate(seq)
    seq.num_computed_tokens = 12
    bm.commit(seq)
    bm.free(seq)
    assert bm.num_cached == 3 and bm.num_used == 0
    held = bm.pin_prefix(ids[:10])                             # 2 full blocks of that prefix
    assert len(held) == 2 and bm.num_used == 2 and bm.num_cached == 1
    assert bm.pin_prefix([99] * 8) == []                       # not cached: nothing held
    for _ in range(2):                                         # eviction takes only the free ones
        other = Sequence([1, 2, 3, 4], GenerationConfig(), 4)
        bm.allocate(other)
    assert all(bm.blocks[b].hash is not None for b in held)
    assert bm.num_free == 0
    bm.unpin(held)
    assert bm.num_used == 2 and bm.num_cached == 2             # back in the LRU, still named


def test_kept_kv_is_hit_and_gives_the_same_tokens(engine):
    rng = random.Random()
    aeng = AsyncEngine(engine)
    gc = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    turn1 = [{"role": "user", "content": _words(rng, 30)}]
    hold = KVHold()

    async def run(prompt, **kw):
        return [o async for o in aeng.generate(prompt, gc, **kw)][-1]

    try:
        first = asyncio.run(run(turn1, hold=hold))
        stream = engine.tokenizer.prompt_to_ids(turn1) + first.token_ids
        assert len(hold.blocks) == (len(stream) - 1) // BS   # every full computed block is held
        assert aeng.stats()["blocks_used"] == len(hold.blocks) == aeng.stats()["blocks_held"]
        engine.reset_prefix_cache()                          # unpinned cache is gone; held stays
        nxt = stream + engine.tokenizer.encode(_words(rng, 12))
        second = asyncio.run(run(nxt, hold=hold))
        assert second.num_prefix_hit_tokens == (len(stream) - 1) // BS * BS
        # the same ids on an engine without any cache give the same tokens
        fresh = LLMEngine("tiny-llama", EngineConfig(session_len=512, cache_max_entry_count=64,
                                                     cache_block_seq_len=BS, enable_prefix_caching=False,
                                                     dtype="float32"))
        assert fresh.generate([nxt], gc)[0].token_ids == second.token_ids
        aeng.release(hold).result(timeout=30)
        assert hold.blocks == [] and aeng.stats()["blocks_used"] == 0
    finally:
        aeng.close()


def test_holds_are_let_go_when_a_request_needs_the_room(engine):
    aeng = AsyncEngine(engine, max_held_fraction=1.0)
    holds = []
    rng = random.Random()

    async def main():
        gc = GenerationConfig(max_new_tokens=8, ignore_eos=True)
        session_blocks = 512 // BS                  # what one full session_len request needs
        while aeng.stats()["blocks_free"] >= session_blocks:
            holds.append(KVHold())
            async for _ in aeng.generate(_words(rng, 80), gc, hold=holds[-1]):
                pass
        # a request needing more blocks than are free still runs: the oldest holds go
        prompt = engine.tokenizer.encode(_words(rng, 30))
        big = GenerationConfig(max_new_tokens=512 - len(prompt), ignore_eos=True)
        out = [o async for o in aeng.generate(prompt, big)][-1]
        assert out.finish_reason == "length" and len(out.token_ids) == 512 - len(prompt)
        assert holds[0].blocks == [] and holds[-1].blocks != []

    try:
        asyncio.run(main())
    finally:
        aeng.close()
    assert aeng.stats()["blocks_used"] == 0          # close let go of every hold


def test_queue_full_and_abort_while_waiting(engine):
    aeng = AsyncEngine(engine, max_waiting=2)

    async def main():
        gc = GenerationConfig(max_new_tokens=300, ignore_eos=True)
        with pytest.raises(ValueError, match="session_len"):
            await aeng.add([1] * 600, gc)
        streams = [await aeng.add(f"story number {i}", gc) for i in range(2)]
        with pytest.raises(QueueFull, match="waiting queue is full"):
            for i in range(6):                   # max_batch_size=4 run, 2 more may wait
                streams.append(await aeng.add(f"another story {i}", gc))
        first = await streams[0].__anext__()
        assert not first.finished
        for s in streams:                        # waiting and running ones alike
            await s.aclose()
        assert aeng.stats()["running"] == 0 and aeng.stats()["waiting"] == 0
        assert aeng.stats()["blocks_used"] == 0

    try:
        asyncio.run(main())
    finally:
        aeng.close()


def test_close_ends_streams_with_abort(engine):
    aeng = AsyncEngine(engine)

    async def main():
        stream = await aeng.add("Tell a very long story.", GenerationConfig(max_new_tokens=400, ignore_eos=True))
        await stream.__anext__()
        aeng.close()
        outs = [o async for o in stream]
        assert outs[-1].finished and outs[-1].finish_reason == "abort"
        with pytest.raises(EngineClosed):
            await aeng.add("x")

    asyncio.run(main())
    assert engine.stats()["blocks_used"] == 0


def test_a_reader_cancelled_twice_still_aborts(engine):
    """anyio (Starlette) cancels every await in a cancelled scope again, the abort's too: the
    abort must run anyway, or a dropped client's request would run to its end."""
    import threading
    aeng = AsyncEngine(engine)
    gate, blocked = threading.Event(), threading.Event()

    async def main():
        started = asyncio.Event()
        before = aeng.stats()["generated_tokens_total"]

        async def reader():
            async for _ in aeng.generate("Tell a long story.", GenerationConfig(max_new_tokens=400, ignore_eos=True)):
                started.set()
        task = asyncio.create_task(reader())
        await started.wait()
        aeng._submit(lambda: (blocked.set(), gate.wait()))  # park the engine thread
        await asyncio.to_thread(blocked.wait)
        task.cancel()
        await asyncio.sleep(0.05)       # the reader now awaits its abort in `finally`
        task.cancel()                   # ... and that await is cancelled too
        await asyncio.gather(task, return_exceptions=True)
        gate.set()
        for _ in range(100):
            if aeng.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        assert aeng.stats()["running"] == 0 and aeng.stats()["blocks_used"] == 0
        assert aeng.stats()["generated_tokens_total"] - before < 100    # aborted, not finished

    try:
        asyncio.run(main())
    finally:
        gate.set()
        aeng.close()

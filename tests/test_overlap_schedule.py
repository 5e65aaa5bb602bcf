"""Overlap scheduling (EngineConfig.overlap_schedule): step k+1 is scheduled and launched before
step k's tokens are read, each unread token counted as PENDING. On CPU the forward is
synchronous, so nothing overlaps here, but every piece of the bookkeeping runs: these tests
force it on and compare against HF transformers `generate` and against the same engine with
overlap off, under the cases that break a careless version (a stop found one step late, length
limits known in advance, preemption, chunked prefill, abort while a step is in flight,
streaming, seeded sampling with a repetition penalty that reads the previous token)."""
import random

import pytest

from labkit.config import ConfigError, EngineConfig, GenerationConfig
from labkit.engine.engine import LLMEngine
from labkit.engine.sequence import PENDING
from tests.helpers import make_prompts, workspace


def _engine(overlap=True, **kw):
    kw = {"max_batch_size": 16, "session_len": 1024, "cache_max_entry_count": 0.2,
          "dtype": "float32", **kw}
    return LLMEngine(workspace("smollm2-135m"), EngineConfig(overlap_schedule=overlap, **kw))


@pytest.fixture(scope="module")
def engine():
    eng = _engine()
    assert eng.overlap
    yield eng
    assert eng.stats()["blocks_used"] == 0


@pytest.fixture(scope="module")
def sync():
    eng = _engine(overlap=None)
    assert eng.overlap is False                                    # auto: off on CPU
    return eng


def test_overlap_is_validated():
    with pytest.raises(ConfigError, match="overlap_schedule"):
        EngineConfig(overlap_schedule="yes")


def test_overlap_continuous_batch_matches_hf(engine, prompts_and_reference):
    seed, prompts, ref = prompts_and_reference
    outs = engine.generate(prompts, GenerationConfig(max_new_tokens=32))
    assert [o.token_ids for o in outs] == ref, f"seed {seed}"
    assert any(len(r) < 32 for r in ref), "some request stops on eos (found a step late)"
    assert engine.stats()["blocks_used"] == 0 and not engine.has_unfinished()


def test_overlap_preemption_and_chunked_prefill_match_hf(prompts_and_reference):
    seed, prompts, ref = prompts_and_reference
    small = _engine(cache_block_seq_len=16, cache_max_entry_count=12, max_batch_size=8,
                    session_len=192)
    outs = small.generate(prompts[:6], GenerationConfig(max_new_tokens=32))
    st = small.stats()
    assert st["preemptions"] > 0, st
    assert [o.token_ids for o in outs] == ref[:6], f"seed {seed}"
    assert st["blocks_used"] == 0 and st["running"] == st["waiting"] == 0
    chunked = _engine(max_prefill_token_num=24, cache_block_seq_len=16, cache_max_entry_count=64,
                      session_len=512)
    outs = chunked.generate(prompts[:4], GenerationConfig(max_new_tokens=32))
    assert [o.token_ids for o in outs] == ref[:4], f"seed {seed}"


def _mixed_configs(rng):
    """Every stopping rule and sampler path, lengths fresh each run."""
    base = GenerationConfig(max_new_tokens=rng.randint(20, 40))
    return [base.replace(max_new_tokens=1), base.replace(max_new_tokens=2),
            base.replace(stop_words=["the", "."]),
            base.replace(do_sample=True, random_seed=rng.randrange(2**31), top_p=0.9,
                         repetition_penalty=1.3),
            base.replace(min_new_tokens=base.max_new_tokens - 4),
            base.replace(ignore_eos=True),
            base.replace(do_sample=True, random_seed=rng.randrange(2**31), top_k=20),
            base]


def test_overlap_equals_sync_on_every_stopping_rule(engine, sync):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    prompts = make_prompts(8, seed)
    gcs = _mixed_configs(rng)
    want = sync.generate(prompts, gcs)
    got = engine.generate(prompts, gcs)
    for w, g in zip(want, got):
        assert (g.token_ids, g.finish_reason, g.text) == (w.token_ids, w.finish_reason, w.text), \
            f"seed {seed}"
        assert PENDING not in g.token_ids
    # session_len: the last token allowed is known in advance, so no step computes past it
    ids = engine.tokenizer.prompt_to_ids("Say hello.")
    long = ids + [28] * (engine.config.session_len - len(ids) - 5)
    out = engine.generate([long], GenerationConfig(max_new_tokens=40, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert engine.stats()["blocks_used"] == 0


def test_a_step_returns_the_previous_steps_tokens(engine):
    gc = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    rid = engine.add_request("Count to ten.", gc)
    assert engine.step() == []                       # the prefill is launched; nothing read yet
    seq = engine.seqs[rid]
    assert seq.num_pending == 1 and seq.token_ids[-1] == PENDING
    outs = engine.step()                             # reads the prefill's token, launches the next
    assert [o.new_token_ids for o in outs] == [[seq.token_ids[-2]]] and seq.num_pending == 1
    n = 1
    while engine.has_unfinished():
        for o in engine.step():
            n += 1
            assert o.token_ids == seq.output_token_ids[:len(o.token_ids)]
    assert n == 6 and o.finished and o.finish_reason == "length"
    assert engine.stats()["blocks_used"] == 0


def test_abort_while_a_step_is_in_flight_frees_blocks(engine, sync):
    gc = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    prompts = [f"Count to {n}." for n in range(5)]
    want = sync.generate(prompts, gc)
    ids = [engine.add_request(p, gc) for p in prompts]
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None and engine.stats()["blocks_used"] > 0
    for rid in ids[::2]:                             # their next token is being computed now
        out = engine.abort(rid)
        assert out.finished and out.finish_reason == "abort" and PENDING not in out.token_ids
    kept = {}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id not in ids[::2]
            if o.finished:
                kept[o.request_id] = o.token_ids
    assert [kept[r] for r in ids[1::2]] == [w.token_ids for w in want[1::2]]
    assert engine.stats()["blocks_used"] == 0


def test_overlap_streaming_concatenates_to_final_text(engine, sync):
    gc = GenerationConfig(max_new_tokens=40, do_sample=True, top_p=0.9, random_seed=1234,
                          stop_words=["!"])
    prompt = "Write a sentence with an emoji and a Chinese word."
    engine.add_request(prompt, gc)
    pieces, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            pieces.append(out.delta_text)
            final = out
    assert "".join(pieces) == final.text and final.finished
    assert final.token_ids == sync.generate([prompt], gc)[0].token_ids

"""Streaming and final-only outputs of LLMEngine.step agree with each other and with HF's text.

A request added with stream=False gets no output until it finishes (its text is built once,
at the end); its final text and ids must equal those of the same request streamed, with and
without stop words (which make text be checked every token).
"""
import os
import random

import pytest
import torch

from labkit.config import EngineConfig, GenerationConfig
from labkit.engine.engine import LLMEngine


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return LLMEngine(str(tiny_llama_dir), EngineConfig(max_batch_size=8, cache_max_entry_count=256,
                                                       dtype="float32", session_len=512))


def run(engine, prompts, gcs, stream):
    ids = [engine.add_request(p, g, stream=stream) for p, g in zip(prompts, gcs)]
    per_step, final, streamed = [], {}, {i: "" for i in ids}
    while engine.has_unfinished():
        outs = engine.step()
        per_step.append(outs)
        for o in outs:
            streamed[o.request_id] += o.delta_text
            if o.finished:
                final[o.request_id] = o
    return [final[i] for i in ids], [streamed[i] for i in ids], per_step


def test_final_only_equals_streamed(engine):
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    V = engine.model_config.vocab_size
    prompts = [[rng.randrange(V) for _ in range(rng.randint(3, 40))] for _ in range(6)]
    gcs = [GenerationConfig(max_new_tokens=rng.randint(1, 40), ignore_eos=True) for _ in prompts]
    quiet, _, steps = run(engine, prompts, gcs, stream=False)
    loud, pieces, _ = run(engine, prompts, gcs, stream=True)
    assert all(o.finished for outs in steps for o in outs)       # nothing before the end
    for q, l, p, g in zip(quiet, loud, pieces, gcs):
        assert q.token_ids == l.token_ids and len(q.token_ids) == g.max_new_tokens
        assert q.text == l.text == p == engine.tokenizer.decode(q.token_ids)


def test_final_only_with_stop_words(engine):
    # Pick a stop word from what greedy decoding produces, then both modes must cut there.
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    prompt = torch.randint(0, engine.model_config.vocab_size, (12,)).tolist()
    free = engine.generate([prompt], [GenerationConfig(max_new_tokens=24, ignore_eos=True)])[0]
    word = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    assert word
    gc = GenerationConfig(max_new_tokens=24, ignore_eos=True, stop_words=[word])
    quiet, _, _ = run(engine, [prompt], [gc], stream=False)
    loud, pieces, _ = run(engine, [prompt], [gc], stream=True)
    cut = free.text[:free.text.find(word)]
    assert quiet[0].text == loud[0].text == pieces[0] == cut
    assert quiet[0].finish_reason == loud[0].finish_reason == "stop"

"""pipeline(), stream_infer, chat sessions, AsyncEngine and `labkit chat` on the bundled model."""
import asyncio
import subprocess
import sys

import pytest

from labkit import EngineConfig, GenerationConfig, pipeline
from labkit.engine.async_engine import AsyncEngine
from tests.helpers import workspace

STATS_KEYS = {"blocks_total", "blocks_used", "blocks_free", "blocks_cached", "running", "waiting",
              "prefix_cache_hits"}


@pytest.fixture(scope="module")
def pipe():
    p = pipeline(str(workspace("smollm2-135m")),
                 backend_config=EngineConfig(max_batch_size=8, session_len=512, cache_max_entry_count=64,
                                              dtype="float32"))
    yield p
    assert p.stats()["blocks_used"] == 0
    p.close()


def test_call_batch_and_single(pipe):
    gc = GenerationConfig(max_new_tokens=12)
    outs = pipe(["Hi", [{"role": "user", "content": "Hi"}]], gen_config=gc)
    assert [o.index for o in outs] == [0, 1]
    assert outs[0].token_ids == outs[1].token_ids           # a str is a one-message chat
    assert outs[0].input_token_len == len(pipe.tokenizer.prompt_to_ids("Hi"))
    assert 0 < outs[0].generate_token_len <= 12 and outs[0].finish_reason in ("stop", "length")
    single = pipe("Hi", gen_config=gc)
    assert single.text == outs[0].text
    st = pipe.stats()
    assert STATS_KEYS <= st.keys() and st["blocks_used"] == 0


def test_stream_infer_pieces_add_up(pipe):
    prompts = ["Name two planets.", "Write a word in French."]
    gc = GenerationConfig(max_new_tokens=20)
    final = pipe(prompts, gen_config=gc)
    pieces = {0: "", 1: ""}
    last = {}
    for r in pipe.stream_infer(prompts, gen_config=gc):
        pieces[r.index] += r.text
        last[r.index] = r
    assert [pieces[0], pieces[1]] == [f.text for f in final]
    assert all(last[i].finish_reason == final[i].finish_reason for i in (0, 1))


def test_stream_stopped_early_frees_blocks(pipe):
    gen = pipe.stream_infer(["Count from one to fifty."], GenerationConfig(max_new_tokens=100, ignore_eos=True))
    next(gen); next(gen)
    assert pipe.stats()["blocks_used"] > 0
    gen.close()
    assert pipe.stats()["blocks_used"] == 0


def test_chat_session_reuses_prefix_kv(pipe):
    gc = GenerationConfig(max_new_tokens=48)
    s = pipe.chat("My name is Ada. Please remember it and greet me in a long friendly paragraph.", gen_config=gc)
    assert s.response.text and len(s.history) == 2
    s = pipe.chat("What is my name?", session=s, gen_config=gc)
    assert len(s.history) == 4
    assert s.prefix_hit_tokens >= pipe.engine.config.cache_block_seq_len   # the first turn's KV
    # same answer as sending the whole history from scratch, without the prefix cache
    fresh = pipeline(str(workspace("smollm2-135m")),
                     backend_config=EngineConfig(session_len=512, cache_max_entry_count=64,
                                                 enable_prefix_caching=False, dtype="float32"))
    assert fresh(s.history[:3], gen_config=gc).text == s.response.text
    fresh.close()


def test_bad_prompt_queues_nothing(pipe):
    with pytest.raises(ValueError, match="role"):
        pipe(["fine", [{"role": "wizard", "content": "x"}]])
    assert pipe.stats()["waiting"] == 0 and pipe.stats()["blocks_used"] == 0


def test_async_engine_streams_and_aborts_on_cancel(pipe):
    aeng = AsyncEngine(pipe.engine)

    async def collect(prompt, gc):
        return [o async for o in aeng.generate(prompt, gc)]

    async def main():
        gc = GenerationConfig(max_new_tokens=16)
        a, b = await asyncio.gather(collect("Say yes.", gc), collect("Say no.", gc))
        assert a[-1].finished and b[-1].finished
        assert "".join(o.delta_text for o in a) == a[-1].text
        # a consumer that stops listening aborts its request
        agen = aeng.generate("Tell a long story.", GenerationConfig(max_new_tokens=200, ignore_eos=True))
        await agen.__anext__()
        await agen.aclose()
        with pytest.raises(ValueError, match="prompt"):
            await collect("", gc)
        return a

    try:
        a = asyncio.run(main())
        assert a[-1].text == pipe("Say yes.", GenerationConfig(max_new_tokens=16)).text
        assert aeng.stats()["blocks_used"] == 0 and aeng.stats()["running"] == 0
    finally:
        aeng.close()


def test_chat_cli_with_piped_stdin():
    ws = str(workspace("smollm2-135m"))
    script = "Hello!\nWhat did I just say?\nend\nHi again.\nexit\nnever read\n"
    r = subprocess.run([sys.executable, "-m", "labkit", "chat", ws, "--session-len", "512",
                        "--max-new-tokens", "16", "--cache-max-entry-count", "32"],
                       input=script, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "[0] >>> Hello!" in r.stdout and "[1] >>> What did I just say?" in r.stdout
    assert "(session reset)" in r.stdout and "[0] >>> Hi again." in r.stdout
    assert "never read" not in r.stdout
    # a session that would not fit in session_len gets a clear message, not a crash
    long = "word " * 300 + "\n"
    r = subprocess.run([sys.executable, "-m", "labkit", "chat", ws, "--session-len", "128",
                        "--max-new-tokens", "8", "--cache-max-entry-count", "32"],
                       input=long, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "exceed session_len=128" in r.stdout

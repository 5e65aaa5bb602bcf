"""The api_server under load, on the tiny model: 64 concurrent streams, disconnects, a full
queue, and `labkit bench serve`. One server for the module; ~40 s on 2 cores."""
import asyncio
import json
import random
import subprocess
import sys
import time

import httpx
import openai
import pytest

from labkit import EngineConfig, GenerationConfig, pipeline
from tests.serve_helpers import REPO, ServerProcess

MAX_BATCH, MAX_WAITING, SESSION_LEN = 16, 64, 1024
WORDS = "river stone cloud apple seven window quiet yellow tiger music paper orbit lamp".split()


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("tiny-llama", "--session-len", SESSION_LEN, "--cache-max-entry-count", 256,
                        "--cache-block-seq-len", 16, "--max-batch-size", MAX_BATCH,
                        "--max-waiting-requests", MAX_WAITING, "--dtype", "float32")  # batch-invariant enough
    yield srv
    srv.stop()


def prompts(n: int) -> list[str]:
    rng = random.Random()
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) + f" #{i}" for i in range(n)]


def test_64_concurrent_streams_each_equal_to_its_prompt_alone(server):
    texts = prompts(64)
    alone = pipeline("tiny-llama", backend_config=EngineConfig(session_len=SESSION_LEN, dtype="float32",
                                                                enable_prefix_caching=False))
    refs = [alone(t, gen_config=GenerationConfig(max_new_tokens=12)).text for t in texts]  # one by one
    alone.close()

    async def one(client, text):
        stream = await client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": text}], max_tokens=12,
            temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main():
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=80), timeout=300)
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                                      http_client=http) as client:
            return await asyncio.gather(*(one(client, t) for t in texts))

    got = asyncio.run(main())
    assert sum(g == r for g, r in zip(got, refs)) == 64
    m = server.metrics()
    assert m["labkit_kv_blocks_used"] == 0 and m["labkit_requests_running"] == 0


def _long_body(**kw):
    return {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 900,
            "ignore_eos": True, "temperature": 0} | kw


def test_disconnect_aborts_and_frees_blocks_within_1s(server):
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=_long_body(stream=True)) as r:
            lines = r.iter_lines()
            chunks = [next(x for x in lines if x.startswith("data: ")) for _ in range(3)]  # role + 2
            assert all(json.loads(c[6:])["choices"] for c in chunks)
            assert server.metrics()["labkit_kv_blocks_used"] > 0
        # the response is closed here: the client went away after 2 chunks of text
    took = server.wait_metric("labkit_kv_blocks_used", 0, within=1.0)
    assert server.metrics()["labkit_requests_running"] == 0
    # a plain (non-stream) request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=_long_body(), timeout=0.5)
    server.wait_metric("labkit_kv_blocks_used", 0, within=1.0)
    print(f"blocks freed {took * 1e3:.0f} ms after the disconnect")


def test_full_queue_is_503_with_the_error_envelope(server):
    async def main():
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=120), timeout=120) as http:
            async def send():
                async with http.stream("POST", server.url + "/v1/chat/completions",
                                       json=_long_body(stream=True)) as r:
                    if r.status_code == 200:         # accepted: keep listening (and the slot)
                        await asyncio.sleep(600)
                    return r.status_code, await r.aread()
            tasks = [asyncio.create_task(send()) for _ in range(MAX_BATCH + MAX_WAITING + 24)]
            refused = None
            for fut in asyncio.as_completed(tasks):
                status, body = await fut
                if status == 503:
                    refused = json.loads(body)
                    break
            for t in tasks:                          # hang up on the rest: they are aborted
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return refused

    refused = asyncio.run(main())
    assert refused is not None, "no request was refused"
    assert refused["error"]["code"] == "queue_full" and refused["error"]["type"] == "server_error"
    server.wait_metric("labkit_kv_blocks_used", 0, within=5.0)
    assert server.metrics()["labkit_requests_waiting"] == 0


def test_bench_serve_cli(server):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "labkit", "bench", "serve", server.url,
                        "--num-requests", "8", "--request-rate", "20", "--input-len", "8", "48",
                        "--output-len", "4", "12", "--json"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["completed"] == 8 and result["failed"] == 0
    assert 8 * 4 <= result["output_tokens"] <= 8 * 12           # ignore_eos: exactly asked for
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert 0 < result[key]["p50"] <= result[key]["p99"]
    assert result["e2e_ms"]["p99"] < (time.monotonic() - t0) * 1e3
    assert "TTFT" in r.stdout and "TPOT" in r.stdout

"""The api_server's app in-process (ASGI, no socket), on the tiny model: what a client sees when
the engine fails in the middle of a stream, and that the CLI stays light. ~10 s on 2 cores."""
import asyncio
import json
import subprocess
import sys

import httpx
import openai
import pytest

from labkit import EngineConfig
from labkit.engine.async_engine import AsyncEngine
from labkit.engine.engine import LLMEngine
from tests.serve_helpers import REPO


@pytest.fixture(scope="module")
def app_and_engine():
    from labkit.serve.app import build_app
    engine = LLMEngine("tiny-llama", EngineConfig(session_len=256, cache_max_entry_count=64,
                                                  cache_block_seq_len=16))
    aeng = AsyncEngine(engine)
    yield build_app(aeng, "tiny"), engine
    aeng.close()


def _fail_after(engine, steps: int):
    """Make the model runner's launch (what LLMEngine.step calls) raise from the (steps+1)-th
    call on; returns the undo."""
    launch, calls = engine.runner.launch, {"n": 0}

    def flaky(batch, **kw):
        calls["n"] += 1
        if calls["n"] > steps:
            raise RuntimeError("simulated device failure")
        return launch(batch, **kw)
    engine.runner.launch = flaky
    return lambda: setattr(engine.runner, "launch", launch)


def test_error_after_the_stream_began_is_an_error_event_then_done(app_and_engine):
    app, engine = app_and_engine
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 40,
            "ignore_eos": True, "temperature": 0}

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            undo = _fail_after(engine, 3)
            try:
                r = await http.post("/v1/chat/completions", json=body | {"stream": True})
                events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
                plain = await http.post("/v1/chat/completions", json=body)
                client = openai.AsyncOpenAI(base_url="http://app/v1", api_key="x", max_retries=0,
                                            http_client=http)
                with pytest.raises(openai.APIError, match="simulated device failure"):
                    async for _ in await client.chat.completions.create(
                            model="tiny", messages=body["messages"], max_tokens=40, stream=True,
                            extra_body={"ignore_eos": True}):
                        pass
            finally:
                undo()
            ok = await http.post("/v1/chat/completions", json=body)          # still serving
            return r, events, plain, ok

    r, events, plain, ok = asyncio.run(main())
    assert r.status_code == 200                       # the status line had gone out
    assert json.loads(events[1])["choices"][0]["delta"]["content"]     # text before the failure
    err = json.loads(events[-2])["error"]
    assert err["code"] == "engine_error" and "simulated device failure" in err["message"]
    assert events[-1] == "[DONE]"
    assert plain.status_code == 500 and plain.json()["error"]["code"] == "engine_error"
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 40
    assert engine.stats()["blocks_used"] == 0 and engine.stats()["running"] == 0


def test_cli_imports_no_serving_stack():
    code = ("import sys, labkit.cli; labkit.cli.build_parser(); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'gradio', 'openai', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cors_only_for_the_allowed_origins(app_and_engine):
    from labkit.serve.app import build_app
    _, engine = app_and_engine
    aeng = AsyncEngine(engine)
    app = build_app(aeng, "tiny", allow_origins=["http://localhost:6006"])

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            pre = {"Access-Control-Request-Method": "POST"}
            ok = await http.options("/v1/chat/completions", headers=pre | {"Origin": "http://localhost:6006"})
            bad = await http.options("/v1/chat/completions", headers=pre | {"Origin": "http://evil.example"})
            return ok, bad

    try:
        ok, bad = asyncio.run(main())
    finally:
        aeng.close()
    assert ok.headers["access-control-allow-origin"] == "http://localhost:6006"
    assert "access-control-allow-origin" not in bad.headers

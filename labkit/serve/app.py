"""The OpenAI-compatible API server: FastAPI routes over one shared AsyncEngine.

    GET  /health                 {"status": "ok"} while the engine runs (never needs an API key)
    GET  /metrics                Prometheus text (metrics.py)
    GET  /v1/models              the one model served
    POST /v1/chat/completions    messages -> chat template -> engine; SSE with "stream": true
    POST /v1/completions         raw text or token ids (no template); SSE with "stream": true
    POST /v1/chat/interactive    lmdeploy 0.1's stateful sessions, NDJSON (interactive.py)
    GET  /docs                   Swagger UI, from the OpenAPI schema at /openapi.json

Streams are `data: {json}` events ending in `data: [DONE]`. A client that disconnects aborts
its request (streams: Starlette cancels the response; plain requests: a watcher on the
connection), which frees its KV blocks at once.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from labkit.engine.async_engine import AsyncEngine, EngineClosed, EngineError, KVHold, QueueFull
from labkit.serve import protocol as P
from labkit.serve.errors import APIError, bad_request, install_error_handlers, sse_error
from labkit.serve.metrics import CONTENT_TYPE, ServerMetrics
from labkit.serve.sessions import SessionStore

ERRORS = {c: {"model": P.ErrorResponse} for c in (400, 401, 404, 503)}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServerState:
    """What every route shares: the engine, a tokenizer of its own, the served model's name."""
    aeng: AsyncEngine
    model_name: str
    api_keys: tuple
    metrics: ServerMetrics
    sessions: SessionStore

    def __post_init__(self):
        from labkit.tokenizer import Tokenizer
        tok = self.aeng.engine.tokenizer      # the engine thread's; this copy is the event loop's
        self.tokenizer = Tokenizer(tok.path, tok.model_name)
        self.session_len = self.aeng.engine.config.session_len

    def check_model(self, name: str | None) -> None:
        if name not in (None, "", self.model_name):
            raise APIError(404, f"the model `{name}` does not exist: this server serves "
                           f"`{self.model_name}` (see GET /v1/models)", "model", "model_not_found")

    def chat_ids(self, messages: list[dict], param: str = "messages") -> list[int]:
        try:
            ids = self.tokenizer.apply_chat_template(messages)
        except Exception as e:                       # validation or the template's own error
            raise bad_request(f"{param}: {e}", param) from None
        return self.check_length(ids, param)

    def completion_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            bad = [t for t in prompt if t >= self.tokenizer.vocab_size]
            if bad:
                raise bad_request(f"prompt: token ids must be in [0, {self.tokenizer.vocab_size}); "
                                  f"got {bad[:5]}", "prompt")
            ids = list(prompt)
        if not ids:
            raise bad_request("prompt: the prompt has no tokens", "prompt")
        return self.check_length(ids, "prompt")

    def check_length(self, ids: list[int], param: str) -> list[int]:
        if len(ids) >= self.session_len:
            raise APIError(400, f"{param}: the prompt is {len(ids)} tokens; it must be shorter "
                           f"than session_len={self.session_len} (shorten it, or start the server "
                           f"with a larger --session-len)", param, "context_length_exceeded")
        return ids

    def max_tokens(self, ids: list[int], asked: int | None) -> int:
        """What was asked for, capped by the room left in session_len."""
        room = self.session_len - len(ids)
        return room if asked is None else min(asked, room)

    async def start(self, prompt, gen_config, request_id: str, endpoint: str,
                    hold: KVHold | None = None) -> AsyncIterator:
        """Queue the request; return its outputs (errors before that map to 400 / 503)."""
        timer = self.metrics.timer(endpoint)          # TTFT counts the time in the queue
        try:
            stream = await self.aeng.add(prompt, gen_config, request_id, hold=hold)
        except QueueFull as e:
            raise APIError(503, str(e), code="queue_full") from None
        except EngineClosed:
            raise APIError(503, "the server is shutting down", code="shutting_down") from None
        except ValueError as e:
            raise bad_request(str(e)) from None
        return self._timed(stream, timer)

    @staticmethod
    async def _timed(stream, timer) -> AsyncIterator:
        """The request's outputs, recording TTFT, inter-token latency and totals; closing it
        early aborts the request."""
        try:
            async for out in stream:
                if out.new_token_ids:
                    timer.token()
                if out.finished:
                    timer.done(out.finish_reason, out.num_prompt_tokens, out.num_prefix_hit_tokens)
                yield out
        finally:
            await stream.aclose()


def usage(out) -> P.Usage:
    n_out = len(out.token_ids)
    return P.Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=n_out,
                   total_tokens=out.num_prompt_tokens + n_out,
                   prompt_tokens_details={"cached_tokens": out.num_prefix_hit_tokens})


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def last_output(outputs: AsyncIterator):
    out = None
    try:
        async for out in outputs:
            pass
    except EngineError as e:
        raise APIError(500, str(e), code="engine_error") from None
    return out


async def unless_disconnected(request: Request, coro):
    """Run `coro`, cancelling it if the client goes away first (then answer 499)."""
    async def wait_disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass
    work, watch = asyncio.ensure_future(coro), asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()                           # its stream's aclose aborts the request
    if work.done() and not work.cancelled():
        return work.result()
    return Response(status_code=499)                # nobody is listening any more


async def event_stream(outputs: AsyncIterator, chunk, include_usage: bool, head: dict | None):
    """SSE events: `head` first (if any), one chunk per new piece of text, usage, [DONE]."""
    if head is not None:
        yield sse(head)
    last = None
    try:
        async for out in outputs:
            last = out
            if out.delta_text or out.finished:
                yield sse(chunk(out))
    except EngineError as e:                         # the status line went out already
        yield sse_error(APIError(500, str(e), code="engine_error"))
        return
    if include_usage and last is not None:
        yield sse(chunk(None) | {"choices": [], "usage": usage(last).model_dump()})
    yield "data: [DONE]\n\n"


def build_app(aeng: AsyncEngine, model_name: str, api_keys=(), allow_origins=(),
              max_sessions: int = 256, session_idle_timeout: float = 3600.0) -> FastAPI:
    from labkit import __version__
    from labkit.serve.interactive import add_interactive_route

    app = FastAPI(title="labkit api_server", version=__version__,
                  description="OpenAI-compatible API over labkit's engine, plus lmdeploy 0.1's "
                              "/v1/chat/interactive sessions.")
    sessions = SessionStore(aeng, max_sessions, session_idle_timeout)
    state = ServerState(aeng, model_name, tuple(api_keys), ServerMetrics(aeng.stats, lambda: len(sessions)),
                        sessions)
    app.state.labkit = state
    install_error_handlers(app)
    if allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)

    @app.get("/health", tags=["server"])
    async def health():
        if not aeng.is_running:
            return JSONResponse({"status": "stopped"}, status_code=503)
        return {"status": "ok", "model": model_name}

    @app.get("/metrics", tags=["server"], response_class=Response)
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    bearer = HTTPBearer(auto_error=False, description="--api-keys: `Authorization: Bearer KEY`")

    async def check_key(cred: HTTPAuthorizationCredentials | None = Depends(bearer)):
        if not state.api_keys:
            return
        if cred is None or not any(secrets.compare_digest(cred.credentials, k) for k in state.api_keys):
            raise APIError(401, "missing or incorrect API key: send `Authorization: Bearer KEY` "
                           "with one of the server's --api-keys", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)], responses=ERRORS, tags=["openai"])

    @v1.get("/models", response_model=P.ModelList)
    async def models():
        return P.ModelList(data=[P.ModelCard(id=model_name, max_model_len=state.session_len)])

    @v1.post("/chat/completions", response_model=P.ChatCompletionResponse)
    async def chat_completions(req: P.ChatCompletionRequest, raw: Request):
        state.check_model(req.model)
        ids = state.chat_ids([m.as_dict() for m in req.messages])
        gc = req.generation_config(state.max_tokens(ids, req.max_completion_tokens or req.max_tokens))
        rid, created = P.new_id("chatcmpl"), int(time.time())
        outputs = await state.start(ids, gc, rid, "chat")
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}
        if req.stream:
            def chunk(out):
                choice = {"index": 0, "delta": {"content": out.delta_text} if out else {},
                          "finish_reason": out.finish_reason if out and out.finished else None,
                          "logprobs": None}
                return base | {"choices": [choice]}
            head = base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None, "logprobs": None}]}
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(event_stream(outputs, chunk, include, head),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        out = await unless_disconnected(raw, last_output(outputs))
        if isinstance(out, Response):
            return out
        return P.ChatCompletionResponse(
            id=rid, created=created, model=model_name, usage=usage(out),
            choices=[P.ChatChoice(message=P.AssistantMessage(content=out.text),
                                  finish_reason=out.finish_reason)])

    @v1.post("/completions", response_model=P.CompletionResponse)
    async def completions(req: P.CompletionRequest, raw: Request):
        state.check_model(req.model)
        ids = state.completion_ids(req.prompt)
        gc = req.generation_config(state.max_tokens(ids, req.max_tokens or 16))  # OpenAI: 16
        rid, created = P.new_id("cmpl"), int(time.time())
        outputs = await state.start(ids, gc, rid, "completions")
        base = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
        if req.stream:
            def chunk(out):
                return base | {"choices": [{"index": 0, "text": out.delta_text if out else "",
                                            "finish_reason": out.finish_reason if out and out.finished
                                            else None, "logprobs": None}]}
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(event_stream(outputs, chunk, include, None),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        out = await unless_disconnected(raw, last_output(outputs))
        if isinstance(out, Response):
            return out
        return P.CompletionResponse(
            id=rid, created=created, model=model_name, usage=usage(out),
            choices=[P.CompletionChoice(text=out.text, finish_reason=out.finish_reason)])

    add_interactive_route(v1, state)
    app.include_router(v1)
    return app

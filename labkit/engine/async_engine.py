"""AsyncEngine: the LLMEngine driven by a background thread, streamed to asyncio callers.

One thread owns the step loop (as LMDeploy's engine loop does); callers on an asyncio event
loop (the API server, the Gradio app) add requests and read their outputs from a queue. A
caller that stops listening (client disconnect, cancelled task) aborts its request, which
frees its KV blocks at once.
"""
from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from labkit.config import GenerationConfig
from labkit.engine.engine import LLMEngine, RequestOutput


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Condition()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="labkit-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the step loop
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self.engine.has_unfinished():
                    self._lock.wait()
                if self._closed:
                    return
                try:
                    outputs = self.engine.step()
                except BaseException as e:          # fail every waiting request, keep serving
                    outputs = self._fail_all(e)
            for out in outputs:
                self._deliver(out)

    def _fail_all(self, err: BaseException) -> list:
        self._error = err
        for rid in list(self._queues):
            self.engine.abort(rid)
            self._deliver_error(rid, err)
        return []

    def _deliver(self, out: RequestOutput) -> None:
        target = self._queues.get(out.request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, out)

    def _deliver_error(self, rid: str, err: BaseException) -> None:
        target = self._queues.get(rid)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, err)

    # ------------------------------------------------------------------ callers
    async def generate(self, prompt, gen_config: GenerationConfig | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; the last one has finished=True. Bad input raises
        ValueError here, before anything is queued."""
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            rid = self.engine.add_request(prompt, gen_config, request_id)
            self._queues[rid] = (loop, q)
            self._lock.notify()
        finished = False
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"engine step failed: {item}") from item
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._queues.pop(rid, None)
                if not finished:                     # the caller went away: free the blocks
                    self.engine.abort(rid)

    def abort(self, request_id: str) -> None:
        with self._lock:
            out = self.engine.abort(request_id)
        if out is not None:
            self._deliver(out)

    def stats(self) -> dict:
        with self._lock:
            return self.engine.stats()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout=10)

"""AsyncEngine: one LLMEngine driven by a background thread, streamed to asyncio callers.

One thread owns the engine and runs its step loop (as LMDeploy's engine loop does). Callers
on any asyncio event loop (the API server, the Gradio app, a notebook) never touch the engine
themselves: they hand it commands (add a request, abort one, let go of held KV) through an
inbox that the thread empties between two steps, and read each request's outputs from an
asyncio queue. So no event loop ever waits for a model step, and one engine serves them all.

    caller (event loop)                          engine thread
    generate() --add--> inbox ---------------->  engine.add_request, then step(), step(), ...
               <-- RequestOutput, one per token - loop.call_soon_threadsafe(queue.put_nowait)
    aclose() / cancel --abort--> inbox -------->  engine.abort: its KV blocks are free at once

Interactive sessions keep their KV between calls: a request added with a `KVHold` has the full
KV blocks of its prompt + answer pinned when it finishes (kv_holds.py), so the session's next
turn finds them in the prefix cache and computes only its new tokens.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import weakref
from concurrent.futures import Future
from typing import AsyncIterator, Callable

from labkit.config import GenerationConfig
from labkit.engine.engine import LLMEngine, RequestOutput
from labkit.engine.kv_holds import KVHold, KVHolds

log = logging.getLogger("labkit")


class QueueFull(RuntimeError):
    """The waiting queue holds max_waiting requests already (the API server answers 503)."""


class EngineClosed(RuntimeError):
    """The AsyncEngine was closed."""


class EngineError(RuntimeError):
    """A model step failed; every request in flight gets this."""


def _put_all(items: list) -> None:
    for q, out in items:
        q.put_nowait(out)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int | None = None,
                 max_held_fraction: float = 0.5):
        self.engine = engine
        self.max_waiting = max_waiting                 # None: no limit on the waiting queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._submit_lock = threading.Lock()
        self._stopped = False                          # no command is accepted any more
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.holds = KVHolds(engine, max_held_fraction)   # sessions' pinned KV (kv_holds.py)
        self._stats = self._collect_stats()
        self._thread = threading.Thread(target=self._loop, name="labkit-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._run_commands(wait=not self.engine.has_unfinished())
                if self._stopped or not self.engine.has_unfinished():
                    continue
                self.holds.make_room()
                try:
                    outputs = self.engine.step()
                except Exception as e:              # fail the requests in flight, keep serving
                    log.exception("engine step failed")
                    self._fail_all(e)
                    continue
                self.holds.on_step(outputs)
                self._stats = self._collect_stats()
                self._deliver_all(outputs)
        finally:
            self._shutdown()

    def _run_commands(self, wait: bool) -> None:
        """Run every queued command; when `wait`, sleep until one arrives first."""
        try:
            item = self._inbox.get() if wait else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, fut, cancellable = item
            # A caller that gave up (a cancelled await) cancels its future. An add is then
            # skipped; an abort or a release runs all the same (that is the point of it).
            gave_up = not fut.set_running_or_notify_cancel()
            if not (gave_up and cancellable):
                try:
                    result = fn()
                except BaseException as e:
                    self._stats = self._collect_stats()
                    None if gave_up else fut.set_exception(e)
                else:                              # stats first: a caller that awaited an
                    self._stats = self._collect_stats()   # abort then reads fresh numbers
                    None if gave_up else fut.set_result(result)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, out: RequestOutput | BaseException, rid: str | None = None) -> None:
        self._deliver_all([out], rid)

    def _deliver_all(self, outs: list, rid: str | None = None) -> None:
        """Hand outputs to their callers' queues: one wake-up per event loop per step, not
        one per token (a step of a 64-request batch makes 64 outputs)."""
        by_loop: dict = {}
        for out in outs:
            key = rid or out.request_id
            done = isinstance(out, BaseException) or out.finished
            target = self._streams.pop(key, None) if done else self._streams.get(key)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:                       # that caller's event loop is gone
                pass

    def _abort(self, rid: str) -> None:
        self.holds.forget(rid)
        out = self.engine.abort(rid)
        if out is not None:
            self._deliver(out)                         # finish_reason "abort" ends the stream
        self._streams.pop(rid, None)

    def _fail_all(self, err: BaseException) -> None:
        for rid in list(self._streams):
            try:
                self.engine.abort(rid)
            except Exception:                          # the engine may be half-way through a step
                log.exception("abort after a failed step")
            self.holds.forget(rid)
            self._deliver(err, rid)
        self._stats = self._collect_stats()

    def _shutdown(self) -> None:
        with self._submit_lock:
            self._stopped = True
        for rid in list(self._streams):                # running requests end with "abort"
            self._abort(rid)
        self.holds.let_go_all()
        while True:                                    # commands that came too late
            try:
                _, fut, _ = self._inbox.get_nowait()
            except queue.Empty:
                break
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineClosed("the engine is closed"))
        self._stats = self._collect_stats()

    def _collect_stats(self) -> dict:
        st = self.engine.stats()
        st["blocks_held"] = self.holds.num_blocks
        st["sessions_holding_kv"] = len(self.holds.holds)
        return st

    # ------------------------------------------------------------------ callers (any thread)
    def _submit(self, fn: Callable, cancellable: bool = False) -> Future:
        """Queue `fn` for the engine thread; its result or exception lands in the future."""
        fut: Future = Future()
        with self._submit_lock:
            if self._stopped:
                raise EngineClosed("the engine is closed")
            self._inbox.put((fn, fut, cancellable))
        return fut

    async def add(self, prompt, gen_config: GenerationConfig | None = None,
                  request_id: str | None = None, *, hold: KVHold | None = None) -> "RequestStream":
        """Queue one request and return its output stream. Bad input raises ValueError, a
        full waiting queue QueueFull, both before anything is queued. With `hold`, the
        request's KV blocks stay pinned in `hold` after it finishes."""
        loop, q = asyncio.get_running_loop(), asyncio.Queue()

        def add() -> str:                              # runs in the engine thread
            if self.max_waiting is not None and len(self.engine.scheduler.waiting) >= self.max_waiting:
                raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests): "
                                f"try again later")
            rid = self.engine.add_request(prompt, gen_config, request_id)
            self._streams[rid] = (loop, q)
            if hold is not None:
                self.holds.watch(rid, hold)
            return rid

        fut = self._submit(add, cancellable=True)
        try:
            rid = await asyncio.wrap_future(fut)
        except asyncio.CancelledError:                 # gone before the request was added
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() is not None
                                  or self.abort(f.result()))
            raise
        return RequestStream(self, rid, q)

    async def generate(self, prompt, gen_config: GenerationConfig | None = None,
                       request_id: str | None = None, *,
                       hold: KVHold | None = None) -> AsyncIterator[RequestOutput]:
        """`add` + iterate: stream one request's outputs; the last has finished=True. A
        caller that stops listening (aclose, cancellation) aborts the request."""
        stream = await self.add(prompt, gen_config, request_id, hold=hold)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    def abort(self, request_id: str) -> Future:
        """Stop a request and free its KV blocks (its stream ends with finish_reason
        "abort"). Returns at once; the returned future completes when it is done."""
        try:
            return self._submit(lambda: self._abort(request_id))
        except EngineClosed:
            fut: Future = Future()
            fut.set_result(None)
            return fut

    def release(self, hold: KVHold) -> Future:
        """Give back the KV blocks a session holds (ending the session)."""
        return self._submit(lambda: self.holds.let_go(hold))

    def is_live(self, request_id: str) -> bool:
        """The request is queued or running (not finished, not aborted)."""
        return request_id in self._streams

    def stats(self) -> dict:
        """Engine stats as of the last step or command (never waits for a step), plus
        blocks_held and sessions_holding_kv."""
        return dict(self._stats)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def close(self, timeout: float = 30) -> None:
        """Abort what runs, let go of held KV and stop the thread."""
        def stop():
            self._stopped = True
        try:
            self._submit(stop)
        except EngineClosed:
            pass
        self._thread.join(timeout=timeout)


class RequestStream:
    """One request's outputs, an async iterator; the last output has finished=True.
    Closing it before the end (aclose, or dropping it) aborts the request, which frees its
    KV blocks."""

    def __init__(self, aeng: AsyncEngine, request_id: str, q: asyncio.Queue):
        self.request_id, self._aeng, self._q = request_id, aeng, q
        self.finished = False
        # A stream dropped unfinished (a task that never started reading it) still aborts.
        self._finalizer = weakref.finalize(self, aeng.abort, request_id)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._q.get()
        if isinstance(item, BaseException):
            self._done()
            raise EngineError(f"engine step failed: {item}") from item
        if item.finished:
            self._done()
        return item

    def _done(self) -> None:
        self.finished = True
        self._finalizer.detach()

    async def aclose(self) -> None:
        """Abort the request unless it finished; returns once its blocks are free."""
        if self.finished:
            return
        self._done()
        try:
            await asyncio.wrap_future(self._aeng.abort(self.request_id))
        except Exception:              # closed: nothing left to abort (a cancellation propagates,
            pass                       # the abort is queued all the same)

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

Interactive sessions keep their KV between calls: a request given a `KVHold` pins the full
KV blocks of its prompt + answer when it finishes (BlockManager.pin_prefix), right after the
step that finished it, before anything can evict them. The next turn re-sends the whole
conversation and finds those blocks in the prefix cache, so only the new tokens (and the
last, partly filled block) are computed. Held blocks count as used, but they never hold up a
request: when one needs them, the oldest holds are let go (their blocks stay cached).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from labkit.config import GenerationConfig
from labkit.engine.engine import LLMEngine, RequestOutput

log = logging.getLogger("labkit")


class QueueFull(RuntimeError):
    """The waiting queue holds max_waiting requests already (the API server answers 503)."""


class EngineClosed(RuntimeError):
    """The AsyncEngine was closed."""


class EngineError(RuntimeError):
    """A model step failed; every request in flight gets this."""


@dataclass(eq=False)
class KVHold:
    """The KV blocks one interactive session keeps between its turns (empty: none held)."""
    blocks: list[int] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)


def _put_all(items: list) -> None:
    for q, out in items:
        q.put_nowait(out)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int | None = None,
                 max_held_fraction: float = 0.5):
        self.engine = engine
        self.max_waiting = max_waiting                 # None: no limit on the waiting queue
        # Sessions may hold at most this many blocks together; the oldest is let go first.
        self.max_held_blocks = int(engine.block_manager.num_blocks * max_held_fraction)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._submit_lock = threading.Lock()
        self._stopped = False                          # no command is accepted any more
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._keep: dict[str, tuple] = {}              # request id -> (Sequence, KVHold)
        self._holds: list[KVHold] = []                 # holding blocks, least recently used first
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
                self._make_room_for_waiting()
                try:
                    outputs = self.engine.step()
                except Exception as e:              # fail the requests in flight, keep serving
                    log.exception("engine step failed")
                    self._fail_all(e)
                    continue
                self._keep_finished_kv(outputs)
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
        self._keep.pop(rid, None)
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
            self._keep.pop(rid, None)
            self._deliver(err, rid)
        self._stats = self._collect_stats()

    def _shutdown(self) -> None:
        with self._submit_lock:
            self._stopped = True
        for rid in list(self._streams):                # running requests end with "abort"
            self._abort(rid)
        for hold in list(self._holds):
            self._let_go(hold)
        while True:                                    # commands that came too late
            try:
                _, fut, _ = self._inbox.get_nowait()
            except queue.Empty:
                break
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineClosed("the engine is closed"))
        self._stats = self._collect_stats()

    # ------------------------------------------------------------------ held KV (sessions)
    def _keep_finished_kv(self, outputs: list[RequestOutput]) -> None:
        bm = self.engine.block_manager
        for out in outputs:
            if not out.finished or out.request_id not in self._keep:
                continue
            seq, hold = self._keep.pop(out.request_id)
            if out.finish_reason == "abort":
                continue                               # the session keeps its previous turn
            new = bm.pin_prefix(seq.token_ids[:seq.num_computed_tokens])  # pin new, then
            bm.unpin(hold.blocks)                      # drop old: shared blocks never go free
            hold.blocks, hold.last_used = new, time.monotonic()
            if hold in self._holds:
                self._holds.remove(hold)
            self._holds.append(hold)
            while self._held_blocks() > self.max_held_blocks and len(self._holds) > 1:
                self._let_go(self._holds[0])
            if self._held_blocks() > self.max_held_blocks:
                self._let_go(hold)                     # one conversation larger than the cap

    def _let_go(self, hold: KVHold) -> None:
        self.engine.block_manager.unpin(hold.blocks)
        hold.blocks = []
        if hold in self._holds:
            self._holds.remove(hold)

    def _held_blocks(self) -> int:
        """Distinct blocks held (sessions that share a prefix, e.g. a system prompt, share blocks)."""
        return len({b for h in self._holds for b in h.blocks})

    def _make_room_for_waiting(self) -> None:
        """Held KV never holds up a request: before a step, let go of the oldest holds while
        a running sequence would be preempted for want of a block, or the next waiting
        request could be admitted but for the blocks (otherwise an engine whose cache is
        full of holds could not run at all)."""
        sched, bm = self.engine.scheduler, self.engine.block_manager
        while self._holds and (self._decode_short(sched, bm) or self._admission_short(sched, bm)):
            log.info("letting go of a session's held KV blocks: a request needs them")
            self._let_go(self._holds[0])

    @staticmethod
    def _decode_short(sched, bm) -> bool:
        growing = sum(1 for s in sched.running if s.blocks_needed() > len(s.block_table))
        return growing > bm.num_free

    @staticmethod
    def _admission_short(sched, bm) -> bool:
        if not sched.waiting or sched.waiting[0].block_table or len(sched.running) >= sched.max_batch_size:
            return False
        reserve = sched.watermark if sched.running else 0
        return not bm.can_allocate(sched.waiting[0], reserve)

    def _collect_stats(self) -> dict:
        st = self.engine.stats()
        st["blocks_held"] = self._held_blocks()
        st["sessions_holding_kv"] = len(self._holds)
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
                self._keep[rid] = (self.engine.seqs[rid], hold)
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
        return self._submit(lambda: self._let_go(hold))

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

"""Held KV: the blocks an interactive session keeps pinned between its turns (AsyncEngine).

A request added with a `KVHold` is watched; when it finishes (not aborted), the full KV blocks
of everything it computed (prompt + answer) are pinned (BlockManager.pin_prefix) right after the
step that finished it, before anything can evict them, and the hold's previous blocks are let
go. The session's next turn re-sends that conversation and finds them in the prefix cache.

Held blocks count as used, but they never hold up a request: before each step, while a running
sequence would be preempted for want of a block, or the next waiting request could be admitted
but for the blocks, the least recently used hold is let go (its blocks stay in the prefix
cache, unpinned). Holds also share a cap (a fraction of the cache).
Everything here runs in the engine thread.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("labkit")


@dataclass(eq=False)
class KVHold:
    """The KV blocks one interactive session keeps between its turns (empty: none held)."""
    blocks: list[int] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)


class KVHolds:
    def __init__(self, engine, max_fraction: float = 0.5):
        self.engine, self.bm = engine, engine.block_manager
        self.max_blocks = int(self.bm.num_blocks * max_fraction)   # all holds together
        self.holds: list[KVHold] = []              # holding blocks, least recently used first
        self._watched: dict[str, tuple] = {}       # request id -> (Sequence, KVHold)

    def watch(self, request_id: str, hold: KVHold) -> None:
        """Keep this (just added) request's KV in `hold` when it finishes."""
        self._watched[request_id] = (self.engine.seqs[request_id], hold)

    def forget(self, request_id: str) -> None:
        self._watched.pop(request_id, None)

    def on_step(self, outputs) -> None:
        """After a step: pin the KV of watched requests that finished in it."""
        for out in outputs:
            if not out.finished or out.request_id not in self._watched:
                continue
            seq, hold = self._watched.pop(out.request_id)
            if out.finish_reason == "abort":
                continue                           # the session keeps its previous turn
            new = self.bm.pin_prefix(seq.token_ids[:seq.num_computed_tokens])  # pin new, then
            self.bm.unpin(hold.blocks)             # drop old: shared blocks never go free
            hold.blocks, hold.last_used = new, time.monotonic()
            if hold in self.holds:
                self.holds.remove(hold)
            self.holds.append(hold)
            while self.num_blocks > self.max_blocks and len(self.holds) > 1:
                self.let_go(self.holds[0])
            if self.num_blocks > self.max_blocks:
                self.let_go(hold)                  # one conversation larger than the cap

    def let_go(self, hold: KVHold) -> None:
        self.bm.unpin(hold.blocks)
        hold.blocks = []
        if hold in self.holds:
            self.holds.remove(hold)

    def let_go_all(self) -> None:
        for hold in list(self.holds):
            self.let_go(hold)

    @property
    def num_blocks(self) -> int:
        """Distinct blocks held (sessions sharing a prefix, e.g. a system prompt, share blocks)."""
        return len({b for h in self.holds for b in h.blocks})

    def make_room(self) -> None:
        """Before a step: let go of the oldest holds while they would hold up a request."""
        sched = self.engine.scheduler
        while self.holds and (self._decode_short(sched) or self._admission_short(sched)):
            log.info("letting go of a session's held KV blocks: a request needs them")
            self.let_go(self.holds[0])

    def _decode_short(self, sched) -> bool:
        growing = sum(1 for s in sched.running if s.blocks_needed() > len(s.block_table))
        return growing > self.bm.num_free

    def _admission_short(self, sched) -> bool:
        if not sched.waiting or sched.waiting[0].block_table or len(sched.running) >= sched.max_batch_size:
            return False
        reserve = sched.watermark if sched.running else 0
        return not self.bm.can_allocate(sched.waiting[0], reserve)

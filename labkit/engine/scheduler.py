"""Scheduler: which sequences run in the next step (continuous batching).

Each step gives every running sequence one decode token and, with what is left of the token
budget (max_prefill_token_num), prefills waiting sequences: new ones, preempted ones, or the
next chunk of a prompt too long for one step (chunked prefill, mixed into decode steps as in
vLLM v1). New requests therefore join the running batch as soon as there is room, without
stopping the others: that is continuous batching.

When a decode step cannot get a block for every running sequence, the most recently admitted
one is preempted by recompute (vLLM's default): its blocks are freed and it goes back to the
front of the queue, to be prefilled again (prompt + what it generated so far) later. A step
that preempted admits nobody, and admission keeps a small watermark of free blocks, so a
preempted request is not readmitted only to be preempted again.

Overlap scheduling (labkit/engine/engine.py): the next step is scheduled while the current
one runs, so a running sequence's last token may still be PENDING (sampled on the device, not
read yet). That changes two things here: a sequence whose pending token is its last by length
is not scheduled again, and a step that would have to preempt is not scheduled ahead at all
(`must_wait`: preemption re-prefills a sequence's tokens, so they must all be known).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from labkit.engine.block_manager import BlockManager
from labkit.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]           # decoding sequences first, then the ones being prefilled
    num_new_tokens: list[int]      # tokens computed this step, per sequence (1 for a decode)
    is_prefill: bool               # any prefill in it (then attention takes the prefill path)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_prefill_token_num: int):
        self.bm = block_manager
        self.max_batch_size = max_batch_size
        self.max_prefill_token_num = max_prefill_token_num
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        # Free blocks kept back when admitting a new request while others run (1%, >= 1).
        self.watermark = max(1, block_manager.num_blocks // 100)

    def add(self, seq: Sequence) -> None:
        assert seq.status is SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ the decision
    def schedule(self) -> ScheduledBatch | None:
        decode, preempted = self._schedule_decode()
        prefill, counts = ([], []) if preempted else \
            self._schedule_prefill(self.max_prefill_token_num - len(decode))
        if not decode and not prefill:
            return None
        return ScheduledBatch(decode + prefill, [1] * len(decode) + counts,
                              is_prefill=bool(prefill), preempted=preempted)

    def must_wait(self) -> bool:
        """With a step in flight: would the next decode step preempt (more running sequences
        need a new block than are free)? Then its tokens must be read before scheduling."""
        need = sum(1 for s in self._decodable() if s.blocks_needed() > len(s.block_table))
        return need > self.bm.num_free

    def _decodable(self) -> list[Sequence]:
        """Running sequences with a token to compute: not those whose pending token is their
        last by length (they finish once it is read)."""
        return [s for s in self.running if not (s.num_pending and s.at_length_limit)]

    def _schedule_decode(self) -> tuple[list[Sequence], list[Sequence]]:
        """One slot for every running sequence, preempting the newest when blocks run out."""
        batch, preempted = [], []
        running = self._decodable()
        while running:
            seq = running.pop(0)
            while not self.bm.can_append(seq):
                victim = running.pop() if running else seq   # newest first (LIFO)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.bm.append_slot(seq)
                batch.append(seq)
        return batch, preempted

    def _schedule_prefill(self, budget: int) -> tuple[list[Sequence], list[int]]:
        """Waiting sequences (FIFO) that fit in `budget` tokens, max_batch_size and the pool."""
        seqs, counts = [], []
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            admitted = bool(seq.block_table)         # a chunked prefill in progress
            if not admitted and len(self.running) + len(seqs) >= self.max_batch_size:
                break
            if not admitted:                         # not started: blocks for all its tokens
                reserve = self.watermark if (self.running or seqs) else 0
                if not self.bm.can_allocate(seq, reserve):
                    break                            # FIFO: later requests wait behind it
                self.bm.allocate(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n
            if n < seq.num_uncomputed_tokens:        # chunked prefill: the rest next step
                break
            self.waiting.popleft()
        return seqs, counts

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.reset_for_recompute()
        # Back to the front, but behind a chunked prefill in progress (it holds blocks).
        k = 0
        while k < len(self.waiting) and self.waiting[k].block_table:
            k += 1
        self.waiting.insert(k, seq)
        self.num_preemptions += 1

    # ------------------------------------------------------------------ after the step
    def postprocess(self, batch: ScheduledBatch) -> None:
        """Advance computed counts, name full blocks, move prefilled sequences to running."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.mark_computed(n)
            self.bm.commit(seq)
            if seq.status is SequenceStatus.WAITING and seq.num_uncomputed_tokens == 0:
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence (finished or aborted) wherever it is, and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.bm.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

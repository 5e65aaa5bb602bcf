"""Scheduler: which sequences run in the next step (continuous batching).

Each step is either a *prefill* step (new or preempted sequences, packed up to
max_prefill_token_num tokens; a prompt longer than that is split into chunks over several
steps) or a *decode* step (one token for every running sequence). Prefill goes first when a
waiting sequence fits, as in nano-vllm and LMDeploy, so new requests join the running batch
as soon as there is room: that is continuous batching.

When a decode step cannot get a block for every running sequence, the most recently admitted
one is preempted by recompute (vLLM's default): its blocks are freed and it goes back to the
front of the queue, to be prefilled again (prompt + what it generated so far) later.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from labkit.engine.block_manager import BlockManager
from labkit.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]      # tokens computed this step, per sequence
    is_prefill: bool
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
        return self._schedule_prefill() or self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch | None:
        seqs, counts, budget = [], [], self.max_prefill_token_num
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
        return ScheduledBatch(seqs, counts, is_prefill=True) if seqs else None

    def _schedule_decode(self) -> ScheduledBatch | None:
        batch, preempted = [], []
        running = list(self.running)
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
        if not batch:
            return None
        return ScheduledBatch(batch, [1] * len(batch), is_prefill=False, preempted=preempted)

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
            if batch.is_prefill and seq.num_uncomputed_tokens == 0:
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

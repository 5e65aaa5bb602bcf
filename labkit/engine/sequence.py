"""Sequence: one request as the engine sees it (token ids, KV blocks, progress, stop state)."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from labkit.config import GenerationConfig


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # needs (more) prefill: new, partly prefilled, or preempted
    RUNNING = "running"      # prompt computed; decoding one token per step
    FINISHED = "finished"


_ids = itertools.count()
PENDING = -1                          # token id of a sampled token not read back yet


@dataclass(eq=False)
class Sequence:
    """Token ids are prompt + output. `num_computed_tokens` of them have K/V in the cache; the
    rest are computed by the next step (the whole prompt at first, one sampled token later)."""

    token_ids: list[int]
    gen_config: GenerationConfig
    block_size: int
    request_id: str = ""
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_prefix_hit_tokens: int = 0    # tokens whose KV came from the prefix cache
    num_preemptions: int = 0
    finish_reason: Optional[str] = None   # "stop" | "length" | "abort"
    generator: Optional[torch.Generator] = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: Optional[float] = None
    stop_ids: tuple = ()              # token ids that end this request (set by the engine)
    stream: bool = True               # an output every step, or only the final one
    kv_epoch: int = 0                 # +1 each time its blocks are freed (preemption, finish)
    num_hashed_blocks: int = 0        # leading full blocks already named for prefix caching
    last_block_hash: Optional[int] = None   # chained hash of the last of those
    rope_len: int = 0                 # dynamic NTK: the length its RoPE base is chosen for (0: off)
    max_tokens: int = 1 << 62         # prompt + output can never exceed this (max_new_tokens,
                                      # session_len): the engine sets it
    num_pending: int = 0              # 1 while its last id is a placeholder (PENDING) for a
                                      # token sampled on the device and not read yet (overlap)

    def __post_init__(self):
        assert len(self.token_ids) > 0, "a sequence needs at least one prompt token"
        assert self.block_size > 0
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def cache_salt(self) -> Optional[int]:
        """Start of its prefix-cache hash chain: keys rotated with a scaled RoPE base must not
        be shared with sequences rotated with another base."""
        return hash(("rope_len", self.rope_len)) if self.rope_len else None

    # ------------------------------------------------------------------ sizes
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """Output ids read back so far (a pending placeholder is not one of them)."""
        return self.token_ids[self.num_prompt_tokens:self.num_tokens - self.num_pending]

    @property
    def at_length_limit(self) -> bool:
        """Its last token (maybe still pending) is its last one: max_new_tokens or session_len."""
        return self.num_tokens >= self.max_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def blocks_needed(self, num_tokens: int | None = None) -> int:
        """Blocks to hold `num_tokens` (default: all current tokens)."""
        n = self.num_tokens if num_tokens is None else num_tokens
        return (n + self.block_size - 1) // self.block_size

    def block_tokens(self, i: int) -> list[int]:
        """Token ids stored in block i of this sequence."""
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]

    # ------------------------------------------------------------------ state changes
    def append_token(self, token_id: int) -> None:
        assert self.status is SequenceStatus.RUNNING, self.status
        assert self.num_computed_tokens == self.num_tokens, "append only after the step computed all tokens"
        self.token_ids.append(int(token_id))

    def append_pending(self) -> None:
        """Overlap scheduling: the step just launched samples this sequence's next token on the
        device; count it now (so the next step can be scheduled) and fill in its id later."""
        self.append_token(PENDING)
        self.num_pending = 1

    def resolve_pending(self, token_id: int) -> None:
        assert self.num_pending == 1 and self.token_ids[-1] == PENDING
        self.token_ids[-1] = int(token_id)
        self.num_pending = 0

    def mark_computed(self, n: int) -> None:
        assert 0 < n <= self.num_uncomputed_tokens, (n, self.num_uncomputed_tokens)
        self.num_computed_tokens += n
        assert len(self.block_table) * self.block_size >= self.num_computed_tokens

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: drop all KV; prompt + output so far are prefilled again."""
        assert not self.block_table, "free the blocks first"
        assert not self.num_pending, "read the pending token first"
        self.num_computed_tokens = 0
        self.num_preemptions += 1
        self.status = SequenceStatus.WAITING

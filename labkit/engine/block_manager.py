"""BlockManager: a fixed pool of KV blocks with reference counts and prefix caching.

Every block holds `block_size` tokens of K/V for every layer. A sequence owns a block table
(list of block ids). Prefix caching (vLLM's automatic prefix caching): a *full, computed*
block is named by a chained hash of (previous block's hash, its token ids), so two requests
sharing a prefix share the same physical blocks. When its last user finishes, a named block
is not wiped: it waits in an LRU list and is reused on a hash hit, or evicted (oldest first)
when a fresh block is needed.

    free  = blocks with ref_count 0 (never-named ones + named ones in the LRU list)
    used  = blocks with ref_count > 0;    cached = named blocks with ref_count 0
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from labkit.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple = ()


def chain_hash(prev: int | None, tokens) -> int:
    return hash((prev, tuple(tokens)))


@dataclass
class BlockStats:
    prefix_cache_queries: int = 0      # full prompt blocks looked up
    prefix_cache_hits: int = 0         # of those, found in the cache
    evictions: int = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))   # unnamed, ref 0
        self.lru: OrderedDict[int, None] = OrderedDict()      # named, ref 0 (oldest first)
        self.hash_to_block: dict[int, int] = {}
        self.stats = BlockStats()

    # ------------------------------------------------------------------ counts
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_ids) + len(self.lru)

    @property
    def num_cached(self) -> int:
        return len(self.lru)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    # ------------------------------------------------------------------ prefix lookup
    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of seq. The last token is never a hit: the
        step must compute at least one token to produce logits (as vLLM does)."""
        if not self.enable_prefix_caching:
            return []
        hits, h = [], seq.cache_salt
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = seq.block_tokens(i)
            h = chain_hash(h, tokens)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tuple(tokens):
                break
            hits.append(bid)
        return hits

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        """Room for all of seq's blocks, leaving `reserve` blocks free for running sequences
        (vLLM's watermark: without it a just-preempted request is readmitted, recomputed and
        preempted again at once)."""
        hits = self._prefix_hits(seq)
        reusable = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # hits now in the LRU
        return self.num_free - reusable - reserve >= seq.blocks_needed() - len(hits)

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        hits = self._prefix_hits(seq)
        self.stats.prefix_cache_queries += (seq.num_tokens - 1) // self.block_size if self.enable_prefix_caching else 0
        self.stats.prefix_cache_hits += len(hits)
        for bid in hits:
            self._take(bid)
        seq.block_table = list(hits)
        while len(seq.block_table) < seq.blocks_needed():
            seq.block_table.append(self._take(self._fresh_block_id()))
        seq.num_computed_tokens = seq.num_prefix_hit_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        seq.last_block_hash = self.blocks[hits[-1]].hash if hits else seq.cache_salt

    def can_append(self, seq: Sequence) -> bool:
        return seq.blocks_needed() <= len(seq.block_table) or self.num_free > 0

    def append_slot(self, seq: Sequence) -> None:
        """Make room for the token the next decode step writes."""
        if seq.blocks_needed() > len(seq.block_table):
            seq.block_table.append(self._take(self._fresh_block_id()))
        assert seq.blocks_needed() == len(seq.block_table)

    def commit(self, seq: Sequence) -> None:
        """After a step: name the sequence's newly full, computed blocks for prefix caching.
        Incremental: only blocks filled since the last commit are hashed (the chain continues
        from `seq.last_block_hash`), so a decode step costs O(1) per sequence, not O(length)."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        h = seq.last_block_hash
        for i in range(seq.num_hashed_blocks, full):
            tokens = tuple(seq.block_tokens(i))
            h = chain_hash(h, tokens)
            block = self.blocks[seq.block_table[i]]
            # a shared/renamed block or a duplicate of a cached one keeps the first name
            if block.hash is None and h not in self.hash_to_block:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block[h] = block.block_id
        seq.num_hashed_blocks, seq.last_block_hash = full, h

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks (finish, abort or preemption). Tail blocks go into the
        LRU first, so they are evicted before the shared prefix blocks."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            assert block.ref_count > 0, f"double free of block {bid}"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self.lru[bid] = None
                else:
                    self.free_ids.append(bid)
        seq.block_table = []
        seq.kv_epoch += 1
        seq.num_hashed_blocks, seq.last_block_hash = 0, seq.cache_salt

    def pin_prefix(self, token_ids) -> list[int]:
        """Take a reference on the cached full blocks that hold a prefix of `token_ids`, so no
        eviction can take them (an interactive session keeps its KV between turns this way).
        Returns the block ids now held; give them back with `unpin`."""
        held, h = [], None
        if not self.enable_prefix_caching:
            return held
        for i in range(len(token_ids) // self.block_size):
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = chain_hash(h, tokens)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            held.append(self._take(bid))
        return held

    def unpin(self, block_ids: list[int]) -> None:
        """Drop the references `pin_prefix` took; blocks nobody else uses go to the LRU list
        (still cached, so a later request with that prefix can still hit them)."""
        for bid in reversed(block_ids):
            block = self.blocks[bid]
            assert block.ref_count > 0, f"unpin of unused block {bid}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.lru[bid] = None     # pinned blocks are named: they were found by hash

    def reset_prefix_cache(self) -> int:
        """Forget every cached (unused) block, e.g. to measure without prefix hits. Returns
        how many were dropped; blocks in use keep their names."""
        n = len(self.lru)
        while self.lru:
            bid, _ = self.lru.popitem(last=False)
            block = self.blocks[bid]
            del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
            self.free_ids.append(bid)
        return n

    # ------------------------------------------------------------------ internals
    def _fresh_block_id(self) -> int:
        if self.free_ids:
            return self.free_ids.popleft()
        if not self.lru:
            raise RuntimeError("KV cache exhausted: no free block (the scheduler should have preempted)")
        bid, _ = self.lru.popitem(last=False)      # evict the least recently used cached block
        block = self.blocks[bid]
        del self.hash_to_block[block.hash]
        block.hash, block.token_ids = None, ()
        self.stats.evictions += 1
        return bid

    def _take(self, bid: int) -> int:
        block = self.blocks[bid]
        if block.ref_count == 0:
            self.lru.pop(bid, None)
        block.ref_count += 1
        return bid

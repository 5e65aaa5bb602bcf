"""Assignment 1: the KV block manager (paged KV cache bookkeeping with prefix caching).

The KV cache is a pool of `num_blocks` blocks of `block_size` token slots each. A sequence
owns a *block table*: the ids of its blocks, in order (token p lives in block
`block_table[p // block_size]`). This class decides which block ids a sequence gets; the
model runner turns block tables into slot numbers and the kernels read/write those slots.

Your class is plugged into the real engine: LLMEngine builds
`BlockManager(num_blocks, block_size, enable_prefix_caching)` and its Scheduler calls
`can_allocate`, `allocate`, `can_append`, `append_slot`, `commit` and `free` (the interface of
labkit/engine/block_manager.py). The grader compares your class with labkit's on random
traces (counts of free/used/cached blocks, computed tokens, prefix-cache hits) and runs the
engine with it: the generated tokens must be the same.

State (given, do not rename: the grader and the engine read it):
    blocks[i]       Block(block_id=i, ref_count, hash, token_ids)
    free_ids        deque of unnamed blocks with ref_count 0; take from the LEFT, give back on
                    the RIGHT (FIFO)
    lru             OrderedDict of *named* blocks with ref_count 0, oldest first: a finished
                    sequence's full blocks stay cached here until reused or evicted
    hash_to_block   {chained hash: block id} of every named block
    stats           BlockStats: prefix_cache_queries, prefix_cache_hits, evictions

    free = len(free_ids) + len(lru)     used = ref_count > 0     cached = len(lru)

Prefix caching (vLLM's automatic prefix caching): a full, computed block is *named* by
`chain_hash(previous block's name, its token ids)`, so block i's name depends on all tokens
0 .. (i+1)*block_size - 1. A new sequence whose leading full blocks have names in
`hash_to_block` (and the same token ids) shares those physical blocks instead of recomputing
them.

Sequence fields you use (labkit/engine/sequence.py): token_ids, num_tokens, block_table,
blocks_needed(), block_tokens(i), num_computed_tokens, num_prefix_hit_tokens,
num_hashed_blocks, last_block_hash.

Regions:  1.1 allocate (_fresh_block_id, can_allocate, allocate)   1.2 free
          1.3 append (can_append, append_slot)                      1.4 prefix hash
          (chain_hash, _prefix_hits, commit).  1.1-1.3 are graded with prefix caching off,
          1.4 with it on (so 1.4's tests also use your 1.1-1.3).
Check locally: `labkit grade -k a1` (see homework/README.md).
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from labkit.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None          # its name, once full and computed (prefix caching)
    token_ids: tuple = ()            # the tokens it holds, kept with the name (to verify a hit)


@dataclass
class BlockStats:
    prefix_cache_queries: int = 0    # full prompt blocks looked up by allocate()
    prefix_cache_hits: int = 0       # of those, found in the cache and shared
    evictions: int = 0               # cached blocks renamed to serve a fresh block


def chain_hash(prev: int | None, tokens) -> int:
    """The name of a block: a hash of (the previous block's name, this block's token ids).

    prev: None for the first block, else an int from an earlier call. tokens: a sequence of
    ints. Returns an int. Must be deterministic (same inputs, same int, in every process:
    the built-in hash() of a tuple of ints and None is; of a str is not) and, for practical
    purposes, different whenever prev or tokens differ.
    """
    # BEGIN ASSIGN 1.4
    raise NotImplementedError("ASSIGN 1.4: chain_hash")
    # END ASSIGN 1.4


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.hash_to_block: dict[int, int] = {}
        self.stats = BlockStats()

    # ------------------------------------------------------------------ counts (given)
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

    # ------------------------------------------------------------------ 1.1 allocate
    def _fresh_block_id(self) -> int:
        """An unused block id for new tokens. Take the leftmost of `free_ids`; if there is
        none, evict the least recently used cached block (the first of `lru`): forget its
        name (remove it from hash_to_block, set its hash None and token_ids ()) and count an
        eviction. Neither: raise RuntimeError (the scheduler should have preempted). The
        returned block is not yet taken: call `_take` on it."""
        # BEGIN ASSIGN 1.1
        raise NotImplementedError("ASSIGN 1.1: _fresh_block_id")
        # END ASSIGN 1.1

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        """Could `allocate(seq)` succeed while leaving `reserve` blocks free?

        Blocks needed = seq.blocks_needed() minus the prefix hits (`self._prefix_hits(seq)`);
        blocks available = num_free minus the hits that sit in the LRU list (taking a hit
        from the LRU uses up a free block without giving fresh room) minus `reserve`."""
        # BEGIN ASSIGN 1.1
        raise NotImplementedError("ASSIGN 1.1: can_allocate")
        # END ASSIGN 1.1

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence (empty block table, nothing computed) blocks for all its
        tokens. The prefix hits come first (each `_take`n, so shared), then fresh blocks.

        Afterwards: len(seq.block_table) == seq.blocks_needed();
        seq.num_computed_tokens == seq.num_prefix_hit_tokens == hits * block_size;
        seq.num_hashed_blocks == hits; seq.last_block_hash == the name of the last hit (None
        without hits). Stats: prefix_cache_queries += (num_tokens - 1) // block_size when
        prefix caching is on; prefix_cache_hits += hits."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        # BEGIN ASSIGN 1.1
        raise NotImplementedError("ASSIGN 1.1: allocate")
        # END ASSIGN 1.1

    # ------------------------------------------------------------------ 1.2 free
    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks (it finished, was aborted or preempted).

        Walk the block table from the LAST block to the first (so tail blocks enter the LRU
        first and are evicted before the shared prefix blocks): decrement each ref_count; a
        block reaching 0 goes to the end of `lru` if it is named, else to the right of
        `free_ids`. A block whose ref_count is already 0 is a double free: raise
        (AssertionError or RuntimeError), before changing anything for that block."""
        # BEGIN ASSIGN 1.2
        raise NotImplementedError("ASSIGN 1.2: free")
        # END ASSIGN 1.2
        seq.block_table = []
        seq.kv_epoch += 1                # the model runner rewrites this sequence's table row
        seq.num_hashed_blocks, seq.last_block_hash = 0, None

    # ------------------------------------------------------------------ 1.3 append
    def can_append(self, seq: Sequence) -> bool:
        """Room for the token the next decode step writes: True when its block table already
        covers seq.num_tokens tokens, or when a fresh block can be had (num_free > 0)."""
        # BEGIN ASSIGN 1.3
        raise NotImplementedError("ASSIGN 1.3: can_append")
        # END ASSIGN 1.3

    def append_slot(self, seq: Sequence) -> None:
        """Before a decode step: if the block table covers fewer than seq.num_tokens tokens,
        append one fresh block (`_take(_fresh_block_id())`). Afterwards
        len(seq.block_table) == seq.blocks_needed()."""
        # BEGIN ASSIGN 1.3
        raise NotImplementedError("ASSIGN 1.3: append_slot")
        # END ASSIGN 1.3

    # ------------------------------------------------------------------ 1.4 prefix hash
    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of seq: for i = 0, 1, ... over the FULL
        blocks, chain the hash (h = chain_hash(h, seq.block_tokens(i))), look it up in
        hash_to_block, and stop at the first miss or when the found block's token_ids differ
        (a hash collision). Only the first (num_tokens - 1) // block_size blocks are looked
        up: the last token is never a hit (the step must compute at least one token to get
        logits)."""
        if not self.enable_prefix_caching:
            return []
        # BEGIN ASSIGN 1.4
        raise NotImplementedError("ASSIGN 1.4: _prefix_hits")
        # END ASSIGN 1.4

    def commit(self, seq: Sequence) -> None:
        """After a step: name the sequence's newly full, computed blocks.

        Blocks seq.num_hashed_blocks .. seq.num_computed_tokens // block_size - 1 are new:
        continue the chain from seq.last_block_hash. A block gets the name (block.hash,
        block.token_ids, hash_to_block[h]) only if it has none yet and no other block owns
        that name. Then set seq.num_hashed_blocks and seq.last_block_hash to the new end of
        the chain (even for blocks that kept another name). Incremental: never rehash the
        blocks already done, so a decode step costs O(1), not O(length)."""
        if not self.enable_prefix_caching:
            return
        # BEGIN ASSIGN 1.4
        raise NotImplementedError("ASSIGN 1.4: commit")
        # END ASSIGN 1.4

    # ------------------------------------------------------------------ given
    def reset_prefix_cache(self) -> int:
        """Forget every cached (unused) block; returns how many were dropped."""
        n = len(self.lru)
        while self.lru:
            bid, _ = self.lru.popitem(last=False)
            block = self.blocks[bid]
            del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
            self.free_ids.append(bid)
        return n

    def _take(self, bid: int) -> int:
        """One more user of block `bid` (leaving the LRU list if it was cached there)."""
        block = self.blocks[bid]
        if block.ref_count == 0:
            self.lru.pop(bid, None)
        block.ref_count += 1
        return bid

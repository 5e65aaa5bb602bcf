"""A step's inputs: built on the host with numpy, uploaded to the device in one copy.

For a scheduled batch of B sequences computing N tokens in all (vLLM's names):

    input_ids     (N,)   the tokens computed this step, all sequences packed
    positions     (N,)   each token's absolute position (RoPE)
    slot_mapping  (N,)   the cache slot each token's K/V is written to (-1: padding, skipped)
    context_lens  (B,)   tokens in the cache after this step
    cu_seqlens_q  (B+1,) where each sequence's tokens start in input_ids (prefill)
    logits_rows   (S,)   rows of the hidden states whose logits are needed (last token of
                         every sequence that samples now)
    rope_lens     (N,)   each token's sequence rope length (dynamic NTK, labkit/layers/rotary.py;
                         written only in a step that has a scaled sequence)
    block_tables  (B, W) each sequence's blocks, W = blocks of a full session

All of it is int32 and lives in ONE pinned host buffer mirrored by ONE device buffer, each
field at a fixed offset. A step is one host->device copy of the used prefix, and every field
is a view at a fixed address: what a CUDA graph needs (it replays reading the same addresses).

With overlap scheduling the host fills step k+1 while step k runs: `fill_step` first waits
for step k's upload to have left the pinned buffer (it is the first thing step k does on the
device), and the rows whose input is step k's still-unread token (PENDING) are listed in
`StepInputs.pending_rows` and written by `write_pending_ids` once that token is read.

Host cost per step is O(tokens) numpy writes, plus O(new block-table entries): a sequence's
row of the block table is rewritten only when its blocks changed (`kv_epoch`, new blocks).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from labkit.layers.attention import AttentionMetadata


@dataclass
class StepInputs:
    """Host-side description of one step (picklable: tensor-parallel ranks receive it)."""
    is_prefill: bool
    num_seqs: int              # B real sequences (a CUDA graph pads to its bucket)
    num_tokens: int            # N
    max_seqlen_q: int
    logits_rows: list[int]     # (S,) rows whose logits are needed
    sample_seq_index: list[int]  # (S,) which of the B sequences each logits row belongs to
    rope_scaled: bool = False  # a sequence with its own RoPE base: rope_lens is written
    pending_rows: tuple = ()   # rows whose input id is a PENDING token (decode rows, < B)


class StepBuffers:
    """The persistent int32 host/device buffers and the field offsets inside them."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device):
        self.max_tokens, self.max_seqs, self.width = max_tokens, max_seqs, max_blocks
        self.device = device
        # rope_lens first: a step without a scaled sequence copies from input_ids on;
        # block_tables last: its used part is the first B rows
        sizes = {"rope_lens": max_tokens, "input_ids": max_tokens, "positions": max_tokens,
                 "slot_mapping": max_tokens, "context_lens": max_seqs, "cu_seqlens_q": max_seqs + 1,
                 "logits_rows": max_seqs, "block_tables": max_seqs * max_blocks}
        self.offset, off = {}, 0
        for name, n in sizes.items():
            self.offset[name], off = off, off + n
        self.total = off
        pin = device.type == "cuda"
        self.host_t = torch.zeros(off, dtype=torch.int32, pin_memory=pin)   # (total,)
        self.host = self.host_t.numpy()                                      # same memory
        self.dev = self.host_t if device.type == "cpu" else torch.zeros(off, dtype=torch.int32,
                                                                         device=device)
        self.tables = self.host[self.offset["block_tables"]:].reshape(max_seqs, max_blocks)
        self._row_key: list = [None] * max_seqs    # (seq_id, kv_epoch) whose row is written
        self._row_len = [0] * max_seqs             # block-table entries written in that row
        self._uploaded = torch.cuda.Event() if pin else None   # the last upload has left `host`

    # ------------------------------------------------------------------ host side
    def field(self, name: str, n: int) -> np.ndarray:
        o = self.offset[name]
        return self.host[o:o + n]

    def write_tables(self, seqs) -> None:
        """Row i of the block table := seqs[i].block_table (only what changed is written)."""
        for i, seq in enumerate(seqs):
            key, bt = (seq.seq_id, seq.kv_epoch), seq.block_table
            start = self._row_len[i] if self._row_key[i] == key else 0
            if start < len(bt):
                self.tables[i, start:len(bt)] = bt[start:]
            self._row_key[i], self._row_len[i] = key, len(bt)

    def used(self, num_rows: int, rope_scaled: bool = False) -> slice:
        """The part of the buffer a step reads: through its first `num_rows` block-table rows,
        from rope_lens on only when some sequence has a rope length."""
        start = 0 if rope_scaled else self.offset["input_ids"]
        return slice(start, self.offset["block_tables"] + num_rows * self.width)

    def upload(self, num_rows: int, rope_scaled: bool = False) -> None:
        """Copy the step's used part (`used`) to the device."""
        if self.dev is self.host_t:
            return
        part = self.used(num_rows, rope_scaled)
        self.dev[part].copy_(self.host_t[part], non_blocking=True)
        self._uploaded.record()

    def wait_uploaded(self) -> None:
        """Before writing `host`: the previous step's asynchronous upload has read it."""
        if self._uploaded is not None:
            self._uploaded.synchronize()

    # ------------------------------------------------------------------ device views
    def view(self, name: str, n: int) -> torch.Tensor:
        o = self.offset[name]
        return self.dev[o:o + n]

    def metadata(self, is_prefill: bool, num_seqs: int, num_tokens: int, max_seqlen_q: int,
                 decode_splits: int | None = None, rope_scaled: bool = False) -> AttentionMetadata:
        o = self.offset["block_tables"]
        tables = self.dev[o:o + num_seqs * self.width].view(num_seqs, self.width)  # (B, W)
        return AttentionMetadata(
            is_prefill=is_prefill,
            slot_mapping=self.view("slot_mapping", num_tokens),
            block_tables=tables,
            context_lens=self.view("context_lens", num_seqs),
            cu_seqlens_q=self.view("cu_seqlens_q", num_seqs + 1) if is_prefill else None,
            max_seqlen_q=max_seqlen_q, decode_splits=decode_splits,
            rope_lens=self.view("rope_lens", num_tokens) if rope_scaled else None)


def fill_step(buf: StepBuffers, seqs, num_new_tokens, is_prefill: bool, pad_to: int = 0,
              rope_scaled: bool = False) -> StepInputs:
    """Write a batch's inputs into the host buffer; rows past B up to `pad_to` are padding
    (slot -1, context 0: the kernels skip them). `rope_scaled`: some sequence has a rope
    length, so rope_lens is written. Returns the step's host-side summary."""
    buf.wait_uploaded()
    B, bs = len(seqs), seqs[0].block_size
    rows = max(B, pad_to)
    N = sum(num_new_tokens) if is_prefill else B
    ids, pos, slots = (buf.field(f, max(N, rows)) for f in ("input_ids", "positions", "slot_mapping"))
    ctx, cu = buf.field("context_lens", rows), buf.field("cu_seqlens_q", B + 1)
    logits_rows, sample_idx = [], []
    if not is_prefill:                                   # decode: one token per sequence
        for i, seq in enumerate(seqs):
            p = seq.num_computed_tokens                  # == num_tokens - 1
            ids[i], pos[i], ctx[i] = seq.token_ids[p], p, p + 1
            slots[i] = seq.block_table[p // bs] * bs + p % bs
        logits_rows = sample_idx = list(range(B))
        if rows > B:
            ids[B:rows], pos[B:rows], slots[B:rows], ctx[B:rows] = 0, 0, -1, 0
    else:
        t = 0
        cu[0] = 0
        for i, (seq, n) in enumerate(zip(seqs, num_new_tokens)):
            start = seq.num_computed_tokens
            p = np.arange(start, start + n, dtype=np.int64)                  # (n,)
            table = np.asarray(seq.block_table, dtype=np.int64)
            ids[t:t + n] = seq.token_ids[start:start + n]
            pos[t:t + n] = p
            slots[t:t + n] = table[p // bs] * bs + p % bs
            ctx[i] = start + n
            t += n
            cu[i + 1] = t
            if n == seq.num_uncomputed_tokens:                                # prompt complete
                logits_rows.append(t - 1)
                sample_idx.append(i)
    buf.field("logits_rows", len(logits_rows))[:] = logits_rows
    if rope_scaled:                    # each token gets its sequence's rope length
        lens = buf.field("rope_lens", N)
        n_tok = [1] * B if not is_prefill else num_new_tokens
        lens[:] = np.repeat([seq.rope_len for seq in seqs], n_tok)
    pending = tuple(np.flatnonzero(ids[:N] < 0).tolist())   # PENDING inputs (decode rows)
    buf.write_tables(seqs)
    if rows > B:                       # padding rows of a graph bucket must not read stale ids
        buf.tables[B:rows, :1] = 0
        for i in range(B, rows):
            buf._row_key[i] = None
    return StepInputs(is_prefill, B, N, max(num_new_tokens), logits_rows, sample_idx, rope_scaled,
                      pending)


def write_pending_ids(buf: StepBuffers, step: StepInputs, seqs) -> None:
    """Once the previous step's tokens are read: the input id of each PENDING row. Decode
    sequences come first in a batch and compute one token each, so row r is seqs[r]'s."""
    ids, pos = buf.field("input_ids", step.num_tokens), buf.field("positions", step.num_tokens)
    for r in step.pending_rows:
        ids[r] = seqs[r].token_ids[pos[r]]
        assert ids[r] >= 0, f"row {r}: its input token was never read"

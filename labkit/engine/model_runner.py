"""ModelRunner: turns a scheduled batch into tensors, runs the model, samples.

For a batch of sequences it builds (vLLM's names):
    input_ids     (N,)  the tokens computed this step, all sequences packed
    positions     (N,)  each token's absolute position (RoPE)
    slot_mapping  (N,)  the cache slot each token's K/V is written to
    block_tables  (B, max_blocks)  each sequence's blocks, padded with -1
    context_lens  (B,)  tokens in cache after this step
    cu_seqlens_q  (B+1,)  prefill only: where each sequence's tokens start in input_ids
The inputs are copied into buffers allocated once (sized for the largest step), so their
addresses stay fixed between steps, which CUDA graphs need.
"""
from __future__ import annotations

import logging

import torch

from labkit.config import EngineConfig, ModelConfig
from labkit.engine.kv_cache import KVCachePlan, allocate_kv_cache
from labkit.engine.sampler import SampleRow, Sampler
from labkit.engine.scheduler import ScheduledBatch
from labkit.layers.attention import AttentionMetadata
from labkit.layers.backend import make_backend

log = logging.getLogger("labkit")


class InputBuffers:
    """Step inputs that stay allocated between steps (int32 except ids/positions/slots)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device):
        def buf(n, dtype=torch.int64, *more):
            return torch.zeros((n, *more), dtype=dtype, device=device)
        self.input_ids = buf(max_tokens)                                  # (N_max,)
        self.positions = buf(max_tokens)                                  # (N_max,)
        self.slot_mapping = buf(max_tokens)                               # (N_max,)
        self.block_tables = buf(max_seqs, torch.int32, max_blocks)        # (B_max, M)
        self.context_lens = buf(max_seqs, torch.int32)                    # (B_max,)
        self.cu_seqlens_q = buf(max_seqs + 1, torch.int32)                # (B_max+1,)
        self.logits_index = buf(max_seqs)                                 # (B_max,)

    @staticmethod
    def fill(dst: torch.Tensor, values) -> torch.Tensor:
        """Copy host values into the front of a persistent buffer; return that view."""
        src = torch.as_tensor(values, dtype=dst.dtype)
        view = dst[:src.shape[0]]
        view.copy_(src, non_blocking=True)
        return view


class ModelRunner:
    def __init__(self, model, cfg: ModelConfig, ec: EngineConfig, plan: KVCachePlan,
                 device: torch.device, dtype: torch.dtype):
        self.model, self.cfg, self.ec, self.plan = model, cfg, ec, plan
        self.device, self.dtype = device, dtype
        self.block_size = plan.block_size
        self.kv_cache = allocate_kv_cache(cfg, plan, ec.tp, device, dtype)
        self.backend = make_backend(ec.attention_backend, device)
        model.set_backend(self.backend)
        for layer, (k_cache, v_cache) in zip(model.layers, self.kv_cache):
            layer.attention.attn.k_cache, layer.attention.attn.v_cache = k_cache, v_cache
        max_blocks = -(-ec.session_len // plan.block_size)
        max_tokens = max(ec.max_prefill_token_num, ec.max_batch_size)
        self.buffers = InputBuffers(max_tokens, ec.max_batch_size, max_blocks, device)
        self.sampler = Sampler()

    # ------------------------------------------------------------------ inputs
    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Build this step's tensors. Returns ids, positions, metadata and, per sequence, the
        row of its last token (the only one whose logits are needed)."""
        ids, pos, slots, ctx, cu, last = [], [], [], [], [0], []
        bs = self.block_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens                 # first token computed now
            for p in range(start, start + n):
                slots.append(seq.block_table[p // bs] * bs + p % bs)
            ids.extend(seq.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            ctx.append(start + n)
            cu.append(cu[-1] + n)
            last.append(cu[-1] - 1)
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [-1] * (width - len(s.block_table)) for s in batch.seqs]
        b = self.buffers
        tables_view = b.block_tables[:len(tables), :width]
        tables_view.copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)
        md = AttentionMetadata(
            is_prefill=batch.is_prefill,
            slot_mapping=b.fill(b.slot_mapping, slots),
            block_tables=tables_view,
            context_lens=b.fill(b.context_lens, ctx),
            cu_seqlens_q=b.fill(b.cu_seqlens_q, cu) if batch.is_prefill else None,
            max_seqlen_q=max(batch.num_new_tokens))
        return b.fill(b.input_ids, ids), b.fill(b.positions, pos), md, last

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> dict[int, int]:
        """Run one step. Returns {seq_id: sampled token} for the sequences that sample now
        (all decodes; prefills whose prompt is complete after this chunk)."""
        input_ids, positions, md, last = self.prepare(batch)
        hidden = self.model(input_ids, positions, md)                      # (N, H)
        sampling = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
                    if n == s.num_uncomputed_tokens]                       # prompt done / decode
        if not sampling:
            return {}
        rows_idx = self.buffers.fill(self.buffers.logits_index, [last[i] for i in sampling])
        logits = self.model.compute_logits(hidden[rows_idx])              # (S, V) float32
        rows = [self._sample_row(batch.seqs[i]) for i in sampling]
        tokens = self.sampler(logits, rows).tolist()                       # (S,)
        return {batch.seqs[i].seq_id: t for i, t in zip(sampling, tokens)}

    def _sample_row(self, seq) -> SampleRow:
        gc = seq.gen_config
        banned = ()
        if seq.num_output_tokens < gc.min_new_tokens:                      # no stop before min
            banned = seq.stop_ids
        return SampleRow(config=gc, generator=seq.generator, token_ids=seq.token_ids,
                         banned_ids=banned)

"""ModelRunner: turns a scheduled batch into tensors, runs the model, samples.

    launch(batch) = prepare (host: numpy into the step buffer, one upload)
                  -> forward (device: a captured CUDA graph for decode, eager otherwise)
                  -> sample  (argmax or the full sampler, into a device tensor)
                  -> start copying the tokens to the host; returns without waiting
    collect(step) = wait for that copy: the one device->host sync of a step
    run(batch)    = collect(launch(batch))

Between the two the host is free to schedule and prepare the next step (overlap scheduling,
labkit/engine/engine.py); `launch(batch, before_upload=...)` calls back once the host buffer
is written, so the previous step's tokens are read as late as possible.

The KV cache tensors are allocated here and handed to each layer's Attention. On CUDA the
Triton backend is chosen (EngineConfig.attention_backend="auto") and decode steps replay CUDA
graphs (labkit/engine/cuda_graphs.py) unless EngineConfig.enforce_eager is set. On CPU the
same code runs the PyTorch references eagerly.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from labkit.config import EngineConfig, ModelConfig
from labkit.engine.cuda_graphs import DecodeGraphs, graph_buckets
from labkit.engine.kv_cache import KVCachePlan, allocate_kv_cache
from labkit.engine.sampler import SampleRow, Sampler
from labkit.engine.scheduler import ScheduledBatch
from labkit.engine.step_inputs import StepBuffers, StepInputs, fill_step, write_pending_ids
from labkit.layers.backend import make_backend

log = logging.getLogger("labkit")


@dataclass(frozen=True)
class StepHeader:
    """What a rank needs, besides the step buffer, to run a step's forward (tensor parallel:
    rank 0 sends it to the other ranks with the used part of the buffer)."""
    is_prefill: bool
    num_seqs: int              # B
    num_tokens: int            # N
    max_seqlen_q: int
    num_logits_rows: int       # S
    bucket: int = 0            # decode CUDA graph replayed (0: eager)
    rope_scaled: int = 0       # 1: a sequence has its own RoPE base (eager, rope_lens read)

    @property
    def num_rows(self) -> int:
        """Block-table rows in use (a graph bucket pads B up to its size)."""
        return self.bucket or self.num_seqs


@dataclass(eq=False)
class LaunchedStep:
    """A step whose sampled tokens are on their way to the host."""
    batch: ScheduledBatch
    seqs: list                 # (S,) the sequences that sample this step
    tokens: object = None      # (S,) device tensor until collected, then a list of ints
    ready: object = None       # CUDA event recorded after the copy to `host` (None on CPU)
    host: object = None        # pinned host tensor the tokens are copied into
    collected: bool = field(default=False)


class ModelRunner:
    def __init__(self, model, cfg: ModelConfig, ec: EngineConfig, plan: KVCachePlan,
                 device: torch.device, dtype: torch.dtype):
        self.model, self.cfg, self.ec, self.plan = model, cfg, ec, plan
        self.device, self.dtype = device, dtype
        self.kv_cache = allocate_kv_cache(cfg, plan, ec.tp, device, dtype,
                                          rank=getattr(model, "rank", 0))
        self.backend = make_backend(ec.attention_backend, device)
        model.set_backend(self.backend)
        for layer, (k_cache, v_cache) in zip(model.layers, self.kv_cache):
            layer.attention.attn.k_cache, layer.attention.attn.v_cache = k_cache, v_cache
        max_blocks = -(-ec.session_len // plan.block_size)
        max_tokens = max(ec.max_prefill_token_num, ec.max_batch_size)
        self.buffers = StepBuffers(max_tokens, ec.max_batch_size, max_blocks, device)
        self.sampler = Sampler()
        # (2, max B) pinned: sampled ids land here, alternating, so a step's copy never
        # overwrites the previous step's tokens before they are read
        self._tokens_host = (torch.empty(2, ec.max_batch_size, dtype=torch.long, pin_memory=True)
                             if device.type == "cuda" else None)
        self._num_launched = 0
        self.graphs = None
        self.prepare_seconds = 0.0        # host time building step inputs, summed over steps
        self.tp_group = None              # rank 0 at tp > 1: labkit/engine/tp_group.py sets it
        if device.type == "cuda" and not ec.enforce_eager and self.backend.name == "triton":
            self.graphs = DecodeGraphs(self._decode_forward, graph_buckets(ec.max_batch_size))
            self._padding_inputs()
            self.graphs.capture()

    # ------------------------------------------------------------------ the step
    def run(self, batch: ScheduledBatch) -> dict[int, int]:
        """Run one step and wait for it. Returns {seq_id: sampled token} for the sequences that
        sample now (all decodes; prefills whose prompt is complete after this chunk)."""
        step = self.launch(batch)
        return {s.seq_id: t for s, t in zip(step.seqs, self.collect(step))}

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, before_upload=None) -> LaunchedStep:
        """prepare -> forward -> sample -> start the tokens' copy to the host; no sync.
        `before_upload()` runs once the host has written the step (it reads the previous
        step's tokens: rows whose input is one of them are written after it returns)."""
        step, logits = self.execute(batch.seqs, batch.num_new_tokens, batch.is_prefill,
                                    before_upload)
        seqs = [batch.seqs[i] for i in step.sample_seq_index]
        out = LaunchedStep(batch, seqs)
        if not seqs:
            out.tokens, out.collected = [], True
            return out
        tokens = self.sampler(logits, [self._sample_row(s) for s in seqs])   # (S,) on the device
        if self._tokens_host is None:                                        # CPU: already here
            out.tokens = tokens
            return out
        self._num_launched += 1
        out.host = self._tokens_host[self._num_launched % 2, :len(seqs)]
        out.host.copy_(tokens, non_blocking=True)
        out.ready = torch.cuda.Event()
        out.ready.record()
        return out

    def collect(self, step: LaunchedStep) -> list[int]:
        """The step's sampled tokens (S,) as ints, in `step.seqs` order: waits for the GPU."""
        if not step.collected:
            if step.ready is not None:
                step.ready.synchronize()
                step.tokens = step.host.tolist()
            else:
                step.tokens = step.tokens.tolist()
            step.collected = True
        return step.tokens

    def execute(self, seqs, num_new_tokens, is_prefill: bool,
                before_upload=None) -> tuple[StepInputs, torch.Tensor]:
        """prepare + forward: the logits (S, V) float32 of the rows that sample."""
        t0 = time.perf_counter()
        scaled = any(s.rope_len for s in seqs)        # dynamic NTK: per-token RoPE tables
        bucket = None                                 # (graphs read the shared tables)
        if not is_prefill and self.graphs is not None and not scaled:
            bucket = self.graphs.bucket(len(seqs))
        step = fill_step(self.buffers, seqs, num_new_tokens, is_prefill, pad_to=bucket or 0,
                         rope_scaled=scaled)
        header = StepHeader(is_prefill, step.num_seqs, step.num_tokens, step.max_seqlen_q,
                            len(step.logits_rows), bucket or 0, int(step.rope_scaled))
        self.prepare_seconds += time.perf_counter() - t0
        if before_upload is not None:
            before_upload()
        if step.pending_rows:
            write_pending_ids(self.buffers, step, seqs)
        if self.tp_group is not None:       # the other ranks run the same step on their shards
            return step, self.tp_group.run_step(header, self.buffers, self.forward_from_buffers)
        return step, self.forward_from_buffers(header)

    def forward_from_buffers(self, h: StepHeader) -> torch.Tensor:
        """The step written in the host buffer -> logits (S, V) float32 of the rows that sample.
        Every tensor-parallel rank calls this with the same buffer contents and header."""
        self.buffers.upload(h.num_rows, bool(h.rope_scaled))
        if h.bucket:
            return self.graphs.replay(h.bucket)[:h.num_seqs]                # (B, V)
        if not h.is_prefill:
            return self._decode_forward(h.num_seqs, bool(h.rope_scaled))      # (B, V)
        b = self.buffers
        md = b.metadata(True, h.num_seqs, h.num_tokens, h.max_seqlen_q, rope_scaled=bool(h.rope_scaled))
        hidden = self.model(b.view("input_ids", h.num_tokens),
                            b.view("positions", h.num_tokens), md)          # (N, H)
        rows = b.view("logits_rows", h.num_logits_rows)                      # (S,)
        return self.model.compute_logits(hidden[rows])                       # (S, V)

    def _decode_forward(self, batch_size: int, rope_scaled: bool = False) -> torch.Tensor:
        """One token per sequence: ids (B,) in the buffer -> logits (B, V). Captured as a
        graph per bucket, or run eagerly (CPU, enforce_eager, batches past the largest bucket)."""
        from kernels.paged_decode import decode_num_splits
        b = self.buffers
        splits = None
        if self.backend.name == "triton":       # fixed per batch size, so a graph keeps its grid
            splits = decode_num_splits(batch_size, self.cfg.num_kv_heads // self.ec.tp, self.device)
        md = b.metadata(False, batch_size, batch_size, 1, decode_splits=splits, rope_scaled=rope_scaled)
        hidden = self.model(b.view("input_ids", batch_size), b.view("positions", batch_size), md)
        return self.model.compute_logits(hidden)                             # (B, V) float32

    def _padding_inputs(self) -> None:
        """Before capture: every row a padding row, so warm-up runs write nothing."""
        b = self.buffers
        n = b.max_seqs
        b.field("input_ids", n)[:] = 0
        b.field("positions", n)[:] = 0
        b.field("slot_mapping", n)[:] = -1
        b.field("context_lens", n)[:] = 0
        b.tables[:] = 0
        b.upload(n)
        torch.cuda.synchronize()

    def _sample_row(self, seq) -> SampleRow:
        gc = seq.gen_config
        banned = ()
        if seq.num_output_tokens < gc.min_new_tokens:                      # no stop before min
            banned = seq.stop_ids
        return SampleRow(config=gc, generator=seq.generator, token_ids=seq.token_ids,
                         banned_ids=banned)

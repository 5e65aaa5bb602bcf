"""LLMEngine: requests in, tokens out, one `step()` at a time.

    step = schedule -> launch -> read tokens -> outputs

`add_request` tokenizes and queues a request; `step` runs one batch (a prefill or a decode
step for every running sequence) and returns what each request produced (every streaming
request, each step; a request added with stream=False only when it finishes: it skips the
per-token detokenizing and output building, as vLLM's FINAL_ONLY outputs do); `abort` drops a
request and frees its KV blocks. Everything else (pipeline, server, chat) is built on these.
With overlap scheduling (EngineConfig.overlap_schedule, on for CUDA) a step returns what the
step before it produced, while its own runs on the device.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from functools import partial

import torch

from labkit.config import ConfigError, EngineConfig, GenerationConfig
from labkit.engine.block_manager import BlockManager
from labkit.engine.device import resolve_device
from labkit.engine.kv_cache import plan_kv_cache
from labkit.engine.model_runner import LaunchedStep, ModelRunner
from labkit.engine.sampler import make_generator
from labkit.engine.scheduler import Scheduler
from labkit.engine.sequence import Sequence
from labkit.engine.stopping import StopChecker

log = logging.getLogger("labkit")


@dataclass
class RequestOutput:
    """What one request produced in one step (or, when finished, in total)."""
    request_id: str
    text: str                      # all text so far (stop words cut off)
    delta_text: str                # text new since the previous output
    token_ids: list[int]           # all output ids so far
    new_token_ids: list[int]
    num_prompt_tokens: int
    finished: bool = False
    finish_reason: str | None = None   # stop | length | abort
    num_prefix_hit_tokens: int = 0
    metrics: dict = field(default_factory=dict)


class LLMEngine:
    def __init__(self, model, engine_config: EngineConfig | None = None):
        from labkit.convert import inspect_model
        from labkit.tokenizer import Tokenizer
        from labkit.workspace_ini import resolve_engine_config

        info = inspect_model(model)
        self.model_config = cfg = info.config
        self.config, self.config_notes = resolve_engine_config(engine_config, info.inference, cfg)
        ec = self.config
        cfg.check_tp(ec.tp)               # a clear error before any rank's process starts
        self.device, self.dtype = resolve_device(ec, info.weight_type)
        self.tp_group = None
        try:
            self._load(model, cfg, ec, info.workspace)
        except BaseException:             # stop the other ranks we may have started
            self.close()
            raise
        self.tokenizer = Tokenizer(info.tokenizer_dir, ec.model_name or cfg.model_name)
        self.seqs: dict[str, Sequence] = {}
        self.stoppers: dict[str, StopChecker] = {}
        self._ids = itertools.count()
        self.generated_tokens_total = 0
        self.num_steps = 0
        self.host_seconds = 0.0           # schedule + postprocess time, summed over steps
        self.last_batch = None
        self._inflight: LaunchedStep | None = None     # launched, tokens not read (overlap)

    def _load(self, model, cfg, ec: EngineConfig, workspace) -> None:
        """Weights, KV cache, scheduler, runner. At tp > 1 ranks 1..tp-1 (their own processes,
        labkit/engine/tp_group.py) load their shards and build their runners alongside."""
        from labkit.engine import tp_group
        from labkit.models.llama import LlamaForCausalLM
        max_positions = max(ec.session_len, cfg.max_position_embeddings)
        self.tp_group = tp_group.start(model, ec, self.device, self.dtype, max_positions,
                                        workspace)
        if self.tp_group is not None:
            self.device = self.tp_group.device
        t0 = time.perf_counter()
        self.model = LlamaForCausalLM.from_pretrained(
            model, rank=0, tp=ec.tp, dtype=self.dtype, device=self.device,
            max_positions=max_positions, rope_scaling_factor=ec.rope_scaling_factor,
            use_logn_attn=ec.use_logn_attn)
        self.load_seconds = time.perf_counter() - t0
        self.kv_plan = plan_kv_cache(cfg, ec, self.device, self.dtype, workspace=workspace)
        if self.tp_group is not None:
            self.kv_plan = self.tp_group.agree_kv_plan(self.kv_plan)
        log.info("KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB (%s)",
                 self.kv_plan.num_blocks, self.kv_plan.block_size, self.kv_plan.num_tokens,
                 self.kv_plan.total_bytes / 2**20, self.kv_plan.how)
        self.block_manager = BlockManager(self.kv_plan.num_blocks, ec.cache_block_seq_len,
                                          ec.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, ec.max_batch_size, ec.max_prefill_token_num)
        self.runner = ModelRunner(self.model, cfg, ec, self.kv_plan, self.device, self.dtype)
        self.overlap = (ec.overlap_schedule if ec.overlap_schedule is not None
                        else self.device.type == "cuda" and ec.tp == 1)
        if self.tp_group is not None:
            self.tp_group.attach(self.runner)

    def close(self) -> None:
        """Stop the tensor-parallel ranks (nothing to do at tp=1); no step can run after."""
        if self.tp_group is not None:
            self.tp_group.close()

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt, gen_config: GenerationConfig | None = None,
                    request_id: str | None = None, stream: bool = True) -> str:
        """Queue a request (a string, a list of chat messages or token ids); returns its id.
        stream=False: `step` returns its output only when it finishes."""
        gc = gen_config or GenerationConfig()
        if not isinstance(gc, GenerationConfig):
            raise ValueError("gen_config must be a labkit.GenerationConfig")
        ids = self.tokenizer.prompt_to_ids(prompt)
        ec = self.config
        if len(ids) >= ec.session_len:
            raise ValueError(f"prompt is {len(ids)} tokens, not below session_len={ec.session_len}: "
                             f"shorten the prompt or raise session_len")
        worst = -(-min(len(ids) + gc.max_new_tokens, ec.session_len) // ec.cache_block_seq_len)
        if worst > self.kv_plan.num_blocks:
            raise ValueError(f"request needs up to {worst} KV blocks but the cache has "
                             f"{self.kv_plan.num_blocks}: raise cache_max_entry_count or lower "
                             f"max_new_tokens/session_len")
        rid = str(request_id) if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise ValueError(f"request_id={rid!r} is already in use")
        seq = Sequence(ids, gc, ec.cache_block_seq_len, request_id=rid,
                       generator=make_generator(gc.random_seed, self.device), stream=stream)
        stop = StopChecker(self.tokenizer, gc, len(ids), ec.session_len)
        seq.stop_ids = stop.stop_ids
        seq.max_tokens = min(len(ids) + gc.max_new_tokens, ec.session_len)   # as StopChecker's
        # dynamic NTK: one RoPE base per sequence, for the longest it may get (rotary.py)
        seq.rope_len = self.model.rope.rope_length(min(len(ids) + gc.max_new_tokens, ec.session_len))
        self.seqs[rid], self.stoppers[rid] = seq, stop
        self.scheduler.add(seq)
        return rid

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks. Unknown/finished ids are ignored."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        return self._finish_output(seq, [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def reset_prefix_cache(self) -> int:
        """Drop all cached prefix blocks (those no running request uses)."""
        return self.block_manager.reset_prefix_cache()

    # ------------------------------------------------------------------ one step
    def step(self) -> list[RequestOutput]:
        """schedule -> launch -> read tokens -> outputs.

        Without overlap a step's tokens are read right after its launch. With overlap (on for
        CUDA) the step launched here runs on the device while the host turns the *previous*
        step's tokens into outputs; the scheduler counted each of those tokens as PENDING, and
        its id is written into this step's inputs just before their upload (SGLang's overlap
        scheduler, vLLM's async scheduling). A step that may preempt waits for the tokens."""
        t0 = time.perf_counter()
        prev, self._inflight = self._inflight, None
        batch = None if prev is not None and self.scheduler.must_wait() else self.scheduler.schedule()
        if batch is None and prev is None:
            if self.has_unfinished():
                raise RuntimeError("no request can be scheduled: the KV cache is too small")
            return []
        t1 = time.perf_counter()
        if batch is not None:
            self.last_batch = batch                        # for notebooks and tests to inspect
            cur = self.runner.launch(batch, before_upload=prev and partial(self._read_tokens, prev))
            t = time.perf_counter()
            self._on_launch(cur)
            self.host_seconds += time.perf_counter() - t
            prev, self._inflight = (prev, cur) if self.overlap else (cur, None)
        if prev is not None:
            self._read_tokens(prev)       # waits for the device (read already if overlapping)
        t2 = time.perf_counter()
        outs = self._outputs(prev)
        # host time outside the runner: scheduling, block bookkeeping, stop checks, detokenizing
        self.host_seconds += (t1 - t0) + (time.perf_counter() - t2)
        return outs

    def _on_launch(self, step: LaunchedStep) -> None:
        """A launched step's tokens count as computed now, and each token it samples is
        PENDING until read: the next step can be scheduled before this one finishes."""
        self.scheduler.postprocess(step.batch)
        self.num_steps += 1
        for seq in step.seqs:
            seq.append_pending()

    def _read_tokens(self, step: LaunchedStep) -> None:
        """Wait for a step's sampled tokens and put them in place of their PENDING ids."""
        if step.collected:                                 # read already (collect caches them)
            return
        for seq, token in zip(step.seqs, self.runner.collect(step)):
            if not seq.is_finished:                        # aborted meanwhile: nothing to fill
                seq.resolve_pending(token)

    def _outputs(self, step: LaunchedStep | None) -> list[RequestOutput]:
        if step is None:
            return []
        self._read_tokens(step)
        return [out for seq, token in zip(step.seqs, step.tokens) if not seq.is_finished
                for out in [self._on_token(seq, token)] if out is not None]

    def _on_token(self, seq: Sequence, token: int) -> RequestOutput | None:
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        self.generated_tokens_total += 1
        stop = self.stoppers[seq.request_id]
        reason = stop.on_token(token, seq.num_tokens - seq.num_pending)
        if reason is not None:     # with overlap the next step may be computing a token for
            self.scheduler.finish(seq, reason)   # it: that one is dropped when read
            return self._finish_output(seq, [token])
        if not seq.stream:
            return None
        delta = stop.take_delta()
        return RequestOutput(seq.request_id, stop.text, delta, seq.output_token_ids, [token],
                             seq.num_prompt_tokens, num_prefix_hit_tokens=seq.num_prefix_hit_tokens)

    def _finish_output(self, seq: Sequence, new_ids: list[int]) -> RequestOutput:
        stop = self.stoppers.pop(seq.request_id)
        del self.seqs[seq.request_id]
        now = time.perf_counter()
        metrics = {"latency_s": now - seq.arrival_time,
                   "ttft_s": (seq.first_token_time or now) - seq.arrival_time,
                   "preemptions": seq.num_preemptions}
        delta = stop.take_delta(final=True)
        return RequestOutput(seq.request_id, stop.text, delta, seq.output_token_ids, new_ids,
                             seq.num_prompt_tokens, True, seq.finish_reason,
                             seq.num_prefix_hit_tokens, metrics)

    # ------------------------------------------------------------------ helpers
    def generate(self, prompts: list, gen_config: GenerationConfig | list | None = None) -> list[RequestOutput]:
        """Run prompts to completion together (one continuous batch); outputs in input order."""
        gcs = gen_config if isinstance(gen_config, list) else [gen_config] * len(prompts)
        ids = [self.add_request(p, g, stream=False) for p, g in zip(prompts, gcs)]
        done: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def stats(self) -> dict:
        bm, plan = self.block_manager, self.kv_plan
        return {"blocks_total": bm.num_blocks, "blocks_used": bm.num_used,
                "blocks_free": bm.num_free, "blocks_cached": bm.num_cached,
                "block_size": plan.block_size, "tokens_total": plan.num_tokens,
                "bytes_total": plan.total_bytes,
                **plan.stats(),                            # kv_bytes_per_token (scales counted), ...
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "prefix_cache_queries": bm.stats.prefix_cache_queries,
                "prefix_cache_hits": bm.stats.prefix_cache_hits,
                "evictions": bm.stats.evictions, "preemptions": self.scheduler.num_preemptions,
                "generated_tokens_total": self.generated_tokens_total, "steps": self.num_steps,
                "host_ms_per_step": 1e3 * (self.host_seconds + self.runner.prepare_seconds)
                                    / max(1, self.num_steps),
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", "")}

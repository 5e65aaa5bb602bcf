"""Where a device's memory goes for given engine settings: weights, KV cache, activations.

    m = memory_breakdown("./workspace", max_batch_size=8, cache_max_entry_count=0.5)
    m.kv_bytes == LLMEngine("./workspace", EngineConfig(max_batch_size=8, ...)).stats()["bytes_total"]
    draw_memory(m)

The settings are resolved as the engine resolves them (argument > config.ini > default) and
the KV cache is sized by the engine's planner (`labkit.engine.kv_cache.plan_kv_cache`) on this
machine, so the numbers are what an engine started with the same settings allocates.

Per device (tensor-parallel rank):
    weights      replicated embedding and norms + 1/tp of every split matrix (labkit/models/loader.py)
    KV cache     the planner's blocks x bytes per block (each rank holds its own KV heads)
    activations  an estimate, not measured: the largest transient tensors of one prefill step of
                 max_prefill_token_num tokens (hidden + residual, qkv, the MLP's w13 output and
                 its activation) plus the float32 logits of max_batch_size rows
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from labkit.config import EngineConfig, ModelConfig
from labkit.engine import kv_cache
from labkit.engine.kv_cache import KVCachePlan, plan_kv_cache

GiB, MiB = 2**30, 2**20

# int8/int4 KV: bytes of one (token, head) row = the codes + a 2-byte scale + a 1-byte zero point
# (kernels/kv_quant.py of the KV-quant lesson). Used only while the engine's bytes_per_token does
# not take quant_policy itself; once it does, its numbers are used instead.
FALLBACK_QUANT_ROW_BYTES = {8: lambda head_dim: head_dim + 3, 4: lambda head_dim: head_dim // 2 + 3}


def planner_knows_quant_policy() -> bool:
    return "quant_policy" in inspect.signature(kv_cache.bytes_per_token).parameters


def kv_bytes_per_token(cfg: ModelConfig, tp: int, dtype: torch.dtype, quant_policy: int) -> int:
    """KV bytes per token on one rank: the engine's function, or the fallback table for int8/int4."""
    if quant_policy == 0:
        return kv_cache.bytes_per_token(cfg, tp, dtype)
    if planner_knows_quant_policy():
        return kv_cache.bytes_per_token(cfg, tp, dtype, quant_policy=quant_policy)
    row = FALLBACK_QUANT_ROW_BYTES[quant_policy](cfg.head_dim)
    return 2 * cfg.num_layers * (cfg.num_kv_heads // tp) * row


def plan_for(cfg: ModelConfig, ec: EngineConfig, device, dtype) -> tuple[KVCachePlan, str]:
    """The planner's KVCachePlan; for int8/int4 before the planner counts them, the same plan
    re-divided with the fallback bytes per block. Returns (plan, where the bytes came from)."""
    plan = plan_kv_cache(cfg, ec, device, dtype)
    if ec.quant_policy == 0 or planner_knows_quant_policy():
        return plan, "engine planner"
    bs = ec.cache_block_seq_len
    per_block = kv_bytes_per_token(cfg, ec.tp, dtype, ec.quant_policy) * bs
    cap = -(-ec.max_batch_size * ec.session_len // bs)
    n = int(ec.cache_max_entry_count) if ec.cache_max_entry_count > 1 else \
        int(plan.budget_bytes * ec.cache_max_entry_count) // per_block
    how = plan.how.split(" / ")[0] + f" / {per_block / MiB:.2f} MiB per block (int{ec.quant_policy})"
    return KVCachePlan(min(n, cap), bs, per_block, plan.budget_bytes, how), "fallback table"


def weight_params_per_rank(cfg: ModelConfig, tp: int) -> int:
    """Parameters one tensor-parallel rank holds (the split rules of labkit/models/loader.py)."""
    H, I, D, V = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.vocab_size
    qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * D
    layer = (qkv_out * H + H * cfg.num_heads * D + 3 * H * I) // tp + 2 * H   # + 2 norms
    if cfg.attn_bias:
        layer += qkv_out // tp
    head = 0 if cfg.tie_word_embeddings else V * H // tp
    return V * H + cfg.num_layers * layer + H + head


def activation_bytes(cfg: ModelConfig, ec: EngineConfig, dtype: torch.dtype) -> int:
    """Estimate (see module docstring) of one device's largest transient tensors in a step."""
    n = min(ec.max_prefill_token_num, ec.max_batch_size * ec.session_len)
    elem = torch.empty((), dtype=dtype).element_size()
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim // ec.tp
    per_token = 2 * cfg.hidden_size + qkv + 3 * cfg.intermediate_size // ec.tp
    return n * per_token * elem + ec.max_batch_size * cfg.vocab_size * 4


@dataclass
class MemoryBreakdown:
    config: EngineConfig          # resolved as the engine resolves it
    device: str
    dtype: str
    weights_bytes: int            # per device
    kv_bytes: int                 # per device
    activation_bytes: int         # per device (estimate)
    kv_bytes_per_token: int
    num_blocks: int
    block_size: int
    how: str                      # the planner's one-line reason
    source: str                   # "engine planner" or "fallback table"

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def full_sessions(self) -> int:
        """Sequences of session_len tokens that fit in the cache at once."""
        return self.kv_tokens // self.config.session_len

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.activation_bytes


def memory_breakdown(model, **settings) -> MemoryBreakdown:
    """Settings are EngineConfig fields (max_batch_size, cache_max_entry_count, quant_policy,
    session_len, cache_block_seq_len, tp, kv_budget_gib, ...)."""
    from labkit.convert import inspect_model
    from labkit.engine.engine import resolve_device
    from labkit.workspace_ini import resolve_engine_config
    info = inspect_model(model)
    cfg = info.config
    ec, _ = resolve_engine_config(EngineConfig(**settings), info.inference, cfg)
    cfg.check_tp(ec.tp)
    device, dtype = resolve_device(ec, info.weight_type)
    plan, source = plan_for(cfg, ec, device, dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    return MemoryBreakdown(ec, str(device), str(dtype).replace("torch.", ""),
                           weight_params_per_rank(cfg, ec.tp) * elem, plan.total_bytes,
                           activation_bytes(cfg, ec, dtype), plan.bytes_per_block // plan.block_size,
                           plan.num_blocks, plan.block_size, plan.how, source)


COLOURS = {"weights": "#4c72b0", "KV cache": "#dd8452", "activations (estimate)": "#8c8c8c"}


def draw_memory(m: MemoryBreakdown, title: str | None = None):
    """Left: stacked bars per device (MiB). Right: the cache in tokens against what
    max_batch_size x session_len could use, and the full-length sessions that fit."""
    import matplotlib.pyplot as plt
    tp = m.config.tp
    fig, (ax, ax_k) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1.2, 1]})
    devices = [f"{m.device} rank {r}" if tp > 1 else m.device for r in range(tp)]
    bottom = [0.0] * tp
    for label, nbytes in (("weights", m.weights_bytes), ("KV cache", m.kv_bytes),
                          ("activations (estimate)", m.activation_bytes)):
        heights = [nbytes / MiB] * tp
        ax.bar(devices, heights, bottom=bottom, color=COLOURS[label], label=label, width=0.5)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("MiB per device")
    ax.set_title(f"{m.dtype}, tp={tp}: {m.total_bytes / GiB:.2f} GiB per device")
    ax.legend(fontsize=8, loc="upper right")
    ec = m.config
    wanted = ec.max_batch_size * ec.session_len
    ax_k.barh(["cache", "max_batch_size\nx session_len"], [m.kv_tokens, wanted],
              color=[COLOURS["KV cache"], "#cccccc"])
    for y, v in enumerate([m.kv_tokens, wanted]):
        ax_k.text(v, y, f" {v:,}", va="center", fontsize=9)
    ax_k.set_xlabel("tokens")
    ax_k.set_xlim(0, 1.3 * max(m.kv_tokens, wanted))
    ax_k.set_title(f"{m.num_blocks} blocks x {m.block_size}: {m.full_sessions} full "
                   f"{ec.session_len}-token sessions fit", fontsize=10)
    fig.suptitle(title or f"quant_policy={ec.quant_policy} ({m.kv_bytes_per_token:,} B/token, "
                 f"{m.source}); {m.how}", fontsize=9)
    fig.tight_layout()
    return fig

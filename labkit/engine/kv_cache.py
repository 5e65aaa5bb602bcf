"""How big the paged KV cache is, and the tensors that hold it.

bytes per token = 2 (K and V) x layers x kv_heads/tp x head_dim x bytes per element
                = 2 x 30 x 3 x 64 x 2 B = 23,040 B for SmolLM2-135M in bf16 (fp32: 46,080 B)

cache_max_entry_count (as in LMDeploy):
  in (0, 1): that fraction of the memory free after the weights were loaded
             (GPU: cudaMemGetInfo; CPU: min(available RAM, kv_budget_gib))
  > 1:       that many blocks
Never more than max_batch_size x session_len tokens: a bigger cache could not be used.

Tensor parallel: each rank holds kv_heads/tp heads of every token, so bytes per token are per
rank; on CPU the ranks share the RAM and each takes 1/tp of the budget; every rank plans, then
all take the smallest block count (labkit/engine/tp_group.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from labkit.config import ConfigError, EngineConfig, ModelConfig


@dataclass(frozen=True)
class KVCachePlan:
    num_blocks: int
    block_size: int
    bytes_per_block: int
    budget_bytes: int          # memory the fraction was taken of (0 when a block count was given)
    how: str                   # one line: how num_blocks was decided

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def bytes_per_token(cfg: ModelConfig, tp: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * (cfg.num_kv_heads // tp) * cfg.head_dim * elem


def available_memory(device: torch.device, kv_budget_gib: float) -> tuple[int, str]:
    """Bytes free for the KV cache on `device` (after the weights are loaded)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, "free GPU memory"
    avail = _available_ram()
    budget = int(kv_budget_gib * 2**30)
    if avail < budget:
        return avail, "available RAM"
    return budget, f"CPU KV budget {kv_budget_gib:g} GiB"


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_kv_cache(cfg: ModelConfig, ec: EngineConfig, device: torch.device,
                  dtype: torch.dtype) -> KVCachePlan:
    """Decide the number of blocks from the resolved engine config (see module docstring)."""
    bs = ec.cache_block_seq_len
    per_block = bytes_per_token(cfg, ec.tp, dtype) * bs
    cap = -(-ec.max_batch_size * ec.session_len // bs)   # ceil: max_batch_size x session_len tokens
    count = ec.cache_max_entry_count
    if count > 1:
        n, budget, how = int(count), 0, f"cache_max_entry_count={int(count)} blocks"
    else:
        budget, where = available_memory(device, ec.kv_budget_gib)
        if device.type == "cpu" and ec.tp > 1:    # tp ranks share this machine's RAM
            budget, where = budget // ec.tp, f"{where} / {ec.tp} ranks"
        n = int(budget * count) // per_block
        how = f"{count:g} x {where} ({budget / 2**30:.2f} GiB) / {per_block / 2**20:.2f} MiB per block"
    if n > cap:
        n, how = cap, how + f", capped at max_batch_size x session_len = {cap} blocks"
    if n < 1:
        raise ConfigError(f"cache_max_entry_count={count} leaves no room for one KV block "
                          f"({per_block} bytes); raise cache_max_entry_count or free memory")
    return KVCachePlan(n, bs, per_block, budget, how)


def allocate_kv_cache(cfg: ModelConfig, plan: KVCachePlan, tp: int, device: torch.device,
                      dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (k_cache, v_cache) pair per layer, each (num_blocks, block_size, Hkv/tp, D).
    torch.empty: pages are only touched when written, so a large CPU budget costs nothing
    until used. The attention kernels never read a slot that was not written."""
    shape = (plan.num_blocks, plan.block_size, cfg.num_kv_heads // tp, cfg.head_dim)
    return [(torch.empty(shape, dtype=dtype, device=device),
             torch.empty(shape, dtype=dtype, device=device)) for _ in range(cfg.num_layers)]

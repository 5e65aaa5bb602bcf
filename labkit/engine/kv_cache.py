"""How big the paged KV cache is, and the tensors that hold it.

bytes per token = 2 (K and V) x layers x kv_heads/tp x bytes per (token, head) row
  row, quant_policy 0: head_dim x bytes per element         SmolLM2-135M: 64 x 2 = 128 B in bf16
  row, quant_policy 8: head_dim int8 codes + 2 B scale + 1 B zero point   64 + 3 =  67 B
  row, quant_policy 4: head_dim / 2 bytes (two int4 codes each) + 2 B scale + 2 B zero
                                                                          32 + 4 =  36 B
  SmolLM2-135M (30 layers, 3 KV heads): 23,040 B bf16 (fp32: 46,080 B), 12,060 B int8, 6,480 B int4
The scales and zeros live in a side cache addressed by the same slots (kernels/kv_quant.py),
so they are counted here and every block holds the same number of tokens at any policy.

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

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from kernels.kv_quant import QuantKVCache
from labkit.config import ConfigError, EngineConfig, ModelConfig

log = logging.getLogger("labkit")
KV_BITS = {0: 0, 8: 8, 4: 4}            # quant_policy -> bits of a KV code (0: the model dtype)


@dataclass(frozen=True)
class KVCachePlan:
    num_blocks: int
    block_size: int
    bytes_per_block: int
    budget_bytes: int          # memory the fraction was taken of (0 when a block count was given)
    how: str                   # one line: how num_blocks was decided
    quant_policy: int = 0      # 0 model dtype, 8 int8, 4 int4
    # calibrated int8/int4 parameters (layers, 2 [K, V], Hkv, 2 [scale, zero]) from the
    # workspace (`labkit lite kv_qparams`); None: every token is quantized with its own range
    kv_qparams: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size

    def stats(self) -> dict:
        """What `LLMEngine.stats()` reports about the cache's format."""
        return {"kv_bytes_per_token": self.bytes_per_token, "kv_quant_policy": self.quant_policy,
                "kv_calibrated": self.kv_qparams is not None}


def bytes_per_token(cfg: ModelConfig, tp: int, dtype: torch.dtype, quant_policy: int = 0) -> int:
    """KV cache bytes per token, all layers, K and V, scales and zeros included."""
    hkv = cfg.num_kv_heads // tp
    if quant_policy == 0:
        row = cfg.head_dim * torch.empty((), dtype=dtype).element_size()
    else:
        row = QuantKVCache.bytes_per_row(cfg.head_dim, KV_BITS[quant_policy])
    return 2 * cfg.num_layers * hkv * row


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
                  dtype: torch.dtype, workspace: Path | None = None) -> KVCachePlan:
    """Decide the number of blocks from the resolved engine config (see module docstring).
    With quant_policy 8/4, a workspace's calibrated KV parameters of the same bit width are used."""
    bs, policy = ec.cache_block_seq_len, ec.quant_policy or 0
    if policy and cfg.head_dim % 2:
        raise ConfigError(f"quant_policy={policy} is not allowed for head_dim={cfg.head_dim}: "
                          f"int8/int4 KV needs an even head_dim; use quant_policy=0")
    per_block = bytes_per_token(cfg, ec.tp, dtype, policy) * bs
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
    qparams = _calibrated_params(workspace, cfg, policy) if policy else None
    return KVCachePlan(n, bs, per_block, budget, how, policy, qparams)


def _calibrated_params(workspace: Path | None, cfg: ModelConfig, policy: int):
    """The workspace's static KV parameters if they were calibrated for this bit width."""
    if workspace is None:
        return None
    from labkit.quant.kv_qparams import read_kv_qparams
    found = read_kv_qparams(workspace, cfg)
    if found is None:
        return None
    params, bits = found
    if bits != KV_BITS[policy]:
        log.info("KV cache: the workspace's calibrated parameters are for int%d; quant_policy=%d "
                 "quantizes online (each token with its own range)", bits, policy)
        return None
    log.info("KV cache: int%d with the workspace's calibrated (static) parameters", bits)
    return params


def allocate_kv_cache(cfg: ModelConfig, plan: KVCachePlan, tp: int, device: torch.device,
                      dtype: torch.dtype, rank: int = 0) -> list[tuple]:
    """One (k_cache, v_cache) pair per layer: tensors (num_blocks, block_size, Hkv/tp, D) in
    the model dtype, or with quant_policy 8/4 two `QuantKVCache`s (codes + scale/zero side
    cache, kernels/kv_quant.py), holding this rank's calibrated parameters if there are any.
    torch.empty: pages are only touched when written, so a large CPU budget costs nothing
    until used. The attention kernels never read a slot that was not written."""
    hkv = cfg.num_kv_heads // tp
    shape = (plan.num_blocks, plan.block_size, hkv, cfg.head_dim)
    if not plan.quant_policy:
        return [(torch.empty(shape, dtype=dtype, device=device),
                 torch.empty(shape, dtype=dtype, device=device)) for _ in range(cfg.num_layers)]
    bits = KV_BITS[plan.quant_policy]
    caches = []
    for layer in range(cfg.num_layers):
        k, v = (QuantKVCache.empty(*shape, bits, device) for _ in range(2))
        if plan.kv_qparams is not None:
            heads = plan.kv_qparams[layer, :, rank * hkv:(rank + 1) * hkv].to(device)  # (2, hkv, 2)
            k.static, v.static = heads[0].contiguous(), heads[1].contiguous()
        caches.append((k, v))
    return caches

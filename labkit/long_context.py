"""Perplexity past the trained length, with and without dynamic NTK / logn attention.

    nll = compare_settings(model, ids, {"off": (0, False), "ntk x2": (2.0, False)}, trained_len=T)
    perplexity(nll["ntk x2"][T:])

The model runs its engine path: a paged KV cache owned here (one sequence, blocks in order),
prefill in chunks through the same attention ops the engine calls, logits per chunk (a
49,152-word vocabulary times 10k positions would not fit at once). This is a small local
evaluator for lesson 07; `labkit eval ppl` is the general tool.

logn changes nothing before position T (scale 1 there), so the cache of tokens [0, T) is
computed once and every plain-RoPE setting continues from it. Dynamic NTK gives the whole
sequence one base, that of its length L (labkit/layers/rotary.py: what the engine does for a
prompt of L tokens, and what HF's dynamic rope does in one forward pass over them), so it
changes positions before T too and each NTK setting is a pass of its own.
"""
from __future__ import annotations

import math

import torch

from labkit.layers.attention import AttentionMetadata


class _OneSequenceCache:
    """K/V for one sequence of up to `capacity` tokens, handed to every layer of `model`."""

    def __init__(self, model, capacity: int, block_size: int = 256):
        cfg, p = model.cfg, next(model.parameters())
        self.model, self.block_size = model, block_size
        n_blocks = -(-capacity // block_size)
        shape = (n_blocks, block_size, cfg.num_kv_heads // model.tp, cfg.head_dim)
        self.saved = [(l.attention.attn.k_cache, l.attention.attn.v_cache) for l in model.layers]
        for layer in model.layers:
            layer.attention.attn.k_cache = torch.empty(shape, dtype=p.dtype, device=p.device)
            layer.attention.attn.v_cache = torch.empty(shape, dtype=p.dtype, device=p.device)
        self.table = torch.arange(n_blocks, dtype=torch.int32, device=p.device)[None]   # (1, W)

    def release(self) -> None:
        for layer, (k, v) in zip(self.model.layers, self.saved):
            layer.attention.attn.k_cache, layer.attention.attn.v_cache = k, v


@torch.inference_mode()
def _nll_span(model, cache: _OneSequenceCache, ids: torch.Tensor, start: int, end: int,
              chunk: int, rope_len: int = 0) -> torch.Tensor:
    """NLL (float64) of ids[start+1 .. end] given everything before, computing positions
    [start, end) in chunks; positions < start must already be in the cache. rope_len: the
    sequence's dynamic-NTK length (0: the model's RoPE base)."""
    dev = cache.table.device
    out = []
    for s in range(start, end, chunk):
        e = min(s + chunk, end)
        pos = torch.arange(s, e, device=dev)                                     # (n,)
        md = AttentionMetadata(is_prefill=True, slot_mapping=pos, block_tables=cache.table,
                               context_lens=torch.tensor([e], dtype=torch.int32, device=dev),
                               cu_seqlens_q=torch.tensor([0, e - s], dtype=torch.int32, device=dev),
                               max_seqlen_q=e - s,
                               rope_lens=torch.full((e - s,), rope_len, dtype=torch.int32,
                                                    device=dev) if rope_len else None)
        hidden = model(ids[s:e].to(dev), pos, md)                                # (n, H)
        n_pred = min(e, len(ids) - 1) - s                                        # last token predicts nothing
        logits = model.compute_logits(hidden[:n_pred])                           # (n_pred, V) float32
        target = ids[s + 1:s + 1 + n_pred].to(dev)
        out.append(torch.nn.functional.cross_entropy(logits, target, reduction="none").double().cpu())
    return torch.cat(out)                                                        # (end - start,)


def compare_settings(model, ids, settings: dict[str, tuple[float, bool]], trained_len: int,
                     chunk: int = 512) -> dict[str, torch.Tensor]:
    """{name: NLL of every predicted token} for each (rope_scaling_factor, use_logn_attn).
    Plain-RoPE settings share the prefix [0, trained_len); an NTK setting (factor >= 1, text
    longer than trained_len) computes the whole text with the base of its length. Leaves the
    model's scaling off."""
    ids = torch.as_tensor(ids, dtype=torch.long)                                 # (L,)
    L = len(ids)
    T = min(trained_len, L)
    cache = _OneSequenceCache(model, L)
    try:
        model.set_position_scaling(0.0, False, trained_len)
        prefix = _nll_span(model, cache, ids, 0, T, chunk)                       # (T,) plain RoPE
        result = {}
        # plain-RoPE settings first: they continue from the prefix in the cache; an NTK pass
        # overwrites it with keys of another base
        order = sorted(settings, key=lambda k: settings[k][0] >= 1)              # stable
        for name in order:
            factor, logn = settings[name]
            model.set_position_scaling(factor, logn, trained_len)
            rope_len = model.rope.rope_length(L)
            if rope_len:                 # its own base from position 0 on: a pass of its own
                nll = _nll_span(model, cache, ids, 0, L, chunk, rope_len)
            else:
                nll = torch.cat([prefix, _nll_span(model, cache, ids, T, L, chunk) if L > T else prefix[:0]])
            result[name] = nll[:L - 1]                                           # (L-1,)
        result = {name: result[name] for name in settings}
    finally:
        model.set_position_scaling(0.0, False)
        cache.release()
    return result


def perplexity(nll: torch.Tensor) -> float:
    return math.exp(float(nll.mean()))


def windowed(nll: torch.Tensor, width: int) -> tuple[list[int], list[float]]:
    """Perplexity of consecutive windows of `width` predicted tokens: (window starts, ppl)."""
    starts = list(range(0, len(nll) - width + 1, width))
    return starts, [perplexity(nll[s:s + width]) for s in starts]

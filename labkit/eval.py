"""`labkit eval ppl`: perplexity through the engine's paged path.

    ppl = exp( mean over scored tokens of -log p(token | the tokens before it) )

The text (the pydoc corpus, or --text FILE) is cut into `chunks` sequences of `seqlen` tokens;
in each, every token after the first is scored. The engine computes them as it serves: each
sequence is prefilled in pieces of `prefill_chunk` tokens over the paged KV cache, so later
pieces attend to K/V read back from the cache, quantized when quant_policy is 8 or 4 (the
current piece's own K/V too: they are stored, then read). That is what makes the number a
measurement of the KV cache format, not only of the weights.

The engine is built for this alone (a cache of exactly `batch` sequences, no prefix caching),
and this module drives its model directly with its own block tables (the pool is unused
otherwise), asking for the logits of every position instead of sampling from the last one.
"""
from __future__ import annotations

import argparse
import json
import math
import time

# torch is imported inside the functions: `labkit --help` builds this command's parser
# without loading torch (tests/test_serve_app.py checks it).


def perplexity(model, quant_policy: int = 0, seqlen: int = 1024, chunks: int = 16,
               text: str | None = None, batch: int = 4, prefill_chunk: int = 256,
               engine_config=None, engine=None) -> dict:
    """Perplexity of `model` (workspace, alias, HF dir, .gguf) on the corpus through the paged
    KV cache. `engine_config` (an EngineConfig) sets device/dtype/block size; `engine` reuses
    an LLMEngine built with `eval_engine_config` (notebooks). Returns {"ppl", "tokens", ...}."""
    from labkit.config import ConfigError
    from labkit.corpus import read_text, token_chunks

    for name, v, lo in (("seqlen", seqlen, 2), ("chunks", chunks, 1), ("batch", batch, 1),
                        ("prefill_chunk", prefill_chunk, 1)):
        if not isinstance(v, int) or v < lo:
            raise ConfigError(f"{name}={v!r} is not allowed: --{name.replace('_', '-')} must be "
                              f"an integer >= {lo}")
    if engine is None:
        from labkit.engine.engine import LLMEngine
        engine = LLMEngine(model, eval_engine_config(quant_policy, seqlen, batch, prefill_chunk,
                                                     engine_config))
    ids = token_chunks(engine.tokenizer.encode(read_text(text)), seqlen, chunks)  # (n, seqlen)
    t0 = time.perf_counter()
    nll, scored = 0.0, 0
    for first in range(0, ids.shape[0], batch):
        group = ids[first:first + batch].to(engine.device)                       # (b, seqlen)
        nll += _score_group(engine, group, prefill_chunk)
        scored += group.shape[0] * (seqlen - 1)
    st = engine.stats()
    return {"ppl": math.exp(nll / scored), "tokens": scored, "nll": nll / scored,
            "sequences": int(ids.shape[0]), "seqlen": seqlen, "quant_policy": st["kv_quant_policy"],
            "kv_calibrated": st["kv_calibrated"], "kv_bytes_per_token": st["kv_bytes_per_token"],
            "dtype": st["dtype"], "device": st["device"], "seconds": time.perf_counter() - t0}


def eval_engine_config(quant_policy: int, seqlen: int, batch: int, prefill_chunk: int, base=None):
    """An EngineConfig whose cache holds exactly `batch` sequences of `seqlen` tokens."""
    import dataclasses

    from labkit.config import EngineConfig
    base = base or EngineConfig()
    bs = base.cache_block_seq_len or 64
    blocks = batch * -(-seqlen // bs)
    return dataclasses.replace(base, quant_policy=quant_policy, session_len=seqlen + 1,
                               max_batch_size=batch, cache_block_seq_len=bs,
                               cache_max_entry_count=max(blocks, 2), enable_prefix_caching=False,
                               max_prefill_token_num=max(16, batch * prefill_chunk))


def _score_group(engine, ids, prefill_chunk: int) -> float:
    """Summed NLL of ids (b, L) (every position but the first), prefilled piece by piece."""
    import torch

    with torch.inference_mode():
        return _score_group_nograd(engine, ids, prefill_chunk)


def _score_group_nograd(engine, ids, prefill_chunk: int) -> float:
    import torch
    import torch.nn.functional as F

    from labkit.layers.attention import AttentionMetadata

    b, L = ids.shape
    bs = engine.kv_plan.block_size
    per_seq = -(-L // bs)
    assert b * per_seq <= engine.kv_plan.num_blocks and not engine.has_unfinished(), \
        "the eval engine's cache is sized for `batch` sequences and must be idle"
    dev = engine.device
    tables = torch.arange(b * per_seq, dtype=torch.int32, device=dev).view(b, per_seq)  # (b, M)
    total = 0.0
    for start in range(0, L, prefill_chunk):
        n = min(prefill_chunk, L - start)
        pos = torch.arange(start, start + n, device=dev)                       # (n,)
        slots = (tables[:, pos // bs].long() * bs + pos % bs).reshape(-1)      # (b*n,)
        md = AttentionMetadata(
            is_prefill=True, slot_mapping=slots, block_tables=tables,
            context_lens=torch.full((b,), start + n, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=dev),
            max_seqlen_q=n)
        hidden = engine.model(ids[:, start:start + n].reshape(-1), pos.repeat(b), md)  # (b*n, H)
        hidden = hidden.view(b, n, -1)
        last = n if start + n < L else n - 1                  # the final token predicts nothing
        for s in range(b):                                    # (n, V) logits, one sequence at a time
            logits = engine.model.compute_logits(hidden[s, :last])                # (last, V)
            target = ids[s, start + 1:start + 1 + last]                           # (last,)
            total += F.cross_entropy(logits.float(), target, reduction="sum").item()
    return total


# ---------------------------------------------------------------------------- CLI
def add_ppl_args(p: argparse.ArgumentParser) -> None:
    from labkit.engine_args import flag
    p.add_argument("model", help="a workspace, smollm2-135m, an HF directory or a .gguf")
    flag(p, "quant_policy", type=int, default=0, help="KV cache: 0 model dtype, 8 int8, 4 int4")
    flag(p, "seqlen", type=int, default=1024, help="tokens per sequence (default 1024)")
    flag(p, "chunks", type=int, default=16, help="sequences (default 16)")
    flag(p, "text", default=None, help="a UTF-8 text file (default: the pydoc corpus)")
    flag(p, "batch", type=int, default=4, help="sequences per forward pass (default 4)")
    flag(p, "prefill_chunk", type=int, default=256,
         help="tokens per prefill piece; later pieces read earlier ones from the cache (default 256)")
    flag(p, "cache_block_seq_len", type=int, default=None, help="tokens per KV block (default 64)")
    flag(p, "device", default="auto", help="auto | cpu | cuda | cuda:N")
    flag(p, "dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--json", action="store_true", help="also print one JSON object, last")


def main(args: argparse.Namespace) -> int:
    from labkit.config import EngineConfig
    base = EngineConfig(device=args.device, dtype=args.dtype,
                        cache_block_seq_len=args.cache_block_seq_len)
    r = perplexity(args.model, args.quant_policy, args.seqlen, args.chunks, args.text,
                   args.batch, args.prefill_chunk, engine_config=base)
    kv = {0: "model dtype", 8: "int8", 4: "int4"}[r["quant_policy"]]
    if r["kv_calibrated"]:
        kv += " (calibrated)"
    print(f"{'model':<12} {args.model}")
    print(f"{'KV cache':<12} {kv}, {r['kv_bytes_per_token']:,} B/token ({r['dtype']} on {r['device']})")
    print(f"{'text':<12} {args.text or 'pydoc corpus'}: {r['sequences']} x {r['seqlen']} tokens, "
          f"{r['tokens']:,} scored")
    print(f"{'perplexity':<12} {r['ppl']:.3f}   ({r['seconds']:.1f} s)")
    if args.json:
        print(json.dumps(r))
    return 0

"""Perplexity past the real trained length (issue 12's long-context acceptance): the bundled
SmolLM2-135M (max_position_embeddings 8192) on the first L tokens of the pydoc corpus, with and
without dynamic NTK / logn, through the engine's paged-attention path (labkit.long_context).
CPU, float32; about 15-20 minutes on 2 cores for L = 16384 (plain RoPE holds up to ~10k
tokens on this model, then breaks down).

    python scripts/long_context_ppl.py [--length 16384] [--out build/long_context.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from labkit.corpus import pydoc_text
from labkit.long_context import compare_settings, perplexity, windowed
from labkit.models.llama import LlamaForCausalLM

SETTINGS = {"plain RoPE": (0.0, False), "NTK x2": (2.0, False), "NTK x4": (4.0, False),
            "logn": (0.0, True), "NTK x2 + logn": (2.0, True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--out", default="build/long_context.json")
    args = ap.parse_args()
    from transformers import AutoTokenizer
    from labkit.models.bundled import bundled_tokenizer_dir
    tok = AutoTokenizer.from_pretrained(bundled_tokenizer_dir())
    ids = tok.encode(pydoc_text())[:args.length]
    model = LlamaForCausalLM.from_pretrained("smollm2-135m", max_positions=args.length)
    T = model.cfg.max_position_embeddings
    t0 = time.perf_counter()
    nll = compare_settings(model, ids, SETTINGS, trained_len=T, chunk=512)
    secs = time.perf_counter() - t0
    rows = {k: dict(before=perplexity(v[:T - 1]), past=perplexity(v[T - 1:]),
                    windows=windowed(v, 1024)[1]) for k, v in nll.items()}
    print(f"{len(ids)} tokens, trained length T = {T}, {secs:.0f} s, torch {torch.__version__}")
    print(f"{'setting':16s} {'ppl < T':>8s} {'ppl >= T':>9s}")
    for k, r in rows.items():
        print(f"{k:16s} {r['before']:8.3f} {r['past']:9.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(tokens=len(ids), trained_len=T, seconds=secs,
                                              settings=rows), indent=1))


if __name__ == "__main__":
    main()

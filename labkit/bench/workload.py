"""The benchmark workload: real English prompts (CPython's bundled docs) of random lengths.

As vLLM's benchmark_throughput: N requests, prompt lengths uniform in [a, b], output lengths
uniform in [c, d], ignore_eos so every request produces exactly its output length.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Request:
    prompt_ids: list[int]
    output_len: int


def corpus_ids(tokenizer) -> list[int]:
    """Token ids of the English documentation that ships with CPython (no download)."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return tokenizer.encode(text)


def make_workload(tokenizer, n: int, input_range, output_range, seed: int) -> list[Request]:
    rng = random.Random(seed)
    ids = corpus_ids(tokenizer)
    out = []
    for _ in range(n):
        lp, lo = rng.randint(*input_range), rng.randint(*output_range)
        start = rng.randrange(0, len(ids) - lp)
        out.append(Request(ids[start:start + lp], lo))
    return out

"""Run the real engine (the seeded tiny Llama, fp32 on CPU) with a student's part plugged in.

    run(prompts, gen, block_manager_cls=Student)   the student's BlockManager: LLMEngine builds
                                                   `BlockManager(num_blocks, block_size,
                                                   enable_prefix_caching)` (patched in for the
                                                   construction only)
    run(prompts, gen, decode=student_fn)           a backend, subclass of labkit's TorchBackend,
                                                   whose `decode` calls the student's function

Returns each request's generated token ids plus the engine's stats at the end. Requests arrive
in two waves (half, two steps, the rest), so later ones can hit the prefix cache of earlier
ones while those still run.
"""
from __future__ import annotations

import random
from unittest import mock

from labkit.config import EngineConfig, GenerationConfig
from labkit.layers.backend import TorchBackend

MODEL = "tiny-llama"      # 2 layers, 4 query / 2 KV heads of 16 dims, the real SmolLM2 vocabulary


class DecodeBackend(TorchBackend):
    """labkit's PyTorch references, except decode: the function under test."""
    name = "homework"

    def __init__(self, decode_fn):
        self.decode_fn = decode_fn
        self.calls = 0

    def decode(self, q, k_cache, v_cache, md, scale):
        self.calls += 1
        return self.decode_fn(q, k_cache, v_cache, md.block_tables, md.context_lens, scale)


def engine(block_manager_cls=None, **config):
    import labkit.engine.engine as engine_module
    ec = EngineConfig(device="cpu", dtype="float32", attention_backend="torch", **config)
    if block_manager_cls is None:
        return engine_module.LLMEngine(MODEL, ec)
    with mock.patch.object(engine_module, "BlockManager", block_manager_cls):
        return engine_module.LLMEngine(MODEL, ec)


def random_prompts(rng: random.Random, n: int, shared: int, lengths=(3, 24)) -> list[list[int]]:
    """n token-id prompts; every other one starts with the same `shared` tokens."""
    prefix = rng.choices(range(100, 49000), k=shared)
    out = []
    for i in range(n):
        tail = rng.choices(range(100, 49000), k=rng.randint(*lengths))
        out.append(prefix + tail if i % 2 == 0 else tail)
    return out


def run(prompts, gen: GenerationConfig, block_manager_cls=None, decode=None, **config):
    """-> (token ids per prompt, stats, the backend when `decode` was given)."""
    eng = engine(block_manager_cls, **config)
    backend = None
    if decode is not None:
        backend = DecodeBackend(decode)
        eng.runner.backend = backend
        eng.model.set_backend(backend)
    first, rest = prompts[:len(prompts) // 2], prompts[len(prompts) // 2:]
    ids = [eng.add_request(p, gen) for p in first]
    done = {}
    for _ in range(2):
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    ids += [eng.add_request(p, gen) for p in rest]
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return [done[i] for i in ids], eng.stats(), backend

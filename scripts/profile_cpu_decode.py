"""Profile the engine's CPU decode step (torch profiler): batch-1 and batch-32, fp32 or bf16.

    python scripts/profile_cpu_decode.py --dtype bf16 --batch 1 32 --context 128 --steps 16

Prompts of `context` tokens are prefilled, then `steps` engine steps (all decode) are timed
and profiled; prints ms per step, tok/s, the top ops by self CPU time and the op counts: every
aten op call the profiler saw (nested ones included, key_averages' calls summed) per step, and
per decoder layer (the calls under one layer's `record_function` range).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from labkit.config import EngineConfig, GenerationConfig
from labkit.engine.engine import LLMEngine


def decode_steps(eng, batch: int, context: int, steps: int, prof: bool):
    gc = GenerationConfig(max_new_tokens=steps + 4, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    for _ in range(batch):
        ids = torch.randint(100, 40000, (context,), generator=g).tolist()
        eng.add_request(ids, gc)
    while eng.num_steps == 0 or eng.last_batch is None or eng.last_batch.is_prefill:
        eng.step()                                   # prefill every prompt, first token out
    eng.step()                                       # one decode step of warm-up
    t0 = time.perf_counter()
    if prof:
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(steps):
                eng.step()
    else:
        for _ in range(steps):
            eng.step()
        p = None
    dt = (time.perf_counter() - t0) / steps
    while eng.has_unfinished():
        eng.step()
    return dt, p


def op_counts(p, steps: int) -> tuple[float, float]:
    """(aten ops per step, aten ops per decoder layer) from a profile of `steps` steps."""
    per_step = sum(e.count for e in p.key_averages() if e.key.startswith("aten::")) / steps

    def below(ev):                                   # aten calls nested under an event
        return sum(c.name.startswith("aten::") + below(c) for c in ev.cpu_children)
    layers = [e for e in p.events() if e.name == "decoder_layer"]
    per_layer = sum(below(e) for e in layers) / max(len(layers), 1)
    return per_step, per_layer


def count_layers(eng) -> None:
    """Wrap each decoder layer's forward in a profiler range, so its ops can be counted."""
    for layer in eng.model.layers:
        def fwd(*args, _f=layer.forward, **kw):
            with record_function("decoder_layer"):
                return _f(*args, **kw)
        layer.forward = fwd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    eng = LLMEngine(a.model, EngineConfig(dtype=a.dtype, max_batch_size=max(a.batch),
                                          session_len=a.context + a.steps + 16,
                                          cache_max_entry_count=0.5, enable_prefix_caching=False))
    print(f"{eng.dtype} threads {torch.get_num_threads()}")
    if not a.no_profile and not a.compile:
        count_layers(eng)
    if a.compile:                      # attention's host sync splits each layer in two graphs
        eager = [layer.forward for layer in eng.model.layers]
        compiled = [torch.compile(f, dynamic=True) for f in eager]
        for layer, f in zip(eng.model.layers, compiled):
            layer.forward = f
        t0 = time.perf_counter()
        for b in a.batch:
            decode_steps(eng, b, a.context, 2, False)
        print(f"compile + first steps: {time.perf_counter() - t0:.1f} s")
        for rnd in range(2):           # alternate eager and compiled: the machine is shared
            for name, fns in (("eager", eager), ("compiled", compiled)):
                for layer, f in zip(eng.model.layers, fns):
                    layer.forward = f
                for b in a.batch:
                    dt, _ = decode_steps(eng, b, a.context, a.steps, False)
                    print(f"{name:9s} batch {b:3d}: {dt * 1e3:7.2f} ms/step  {b / dt:8.1f} tok/s")
        return
    for b in a.batch:
        decode_steps(eng, b, a.context, 4, False)   # warm-up at this batch size
        dt, p = decode_steps(eng, b, a.context, a.steps, not a.no_profile)
        if p is not None:
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))
            per_step, per_layer = op_counts(p, a.steps)
            print(f"batch {b:3d}: {per_step:.0f} aten ops per step, {per_layer:.0f} per decoder layer")
        print(f"batch {b:3d}  context {a.context}: {dt * 1e3:7.2f} ms/step  {b / dt:8.1f} tok/s")


if __name__ == "__main__":
    main()

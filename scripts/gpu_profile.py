"""Where a GPU step's time goes: the throughput recipe step by step, a kernel profile of a
large decode step, and the decode kernel at SmolLM2's own attention shape.

    LABKIT_CACHE=DIR python scripts/gpu_profile.py [--json gpu_profile.json]

1. Step timeline: nano-vllm's recipe (256 requests, lengths uniform in [100, 1024], seed 0,
   ignore_eos) on `dummy:smollm2-135m`, bf16, CUDA graphs. Every step is cut into schedule,
   prepare (fill + upload + graph launch), GPU (CUDA events from the step's first upload to
   the sampled tokens), wait (host blocked on the sync) and postprocess (tokens appended,
   stops, outputs), summed separately for prefill and decode steps, beside the roofline.
2. Kernel profile (torch.profiler) of 4 decode steps at the largest batch of the recipe.
3. paged_decode vs SDPA on contiguous KV at SmolLM2's shape (9 query / 3 KV heads, d = 64).

Prints the tables last.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def instrument(engine):
    """Wrap the engine's step phases with timers; returns the per-step record list."""
    steps, cur = [], {}
    sched, execute, sampler, collect = (engine.scheduler.schedule, engine.runner.execute,
                                        engine.runner.sampler, engine.runner.collect)

    def t_schedule():
        t = time.perf_counter()
        b = sched()
        cur.update(t0=t, schedule=time.perf_counter() - t)
        return b

    def t_execute(seqs, n, is_prefill, *rest):
        ev0 = torch.cuda.Event(enable_timing=True)
        ev0.record()
        t = time.perf_counter()
        r = execute(seqs, n, is_prefill, *rest)
        cur.update(prepare=time.perf_counter() - t, ev0=ev0, prefill=is_prefill, B=len(seqs),
                   N=sum(n) if is_prefill else len(seqs))
        return r

    def t_sampler(logits, rows):
        out = sampler(logits, rows)
        ev1 = torch.cuda.Event(enable_timing=True)
        ev1.record()
        cur.update(ev1=ev1, t_sampled=time.perf_counter())
        return out

    def t_collect(step):
        r = collect(step)
        cur["t_run_end"] = time.perf_counter()
        return r

    engine.scheduler.schedule, engine.runner.execute = t_schedule, t_execute
    engine.runner.sampler, engine.runner.collect = t_sampler, t_collect
    step = engine.step

    def t_step():
        cur.clear()
        out = step()
        if "ev0" in cur:
            end = time.perf_counter()
            rec = {k: cur[k] for k in ("schedule", "prepare", "prefill", "B", "N")}
            rec["wait"] = cur["t_run_end"] - cur.get("t_sampled", cur["t_run_end"])
            rec["post"] = end - cur["t_run_end"]
            rec["total"] = end - cur["t0"]
            rec["_ev"] = (cur["ev0"], cur.get("ev1"))
            steps.append(rec)
        return out
    engine.step = t_step
    return steps


def timeline() -> dict:
    from labkit.bench.roofline import copy_bandwidth, workload_roofline_seconds
    from labkit.bench.workload import Request, make_workload
    from labkit.config import EngineConfig, GenerationConfig
    from labkit.engine.engine import LLMEngine
    from labkit.models.dummy import fold_ids
    # overlap off: the phases of a step are then sequential and can be cut apart (with it on,
    # `labkit bench throughput` measures the engine as it runs by default)
    engine = LLMEngine("dummy:smollm2-135m", EngineConfig(max_batch_size=256, session_len=2048,
                                                           device="cuda", dtype="bfloat16",
                                                           overlap_schedule=False))
    vocab = engine.model_config.vocab_size
    reqs = [Request(fold_ids(r.prompt_ids, vocab), r.output_len)
            for r in make_workload(engine.tokenizer, 256, (100, 1024), (100, 1024), 0)]
    gcs = [GenerationConfig(max_new_tokens=r.output_len, ignore_eos=True) for r in reqs]
    engine.generate([r.prompt_ids for r in reqs[:8]], gcs[:8])        # warm-up
    engine.reset_prefix_cache()
    steps = instrument(engine)
    t0 = time.perf_counter()
    engine.generate([r.prompt_ids for r in reqs], gcs)
    wall = time.perf_counter() - t0
    torch.cuda.synchronize()
    for s in steps:
        ev0, ev1 = s.pop("_ev")
        s["gpu"] = ev0.elapsed_time(ev1) / 1e3 if ev1 is not None else 0.0
    bw = copy_bandwidth(engine.device)
    roof = workload_roofline_seconds(engine.model, engine.stats()["kv_bytes_per_token"],
                                     [len(r.prompt_ids) for r in reqs], [r.output_len for r in reqs],
                                     256, bw)
    phases = {}
    for name, sel in (("prefill", [s for s in steps if s["prefill"]]),
                      ("decode", [s for s in steps if not s["prefill"]])):
        tot = defaultdict(float)
        for s in sel:
            for k in ("schedule", "prepare", "gpu", "wait", "post", "total"):
                tot[k] += s[k]
        phases[name] = {"steps": len(sel), "mean_B": sum(s["B"] for s in sel) / max(1, len(sel)),
                        **{k: v for k, v in tot.items()}}
    # decode steps by batch-size band: where the tail (few long requests) spends its time
    bands = {}
    for lo, hi in ((1, 16), (17, 64), (65, 128), (129, 256)):
        sel = [s for s in steps if not s["prefill"] and lo <= s["B"] <= hi]
        if sel:
            bands[f"{lo}-{hi}"] = {"steps": len(sel), "total": sum(s["total"] for s in sel),
                                   "gpu": sum(s["gpu"] for s in sel),
                                   "gpu_ms_per_step": 1e3 * sum(s["gpu"] for s in sel) / len(sel),
                                   "host_ms_per_step": 1e3 * sum(s["schedule"] + s["prepare"] + s["post"]
                                                                 for s in sel) / len(sel)}
    result = {"wall_s": wall, "roofline_s": roof, "copy_GBs": bw / 1e9,
              "output_tok_s": sum(r.output_len for r in reqs) / wall,
              "phases": phases, "decode_bands": bands}
    result["profile"] = kernel_profile(engine, reqs, gcs)
    engine.close()
    return result


def kernel_profile(engine, reqs, gcs) -> list:
    """torch.profiler over 4 decode steps once the whole recipe is running."""
    from torch.profiler import ProfilerActivity, profile
    engine.reset_prefix_cache()
    for r, g in zip(reqs, gcs):
        engine.add_request(r.prompt_ids, g, stream=False)
    for _ in range(200):                   # prefill everything
        engine.step()
        if engine.last_batch is not None and not engine.last_batch.is_prefill \
                and len(engine.last_batch.seqs) >= 200:
            break
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            engine.step()
        torch.cuda.synchronize()
    B = len(engine.last_batch.seqs)
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:14]:
        if e.self_device_time_total <= 0:
            continue
        rows.append({"name": e.key[:60], "calls": e.count,
                     "us_per_step": e.self_device_time_total / 4, "batch": B})
    while engine.has_unfinished():         # finish so the engine ends clean
        engine.step()
    return rows


def decode_step_profile(shape: str, batch: int, context: int, steps: int = 32) -> dict:
    """torch.profiler over `steps` decode steps of dummy:SHAPE at batch x context (engine as it
    runs by default: CUDA graphs, overlap on): device time per kernel per step, the step's wall
    time and the weight-bytes roofline."""
    from torch.profiler import ProfilerActivity, profile

    from labkit.bench.decode import engine_decode
    from labkit.bench.roofline import copy_bandwidth, decode_step_bytes
    from labkit.config import EngineConfig
    from labkit.engine.engine import LLMEngine
    engine = LLMEngine(f"dummy:{shape}", EngineConfig(max_batch_size=max(batch, 1), session_len=context + 256,
                                                      device="cuda", dtype="bfloat16",
                                                      cache_max_entry_count=0.5))
    wall = min(engine_decode(engine, batch, context, 32) for _ in range(2))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine_decode(engine, batch, context, steps)
    bw = copy_bandwidth(engine.device)
    roof = decode_step_bytes(engine.model, 0, []) / bw
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:16]:
        if e.self_device_time_total > 0:     # the prefill of engine_decode is in it too: small
            rows.append({"name": e.key[:70], "calls_per_step": e.count / steps,
                         "us_per_step": e.self_device_time_total / steps})
    engine.close()
    return {"shape": shape, "batch": batch, "context": context, "wall_ms": wall * 1e3,
            "weights_roofline_ms": roof * 1e3, "copy_GBs": bw / 1e9, "kernels": rows}


def smollm_decode_kernels() -> list:
    from labkit.bench.kernels import decode_point
    rows = []
    for B, L in ((256, 600), (128, 1024), (32, 1024), (1, 1024)):
        for bs in (64,):
            rows.append(decode_point(B, L, hq=9, hkv=3, d=64, block_size=bs))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--decode", nargs=3, metavar=("SHAPE", "BATCH", "CONTEXT"),
                    help="only profile decode steps of dummy:SHAPE (e.g. llama-2-7b 1 256)")
    args = ap.parse_args()
    t = time.perf_counter()
    if args.decode:
        r = decode_step_profile(args.decode[0], int(args.decode[1]), int(args.decode[2]))
        print(f"\n== decode {r['shape']} batch {r['batch']} ctx {r['context']}: {r['wall_ms']:.3f} ms/step, "
              f"weights alone {r['weights_roofline_ms']:.3f} ms at {r['copy_GBs']:.0f} GB/s")
        for k in r["kernels"]:
            print(f"  {k['us_per_step']:>9.1f} us  {k['calls_per_step']:>6.1f}x  {k['name']}")
        return 0
    res = {"device": torch.cuda.get_device_name(), "timeline": timeline()}
    res["decode_kernel_smollm2"] = smollm_decode_kernels()
    res["seconds"] = time.perf_counter() - t
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    tl = res["timeline"]
    print(f"\n== {res['device']} | recipe wall {tl['wall_s']:.2f} s, {tl['output_tok_s']:.0f} out tok/s, "
          f"roofline {tl['roofline_s']:.2f} s ({tl['roofline_s'] / tl['wall_s']:.0%}), copy {tl['copy_GBs']:.0f} GB/s")
    print(f"{'phase':<8}{'steps':>6}{'mean B':>8}{'sched':>8}{'prep':>8}{'gpu':>8}{'wait':>8}{'post':>8}{'total':>8}  (s)")
    for k, p in tl["phases"].items():
        print(f"{k:<8}{p['steps']:>6}{p['mean_B']:>8.1f}" + "".join(
            f"{p.get(c, 0):>8.3f}" for c in ("schedule", "prepare", "gpu", "wait", "post", "total")))
    print("decode by batch band: " + "; ".join(
        f"B {k}: {v['steps']} steps, {v['total']:.2f} s, gpu {v['gpu_ms_per_step']:.2f} ms/step, "
        f"host {v['host_ms_per_step']:.2f} ms/step" for k, v in tl["decode_bands"].items()))
    print("kernels of one decode step (batch %d):" % (tl["profile"][0]["batch"] if tl["profile"] else 0))
    for r in tl["profile"]:
        print(f"  {r['us_per_step']:>9.1f} us  {r['calls'] // 4:>5}x  {r['name']}")
    print("paged_decode at 9/3 heads, d=64, block 64:")
    for r in res["decode_kernel_smollm2"]:
        print(f"  B {r['B']:>4} L {r['L']:>5}: labkit {r['labkit_us']:.1f} us {r['labkit_GBs']:.0f} GB/s | "
              f"SDPA {r['sdpa_us']:.1f} us {r['sdpa_GBs']:.0f} GB/s | {r['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

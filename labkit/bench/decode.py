"""`labkit bench decode`: the engine's decode step against HF transformers and the roofline.

For each (batch, context) point: B requests with prompts of `context` random token ids are
prefilled, then `--steps` decode steps are timed (prefill excluded). Peers on the same
weights, in the same process:
  hf-eager    HF `generate`, dynamic cache, eager (what most users run)
  hf-compile  HF `generate` with cache_implementation="static", which makes `generate`
              torch.compile the decoding forward (what a careful user picks)
HF's decode time per step = (time of N new tokens - time of 1 new token) / (N - 1).
Roofline: (weight bytes + KV bytes read) / measured copy bandwidth (labkit/bench/roofline.py).
"""
from __future__ import annotations

import json
import time

import torch

from labkit.bench.common import commit, device_name
from labkit.bench.models import hf_model, model_source
from labkit.bench.roofline import copy_bandwidth, decode_step_bytes


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_decode(engine, batch: int, context: int, steps: int, seed: int = 0) -> float:
    """Seconds per decode step at `batch` sequences of about `context` tokens."""
    from labkit.config import GenerationConfig
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    engine.reset_prefix_cache()
    # early sequences decode while later ones still prefill: leave them room, abort after timing
    gc = GenerationConfig(max_new_tokens=steps + 100, ignore_eos=True)
    ids = [engine.add_request(torch.randint(0, vocab, (context,), generator=g).tolist(), gc)
           for _ in range(batch)]
    while engine.scheduler.waiting or any(s.num_output_tokens == 0 for s in engine.scheduler.running):
        engine.step()                                   # prefill until every one decodes
    _sync(engine.device)
    running, tokens, n0 = 0, 0, engine.generated_tokens_total
    host0 = engine.host_seconds + engine.runner.prepare_seconds
    t0 = time.perf_counter()
    for _ in range(steps):
        running += len(engine.scheduler.running)
        tokens += sum(s.num_tokens for s in engine.scheduler.running)
        engine.step()
    _sync(engine.device)
    dt = (time.perf_counter() - t0) / steps
    assert engine.generated_tokens_total - n0 == batch * steps, "a sequence left the batch"
    host = (engine.host_seconds + engine.runner.prepare_seconds - host0) / steps
    engine.last_contexts = (running / steps, tokens / steps, host)   # mean batch, KV tokens, host s
    for rid in ids:
        engine.abort(rid)
    return dt


def hf_decode(model, batch: int, context: int, steps: int, vocab: int, static: bool) -> float:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, context), generator=g).to(model.device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if static:
        kw["cache_implementation"] = "static"

    def gen(n):
        _sync(model.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        _sync(model.device)
        return time.perf_counter() - t0

    gen(steps)                                          # warm-up (compiles when static)
    t1, tn = min(gen(1) for _ in range(2)), min(gen(steps) for _ in range(2))
    return (tn - t1) / (steps - 1)


def decode_bench(args) -> dict:
    from labkit.config import EngineConfig
    from labkit.engine.engine import LLMEngine
    points = [tuple(map(int, p.split("x"))) for p in args.points]        # (batch, context)
    max_b = max(b for b, _ in points)
    # room for every sequence at once: the cache is capped at max_batch_size x session_len
    session = max(c for _, c in points) + args.steps + 2 * 64 + 2
    model = model_source(args)
    ec = EngineConfig(device=args.device, dtype=args.dtype, max_batch_size=max_b,
                      session_len=session, cache_max_entry_count=args.cache_max_entry_count,
                      enforce_eager=args.enforce_eager,
                      overlap_schedule=False if args.no_overlap else None)
    engine = LLMEngine(model, ec)
    dev, cfg = engine.device, engine.model_config
    bw = copy_bandwidth(dev) if dev.type == "cuda" else copy_bandwidth(dev, 0.25, 3)
    kvb = engine.stats()["kv_bytes_per_token"]
    peers = [p for p in args.peers.split(",") if p] if args.peers else []
    rows = []
    for b, c in points:
        t = engine_decode(engine, b, c, args.steps)
        mean_b, kv_tokens, host = engine.last_contexts
        roof = decode_step_bytes(engine.model, kvb, [kv_tokens]) / bw
        rows.append({"batch": b, "context": c, "mean_running": mean_b, "mean_kv_tokens": kv_tokens,
                     "labkit_ms": t * 1e3, "labkit_tok_s": b / t, "host_ms": host * 1e3,
                     "roofline_ms": roof * 1e3, "fraction_of_roofline": roof / t})
        print(json.dumps(rows[-1]), flush=True)
    info = {"weight_bytes": decode_step_bytes(engine.model, 0, []),
            "cuda_graphs": engine.runner.graphs is not None, "overlap_schedule": engine.overlap,
            "dtype": str(engine.dtype).replace("torch.", "")}
    if peers:               # HF after the engine is gone: both KV caches at once may not fit
        dtype = engine.dtype
        del engine
        _free(dev)
        hf = hf_model(model, cfg, dtype, dev)
        for row in rows:
            for p in peers:
                th = hf_decode(hf, row["batch"], row["context"], args.steps, cfg.vocab_size,
                               static=(p == "hf-compile"))
                row[f"{p}_ms"], row[f"{p}_tok_s"] = th * 1e3, row["batch"] / th
                print(json.dumps({k: row[k] for k in ("batch", "context", f"{p}_tok_s")}), flush=True)
                _free(dev)
    return {"benchmark": "decode", "model": model, "commit": commit(),
            "date": time.strftime("%Y-%m-%d"), "device": device_name(dev),
            "copy_bandwidth_GBs": bw / 1e9, "kv_bytes_per_token": kvb, "steps": args.steps,
            "rows": rows, **info}


def _free(dev):
    import gc
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def print_table(r: dict) -> None:
    print(f"decode: {r['model']} | {r['device']} {r['dtype']} | commit {r['commit']} | copy "
          f"{r['copy_bandwidth_GBs']:.0f} GB/s | weights {r['weight_bytes'] / 1e9:.2f} GB | "
          f"CUDA graphs {'on' if r['cuda_graphs'] else 'off'} | "
          f"overlap scheduling {'on' if r.get('overlap_schedule') else 'off'}")
    peers = sorted({k[:-6] for row in r["rows"] for k in row if k.endswith("_tok_s") and k != "labkit_tok_s"})
    head = f"{'batch':>6}{'ctx':>7}{'labkit ms':>11}{'host ms':>9}{'tok/s':>10}{'roofline':>10}" + \
           "".join(f"{p + ' tok/s':>17}" for p in peers)
    print(head)
    for row in r["rows"]:
        print(f"{row['batch']:>6}{row['context']:>7}{row['labkit_ms']:>11.3f}{row['host_ms']:>9.3f}"
              f"{row['labkit_tok_s']:>10.0f}"
              f"{row['fraction_of_roofline']:>9.0%} " +
              "".join(f"{row[p + '_tok_s']:>17.0f}" for p in peers))


def main(args) -> int:
    r = decode_bench(args)
    print_table(r)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(r, f, indent=1)
    if args.json:
        print(json.dumps(r))
    return 0

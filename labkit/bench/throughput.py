"""`labkit bench throughput`: the engine against HF transformers on the same requests.

Workload (as vLLM's benchmark_throughput): N requests, prompt lengths uniform in [a, b] (real
English text from CPython's bundled docs, cut to length), output lengths uniform in [c, d],
ignore_eos so every request produces exactly its output length.

Peer, measured in the same run: HF `generate` the way a user without an engine runs it,
static batches of max_batch_size, left-padded, each batch running until its longest output
is done (min_new_tokens = max_new_tokens = that length). Output tokens/s counts only the
tokens requests asked for, for both.
"""
from __future__ import annotations

import json
import sys
import time

from labkit.bench.common import alternate, commit, device_name
from labkit.bench.workload import Request, make_workload


def run_engine(engine, reqs: list[Request]) -> dict:
    from labkit.config import GenerationConfig
    # Repeated runs send the same prompts: start each from an empty prefix cache, so no run
    # is served from blocks an earlier run left behind (HF keeps nothing between calls).
    engine.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = engine.generate([r.prompt_ids for r in reqs],
                           [GenerationConfig(max_new_tokens=r.output_len, ignore_eos=True) for r in reqs])
    dt = time.perf_counter() - t0
    n_out = sum(len(o.token_ids) for o in outs)
    assert n_out == sum(r.output_len for r in reqs), "every request must produce its output length"
    ttft = sorted(o.metrics["ttft_s"] for o in outs)
    return {"seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt,
            "requests_s": len(reqs) / dt, "ttft_p50_s": ttft[len(ttft) // 2],
            "prefix_cache_hit_tokens": sum(o.num_prefix_hit_tokens for o in outs),
            "preemptions": engine.stats()["preemptions"]}


def run_hf(model, reqs: list[Request], batch_size: int, pad_id: int, device) -> dict:
    import torch
    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch_size):
        chunk = reqs[i:i + batch_size]
        width = max(len(r.prompt_ids) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(chunk):                     # left padding
            ids[j, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[j, width - len(r.prompt_ids):] = 1
        longest = max(r.output_len for r in chunk)
        with torch.inference_mode():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                           max_new_tokens=longest, min_new_tokens=longest, pad_token_id=pad_id)
    dt = time.perf_counter() - t0
    n_out = sum(r.output_len for r in reqs)
    return {"seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt,
            "requests_s": len(reqs) / dt}


RECIPES = {
    # nano-vllm's bench.py: 256 requests, prompt and output lengths uniform in [100, 1024]
    "nanovllm": dict(num_requests=256, input_len=[100, 1024], output_len=[100, 1024], seed=0,
                     max_batch_size=256, session_len=2048),
}


def throughput(args) -> dict:
    from labkit.bench.models import model_source
    from labkit.config import EngineConfig
    from labkit.engine.engine import LLMEngine
    for k, v in RECIPES.get(args.recipe, {}).items():
        setattr(args, k, v)
    model = model_source(args)
    ec = EngineConfig(max_batch_size=args.max_batch_size, session_len=args.session_len,
                      cache_max_entry_count=args.cache_max_entry_count, device=args.device,
                      dtype=args.dtype, tp=args.tp,
                      overlap_schedule=False if args.no_overlap else None)
    engine = LLMEngine(model, ec)
    try:
        return _measure(args, model, engine)
    finally:
        engine.close()                     # tp > 1: stop the other ranks' processes


def _measure(args, model, engine) -> dict:
    import torch

    from labkit.bench.models import hf_model
    from labkit.bench.roofline import copy_bandwidth, workload_roofline_seconds
    from labkit.models.dummy import fold_ids
    vocab = engine.model_config.vocab_size
    reqs = make_workload(engine.tokenizer, args.num_requests, args.input_len, args.output_len, args.seed)
    reqs = [Request(fold_ids(r.prompt_ids, vocab), r.output_len) for r in reqs]
    one = [Request(reqs[0].prompt_ids[:16], args.batch1_output_len)]
    warm = make_workload(engine.tokenizer, 2, (16, 32), (4, 8), args.seed + 1)
    warm = [Request(fold_ids(r.prompt_ids, vocab), r.output_len) for r in warm]
    pad = engine.tokenizer.eos_token_id % vocab
    peers = args.peer or ["hf"]
    hf = None if args.no_hf or "hf" not in peers else \
        hf_model(model, engine.model_config, engine.dtype, engine.device)
    run_engine(engine, warm)
    if hf is not None:
        run_hf(hf, warm, 2, pad, engine.device)
    bw = copy_bandwidth(engine.device) if engine.device.type == "cuda" else \
        copy_bandwidth(engine.device, 0.25, 3)
    roof = workload_roofline_seconds(engine.model, engine.stats()["kv_bytes_per_token"],
                                     [len(r.prompt_ids) for r in reqs], [r.output_len for r in reqs],
                                     args.max_batch_size, bw)
    result = {"benchmark": "throughput", "model": str(model), "commit": commit(),
              "date": time.strftime("%Y-%m-%d"), "device": device_name(engine.device),
              "dtype": str(engine.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
              "repeats": args.repeats, "copy_bandwidth_GBs": bw / 1e9, "roofline_seconds": roof,
              "cuda_graphs": engine.runner.graphs is not None, "tp": engine.config.tp,
              "overlap_schedule": engine.overlap,
              "workload": {"num_requests": args.num_requests, "input_len": list(args.input_len),
                           "output_len": list(args.output_len), "seed": args.seed,
                           "max_batch_size": args.max_batch_size, "ignore_eos": True}}
    fns = {"labkit": lambda: run_engine(engine, reqs)}
    if hf is not None:
        fns["hf"] = lambda: run_hf(hf, reqs, args.max_batch_size if args.hf_batch_size is None
                                   else args.hf_batch_size, pad, engine.device)
    if "llamacpp" in peers:                           # labkit/bench/llamacpp.py
        from labkit.bench.llamacpp import llamacpp_measurements
        llama_fns, result["llamacpp_peer"] = llamacpp_measurements(
            model, reqs, one, warm, args.session_len, torch.get_num_threads())
        if not llama_fns:
            print(f"llama.cpp peer skipped: {result['llamacpp_peer']['skipped']}", file=sys.stderr)
        fns.update(llama_fns)
    fns["labkit_batch1"] = lambda: run_engine(engine, one)
    if hf is not None:
        fns["hf_batch1"] = lambda: run_hf(hf, one, 1, pad, engine.device)
    result.update(alternate(fns, args.repeats))
    result["fraction_of_roofline"] = roof / result["labkit"]["seconds"]
    result["host_ms_per_step"] = engine.stats().get("host_ms_per_step")
    if hf is not None:
        result["speedup"] = result["labkit"]["output_tok_s"] / result["hf"]["output_tok_s"]
        result["speedup_batch1"] = result["labkit_batch1"]["output_tok_s"] / result["hf_batch1"]["output_tok_s"]
    if "llamacpp" in result:
        result["speedup_vs_llamacpp"] = result["labkit"]["output_tok_s"] / result["llamacpp"]["output_tok_s"]
        result["speedup_vs_llamacpp_batch1"] = (result["labkit_batch1"]["output_tok_s"]
                                                / result["llamacpp_batch1"]["output_tok_s"])
    return result


def print_table(r: dict) -> None:
    w = r["workload"]
    print(f"throughput: {w['num_requests']} requests, prompt {w['input_len']}, output {w['output_len']}, "
          f"max_batch_size {w['max_batch_size']}, seed {w['seed']} | {r['device']} {r['dtype']} | "
          f"commit {r['commit']} | median of {r['repeats']} | "
          f"overlap scheduling {'on' if r.get('overlap_schedule') else 'off'}")
    print(f"{'engine':<28}{'seconds':>10}{'out tok/s':>12}{'req/s':>10}")
    rows = [("labkit (continuous batching)", r["labkit"]), ("HF generate (static batches)", r.get("hf")),
            ("llama.cpp (one at a time)", r.get("llamacpp")),
            ("labkit batch 1", r["labkit_batch1"]), ("HF generate batch 1", r.get("hf_batch1")),
            ("llama.cpp batch 1", r.get("llamacpp_batch1"))]
    for name, m in rows:
        if m:
            print(f"{name:<28}{m['seconds']:>10.2f}{m['output_tok_s']:>12.1f}{m['requests_s']:>10.3f}")
    print(f"roofline (weights + KV reads at {r['copy_bandwidth_GBs']:.0f} GB/s): "
          f"{r['roofline_seconds']:.2f} s -> labkit at {r['fraction_of_roofline']:.0%} of it")
    if "speedup" in r:
        print(f"speedup vs HF: {r['speedup']:.2f}x (mixed workload), {r['speedup_batch1']:.2f}x (batch-1 decode)")
    if "speedup_vs_llamacpp" in r:
        print(f"speedup vs llama.cpp: {r['speedup_vs_llamacpp']:.2f}x (mixed workload), "
              f"{r['speedup_vs_llamacpp_batch1']:.2f}x (batch-1 decode)")


def main(args) -> int:
    r = throughput(args)
    print_table(r)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(r, f, indent=1)
    if args.json:
        print(json.dumps(r))
    return 0


def add_throughput_args(t) -> None:
    from labkit.bench.args import add_model_args
    from labkit.engine_args import flag
    add_model_args(t)
    flag(t, "recipe", choices=sorted(RECIPES), help="a named workload (overrides the sizes): "
         "nanovllm = 256 requests, lengths uniform in [100, 1024], seed 0")
    flag(t, "num_requests", type=int, default=32)
    flag(t, "input_len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    flag(t, "output_len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    flag(t, "tp", type=int, default=1, help="tensor-parallel ranks (processes; GPUs on CUDA)")
    flag(t, "max_batch_size", type=int, default=64)   # config.ini's default
    flag(t, "session_len", type=int, default=1024)
    flag(t, "cache_max_entry_count", type=float, default=0.8)
    flag(t, "batch1_output_len", type=int, default=64)
    flag(t, "hf_batch_size", type=int, help="HF's static batch size (default: max_batch_size)")
    flag(t, "seed", type=int, default=0)
    flag(t, "repeats", type=int, default=3, help="runs per measurement; the median is reported")
    flag(t, "no_hf", action="store_true", help="skip the HF transformers baseline")
    flag(t, "peer", action="append", choices=["hf", "llamacpp"],
         help="peer(s) measured in the same run (repeatable; default hf); llamacpp needs "
              "llama-cpp-python (the bench extra) and a .gguf model")
    flag(t, "output", help="also write the JSON result to this file")
    t.add_argument("--json", action="store_true", help="print one JSON object as the last line")

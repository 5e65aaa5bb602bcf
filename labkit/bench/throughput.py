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


def load_hf(model_path, dtype, device):
    """HF transformers' own model on the same weights (from the source or a workspace)."""
    from transformers import AutoModelForCausalLM
    from labkit.convert import inspect_model
    from labkit.models import bundled
    info = inspect_model(model_path)
    src = info.source
    if src is None:                # a workspace: find the source it was converted from
        src = bundled.bundled_gguf_path() if info.config.model_name == bundled.BUNDLED_MODEL_NAME else None
    if src is None:
        raise ValueError("the HF baseline needs the source model (alias, HF dir or .gguf), not a workspace")
    kw = {"gguf_file": src.name} if src.suffix == ".gguf" else {}
    path = src.parent if src.suffix == ".gguf" else src
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kw).to(device).eval()


def throughput(args) -> dict:
    import torch
    from labkit.config import EngineConfig
    from labkit.engine.engine import LLMEngine
    ec = EngineConfig(max_batch_size=args.max_batch_size, session_len=args.session_len,
                      cache_max_entry_count=args.cache_max_entry_count, device=args.device,
                      dtype=args.dtype)
    engine = LLMEngine(args.model, ec)
    reqs = make_workload(engine.tokenizer, args.num_requests, args.input_len, args.output_len, args.seed)
    one = [Request(reqs[0].prompt_ids[:16], args.batch1_output_len)]
    warm = make_workload(engine.tokenizer, 2, (16, 32), (4, 8), args.seed + 1)
    pad = engine.tokenizer.eos_token_id
    peers = args.peer or ["hf"]
    hf = None if args.no_hf or "hf" not in peers else load_hf(args.model, engine.dtype, engine.device)
    run_engine(engine, warm)
    if hf is not None:
        run_hf(hf, warm, 2, pad, engine.device)
    result = {"benchmark": "throughput", "model": str(args.model), "commit": commit(),
              "date": time.strftime("%Y-%m-%d"), "device": device_name(engine.device),
              "dtype": str(engine.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
              "repeats": args.repeats,
              "workload": {"num_requests": args.num_requests, "input_len": list(args.input_len),
                           "output_len": list(args.output_len), "seed": args.seed,
                           "max_batch_size": args.max_batch_size, "ignore_eos": True}}
    fns = {"labkit": lambda: run_engine(engine, reqs)}
    if hf is not None:
        fns["hf"] = lambda: run_hf(hf, reqs, args.max_batch_size, pad, engine.device)
    if "llamacpp" in peers:                           # labkit/bench/llamacpp.py
        from labkit.bench.llamacpp import llamacpp_measurements
        llama_fns, result["llamacpp_peer"] = llamacpp_measurements(
            args.model, reqs, one, warm, args.session_len, torch.get_num_threads())
        if not llama_fns:
            print(f"llama.cpp peer skipped: {result['llamacpp_peer']['skipped']}", file=sys.stderr)
        fns.update(llama_fns)
    fns["labkit_batch1"] = lambda: run_engine(engine, one)
    if hf is not None:
        fns["hf_batch1"] = lambda: run_hf(hf, one, 1, pad, engine.device)
    result.update(alternate(fns, args.repeats))
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
          f"commit {r['commit']} | median of {r['repeats']}")
    print(f"{'engine':<28}{'seconds':>10}{'out tok/s':>12}{'req/s':>10}")
    rows = [("labkit (continuous batching)", r["labkit"]), ("HF generate (static batches)", r.get("hf")),
            ("llama.cpp (one at a time)", r.get("llamacpp")),
            ("labkit batch 1", r["labkit_batch1"]), ("HF generate batch 1", r.get("hf_batch1")),
            ("llama.cpp batch 1", r.get("llamacpp_batch1"))]
    for name, m in rows:
        if m:
            print(f"{name:<28}{m['seconds']:>10.2f}{m['output_tok_s']:>12.1f}{m['requests_s']:>10.3f}")
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
    from labkit.engine_args import flag
    t.add_argument("model", nargs="?", default="smollm2-135m")
    flag(t, "num_requests", type=int, default=32)
    flag(t, "input_len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    flag(t, "output_len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    flag(t, "max_batch_size", type=int, default=64)   # config.ini's default
    flag(t, "session_len", type=int, default=1024)
    flag(t, "cache_max_entry_count", type=float, default=0.8)
    flag(t, "batch1_output_len", type=int, default=64)
    flag(t, "device", default="auto")
    flag(t, "dtype", default="auto", help="auto (bf16 on GPU and on CPUs with native bf16, else fp32) | fp32 | bf16")
    flag(t, "seed", type=int, default=0)
    flag(t, "repeats", type=int, default=3, help="runs per measurement; the median is reported")
    flag(t, "no_hf", action="store_true", help="skip the HF transformers baseline")
    flag(t, "peer", action="append", choices=["hf", "llamacpp"],
         help="peer(s) measured in the same run (repeatable; default hf); llamacpp needs "
              "llama-cpp-python (the bench extra) and a .gguf model")
    flag(t, "output", help="also write the JSON result to this file")
    t.add_argument("--json", action="store_true", help="print one JSON object as the last line")

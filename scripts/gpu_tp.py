"""Issue 14: the tensor-parallel engine on two GPUs (NCCL), against tp=1 on the same weights.

    python scripts/gpu_tp.py [--steps 64] [--context 1024] [--json out.json]

Needs 2 GPUs (nvidia-h200-x2), torch + triton + transformers + safetensors, and the bundled
tokenizer folder ($LABKIT_CACHE/smollm2-tokenizer): weights are random in real shapes
(`dummy:`), made on each GPU. NCCL_NVLS_ENABLE=0 is set here, before torch loads, so every
process (this one and the ranks it spawns) inherits it.

1. all-reduce (NCCL, 2 fresh processes): time per message at the sizes a decode step sends,
   B x hidden x 2 bytes (bf16) for B = 1 and 64, and 2 x layers of them per step
2. correctness, fp32, dummy:llama-3.2-1b: greedy tokens at tp=2 (CUDA graphs, and eager)
   equal tp=1 for random-id prompts
3. decode at context 1024 on dummy:llama-2-7b (bf16, CUDA graphs): ms per step at batch 1
   (latency) and batch 64 (throughput), tp=1 then tp=2
The table printed last is what goes into docs/PERF.md.
"""
from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")       # before torch: inherited by every rank

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from labkit.config import EngineConfig, GenerationConfig  # noqa: E402
from labkit.engine.engine import LLMEngine  # noqa: E402
from labkit.models.dummy import MODEL_SHAPES  # noqa: E402


def free_gpu_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def all_reduce_times(hidden: int, layers: int, batches: list[int]) -> list[dict]:
    from labkit.dist.comm import time_all_reduce
    from labkit.dist.ranks import run_ranks
    sizes = [b * hidden * 2 for b in batches]                 # one step's message, bf16
    rows = run_ranks(time_all_reduce, 2, sizes, 50, 10, backend="nccl")[0]
    for b, r in zip(batches, rows):
        r.update(batch=b, per_step_ms=2 * layers * r["seconds"] * 1e3)
    return rows


def greedy(model: str, tp: int, prompts: list[list[int]], n: int, eager: bool) -> list[list[int]]:
    ec = EngineConfig(tp=tp, dtype="float32", max_batch_size=8, session_len=512,
                      cache_max_entry_count=0.3, enforce_eager=eager)
    engine = LLMEngine(model, ec)
    try:
        gc_ = GenerationConfig(max_new_tokens=n, ignore_eos=True)
        return [o.token_ids for o in engine.generate(prompts, gc_)]
    finally:
        engine.close()
        del engine
        free_gpu_memory()


def correctness(shape: str, n: int = 32) -> dict:
    cfg = MODEL_SHAPES[shape]
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    prompts = [torch.randint(0, cfg.vocab_size, (L,), generator=g).tolist() for L in (7, 60, 200, 301)]
    ref = greedy(f"dummy:{shape}", 1, prompts, n, eager=False)
    out = {}
    for eager in (False, True):
        got = greedy(f"dummy:{shape}", 2, prompts, n, eager)
        same = sum(a == b for x, y in zip(got, ref) for a, b in zip(x, y))
        out["eager" if eager else "graphs"] = {"equal": got == ref, "tokens_equal": same,
                                               "tokens": sum(map(len, ref))}
    return out


def decode(shape: str, tp: int, batches: list[int], context: int, steps: int) -> list[dict]:
    """ms per decode step; with CUDA graphs, or eagerly if capturing them failed (reported)."""
    try:
        return _decode(shape, tp, batches, context, steps, eager=False)
    except Exception as e:                                    # noqa: BLE001 - reported, then eager
        print(f"tp={tp} with CUDA graphs failed ({type(e).__name__}: {e}); retrying eagerly",
              flush=True)
        free_gpu_memory()
        return _decode(shape, tp, batches, context, steps, eager=True)


def _decode(shape, tp, batches, context, steps, eager: bool) -> list[dict]:
    from labkit.bench.decode import engine_decode
    ec = EngineConfig(tp=tp, max_batch_size=max(batches), session_len=context + steps + 130,
                      cache_max_entry_count=0.8, enforce_eager=eager)
    engine = LLMEngine(f"dummy:{shape}", ec)
    try:
        rows = []
        for b in batches:
            engine_decode(engine, b, context, 8)              # warm-up
            t = engine_decode(engine, b, context, steps)
            rows.append({"tp": tp, "batch": b, "context": context, "ms": t * 1e3, "tok_s": b / t,
                         "cuda_graphs": engine.runner.graphs is not None})
            print(json.dumps(rows[-1]), flush=True)
        return rows
    finally:
        engine.close()
        del engine
        free_gpu_memory()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check-shape", default="llama-3.2-1b")
    p.add_argument("--shape", default="llama-2-7b")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if torch.cuda.device_count() < 2:
        print(f"needs 2 GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 1
    cfg = MODEL_SHAPES[args.shape]
    t0 = time.time()
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0),
              "gpus": torch.cuda.device_count(), "torch": torch.__version__,
              "nccl": ".".join(map(str, torch.cuda.nccl.version())),
              "NCCL_NVLS_ENABLE": os.environ["NCCL_NVLS_ENABLE"]}
    result["all_reduce"] = all_reduce_times(cfg.hidden_size, cfg.num_layers, args.batches)
    if not args.skip_check:
        result["correctness"] = correctness(args.check_shape)
        print(json.dumps(result["correctness"]), flush=True)
    result["decode"] = [r for tp in (1, 2)
                        for r in decode(args.shape, tp, args.batches, args.context, args.steps)]
    result["seconds"] = time.time() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print_table(result, args)
    return 0 if all(c["equal"] for c in result.get("correctness", {}).values()) else 1


def print_table(r: dict, args) -> None:
    print(f"\ntensor parallel on {r['gpus']} x {r['device']} | torch {r['torch']} NCCL {r['nccl']} "
          f"| NCCL_NVLS_ENABLE={r['NCCL_NVLS_ENABLE']} | {r['date']}")
    for mode, c in r.get("correctness", {}).items():
        print(f"correctness dummy:{args.check_shape} fp32, tp=2 ({mode}) vs tp=1: "
              f"{'EQUAL' if c['equal'] else 'DIFFERENT'} ({c['tokens_equal']}/{c['tokens']} tokens)")
    one = {(d["batch"]): d for d in r["decode"] if d["tp"] == 1}
    ar = {a["batch"]: a for a in r["all_reduce"]}
    print(f"decode dummy:{args.shape} bf16, context {args.context}:")
    print(f"{'tp':>3}{'batch':>6}{'graphs':>7}{'ms/step':>10}{'tok/s':>10}{'vs tp=1':>9}"
          f"{'all-reduce us':>15}{'x 2L ms':>9}")
    for d in r["decode"]:
        a = ar[d["batch"]]
        comm = f"{a['seconds'] * 1e6:>15.1f}{a['per_step_ms']:>9.2f}" if d["tp"] > 1 else ""
        print(f"{d['tp']:>3}{d['batch']:>6}{'yes' if d['cuda_graphs'] else 'no':>7}{d['ms']:>10.2f}{d['tok_s']:>10.0f}"
              f"{one[d['batch']]['ms'] / d['ms']:>8.2f}x{comm}")


if __name__ == "__main__":
    sys.exit(main())

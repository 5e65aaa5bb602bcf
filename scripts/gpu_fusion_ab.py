"""Which decode-step fusions pay off on this GPU: the engine on dummy weights with each of
TritonBackend's fusion switches (labkit/layers/backend.py) and programmatic dependent launch
(kernels/_triton.py PDL) on or off, decode ms per step (CUDA graphs, overlap scheduling; best
of 3 runs of 32 steps) at batch x context points.

    LABKIT_CACHE=DIR python scripts/gpu_fusion_ab.py [--shape llama-2-7b] [--points 1x256 16x1024]
        [--combos before pdl ...]     (--shape llama-2-7b:int4 for the W4A16 dummy model)
    LABKIT_CACHE=DIR python scripts/gpu_fusion_ab.py --recipe    (nano-vllm's recipe instead,
                                                 SmolLM2-135M shape, one engine per setting)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# RoPE + store_kv fused in every setting (measured before: docs/PERF.md); "before" is the
# default until PDL and the SwiGLU epilogue
COMBOS = {"before": dict(fuse_rope_store_kv=True),
          "pdl": dict(fuse_rope_store_kv=True, pdl=True),
          "gate": dict(fuse_rope_store_kv=True, fuse_gate_up_silu=True),
          "pdl+gate": dict(fuse_rope_store_kv=True, pdl=True, fuse_gate_up_silu=True),
          "pdl+gate+norm": dict(fuse_rope_store_kv=True, pdl=True, fuse_gate_up_silu=True,
                                fuse_norm_linear=True)}
SWITCHES = ("fuse_rope_store_kv", "fuse_norm_linear", "fuse_gate_up_silu")


def apply(switches: dict) -> None:
    """Set every switch: those not named are off."""
    import kernels._triton
    from labkit.layers.backend import TritonBackend
    for n in SWITCHES:
        setattr(TritonBackend, n, switches.get(n, False))
    kernels._triton.PDL = switches.get("pdl", False)


def main() -> int:
    from labkit.bench.decode import engine_decode
    from labkit.config import EngineConfig
    from labkit.engine.engine import LLMEngine
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--points", nargs="+", default=["1x256", "16x1024"])
    ap.add_argument("--json", default="fusion_ab.json")
    ap.add_argument("--recipe", action="store_true")
    ap.add_argument("--combos", nargs="+", default=list(COMBOS), choices=list(COMBOS))
    args = ap.parse_args()
    combos = {k: COMBOS[k] for k in args.combos}
    if args.recipe:
        return recipe(args.json, combos)
    points = [tuple(map(int, p.split("x"))) for p in args.points]
    rows = []
    for label, switches in combos.items():
        apply(switches)
        eng = LLMEngine(f"dummy:{args.shape}", EngineConfig(
            device="cuda", dtype="bfloat16", max_batch_size=max(b for b, _ in points),
            session_len=max(c for _, c in points) + 256, cache_max_entry_count=0.5))
        for b, c in points:
            ms = min(engine_decode(eng, b, c, 32) for _ in range(3)) * 1e3
            rows.append({"fusions": label, "batch": b, "context": c, "ms": ms})
            print(json.dumps(rows[-1]), flush=True)
        del eng
        torch.cuda.empty_cache()
    Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\ndecode ms per step, dummy:{args.shape}, {torch.cuda.get_device_name()}")
    for b, c in points:
        base = next(r["ms"] for r in rows if (r["batch"], r["context"]) == (b, c))
        print(f"  batch {b} ctx {c}: " + " | ".join(
            f"{r['fusions']} {r['ms']:.3f} ({base / r['ms']:.3f}x)" for r in rows
            if (r["batch"], r["context"]) == (b, c)))
    return 0


def recipe(out: str, combos: dict) -> int:
    """`labkit bench throughput --recipe nanovllm` (dummy SmolLM2-135M, 3 repeats, no HF) once
    per fusion setting, in one process and one lease (leases differ by up to 30%)."""
    import argparse as ap_

    from labkit.bench.throughput import add_throughput_args, throughput
    p = ap_.ArgumentParser()
    add_throughput_args(p)
    args = p.parse_args(["--load-format", "dummy", "--model-shape", "smollm2-135m", "--recipe",
                         "nanovllm", "--repeats", "3", "--no-hf"])
    rows = []
    for label, switches in combos.items():
        apply(switches)
        r = throughput(args)
        rows.append({"fusions": label, "seconds": r["labkit"]["seconds"],
                     "all_seconds": r["labkit"]["all_seconds"],
                     "fraction_of_roofline": r["fraction_of_roofline"]})
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    Path(out).write_text(json.dumps(rows, indent=1))
    print("\nrecipe seconds (median of 3) by fusion setting: " + " | ".join(
        f"{r['fusions']} {r['seconds']:.2f} s ({r['fraction_of_roofline']:.0%})" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

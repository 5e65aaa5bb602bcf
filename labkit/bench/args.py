"""Command-line flags of the benchmarks (light: no torch import until a benchmark runs)."""
from __future__ import annotations

from labkit.engine_args import flag

MODEL_SHAPES = ("llama-2-7b", "llama-3-8b", "llama-3.2-1b", "smollm2-135m")   # labkit.models.dummy.MODEL_SHAPES


def add_model_args(p, default_model: str = "smollm2-135m") -> None:
    p.add_argument("model", nargs="?", default=default_model,
                   help="alias, workspace, HF dir or .gguf (ignored with --load-format dummy)")
    flag(p, "load_format", default="auto", choices=["auto", "dummy"],
         help="dummy: random weights of --model-shape made on the device (no model file)")
    flag(p, "model_shape", default="smollm2-135m", choices=MODEL_SHAPES,
         help="the shape of the dummy weights")
    flag(p, "device", default="auto", help="auto | cpu | cuda | cuda:N")
    flag(p, "dtype", default="auto",
         help="auto (bf16 on CUDA, on CPUs with native bf16 and for int4 weights, else fp32) | fp32 | bf16 | fp16")
    flag(p, "no_overlap", action="store_true",
         help="overlap scheduling off: each step scheduled after the previous step's tokens are read")


def add_decode_args(p) -> None:
    add_model_args(p)
    flag(p, "points", nargs="+", default=["1x128", "1x1024", "16x1024", "64x1024"],
         help="BATCHxCONTEXT points to measure")
    flag(p, "steps", type=int, default=64, help="decode steps timed per point")
    flag(p, "peers", default="hf-eager", help="comma list of hf-eager, hf-compile ('' for none)")
    flag(p, "cache_max_entry_count", type=float, default=0.9)
    flag(p, "enforce_eager", action="store_true", help="no CUDA graphs")
    flag(p, "output", help="also write the JSON result to this file")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def add_kernels_args(p) -> None:
    flag(p, "decode", nargs="*", default=["64x2048", "16x8192", "256x1024", "1x16384", "1x1024"],
         help="BxL points for paged_decode")
    flag(p, "prefill", nargs="*", default=["4x2048", "16x512", "1x8192"], help="BxL points for paged_prefill")
    flag(p, "block_size", type=int, default=64)
    flag(p, "output", help="also write the JSON result to this file")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")

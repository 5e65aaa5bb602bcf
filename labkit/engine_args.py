"""Command-line flags for the engine and for sampling, shared by chat, serve and bench.

Every flag is accepted in kebab-case (--max-batch-size) and in the course's snake_case
(--max_batch_size). Flags left out are None, so config.ini or the default wins.
"""
from __future__ import annotations

import argparse

from labkit.config import EngineConfig, GenerationConfig


def flag(parser, name: str, **kw):
    """Add --kebab-name and --snake_name for one option."""
    kebab, snake = "--" + name.replace("_", "-"), "--" + name.replace("-", "_")
    names = [kebab] if kebab == snake else [kebab, snake]
    parser.add_argument(*names, dest=name.replace("-", "_"), **kw)


def _bool01(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (override config.ini)")
    flag(g, "tp", type=int, default=1, help="tensor parallel size")
    flag(g, "session_len", type=int, help="max tokens of prompt + history + generation")
    flag(g, "max_batch_size", type=int, help="max running sequences (LMDeploy's instance_num)")
    flag(g, "cache_max_entry_count", type=float,
         help="KV cache: fraction (0,1) of free memory, or an integer > 1 = blocks")
    flag(g, "cache_block_seq_len", type=int, help="tokens per KV block")
    flag(g, "quant_policy", type=int, help="0 = model dtype KV, 4 = int4 KV, 8 = int8 KV")
    flag(g, "rope_scaling_factor", type=float, help="0 = off, >= 1 dynamic NTK")
    flag(g, "use_logn_attn", type=_bool01, help="0 or 1")
    flag(g, "max_prefill_token_num", type=int, default=8192, help="tokens per prefill step")
    flag(g, "device", default="auto", help="auto | cpu | cuda | cuda:N")
    flag(g, "dtype", default="auto",
         help="auto (bf16 on GPU, on CPUs with native bf16 and for int4 weights, else fp32) | fp32 | bf16 | fp16")
    flag(g, "model_name", help="chat template name (default: the model's)")
    flag(g, "disable_prefix_caching", action="store_true", help="turn prefix caching off")


def engine_config_from_args(args) -> EngineConfig:
    cmec = args.cache_max_entry_count
    if cmec is not None and cmec > 1 and float(cmec).is_integer():
        cmec = int(cmec)
    return EngineConfig(
        tp=args.tp, session_len=args.session_len, max_batch_size=args.max_batch_size,
        cache_max_entry_count=cmec, cache_block_seq_len=args.cache_block_seq_len,
        quant_policy=args.quant_policy, rope_scaling_factor=args.rope_scaling_factor,
        use_logn_attn=args.use_logn_attn, max_prefill_token_num=args.max_prefill_token_num,
        device=args.device, dtype=args.dtype, model_name=args.model_name,
        enable_prefix_caching=not args.disable_prefix_caching)


def add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    flag(g, "max_new_tokens", type=int, default=512)
    flag(g, "do_sample", action="store_true", help="sample instead of greedy decoding")
    flag(g, "temperature", type=float, default=0.8)
    flag(g, "top_p", type=float, default=1.0)
    flag(g, "top_k", type=int, default=50)
    flag(g, "repetition_penalty", type=float, default=1.0)
    flag(g, "seed", type=int, default=None, help="random seed for sampling")


def generation_config_from_args(args) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            repetition_penalty=args.repetition_penalty, random_seed=args.seed)

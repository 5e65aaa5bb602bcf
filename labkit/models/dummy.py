"""Random weights in real model shapes (vLLM's `--load-format dummy`), built on the device.

GPU benchmarks need the shape of a model, not its knowledge: `dummy:llama-2-7b` is a
Llama-2-7B-shaped model whose weights are drawn on the GPU in seconds, with the bundled
SmolLM2 tokenizer for text. Token ids the tokenizer makes beyond a shape's vocabulary are
folded into it by the benchmarks (`fold_ids`).

Weights are N(0, 0.02) (HF's initializer range) for matrices and embeddings, 1 for norms,
drawn from one seeded generator per tensor in the full (tp=1) shape, then sliced for a rank:
every tp sees the same model, so tp=N can be checked against tp=1.

`dummy:SHAPE:int4` (or `:int4-g64`, `:int4-g32`; group 128 by default) stores every decoder
Linear as random 4-bit codes with group scales (kernels/w4a16.py), for W4A16 benchmarks.
"""
from __future__ import annotations

import torch

from labkit.config import ModelConfig

PREFIX = "dummy:"

MODEL_SHAPES = {
    # SmolLM2-135M-Instruct, as read from the bundled GGUF
    "smollm2-135m": ModelConfig(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                                head_dim=64, intermediate_size=1536, vocab_size=49152,
                                rms_norm_eps=1e-5, rope_theta=100000.0,
                                max_position_embeddings=8192, tie_word_embeddings=True,
                                model_name="smollm2"),
    # meta-llama/Llama-2-7b-hf (multi-head attention: 32 query and 32 KV heads)
    "llama-2-7b": ModelConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                              head_dim=128, intermediate_size=11008, vocab_size=32000,
                              rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                              model_name="smollm2"),
    # meta-llama/Llama-3.2-1B (GQA 32/8, tied head; its llama3 RoPE scaling left out): small
    # enough for fp32 tensor-parallel checks on GPUs, heads divisible by 2, 4, 8
    "llama-3.2-1b": ModelConfig(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                                head_dim=64, intermediate_size=8192, vocab_size=128256,
                                rms_norm_eps=1e-5, rope_theta=500000.0,
                                max_position_embeddings=8192, tie_word_embeddings=True,
                                model_name="smollm2"),
    # meta-llama/Meta-Llama-3-8B (GQA 32/8, 128k vocabulary)
    "llama-3-8b": ModelConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                              head_dim=128, intermediate_size=14336, vocab_size=128256,
                              rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                              model_name="smollm2"),
}


def is_dummy(model) -> bool:
    return isinstance(model, str) and model.startswith(PREFIX)


def dummy_name(shape: str) -> str:
    check_shape(shape)
    return PREFIX + shape


def check_shape(shape: str) -> ModelConfig:
    from labkit.config import ConfigError
    if shape not in MODEL_SHAPES:
        raise ConfigError(f"model_shape={shape!r} is not allowed: model_shape must be one of "
                          f"{', '.join(MODEL_SHAPES)}")
    return MODEL_SHAPES[shape]


def shape_config(model: str) -> ModelConfig:
    return check_shape(model[len(PREFIX):].split(":")[0])


def int4_group(model: str) -> int:
    """0 for dense dummy weights; the group size of `dummy:SHAPE:int4[-gG]`."""
    from labkit.config import ConfigError
    _, _, tail = model[len(PREFIX):].partition(":")
    if not tail:
        return 0
    kind, _, g = tail.partition("-g")
    if kind != "int4" or (g and g not in ("32", "64", "128")):
        raise ConfigError(f"dummy weight type {tail!r} is not allowed: write dummy:SHAPE, "
                          f"dummy:SHAPE:int4 or dummy:SHAPE:int4-gG with G in 32, 64, 128")
    return int(g or 128)


def dummy_tensors(cfg: ModelConfig, dtype: torch.dtype, device, seed: int = 0,
                  int4_group_size: int = 0) -> dict:
    """Full (tp=1) TurboMind-named tensors of random weights, made on `device`; with a group
    size, decoder Linears are int4 (qweight/scales/zeros) instead."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    q, kv, h, inter = cfg.q_size, cfg.kv_size, cfg.hidden_size, cfg.intermediate_size
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention_norm.weight": (h,), p + "ffn_norm.weight": (h,),
                       p + "attention.w_qkv.weight": (q + 2 * kv, h), p + "attention.wo.weight": (h, q),
                       p + "feed_forward.w1.weight": (inter, h), p + "feed_forward.w3.weight": (inter, h),
                       p + "feed_forward.w2.weight": (h, inter)})
    out = {}
    for j, (name, shape) in enumerate(shapes.items()):
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            gen.manual_seed(seed * 100_003 + j)
            if int4_group_size and name.startswith("layers."):
                out.update(_int4(name[:-len(".weight")], shape, int4_group_size, dtype, device, gen))
                continue
            out[name] = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)
    return out


def _int4(prefix: str, shape, group: int, dtype, device, gen) -> dict:
    """Uniform codes 0..15, zero point 8, scale 0.005: weights of std ~0.023, like N(0, 0.02)."""
    n, k = shape
    return {prefix + ".qweight": torch.randint(0, 256, (n, k // 2), dtype=torch.uint8,
                                               device=device, generator=gen),
            prefix + ".scales": torch.full((n, k // group), 0.005, dtype=dtype, device=device),
            prefix + ".zeros": torch.full((n, k // group), 8, dtype=torch.uint8, device=device)}


def fold_ids(ids: list[int], vocab_size: int) -> list[int]:
    """Map tokenizer ids into a smaller vocabulary (dummy shapes with fewer tokens than SmolLM2's)."""
    return [t % vocab_size for t in ids]

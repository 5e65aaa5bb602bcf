"""HF-style AWQ folders: write one (what `labkit lite auto_awq` makes) and read one back into
TurboMind-named int4 tensors (what `labkit convert --model-format awq` stores).

A folder, as AutoAWQ writes it ("gemm" version), so other tools can read it too:

    config.json        the HF Llama config + "quantization_config": {"quant_method": "awq",
                       "bits": 4, "group_size": G, "zero_point": true, "version": "gemm"}
    model.safetensors  per decoder Linear: qweight (K, N/8) int32, qzeros (K/G, N/8) int32,
                       scales (K/G, N) float16 (layout: labkit/quant/int4.py); embeddings,
                       norms (with the AWQ scales folded in) and lm_head in float16
    tokenizer files    the source model's tokenizer
    quant_log.json     labkit's record: method, calibration, the alpha chosen per group
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from labkit.config import ModelConfig
from labkit.quant.int4 import (GROUP_SIZES, QuantError, from_awq_tensors, to_awq_tensors,
                               to_kernel_tensors, unpack_awq)

PROJ = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
        "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class AWQFormatError(ValueError):
    """A folder that is not a readable AWQ checkpoint; the message names what is wrong."""


def quantization_config(group_size: int, sym: bool) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": not sym,
            "version": "gemm", "modules_to_not_convert": None}


def hf_config_for(cfg: ModelConfig, source_config: dict | None = None) -> dict:
    """The HF config.json of the model: the source's own, or one built from its shape."""
    if source_config is not None:
        return dict(source_config)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attn_bias,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "hidden_act": "silu"}


# ---------------------------------------------------------------------------- write
def awq_state_dict(cfg: ModelConfig, model, quantized: dict) -> dict:
    """HF-named tensors of the AWQ folder from a labkit model (norms already scaled) and its
    quantized Linears {"layers.{i}.attention.w_qkv": (q, scales, zeros), ...}."""
    half = torch.float16
    out = {"model.embed_tokens.weight": model.tok_embeddings.weight.to(half),
           "model.norm.weight": model.norm.weight.to(half)}
    if model.output is not None:
        out["lm_head.weight"] = model.output.weight.to(half)
    split_qkv = [cfg.q_size, cfg.kv_size, cfg.kv_size]
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = layer.attention_norm.weight.to(half)
        out[p + "post_attention_layernorm.weight"] = layer.ffn_norm.weight.to(half)
        parts = {}
        q, s, z = quantized[f"layers.{i}.attention.w_qkv"]
        for proj, rows in zip(("q_proj", "k_proj", "v_proj"), _row_slices(split_qkv)):
            parts[proj] = (q[rows], s[rows], z[rows])
        if layer.attention.w_qkv.bias is not None:
            for proj, b in zip(("q_proj", "k_proj", "v_proj"),
                               layer.attention.w_qkv.bias.split(split_qkv)):
                out[p + f"self_attn.{proj}.bias"] = b.to(half)
        parts["o_proj"] = quantized[f"layers.{i}.attention.wo"]
        q, s, z = quantized[f"layers.{i}.feed_forward.w13"]
        inter = q.shape[0] // 2
        for proj, rows in zip(("gate_proj", "up_proj"), _row_slices([inter, inter])):
            parts[proj] = (q[rows], s[rows], z[rows])
        parts["down_proj"] = quantized[f"layers.{i}.feed_forward.w2"]
        for proj, (q, s, z) in parts.items():
            for k, t in to_awq_tensors(q, s, z).items():
                out[f"{p}{PROJ[proj]}.{proj}.{k}"] = t
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _row_slices(sizes):
    start = 0
    for n in sizes:
        yield slice(start, start + n)
        start += n


def save_awq_dir(dst, tensors: dict, config: dict, tokenizer_dir: Path, log: dict,
                 overwrite: bool = False) -> Path:
    """Write the folder atomically: built in a hidden sibling, renamed into place at the end."""
    from safetensors.torch import save_file

    from labkit.convert import PARTIAL_TAG, _move_into_place, _remove_stale_partials, _save_tokenizer

    dst = Path(dst).absolute()
    if dst.exists() and not dst.is_dir():
        raise QuantError(f"--work-dir {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise QuantError(f"--work-dir {dst} is not empty; pass --overwrite to replace it "
                         f"(nothing was changed)")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise QuantError(f"tensor {bad[0]} holds NaN or inf after quantization; nothing was written")
    _remove_stale_partials(dst)
    tmp = dst.parent / f".{dst.name}{PARTIAL_TAG}{os.getpid()}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "quant_log.json").write_text(json.dumps(log, indent=1) + "\n")
        _save_tokenizer(tokenizer_dir, tmp)
        _move_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# ---------------------------------------------------------------------------- read
def read_awq_config(path) -> tuple[dict, dict]:
    """(config.json, its quantization_config), checked: AWQ, 4 bits, gemm, a kernel group size."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir() or not cfg_file.is_file():
        raise AWQFormatError(f"{path}: not an AWQ folder (no config.json); make one with "
                             f"`labkit lite auto_awq MODEL --work-dir {path}`")
    hf = json.loads(cfg_file.read_text())
    qc = hf.get("quantization_config")
    if not qc or qc.get("quant_method") != "awq":
        raise AWQFormatError(f"{path}: config.json has no AWQ quantization_config; it is not "
                             f"an AWQ model (use --model-format hf for an unquantized one)")
    if qc.get("bits", 4) != 4 or qc.get("version", "gemm").lower() != "gemm":
        raise AWQFormatError(f"{path}: quantization_config bits={qc.get('bits')} version="
                             f"{qc.get('version')!r} is not supported: only 4-bit 'gemm' AWQ")
    if qc.get("group_size") not in GROUP_SIZES:
        raise AWQFormatError(f"{path}: group_size={qc.get('group_size')} is not supported: the "
                             f"W4A16 kernel takes group_size in {GROUP_SIZES}")
    return hf, qc


def read_awq_dir(path, dtype: torch.dtype = torch.float16):
    """(ModelConfig, TurboMind-named tp=1 tensors, group size). Int4 Linears come in the
    kernel layout (`...w_qkv.qweight/.scales/.zeros`, kernels/w4a16.py); the rest in dtype."""
    from safetensors.torch import load_file

    from labkit.models.sources import model_config_from_hf

    path = Path(path)
    hf, qc = read_awq_config(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise AWQFormatError(f"{path}: no *.safetensors weights in this AWQ folder")
    t: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            t.update(load_file(str(f)))
        except Exception as e:      # safetensors raises several types for a damaged file
            raise AWQFormatError(f"{f}: cannot read safetensors weights ({type(e).__name__}: {e})")
    cfg = model_config_from_hf(hf, name=path.name)
    G = qc["group_size"]

    def get(name):
        if name not in t:
            raise AWQFormatError(f"{path}: tensor {name!r} is missing (an incomplete AWQ folder?)")
        return t[name]

    def linear(prefix):             # -> torch-layout codes, scales, zeros
        qw, sc = get(prefix + ".qweight"), get(prefix + ".scales")
        if prefix + ".qzeros" in t or qc.get("zero_point", True):
            q, s, z = from_awq_tensors(qw, get(prefix + ".qzeros"), sc)
        else:                                            # symmetric, no zeros: codes centred on 8
            q, s = unpack_awq(qw).T.contiguous(), sc.T.contiguous()
            z = torch.full(s.shape, 8, dtype=torch.uint8)
        if q.shape[1] != s.shape[1] * G:
            raise AWQFormatError(f"{path}: {prefix} has {q.shape[1]} input columns and "
                                 f"{s.shape[1]} groups, not groups of {G}")
        return q, s, z

    out = {"tok_embeddings.weight": get("model.embed_tokens.weight").to(dtype),
           "norm.weight": get("model.norm.weight").to(dtype)}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = get("lm_head.weight").to(dtype)
    for i in range(cfg.num_layers):
        p, a = f"model.layers.{i}.", f"layers.{i}."
        out[a + "attention_norm.weight"] = get(p + "input_layernorm.weight").to(dtype)
        out[a + "ffn_norm.weight"] = get(p + "post_attention_layernorm.weight").to(dtype)
        qkv = [linear(p + f"self_attn.{x}_proj") for x in "qkv"]
        fused = [torch.cat(parts, 0) for parts in zip(*qkv)]           # rows [q | k | v]
        _put(out, a + "attention.w_qkv", fused, dtype)
        if cfg.attn_bias:
            out[a + "attention.w_qkv.bias"] = torch.cat(
                [get(p + f"self_attn.{x}_proj.bias") for x in "qkv"]).to(dtype)
        _put(out, a + "attention.wo", linear(p + "self_attn.o_proj"), dtype)
        _put(out, a + "feed_forward.w1", linear(p + "mlp.gate_proj"), dtype)
        _put(out, a + "feed_forward.w3", linear(p + "mlp.up_proj"), dtype)
        _put(out, a + "feed_forward.w2", linear(p + "mlp.down_proj"), dtype)
    return cfg, out, G


def _put(out: dict, name: str, qsz, dtype) -> None:
    for k, v in to_kernel_tensors(*qsz, dtype).items():
        out[f"{name}.{k}"] = v

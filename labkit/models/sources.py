"""Read a model from where it lives (an HF directory or a .gguf file) into one form:
`(ModelConfig, {hf_tensor_name: tensor})`, with HF transformers' Llama tensor names.

convert.py turns that into a TurboMind-style workspace. Nothing here writes to disk.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from labkit.config import ConfigError, ModelConfig


class SourceError(ValueError):
    """The model source cannot be read; the message says what is wrong and with which file."""


def detect_format(path: Path) -> str:
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir():
        return "awq" if _quant_method(path) == "awq" else "hf"
    if not path.exists():
        raise SourceError(f"model {str(path)!r} does not exist; give the alias smollm2-135m, "
                          f"an HF directory, a .gguf file or a workspace")
    raise SourceError(f"model {str(path)!r}: cannot tell its format; expected an HF directory "
                      f"(config.json + *.safetensors) or a .gguf file")


def _quant_method(path: Path) -> str | None:
    """quantization_config.quant_method of an HF directory's config.json (None: not quantized)."""
    try:
        qc = json.loads((path / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return (qc or {}).get("quant_method") if isinstance(qc, dict) else None


# ---------------------------------------------------------------------------- HF directory
def read_hf_dir(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SourceError(f"{path}: no config.json; an HF model directory needs config.json "
                          f"and *.safetensors weights")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SourceError(f"{path}: no *.safetensors weights found (only safetensors HF "
                          f"checkpoints are read; re-save with safe_serialization=True)")
    hf = json.loads(cfg_file.read_text())
    method = _quant_method(path)
    if method is not None:
        hint = ("read it with --model-format awq" if method == "awq" else
                "labkit reads unquantized HF checkpoints and AWQ folders")
        raise SourceError(f"{path}: this model is already quantized ({method}); {hint}")
    archs = hf.get("architectures") or ["?"]
    if hf.get("model_type") not in ("llama", "mistral", "qwen2") and "Llama" not in archs[0]:
        raise SourceError(f"{path}: model_type {hf.get('model_type')!r} is not supported; "
                          f"labkit converts the Llama family")
    cfg = model_config_from_hf(hf, name=path.name)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt"):
                pass
            tensors.update(load_file(str(f)))
        except Exception as e:  # safetensors raises several types for a damaged file
            raise SourceError(f"{f}: cannot read safetensors weights ({type(e).__name__}: {e})")
    return cfg, tensors


def model_config_from_hf(hf: dict, name: str = "llama") -> ModelConfig:
    heads = hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    eos = hf.get("eos_token_id", 2)
    return ModelConfig(
        hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)), rope_theta=float(theta),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attn_bias=bool(hf.get("attention_bias", False)),
        bos_token_id=hf.get("bos_token_id", 1) or 1,
        eos_token_id=eos[0] if isinstance(eos, list) else (eos if eos is not None else 2),
        model_name=name)


# ---------------------------------------------------------------------------- GGUF file
# GGUF (llama.cpp) tensor names -> HF names; {i} is the layer.
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def _gguf_name_to_hf(name: str) -> str | None:
    if name.startswith("blk."):
        _, i, rest = name.split(".", 2)
        key = f"blk.{{i}}.{rest}"
        return GGUF_TO_HF[key].format(i=i) if key in GGUF_TO_HF else None
    return GGUF_TO_HF.get(name)


def _unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved per head (pairs (x0,x1),(x2,x3)...) for its RoPE;
    HF uses halves (x0..x_{d/2-1}, x_{d/2}..). Undo: (H, d/2, 2, in) -> (H, 2, d/2, in)."""
    out_dim, in_dim = w.shape
    return (w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim)  # (H, d/2, 2, in)
            .transpose(1, 2).reshape(out_dim, in_dim))                # (H*d, in)


def read_gguf(path: Path, config_only: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Dequantize every tensor of a llama GGUF file to fp32 with HF names. With config_only,
    read just the metadata and tensor shapes (no dequantization) and return no tensors."""
    import numpy as np
    try:
        import gguf
    except ImportError:
        raise SourceError("reading .gguf files needs the `gguf` package: pip install gguf")
    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise SourceError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                          f"is it truncated? re-download or reinstall it")

    def field(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            if default is None:
                raise SourceError(f"{path}: GGUF metadata {key!r} is missing")
            return default
        v = f.contents()
        return v

    arch = field("general.architecture")
    if arch != "llama":
        raise SourceError(f"{path}: GGUF architecture {arch!r} is not supported; labkit reads llama")
    heads = int(field("llama.attention.head_count"))
    kv_heads = int(field("llama.attention.head_count_kv", heads))
    hidden = int(field("llama.embedding_length"))
    names = {t.name for t in reader.tensors}
    tensors: dict[str, torch.Tensor] = {}
    for t in ([] if config_only else reader.tensors):
        hf_name = _gguf_name_to_hf(t.name)
        if hf_name is None:
            continue
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))   # GGUF lists dims fastest-first
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise SourceError(f"{path}: tensor {t.name} cannot be dequantized ({e})")
        w = torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(shape)
        if t.name.endswith("attn_q.weight"):
            w = _unpermute_rope(w, heads)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute_rope(w, kv_heads)
        tensors[hf_name] = w
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise SourceError(f"{path}: GGUF tensor 'token_embd.weight' is missing")
    vocab = int(embd.shape[-1])                 # GGUF lists dims fastest-first: (H, V)
    try:
        cfg = ModelConfig(
            hidden_size=hidden, num_layers=int(field("llama.block_count")), num_heads=heads,
            num_kv_heads=kv_heads, head_dim=int(field("llama.rope.dimension_count", hidden // heads)),
            intermediate_size=int(field("llama.feed_forward_length")), vocab_size=vocab,
            rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
            rope_theta=float(field("llama.rope.freq_base", 10000.0)),
            max_position_embeddings=int(field("llama.context_length")),
            tie_word_embeddings="output.weight" not in names,
            bos_token_id=int(field("tokenizer.ggml.bos_token_id", 1)),
            eos_token_id=int(field("tokenizer.ggml.eos_token_id", 2)),
            model_name=str(field("general.basename", "llama")))
    except ConfigError as e:
        raise SourceError(f"{path}: bad model metadata: {e}")
    return cfg, tensors


def read_source(path: Path, model_format: str | None = None):
    """(ModelConfig, HF-named tensors) from an HF directory or a .gguf file."""
    fmt = model_format or detect_format(Path(path))
    if fmt not in ("hf", "gguf"):
        raise SourceError(f"model_format={fmt!r} is not allowed here: model_format must be hf "
                          f"or gguf (AWQ folders are read by labkit.quant.awq_io)")
    return read_gguf(path) if fmt == "gguf" else read_hf_dir(path)

"""Model conversion: an HF directory, a .gguf file or the bundled alias -> a TurboMind-style
workspace, and `load()`, which gives one tensor-parallel rank its weights from a workspace or
straight from a model (online conversion).

Workspace layout (DESIGN.md section 3):

    DST/triton_models/weights/config.ini          [llama] section, TurboMind field names
    DST/triton_models/weights/conversion.json     the model-shape fields as converted
    DST/triton_models/weights/rank{r}.safetensors one file per TP rank
    DST/triton_models/tokenizer/                  tokenizer.json + chat template

Tensor names per rank (PyTorch layout, (out_features, in_features)):
    tok_embeddings.weight (V, H) replicated       norm.weight (H,) replicated
    output.weight (V/tp, H) column-split, absent when tied to tok_embeddings
    layers.{i}.attention_norm.weight, layers.{i}.ffn_norm.weight (H,) replicated
    layers.{i}.attention.w_qkv.weight ((Hq+2Hkv)/tp*D, H) column-split, rows [q_r | k_r | v_r]
    layers.{i}.attention.wo.weight (H, Hq/tp*D) row-split
    layers.{i}.feed_forward.w1.weight (gate), w3.weight (up) (I/tp, H) column-split
    layers.{i}.feed_forward.w2.weight (down) (H, I/tp) row-split
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from labkit.config import ConfigError, ModelConfig
from labkit.models import bundled
from labkit.models.sources import SourceError, detect_format, read_source
from labkit.workspace_ini import read_config_ini, write_config_ini

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}
PARTIAL_TAG = ".labkit-partial-"


class ConversionError(ValueError):
    pass


# ---------------------------------------------------------------------------- where from
@dataclass
class ModelInfo:
    """What an engine needs to know about a model before loading weights."""
    config: ModelConfig
    inference: dict            # config.ini's inference fields ({} for online conversion)
    tokenizer_dir: Path
    workspace: Path | None     # None: online conversion from `source`
    source: Path | None
    stored_tp: int = 1
    weight_type: str = "fp32"


def weights_dir(workspace: Path) -> Path:
    return Path(workspace) / "triton_models" / "weights"


def is_workspace(path) -> bool:
    return (weights_dir(Path(path)) / "config.ini").is_file()


def _source_path(model) -> Path:
    return bundled.resolve_alias(model) if bundled.is_alias(model) else Path(model)


def inspect_model(model) -> ModelInfo:
    """Describe a workspace, an alias, an HF directory or a .gguf (reads no weights of a
    workspace; an online source is read once to learn its shape)."""
    if is_workspace(model):
        ws = Path(model)
        cfg, storage, inference = read_config_ini(weights_dir(ws))
        return ModelInfo(cfg, inference, ws / "triton_models" / "tokenizer", ws, None,
                         storage["tensor_para_size"], storage["weight_type"])
    src = _source_path(model)
    fmt = detect_format(src)
    cfg = _read_config_only(src, fmt)
    return ModelInfo(cfg, {}, tokenizer_dir_for(src, fmt), None, src)


def _read_config_only(src: Path, fmt: str) -> ModelConfig:
    if fmt == "hf":
        import json
        from labkit.models.sources import model_config_from_hf
        cfg_file = src / "config.json"
        if not cfg_file.is_file():
            raise SourceError(f"{src}: no config.json; not an HF model directory or a workspace")
        return model_config_from_hf(json.loads(cfg_file.read_text()), name=src.name)
    from labkit.models.sources import read_gguf
    return read_gguf(src, config_only=True)[0]   # metadata only: the weights load later


def tokenizer_dir_for(src: Path, fmt: str) -> Path:
    """An HF tokenizer folder for a source model (the GGUF tokenizer is extracted once)."""
    if fmt == "hf":
        return src
    if src.resolve() == bundled.bundled_gguf_path().resolve():
        return bundled.bundled_tokenizer_dir()
    from transformers import AutoTokenizer
    out = bundled.cache_dir() / f"tokenizer-{src.stem}"
    if not (out / "tokenizer.json").is_file():
        AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(str(out))
    return out


# ---------------------------------------------------------------------------- HF -> TurboMind
def to_turbomind(cfg: ModelConfig, hf: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """Rename and fuse HF Llama tensors into TurboMind names (tp=1, w_qkv = [q | k | v])."""
    def get(name):
        if name not in hf:
            raise SourceError(f"weight {name!r} is missing from the checkpoint")
        return hf[name].to(dtype)

    out = {"tok_embeddings.weight": get("model.embed_tokens.weight"),   # (V, H)
           "norm.weight": get("model.norm.weight")}                     # (H,)
    if not cfg.tie_word_embeddings:
        out["output.weight"] = get("lm_head.weight")                    # (V, H)
    for i in range(cfg.num_layers):
        p, a = f"model.layers.{i}.", f"layers.{i}."
        out[a + "attention_norm.weight"] = get(p + "input_layernorm.weight")
        out[a + "ffn_norm.weight"] = get(p + "post_attention_layernorm.weight")
        out[a + "attention.w_qkv.weight"] = torch.cat(                   # ((Hq+2Hkv)*D, H)
            [get(p + f"self_attn.{x}_proj.weight") for x in "qkv"], 0)
        if cfg.attn_bias:
            out[a + "attention.w_qkv.bias"] = torch.cat(
                [get(p + f"self_attn.{x}_proj.bias") for x in "qkv"], 0)
        out[a + "attention.wo.weight"] = get(p + "self_attn.o_proj.weight")  # (H, Hq*D)
        out[a + "feed_forward.w1.weight"] = get(p + "mlp.gate_proj.weight")  # (I, H)
        out[a + "feed_forward.w3.weight"] = get(p + "mlp.up_proj.weight")    # (I, H)
        out[a + "feed_forward.w2.weight"] = get(p + "mlp.down_proj.weight")  # (H, I)
    return out


def shard(cfg: ModelConfig, full: dict[str, torch.Tensor], rank: int, tp: int) -> dict:
    """Rank `rank`'s slice of tp=1 TurboMind tensors: column-parallel weights split their
    output rows, row-parallel ones their input columns, the rest is replicated."""
    cfg.check_tp(tp)
    if not 0 <= rank < tp:
        raise ConfigError(f"rank={rank} is not allowed: rank must be in [0, {tp - 1}]")
    if tp == 1:
        return dict(full)
    q, kv = cfg.q_size, cfg.kv_size

    def rows(t, n):      # this rank's n-row slice along dim 0
        return t.narrow(0, rank * n, n)

    out = {}
    for name, t in full.items():
        if name.endswith("w_qkv.weight") or name.endswith("w_qkv.bias"):
            tq, tk, tv = t.split([q, kv, kv], 0)
            out[name] = torch.cat([rows(tq, q // tp), rows(tk, kv // tp), rows(tv, kv // tp)], 0)
        elif name.endswith(("w1.weight", "w3.weight")) or name == "output.weight":
            out[name] = rows(t, t.shape[0] // tp)
        elif name.endswith(("wo.weight", "w2.weight")):
            n = t.shape[1] // tp
            out[name] = t.narrow(1, rank * n, n)
        else:
            out[name] = t
    return {k: v.contiguous() for k, v in out.items()}


def _resolve_dtype(dtype: str, hf: dict) -> str:
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype == "auto":
        emb = hf.get("model.embed_tokens.weight")
        src = emb.dtype if emb is not None else torch.float32
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(src, "fp32")
    if dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r} is not allowed: dtype must be one of "
                              f"auto, bf16, fp16, fp32")
    return dtype


# ---------------------------------------------------------------------------- offline
def convert(model, dst_path, *, tp: int = 1, model_format: str | None = None,
            model_name: str | None = None, dtype: str = "auto", overwrite: bool = False,
            session_len: int | None = None, progress: bool = True) -> Path:
    """Convert `model` into a workspace at `dst_path`. Everything is built in a hidden sibling
    folder and renamed into place at the end, so a failed or killed conversion leaves no DST."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    dst = Path(dst_path).absolute()
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"--dst-path {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(f"--dst-path {dst} is not empty; pass --overwrite to replace it "
                              f"(nothing was changed)")
    if model_format not in (None, "hf", "gguf"):
        raise ConversionError(f"--model-format {model_format!r} is not allowed: model_format "
                              f"must be hf or gguf")
    src = _source_path(model)
    fmt = model_format or detect_format(src)
    cfg, hf = read_source(src, fmt)
    if model_name or bundled.is_alias(model):
        import dataclasses
        cfg = dataclasses.replace(cfg, model_name=model_name or bundled.BUNDLED_MODEL_NAME)
    cfg.check_tp(tp)                       # before anything is written
    wtype = _resolve_dtype(dtype, hf)
    _remove_stale_partials(dst)
    tmp = dst.parent / f".{dst.name}{PARTIAL_TAG}{os.getpid()}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        wdir = weights_dir(tmp)
        wdir.mkdir(parents=True)
        full = to_turbomind(cfg, hf, DTYPES[wtype])
        del hf
        for r in tqdm(range(tp), desc=f"convert -> {dst.name} (tp={tp})", disable=not progress):
            save_file(shard(cfg, full, r, tp), str(wdir / f"rank{r}.safetensors"))
        write_config_ini(wdir, cfg, tp=tp, weight_type=wtype, session_len=session_len)
        _save_tokenizer(tokenizer_dir_for(src, fmt), tmp / "triton_models" / "tokenizer")
        _move_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _save_tokenizer(src_dir: Path, out: Path) -> None:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(src_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(str(out))


def _move_into_place(tmp: Path, dst: Path) -> None:
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.labkit-old-{os.getpid()}"
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_partials(dst: Path) -> None:
    """Drop partial folders of earlier conversions to dst whose process is gone."""
    if not dst.parent.is_dir():
        return
    for p in dst.parent.glob(f".{dst.name}{PARTIAL_TAG}*"):
        pid = p.name.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)
        except (ProcessLookupError, ValueError):
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass


# ---------------------------------------------------------------------------- load
def load(path, rank: int = 0, tp: int = 1, dtype: torch.dtype | None = None):
    """(ModelConfig, this rank's TurboMind tensors) from a workspace, the alias, an HF dir or a
    .gguf. A workspace converted with tp=1 is sliced here for any tp (TurboMind's runtime TP)."""
    if is_workspace(path):
        from safetensors.torch import load_file
        info = inspect_model(path)
        cfg, stored = info.config, info.stored_tp
        cfg.check_tp(tp)
        wdir = weights_dir(Path(path))
        if stored == tp:
            tensors = load_file(str(wdir / f"rank{rank}.safetensors"))
        elif stored == 1:
            tensors = shard(cfg, load_file(str(wdir / "rank0.safetensors")), rank, tp)
        else:
            raise ConfigError(f"tp={tp} is not allowed for this workspace: it was converted with "
                              f"tensor_para_size={stored}; use tp={stored}, or convert with --tp 1 "
                              f"to choose tp at load time")
    else:
        src = _source_path(path)
        cfg, hf = read_source(src, detect_format(src))
        if bundled.is_alias(path):
            import dataclasses
            cfg = dataclasses.replace(cfg, model_name=bundled.BUNDLED_MODEL_NAME)
        tensors = shard(cfg, to_turbomind(cfg, hf, dtype or torch.float32), rank, tp)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    return cfg, tensors

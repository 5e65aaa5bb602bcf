"""Offline model conversion: an HF directory, a .gguf file, an AWQ folder or the bundled
alias -> a TurboMind-style workspace on disk. (Reading weights for one rank, from a workspace or straight
from a model, is labkit/models/loader.py; its names are re-exported here.)

Workspace layout (DESIGN.md section 3):

    DST/triton_models/weights/config.ini          [llama] section, TurboMind field names
    DST/triton_models/weights/conversion.json     the model-shape fields as converted
    DST/triton_models/weights/rank{r}.safetensors one file per TP rank
    DST/triton_models/tokenizer/                  tokenizer.json + chat template

Tensor names per rank: see labkit/models/loader.py. An AWQ folder (`labkit lite auto_awq`)
becomes an int4 workspace: weight_type = int4, group_size = G in config.ini, and every decoder
Linear repacked for the W4A16 kernel (kernels/w4a16.py); the rest is stored in --dtype.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from labkit import interrupt
from labkit.config import ConfigError, ModelConfig
from labkit.models import bundled
from labkit.models.loader import (ModelInfo, inspect_model, is_workspace, load, shard,  # noqa: F401
                                  source_path, to_turbomind, tokenizer_dir_for, weights_dir)
from labkit.models.sources import SourceError, detect_format, read_source
from labkit.workspace_ini import write_config_ini

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}
PARTIAL_TAG = ".labkit-partial-"


class ConversionError(ValueError):
    pass


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
    if model_format not in (None, "hf", "gguf", "awq"):
        raise ConversionError(f"--model-format {model_format!r} is not allowed: model_format "
                              f"must be hf, gguf or awq")
    src = source_path(model)
    fmt = model_format or detect_format(src)
    if fmt == "awq":
        from labkit.quant.awq_io import read_awq_dir
        cfg, full, group_size = read_awq_dir(src)
        emb = {"model.embed_tokens.weight": full["tok_embeddings.weight"]}   # fp16 in AWQ folders
        store = DTYPES[_resolve_dtype(dtype, emb)]                         # scales, norms, embeddings
        full = {k: v.to(store) if v.is_floating_point() else v for k, v in full.items()}
        wtype = "int4"
    else:
        cfg, hf = read_source(src, fmt)
        wtype, group_size = _resolve_dtype(dtype, hf), 0
        full = to_turbomind(cfg, hf, DTYPES[wtype])
        del hf
    if model_name or bundled.is_alias(model):
        import dataclasses
        cfg = dataclasses.replace(cfg, model_name=model_name or bundled.BUNDLED_MODEL_NAME)
    cfg.check_tp(tp)                       # before anything is written
    if group_size:                         # int4 groups must not straddle ranks: check now
        shard(cfg, {k: v for k, v in full.items() if k.startswith("layers.0.")}, 0, tp)
    _remove_stale_partials(dst)
    tmp = dst.parent / f".{dst.name}{PARTIAL_TAG}{os.getpid()}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        wdir = weights_dir(tmp)
        wdir.mkdir(parents=True)
        for r in tqdm(range(tp), desc=f"convert -> {dst.name} (tp={tp})", disable=not progress):
            save_file(shard(cfg, full, r, tp), str(wdir / f"rank{r}.safetensors"))
        write_config_ini(wdir, cfg, tp=tp, weight_type=wtype, group_size=group_size,
                         session_len=session_len)
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
    interrupt.check()            # a SIGTERM that arrived while building: publish nothing
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

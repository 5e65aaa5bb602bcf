"""`labkit lite auto_awq`: a model -> calibration on the pydoc corpus -> AWQ (or RTN) -> an
HF-style AWQ folder, which `labkit convert DIR --model-format awq` turns into an int4 workspace.

    from labkit.quant.awq_lite import auto_awq
    auto_awq("smollm2-135m", "./quant_output", w_group_size=64, search_scale=True)

Everything that can be checked is checked before the long part starts (group size, an
already-quantized model, the destination); the folder appears only when it is complete.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from labkit.quant.int4 import QuantError, check_group_size, default_group_size

log = logging.getLogger("labkit")


def linear_in_features(cfg) -> dict[str, int]:
    """in_features of each decoder Linear (what the group size must divide)."""
    return {"attention.w_qkv": cfg.hidden_size, "attention.wo": cfg.q_size,
            "feed_forward.w13": cfg.hidden_size, "feed_forward.w2": cfg.intermediate_size}


def auto_awq(model, work_dir, *, w_bits: int = 4, w_group_size: int | None = None,
             w_sym: bool = False, calib_samples: int = 32, calib_seqlen: int = 512,
             search_scale: bool = False, method: str = "awq", auto_clip: bool = False,
             overwrite: bool = False,
             device: str = "cpu", progress: bool = True) -> Path:
    """Quantize `model` (alias, HF directory, .gguf or fp workspace) into `work_dir`."""
    from transformers import AutoTokenizer

    from labkit.models.llama import LlamaForCausalLM
    from labkit.models.loader import inspect_model
    from labkit.models.sources import detect_format
    from labkit.quant.awq import AWQSettings, quantize_model
    from labkit.quant.awq_data import calibration_windows, corpus_ids
    from labkit.quant.awq_io import (awq_state_dict, hf_config_for, quantization_config,
                                     save_awq_dir)

    if w_bits != 4:
        raise QuantError(f"w_bits={w_bits} is not allowed: w_bits must be 4 (the W4A16 kernel)")
    if method not in ("awq", "rtn"):
        raise QuantError(f"method={method!r} is not allowed: method must be awq or rtn")
    if auto_clip and method != "awq":
        raise QuantError("auto_clip needs AWQ's calibration: it is not allowed with method=rtn")
    info = inspect_model(model)
    if info.weight_type.endswith("int4") or (info.source is not None
                                             and detect_format(info.source) == "awq"):
        raise QuantError(f"model {model} is already quantized (int4); give the unquantized "
                         f"model (an alias, an HF directory, a .gguf or an fp workspace)")
    cfg = info.config
    in_features = linear_in_features(cfg)
    group = w_group_size or default_group_size(in_features)
    check_group_size(group, in_features)
    dst = Path(work_dir)
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise QuantError(f"--work-dir {dst} is not empty; pass --overwrite to replace it "
                         f"(nothing was changed)")
    settings = AWQSettings(group_size=group, sym=w_sym, method=method, search=search_scale,
                           clip=auto_clip)

    calib = None
    if method == "awq":
        tok = AutoTokenizer.from_pretrained(str(info.tokenizer_dir))
        calib = calibration_windows(corpus_ids(tok), calib_samples, calib_seqlen)   # (S, L)
    t0 = time.time()
    net = LlamaForCausalLM.from_pretrained(model, dtype=torch.float32, device=device)
    quantized, results = quantize_model(net, calib, settings, progress=progress)
    tensors = awq_state_dict(cfg, net, quantized)

    source_cfg = None
    if info.source is not None and detect_format(info.source) == "hf":
        source_cfg = json.loads((info.source / "config.json").read_text())
    config = hf_config_for(cfg, source_cfg)
    config.update(torch_dtype="float16", dtype="float16", quantization_config=quantization_config(group, w_sym))
    record = {"method": method, "w_bits": 4, "group_size": group, "sym": w_sym,
              "search_scale": search_scale, "auto_clip": auto_clip, "source": str(model),
              "calib_tokens": None if calib is None else list(calib.shape),
              "seconds": round(time.time() - t0, 1),
              "groups": [dict(layer=r.layer, group=r.group, alpha=r.alpha, loss_rtn=r.loss_rtn,
                              loss=r.loss) for r in results]}
    out = save_awq_dir(dst, tensors, config, info.tokenizer_dir, record, overwrite=overwrite)
    log.info(f"{method} w4 g{group} -> {out} in {record['seconds']} s")
    return out

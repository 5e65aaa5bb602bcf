"""`labkit lite k_smooth`: flatter K rows for the int4 KV cache, folded into w_qkv.

The int4 cache quantizes each (token, KV head) row of K with its own range: 16 levels from
the row's minimum to its maximum. A few channels of K are far larger than the rest in every
token (the slow RoPE frequencies carry most of the magnitude), so they set the range and the
other channels get one or two levels. Dividing K's channel j by a factor c_j and multiplying
q's channel j by the same c_j leaves every score q.k unchanged and makes K's rows flatter
(QServe's SmoothAttention). RoPE rotates channel j with channel j + D/2, so c is equal on
each such pair and the rotation commutes with the scaling:

    a_j = max(absmax_j, absmax_{j+D/2})    over the calibration tokens, per layer and KV head
    c_j = c_{j+D/2} = a_j^alpha / mean(a^alpha)                     (alpha in (0, 1], default 0.5)

`labkit lite calibrate` measures absmax; this step writes the factors beside the weights, and
the loader folds them in whenever the workspace is loaded (labkit/models/loader.py):

    w_qkv rows of KV head h             / c[h]          (and the bias, if any)
    w_qkv rows of each query head of h  x c[h]          (GQA: every head of the group)
    int4 workspaces: the same rows' group scales (the integer codes and zeros are unchanged)

so deleting the file undoes it. File, written atomically:

    WORKSPACE/triton_models/weights/k_smooth.safetensors
        k_smooth   (num_layer, kv_head_num, size_per_head) float32
        metadata: alpha, fingerprint (of the factors), num_layer, kv_head_num, size_per_head

Calibration statistics are always of the unsmoothed K (calibrate multiplies the factors back
in), so calibrate -> k_smooth -> kv_qparams can run in any order; kv_qparams records the
fingerprint of the smoothing its static parameters assume, and the engine refuses a mismatch.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from labkit import interrupt
from labkit.config import ConfigError, ModelConfig

SMOOTH_FILE = "k_smooth.safetensors"


def smoothing_factors(key_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """(L, Hkv, D) calibrated |K| maxima -> (L, Hkv, D) factors, equal on each RoPE pair."""
    from labkit.quant.kv_qparams import KVQParamsError
    if not 0 < alpha <= 1:
        raise KVQParamsError(f"alpha={alpha!r} is not allowed: --alpha must be in (0, 1]")
    a = key_absmax.float()
    half = a.shape[-1] // 2
    pair = torch.maximum(a[..., :half], a[..., half:]).clamp(min=1e-3)    # (L, Hkv, D/2)
    c = pair ** alpha
    c = c / c.mean(-1, keepdim=True)                                      # only ratios matter
    return torch.cat([c, c], -1).contiguous()                             # (L, Hkv, D)


def fingerprint(factors: torch.Tensor) -> str:
    return hashlib.sha1(factors.float().contiguous().numpy().tobytes()).hexdigest()[:12]


def write_k_smooth(work_dir, weights_dir, alpha: float = 0.5) -> Path:
    """Factors from work_dir's K statistics into the workspace (checks first: on any error
    the workspace is left as it was)."""
    from safetensors.torch import save_file

    from labkit.quant.kv_qparams import stats_for_workspace

    wdir, cfg, _, stats = stats_for_workspace(work_dir, weights_dir)
    factors = smoothing_factors(stats["key"]["absmax"], alpha)
    meta = {"alpha": repr(float(alpha)), "fingerprint": fingerprint(factors),
            "num_layer": str(cfg.num_layers), "kv_head_num": str(cfg.num_kv_heads),
            "size_per_head": str(cfg.head_dim)}
    dst = wdir / SMOOTH_FILE
    tmp = wdir / f".{SMOOTH_FILE}.partial-{os.getpid()}"
    try:
        save_file({"k_smooth": factors}, str(tmp), metadata=meta)
        interrupt.check()                       # a SIGTERM while writing: keep the old file
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def read_k_smooth(weights_dir, cfg: ModelConfig) -> tuple[torch.Tensor, str] | None:
    """(factors (L, Hkv, D), fingerprint) of a workspace's weights dir; None if it has none."""
    from safetensors import safe_open

    path = Path(weights_dir) / SMOOTH_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            factors = f.get_tensor("k_smooth").float()
    except Exception as e:
        raise ConfigError(f"{path} is not a k_smooth file ({type(e).__name__}: {e}); rerun "
                          f"`labkit lite k_smooth` or delete it") from None
    want = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    if tuple(factors.shape) != want or not bool((factors > 0).all()):
        raise ConfigError(f"{path} holds factors of shape {tuple(factors.shape)}; this model "
                          f"needs {want}, all positive: rerun `labkit lite k_smooth` or delete it")
    return factors, fingerprint(factors)


@torch.no_grad()
def fold_k_smooth(cfg: ModelConfig, tensors: dict, factors: torch.Tensor, rank: int = 0,
                  tp: int = 1) -> dict:
    """This rank's TurboMind tensors with the factors folded into w_qkv (a new dict; the
    tensors it changes are new, the others shared). factors: (L, Hkv, D) for all heads."""
    hkv, d = cfg.num_kv_heads // tp, cfg.head_dim
    group = cfg.num_heads // cfg.num_kv_heads
    out = dict(tensors)
    for i in range(cfg.num_layers):
        c = factors[i, rank * hkv:(rank + 1) * hkv]                       # (hkv, D)
        row = torch.cat([c.repeat_interleave(group, 0).reshape(-1),      # q rows: x c
                         (1 / c).reshape(-1),                             # k rows: / c
                         torch.ones(hkv * d)])                            # v rows unchanged
        for leaf in ("weight", "scales", "bias"):                         # int4: the row scales
            name = f"layers.{i}.attention.w_qkv.{leaf}"
            t = tensors.get(name)
            if t is None:
                continue
            r = row.to(t.device).view(-1, *([1] * (t.dim() - 1)))       # (rows, 1...)
            out[name] = (t.float() * r).to(t.dtype)
    return out

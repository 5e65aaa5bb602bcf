"""`labkit lite kv_qparams`: calibrated (static) int8/int4 KV parameters into a workspace.

From the K/V statistics of `labkit lite calibrate` (per layer, per KV head and channel: the
min and max over every calibration token), one (scale, zero) per layer, K or V, and KV head,
in the cache's own format (kernels/kv_quant.py: int8 has an integer zero point, int4 a float
zero, the minimum):

    asymmetric (default): lo, hi = min over the head's channels, max (int8: stretched to hold 0)
                          scale = (hi - lo) / (2^bits - 1)
                          zero  = round(-lo / scale) (int8)  |  lo (int4)
    symmetric (--kv-sym): scale = absmax / (2^(bits-1) - 1)
                          zero  = 2^(bits-1) (int8)  |  -2^(bits-1) x scale (int4)

Static int4 with a float zero: every token of a head shares one grid of 16 levels,
x_hat = code x scale + zero, zero = the smallest value calibration saw in that head (any token,
any channel), scale = its range / 15; so code 0 is the calibrated minimum and code 15 the
maximum. Symmetric int4 puts the levels at (code - 8) x scale, 0 exactly on the grid.

The store (kernels/kv_quant.py) then quantizes every token of that head with them instead of
the token's own range (values outside the calibrated range are clipped). They go into one
file beside the weights, written atomically:

    WORKSPACE/triton_models/weights/kv_qparams.safetensors
        layers.{i}.past_kv_qparams.{rank}   (2 [K, V], kv_head_num / num_tp, 2 [scale, zero]) float32
        metadata: kv_bits, kv_zero ("uint8" zero point | "float16" minimum), kv_sym, num_tp,
                  num_layer, kv_head_num, size_per_head, k_smooth (the fingerprint of the
                  workspace's K smoothing they assume, labkit/quant/k_smooth.py, or "none")

(lmdeploy 0.1 wrote `layers.{i}.past_kv_scale.{rank}.weight` files of the same role.)
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from labkit import interrupt
from labkit.config import ConfigError, ModelConfig

QPARAMS_FILE = "kv_qparams.safetensors"
KV_BITS = (8, 4)
KV_ZERO = {8: "uint8", 4: "float16"}   # what the zero column means for each bit width


class KVQParamsError(ValueError):
    """Statistics that do not fit the workspace, or bad kv_qparams arguments."""


def qparams_from_stats(stats: dict, bits: int, sym: bool) -> torch.Tensor:
    """K/V statistics -> (layers, 2, Hkv, 2) float32 [scale, zero] per layer, K/V and head.
    `stats` is calibrate's kv_stats: {"key"|"value": {"min"|"max"|"absmax": (L, Hkv, D)}}."""
    qmax = 2 ** bits - 1
    out = []
    for which in ("key", "value"):
        st = stats[which]
        if sym:
            absmax = st["absmax"].float().amax(-1)                             # (L, Hkv)
            scale = (absmax / (2 ** (bits - 1) - 1)).clamp(min=2.0 ** -14).half().float()
            zero = torch.full_like(scale, 2 ** (bits - 1)) if bits == 8 else -(2 ** (bits - 1)) * scale
        else:
            lo, hi = st["min"].float().amin(-1), st["max"].float().amax(-1)    # (L, Hkv)
            if bits == 8:
                lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            scale = ((hi - lo) / qmax).clamp(min=2.0 ** -14).half().float()  # as the cache stores it
            zero = torch.floor(-lo / scale + 0.5).clamp(0, qmax) if bits == 8 else lo
        out.append(torch.stack([scale, zero.half().float()], -1))              # (L, Hkv, 2)
    return torch.stack(out, 1).contiguous()                                    # (L, 2, Hkv, 2)


def write_kv_qparams(work_dir, weights_dir, kv_bits: int = 8, kv_sym: bool = False,
                     num_tp: int | None = None) -> Path:
    """Read work_dir's statistics, check them against the workspace, write the parameters
    (all checks come first: on any error the workspace is left as it was)."""
    from safetensors.torch import save_file

    if kv_bits not in KV_BITS:
        raise KVQParamsError(f"kv_bits={kv_bits!r} is not allowed: --kv-bits must be 8 or 4")
    wdir, cfg, storage, stats = stats_for_workspace(work_dir, weights_dir)
    tp = storage["tensor_para_size"] if num_tp is None else num_tp
    if not isinstance(tp, int) or tp < 1 or cfg.num_kv_heads % tp:
        raise KVQParamsError(f"num_tp={tp} is not allowed: --num-tp must divide "
                             f"kv_head_num={cfg.num_kv_heads}")
    smooth = _workspace_smoothing(wdir, cfg)
    if smooth is not None:                      # the cache holds K / c: so must its range
        c = smooth[0]                                                          # (L, Hkv, D)
        k = stats["key"]
        stats = dict(stats, key={"min": k["min"].float() / c, "max": k["max"].float() / c,
                                 "absmax": k["absmax"].float() / c})
    params = qparams_from_stats(stats, kv_bits, kv_sym)                        # (L, 2, Hkv, 2)
    per = cfg.num_kv_heads // tp
    tensors = {f"layers.{i}.past_kv_qparams.{r}": params[i, :, r * per:(r + 1) * per].contiguous()
               for i in range(cfg.num_layers) for r in range(tp)}
    meta = {"kv_bits": str(kv_bits), "kv_zero": KV_ZERO[kv_bits], "kv_sym": str(int(kv_sym)),
            "num_tp": str(tp), "num_layer": str(cfg.num_layers), "kv_head_num": str(cfg.num_kv_heads),
            "size_per_head": str(cfg.head_dim),
            "k_smooth": "none" if smooth is None else smooth[1]}
    dst = wdir / QPARAMS_FILE
    tmp = wdir / f".{QPARAMS_FILE}.partial-{os.getpid()}"
    try:
        save_file(tensors, str(tmp), metadata=meta)
        interrupt.check()                       # a SIGTERM while writing: keep the old file
        os.replace(tmp, dst)                    # atomic: the old file or the new one, never half
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _workspace_smoothing(wdir: Path, cfg: ModelConfig):
    from labkit.quant.k_smooth import read_k_smooth
    return read_k_smooth(wdir, cfg)


def stats_for_workspace(work_dir, weights_dir):
    """(weights dir, ModelConfig, storage fields, K/V statistics) once the statistics in
    work_dir are checked to be of this workspace's shape (clear one-line errors)."""
    from labkit.quant.calibrate import load_kv_stats
    from labkit.workspace_ini import read_config_ini

    wdir = Path(weights_dir)
    if not (wdir / "config.ini").is_file():
        raise KVQParamsError(f"{wdir} has no config.ini: pass WORKSPACE/triton_models/weights "
                             f"of a workspace made by `labkit convert`")
    cfg, storage, _ = read_config_ini(wdir)
    stats = load_kv_stats(work_dir)
    _check_fit(stats, cfg, work_dir)
    return wdir, cfg, storage, stats


def _check_fit(stats: dict, cfg: ModelConfig, work_dir) -> None:
    have = tuple(stats["key"]["max"].shape)                                    # (L, Hkv, D)
    want = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    if have != want:
        raise KVQParamsError(
            f"the statistics in {work_dir} are for {have[0]} layers x {have[1]} KV heads x "
            f"head_dim {have[2]}, the workspace has num_layer={want[0]}, kv_head_num={want[1]}, "
            f"size_per_head={want[2]}: calibrate the model this workspace was converted from")


def read_kv_qparams(workspace, cfg: ModelConfig) -> tuple[torch.Tensor, int] | None:
    """The workspace's calibrated parameters, all heads: ((layers, 2, Hkv, 2), bits); None if
    it has none. A file that does not fit the model is an error, not silently ignored."""
    from safetensors import safe_open

    path = Path(workspace) / "triton_models" / "weights" / QPARAMS_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        try:
            bits, tp = int(meta["kv_bits"]), int(meta["num_tp"])
            layers = [torch.cat([f.get_tensor(f"layers.{i}.past_kv_qparams.{r}") for r in range(tp)], 1)
                      for i in range(cfg.num_layers)]                          # (2, Hkv, 2) each
        except Exception as e:                  # KeyError, a missing tensor, bad metadata
            raise ConfigError(f"{path} is not a kv_qparams file for this model ({e}); rerun "
                              f"`labkit lite kv_qparams` or delete it") from None
    params = torch.stack(layers)                                               # (L, 2, Hkv, 2)
    smooth = _workspace_smoothing(path.parent, cfg)
    now = "none" if smooth is None else smooth[1]
    if meta.get("k_smooth", "none") != now:
        raise ConfigError(f"{path} was computed for K smoothing {meta.get('k_smooth', 'none')}, "
                          f"the workspace's is {now} (`labkit lite k_smooth` ran after "
                          f"`kv_qparams`): rerun `labkit lite kv_qparams`")
    if bits in KV_ZERO and meta.get("kv_zero", "uint8") != KV_ZERO[bits]:
        # int4 files of an older labkit hold an integer zero point, not the float minimum
        raise ConfigError(f"{path} holds int{bits} parameters with a {meta.get('kv_zero', 'uint8')} "
                          f"zero; this labkit's int{bits} cache needs a {KV_ZERO[bits]} zero: rerun "
                          f"`labkit lite kv_qparams`")
    if params.shape != (cfg.num_layers, 2, cfg.num_kv_heads, 2) or bits not in KV_BITS:
        raise ConfigError(f"{path} holds parameters of shape {tuple(params.shape)} for int{bits}; "
                          f"this model needs ({cfg.num_layers}, 2, {cfg.num_kv_heads}, 2): rerun "
                          f"`labkit lite kv_qparams`")
    return params.float(), bits

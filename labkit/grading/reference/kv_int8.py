"""Reference int8 KV quantization: asymmetric, per (token, head), quantized when written.

    zero = min(x), scale = max((max(x) - min(x)) / 255, 1e-8)
    code = clamp(round((x - zero) / scale), 0, 255) - 128  (int8),  x_hat = (code + 128) * scale + zero

The paged layout: codes (num_blocks, block_size, Hkv, D) int8 and parameters
(num_blocks, block_size, Hkv, 2) float32 holding [scale, zero], addressed by slot.
"""
from __future__ import annotations

import torch

SCALE_MIN = 1e-8        # a constant vector (max == min) still gets a usable scale


def quantize_kv_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, H, D) -> codes (N, H, D) int8, scale (N, H) float32, zero (N, H) float32."""
    x = x.float()
    lo, hi = x.amin(-1), x.amax(-1)                                   # (N, H) each
    scale = ((hi - lo) / 255).clamp(min=SCALE_MIN)                    # (N, H)
    codes = ((x - lo[..., None]) / scale[..., None]).round().clamp(0, 255) - 128  # (N, H, D)
    return codes.to(torch.int8), scale, lo


def dequantize_kv_int8(codes, scale, zero, dtype=torch.float32) -> torch.Tensor:
    """codes (..., D) int8, scale/zero (...) -> (..., D) in dtype."""
    return ((codes.float() + 128) * scale[..., None] + zero[..., None]).to(dtype)


def store_kv_int8(k, v, k_cache, v_cache, k_params, v_params, slot_mapping) -> None:
    """Quantize the N new tokens' k/v (N, Hkv, D) and write codes and [scale, zero] into
    their slots; slots < 0 are padding and skipped."""
    _, Hkv, D = k.shape
    keep = slot_mapping >= 0                                          # (N,)
    slots = slot_mapping[keep].long()                                 # (n,)
    for x, cache, params in ((k[keep], k_cache, k_params), (v[keep], v_cache, v_params)):
        codes, scale, zero = quantize_kv_int8(x)                      # (n, Hkv, D), (n, Hkv) x2
        cache.view(-1, Hkv, D)[slots] = codes
        params.view(-1, Hkv, 2)[slots] = torch.stack([scale, zero], -1)   # (n, Hkv, 2)

"""Reference int4 weight quantization: asymmetric min-max per (row, group of K) with integer
zeros (AutoAWQ's convention), nibble packing, and AWQ's grid search of per-channel scales.

    scale = max(max - min, 1e-5) / 15,  zero = clamp(round(-min / scale), 0, 15)
    q = clamp(round(w / scale) + zero, 0, 15),  w_hat = (q - zero) * scale
    packed[n, j] = q[n, 2j] | q[n, 2j + 1] << 4
"""
from __future__ import annotations

import torch

MAX_Q = 15               # 4 bits
RANGE_MIN = 1e-5         # a constant group (max == min) still gets a usable scale


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = w.shape
    if group_size <= 0 or K % group_size:
        raise ValueError(f"group_size={group_size} is not allowed: it must divide the "
                         f"in-features K={K}")
    return w.float().reshape(N, K // group_size, group_size)         # (N, G, gs)


def quantize_int4(w: torch.Tensor, group_size: int):
    """w (N, K) -> q (N, K) uint8, scale (N, G) float32, zero (N, G) uint8."""
    g = _groups(w, group_size)                                        # (N, G, gs)
    lo, hi = g.amin(-1), g.amax(-1)                                   # (N, G)
    scale = (hi - lo).clamp(min=RANGE_MIN) / MAX_Q                    # (N, G)
    zero = (-lo / scale).round().clamp(0, MAX_Q)                      # (N, G)
    q = ((g / scale[..., None]).round() + zero[..., None]).clamp(0, MAX_Q)  # (N, G, gs)
    return q.reshape(w.shape).to(torch.uint8), scale, zero.to(torch.uint8)


def dequantize_int4(q, scale, zero, group_size: int) -> torch.Tensor:
    """q (N, K) uint8, scale (N, G), zero (N, G) -> (N, K) float32."""
    g = _groups(q, group_size)                                        # (N, G, gs)
    return ((g - zero.float()[..., None]) * scale[..., None]).reshape(q.shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 in [0, 15] -> (N, K // 2) uint8, even column in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8."""
    return torch.stack([packed & 0xF, packed >> 4], -1).reshape(packed.shape[0], -1)


def fake_quant(w: torch.Tensor, group_size: int) -> torch.Tensor:
    return dequantize_int4(*quantize_int4(w, group_size), group_size)


def awq_search_scale(x: torch.Tensor, w: torch.Tensor, group_size: int, n_grid: int = 20):
    """x (T, K), w (N, K) -> (s (K,), best alpha, losses (n_grid,)): AWQ's grid over
    s = mean|x| ** alpha (normalized), minimizing the output error of the quantized layer."""
    x, w = x.float(), w.float()
    x_mean = x.abs().mean(0)                                          # (K,)
    ref = x @ w.T                                                     # (T, N)
    losses, best, best_s = torch.empty(n_grid), 0, None
    for i in range(n_grid):
        s = x_mean.pow(i / n_grid).clamp(min=1e-4)                    # (K,)
        s = s / (s.max() * s.min()).sqrt()
        w_q = fake_quant(w * s, group_size) / s                       # (N, K)
        losses[i] = (x @ w_q.T - ref).pow(2).mean()
        if best_s is None or losses[i] < losses[best]:
            best, best_s = i, s
    return best_s, best / n_grid, losses

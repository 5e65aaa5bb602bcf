"""Assignment 4: 4-bit weights (W4A16): group quantization, packing, and the AWQ scale search.

A Linear weight w (N, K) (N outputs, K inputs) is cut along K into groups of `group_size`
columns; each (row, group) gets its own scale and integer zero point (asymmetric min-max,
as AutoAWQ and LMDeploy do), 4 bits per weight:

    scale = max(max(g) - min(g), 1e-5) / 15          (per row and group of K)
    zero  = clamp(round(-min(g) / scale), 0, 15)     an integer, stored as uint8
    q     = clamp(round(w / scale) + zero, 0, 15)    uint8 in [0, 15]
    w_hat = (q - zero) * scale

Packing (the homework's layout): two 4-bit values per byte along K, the even column in the
LOW nibble:  packed[n, j] = q[n, 2j] | (q[n, 2j + 1] << 4),  packed (N, K // 2) uint8.

AWQ (activation-aware weight quantization): a few input channels carry large activations;
their weights matter more. Scale input channel k of w up by s_k before quantizing (and divide
the activation by s_k, folded into the previous op), so those weights lose less to rounding:

    x_mean = mean_t |x[t, k]|                     (K,) activation magnitude per channel
    for i in 0 .. n_grid - 1:  alpha = i / n_grid
        s = clamp(x_mean ** alpha, min=1e-4);  s = s / sqrt(max(s) * min(s))
        w_q = dequantize(quantize(w * s)) / s                       (scales broadcast over K)
        loss[i] = mean((x @ w_q.T - x @ w.T) ** 2)
    pick the alpha with the smallest loss (the first one on ties)

The grader compares each function with labkit's reference (labkit/grading/reference/int4.py)
on fresh random weights in the bundled model's MLP shapes (576 x 1536) with outlier channels.
Check locally: `labkit grade -k a4`.
"""
from __future__ import annotations

import torch


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) float -> q (N, K) uint8 in [0, 15], scale (N, K // group_size) float32,
    zero (N, K // group_size) uint8. K % group_size != 0 is a ValueError naming group_size.
    Compute in float32 whatever w's dtype is."""
    # BEGIN ASSIGN 4.1
    raise NotImplementedError("ASSIGN 4.1: quantize_int4")
    # END ASSIGN 4.1


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """q (N, K) uint8, scale (N, G) float32, zero (N, G) uint8 -> w_hat (N, K) float32."""
    # BEGIN ASSIGN 4.1
    raise NotImplementedError("ASSIGN 4.1: dequantize_int4")
    # END ASSIGN 4.1


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) uint8 with values in [0, 15], K even -> packed (N, K // 2) uint8."""
    # BEGIN ASSIGN 4.2
    raise NotImplementedError("ASSIGN 4.2: pack_int4")
    # END ASSIGN 4.2


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed (N, K // 2) uint8 -> q (N, K) uint8; unpack_int4(pack_int4(q)) == q."""
    # BEGIN ASSIGN 4.3
    raise NotImplementedError("ASSIGN 4.3: unpack_int4")
    # END ASSIGN 4.3


def awq_search_scale(x: torch.Tensor, w: torch.Tensor, group_size: int,
                     n_grid: int = 20) -> tuple[torch.Tensor, float, torch.Tensor]:
    """x (T, K) calibration activations, w (N, K) -> (s (K,) float32 at the best alpha,
    best alpha (float), losses (n_grid,) float32). Uses quantize_int4/dequantize_int4 (4.1).
    Compute in float32."""
    # BEGIN ASSIGN 4.4
    raise NotImplementedError("ASSIGN 4.4: awq_search_scale")
    # END ASSIGN 4.4

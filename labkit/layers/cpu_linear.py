"""Linear layers on the CPU through oneDNN, with each weight reordered once (bf16 and fp32).

`F.linear` in bf16 on a CPU re-lays the weight out for oneDNN's kernels on every call; for a
decode step (one row of x) that costs more than the product: SmolLM2's layers streamed their
weights at 11-16 GB/s where the machine copies 34 GB/s. Reordering each weight once into
oneDNN's blocked layout (what torch.compile's CPU "freezing" does) and calling the product on
it gives the same numbers (bitwise, measured) 1.1-2.8x faster (docs/PERF.md, CPU section).

fp32 takes the same path on x86: `F.linear` in fp32 is a BLAS sgemm that packs the weight into
its own blocks on every call, which at decode sizes (1-64 rows) costs as much as the product.
On a 2-core AVX2 EPYC one decode step's 121 products took 35.0 -> 23.8 ms at 1 row and
85.4 -> 55.6 ms at 20 rows with the weights reordered once (scripts/cpu_linear_layouts.py).
At prefill sizes the order turns: sgemm's packing is paid once for many rows and its kernel is
the faster one (a layer's 4 products at 4,631 rows 238 -> 199 ms, at 1,024 rows 47.5 -> 41.3
ms; at 256-512 rows the two are within 5%, either way depending on whether the weights are in
cache), so fp32 products of `FP32_SGEMM_FROM_ROWS` rows or more go to sgemm.
The sums run in a different order than sgemm's, so the logits are not F.linear's bit for bit
(|error| vs float64 1.6e-6 against 7.5e-7 on a 576-wide product: fp32 rounding either way; at
SmolLM2's logits up to 2e-3-4e-3 against sgemm's 3e-4, where outlier activations meet the down
projection; tests/test_llama_parity.py holds both to their own bounds).
Only on x86, where it was measured; elsewhere, or with LABKIT_ONEDNN_FP32=0, fp32 stays on
`F.linear`'s product.

The reordered copy is kept on the weight tensor itself (an attribute) and rebuilt if the weight
is changed in place (its version counter moves, e.g. AWQ smoothing). It doubles the weights'
memory (SmolLM2-135M in fp32: +540 MB). Elsewhere, for a 2-D x without bias (a decode step)
F.linear is `mm(x, weight.t())`: that is called directly, on a transposed view cached on the
weight (bitwise the same; F.linear's wrappers linear/t/transpose/matmul are 5 small ops per
call, 20 per layer). bf16 takes that path too where oneDNN has no bf16 (AVX2 machines).
Autograd always takes F.linear (the reordered copy has no gradient).
"""
from __future__ import annotations

import os
import platform

import torch
import torch.nn.functional as F


def _available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def _fp32_available() -> bool:
    """oneDNN's fp32 product on a reordered weight runs here, and agrees with F.linear."""
    if (os.environ.get("LABKIT_ONEDNN_FP32", "1") == "0" or not torch.backends.mkldnn.is_available()
            or platform.machine().lower() not in ("x86_64", "amd64")):
        return False
    try:
        w, x = torch.randn(24, 40), torch.randn(3, 40)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return torch.allclose(got, F.linear(x, w), atol=1e-4)
    except (AttributeError, RuntimeError):
        return False


AVAILABLE = _available()              # bf16 through oneDNN
FP32_AVAILABLE = _fp32_available()    # fp32 through oneDNN


# The layout is chosen for a number of rows of x. fp32: a layout chosen for 256 rows runs the
# 1-64 rows of a decode step faster than one chosen for 1 row (a step's 121 products on a 2-core
# AVX2 EPYC: 8 rows 57 -> 36-38 ms, 20 rows 74-83 -> 58-70, 64 rows 172-178 -> 132-140; 1 row
# and prefill sizes within noise). bf16 keeps the 1-row layout it was measured with.
PACK_FOR_ROWS = {torch.float32: 256, torch.bfloat16: 1}
FP32_SGEMM_FROM_ROWS = 1024      # fp32 products with this many rows or more: sgemm (see above)


def uses_onednn(dtype: torch.dtype, rows: int = 1) -> bool:
    """Does a CPU product of `rows` rows in `dtype` (x and weight) go through oneDNN's
    reordered weight?"""
    if dtype == torch.float32:
        return FP32_AVAILABLE and rows < FP32_SGEMM_FROM_ROWS
    return AVAILABLE and dtype == torch.bfloat16


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T (+ bias) -> (..., N); oneDNN's product on the CPU where
    `uses_onednn`, else F.linear's."""
    on_cpu = x.device.type == "cpu" and weight.dtype == x.dtype and not torch.is_grad_enabled()
    rows = x.numel() // max(x.shape[-1], 1)
    if on_cpu and uses_onednn(x.dtype, rows) and not weight.is_inference():  # (an inference
        return torch.ops.mkldnn._linear_pointwise(             #  tensor has no version counter)
            x, onednn_weight(weight), bias, "none", [], "")
    if on_cpu and x.dim() == 2 and bias is None:
        return torch.mm(x, _transposed(weight))                  # (M, N), F.linear's product
    return F.linear(x, weight, bias)


def onednn_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight reordered for oneDNN, kept on the weight with its version and storage (made again
    if the weight is changed in place or given new data)."""
    key = (weight._version, weight.data_ptr())
    hit = getattr(weight, "_onednn_packed", None)                  # (key, packed)
    if hit is None or hit[0] != key:
        hint = PACK_FOR_ROWS.get(weight.dtype, 1)
        hit = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), hint))
        weight._onednn_packed = hit
    return hit[1]


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    """weight.t() (K, N), a view kept on the weight (made again if its storage is replaced)."""
    wt = getattr(weight, "_t_view", None)
    if wt is None or wt.data_ptr() != weight.data_ptr() or wt.shape[::-1] != weight.shape:
        wt = weight.detach().t()
        weight._t_view = wt
    return wt

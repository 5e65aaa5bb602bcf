"""bf16 linear layers on the CPU through oneDNN, with each weight reordered once.

`F.linear` in bf16 on a CPU re-lays the weight out for oneDNN's kernels on every call; for a
decode step (one row of x) that costs more than the product: SmolLM2's layers streamed their
weights at 11-16 GB/s where the machine copies 34 GB/s. Reordering each weight once into
oneDNN's blocked layout (what torch.compile's CPU "freezing" does) and calling the product on
it gives the same numbers (bitwise, measured) 1.1-2.8x faster (docs/PERF.md, CPU section).

The reordered copy is kept on the weight tensor itself (an attribute) and rebuilt if the weight is changed in place
(its version counter moves, e.g. AWQ smoothing). It doubles the weights' memory; fp32 stays on
`F.linear`'s product, which the fp32 parity tests compare. For a 2-D x without bias (a decode
step) F.linear is `mm(x, weight.t())`: that is called directly, on a transposed view cached on
the weight (bitwise the same; F.linear's wrappers linear/t/transpose/matmul are 5 small ops
per call, 20 per layer). bf16 takes that path too where oneDNN has no bf16 (AVX2 machines).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


AVAILABLE = _available()


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T (+ bias) -> (..., N); oneDNN for bf16 on the CPU."""
    if not (AVAILABLE and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not weight.is_inference()):          # (no version counter to check)
        if (x.dim() == 2 and bias is None and weight.dtype == x.dtype and x.device.type == "cpu"
                and not torch.is_grad_enabled()):
            return torch.mm(x, _transposed(weight))                  # (M, N), F.linear's product
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, onednn_weight(weight), bias, "none", [], "")


def onednn_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight reordered for oneDNN, kept on the weight with its version (made again if the
    weight is changed in place)."""
    hit = getattr(weight, "_onednn_packed", None)                  # (version, packed)
    if hit is None or hit[0] != weight._version:
        hit = (weight._version, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1))
        weight._onednn_packed = hit
    return hit[1]


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    """weight.t() (K, N), a view kept on the weight (made again if its storage is replaced)."""
    wt = getattr(weight, "_t_view", None)
    if wt is None or wt.data_ptr() != weight.data_ptr() or wt.shape[::-1] != weight.shape:
        wt = weight.detach().t()
        weight._t_view = wt
    return wt

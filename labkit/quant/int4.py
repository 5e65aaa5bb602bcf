"""4-bit weight quantization: per-group min-max codes with integer zero points, and the two
packed layouts that carry them (the AWQ checkpoint's and the W4A16 kernel's).

Asymmetric, per output row and group of G consecutive input columns (AutoAWQ's rule):

    lo, hi = min(w_g), max(w_g)
    s      = max(hi - lo, 1e-5) / 15            rounded to float16 (what is stored)
    z      = clamp(round(-lo / s), 0, 15)       an integer
    q      = clamp(round(w / s) + z, 0, 15)     the 4-bit code
    w_hat  = (q - z) * s

Symmetric (`sym=True`): s = max(|w_g|) / 7, z = 8, so w_hat = (q - 8) * s in [-8s, 7s].

Layouts:
- kernel / workspace (kernels/w4a16.py): qweight (N, K/2) uint8, two codes per byte along K;
  scales (N, K/G) in the model dtype; zeros (N, K/G) uint8.
- AWQ checkpoint (AutoAWQ's "gemm" version, what HF-style AWQ folders hold): the weight is
  transposed to (K, N) and eight codes along N go into one int32, nibble i (bits 4i..4i+3)
  holding column 8j + AWQ_ORDER[i] of word j:
      qweight (K, N/8) int32, qzeros (K/G, N/8) int32 (same packing), scales (K/G, N) float16
"""
from __future__ import annotations

import torch

from kernels.w4a16 import GROUP_SIZES, pack_int4, unpack_int4  # noqa: F401

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)        # nibble i of a word holds column AWQ_ORDER[i]
MIN_SCALE = 1e-5                            # a constant group still gets a usable scale


class QuantError(ValueError):
    """A weight that cannot be quantized as asked (bad group size, NaN, ...)."""


# ---------------------------------------------------------------------------- group sizes
def check_group_size(group_size: int, in_features: dict[str, int]) -> None:
    """Raise naming a layer whose in_features the group size does not divide."""
    if group_size not in GROUP_SIZES:
        raise QuantError(f"w_group_size={group_size} is not allowed: w_group_size must be one "
                         f"of {', '.join(map(str, GROUP_SIZES))}")
    bad = {n: k for n, k in in_features.items() if k % group_size}
    if bad:
        name, k = next(iter(bad.items()))
        ok = [g for g in GROUP_SIZES if all(v % g == 0 for v in in_features.values())]
        raise QuantError(f"w_group_size={group_size} is not allowed for this model: it does not "
                         f"divide in_features={k} of {name}; w_group_size must be one of {ok}")


def default_group_size(in_features: dict[str, int]) -> int:
    """The largest allowed group size that divides every layer's in_features."""
    for g in sorted(GROUP_SIZES, reverse=True):
        if all(k % g == 0 for k in in_features.values()):
            return g
    raise QuantError(f"no group size in {GROUP_SIZES} divides every in_features "
                     f"({sorted(set(in_features.values()))}); this model cannot be stored as int4")


# ---------------------------------------------------------------------------- quantize
def quantize_groups(w: torch.Tensor, group_size: int, sym: bool = False,
                    scale_dtype: torch.dtype = torch.float16):
    """w (N, K) float -> q (N, K) uint8, scales (N, K/G) scale_dtype, zeros (N, K/G) uint8.
    The codes are computed with the scale as stored (rounded to scale_dtype)."""
    N, K = w.shape
    if K % group_size:
        raise QuantError(f"group_size={group_size} does not divide in_features={K}")
    if not torch.isfinite(w).all():
        raise QuantError("the weight holds NaN or inf; refusing to quantize it")
    wg = w.float().reshape(N, K // group_size, group_size)            # (N, K/G, G)
    if sym:
        s = (wg.abs().amax(-1) / 7).clamp(min=MIN_SCALE)             # (N, K/G)
        s = s.to(scale_dtype).float()
        z = torch.full_like(s, 8.0)
    else:
        lo, hi = wg.amin(-1), wg.amax(-1)                             # (N, K/G)
        s = ((hi - lo).clamp(min=MIN_SCALE) / 15).to(scale_dtype).float()
        z = (-lo / s).round().clamp(0, 15)
    q = ((wg / s[..., None]).round() + z[..., None]).clamp(0, 15)     # (N, K/G, G)
    return q.reshape(N, K).to(torch.uint8), s.to(scale_dtype), z.to(torch.uint8)


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (N, K) codes, scales/zeros (N, K/G) -> w_hat (N, K) in dtype (float32 arithmetic)."""
    N, K = q.shape
    G = K // scales.shape[1]
    w = (q.float().reshape(N, -1, G) - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(N, K).to(dtype)


def fake_quantize(w: torch.Tensor, group_size: int, sym: bool = False) -> torch.Tensor:
    """Round-trip w through 4-bit codes: what the model computes with, in w's dtype."""
    q, s, z = quantize_groups(w, group_size, sym)
    return dequantize_groups(q, s, z, w.dtype)


# ---------------------------------------------------------------------------- AWQ packing
def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_awq(q_kn: torch.Tensor) -> torch.Tensor:
    """q (K, N) codes -> (K, N/8) int32 in AutoAWQ's order (also used for qzeros)."""
    K, N = q_kn.shape
    if N % 8:
        raise QuantError(f"out_features={N} must be a multiple of 8 for the AWQ layout")
    q = q_kn.to(torch.int64).reshape(K, N // 8, 8)[..., list(AWQ_ORDER)]   # nibble order
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)                   # (8,)
    return _to_int32((q << shifts).sum(-1))                              # (K, N/8)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """(K, N/8) int32 in AutoAWQ's order -> q (K, N) uint8."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nib = (packed[..., None] >> shifts) & 15                            # (K, N/8, 8) nibble i
    cols = torch.empty_like(nib)
    cols[..., list(AWQ_ORDER)] = nib                                     # column AWQ_ORDER[i]
    return cols.reshape(packed.shape[0], packed.shape[1] * 8).to(torch.uint8)             # (K, N)


def to_awq_tensors(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict:
    """Torch-layout (N, K) codes and (N, K/G) scales/zeros -> AutoAWQ's three tensors."""
    return {"qweight": pack_awq(q.T.contiguous()),                      # (K, N/8)
            "qzeros": pack_awq(zeros.T.contiguous()),                   # (K/G, N/8)
            "scales": scales.T.contiguous().to(torch.float16)}          # (K/G, N)


def from_awq_tensors(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor):
    """AutoAWQ's tensors -> (q (N, K) uint8, scales (N, K/G), zeros (N, K/G) uint8)."""
    q = unpack_awq(qweight).T.contiguous()                              # (N, K)
    z = unpack_awq(qzeros).T.contiguous()                               # (N, K/G)
    return q, scales.T.contiguous(), z


def to_kernel_tensors(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      dtype: torch.dtype) -> dict:
    """Torch-layout codes -> the W4A16 kernel's qweight/scales/zeros (kernels/w4a16.py)."""
    return {"qweight": pack_int4(q), "scales": scales.to(dtype).contiguous(),
            "zeros": zeros.to(torch.uint8).contiguous()}

"""Assignment 3: int8 KV cache (quant_policy 8): quantize, dequantize, and the quantizing store.

Each token's key (and value) vector of one KV head, x (D,), is stored as D int8 codes plus two
float32 parameters, asymmetric min-max quantization (LMDeploy's quant_policy 8):

    zero  = min(x)                     scale = max((max(x) - min(x)) / 255, 1e-8)
    code  = clamp(round((x - zero) / scale), 0, 255) - 128        int8 in [-128, 127]
    x_hat = (code + 128) * scale + zero                            |x_hat - x| <= scale / 2

(round is round-half-to-even, as torch.round does.) Parameters are per (token, head), so one
outlier token does not spoil the resolution of the others. The cache then holds 1 byte per
value plus 8 bytes per (token, head) instead of 2 (bf16) or 4 (fp32) bytes per value.

Layout of the quantized paged cache (the homework's own; labkit's kernels may differ):
    k_cache, v_cache   (num_blocks, block_size, Hkv, D)  int8 codes
    k_params, v_params (num_blocks, block_size, Hkv, 2)  float32, [..., 0] = scale, [..., 1] = zero
addressed by the same slots as the unquantized cache: slot = block_id * block_size + offset.

The grader compares your functions with labkit's reference (labkit/grading/reference/kv_int8.py)
on fresh random K/V in the bundled model's shapes (3 KV heads, head dim 64): codes may differ
by one where a value lies within float rounding of a .5 tie, nowhere else.
Check locally: `labkit grade -k a3`.
"""
from __future__ import annotations

import torch


def quantize_kv_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, H, D) float -> codes (N, H, D) int8, scale (N, H) float32, zero (N, H) float32.

    Compute in float32 whatever x's dtype is."""
    # BEGIN ASSIGN 3.1
    raise NotImplementedError("ASSIGN 3.1: quantize_kv_int8")
    # END ASSIGN 3.1


def dequantize_kv_int8(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes (..., D) int8, scale (...) and zero (...) float32 -> x_hat (..., D) in `dtype`.

    Works for any leading shape: (N, H) for tokens, (num_blocks, block_size, Hkv) for a cache."""
    # BEGIN ASSIGN 3.2
    raise NotImplementedError("ASSIGN 3.2: dequantize_kv_int8")
    # END ASSIGN 3.2


def store_kv_int8(
    k: torch.Tensor,             # (N, Hkv, D) keys of this step's N new tokens (float)
    v: torch.Tensor,             # (N, Hkv, D)
    k_cache: torch.Tensor,       # (num_blocks, block_size, Hkv, D) int8, written in place
    v_cache: torch.Tensor,       # (num_blocks, block_size, Hkv, D) int8, written in place
    k_params: torch.Tensor,      # (num_blocks, block_size, Hkv, 2) float32, written in place
    v_params: torch.Tensor,      # (num_blocks, block_size, Hkv, 2) float32, written in place
    slot_mapping: torch.Tensor,  # (N,) int, slot of each new token; < 0 = padding, skip it
) -> None:
    """The quantizing store: quantize each new token's k and v (your 3.1) and write codes and
    [scale, zero] into its slot, in place. Slots of other tokens stay untouched; so do the
    rows of padding tokens (slot < 0).

    Hint: `cache.view(-1, Hkv, D)` has one row per slot; index_copy_ or indexing writes."""
    # BEGIN ASSIGN 3.3
    raise NotImplementedError("ASSIGN 3.3: store_kv_int8")
    # END ASSIGN 3.3

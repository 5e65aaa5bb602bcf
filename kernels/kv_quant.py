"""KV-cache quantization: int8 / int4 codes, asymmetric per token and KV head.

Every (token, KV head) row of D values x gets its own scale s and zero, two ways:

  int8, integer zero point (1 byte):        int4, float zero = the row minimum (float16):
    lo, hi = min(x, 0), max(x, 0)              lo, hi = min(x), max(x)
    s      = (hi - lo) / 255                   s      = (hi - lo) / 15
    z      = round(-lo / s)      uint8         m      = lo                 float16
    code   = clamp(round(x / s) + z, 0, 255)   code   = clamp(round((x - m) / s), 0, 15)
    x_hat  = (code - z) * s                    x_hat  = code * s + m

(s is stored as float16.) Why two: an integer zero must put 0 on the grid, which shifts the
grid by up to half a step; with 255 steps that costs nothing measurable, with 15 it does: on
the bundled model (`labkit eval ppl`, 16 x 1024 tokens, unquantized 12.88) int4 with an
integer zero measured 15.26 (+18.4%), with the float minimum 15.01 (+16.5%), so int4 keeps
the exact minimum. Bytes decide the rest: int8 needs the 1-byte zero to reach 1.9x the tokens
of bf16 at head_dim 64.

The paged cache of one layer keeps, for K and for V, a `QuantKVCache`: the codes plus a side
cache of scales and zeros addressed by the same slots (so by the same block table):

    data   (num_blocks, block_size, Hkv, D)      uint8 codes (int8)
           (num_blocks, block_size, Hkv, D // 2) uint8, two int4 codes per byte (int4):
                                                 low nibble = dim j, high nibble = dim j + D/2
    scale  (num_blocks, block_size, Hkv)         float16
    zero   (num_blocks, block_size, Hkv)         uint8 (int8) | float16 (int4)

Bytes per token and head (K or V): D + 3 for int8, D/2 + 4 for int4, against 2D in bf16: at
D = 64 that is 1.91x and 3.56x more tokens in the same memory (D = 128: 1.94x, 3.76x).

Calibrated (static) parameters: `QuantKVCache.static` (Hkv, 2) holds one (scale, zero) per KV
head, measured offline (`labkit lite kv_qparams`), in the same format: int8 an integer zero
point, int4 a float zero (the head's calibrated minimum, so one 16-level grid per head from
its calibrated min to max). The store then uses those instead of each token's own range
(values outside are clipped), and still writes them per token, so the attention kernels
never know.

    quantize_ref / dequantize_ref / pack_int4 / unpack_int4   the arithmetic, in PyTorch
    store_kv_quant_ref      PyTorch: quantize, then index_copy_ into the slots
    store_kv_quant_triton   Triton: one program per token, padding (slot -1) skipped on device
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kernels._triton import require_triton, tl, triton

__all__ = ["QuantKVCache", "quantize_ref", "dequantize_ref", "pack_int4", "unpack_int4",
           "gather_dequant", "store_kv_quant_ref", "store_kv_quant_triton", "MIN_SCALE"]

MIN_SCALE = 2.0 ** -14      # smallest normal float16: a constant row still gets a usable scale


@dataclass
class QuantKVCache:
    """One layer's K (or V) cache in int8/int4 and its per-token, per-head scale and zero."""
    data: torch.Tensor                      # (num_blocks, block_size, Hkv, D or D//2) uint8
    scale: torch.Tensor                     # (num_blocks, block_size, Hkv) float16
    zero: torch.Tensor                      # (num_blocks, block_size, Hkv) uint8 | float16
    bits: int                               # 8 or 4
    static: Optional[torch.Tensor] = None   # (Hkv, 2) float32 calibrated (scale, zero) or None

    @staticmethod
    def empty(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, bits: int,
              device=None) -> "QuantKVCache":
        assert bits in (8, 4), "bits must be 8 or 4"
        width = head_dim if bits == 8 else head_dim // 2
        rows = (num_blocks, block_size, num_kv_heads)
        return QuantKVCache(torch.empty(*rows, width, dtype=torch.uint8, device=device),
                            torch.empty(rows, dtype=torch.float16, device=device),
                            torch.empty(rows, dtype=zero_dtype(bits), device=device), bits)

    @property
    def head_dim(self) -> int:
        return self.data.shape[-1] * (1 if self.bits == 8 else 2)

    @staticmethod
    def bytes_per_row(head_dim: int, bits: int) -> int:
        """Bytes one (token, KV head) row takes: codes + scale (2) + zero (1 or 2)."""
        return head_dim * bits // 8 + 2 + zero_dtype(bits).itemsize


def zero_dtype(bits: int) -> torch.dtype:
    """int8: an integer zero point (uint8); int4: the row minimum (float16)."""
    return torch.uint8 if bits == 8 else torch.float16


# ----------------------------------------------------------------------------- the arithmetic
def quantize_ref(x: torch.Tensor, bits: int, static: torch.Tensor | None = None):
    """x (..., Hkv, D) -> codes (..., Hkv, D) uint8, scale (..., Hkv) float16, zero (..., Hkv)
    (uint8 for int8, float16 for int4; see the module docstring).

    Online: each row's own range. Static: `static` (Hkv, 2) gives every token of head h the
    calibrated (scale, zero); values outside the calibrated range are clipped."""
    qmax = 2 ** bits - 1
    x = x.float()
    if static is not None:
        scale = static[:, 0].float().expand(x.shape[:-1])               # (..., Hkv)
        zero = static[:, 1].float().expand(x.shape[:-1])
    elif bits == 8:
        lo = x.amin(-1).clamp(max=0)                                   # (..., Hkv)
        hi = x.amax(-1).clamp(min=0)
        scale = ((hi - lo) / qmax).clamp(min=MIN_SCALE).half().float()  # rounded as stored
        zero = torch.floor(-lo / scale + 0.5).clamp(0, qmax)            # (..., Hkv)
    else:
        lo, hi = x.amin(-1), x.amax(-1)                                 # (..., Hkv)
        scale = ((hi - lo) / qmax).clamp(min=MIN_SCALE).half().float()
        zero = lo.half().float()                                        # the minimum, as stored
    if bits == 8:
        codes = torch.floor(x / scale[..., None] + 0.5) + zero[..., None]  # (..., Hkv, D)
    else:
        codes = torch.floor((x - zero[..., None]) / scale[..., None] + 0.5)
    codes = codes.clamp(0, qmax).to(torch.uint8)
    return codes, scale.half(), zero.to(zero_dtype(bits))


def dequantize_ref(codes, scale, zero, dtype=torch.float32) -> torch.Tensor:
    """codes (..., D) uint8, scale/zero (...,) -> (..., D) in dtype:
    (codes - zero) * scale for an integer zero (uint8), codes * scale + zero for a float one."""
    s = scale.float()[..., None]
    if zero.dtype == torch.uint8:
        return ((codes.float() - zero.float()[..., None]) * s).to(dtype)
    return (codes.float() * s + zero.float()[..., None]).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(..., D) codes in [0, 15] -> (..., D/2) bytes: low nibble dim j, high nibble dim j + D/2.
    (Halves, not neighbours: a kernel unpacks each half as its own (BN, D/2) tile.)"""
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: (..., D/2) bytes -> (..., D) codes."""
    return torch.cat([packed & 15, packed >> 4], -1)


def gather_dequant(cache: QuantKVCache, block_table_row, length: int, dtype) -> torch.Tensor:
    """The first `length` tokens of one sequence, dequantized: (length, Hkv, D) in dtype."""
    length = int(length)
    block_size = cache.data.shape[1]
    row = block_table_row.tolist() if torch.is_tensor(block_table_row) else block_table_row
    blocks = row[:(length + block_size - 1) // block_size]           # only the blocks in use
    codes = cache.data[blocks].flatten(0, 1)[:length]                 # (length, Hkv, D or D/2)
    if cache.bits == 4:
        codes = unpack_int4(codes)                                    # (length, Hkv, D)
    scale = cache.scale[blocks].flatten(0, 1)[:length]               # (length, Hkv)
    zero = cache.zero[blocks].flatten(0, 1)[:length]
    return dequantize_ref(codes, scale, zero, dtype)


# ----------------------------------------------------------------------------- the store
def store_kv_quant_ref(
    k: torch.Tensor,  # (N, Hkv, D) keys of the N new tokens
    v: torch.Tensor,  # (N, Hkv, D)
    k_cache: QuantKVCache,  # written in place
    v_cache: QuantKVCache,
    slot_mapping: torch.Tensor,  # (N,) slot = block_id * block_size + offset; < 0 = padding
) -> None:
    """Quantize token n's k/v and write codes, scale and zero into slot `slot_mapping[n]`."""
    valid = slot_mapping >= 0  # (N,)
    slots = slot_mapping.long()
    if not bool(valid.all()):  # drop padding tokens (one host sync)
        slots, k, v = slots[valid], k[valid], v[valid]
    for x, cache in ((k, k_cache), (v, v_cache)):
        codes, scale, zero = quantize_ref(x, cache.bits, cache.static)  # (n, Hkv, D), (n, Hkv) x2
        if cache.bits == 4:
            codes = pack_int4(codes)  # (n, Hkv, D/2)
        # .view: a non-contiguous cache fails loudly instead of writing into a copy
        cache.data.view(-1, *cache.data.shape[2:]).index_copy_(0, slots, codes)
        cache.scale.view(-1, cache.scale.shape[2]).index_copy_(0, slots, scale)
        cache.zero.view(-1, cache.zero.shape[2]).index_copy_(0, slots, zero)


@triton.jit
def _quantize_store_row(x_ptr, stride_n, stride_h, n, slot, data_ptr, scale_ptr, zero_ptr,
                        static_ptr, HKV: tl.constexpr, D: tl.constexpr, HKV_P2: tl.constexpr,
                        BITS: tl.constexpr, STATIC: tl.constexpr):
    """Quantize token n's (Hkv, D) row of K or V and write it to `slot`: the same arithmetic as
    quantize_ref. The row is handled as two halves of D/2 (what int4 packs into one byte)."""
    HALF: tl.constexpr = D // 2
    qmax = 2 ** BITS - 1
    h = tl.arange(0, HKV_P2)                                     # (HP2,) KV heads, padded
    hm = h < HKV
    dl = tl.arange(0, HALF)                                      # (HALF,)
    src = x_ptr + n * stride_n + h[:, None] * stride_h + dl[None, :]
    x_lo = tl.load(src, mask=hm[:, None], other=0.0).to(tl.float32)          # (HP2, HALF)
    x_hi = tl.load(src + HALF, mask=hm[:, None], other=0.0).to(tl.float32)   # (HP2, HALF)
    if STATIC:
        scale = tl.load(static_ptr + h * 2, mask=hm, other=1.0)  # (HP2,) float32
        zero = tl.load(static_ptr + h * 2 + 1, mask=hm, other=0.0)
    else:
        lo = tl.minimum(tl.min(x_lo, 1), tl.min(x_hi, 1))        # (HP2,)
        hi = tl.maximum(tl.max(x_lo, 1), tl.max(x_hi, 1))
        if BITS == 8:                                            # integer zero: 0 on the grid
            lo = tl.minimum(lo, 0.0)
            hi = tl.maximum(hi, 0.0)
        scale = tl.maximum((hi - lo) / qmax, 6.103515625e-05)     # MIN_SCALE = 2^-14
        scale = scale.to(tl.float16).to(tl.float32)              # rounded as it is stored
        if BITS == 8:
            zero = tl.minimum(tl.maximum(tl.floor(-lo / scale + 0.5), 0.0), qmax)
        else:                                                    # float zero: the minimum
            zero = lo.to(tl.float16).to(tl.float32)
    if BITS == 8:
        c_lo = tl.floor(x_lo / scale[:, None] + 0.5) + zero[:, None]         # (HP2, HALF)
        c_hi = tl.floor(x_hi / scale[:, None] + 0.5) + zero[:, None]
    else:
        c_lo = tl.floor((x_lo - zero[:, None]) / scale[:, None] + 0.5)
        c_hi = tl.floor((x_hi - zero[:, None]) / scale[:, None] + 0.5)
    c_lo = tl.minimum(tl.maximum(c_lo, 0.0), qmax).to(tl.uint8)
    c_hi = tl.minimum(tl.maximum(c_hi, 0.0), qmax).to(tl.uint8)
    row = slot * HKV + h                                         # (HP2,) rows of the side cache
    if BITS == 8:
        dst = data_ptr + row[:, None] * D + dl[None, :]
        tl.store(dst, c_lo, mask=hm[:, None])
        tl.store(dst + HALF, c_hi, mask=hm[:, None])
    else:                                                        # two codes per byte
        tl.store(data_ptr + row[:, None] * HALF + dl[None, :], c_lo | (c_hi << 4), mask=hm[:, None])
    tl.store(scale_ptr + row, scale.to(tl.float16), mask=hm)
    tl.store(zero_ptr + row, zero.to(zero_ptr.dtype.element_ty), mask=hm)


@triton.jit
def _store_kv_quant_kernel(
    k_ptr, v_ptr, slot_ptr,
    kd_ptr, ks_ptr, kz_ptr, k_static_ptr, vd_ptr, vs_ptr, vz_ptr, v_static_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh,
    HKV: tl.constexpr, D: tl.constexpr, HKV_P2: tl.constexpr, BITS: tl.constexpr,
    K_STATIC: tl.constexpr, V_STATIC: tl.constexpr,
):
    n = tl.program_id(0)                                         # one program per new token
    slot = tl.load(slot_ptr + n).to(tl.int64)
    if slot >= 0:                                                # slot -1: padding, skipped
        _quantize_store_row(k_ptr, stride_kn, stride_kh, n, slot, kd_ptr, ks_ptr, kz_ptr,
                            k_static_ptr, HKV, D, HKV_P2, BITS, K_STATIC)
        _quantize_store_row(v_ptr, stride_vn, stride_vh, n, slot, vd_ptr, vs_ptr, vz_ptr,
                            v_static_ptr, HKV, D, HKV_P2, BITS, V_STATIC)


def store_kv_quant_triton(k, v, k_cache: QuantKVCache, v_cache: QuantKVCache, slot_mapping) -> None:
    """Same contract as `store_kv_quant_ref`; no host sync (a CUDA graph can capture it)."""
    require_triton()
    N, Hkv, D = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and D == triton.next_power_of_2(D) and D >= 4
    assert k_cache.bits == v_cache.bits
    for c in (k_cache, v_cache):
        assert c.data.is_contiguous() and c.scale.is_contiguous() and c.zero.is_contiguous()
    if N == 0:
        return
    k_static = k_cache.static if k_cache.static is not None else k_cache.scale  # unused dummy
    v_static = v_cache.static if v_cache.static is not None else v_cache.scale
    _store_kv_quant_kernel[(N,)](
        k, v, slot_mapping, k_cache.data, k_cache.scale, k_cache.zero, k_static,
        v_cache.data, v_cache.scale, v_cache.zero, v_static,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HKV=Hkv, D=D, HKV_P2=triton.next_power_of_2(Hkv), BITS=k_cache.bits,
        K_STATIC=k_cache.static is not None, V_STATIC=v_cache.static is not None, num_warps=1)

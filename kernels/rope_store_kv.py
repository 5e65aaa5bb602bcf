"""RoPE on q and k, then k and v into the paged cache: the two steps between the qkv projection
and attention, in one launch.

Unfused, a decode step at batch 1 runs `rotary` (one program for the token's 40 heads) then
`store_kv` per layer: two launches that each cost 2-3 us for a few KB (docs/PERF.md). Here one
program per (token, KV head) rotates the GROUP query heads that read that KV head and the key
head in place (the prefill kernel reads the new k from qkv), and writes the rotated key and the
value into the token's cache slot (slot < 0: padding, nothing stored).

    rope_store_kv_ref     PyTorch: kernels/rotary.py's rotary_ref, then store_kv_ref
    rope_store_kv_triton  Triton: grid (N, Hkv), no host sync (a CUDA graph can capture it)

qkv is the fused projection viewed (N, Hq + 2 Hkv, D): q heads, then k heads, then v heads.
cos/sin (P, D) float32 tables (both halves equal, HF's layout), rows picked by `positions`.
"""
from __future__ import annotations

import torch

from kernels._triton import pdl_launch, pdl_wait, require_triton, tl, triton
from kernels.rotary import rotary_ref
from kernels.store_kv import store_kv_ref

__all__ = ["rope_store_kv_ref", "rope_store_kv_triton"]


def rope_store_kv_ref(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, hq: int, hkv: int):
    """qkv (N, Hq+2Hkv, D): q and k rotated in place; k, v written to slots. Returns qkv."""
    rotary_ref(qkv[:, :hq + hkv], positions, cos, sin)                    # (N, Hq+Hkv, D) view
    store_kv_ref(qkv[:, hq:hq + hkv], qkv[:, hq + hkv:], k_cache, v_cache, slot_mapping)
    return qkv


@triton.jit
def _rotate(base, stride_h, rows, mask, c, s, HALF: tl.constexpr):
    """Rotate the heads `rows` at `base` in place; returns the rotated halves (float32)."""
    i = tl.arange(0, HALF)[None, :]                                      # (1, HALF)
    ptr = base + rows[:, None] * stride_h + i                            # (R, HALF)
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
    tl.store(ptr, y1.to(base.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, y2.to(base.dtype.element_ty), mask=mask)
    return y1, y2


@triton.jit
def _rope_store_kv_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
                          stride_n, stride_h, stride_c,
                          HQ: tl.constexpr, HKV: tl.constexpr, GROUP_P: tl.constexpr,
                          HALF: tl.constexpr, PDL: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)                                                 # the KV head
    pdl_wait(PDL)                                    # qkv: the previous kernel's output
    group = HQ // HKV
    p = tl.load(pos_ptr + n).to(tl.int64)
    i = tl.arange(0, HALF)[None, :]                                      # (1, HALF)
    c = tl.load(cos_ptr + p * stride_c + i)                              # (1, HALF) float32
    s = tl.load(sin_ptr + p * stride_c + i)
    base = qkv_ptr + n * stride_n
    g = tl.arange(0, GROUP_P)                                            # (GP,) query heads
    _rotate(base, stride_h, h * group + g, (g < group)[:, None], c, s, HALF)
    one = tl.arange(0, 1)                                                # (1,) the key head
    k1, k2 = _rotate(base, stride_h, HQ + h + one, one[:, None] >= 0, c, s, HALF)
    slot = tl.load(slot_ptr + n).to(tl.int64)
    if slot >= 0:
        dst = slot * (HKV * 2 * HALF) + h * (2 * HALF) + i               # (1, HALF) cache row
        tl.store(k_cache_ptr + dst, k1.to(k_cache_ptr.dtype.element_ty))
        tl.store(k_cache_ptr + dst + HALF, k2.to(k_cache_ptr.dtype.element_ty))
        v_ptr = base + (HQ + HKV + h) * stride_h + i
        tl.store(v_cache_ptr + dst, tl.load(v_ptr).to(v_cache_ptr.dtype.element_ty))
        tl.store(v_cache_ptr + dst + HALF, tl.load(v_ptr + HALF).to(v_cache_ptr.dtype.element_ty))


def rope_store_kv_triton(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping,
                         hq: int, hkv: int):
    """Same contract as `rope_store_kv_ref` (qkv rows and heads may be strided, D contiguous)."""
    require_triton()
    N, H, D = qkv.shape
    assert H == hq + 2 * hkv and hq % hkv == 0 and qkv.stride(-1) == 1
    assert D % 2 == 0 and (D // 2) == triton.next_power_of_2(D // 2)
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[-2:] == (hkv, D)
    assert cos.is_contiguous() and sin.is_contiguous()
    if N:
        pdl = pdl_launch(qkv)
        _rope_store_kv_kernel[(N, hkv)](
            qkv, positions, cos, sin, slot_mapping, k_cache, v_cache,
            qkv.stride(0), qkv.stride(1), cos.stride(0),
            HQ=hq, HKV=hkv, GROUP_P=triton.next_power_of_2(hq // hkv), HALF=D // 2,
            PDL=pdl, launch_pdl=pdl, num_warps=1)
    return qkv

"""store_kv: write this step's K/V into the paged cache, one slot per token.

The KV cache of one layer is a pool of fixed-size blocks, not one tensor per sequence:

    k_cache, v_cache: (num_blocks, block_size, Hkv, D)

Flattening the pool gives one row per *slot*, `slot = block_id * block_size + offset`; the
ModelRunner computes each new token's slot from its sequence's block table (`slot_mapping`).
Slot -1 marks a padding token (a CUDA graph padded to a fixed batch): it is skipped.

    store_kv_ref     PyTorch: index_copy_ of the valid rows (one host sync to drop padding)
    check_slots      the padding check alone, done once per step for every layer (CPU engine)
    store_kv_checked PyTorch on checked slots: two index_copy_, no sync (the CPU engine's path)
    store_kv_triton  Triton: one program per token, padding skipped on the device (no sync)
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from kernels._triton import require_triton, tl, triton

__all__ = ["CheckedSlots", "check_slots", "store_kv_checked", "store_kv_ref", "store_kv_triton"]


def store_kv_ref(
    k: torch.Tensor,  # (N, Hkv, D) keys of the N new tokens
    v: torch.Tensor,  # (N, Hkv, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D), written in place
    v_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D), written in place
    slot_mapping: torch.Tensor,  # (N,) int32/int64, slot = block_id * block_size + offset
) -> None:
    """Write token n's k/v into slot `slot_mapping[n]` of the paged cache, in place.

    Slots < 0 mark padding tokens and are skipped. The boolean mask costs one host sync here;
    the Triton kernel skips them on the device.
    """
    _, Hkv, D = k.shape
    valid = slot_mapping >= 0  # (N,) bool
    slots = slot_mapping.long()  # (N,)
    if not bool(valid.all()):  # drop padding tokens (one host sync)
        slots, k, v = slots[valid], k[valid], v[valid]  # (n,), (n, Hkv, D) x2 with n <= N
    # .view (not .reshape/.flatten) so a non-contiguous cache fails loudly instead of
    # silently writing into a copy.
    k_cache.view(-1, Hkv, D).index_copy_(0, slots, k.to(k_cache.dtype))  # (num_blocks * block_size, Hkv, D)
    v_cache.view(-1, Hkv, D).index_copy_(0, slots, v.to(v_cache.dtype))  # (num_blocks * block_size, Hkv, D)


class CheckedSlots(NamedTuple):
    """A step's slot_mapping with its padding resolved: every layer writes the same slots, so
    the CPU engine checks them once per step (`check_slots`), not once per layer."""
    slots: torch.Tensor  # (n,) int64 slots to write, all >= 0
    rows: Optional[torch.Tensor]  # (n,) int64: the new tokens they belong to; None = all N


def check_slots(slot_mapping: torch.Tensor) -> CheckedSlots:
    """slot_mapping (N,) int32/int64, -1 = padding -> CheckedSlots (one host sync)."""
    valid = slot_mapping >= 0  # (N,) bool
    slots = slot_mapping.long()  # (N,)
    if bool(valid.all()):
        return CheckedSlots(slots, None)
    rows = valid.nonzero().squeeze(1)  # (n,) the tokens that are not padding
    return CheckedSlots(slots[rows], rows)


def store_kv_checked(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, checked: CheckedSlots) -> None:
    """`store_kv_ref` with the slots checked beforehand: the same writes, no host sync."""
    _, Hkv, D = k.shape
    if checked.rows is not None:  # drop padding tokens
        k, v = k[checked.rows], v[checked.rows]  # (n, Hkv, D) x2
    if k.dtype != k_cache.dtype:
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    k_cache.view(-1, Hkv, D).index_copy_(0, checked.slots, k)  # (num_blocks * block_size, Hkv, D)
    v_cache.view(-1, Hkv, D).index_copy_(0, checked.slots, v)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh,      # new k/v may be views into the qkv buffer
    HKV: tl.constexpr, D: tl.constexpr, HKV_P2: tl.constexpr,
):
    n = tl.program_id(0)                               # one program per new token
    slot = tl.load(slot_ptr + n).to(tl.int64)
    if slot < 0:                                       # padding: nothing to write
        return
    h = tl.arange(0, HKV_P2)[:, None]                  # (HKV_P2, 1)
    d = tl.arange(0, D)[None, :]                       # (1, D)
    mask = h < HKV
    k = tl.load(k_ptr + n * stride_kn + h * stride_kh + d, mask=mask)   # (HKV_P2, D)
    v = tl.load(v_ptr + n * stride_vn + h * stride_vh + d, mask=mask)
    dst = slot * (HKV * D) + h * D + d                 # the cache is contiguous: slot-major rows
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Same contract as `store_kv_ref`; no host sync (a CUDA graph can capture it)."""
    require_triton()
    N, Hkv, D = k.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "the cache must be contiguous"
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and D == triton.next_power_of_2(D)
    if N == 0:
        return
    _store_kv_kernel[(N,)](k, v, k_cache, v_cache, slot_mapping,
                           k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           HKV=Hkv, D=D, HKV_P2=triton.next_power_of_2(Hkv), num_warps=1)

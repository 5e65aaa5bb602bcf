"""RoPE + store_kv in one kernel (kernels/rope_store_kv.py) against the two references it
replaces, on fresh random inputs: q/k rotated in place, v untouched, k/v in their cache slots,
padding slots (-1) not written, every other cache row left as it was (the cache is poisoned
with NaN first). GQA 1/3/8; on CPU in Triton's interpreter, with a GPU (marker gpu) at real
shapes in bf16."""
from __future__ import annotations

import pytest
import torch

from kernels._triton import HAS_TRITON
from kernels.rope_store_kv import rope_store_kv_ref, rope_store_kv_triton
from labkit.layers.rotary import RotaryEmbedding

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 32), (9, 3, 64), (32, 8, 128)])
@pytest.mark.parametrize("n", [1, 7])
def test_rope_store_kv_matches_references(hq, hkv, d, n):
    dtype = torch.bfloat16 if CUDA else torch.float32
    rope = RotaryEmbedding(d, 10000.0, 4096).build(torch.device(DEV))
    num_slots = 4 * 16
    qkv = torch.randn(n, hq + 2 * hkv, d, dtype=dtype, device=DEV)
    positions = torch.randint(0, 4096, (n,), device=DEV)
    slots = torch.randperm(num_slots, device=DEV)[:n].to(torch.int32)
    if n > 1:
        slots[n // 2] = -1                                           # a padding token
    caches = [torch.full((4, 16, hkv, d), float("nan"), dtype=dtype, device=DEV) for _ in range(4)]
    want, got = qkv.clone(), qkv.clone()
    rope_store_kv_ref(want, positions, rope.cos, rope.sin, caches[0], caches[1], slots, hq, hkv)
    rope_store_kv_triton(got, positions, rope.cos, rope.sin, caches[2], caches[3], slots, hq, hkv)
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, **tol)                     # q, k rotated; v as it was
    assert torch.equal(got[:, hq + hkv:], qkv[:, hq + hkv:])
    for ref_cache, cache in zip(caches[:2], caches[2:]):
        flat, ref_flat = cache.view(-1, hkv, d), ref_cache.view(-1, hkv, d)
        written = slots[slots >= 0].long()
        torch.testing.assert_close(flat[written], ref_flat[written], **tol)
        untouched = torch.ones(num_slots, dtype=torch.bool, device=DEV)
        untouched[written] = False
        assert flat[untouched].isnan().all(), "a slot that no token owns was written"

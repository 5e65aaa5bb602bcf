"""Assignment 3 (homework/a3_kv_int8.py): int8 KV quantization per (token, head), against
labkit's reference (labkit/grading/reference/kv_int8.py) on fresh random K/V in the bundled
model's shapes (3 KV heads of 64 dims), with outlier tokens and a constant vector."""
from __future__ import annotations

import pytest
import torch

import adapters
from kernels.paged_decode import paged_decode_ref
from kernels.store_kv import store_kv_ref
from labkit.grading.reference import kv_int8 as ref

HKV, D = 3, 64


def random_kv(n: int, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(n, HKV, D) * torch.rand(n, HKV, 1) * 3 + torch.randn(n, HKV, 1)  # (n, Hkv, D)
    x[torch.randint(n, (max(1, n // 8),))] *= 20                # outlier tokens
    x[0, 0] = 0.75                                               # a constant vector
    return x.to(dtype)


def check_codes(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Codes equal, except off by one where rounding order breaks a near-tie (rare)."""
    assert got.dtype == torch.int8, f"{what}: dtype {got.dtype}, expected torch.int8"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1, f"{what}: a code differs by {diff.max().item()} from the reference"
    frac = (diff > 0).float().mean().item()
    assert frac <= 1e-3, f"{what}: {frac:.2%} of the codes differ by one (rounding?)"


@pytest.mark.points(2, assign="3.1")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantize_matches_reference(dtype):
    """quantize: codes, scale and zero per (token, head) as the reference"""
    x = random_kv(97, getattr(torch, dtype))
    codes, scale, zero = adapters.quantize_kv_int8(x)
    w_codes, w_scale, w_zero = ref.quantize_kv_int8(x)
    for name, got, want in (("scale", scale, w_scale), ("zero", zero, w_zero)):
        assert got.shape == want.shape and got.dtype == torch.float32, \
            f"{name}: {tuple(got.shape)} {got.dtype}, expected {tuple(want.shape)} float32"
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")
    check_codes(codes, w_codes, "codes")
    err = (ref.dequantize_kv_int8(codes, w_scale, w_zero) - x.float()).abs()
    assert (err <= w_scale[..., None] * 0.5001 + 1e-6).all(), "some value is off by more than scale/2"


@pytest.mark.points(2, assign="3.2")
def test_dequantize_matches_reference():
    """dequantize: any leading shape, the dtype asked for"""
    codes, scale, zero = ref.quantize_kv_int8(random_kv(64))
    for shape in ((64, HKV), (4, 16, HKV)):                     # tokens, or a paged cache
        c, s, z = codes.reshape(*shape, D), scale.reshape(shape), zero.reshape(shape)
        for dtype in (torch.float32, torch.bfloat16):
            got = adapters.dequantize_kv_int8(c, s, z, dtype)
            want = ref.dequantize_kv_int8(c, s, z, dtype)
            assert got.dtype == dtype and got.shape == want.shape, \
                f"shape {tuple(got.shape)} dtype {got.dtype}, expected {tuple(want.shape)} {dtype}"
            torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                       atol=1e-5, msg=lambda m: f"{shape} {dtype}: {m}")


@pytest.mark.points(3, assign="3.3")
def test_quantizing_store_and_attention():
    """quantizing store: codes and [scale, zero] in their slots, padding and others untouched"""
    num_blocks, bs, n = 12, 16, 40
    table = torch.randperm(num_blocks)[:-(-n // bs)].to(torch.int32)       # one sequence's blocks
    pos = torch.arange(n)
    slots = table[pos // bs].long() * bs + pos % bs                        # (n,)
    k, v = random_kv(n + 5), random_kv(n + 5)                              # 5 padding tokens
    slots = torch.cat([slots, torch.full((5,), -1)])
    perm = torch.randperm(n + 5)
    k, v, slots = k[perm], v[perm], slots[perm]
    caches = [torch.randint(-128, 128, (num_blocks, bs, HKV, D), dtype=torch.int8) for _ in range(2)]
    params = [torch.rand(num_blocks, bs, HKV, 2) for _ in range(2)]
    mine = [t.clone() for t in caches + params]
    want = [t.clone() for t in caches + params]
    adapters.store_kv_int8(k, v, *mine, slots)
    ref.store_kv_int8(k, v, *want, slots)
    for name, got, exp in zip(("k_cache", "v_cache"), mine[:2], want[:2]):
        check_codes(got, exp, name)
    for name, got, exp in zip(("k_params", "v_params"), mine[2:], want[2:]):
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")
    # decode attention over your int8 cache = over labkit's (and how far both are from float)
    kf, vf = (torch.zeros(num_blocks, bs, HKV, D) for _ in range(2))
    store_kv_ref(k, v, kf, vf, slots)
    q = torch.randn(2, 3 * HKV, D)                                         # GQA 3, as SmolLM2
    tables, lens = table[None].repeat(2, 1), torch.tensor([n, n // 2], dtype=torch.int32)

    def attend(codes_k, codes_v, params_k, params_v):
        kq = ref.dequantize_kv_int8(codes_k, params_k[..., 0], params_k[..., 1])
        vq = ref.dequantize_kv_int8(codes_v, params_v[..., 0], params_v[..., 1])
        return paged_decode_ref(q, kq, vq, tables, lens, D ** -0.5)       # (2, 9, D)
    got_att, want_att = attend(*mine), attend(*want)
    exact = paged_decode_ref(q, kf, vf, tables, lens, D ** -0.5)
    rel = ((got_att - want_att).norm() / want_att.norm()).item()
    print(f"attention over the int8 cache vs float: {((want_att - exact).norm() / exact.norm()).item():.2%} off")
    assert rel < 1e-3, f"attention over your int8 cache is {rel:.2%} off the one over labkit's"

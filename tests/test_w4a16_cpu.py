"""The CPU decode path of W4A16 (kernels/w4a16_cpu.py: PyTorch's int4 CPU kernel) against a
float64 computation of the same weights, and W4A16Linear's choice between it and the reference."""
from __future__ import annotations

import pytest
import torch

from kernels import w4a16_cpu
from kernels.w4a16 import dequantize_int4, pack_int4, w4a16_linear_ref
from labkit.layers.linear import W4A16Linear

pytestmark = pytest.mark.skipif(not w4a16_cpu.AVAILABLE,
                                reason="this torch has no int4 CPU kernel (_weight_int4pack_mm_for_cpu)")


def _random_int4(N, K, G, g):
    """-> codes q (N, K), then qweight, scales, zeros as a W4A16Linear holds them."""
    q = torch.randint(0, 16, (N, K), generator=g)
    scales = torch.rand(N, K // G, generator=g) * 0.02 + 1e-3
    zeros = torch.randint(0, 16, (N, K // G), generator=g, dtype=torch.uint8)
    return q, pack_int4(q), scales, zeros


def _float64(x, qweight, scales, zeros, G):
    w = dequantize_int4(qweight, scales.double(), zeros, G, torch.float64)      # (N, K)
    return x.double() @ w.T


@pytest.mark.parametrize("N, K, G", [(48, 64, 32), (32, 128, 64), (64, 256, 128), (960, 576, 64)])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_cpu_int4_kernel_matches_float64(N, K, G, M):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    q, qweight, scales, zeros = _random_int4(N, K, G, g)
    bias = torch.randn(N, generator=g).bfloat16()
    x = torch.randn(M, K, generator=g).bfloat16()
    packed, sz = w4a16_cpu.pack_for_cpu(qweight, scales, zeros, G)
    got = w4a16_cpu.w4a16_linear_cpu(x, packed, sz, G, bias)
    # the reference starts from the codes drawn, not from our unpacking of qweight
    w = (q.double().view(N, K // G, G) - zeros.double()[..., None]) * scales.double()[..., None]
    want = x.double() @ w.view(N, K).T + bias.double()                         # (M, N) float64
    ref16 = w4a16_linear_ref(x, qweight, scales.bfloat16(), zeros, G, bias)    # the bf16 reference
    assert got.shape == (M, N) and got.dtype == torch.bfloat16
    err, ref_err = ((got.double() - want).abs().max(), (ref16.double() - want).abs().max())
    # a bf16 product: as close to float64 as the bf16 reference is (scale/zero rounding included)
    assert err <= 2 * ref_err + 1e-2 * want.abs().max(), (err, ref_err)


def _layer(N, K, G, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    layer = W4A16Linear(K, N, G)
    _, qweight, scales, zeros = _random_int4(N, K, G, g)
    with torch.no_grad():
        layer.qweight.copy_(qweight)
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
    return layer.to(dtype)


def test_w4a16_linear_takes_the_cpu_kernel_for_bf16_rows(monkeypatch):
    calls = []
    real = w4a16_cpu.w4a16_linear_cpu
    monkeypatch.setattr(w4a16_cpu, "w4a16_linear_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = _layer(64, 128, 64, seed=1)
    for rows, dtype, fast in [(1, torch.bfloat16, True), (8, torch.bfloat16, True),
                              (9, torch.bfloat16, True), (300, torch.bfloat16, True),
                              (1, torch.float32, False)]:
        calls.clear()
        x = torch.randn(rows, 128).to(dtype)
        y = _layer(64, 128, 64, seed=1, dtype=dtype)(x) if dtype != torch.bfloat16 else layer(x)
        assert bool(calls) == fast, (rows, dtype)
        want = _float64(x, layer.qweight, layer.scales.float(), layer.zeros, 64)
        assert (y.double() - want).abs().max() <= 2e-2 * want.abs().max()
    calls.clear()
    odd = _layer(24, 128, 64, seed=2)                   # 24 rows: the kernel packs sixteens
    odd(torch.randn(1, 128).bfloat16())
    assert not calls


def test_repacks_when_the_weight_changes_in_place():
    layer = _layer(32, 64, 32, seed=3)
    x = torch.randn(2, 64).bfloat16()
    before = layer(x)
    with torch.no_grad():
        layer.scales.mul_(2)                            # e.g. a student edits the scales
    after = layer(x)
    torch.testing.assert_close(after, w4a16_linear_ref(x, layer.qweight, layer.scales, layer.zeros, 32),
                               atol=0.05, rtol=0.02)
    assert not torch.allclose(before, after)


def test_bf16_cpu_model_packs_its_int4_layers_at_load(tiny_llama_dir, tmp_path):
    """The kernel's copy is made when the model is loaded, not in the first decode step, and the
    packed model's decode rows agree with the reference path (same weights, bf16)."""
    from labkit.convert import convert
    from labkit.models.llama import LlamaForCausalLM
    from labkit.quant.awq_lite import auto_awq
    awq = auto_awq(str(tiny_llama_dir), tmp_path / "awq", calib_samples=2, calib_seqlen=32,
                   progress=False)
    ws = convert(awq, tmp_path / "ws", model_format="awq", progress=False)
    model = LlamaForCausalLM.from_pretrained(ws, dtype=torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, W4A16Linear)]
    assert linears and all("_repacked_cpu" in m.__dict__ for m in linears)
    x = torch.randn(3, linears[0].in_features).bfloat16()
    layer = linears[0]
    want = _float64(x, layer.qweight, layer.scales.float(), layer.zeros, layer.group_size)
    assert (layer(x).double() - want).abs().max() <= 2e-2 * want.abs().max()

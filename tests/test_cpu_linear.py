"""labkit/layers/cpu_linear.py: bf16 and fp32 linears through oneDNN with the weight reordered
once, against float64 products on fresh random inputs."""
import random

import pytest
import torch
import torch.nn.functional as F

from labkit.layers import cpu_linear as cl
from labkit.layers.cpu_linear import cpu_linear

# (dtype, tolerance of the product, tolerance after the in-place change)
CASES = [pytest.param(torch.bfloat16, 2e-2, 4e-2, marks=pytest.mark.skipif(
             not cl.AVAILABLE, reason="oneDNN bf16 is not available on this CPU")),
         pytest.param(torch.float32, 1e-5, 2e-5, marks=pytest.mark.skipif(
             not cl.FP32_AVAILABLE, reason="the fp32 oneDNN path is off here (not x86, or "
                                           "LABKIT_ONEDNN_FP32=0)"))]


@pytest.mark.parametrize("dtype,tol,tol_after", CASES)
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 5), (300,), (2, 550)])   # 1,100 rows: sgemm in fp32
def test_matches_float64_and_follows_in_place_updates(lead, dtype, tol, tol_after):
    g = torch.Generator().manual_seed(random.randrange(2**31))
    N, K = 96, 576
    w = (torch.randn(N, K, generator=g) * 0.05).to(dtype)  # made outside inference mode, as weights are
    b = torch.randn(N, generator=g).to(dtype)
    x = torch.randn(*lead, K, generator=g).to(dtype)
    with torch.inference_mode():
        for bias in (None, b):
            want = x.double() @ w.double().T + (0 if bias is None else bias.double())
            got = cpu_linear(x, w, bias)
            assert got.shape == (*lead, N) and got.dtype == dtype
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
        w.mul_(-2)                               # in place: the cached reordered copy is stale
        torch.testing.assert_close(cpu_linear(x, w).double(), x.double() @ w.double().T,
                                   atol=tol_after, rtol=tol_after)
        w.data = (torch.randn(N, K, generator=g) * 0.05).to(dtype)   # new storage, same version
        torch.testing.assert_close(cpu_linear(x, w).double(), x.double() @ w.double().T,
                                   atol=tol, rtol=tol)
    rows = x.numel() // K
    assert hasattr(w, "_onednn_packed") == cl.uses_onednn(dtype, rows)


def test_fp32_takes_onednn_where_available_and_autograd_stays_on_f_linear():
    g = torch.Generator().manual_seed(random.randrange(2**31))
    w, x = torch.randn(8, 32, generator=g), torch.randn(3, 32, generator=g)
    with torch.no_grad():
        got = cpu_linear(x, w)
    if cl.FP32_AVAILABLE:                        # exactly oneDNN's product on a fresh reorder
        packed = torch.ops.mkldnn._reorder_linear_weight(w, cl.PACK_FOR_ROWS[torch.float32])
        assert torch.equal(got, torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
    else:
        assert torch.equal(got, F.linear(x, w))
    w2 = torch.randn(8, 32, generator=g)
    assert torch.equal(cpu_linear(x, w2), F.linear(x, w2))      # grad mode on: F.linear
    assert not hasattr(w2, "_onednn_packed")


def test_onednn_fp32_switch(monkeypatch):
    monkeypatch.setenv("LABKIT_ONEDNN_FP32", "0")
    assert not cl._fp32_available()

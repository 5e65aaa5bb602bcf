"""labkit/layers/cpu_linear.py: bf16 linear through oneDNN with the weight reordered once."""
import pytest
import torch

from labkit.layers.cpu_linear import AVAILABLE, cpu_linear

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="oneDNN bf16 is not available on this CPU")


@pytest.mark.parametrize("lead", [(1,), (7,), (2, 5), (300,)])
def test_matches_float64_and_follows_in_place_updates(lead):
    N, K = 96, 576
    w = (torch.randn(N, K) * 0.05).bfloat16()           # made outside inference mode, as weights are
    b = torch.randn(N).bfloat16()
    x = torch.randn(*lead, K).bfloat16()
    with torch.inference_mode():
        check(x, w, b)
    assert hasattr(w, "_onednn_packed")


def check(x, w, b):
    N = w.shape[0]
    lead = x.shape[:-1]
    for bias in (None, b):
        want = x.double() @ w.double().T + (0 if bias is None else bias.double())
        got = cpu_linear(x, w, bias)
        assert got.shape == (*lead, N) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)
    w.mul_(-2)                                   # in place: the cached reordered copy is stale
    torch.testing.assert_close(cpu_linear(x, w).double(), x.double() @ w.double().T,
                               atol=4e-2, rtol=2e-2)


def test_fp32_and_autograd_stay_on_f_linear():
    w, x = torch.randn(8, 32), torch.randn(3, 32)
    assert torch.equal(cpu_linear(x, w), torch.nn.functional.linear(x, w))
    assert not hasattr(w, "_onednn_packed")

"""Assignment 4 (homework/a4_int4_awq.py): int4 group quantization, nibble packing and the AWQ
scale search, against labkit's reference (labkit/grading/reference/int4.py) on fresh random
weights in the bundled model's MLP shape (gate/up: 1536 x 576) with outlier input channels."""
from __future__ import annotations

import pytest
import torch

import adapters
from labkit.grading.reference import int4 as ref

N, K = 1536, 576            # SmolLM2-135M's gate/up projection (out, in)


def random_weight(n: int = N, k: int = K, dtype=torch.float32) -> torch.Tensor:
    w = torch.randn(n, k) * 0.05 + torch.randn(n, 1) * 0.01                 # (N, K)
    w[torch.randint(n, (20,)), torch.randint(k, (20,))] *= 30               # a few large weights
    return w.to(dtype)


def near(got: torch.Tensor, want: torch.Tensor, what: str, max_frac: float = 1e-3) -> None:
    """Integers equal, except off by one at rare near-ties of the rounding."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, expected {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1, f"{what}: a value differs by {diff.max().item()} from the reference"
    frac = (diff > 0).float().mean().item()
    assert frac <= max_frac, f"{what}: {frac:.2%} of the values differ by one (rounding?)"


@pytest.mark.points(3, assign="4.1")
@pytest.mark.parametrize("group_size", [32, 64])
def test_group_quantize_and_dequantize(group_size):
    """group quantization: q, scale, integer zero as the reference; dequantize inverts it"""
    w = random_weight()
    q, scale, zero = adapters.quantize_int4(w, group_size)
    wq, ws, wz = ref.quantize_int4(w, group_size)
    assert scale.shape == ws.shape and scale.dtype == torch.float32, \
        f"scale: {tuple(scale.shape)} {scale.dtype}, expected {tuple(ws.shape)} float32"
    torch.testing.assert_close(scale, ws, rtol=1e-6, atol=1e-10, msg=lambda m: f"scale: {m}")
    near(zero, wz, "zero")
    near(q, wq, "q")
    got = adapters.dequantize_int4(wq, ws, wz, group_size)
    torch.testing.assert_close(got, ref.dequantize_int4(wq, ws, wz, group_size), rtol=1e-6,
                               atol=1e-8, msg=lambda m: f"dequantize_int4: {m}")
    with pytest.raises(ValueError, match="group_size"):
        adapters.quantize_int4(random_weight(8, 96), 64)


@pytest.mark.points(2, assign="4.2")
def test_pack_matches_layout():
    """pack: two values per byte, the even column in the low nibble"""
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    got = adapters.pack_int4(q)
    want = ref.pack_int4(q)
    assert got.dtype == torch.uint8 and got.shape == want.shape, \
        f"packed: {tuple(got.shape)} {got.dtype}, expected {tuple(want.shape)} uint8"
    assert torch.equal(got, want), f"{(got != want).sum().item()} packed bytes differ from the layout"


@pytest.mark.points(2, assign="4.3")
def test_unpack_inverts_pack():
    """unpack: recovers every 4-bit value of the reference packing"""
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    got = adapters.unpack_int4(ref.pack_int4(q))
    assert got.dtype == torch.uint8 and got.shape == q.shape, \
        f"unpacked: {tuple(got.shape)} {got.dtype}, expected {tuple(q.shape)} uint8"
    assert torch.equal(got, q), f"{(got != q).sum().item()} values differ after unpacking"


@pytest.mark.points(3, assign="4.4")
def test_awq_search_scale():
    """AWQ scale search: the loss curve over alpha and the chosen scales as the reference"""
    T, n_grid, group = 64, 20, 64
    x = torch.randn(T, K)
    hot = torch.randperm(K)[:8]
    x[:, hot] *= 25                                          # salient input channels
    w = random_weight()
    s, alpha, losses = adapters.awq_search_scale(x, w, group, n_grid)
    ws, walpha, wlosses = ref.awq_search_scale(x, w, group, n_grid)
    assert wlosses.argmin() > 0, "grader bug: AWQ did not beat round-to-nearest on this input"
    assert losses.shape == (n_grid,), f"losses: shape {tuple(losses.shape)}, expected ({n_grid},)"
    torch.testing.assert_close(losses.float(), wlosses, rtol=2e-3, atol=0,
                               msg=lambda m: f"losses over the alpha grid: {m}")
    i = round(float(alpha) * n_grid)
    assert abs(float(alpha) * n_grid - i) < 1e-6 and 0 <= i < n_grid, f"alpha={alpha} is not on the grid"
    assert wlosses[i] <= wlosses.min() * (1 + 2e-3), \
        f"alpha={alpha} has loss {wlosses[i]:.4g}; the best alpha {walpha} has {wlosses.min():.4g}"
    want_s = x.abs().mean(0).pow(i / n_grid).clamp(min=1e-4)
    want_s = want_s / (want_s.max() * want_s.min()).sqrt()
    torch.testing.assert_close(s.float(), want_s, rtol=1e-5, atol=1e-7, msg=lambda m: f"scales: {m}")

"""Assignment 5 (homework/a5_tensor_parallel.py): column/row-parallel Linear and the
tensor-parallel MLP on 2 CPU processes (gloo), against the unsplit layer in float64, in the
bundled model's shapes (hidden 576, intermediate 1536)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import adapters
from labkit.grading.distributed import run_ranks

CHECKS = Path(__file__).with_name("tp_checks.py")
WORLD, T, HIDDEN, INTER = 2, 8, 576, 1536
RANK_TIMEOUT = 45.0          # seconds for all ranks (start-up included); the grader's own is longer


def _data(*shapes):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    return [(torch.randn(s, generator=g) * (1.0 if i == 0 else 0.05)).numpy() for i, s in enumerate(shapes)]


def _close(got, want, what):
    err = np.abs(got - want).max()
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4), f"{what}: max error {err:.3g} (tolerance 1e-4)"


def _collectives(rank_out):
    return {k: v for k, v in rank_out["collectives"].items() if v}


@pytest.mark.points(3, assign="5.1")
def test_column_parallel_linear():
    """column-parallel Linear: shards by output rows, all-gather gives the unsplit output"""
    tp = adapters.tensor_parallel_module()             # an import error fails here, not in the ranks
    x, w, b = _data((T, HIDDEN), (INTER, HIDDEN), (INTER,))
    tp.shard_column(torch.from_numpy(w), torch.from_numpy(b), 0, WORLD)   # a stub fails here, fast
    want = x.astype(np.float64) @ w.T.astype(np.float64) + b
    outs = run_ranks(CHECKS, "column", WORLD, (x, w, b), RANK_TIMEOUT)
    n = INTER // WORLD
    for r, out in enumerate(outs):
        res = out["result"]
        assert np.array_equal(res["w_r"], w[r * n:(r + 1) * n]), f"rank {r}: shard_column's weight is not rows {r * n}..{(r + 1) * n - 1}"
        assert np.array_equal(res["b_r"], b[r * n:(r + 1) * n]), f"rank {r}: shard_column's bias is not its slice"
        _close(res["y"], want, f"rank {r}'s output")


@pytest.mark.points(3, assign="5.2")
def test_row_parallel_linear():
    """row-parallel Linear: shards by input columns, one all-reduce sums the partials"""
    tp = adapters.tensor_parallel_module()
    x, w, b = _data((T, INTER), (HIDDEN, INTER), (HIDDEN,))
    tp.shard_row(torch.from_numpy(w), 0, WORLD)                        # a stub fails here, fast
    want = x.astype(np.float64) @ w.T.astype(np.float64) + b
    outs = run_ranks(CHECKS, "row", WORLD, (x, w, b), RANK_TIMEOUT)
    k = INTER // WORLD
    for r, out in enumerate(outs):
        res = out["result"]
        assert np.array_equal(res["w_r"], w[:, r * k:(r + 1) * k]), f"rank {r}: shard_row is not columns {r * k}..{(r + 1) * k - 1}"
        _close(res["y"], want, f"rank {r}'s output (is the bias added once?)")
        assert _collectives(out) == {"all_reduce": 1}, f"rank {r} called {_collectives(out)}: expected one all_reduce"


@pytest.mark.points(3, assign="5.3")
def test_parallel_mlp_one_all_reduce():
    """tensor-parallel Llama MLP: equals the unsplit MLP with one all-reduce and no gather"""
    adapters.tensor_parallel_module()
    x, wg, wu, wd = _data((T, HIDDEN), (INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER))
    x64, g64, u64, d64 = (torch.from_numpy(a).double() for a in (x, wg, wu, wd))
    want = (torch.nn.functional.silu(x64 @ g64.T) * (x64 @ u64.T) @ d64.T).numpy()
    outs = run_ranks(CHECKS, "mlp", WORLD, (x, wg, wu, wd), RANK_TIMEOUT)
    for r, out in enumerate(outs):
        _close(out["result"]["y"], want, f"rank {r}'s MLP output")
        assert _collectives(out) == {"all_reduce": 1}, f"rank {r} called {_collectives(out)}: expected one all_reduce, no gather"

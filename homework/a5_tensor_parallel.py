"""Assignment 5: tensor parallelism, column- and row-parallel Linear with torch.distributed.

A Linear y = x @ w.T + b with w (N, K) is split across `world` ranks two ways (Megatron-LM):

    column parallel: rank r holds rows r*N/world .. (r+1)*N/world - 1 of w (a slice of the
        OUTPUT features) and the same slice of b; it computes its slice of y; an all-gather
        concatenates the slices (in rank order) so every rank has the full y (T, N).
    row parallel: rank r holds columns r*K/world .. of w (a slice of the INPUT features) and
        receives the matching slice of x; its partial product x_r @ w_r.T (T, N) is summed
        over the ranks with one all-reduce; the bias is added once, after the sum.

The Llama MLP chains them with ONE all-reduce and no gather (5.3): gate and up projections
column-parallel (each rank keeps its slice of the intermediate features), SiLU(gate) * up
on that slice, then the down projection row-parallel and an all-reduce.

Every function runs inside an initialized default process group (the grader starts `world`
CPU processes with the gloo backend); use torch.distributed (dist.get_rank(),
dist.get_world_size(), dist.all_gather, dist.all_reduce). N, K and the MLP's intermediate
size are divisible by world. The grader compares every rank's output with the unsplit layer
computed in float64, on fresh random weights in the bundled model's shapes (hidden 576,
intermediate 1536), world = 2, and counts your collectives (5.3: one all_reduce, no gather).
Check locally: `labkit grade -k a5`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist  # noqa: F401  (you will need these)
import torch.nn.functional as F  # noqa: F401


def shard_column(w: torch.Tensor, b: torch.Tensor | None, rank: int, world: int):
    """w (N, K), b (N,) or None -> this rank's (w_r (N/world, K), b_r (N/world,) or None)."""
    # BEGIN ASSIGN 5.1
    raise NotImplementedError("ASSIGN 5.1: shard_column")
    # END ASSIGN 5.1


def column_parallel_linear(x: torch.Tensor, w_r: torch.Tensor, b_r: torch.Tensor | None) -> torch.Tensor:
    """x (T, K) (the same on every rank), w_r (N/world, K) -> y (T, N) on every rank."""
    # BEGIN ASSIGN 5.1
    raise NotImplementedError("ASSIGN 5.1: column_parallel_linear")
    # END ASSIGN 5.1


def shard_row(w: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """w (N, K) -> this rank's w_r (N, K/world) (contiguous)."""
    # BEGIN ASSIGN 5.2
    raise NotImplementedError("ASSIGN 5.2: shard_row")
    # END ASSIGN 5.2


def row_parallel_linear(x_r: torch.Tensor, w_r: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x_r (T, K/world) (this rank's slice of x), w_r (N, K/world), b (N,) or None (the full
    bias, the same on every rank) -> y (T, N) on every rank."""
    # BEGIN ASSIGN 5.2
    raise NotImplementedError("ASSIGN 5.2: row_parallel_linear")
    # END ASSIGN 5.2


def parallel_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                 w_down: torch.Tensor) -> torch.Tensor:
    """The Llama MLP, tensor-parallel: y = (silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T.

    x (T, H) the same on every rank; the FULL weights w_gate, w_up (I, H) and w_down (H, I)
    are given to every rank: shard them yourself (5.1/5.2's shard functions), compute this
    rank's slice of the intermediate activations (T, I/world), and finish with one
    all_reduce. Returns y (T, H) on every rank."""
    # BEGIN ASSIGN 5.3
    raise NotImplementedError("ASSIGN 5.3: parallel_mlp")
    # END ASSIGN 5.3
